# -*- coding: utf-8 -*-
"""``spla train``: the argument parser and the entry point (registered by :mod:`spla.cli`)."""

from __future__ import annotations

import argparse
from typing import Any, Dict

DESCRIPTION = """\
Continual pretraining of an SPLA model on local data (the paper's recipe: convert a dense model, then train).

Two steps:
  spla convert --model smollm2 --topk 16 --out out/smollm2-spla          # dense -> SPLA (weights reused)
  spla train --model out/smollm2-spla --data corpus/ --out out/run1 --seq-len 4096 --batch-size 16 --steps 1000

--model may also be a dense model ('smollm2' or a Hugging Face directory): it is converted first with the SPLA
options below. Several GPUs: torchrun --nproc_per_node 8 -m spla.cli train ... (DDP; --batch-size is the GLOBAL
number of sequences per optimizer step, the same update whatever the number of GPUs).

Data: .txt/.md files (one document each), .jsonl (one document per line, field --text-field) and .parquet
(column --text-field; needs pyarrow), or folders of them. Documents are tokenized with the model's tokenizer
(EOS appended) and packed into sequences of --seq-len tokens; position ids restart at each document, so SPLA
sees the boundaries (cu_seqlens) and documents never attend to each other. Bad files are reported with counts;
no usable data is an error. --synthetic-ratio mixes in built-in long-context retrieval sequences (pass key,
key-value) of exactly --seq-len tokens.

What trains (--trainable): all = every weight; attention = the attention modules only (q/k/v/o projections
and the SPLA merge norms); spla = only the parameters SPLA adds (the merge norms, per head and channel).

Output: OUT/checkpoint-<step>/ every --save-every steps and at the end (safetensors weights + config + tokenizer:
spla.load(DIR) reads it; optimizer, scheduler, data position, RNG states), OUT/metrics.jsonl (loss, lr, grad
norm, tokens/s per step), OUT/tensorboard/ when tensorboard is installed. --resume OUT (or a checkpoint folder)
continues exactly where it stopped: rerun the same command with --resume added.
"""


def add_train_parser(sub) -> argparse.ArgumentParser:
    t = sub.add_parser("train", help="continual pretraining of an SPLA model on local data (1 GPU, torchrun, or CPU)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = t.add_argument_group("model and data")
    g.add_argument("--model", default="smollm2",
                   help="'smollm2' (embedded, dense) or a local model directory: an SPLA model from `spla convert` or a "
                        "previous run's checkpoint, or a dense Llama/Mistral/Qwen2/Qwen3 (converted on the fly)")
    g.add_argument("--init", default="pretrained", choices=["pretrained", "random"],
                   help="random: build the model from --model's config only, with random weights (from scratch)")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    g.add_argument("--data", nargs="*", default=[], metavar="PATH",
                   help="files (.txt .md .jsonl .parquet) or folders of them")
    g.add_argument("--text-field", default="text", help="the text field of .jsonl / column of .parquet (default text)")
    g.add_argument("--min-doc-tokens", type=int, default=None,
                   help="skip (and count) documents shorter than this (default: the SPLA block size)")
    g.add_argument("--synthetic-ratio", type=float, default=0.0,
                   help="fraction of sequences replaced by built-in long-context retrieval examples (default 0; "
                        "1 = synthetic only, no --data needed)")
    g.add_argument("--synthetic-tasks", nargs="+", default=["passkey", "kv"], choices=["passkey", "kv"],
                   help="which synthetic tasks to mix in (default both)")
    g.add_argument("--data-cache", default="auto",
                   help="folder for the tokenized corpus (default OUT/data-cache; 'none' to disable)")
    g.add_argument("--out", default=None, help="output folder (checkpoints, metrics); required unless --resume")

    o = t.add_argument_group("optimization")
    o.add_argument("--seq-len", type=int, default=4096, help="tokens per packed sequence (default 4096)")
    o.add_argument("--batch-size", type=int, default=8,
                   help="GLOBAL batch: sequences per optimizer step over all processes (default 8)")
    o.add_argument("--micro-batch-size", type=int, default=None,
                   help="sequences per forward pass per process (default: batch / (processes x grad-accum), or 1)")
    o.add_argument("--grad-accum", type=int, default=None,
                   help="micro-batches accumulated per step (default: batch / (processes x micro-batch))")
    o.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate (default 1e-4)")
    o.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr (default 0.1)")
    o.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default 100)")
    o.add_argument("--steps", type=int, default=1000, help="optimizer steps in total (default 1000)")
    o.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of matrices (default 0.1)")
    o.add_argument("--merge-lr-mult", type=float, default=1.0,
                   help="learning-rate factor of the SPLA merge scales, never weight-decayed (default 1). A converted "
                        "model's residual scale starts at 0 and AdamW moves it by about lr per step, so at lr 1e-4 "
                        "a thousand steps leave it below 0.1; 10-30 lets the residual branch take part sooner")
    o.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip, 0 = off (default 1.0)")
    o.add_argument("--trainable", default="all", choices=["all", "attention", "spla"],
                   help="what trains: all weights, the attention modules, or only the new SPLA merge norms")
    o.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"],
                   help="autocast dtype (default bf16 on CUDA, fp32 on CPU); weights and optimizer stay fp32")
    o.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing (less memory, ~30%% slower)")
    o.add_argument("--seed", type=int, default=0, help="seed of the data order, synthetic data and init (default 0)")

    c = t.add_argument_group("checkpoints and runtime")
    c.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps, and always at the end (default 500)")
    c.add_argument("--keep-checkpoints", type=int, default=3, help="keep the newest N checkpoints, 0 = all (default 3)")
    c.add_argument("--resume", default=None, metavar="DIR",
                   help="continue from a checkpoint folder, or from the newest checkpoint of an output folder")
    c.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="save and stop after this step, as if interrupted (for time-limited jobs); --resume continues")
    c.add_argument("--device", default=None, help="cpu or cuda (default cuda when available; torchrun: one GPU per process)")
    c.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    c.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard logs even if installed")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = t.add_argument_group("SPLA options (when converting a dense model, or to change them; see SPEC.md)")
    s.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default 64)")
    s.add_argument("--topk", type=int, default=None, help="blocks per query, sink/local included (default 16)")
    s.add_argument("--sink-blocks", type=int, default=None, help="leading blocks always attended (default 1)")
    s.add_argument("--local-blocks", type=int, default=None, help="trailing blocks always attended (default 2)")
    s.add_argument("--selection", default=None, choices=["taylor2", "taylor1", "oracle"], help="block score (default taylor2)")
    s.add_argument("--cov", default=None, choices=["diag", "full"], help="2nd-order statistic (default diag)")
    s.add_argument("--rep-keys", type=int, default=None, help="representative keys per block, 0..4 (default 1)")
    s.add_argument("--feature-map", default=None, choices=["softmax2", "elu1", "relu2"], help="linear branch phi")
    s.add_argument("--merge", default=None, choices=["residual", "rattention", "none"],
                   help="residual (default, for converted models), rattention (from scratch) or none (top-k "
                        "sparse attention only, no residual branch); only at conversion")
    t.set_defaults(func=run_train)
    return t


SPLA_FIELDS = ("block_size", "topk", "sink_blocks", "local_blocks", "selection", "cov", "rep_keys", "feature_map", "merge")


def config_from_args(args: argparse.Namespace):
    from spla.train.trainer import TrainConfig
    out = args.out
    if out is None:
        if not args.resume:
            raise SystemExit("spla train: --out is required (or --resume a previous run's folder)")
        import os

        from spla.train.trainer import find_checkpoint
        out = os.path.dirname(os.path.abspath(find_checkpoint(args.resume)))
    spla: Dict[str, Any] = {k: getattr(args, k) for k in SPLA_FIELDS if getattr(args, k) is not None}
    if not args.data and args.synthetic_ratio < 1.0:
        raise SystemExit("spla train: give --data PATH... (or --synthetic-ratio 1 to train on the synthetic task only)")
    return TrainConfig(
        out=out, model=args.model, data=list(args.data), tokenizer=args.tokenizer, init=args.init, spla=spla,
        seq_len=args.seq_len, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
        grad_accum=args.grad_accum, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup, steps=args.steps,
        weight_decay=args.weight_decay, merge_lr_mult=args.merge_lr_mult, grad_clip=args.grad_clip,
        trainable=args.trainable, precision=args.precision,
        grad_checkpointing=args.grad_checkpointing, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        seed=args.seed, text_field=args.text_field, min_doc_tokens=args.min_doc_tokens,
        synthetic_ratio=args.synthetic_ratio, synthetic_tasks=list(args.synthetic_tasks),
        data_cache=None if str(args.data_cache).lower() == "none" else args.data_cache, resume=args.resume,
        stop_at=args.stop_at, device=args.device, threads=args.threads, tensorboard=not args.no_tensorboard,
        progress=not args.no_progress)


def run_train(args: argparse.Namespace) -> int:
    from spla.train.data import DataError
    from spla.train.trainer import cleanup_dist, train
    cfg = config_from_args(args)
    try:
        train(cfg)
    except DataError as e:
        raise SystemExit(f"spla train: data error: {e}")
    finally:
        cleanup_dist()
    return 0
