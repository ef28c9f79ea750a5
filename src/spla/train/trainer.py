# -*- coding: utf-8 -*-
"""Continual pretraining of SPLA models: :func:`train` (what ``spla train`` runs).

One process per GPU under ``torchrun`` (DDP), or one process on one GPU or the CPU. The optimizer step always
sees the same **global batch** of ``batch_size`` packed sequences whatever the number of processes: each
process builds the same deterministic stream (:class:`spla.train.data.PackedStream`), takes its share of each
global batch, accumulates gradients over ``grad_accum`` micro-batches, and the loss is the mean over every
target token of the global batch (sum of token losses / global target count), so 1 and N GPUs compute the
same update up to floating-point reduction order.

Checkpoints (``OUT/checkpoint-<step>/``) hold the weights in safetensors through ``save_pretrained`` (so
:func:`spla.load` reads them), the tokenizer, the optimizer and scheduler states, the data position, the RNG
states of every process (python, numpy, torch, cuda) and ``trainer_state.json``; ``resume`` continues from one
exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import random
import shutil
import signal
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from spla.train.data import (IGNORE_INDEX, DataError, PackedStream, SyntheticTask, build_corpus, collate)

TRAINABLE = ("all", "attention", "spla")
PRECISIONS = ("bf16", "fp16", "fp32")
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainConfig:
    """Everything a training run depends on (the ``spla train`` options, same names with ``_``)."""

    out: str
    model: str = "smollm2"
    data: List[str] = field(default_factory=list)
    tokenizer: Optional[str] = None
    init: str = "pretrained"               # "pretrained" | "random" (weights from --model's config only)
    spla: Dict[str, Any] = field(default_factory=dict)  # SPLAConfig fields to set (convert / re-configure)
    seq_len: int = 4096
    batch_size: int = 8                    # global: sequences per optimizer step, over all processes
    micro_batch_size: Optional[int] = None  # sequences per forward per process
    grad_accum: Optional[int] = None
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup: int = 100
    steps: int = 1000
    weight_decay: float = 0.1
    merge_lr_mult: float = 1.0             # learning-rate factor of the SPLA merge scales (no weight decay on them)
    adam_betas: Tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    trainable: str = "all"
    precision: Optional[str] = None        # default bf16 autocast on CUDA, fp32 on CPU
    grad_checkpointing: bool = False
    save_every: int = 500
    keep_checkpoints: int = 3
    seed: int = 0
    text_field: str = "text"
    min_doc_tokens: Optional[int] = None   # default: the SPLA block size
    synthetic_ratio: float = 0.0
    synthetic_tasks: List[str] = field(default_factory=lambda: ["passkey", "kv"])
    data_cache: Optional[str] = "auto"     # "auto" = OUT/data-cache, None = no cache
    resume: Optional[str] = None
    stop_at: Optional[int] = None          # stop (with a checkpoint) after this step, as if interrupted
    device: Optional[str] = None
    threads: Optional[int] = None
    tensorboard: bool = True
    progress: bool = True

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(d["adam_betas"])
        return d


# ---------------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def _init_dist(device: Optional[str]) -> Tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(local)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
        dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
        return Dist(rank, world, local), dev
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Dist(), torch.device(device)


# ---------------------------------------------------------------------------------------------- model
def _load_model(cfg: TrainConfig, source: str, fresh: bool, log) -> nn.Module:
    from spla.layers import SPLAConfig
    from spla.models import convert, load, spla_config_of
    if fresh and cfg.init == "random":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig, AutoModelForCausalLM

        from spla.models.loading import SMOLLM2_GGUF, _is_smollm2, smollm2_dir
        if _is_smollm2(source):
            hf_cfg = AutoConfig.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
        else:
            hf_cfg = AutoConfig.from_pretrained(source)
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
        log(f"model: {type(model).__name__} from the config of {source}, randomly initialized (seed {cfg.seed})")
    else:
        model = load(source, dtype=torch.float32)
        log(f"model: {type(model).__name__} loaded from {source}")
    current = spla_config_of(model)
    if current is None:
        new = SPLAConfig.from_dict(dict(cfg.spla))
        convert(model, new)
        log(f"converted to SPLA: {new.to_dict()}")
    elif cfg.spla:
        new = current.replace(**cfg.spla)
        if new != current:
            convert(model, new)
            log(f"SPLA options changed to {new.to_dict()}")
    return model


def select_trainable(model: nn.Module, what: str) -> Tuple[int, int]:
    """Freeze all parameters except the chosen ones; returns ``(trainable, total)`` parameter counts.

    ``all``: everything. ``attention``: the SPLAAttention modules (q/k/v/o projections, q/k norms, merge
    norms). ``spla``: only the parameters SPLA adds to a dense model (the merge norms ``rla_norm`` and, for
    ``merge="rattention"``, ``sparse_norm``).
    """
    from spla.layers import SPLAAttention
    if what not in TRAINABLE:
        raise ValueError(f"--trainable must be one of {', '.join(TRAINABLE)}, got {what!r}")
    chosen: set = set()
    if what == "all":
        chosen = {id(p) for p in model.parameters()}
    else:
        for m in model.modules():
            if isinstance(m, SPLAAttention):
                if what == "attention":
                    chosen |= {id(p) for p in m.parameters()}
                else:
                    chosen |= {id(p) for p in m.merge_parameters()}
    if not chosen:
        raise ValueError(f"--trainable {what}: the model has no such parameters (is it an SPLA model?)")
    total = n_train = 0
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
        total += p.numel()
        n_train += p.numel() if p.requires_grad else 0
    return n_train, total


def param_groups(model: nn.Module, weight_decay: float, lr: float,
                 merge_lr_mult: float = 1.0) -> List[Dict[str, Any]]:
    """AdamW parameter groups: matrices with ``weight_decay``; vectors (norms, biases) without; the SPLA merge
    scales (``SPLAAttention.merge_parameters``) without decay and at ``lr * merge_lr_mult``. Frozen parameters
    are left out.

    Raises:
        ValueError: when ``merge_lr_mult`` is not positive.
    """
    from spla.layers.spla import spla_layers
    if not merge_lr_mult > 0:
        raise ValueError(f"merge_lr_mult must be > 0, got {merge_lr_mult!r}")
    merge_ids = {id(p) for m in spla_layers(model) for p in m.merge_parameters()}
    decay, no_decay, merge = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            (merge if id(p) in merge_ids else decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr},
              {"params": merge, "weight_decay": 0.0, "lr": lr * merge_lr_mult}]
    return [g for g in groups if g["params"]]


OPTIMIZER_NAMES_FILE = "optimizer_params.json"


def _group_names(model: nn.Module, optimizer) -> List[List[str]]:
    """The parameter names of each optimizer group, in the optimizer's order."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [[name_of[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def _legacy_group_names(model: nn.Module) -> List[List[str]]:
    """The groups of checkpoints written before the merge scales had their own group: matrices (the merge scales
    of ``rla_norm="rmsnorm"`` included), then vectors, trainable parameters in model order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [[n for n, p in named if p.dim() >= 2], [n for n, p in named if p.dim() < 2]]
    return [g for g in groups if g]


def load_optimizer_state(optimizer, scheduler, model: nn.Module, ckpt: str, device) -> None:
    """Restore the optimizer and scheduler of checkpoint ``ckpt`` into ``optimizer`` / ``scheduler`` built by
    :func:`param_groups` for ``model``.

    The per-parameter states (AdamW moments, step) are matched by parameter name: the names the checkpoint
    recorded (``optimizer_params.json``), or, for older checkpoints without that file, the grouping
    ``spla train`` used then (see :func:`_legacy_group_names`). So a checkpoint resumes when the grouping changed
    since it was written. The groups' hyper-parameters come from the current configuration. The scheduler
    restarts where the checkpoint stopped. When the groups are the same, this is ``load_state_dict``.

    Raises:
        ValueError: when a checkpoint parameter does not match the model's (name or shape).
    """
    sd = torch.load(os.path.join(ckpt, "optimizer.pt"), map_location=device, weights_only=True)
    sched = torch.load(os.path.join(ckpt, "scheduler.pt"), weights_only=True)
    names_file = os.path.join(ckpt, OPTIMIZER_NAMES_FILE)
    if os.path.exists(names_file):
        with open(names_file) as f:
            saved = json.load(f)
    else:
        saved = _legacy_group_names(model)
    current = _group_names(model, optimizer)
    if saved == current:
        optimizer.load_state_dict(sd)
        scheduler.load_state_dict(sched)
        return
    flat = [n for g in saved for n in g]
    if len(flat) != sum(len(g["params"]) for g in sd["param_groups"]):
        raise ValueError(f"checkpoint {ckpt}: its optimizer holds {sum(len(g['params']) for g in sd['param_groups'])} "
                         f"parameters but {len(flat)} names were recorded or inferred; cannot resume its optimizer")
    params = dict(model.named_parameters())
    by_name = {}
    for idx, name in zip((i for g in sd["param_groups"] for i in g["params"]), flat):
        if name not in params:
            raise ValueError(f"checkpoint {ckpt}: optimizer state of {name!r}, which the model does not have")
        st = sd["state"].get(idx)
        if st is not None:
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0 and v.shape != params[name].shape:
                    raise ValueError(f"checkpoint {ckpt}: optimizer state {k!r} of {name!r} has shape "
                                     f"{tuple(v.shape)}, the parameter {tuple(params[name].shape)}")
            by_name[name] = st
    new_sd = optimizer.state_dict()  # the current groups and hyper-parameters, indices in current order
    new_sd["state"] = {i: by_name[n] for i, n in enumerate(n for g in current for n in g) if n in by_name}
    optimizer.load_state_dict(new_sd)
    # the scheduler: its step count; the base and last rates per (current) group follow from the lambda
    scheduler.last_epoch = sched["last_epoch"]
    scheduler._step_count = sched.get("_step_count", sched["last_epoch"] + 1)
    lrs = [base * lam(scheduler.last_epoch) for base, lam in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    scheduler._last_lr = lrs


def lr_lambda(warmup: int, steps: int, min_ratio: float):
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``steps``."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    return f


# ---------------------------------------------------------------------------------------------- checkpoints
def _rng_state() -> Dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Dict[str, Any]) -> None:
    version, internal, gauss = st["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


def find_checkpoint(path: str) -> str:
    """``path`` itself when it is a checkpoint, else its newest ``checkpoint-*`` sub-folder."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    cands = [d for d in glob.glob(os.path.join(path, CHECKPOINT_PREFIX + "*"))
             if os.path.isfile(os.path.join(d, STATE_FILE))]
    if not cands:
        raise ValueError(f"--resume {path!r}: no checkpoint there (a folder with {STATE_FILE}, or an output folder "
                         f"holding {CHECKPOINT_PREFIX}<step> folders)")
    return max(cands, key=lambda d: int(os.path.basename(d)[len(CHECKPOINT_PREFIX):]))


def _save_checkpoint(out: str, step: int, model: nn.Module, tokenizer, optimizer, scheduler, stream: PackedStream,
                     cfg: TrainConfig, dist: Dist, extra: Dict[str, Any], log) -> str:
    final = os.path.join(out, f"{CHECKPOINT_PREFIX}{step:06d}")
    tmp = final + ".tmp"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    torch.save(_rng_state(), os.path.join(tmp, f"rng_state_rank{dist.rank}.pt"))
    if dist.main:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, OPTIMIZER_NAMES_FILE), "w") as f:  # resumable if the grouping changes
            json.dump(_group_names(model, optimizer), f)
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        state = {"step": step, "data": stream.state_dict(), "world_size": dist.world, "config": cfg.to_dict(), **extra}
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(state, f, indent=1)
    dist.barrier()
    if dist.main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(out, "latest"), "w") as f:
            f.write(os.path.basename(final) + "\n")
        if cfg.keep_checkpoints and cfg.keep_checkpoints > 0:
            olds = sorted(glob.glob(os.path.join(out, CHECKPOINT_PREFIX + "[0-9]*[0-9]")),
                          key=lambda d: int(os.path.basename(d)[len(CHECKPOINT_PREFIX):]))
            for d in olds[:-cfg.keep_checkpoints]:
                shutil.rmtree(d, ignore_errors=True)
        log(f"checkpoint: {final}")
    dist.barrier()
    return final


# ---------------------------------------------------------------------------------------------- metrics
class Metrics:
    """Rank 0 writes one JSON line per step to ``OUT/metrics.jsonl`` (and TensorBoard scalars when installed)."""

    def __init__(self, out: str, enabled: bool, start_step: int, tensorboard: bool):
        self.enabled = enabled
        self.path = os.path.join(out, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        if os.path.exists(self.path):  # a resumed run rewrites the steps after its checkpoint
            with open(self.path) as f:
                keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= start_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                self.tb = None

    def log(self, rec: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------------------------- train
def _batch_layout(cfg: TrainConfig, world: int) -> Tuple[int, int]:
    """(micro_batch_size, grad_accum) with micro * accum * world == batch_size."""
    B = cfg.batch_size
    if B < 1:
        raise ValueError(f"--batch-size must be >= 1, got {B}")
    if B % world:
        raise ValueError(f"--batch-size {B} (global, sequences per step) must be a multiple of the number of "
                         f"processes {world}")
    per = B // world
    if cfg.micro_batch_size and cfg.grad_accum:
        micro, accum = cfg.micro_batch_size, cfg.grad_accum
    elif cfg.grad_accum:
        micro, accum = per // cfg.grad_accum, cfg.grad_accum
    else:
        micro = cfg.micro_batch_size or 1
        accum = per // micro if micro else 0
    if micro < 1 or accum < 1 or micro * accum * world != B:
        raise ValueError(f"--batch-size {B} must equal micro-batch-size x grad-accum x processes; got micro-batch "
                         f"{cfg.micro_batch_size}, grad-accum {cfg.grad_accum}, processes {world}")
    return micro, accum


def train(cfg: TrainConfig, log=None) -> Dict[str, Any]:
    """Run (or resume) a training run; returns a summary (last checkpoint, steps, last loss, tokens/s)."""
    dist, device = _init_dist(cfg.device)

    def say(msg: str) -> None:
        if dist.main:
            (log or (lambda m: print(m, flush=True)))(msg)

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.trainable not in TRAINABLE:
        raise ValueError(f"--trainable must be one of {', '.join(TRAINABLE)}, got {cfg.trainable!r}")
    precision = cfg.precision or ("bf16" if device.type == "cuda" else "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if cfg.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {cfg.steps}")

    # ---- where we start from
    ckpt = find_checkpoint(cfg.resume) if cfg.resume else None
    state: Dict[str, Any] = {}
    if ckpt:
        with open(os.path.join(ckpt, STATE_FILE)) as f:
            state = json.load(f)
        saved = state.get("config", {})
        changed = [k for k in ("steps", "lr", "warmup", "min_lr_ratio", "batch_size", "trainable", "weight_decay",
                               "merge_lr_mult")
                   if k in saved and saved[k] != getattr(cfg, k)]
        if changed:
            warnings.warn("resuming with changed options: " + ", ".join(f"{k} {saved[k]} -> {getattr(cfg, k)}"
                                                                    for k in changed) +
                          " (the run will not match an uninterrupted one)", stacklevel=2)
    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    # ---- model and tokenizer
    from spla.models import load_tokenizer, spla_config_of
    tokenizer = load_tokenizer(cfg.tokenizer or (ckpt if ckpt else cfg.model))
    model = _load_model(cfg, ckpt or cfg.model, fresh=ckpt is None, log=say)
    spla_cfg = spla_config_of(model)
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    n_train, n_total = select_trainable(model, cfg.trainable)
    say(f"parameters: {n_train / 1e6:.3f}M of {n_total / 1e6:.3f}M train (--trainable {cfg.trainable})")
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    model.train()

    # ---- data
    bs = spla_cfg.block_size
    if cfg.seq_len < bs:
        raise DataError(f"--seq-len {cfg.seq_len} is shorter than one SPLA block ({bs} tokens)")
    if cfg.seq_len <= spla_cfg.topk * bs:
        say(f"note: --seq-len {cfg.seq_len} <= topk x block_size = {spla_cfg.topk * bs}: every token selects all of "
            f"its blocks, so SPLA equals dense attention here and the sparse selection is not exercised")
    min_doc = cfg.min_doc_tokens if cfg.min_doc_tokens is not None else bs
    cache = os.path.join(cfg.out, "data-cache") if cfg.data_cache == "auto" else cfg.data_cache
    only_synth = cfg.synthetic_ratio >= 1.0
    corpus = None
    for turn in ((0, 1) if dist.world > 1 and cache else (None,)):
        if turn is None or (turn == 0) == dist.main:  # rank 0 tokenizes and caches first, the others read the cache
            corpus = build_corpus(cfg.data, tokenizer, text_field=cfg.text_field, min_doc_tokens=min_doc,
                                  cache_dir=cache, allow_empty=only_synth, log=say, warn=dist.main,
                                  progress=cfg.progress and dist.main)
        if turn is not None:
            dist.barrier()
    synth = SyntheticTask(tokenizer, cfg.seq_len, cfg.synthetic_tasks) if cfg.synthetic_ratio > 0 else None
    stream = PackedStream(corpus, cfg.seq_len, seed=cfg.seed, synthetic=synth, synthetic_ratio=cfg.synthetic_ratio)
    micro, accum = _batch_layout(cfg, dist.world)
    say(f"batch: {cfg.batch_size} sequences x {cfg.seq_len} tokens per step = {micro} per forward x {accum} "
        f"accumulation x {dist.world} process(es); {precision} on {device.type}"
        + (", activation checkpointing" if cfg.grad_checkpointing else ""))

    # ---- optimizer, schedule
    opt_kwargs: Dict[str, Any] = dict(lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.lr, cfg.merge_lr_mult), **opt_kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup, cfg.steps, cfg.min_lr_ratio))
    start = 0
    tokens_seen = 0
    if ckpt:
        load_optimizer_state(optimizer, scheduler, model, ckpt, device)
        stream.load_state_dict(state["data"])
        start = int(state["step"])
        tokens_seen = int(state.get("tokens", 0))
        rng_file = os.path.join(ckpt, f"rng_state_rank{dist.rank}.pt")
        if os.path.exists(rng_file):
            _set_rng_state(torch.load(rng_file, weights_only=True))
        say(f"resumed from {ckpt} at step {start} (data position: sequence {stream.seq_index})")
    if start >= cfg.steps:
        say(f"nothing to do: the checkpoint is at step {start} and --steps is {cfg.steps}")
        return {"checkpoint": ckpt, "step": start}

    ddp = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    metrics = Metrics(cfg.out, dist.main, start, cfg.tensorboard)
    params = [p for p in model.parameters() if p.requires_grad]
    bar = None
    if dist.main and cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    last_ckpt, last_loss, rec = ckpt, float("nan"), {}
    tok_rates: List[float] = []
    interrupted = False
    prev_sigterm = None

    def _on_sigterm(signum, frame):  # pragma: no cover - exercised by schedulers, not tests
        raise KeyboardInterrupt

    if dist.world == 1 and hasattr(signal, "SIGTERM"):
        try:
            prev_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread
            prev_sigterm = None
    step = start
    in_update = False
    data_at_step_start = stream.state_dict()
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            data_at_step_start, in_update = stream.state_dict(), False
            seqs = stream.take(cfg.batch_size)  # the whole global batch, identical on every process
            n_targets = sum(int((s["labels"] != IGNORE_INDEX).sum()) for s in seqs)
            n_synth = sum(bool(s["synthetic"]) for s in seqs)
            mine = seqs[dist.rank * micro * accum:(dist.rank + 1) * micro * accum]
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            for a in range(accum):
                ids, pos, labels = (x.to(device) for x in collate(mine[a * micro:(a + 1) * micro]))
                sync = a == accum - 1 or dist.world == 1
                ctx = ddp.no_sync() if (dist.world > 1 and not sync) else _nullcontext()
                with ctx:
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        # an all-ones mask: no padding, and transformers then builds no [T, T] mask for the
                        # packed row (the layers take the document boundaries from the position ids)
                        logits = ddp(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids),
                                     use_cache=False).logits
                    ls = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1),
                                         ignore_index=IGNORE_INDEX, reduction="sum")
                    scaler.scale(ls * (dist.world / max(1, n_targets))).backward()
                loss_sum += ls.detach().double()
                del logits, ls
            if dist.world > 1:
                torch.distributed.all_reduce(loss_sum)
            in_update = True
            scaler.unscale_(optimizer)
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            lr = scheduler.get_last_lr()[0]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            in_update = False
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            step += 1
            n_tok = cfg.batch_size * cfg.seq_len
            tokens_seen += n_tok
            last_loss = float(loss_sum.item() / max(1, n_targets))
            tok_rates.append(n_tok / dt)
            rec = {"step": step, "loss": last_loss, "lr": lr, "grad_norm": float(gnorm), "tokens": tokens_seen,
                   "tokens_per_s": n_tok / dt, "step_time_s": dt, "synthetic_sequences": n_synth,
                   "target_tokens": n_targets}
            metrics.log(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{n_tok / dt:,.0f}", lr=f"{lr:.2e}")
                bar.update(1)
            if not math.isfinite(last_loss):
                raise FloatingPointError(f"loss is {last_loss} at step {step}; lower --lr or check the data")
            stop_now = cfg.stop_at is not None and step >= cfg.stop_at
            if step == cfg.steps or stop_now or (cfg.save_every and step % cfg.save_every == 0):
                last_ckpt = _save_checkpoint(cfg.out, step, model, tokenizer, optimizer, scheduler, stream, cfg, dist,
                                             {"tokens": tokens_seen, "loss": last_loss}, say)
            if stop_now and step < cfg.steps:
                say(f"stopped after step {step} (--stop-at); continue with --resume {cfg.out}")
                interrupted = True
                break
    except KeyboardInterrupt:
        if dist.world > 1 or step == start or in_update:
            raise
        stream.load_state_dict(data_at_step_start)  # the unfinished step is redone on resume
        optimizer.zero_grad(set_to_none=True)
        say(f"\ninterrupted: saving step {step}")
        last_ckpt = _save_checkpoint(cfg.out, step, model, tokenizer, optimizer, scheduler, stream, cfg, dist,
                                     {"tokens": tokens_seen, "loss": last_loss}, say)
        interrupted = True
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
        if prev_sigterm is not None:
            signal.signal(signal.SIGTERM, prev_sigterm)
    steady = tok_rates[1:] or tok_rates
    summary = {"checkpoint": last_ckpt, "step": step, "loss": last_loss, "interrupted": interrupted,
               "tokens_per_s": float(np.median(steady)) if steady else float("nan"), "world_size": dist.world}
    if not interrupted:
        say(f"done: step {step}, loss {last_loss:.4f}, median {summary['tokens_per_s']:,.0f} tokens/s; "
            f"trained model in {last_ckpt} (spla.load({last_ckpt!r}))")
    return summary


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def cleanup_dist() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


__all__ = ["TrainConfig", "train", "param_groups", "select_trainable", "find_checkpoint", "lr_lambda", "cleanup_dist",
           "TRAINABLE"]
