# -*- coding: utf-8 -*-
"""Stage 2: continue the stage-1 model at long context as one attention variant per run, same token budget.

Variants (``experiments.common.VARIANT_HELP``): ``dense``; ``topk_taylor1`` and ``topk_taylor2`` (top-k
block-sparse attention only, first- or second-order block selection); ``spla`` (taylor2 + the residual linear
branch, its merge weight starting at 0, so it starts as ``topk_taylor2``); and the ablations ``spla_cov_full``,
``spla_elu1``, ``spla_relu2``, ``spla_rattention``, ``spla_block_half``, ``spla_block_double``, ``spla_topk_half``,
``spla_topk_double``. Each run converts ``OUT/base`` (the dense stage-1 model) afresh and trains every weight.

Same budget: all variants train the same number of steps (batch x sequence length tokens each), fixed once in
``OUT/continue/plan.json``. Without ``--steps`` it is chosen from the time budget: each variant of the first call
times ``calib_steps`` steps (inside the warm-up, so the schedule does not depend on the count yet), and the count is
the largest that every one of them fits in ``--minutes-per-variant``. Later calls (other seeds, the ablations)
reuse it. A run that meets its time limit first stops with a checkpoint: rerun the same command to finish it.

    python -m experiments.continue_long --preset gpu --out out/study --variants dense topk_taylor1 topk_taylor2 spla
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # `python experiments/continue_long.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import (PRESETS, Layout, Preset, get_preset, latest_state, read_json,  # noqa: E402
                                step_stats, steps_in, trained_steps, train_to, variant_spla, variant_train,
                                write_json)
from experiments.pretrain import MIN_DOC_TOKENS  # noqa: E402


def train_config(layout: Layout, preset: Preset, variant: str, seed: int):
    """The :class:`~spla.train.trainer.TrainConfig` of one variant (``steps`` is set by the plan)."""
    from spla.train.trainer import TrainConfig
    return TrainConfig(
        out=layout.run(variant, seed), model=layout.base, tokenizer=layout.tokenizer,
        data=[os.path.join(layout.corpus, "train.jsonl")],
        spla=variant_spla(variant, preset.block_size, preset.topk, preset.long_len),
        seq_len=preset.long_len, batch_size=preset.long_batch, micro_batch_size=1, lr=preset.long_lr,
        warmup=preset.long_warmup, steps=preset.long_max_steps, save_every=0, keep_checkpoints=1, seed=seed,
        min_doc_tokens=MIN_DOC_TOKENS, synthetic_ratio=preset.synthetic_ratio, data_cache=layout.data_cache,
        threads=preset.threads, tensorboard=False, **variant_train(variant))


def _summary(layout: Layout, preset: Preset, variant: str, seed: int, planned: int) -> Dict[str, Any]:
    out = layout.run(variant, seed)
    state = latest_state(out)
    summary = {"variant": variant, "seed": seed, "spla": variant_spla(variant, preset.block_size, preset.topk,
                                                                     preset.long_len),
               "dense": variant == "dense", "steps": state["step"], "planned_steps": planned,
               "complete": state["step"] >= planned, "tokens": state.get("tokens"), "loss": state.get("loss"),
               "seq_len": preset.long_len, "batch": preset.long_batch, "checkpoint": state["checkpoint"],
               **step_stats(out)}
    write_json(os.path.join(out, "summary.json"), summary)
    return summary


def run(layout: Layout, preset: Preset, variants: Sequence[str], seed: int = 0,
        minutes_per_variant: Optional[float] = None, steps: Optional[int] = None,
        log: Callable[[str], None] = print) -> Dict[str, Dict[str, Any]]:
    """Train (or continue) every variant for ``seed``; returns their summaries by name (also written to
    ``OUT/continue/<variant>-seed<seed>/summary.json``)."""
    if not os.path.exists(os.path.join(layout.base, "config.json")):
        raise ValueError(f"no stage-1 model in {layout.base}: run `python -m experiments.pretrain --preset "
                         f"{preset.name} --out {layout.root}` first (or finish it: rerun that command)")
    for v in variants:
        variant_spla(v, preset.block_size, preset.topk, preset.long_len)  # unknown names fail before any training
    share = 60 * (preset.variant_minutes if minutes_per_variant is None else minutes_per_variant)
    calib = preset.calib_steps
    plan_path = os.path.join(layout.long, "plan.json")
    plan = read_json(plan_path)
    if plan is not None:
        if (plan["seq_len"], plan["batch"]) != (preset.long_len, preset.long_batch):
            raise ValueError(f"{plan_path} was made for {plan['batch']} x {plan['seq_len']} tokens per step, the "
                             f"preset has {preset.long_batch} x {preset.long_len}")
        if steps is not None and steps != plan["steps"]:
            raise ValueError(f"{plan_path} fixed stage 2 at {plan['steps']} steps; --steps {steps} needs a new --out")
    used: Dict[str, float] = {}  # seconds each variant already spent in this call (timing)
    if plan is None:
        if steps is not None:
            plan = {"steps": steps}
        else:
            if preset.long_warmup <= calib:
                raise ValueError(f"preset {preset.name}: long_warmup must exceed calib_steps={calib}")
            timing = {}
            for v in variants:
                t0 = time.time()
                log(f"continue: timing {calib} steps of {v} (seed {seed})")
                cfg = train_config(layout, preset, v, seed)
                train_to(cfg, preset.long_max_steps, stop_at=calib, log=log)
                used[v] = time.time() - t0
                timing[v] = {"step_s": step_stats(cfg.out)["step_s"], "seconds_used": round(used[v], 2)}
            reserve = 2 + 0.05 * share
            fit = min(calib + steps_in(share - used[v] - reserve, timing[v]["step_s"]) for v in variants)
            plan = {"steps": max(calib + 1, min(preset.long_max_steps, fit)), "timing": timing,
                    "minutes_per_variant": share / 60}
            speeds = ", ".join(f"{v} {t['step_s']:.3f} s/step" for v, t in timing.items())
            log(f"continue: {plan['steps']} steps per variant fit in {share / 60:.2f} min each ({speeds})")
        plan.update(seq_len=preset.long_len, batch=preset.long_batch,
                    tokens_per_variant=plan["steps"] * preset.long_len * preset.long_batch)
        write_json(plan_path, plan)
    S = plan["steps"]
    out: Dict[str, Dict[str, Any]] = {}
    for v in variants:
        t0 = time.time()
        cfg = train_config(layout, preset, v, seed)
        if trained_steps(cfg.out) < S and not step_stats(cfg.out):  # a run the plan did not time: time it first
            log(f"continue: timing {calib} steps of {v} (seed {seed})")
            train_to(cfg, S, stop_at=calib, log=log)
        done = trained_steps(cfg.out)
        if done < S:  # as many steps as the rest of this variant's share allows
            left = share - used.get(v, 0.0) - (time.time() - t0) - 2
            stop = min(S, done + max(1, steps_in(left, step_stats(cfg.out)["step_s"])))
            log(f"continue: {v} (seed {seed}) steps {done + 1}..{stop} of {S}")
            train_to(cfg, S, stop_at=stop, log=log)
        out[v] = _summary(layout, preset, v, seed, S)
        layout.log_timing(f"continue:{v}", used.get(v, 0.0) + time.time() - t0, preset=preset.name, seed=seed,
                          steps=out[v]["steps"], tokens=out[v]["tokens"])
        if not out[v]["complete"]:
            log(f"continue: {v} (seed {seed}) stopped at step {out[v]['steps']} of {S} (time budget); rerun the same "
                f"command to finish it")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="size and budget preset (default tiny)")
    p.add_argument("--out", required=True, help="the study's output folder (stage 1 done)")
    p.add_argument("--variants", nargs="+", default=None, help="variant names (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="data-order seed of these runs (default 0)")
    p.add_argument("--minutes-per-variant", type=float, default=None,
                   help="wall-time share of each variant in this call (default: the preset's)")
    p.add_argument("--steps", type=int, default=None,
                   help="step count (default: what fits the first call's shares); reruns continue the runs")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    preset = get_preset(args.preset)
    res = run(Layout(args.out), preset, args.variants or preset.variants, seed=args.seed,
              minutes_per_variant=args.minutes_per_variant, steps=args.steps)
    for v, s in res.items():
        print(f"{v:>18}: {s['steps']}/{s['planned_steps']} steps, {s['tokens']:,} tokens, loss {s['loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
