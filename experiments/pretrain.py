# -*- coding: utf-8 -*-
"""Stage 1: pretrain a small dense Llama-style model from scratch at short context.

Data: the offline corpus (installed Python sources and docs, see :func:`experiments.common.build_offline_corpus`)
plus the trainer's synthetic retrieval sequences (``passkey``, ``kv``; ``--synthetic-ratio`` of the sequences).
The model runs the SPLA layer with every block selected (``merge="none"``): exactly dense causal attention.

Time-budgeted: the first ``calib_steps`` steps (inside the learning-rate warm-up) are timed, then the step count
that fits ``--minutes`` is fixed in ``OUT/pretrain/plan.json`` and training resumes to it. Rerunning the same
command continues an interrupted run. The result is saved as a plain dense Llama in ``OUT/base`` for stage 2.

    python -m experiments.pretrain --preset gpu --out out/study
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

if __package__ in (None, ""):  # `python experiments/pretrain.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import (PRESETS, Layout, Preset, build_offline_corpus, count_parameters,  # noqa: E402
                                export_dense, get_preset, latest_state, model_config, read_json, step_stats, steps_in,
                                tokenizer, trained_steps, train_to, variant_spla, write_json)

MIN_DOC_TOKENS = 16  # fixed (not the block size) so that every run shares one tokenized corpus


def prepare(layout: Layout, preset: Preset, log: Callable[[str], None] = print):
    """Tokenizer, corpus and the random-init model config (each made once); returns the tokenizer."""
    layout.check_family(preset)
    tok = tokenizer(layout)
    build_offline_corpus(layout.corpus, max_chars=preset.corpus_chars, doc_chars=preset.doc_chars,
                         heldout_fraction=preset.heldout_fraction, log=log)
    if not os.path.exists(os.path.join(layout.base_config, "config.json")):
        cfg = model_config(preset, tok)
        cfg.save_pretrained(layout.base_config)
        tok.save_pretrained(layout.base_config)
        log(f"model: Llama, hidden {preset.hidden}, {preset.layers} layers, {preset.heads} heads / {preset.kv_heads} "
            f"KV heads of {preset.head_dim}, vocab {len(tok)}: {count_parameters(cfg) / 1e6:.2f}M parameters")
    return tok


def train_config(layout: Layout, preset: Preset, seed: int, **changes: Any):
    """The :class:`~spla.train.trainer.TrainConfig` of stage 1 (``steps`` is set by the budget)."""
    from spla.train.trainer import TrainConfig
    base = dict(
        out=layout.pretrain, model=layout.base_config, tokenizer=layout.tokenizer, init="random",
        data=[os.path.join(layout.corpus, "train.jsonl")],
        spla=variant_spla("dense", preset.block_size, preset.topk, preset.pretrain_len),
        seq_len=preset.pretrain_len, batch_size=preset.pretrain_batch, micro_batch_size=1, lr=preset.pretrain_lr,
        warmup=preset.pretrain_warmup, steps=preset.pretrain_max_steps, save_every=0, keep_checkpoints=1, seed=seed,
        min_doc_tokens=MIN_DOC_TOKENS, synthetic_ratio=preset.synthetic_ratio, data_cache=layout.data_cache,
        threads=preset.threads, tensorboard=False)
    base.update(changes)
    return TrainConfig(**base)


def run(layout: Layout, preset: Preset, minutes: Optional[float] = None, steps: Optional[int] = None, seed: int = 0,
        log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run (or continue) stage 1 within ``minutes`` of wall time; returns the summary written to
    ``OUT/pretrain/summary.json``. The step count is the one that fits the first call's minutes, or ``steps``;
    a call that runs out of minutes first stops with a checkpoint, and the next call continues."""
    t0 = time.time()
    minutes = preset.pretrain_minutes if minutes is None else minutes
    deadline = t0 + 60 * minutes
    reserve = 2 + 3 * minutes  # seconds kept for the last checkpoint and the dense export
    prepare(layout, preset, log)
    plan_path = os.path.join(layout.pretrain, "plan.json")
    plan = read_json(plan_path)
    cfg = train_config(layout, preset, seed)
    if plan is not None and steps is not None and steps != plan["steps"]:
        raise ValueError(f"{plan_path} fixed stage 1 at {plan['steps']} steps; --steps {steps} needs a new --out")
    calib = preset.calib_steps
    if plan is None:
        if steps is not None:
            plan = {"steps": steps}
        else:
            if preset.pretrain_warmup <= calib:
                raise ValueError(f"preset {preset.name}: pretrain_warmup must exceed calib_steps={calib}")
            log(f"pretrain: timing the first {calib} steps")
            train_to(cfg, preset.pretrain_max_steps, stop_at=calib, log=log)
            step_s = step_stats(layout.pretrain)["step_s"]
            fit = calib + steps_in(deadline - time.time() - reserve, step_s)
            plan = {"steps": max(calib + 1, min(preset.pretrain_max_steps, fit)), "step_s": step_s,
                    "minutes": minutes}
            log(f"pretrain: {step_s:.3f} s/step -> {plan['steps']} steps fit in {minutes} min")
        plan.update(seq_len=preset.pretrain_len, batch=preset.pretrain_batch)
        write_json(plan_path, plan)
    S = plan["steps"]
    if trained_steps(layout.pretrain) < S and not step_stats(layout.pretrain):
        log(f"pretrain: timing the first {calib} steps")
        train_to(cfg, S, stop_at=calib, log=log)
    done = trained_steps(layout.pretrain)
    if done < S:
        step_s = step_stats(layout.pretrain)["step_s"]
        stop = min(S, done + max(1, steps_in(deadline - time.time() - reserve, step_s)))
        save_every = max(1, steps_in(120, step_s))  # a checkpoint every ~2 minutes
        train_to(dataclasses.replace(cfg, save_every=save_every), S, stop_at=stop, log=log)
    state = latest_state(layout.pretrain)
    complete = state["step"] >= S
    if complete and not os.path.exists(os.path.join(layout.base, "config.json")):
        export_dense(state["checkpoint"], layout.base)
        log(f"pretrain: dense model saved to {layout.base}")
    summary = {"steps": state["step"], "planned_steps": S, "complete": complete, "tokens": state.get("tokens"),
               "loss": state.get("loss"), "seq_len": preset.pretrain_len, "batch": preset.pretrain_batch,
               "spla": cfg.spla, "checkpoint": state["checkpoint"], **step_stats(layout.pretrain)}
    write_json(os.path.join(layout.pretrain, "summary.json"), summary)
    layout.log_timing("pretrain", time.time() - t0, preset=preset.name, steps=state["step"], tokens=state.get("tokens"))
    if not complete:
        log(f"pretrain: stopped at step {state['step']} of {S} (time budget); rerun the same command to continue")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="size and budget preset (default tiny)")
    p.add_argument("--out", required=True, help="the study's output folder")
    p.add_argument("--minutes", type=float, default=None, help="wall-time budget of this call (default: the preset's)")
    p.add_argument("--steps", type=int, default=None,
                   help="step count (default: what fits the first call's minutes); reruns continue the run")
    p.add_argument("--seed", type=int, default=0, help="initialization and data-order seed (default 0)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    summary = run(Layout(args.out), get_preset(args.preset), minutes=args.minutes, steps=args.steps, seed=args.seed)
    print(f"pretrain: {summary['steps']} steps, {summary['tokens']:,} tokens, loss {summary['loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
