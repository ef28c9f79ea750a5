# -*- coding: utf-8 -*-
"""Why a block-selection rule keeps or loses the needles: the associative-recall stage-1 model, no training.

For each selection rule of ``recall.CONVERT_RULES`` (first / second order, with and without the representative-key
floor, oracle; ``--rep-keys`` adds both orders with more representative keys) and each length, on the dense model's own activations at the last 32 positions (the 16 queries and
their answers), per layer:

- ``mass``: the share of the dense attention mass inside the blocks the rule selects;
- ``recall``: the share of the oracle's free picks that the rule also picks;
- ``err``: the relative error of the layer's top-k attention output against dense attention;
- ``floor``: the share of (query head, candidate block) pairs where the representative-key floor
  ``max_r q·k_r - log(block_size)`` is above the Taylor estimate, i.e. decides the block's score;

plus the query accuracy of the model converted with the rule (top-k attention, ``merge="none"``). The first
three come from :class:`spla.demo.FidelityProbe`, the probe ``spla demo`` runs on SmolLM2.

    python -m experiments.recall_selection --preset gpu-16k --out out/recall-16k --lengths 4096 16384
    python -m experiments.recall_selection --preset tiny --out out/recall-tiny --lengths 128 256    # smoke run

Reads ``OUT/stage1.pt`` (``experiments.recall``); writes ``OUT/selection.json`` and ``OUT/selection.md``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

if __package__ in (None, ""):  # `python experiments/recall_selection.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import hidden_states, variant_spla, write_json  # noqa: E402
from experiments.evaluate import device_name  # noqa: E402
from experiments.recall import CONVERT_RULES, IGNORE, PRESETS, STAGE1_FILE, accuracy, build_model  # noqa: E402

#: positions probed at the end of every sequence: the 16 query keys and their values (gpu presets)
PROBE_TOKENS = 32


class FloorProbe:
    """Per layer, the share of (query head, candidate block) scores that the representative-key floor decides."""

    def __init__(self, configs: Dict[str, Any], n_layers: int, probe_tokens: int, scale: float):
        self.configs = {m: c for m, c in configs.items() if c.rep_keys > 0 and c.selection != "oracle"}
        self.sums = {m: [0.0] * n_layers for m in self.configs}
        self.count = [0] * n_layers
        self.P, self.scale = probe_tokens, scale

    @torch.no_grad()
    def __call__(self, layer: int, attn, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        from spla.demo import _project
        from spla.ops.spla.utils import block_log_scores, block_stats, candidate_range
        q, k = (x.double() for x in _project(attn, hidden[0], cos, sin)[:2])
        L, HQ, D = q.shape
        H = k.shape[1]
        for name, cfg in self.configs.items():
            bs = cfg.block_size
            stats = block_stats(k, bs, cov=cfg.cov, rep_keys=cfg.rep_keys)
            for t in range(max(0, L - self.P), L):
                lo, hi = candidate_range(t // bs, cfg.sink_blocks, cfg.local_blocks)
                if hi <= lo:
                    continue
                qt = q[t].view(1, H, HQ // H, D)
                with_floor = block_log_scores(qt, stats, self.scale, bs, cfg.selection, cfg.cov)[..., lo:hi]
                taylor = block_log_scores(qt, stats._replace(reps=None), self.scale, bs, cfg.selection,
                                          cfg.cov)[..., lo:hi]
                self.sums[name][layer] += float((with_floor > taylor).double().mean()) / self.P
        self.count[layer] += 1

    def per_layer(self) -> Dict[str, List[float]]:
        return {m: [x / max(1, c) for x, c in zip(v, self.count)] for m, v in self.sums.items()}


def rules(rep_keys: Sequence[int] = ()) -> Dict[str, Dict[str, Any]]:
    """``recall.CONVERT_RULES`` plus ``taylor1_repN`` / ``taylor2_repN`` for every ``N`` of ``rep_keys``."""
    extra = {f"{sel}_rep{n}": dict(selection=sel, rep_keys=n) for n in rep_keys for sel in ("taylor1", "taylor2")}
    return {**CONVERT_RULES, **extra}


def run(preset, out: str, lengths: Sequence[int], examples: int, device: Optional[torch.device] = None,
        log: Callable[[str], None] = print, rep_keys: Sequence[int] = ()) -> Dict[str, Any]:
    """The table of the module docstring for every rule (``rep_keys``: more representative keys, see
    :func:`rules`) and length; writes ``OUT/selection.{json,md}``.

    Raises:
        ValueError: when ``OUT`` holds no stage-1 model, or a length cannot hold the task.
    """
    import spla
    from spla.demo import FidelityProbe, attach_probes
    from spla.layers import SPLAConfig
    path = os.path.join(out, STAGE1_FILE)
    if not os.path.exists(path):
        raise ValueError(f"no stage-1 model in {out}: run `python -m experiments.recall --stage 1` first")
    for L in lengths:
        preset.task.batch(1, L, np.random.default_rng(0))  # lengths too short fail here
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(preset, seed=0)
    state = torch.load(path, map_location="cpu", weights_only=False)["run"]
    model.load_state_dict(state["model"])
    model.to(device).eval()
    base = SPLAConfig(**variant_spla("topk_taylor2", preset.block_size, preset.topk, max(lengths)))
    ruleset = rules(rep_keys)
    configs = {name: base.replace(**change) for name, change in ruleset.items()}
    res: Dict[str, Any] = {"preset": preset.name, "device": device_name(device), "stage1_steps": state["step"],
                           "examples": examples, "block_size": preset.block_size, "topk": preset.topk,
                           "probe_tokens": PROBE_TOKENS, "rules": {k: dict(v) for k, v in ruleset.items()},
                           "lengths": {}}
    for L in lengths:
        t0 = time.time()
        dense_attn = [layer.self_attn for layer in model.model.layers]
        probed = spla.convert(copy.deepcopy(model), base)
        spla_mods = [layer.self_attn for layer in probed.model.layers]
        fid = FidelityProbe(spla_mods, configs, PROBE_TOKENS)
        floor = FloorProbe(configs, len(dense_attn), PROBE_TOKENS, preset.head_dim ** -0.5)
        hooks = attach_probes(dense_attn, [fid, floor])
        rng = np.random.default_rng([12345, L])
        try:
            with torch.no_grad():
                for _ in range(examples):
                    ids, tgt = preset.task.batch(1, L, rng)
                    assert (tgt[0, L - PROBE_TOKENS:] != IGNORE).any()
                    hidden_states(model, torch.from_numpy(ids).to(device))
        finally:
            for h in hooks:
                h.remove()
        acc = {name: accuracy(spla.convert(copy.deepcopy(model), cfg), preset.task, L, examples, device)
               for name, cfg in configs.items()}
        acc["dense"] = accuracy(model, preset.task, L, examples, device)
        res["lengths"][str(L)] = {"probe": fid.per_layer(), "floor": floor.per_layer(), "acc": acc,
                                  "seconds": round(time.time() - t0, 1)}
        log(f"recall_selection: {L} tokens done in {time.time() - t0:.0f} s; accuracy "
            + ", ".join(f"{k} {100 * v:.1f}" for k, v in acc.items()))
    write_json(os.path.join(out, "selection.json"), res)
    with open(os.path.join(out, "selection.md"), "w") as f:
        f.write(markdown(res) + "\n")
    return res


def markdown(res: Dict[str, Any]) -> str:
    """The tables of ``selection.json``: one row per length and rule, one column group per layer."""
    first = next(iter(res["lengths"].values()))
    n = len(next(iter(first["probe"].values()))["mass"])
    cols = [f"layer {i}: mass / recall / err / floor, %" for i in range(n)]
    lines = [f"Stage-1 model ({res['stage1_steps']} steps, {res['preset']} preset, {res['device']}), no training: "
             f"top-{res['topk']} blocks of {res['block_size']}, {res['examples']} sequences per length, the last "
             f"{res['probe_tokens']} positions probed.", "",
             "| length | rule | accuracy, % | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * n]

    def pct(x: Optional[float]) -> str:
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"

    for L, r in res["lengths"].items():
        for rule, p in r["probe"].items():
            fl = r["floor"].get(rule)
            cells = [f"{pct(p['mass'][i])} / {pct(p['recall'][i])} / {pct(p['err'][i])} / "
                     f"{pct(fl[i]) if fl else '–'}" for i in range(n)]
            lines.append(f"| {L} | {rule} | {pct(r['acc'][rule])} | " + " | ".join(cells) + " |")
        lines.append(f"| {L} | dense | {pct(r['acc']['dense'])} | " + " | ".join("" for _ in range(n)) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="the recall preset of the stage-1 model")
    p.add_argument("--out", required=True, help="folder holding stage1.pt; the tables are written there")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths (default: the preset's "
                   "evaluation lengths)")
    p.add_argument("--examples", type=int, default=8, help="sequences per length (default 8)")
    p.add_argument("--rep-keys", type=int, nargs="*", default=[], help="also first and second order with this many "
                   "representative keys (2..4; the rules' default is 1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    if preset.threads:
        torch.set_num_threads(preset.threads)
    try:
        res = run(preset, args.out, args.lengths or list(preset.eval_lengths), args.examples,
                  torch.device(args.device) if args.device else None, rep_keys=args.rep_keys)
    except ValueError as e:
        p.error(str(e))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
