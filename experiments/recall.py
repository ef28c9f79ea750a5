# -*- coding: utf-8 -*-
"""Associative recall at long context: where does top-k selection lose the needle, and does SPLA's residual help?

A controlled version of issue 8's question (the corpus study in ``study.py`` could not separate the variants:
its models were too small to retrieve at all). Multi-query associative recall (MQAR, as in Zoology / Based) in
a long haystack of noise tokens: ``n_pairs`` key-value pairs (two tokens each) are scattered at random positions,
then ``n_queries`` of the keys are asked again at the end, each followed by its value. Only the value after a
query key is scored (and trained), so a model must find, for every query, the one earlier place where that key
stood, anywhere in the context. Keys and values come from one pool of symbols (see :class:`RecallTask` for why).

1. **stage 1**: a small dense Llama-style model learns the task from scratch, as the plain dense model, by a
   curriculum: it starts at the task's shortest length (the pairs densely packed) and the length grows by
   ``grow_by`` each time the training accuracy of the last ``grow_every`` steps reaches ``grow_at``, up to
   ``short_len`` (for the ``gpu`` preset the stage-2 length: the dense model retrieves there before any
   conversion);
2. **stage 2**: that model is continued at ``long_len`` (8x the top-k budget for the ``gpu`` preset) as each
   variant of ``experiments.common.VARIANT_HELP`` (``dense``, ``topk_taylor1``, ``topk_taylor2``, ``spla``, ...),
   every variant for the same number of steps (``--stage2-steps``, or what fits ``variant_minutes``);
3. **evaluation**: query accuracy at several lengths (the training length and beyond), ``--seeds`` stage-2
   seeds reported as mean and spread, plus the stage-1 model (``base``).

Everything runs in one process; the numbers land in ``OUT/results.json``, ``OUT/results.md`` and
``OUT/results.png``. Stage 1 is saved in ``OUT/stage1.pt`` (model, optimizer, data stream, curriculum) at the end
of every call and continued by the next, so a long stage 1 can span several commands (``--stage 1``), and
``--stage 2`` runs stage 2 and the evaluation from the saved model as it is. ``--merge`` pools the results of
several ``--stage 2`` calls (more seeds, ablations) from one stage-1 model into one table.

    python -m experiments.recall --preset tiny --out out/recall-tiny                      # CPU smoke run (~15 s)
    python -m experiments.recall --preset cpu --out out/recall-cpu                        # the 2-core CPU size
    python -m experiments.recall --preset gpu --out out/recall                            # ~5 minutes on one H100
    python -m experiments.recall --preset gpu --out out/recall --stage 1 --stage1-minutes 9   # more stage 1 (repeatable)
    python -m experiments.recall --preset gpu --out out/recall --stage 2 --seeds 2 3 --stage2-steps 556
    python -m experiments.recall --merge out/a/results.json out/b/results.json --out out/recall-all
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # `python experiments/recall.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import (MAIN_VARIANTS, VARIANT_HELP, _batches, autocast, eval_spla,  # noqa: E402
                                hidden_states, variant_spla, variant_train, write_json)
from experiments.evaluate import _fmt, _stats, device_name  # noqa: E402

IGNORE = -100


# ---------------------------------------------------------------------------------------------- the task
@dataclass(frozen=True)
class RecallTask:
    """Token layout: 0 is never used, ``1..noise`` are haystack tokens, ``noise+1..noise+symbols`` the symbols that
    keys and values are drawn from. A sequence of length ``T``: noise with ``n_pairs`` (key, value) pairs at random
    odd offsets, then, in its last ``2 * n_queries`` tokens, ``n_queries`` distinct keys of those pairs each
    followed by its value. Within a sequence the keys are distinct and no value is a key; values are drawn
    independently (with replacement) from the other symbols.

    Keys and values share one pool, so a symbol is a key in one sequence and a value in the next. With separate key
    and value vocabularies (this task's first design) a 2-layer model settled on "some value of this sequence"
    and never formed the lookup, even with two pairs; with one pool the same model learned it within ~1000 steps
    (the CPU runs in ``docs/results.md``). Keep ``n_queries`` well below ``n_pairs``: a query can also be answered by
    elimination (the value of a pair not yet asked)."""

    noise: int = 64
    symbols: int = 1024
    n_pairs: int = 32
    n_queries: int = 16

    @property
    def vocab(self) -> int:
        return 1 + self.noise + self.symbols

    def min_len(self) -> int:
        return 4 * self.n_pairs + 2 * self.n_queries + 2

    def batch(self, batch: int, length: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """``(ids, targets)``, both ``[batch, length]`` int64; ``targets[b, t]`` is the value token to predict
        at position ``t`` (the query key's position) and ``-100`` elsewhere.

        Raises:
            ValueError: when ``length`` cannot hold the pairs and the queries, or the pool the keys and a value.
        """
        if length < self.min_len():
            raise ValueError(f"length {length} is too short for {self.n_pairs} pairs and {self.n_queries} queries "
                             f"(needs >= {self.min_len()})")
        if self.n_queries > self.n_pairs or self.n_pairs >= self.symbols:
            raise ValueError("need n_queries <= n_pairs < symbols")
        ids = rng.integers(1, 1 + self.noise, size=(batch, length))
        tgt = np.full((batch, length), IGNORE, dtype=np.int64)
        ctx = length - 2 * self.n_queries          # the haystack: positions 0 .. ctx-1
        slots = (ctx - 1) // 2                      # pair slots at odd offsets 1, 3, ...: position 0 stays noise
        qpos = ctx + 2 * np.arange(self.n_queries)
        for b in range(batch):
            k = rng.choice(self.symbols, size=self.n_pairs, replace=False)
            others = np.setdiff1d(np.arange(self.symbols), k, assume_unique=True)
            k, v = k + 1 + self.noise, others[rng.integers(0, len(others), size=self.n_pairs)] + 1 + self.noise
            at = rng.choice(slots, size=self.n_pairs, replace=False) * 2 + 1
            ids[b, at], ids[b, at + 1] = k, v
            q = rng.choice(self.n_pairs, size=self.n_queries, replace=False)
            ids[b, qpos], ids[b, qpos + 1] = k[q], v[q]
            tgt[b, qpos] = v[q]
        return ids, tgt


# ---------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class RecallPreset:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    task: RecallTask
    short_len: int
    short_batch: int
    short_lr: float
    short_minutes: float
    short_max_steps: int
    long_len: int
    long_batch: int
    long_lr: float
    variant_minutes: float
    long_max_steps: int
    block_size: int
    topk: int
    eval_lengths: Tuple[int, ...]
    eval_examples: int
    variants: Tuple[str, ...] = MAIN_VARIANTS
    seeds: Tuple[int, ...] = (0, 1)
    warmup: int = 50
    calib_steps: int = 3
    threads: Optional[int] = None
    # stage-1 curriculum: start at the task's shortest length (pairs packed densely, little noise) and grow the
    # length by ``grow_by`` whenever the training accuracy of the last ``grow_every`` steps reaches ``grow_at``
    curriculum: bool = True
    grow_at: float = 0.9
    grow_by: float = 1.5
    grow_every: int = 50

    def next_length(self, length: int, recent_acc: float) -> int:
        """The stage-1 length after a window of ``grow_every`` steps at ``length`` with accuracy ``recent_acc``."""
        if not self.curriculum or length >= self.short_len or recent_acc < self.grow_at:
            return length
        return min(self.short_len, max(length + 1, int(length * self.grow_by)))


PRESETS: Dict[str, RecallPreset] = {
    # CPU smoke run of the pipeline: too few steps to learn the task (not evidence)
    "tiny": RecallPreset(
        name="tiny", hidden=64, layers=2, heads=2, kv_heads=1, head_dim=32,
        task=RecallTask(noise=16, symbols=64, n_pairs=4, n_queries=2),
        short_len=64, short_batch=8, short_lr=3e-3, short_minutes=0.2, short_max_steps=30,
        long_len=256, long_batch=2, long_lr=1e-3, variant_minutes=0.1, long_max_steps=8,
        block_size=16, topk=4, eval_lengths=(128, 256), eval_examples=4, seeds=(0,), warmup=5, calib_steps=2,
        threads=1),
    # the CPU-sized study (2 cores): stage 1 ~25 min, stage 2 4 variants x 2 seeds x 2.5 min, a few minutes of
    # evaluation (torch backend); the same question at a quarter of the gpu preset's lengths
    "cpu": RecallPreset(
        name="cpu", hidden=128, layers=2, heads=4, kv_heads=2, head_dim=64,
        task=RecallTask(noise=64, symbols=128, n_pairs=8, n_queries=4),
        short_len=512, short_batch=32, short_lr=1e-3, short_minutes=25.0, short_max_steps=50_000,
        long_len=512, long_batch=8, long_lr=2e-4, variant_minutes=2.5, long_max_steps=5_000,
        block_size=16, topk=4, eval_lengths=(128, 256, 512, 1024), eval_examples=64, threads=1),
    # one H100 command (~5 min): stage 1 2 min (--stage1-minutes, or --stage 1 calls, for more), 4 variants x
    # 2 seeds x ~18 s, evaluation ~10 s
    "gpu": RecallPreset(
        name="gpu", hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64,
        task=RecallTask(noise=64, symbols=1024, n_pairs=32, n_queries=16),
        short_len=4096, short_batch=64, short_lr=1e-3, short_minutes=2.0, short_max_steps=20_000,
        long_len=4096, long_batch=8, long_lr=2e-4, variant_minutes=0.3, long_max_steps=5_000,
        block_size=64, topk=8, eval_lengths=(512, 2048, 4096, 8192), eval_examples=64),
}

# the lengths and budget: 16k tokens, top-16 blocks of 64 (1/16 of the context), evaluation to 32k; the same
# model and task as "gpu": stage 1 grows to 16k (~1M tokens per step at the end; from the "gpu" preset's stage-1
# model, 300 steps, ~2 min on an H200), stage 2 trains 2 x 16k tokens per step, the same tokens per step as "gpu"'s 8 x 4k
PRESETS["gpu-16k"] = dataclasses.replace(
    PRESETS["gpu"], name="gpu-16k", short_len=16384, short_minutes=6.0, long_len=16384, long_batch=2,
    variant_minutes=0.5, topk=16, eval_lengths=(4096, 8192, 16384, 32768), eval_examples=32)


# ---------------------------------------------------------------------------------------------- model
def build_model(preset: RecallPreset, seed: int):
    """A random-init dense Llama of the preset's size (fp32 weights, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=preset.task.vocab, hidden_size=preset.hidden, intermediate_size=4 * preset.hidden,
                      num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
                      num_key_value_heads=preset.kv_heads, head_dim=preset.head_dim,
                      max_position_embeddings=max(preset.eval_lengths + (preset.long_len,)), rope_theta=10000.0,
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def as_variant(dense_model, variant: str, preset: RecallPreset, length: int):
    """A copy of the dense model converted to ``variant`` for sequences of ``length`` tokens."""
    import spla
    model = copy.deepcopy(dense_model)
    return spla.convert(model, variant_spla(variant, preset.block_size, preset.topk, length))


def set_length(model, variant: str, preset: RecallPreset, length: int) -> None:
    """Re-fit the top-k of a converted model to ``length`` (``dense`` keeps selecting every block)."""
    import spla
    cfg = eval_spla(variant_spla(variant, preset.block_size, preset.topk, preset.long_len), variant == "dense", length)
    spla.convert(model, cfg)


def recall_loss(model, ids: torch.Tensor, tgt: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over the scored positions (logits formed for those positions alone) and their accuracy."""
    h = hidden_states(model, ids)
    mask = tgt != IGNORE
    with autocast(ids.device):
        logits = model.lm_head(h[mask]).float()
    y = tgt[mask]
    return F.cross_entropy(logits, y), (logits.argmax(-1) == y).float().mean()


# ---------------------------------------------------------------------------------------------- training
class Run:
    """One model under training: its optimizer, schedule, data stream and step log."""

    def __init__(self, model, preset: RecallPreset, length: int, batch: int, lr: float, steps_hint: Optional[int],
                 seed: int, device: torch.device, merge_lr_mult: float = 1.0):
        from spla.layers.spla import spla_layers
        self.model, self.preset, self.length, self.batch = model.to(device), preset, length, batch
        self.lr, self.steps_hint, self.device = lr, steps_hint, device
        # weight decay 0.1 on every parameter (the recipe of the runs in docs/results.md); the SPLA merge scales in
        # a group of their own at lr * merge_lr_mult (with 1, the same updates as one group)
        merge = {id(p) for m in spla_layers(self.model) for p in m.merge_parameters()}
        groups = [([p for p in self.model.parameters() if id(p) not in merge], 1.0),
                  ([p for p in self.model.parameters() if id(p) in merge], merge_lr_mult)]
        groups = [(ps, mult) for ps, mult in groups if ps]
        self.mults = [mult for _, mult in groups]      # kept outside the groups: a loaded state replaces their dicts
        self.opt = torch.optim.AdamW([{"params": ps} for ps, _ in groups], lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        self.rng = np.random.default_rng([seed, length])
        self.step, self.tokens, self.times, self.losses, self.accs = 0, 0, [], [], []

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then a cosine to 10% at ``steps_hint`` (constant when ``steps_hint`` is None)."""
        w = self.preset.warmup
        if step < w:
            return self.lr * (step + 1) / w
        if self.steps_hint is None:
            return self.lr
        frac = min(1.0, (step - w) / max(1, self.steps_hint - w))
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    def train(self, n: int) -> None:
        self.model.train()
        for _ in range(n):
            ids, tgt = (torch.from_numpy(a).to(self.device)
                        for a in self.preset.task.batch(self.batch, self.length, self.rng))
            for g, mult in zip(self.opt.param_groups, self.mults):
                g["lr"] = self.lr_at(self.step) * mult
            t0 = time.perf_counter()
            loss, acc = recall_loss(self.model, ids, tgt)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - t0)
            self.losses.append(float(loss.detach()))
            self.accs.append(float(acc))
            self.step += 1
            self.tokens += self.batch * self.length

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue this run in another process (model, optimizer, data stream, logs)."""
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "rng": self.rng.bit_generator.state,
                "step": self.step, "tokens": self.tokens, "length": self.length, "times": self.times,
                "losses": self.losses, "accs": self.accs}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.rng.bit_generator.state = state["rng"]
        self.step, self.tokens, self.length = state["step"], state["tokens"], state["length"]
        self.times, self.losses, self.accs = list(state["times"]), list(state["losses"]), list(state["accs"])

    def step_s(self) -> float:
        """Median seconds per step, the first (compilation) excluded."""
        t = self.times[1:] or self.times
        return float(np.median(t))

    def merge_scales(self) -> List[float]:
        """Mean ``|w|`` of every SPLA merge scale of the model, layer by layer (``[]`` without SPLA merges): how far
        training moved the residual branch's weight from its start (0 for ``merge="residual"``)."""
        from spla.layers.spla import spla_layers
        return [round(float(p.detach().abs().mean()), 5) for m in spla_layers(self.model) for p in m.merge_parameters()]

    def summary(self) -> Dict[str, Any]:
        tail = max(1, min(20, len(self.losses) // 5))
        return {"merge_scales": self.merge_scales(), "steps": self.step, "tokens": self.tokens, "seq_len": self.length,
                "batch": self.batch, "step_s": round(self.step_s(), 5),
                "tokens_per_s": round(self.tokens / max(sum(self.times), 1e-9)),   # over every step (all lengths)
                "final_loss": float(np.mean(self.losses[-tail:])), "final_train_acc": float(np.mean(self.accs[-tail:]))}


@torch.no_grad()
def accuracy(model, task: RecallTask, length: int, n: int, device: torch.device, seed: int = 12345,
             batch_tokens: int = 65536) -> float:
    """Share of correctly recalled values over ``n`` fresh sequences of ``length`` (argmax at each query key)."""
    model.eval()
    rng = np.random.default_rng([seed, length])
    hits = total = 0
    for a, b in _batches(n, length, batch_tokens):
        ids, tgt = (torch.from_numpy(x).to(device) for x in task.batch(b - a, length, rng))
        h = hidden_states(model, ids)
        mask = tgt != IGNORE
        with autocast(device):
            pred = model.lm_head(h[mask]).argmax(-1)
        hits += int((pred == tgt[mask]).sum())
        total += int(mask.sum())
    return hits / total


# ---------------------------------------------------------------------------------------------- the study
STAGE1_FILE = "stage1.pt"


def train_stage1(preset: RecallPreset, out: str, base, device: torch.device, minutes: Optional[float] = None,
                 log: Callable[[str], None] = print) -> Tuple[Run, List[Tuple[int, int]], bool]:
    """Train (or continue, from ``OUT/stage1.pt``) the dense stage-1 model for ``minutes`` (default: the preset's).

    Returns the run, the curriculum's (step, length) schedule and whether the task counts as learned. Stops early
    at ``short_max_steps``, or once the curriculum has reached ``short_len`` and the training accuracy
    there reaches ``grow_at`` (the task is learned). Saves ``OUT/stage1.pt`` at the end of every call, so a
    stage 1 longer than one command runs as several (``--stage 1``, repeated).
    """
    start = preset.task.min_len() if preset.curriculum else preset.short_len
    # the plain dense model: exactly what the SPLA layer computes with every block selected (SPEC §2), and on the
    # CPU much faster than the layer's torch path
    run1 = Run(copy.deepcopy(base), preset, start, preset.short_batch,
               preset.short_lr, None, seed=0, device=device)    # constant learning rate after the warm-up
    schedule: List[Tuple[int, int]] = [(0, start)]   # (step, length) at every change of the curriculum
    path = os.path.join(out, STAGE1_FILE)
    if os.path.exists(path):
        state = torch.load(path, map_location=device, weights_only=False)
        run1.load_state_dict(state["run"])
        schedule = [tuple(x) for x in state["schedule"]]
        log(f"recall: stage 1 resumed at step {run1.step}, length {run1.length}")

    def learned() -> bool:
        # the accuracy window must lie wholly at the final length (not the window that triggered the last growth)
        n = preset.grow_every
        return (run1.length >= preset.short_len and run1.step - schedule[-1][0] >= n
                and float(np.mean(run1.accs[-n:])) >= preset.grow_at)

    minutes = preset.short_minutes if minutes is None else minutes
    deadline = time.time() + 60 * minutes
    least = run1.step + (preset.calib_steps + 1 if minutes > 0 else 0)   # a call that trains makes a few steps
    while (run1.step < preset.short_max_steps and not learned()
           and (time.time() < deadline or run1.step < least)):
        run1.train(min(preset.grow_every, preset.short_max_steps - run1.step))
        recent = float(np.mean(run1.accs[-preset.grow_every:]))
        if run1.step % (4 * preset.grow_every) == 0:
            log(f"recall: stage 1 step {run1.step} at length {run1.length}: loss "
                f"{np.mean(run1.losses[-preset.grow_every:]):.3f}, train acc {recent:.3f}")
        grown = preset.next_length(run1.length, recent)
        if grown != run1.length:
            log(f"recall: stage 1 step {run1.step}: train acc {recent:.3f} at length {run1.length} -> {grown}")
            run1.length = grown
            schedule.append((run1.step, grown))
    torch.save({"run": run1.state_dict(), "schedule": schedule}, path)
    done = learned()
    if done:
        log(f"recall: stage 1 learned the task at length {run1.length} by step {run1.step}")
    else:
        log(f"recall: stage 1 stopped at step {run1.step}, length {run1.length} of {preset.short_len}, train acc "
            f"{np.mean(run1.accs[-preset.grow_every:]):.3f} (not learned; `--stage 1` again continues it)")
    return run1, schedule, done


def run(preset: RecallPreset, out: str, variants: Sequence[str], seeds: Sequence[int],
        device: Optional[torch.device] = None, log: Callable[[str], None] = print, stage: str = "all",
        stage1_minutes: Optional[float] = None, stage2_steps: Optional[int] = None) -> Dict[str, Any]:
    """Stage 1 (continued from ``OUT/stage1.pt`` when present), then stage 2 for every variant and seed and the
    evaluation; writes and returns ``results.json``'s content. ``stage="1"``: stage 1 only (returns its summary);
    ``stage="2"``: stage 2 and the evaluation from the saved stage-1 model as it is. ``stage2_steps`` fixes the
    stage-2 step count (default: what fits ``variant_minutes``), so that runs of separate calls compare."""
    if stage not in ("1", "2", "all"):
        raise ValueError(f"stage must be '1', '2' or 'all', got {stage!r}")
    if stage == "2":
        if not os.path.exists(os.path.join(out, STAGE1_FILE)):
            raise ValueError(f"no stage-1 model in {out}: run with --stage 1 (or all) first")
        stage1_minutes = 0.0
    os.makedirs(out, exist_ok=True)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preset.threads:
        torch.set_num_threads(preset.threads)
    for v in variants:
        variant_spla(v, preset.block_size, preset.topk, preset.long_len)  # unknown names fail before any training
    for L in (preset.short_len, preset.long_len) + preset.eval_lengths:
        preset.task.batch(1, L, np.random.default_rng(0))                  # lengths too short fail here
    t_start = time.time()
    timings: Dict[str, float] = {}
    base = build_model(preset, seed=0)
    n_params = sum(p.numel() for p in base.parameters())
    log(f"recall: model {preset.layers} layers, hidden {preset.hidden}, {preset.heads}/{preset.kv_heads} heads of "
        f"{preset.head_dim}, vocab {preset.task.vocab}: {n_params / 1e6:.2f}M parameters; device {device}")
    t0 = time.time()
    stage1, schedule, learned_task = train_stage1(preset, out, base, device, minutes=stage1_minutes, log=log)
    timings["stage1_s"] = time.time() - t0
    if stage == "1":
        return {"stage1": {**stage1.summary(), "target_len": preset.short_len, "schedule": schedule,
                           "learned": learned_task}}
    # stage 2 converts copies of the plain dense model, given the stage-1 weights
    base.load_state_dict(stage1.model.state_dict(), strict=True)
    base.to(device)

    # stage 2: every variant (and seed) from the same stage-1 weights, the same number of steps
    runs: Dict[Tuple[str, int], Run] = {}
    t0 = time.time()
    for s in seeds:
        for v in variants:
            r = Run(as_variant(base, v, preset, preset.long_len), preset, preset.long_len, preset.long_batch,
                    preset.long_lr, preset.long_max_steps, seed=1000 + s, device=device, **variant_train(v))
            r.train(preset.calib_steps + 1)
            runs[(v, s)] = r
    calib_s = time.time() - t0
    share = 60 * preset.variant_minutes
    fit = min(int(max(0.0, share - calib_s / len(runs)) / r.step_s()) for r in runs.values())
    total2 = max(preset.calib_steps + 2, min(preset.long_max_steps, preset.calib_steps + 1 + fit))
    if stage2_steps is not None:
        total2 = max(preset.calib_steps + 1, stage2_steps)
    log(f"recall: stage 2: {total2} steps per variant and seed ("
        + ", ".join(f"{v} {runs[(v, seeds[0])].step_s() * 1e3:.1f} ms/step" for v in variants) + ")")
    for (v, s), r in runs.items():
        r.steps_hint = total2
        r.train(total2 - r.step)
        log(f"recall: stage 2 {v} seed {s}: loss {np.mean(r.losses[-20:]):.3f}, train acc {np.mean(r.accs[-20:]):.3f}")
    timings["stage2_s"] = time.time() - t0

    # evaluation
    t0 = time.time()
    cells: List[Dict[str, Any]] = []
    models = [("base", None, stage1.model, "dense")] + [(v, s, r.model, v) for (v, s), r in runs.items()]
    for name, seed, model, kind in models:
        row = {"model": name, "seed": seed, "acc": {}}
        for L in preset.eval_lengths:
            set_length(model, kind, preset, L)
            row["acc"][str(L)] = accuracy(model, preset.task, L, preset.eval_examples, device)
        cells.append(row)
        log(f"recall: {name:>14} seed {seed}: " + ", ".join(f"{L}: {a:.3f}" for L, a in row["acc"].items()))
    timings["eval_s"] = time.time() - t0
    timings["total_s"] = time.time() - t_start

    results = {
        "preset": dataclasses.asdict(preset), "device": device_name(device), "torch": torch.__version__,
        "parameters": n_params, "timings": {k: round(x, 1) for k, x in timings.items()},
        "stage1": {**stage1.summary(), "target_len": preset.short_len, "schedule": schedule, "learned": learned_task},
        "stage2": [{"variant": v, "seed": s, "spla": variant_spla(v, preset.block_size, preset.topk, preset.long_len),
                    **r.summary()} for (v, s), r in runs.items()],
        "eval": cells,
    }
    write_results(results, out)
    return results


def write_results(results: Dict[str, Any], out: str) -> None:
    """``OUT/results.json``, ``results.md`` and ``results.png``."""
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "results.json"), results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(results, variants_of(results)))
    plot(results, variants_of(results), os.path.join(out, "results.png"))


# top-k selection rules applied to the stage-1 model without any training: how often each estimate finds the
# needle's block at the budget, against the exact block scores (``oracle``, the upper bound of the budget)
CONVERT_RULES: Dict[str, Dict[str, Any]] = {
    "taylor1": dict(selection="taylor1"),
    "taylor1_rep0": dict(selection="taylor1", rep_keys=0),
    "taylor2": {},
    "taylor2_rep0": dict(rep_keys=0),
    "taylor2_cov_full": dict(cov="full"),
    "taylor2_cov_full_rep0": dict(cov="full", rep_keys=0),
    "oracle": dict(selection="oracle", rep_keys=0),
}


def convert_only(preset: RecallPreset, out: str, device: Optional[torch.device] = None,
                 log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Query accuracy at ``long_len`` of the saved stage-1 model, dense and converted to top-k attention
    (``merge="none"``) with each rule of :data:`CONVERT_RULES`, no training; writes ``OUT/convert.json`` and
    ``OUT/convert.md``. The same sequences as the main evaluation.

    Raises:
        ValueError: when ``OUT`` holds no stage-1 model.
    """
    import spla
    path = os.path.join(out, STAGE1_FILE)
    if not os.path.exists(path):
        raise ValueError(f"no stage-1 model in {out}: run with --stage 1 (or all) first")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preset.threads:
        torch.set_num_threads(preset.threads)
    model = build_model(preset, seed=0)
    state = torch.load(path, map_location="cpu", weights_only=False)["run"]
    model.load_state_dict(state["model"])
    model.to(device)
    L = preset.long_len
    acc = {"dense": accuracy(model, preset.task, L, preset.eval_examples, device)}
    log(f"recall: stage-1 model (step {state['step']}) at {L}: dense {acc['dense']:.3f}")
    base = variant_spla("topk_taylor2", preset.block_size, preset.topk, L)
    for name, change in CONVERT_RULES.items():
        m = spla.convert(copy.deepcopy(model), {**base, **change})
        acc[name] = accuracy(m, preset.task, L, preset.eval_examples, device)
        log(f"recall: top-{preset.topk} x {preset.block_size}, {name}: {acc[name]:.3f}")
    res = {"preset": preset.name, "device": device_name(device), "stage1_steps": state["step"], "length": L,
           "examples": preset.eval_examples, "block_size": preset.block_size, "topk": preset.topk,
           "rules": {k: {**base, **v} for k, v in CONVERT_RULES.items()}, "acc": acc}
    write_json(os.path.join(out, "convert.json"), res)
    lines = [f"Stage-1 model ({state['step']} steps) at {L} tokens, no training ({res['device']}): query accuracy "
             f"over {preset.eval_examples} sequences with top-{preset.topk} blocks of {preset.block_size}.", "",
             "| attention | accuracy, % |", "|---|---|"]
    lines += [f"| {k if k == 'dense' else 'top-k, ' + k} | {100 * a:.1f} |" for k, a in acc.items()]
    with open(os.path.join(out, "convert.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return res


def merge(parts: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One ``results.json`` content from the results of several calls that continued the same stage-1 model (more
    seeds, more variants): their stage-2 runs and evaluation cells side by side, the stage-1 model's cell once.

    Raises:
        ValueError: when the parts differ in preset, stage-1 model (its step count) or stage-2 step count, or
            repeat a (variant, seed) run.
    """
    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]
    for r in parts[1:]:
        for what, key in (("preset", lambda x: x["preset"]), ("stage-1 model", lambda x: x["stage1"]["steps"])):
            if key(r) != key(first):
                raise ValueError(f"cannot merge results of different {what}s: {key(first)} vs {key(r)}")
    steps = {x["steps"] for r in parts for x in r["stage2"]}
    if len(steps) > 1:
        raise ValueError(f"cannot merge stage-2 runs of different step counts {sorted(steps)} (fix --stage2-steps)")
    runs = [(x["variant"], x["seed"]) for r in parts for x in r["stage2"]]
    if len(set(runs)) != len(runs):
        raise ValueError(f"a (variant, seed) run appears twice: {runs}")
    base = [c for c in first["eval"] if c["model"] == "base"]
    return {**first, "stage2": [x for r in parts for x in r["stage2"]],
            "eval": base + [c for r in parts for c in r["eval"] if c["model"] != "base"],
            "timings": {k: round(sum(r["timings"].get(k, 0.0) for r in parts), 1) for k in first["timings"]},
            "merged_from": len(parts)}


def variants_of(results: Dict[str, Any]) -> List[str]:
    """The stage-2 variants of ``results`` in their first order of appearance."""
    return list(dict.fromkeys(x["variant"] for x in results["stage2"]))


def table(results: Dict[str, Any], variants: List[str]) -> Dict[str, Dict[str, List[float]]]:
    """``{model: {length: [accuracy per seed]}}`` over the evaluation cells."""
    out: Dict[str, Dict[str, List[float]]] = {}
    for c in results["eval"]:
        for L, a in c["acc"].items():
            out.setdefault(c["model"], {}).setdefault(L, []).append(a)
    return {m: out[m] for m in ["base"] + variants if m in out}


def markdown(results: Dict[str, Any], variants: List[str]) -> str:
    p = results["preset"]
    t = p["task"]
    lengths = [str(L) for L in p["eval_lengths"]]
    lines = [f"# Associative recall ({p['name']} preset, {results['device']})", "",
             f"Model: {p['layers']} layers, hidden {p['hidden']}, {p['heads']}/{p['kv_heads']} heads of {p['head_dim']}, "
             f"{results['parameters'] / 1e6:.2f}M parameters. Task: {t['n_pairs']} key-value pairs in noise, "
             f"{t['n_queries']} queries at the end (keys and values from {t['symbols']} symbols, "
             f"{t['noise']} noise tokens). "
             f"Budget: top-{p['topk']} blocks of {p['block_size']} (1 sink + 2 local included).", "",
             "| run | seed | seq len | steps | tokens | tokens/s | final loss | final train acc |",
             "|---|---|---|---|---|---|---|---|"]
    s1 = results["stage1"]
    lines.append(f"| base (dense, stage 1) | 0 | {s1['seq_len']} of {s1.get('target_len', s1['seq_len'])} | "
                 f"{s1['steps']} | {s1['tokens']:,} | "
                 f"{s1['tokens_per_s']:,} | {s1['final_loss']:.3f} | {s1['final_train_acc']:.3f} |")
    for r in results["stage2"]:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['seq_len']} | {r['steps']} | {r['tokens']:,} | "
                     f"{r['tokens_per_s']:,} | {r['final_loss']:.3f} | {r['final_train_acc']:.3f} |")
    lines += ["", "Query accuracy, % (mean ± sample std (number of seeds) where there are several):", "",
              "| model | " + " | ".join(lengths) + " |", "|---|" + "---|" * len(lengths)]
    for m, accs in table(results, variants).items():
        lines.append(f"| {m} | " + " | ".join(_fmt(_stats(accs[L]), scale=100.0) for L in lengths) + " |")
    scales = [r for r in results["stage2"] if r.get("merge_scales")]
    if scales:
        lines += ["", "SPLA merge scales after stage 2, mean |w| per layer (the residual's starts at 0): "
                  + "; ".join(f"{r['variant']} seed {r['seed']}: " + ", ".join(f"{x:.3f}" for x in r["merge_scales"])
                              for r in scales) + "."]
    if "learned" in s1:
        lines += ["", f"Stage 1 {'learned' if s1['learned'] else 'did not learn'} the task (training accuracy of the "
                      f"last {p['grow_every']} steps >= {p['grow_at']} at {s1.get('target_len')} tokens)."]
    if len(s1.get("schedule", [])) > 1:
        lines += ["", "Stage-1 curriculum, (step, length) at each change: "
                  + ", ".join(f"({a}, {b})" for a, b in s1["schedule"]) + "."]
    tm = results["timings"]
    lines += ["", f"Wall time: stage 1 {tm['stage1_s']:.0f} s, stage 2 {tm['stage2_s']:.0f} s, evaluation "
                  f"{tm['eval_s']:.0f} s, total {tm['total_s']:.0f} s.", ""]
    return "\n".join(lines)


def plot(results: Dict[str, Any], variants: List[str], path: str) -> None:
    """Accuracy against evaluation length, one line per model (skipped without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    p = results["preset"]
    rows = table(results, variants)
    main = ("base", "dense", "topk_taylor1", "topk_taylor2", "spla")
    fig, ax = plt.subplots(figsize=(7.5 if len(rows) > 6 else 6, 4))
    colors = plt.get_cmap("tab20").colors
    for i, (m, accs) in enumerate(rows.items()):
        xs = [int(L) for L in accs]
        st = [_stats(a) for a in accs.values()]
        mu, sd = [100 * x["mean"] for x in st], [100 * x["std"] for x in st]
        # the main comparison in bold solid lines, ablations thin and dotted, every line its own colour
        ablation = m not in main
        ax.errorbar(xs, mu, yerr=sd, marker="s" if ablation else "o", ms=4 if ablation else 6, capsize=3, label=m,
                    color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
                    lw=1 if ablation else 2, linestyle="--" if m == "base" else (":" if ablation else "-"))
    ax.axvline(p["long_len"], color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (dotted: stage-2 training length)")
    ax.set_ylabel("query accuracy, %")
    ax.set_ylim(-2, 102)
    ax.set_title(f"associative recall, top-{p['topk']} x {p['block_size']} ({results['device']})", fontsize=9)
    if len(rows) > 6:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="size and budget preset (default tiny)")
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, results.png)")
    p.add_argument("--variants", nargs="+", default=None,
                   help="stage-2 variants (default: the preset's): " + ", ".join(VARIANT_HELP))
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="stage-2 seeds (default: the preset's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--stage", default="all", choices=["1", "2", "all", "convert"],
                   help="1: train (or continue) stage 1 only; 2: stage 2 and the evaluation from the saved stage-1 "
                        "model; all (default): both, stage 1 continued from OUT/stage1.pt when present; convert: "
                        "no training, the saved stage-1 model's accuracy at the stage-2 length as dense and as top-k "
                        "attention with each selection rule (OUT/convert.{json,md})")
    p.add_argument("--stage1-minutes", type=float, default=None,
                   help="stage-1 wall-time budget of this call (default: the preset's)")
    p.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="train nothing: merge the results.json of several calls from the same stage-1 model (more "
                        "seeds or variants, the same --stage2-steps) into OUT/results.{json,md,png}")
    p.add_argument("--stage2-steps", type=int, default=None,
                   help="stage-2 steps per variant and seed (default: as many as fit the preset's minutes per run); "
                        "fix it to compare runs of separate calls")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.merge:
        parts = []
        for path in args.merge:
            with open(path) as f:
                parts.append(json.load(f))
        res = merge(parts)
        write_results(res, args.out)
        print(markdown(res, variants_of(res)))
        return 0
    preset = PRESETS[args.preset]
    if args.stage == "convert":
        convert_only(preset, args.out, device=torch.device(args.device) if args.device else None,
                     log=lambda s: print(s, flush=True))
        print(open(os.path.join(args.out, "convert.md")).read())
        return 0
    res = run(preset, args.out, args.variants or preset.variants, args.seeds or preset.seeds,
              device=torch.device(args.device) if args.device else None,
              log=lambda s: print(s, flush=True), stage=args.stage, stage1_minutes=args.stage1_minutes,
              stage2_steps=args.stage2_steps)
    if args.stage == "1":
        s1 = res["stage1"]
        print(f"stage 1: {s1['steps']} steps, {s1['tokens']:,} tokens, length {s1['seq_len']} of {s1['target_len']}, "
              f"train acc {s1['final_train_acc']:.3f}, learned: {s1['learned']}")
        return 0
    print("\n" + markdown(res, list(args.variants or preset.variants)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
