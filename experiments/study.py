# -*- coding: utf-8 -*-
"""The whole study in one command: corpus -> stage 1 (pretrain) -> stage 2 (variants) -> stage 3 (evaluate).

    python -m experiments.study --preset tiny --out out/study-tiny       # CPU smoke run, < 2 minutes
    python -m experiments.study --preset gpu --out out/study             # one ~9-minute command on one H100
    python -m experiments.study --preset gpu-ablate --out out/study      # ablations, after the gpu preset

Every stage is resumable: rerunning a command skips what is done and continues what a time limit stopped.
``--max-minutes`` bounds the whole command: setup time (tokenizer, corpus) comes out of stage 1's budget, and
stages 2 and 3 keep their preset shares. ``--seeds 1 2`` trains and evaluates more stage-2 seeds on the same
stage-1 model (the same step count per variant).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

if __package__ in (None, ""):  # `python experiments/study.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import continue_long, evaluate, pretrain  # noqa: E402
from experiments.common import PRESETS, Layout, get_preset, read_json  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="size and budget preset (default tiny)")
    p.add_argument("--out", required=True, help="output folder (one per preset family: tiny, or gpu + gpu-ablate)")
    p.add_argument("--variants", nargs="+", default=None, help="stage-2 variants (default: the preset's)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="stage-2 seeds (default: the preset's)")
    p.add_argument("--max-minutes", type=float, default=None, help="budget of the whole command (default: preset's)")
    p.add_argument("--device", default=None, help="evaluation device, cpu or cuda (default: cuda when available)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    preset = get_preset(args.preset)
    layout = Layout(args.out)
    variants = args.variants or preset.variants
    seeds = args.seeds or preset.seeds
    t0 = time.time()
    budget = 60 * (preset.max_minutes if args.max_minutes is None else args.max_minutes)
    later = 60 * (preset.variant_minutes * len(variants) * len(seeds) + preset.eval_minutes)

    pretrain.prepare(layout, preset)
    stage1 = (budget - later - (time.time() - t0)) / 60
    done = (read_json(os.path.join(layout.pretrain, "summary.json")) or {}).get("complete", False)
    if stage1 < preset.pretrain_minutes and not done:
        print(f"study: stage 1 gets {max(stage1, 0):.2f} of its {preset.pretrain_minutes} minutes (setup took "
              f"{time.time() - t0:.0f} s)", flush=True)
    t1 = time.time()
    pre = pretrain.run(layout, preset, minutes=min(preset.pretrain_minutes, max(stage1, 0.05)))
    t2 = time.time()
    if not pre["complete"]:
        print("study: stage 1 is not finished; rerun the same command to continue it", flush=True)
        return 1
    for s in seeds:
        continue_long.run(layout, preset, variants, seed=s)
    t3 = time.time()
    evaluate.run(layout, preset, variants, seeds, device=args.device)
    t4 = time.time()
    with open(os.path.join(layout.eval, "results.md")) as f:
        print("\n" + f.read())
    print(f"study: setup {t1 - t0:.0f} s, stage 1 {t2 - t1:.0f} s, stage 2 {t3 - t2:.0f} s, stage 3 {t4 - t3:.0f} s, "
          f"total {t4 - t0:.0f} s; results in {layout.eval}/results.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
