# -*- coding: utf-8 -*-
"""Stage 3: held-out perplexity and RULER-style retrieval of the stage-1 model (``base``) and the stage-2 runs.

Per model and length: perplexity over ``ppl_windows`` non-overlapping windows of the held-out split (files the
training never saw, chosen by a hash of their path), and the accuracy on ``examples_per_task`` examples of each
task of :data:`experiments.common.RETRIEVAL_TASKS`, scored by teacher-forced exact match (every answer token
is the argmax prediction). Every model sees the same windows and examples. Dense models select every block at
every length; the sparse variants keep their training top-k.

Results: one JSON per (model, seed, length) in ``OUT/eval/cells`` (reused when the checkpoint and the settings are
unchanged, so an interrupted or time-limited call continues), and ``OUT/eval/results.json``, ``results.md``,
``results.png`` (when matplotlib is installed) over every cell present, seeds aggregated as mean, standard
deviation and count.

    python -m experiments.evaluate --preset gpu --out out/study --seeds 0
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # `python experiments/evaluate.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from experiments.common import (PRESETS, RETRIEVAL_TASKS, TASK_HELP, VARIANT_HELP, Layout, Preset,  # noqa: E402
                                RetrievalTasks, answer_hits, eval_spla, get_preset, heldout_tokens, mean_nll, read_json,
                                tokenizer, variant_spla, windows_of, write_json)


@dataclass
class Entry:
    """One model to evaluate: the stage-1 ``base`` (seed ``None``) or a stage-2 run."""
    name: str
    seed: Optional[int]
    path: str
    spla: Dict[str, Any]
    dense: bool
    step: int

    @property
    def key(self) -> str:
        return self.name if self.seed is None else f"{self.name}-seed{self.seed}"


def entries(layout: Layout, preset: Preset, variants: Sequence[str], seeds: Sequence[int],
            log: Callable[[str], None] = print) -> List[Entry]:
    """The base model and every finished run of ``variants`` x ``seeds`` (unfinished runs are reported)."""
    pre = read_json(os.path.join(layout.pretrain, "summary.json"))
    if pre is None or not pre["complete"] or not os.path.exists(os.path.join(layout.base, "config.json")):
        raise ValueError(f"stage 1 is not finished in {layout.root}: run experiments.pretrain first")
    out = [Entry("base", None, layout.base, variant_spla("dense", preset.block_size, preset.topk, preset.pretrain_len),
                 True, pre["steps"])]
    for v in variants:
        for s in seeds:
            summary = read_json(os.path.join(layout.run(v, s), "summary.json"))
            if summary is None or not summary["complete"]:
                log(f"evaluate: {v} seed {s} skipped: "
                    + ("not trained" if summary is None else f"{summary['steps']} of {summary['planned_steps']} steps"))
                continue
            out.append(Entry(v, s, summary["checkpoint"], summary["spla"], summary["dense"], summary["steps"]))
    return out


def _device(name: Optional[str]) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def evaluate_cell(model, entry: Entry, length: int, preset: Preset, tasks: RetrievalTasks, heldout: np.ndarray,
                  device: torch.device) -> Dict[str, Any]:
    """Perplexity and retrieval of one model at one length (what the preset asks for at that length)."""
    import spla
    spla.convert(model, eval_spla(entry.spla, entry.dense, length))
    cell: Dict[str, Any] = {"name": entry.name, "seed": entry.seed, "length": length}
    if length in preset.ppl_lengths:
        nll, n = mean_nll(model, windows_of(heldout, length, preset.ppl_windows), device, preset.eval_batch_tokens)
        cell.update(ppl=math.exp(nll), nll=nll, ppl_tokens=n)
    if length in preset.retrieval_lengths:
        cell["acc"] = {}
        for task in RETRIEVAL_TASKS:
            examples = [tasks.example(task, length, i) for i in range(preset.examples_per_task)]
            hits = answer_hits(model, examples, device, preset.eval_batch_tokens)
            cell["acc"][task] = sum(hits) / len(hits)
    return cell


def _settings(entry: Entry, preset: Preset) -> Dict[str, Any]:
    """What a cached cell must match to be reused."""
    return {"path": os.path.abspath(entry.path), "step": entry.step, "examples_per_task": preset.examples_per_task,
            "ppl_windows": preset.ppl_windows, "tasks": list(RETRIEVAL_TASKS)}


def run(layout: Layout, preset: Preset, variants: Sequence[str], seeds: Sequence[int],
        minutes: Optional[float] = None, device: Optional[str] = None,
        log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Evaluate what is missing within ``minutes`` (shortest lengths first), then aggregate every cell present."""
    from tqdm.auto import tqdm

    import spla
    t0 = time.time()
    deadline = t0 + 60 * (preset.eval_minutes if minutes is None else minutes)
    dev = _device(device)
    if preset.threads:
        torch.set_num_threads(preset.threads)
    tok = tokenizer(layout)
    todo = entries(layout, preset, variants, seeds, log)
    heldout = heldout_tokens(layout, tok, preset.ppl_windows * max(preset.ppl_lengths))
    tasks = RetrievalTasks(tok)
    cells_dir = os.path.join(layout.eval, "cells")
    models: Dict[str, Any] = {}
    pending = []
    for length in preset.eval_lengths:
        for e in todo:
            path = os.path.join(cells_dir, f"{e.key}-L{length}.json")
            old = read_json(path)
            if old is None or old.get("settings") != _settings(e, preset):
                pending.append((length, e, path))
    skipped = 0
    for length, e, path in tqdm(pending, desc="evaluate", unit="cell", dynamic_ncols=True):
        if time.time() > deadline:
            skipped += 1
            continue
        if e.key not in models:
            models[e.key] = spla.load(e.path, config=eval_spla(e.spla, e.dense, length)).to(dev)
        cell = evaluate_cell(models[e.key], e, length, preset, tasks, heldout, dev)
        cell.update(settings=_settings(e, preset), device=device_name(dev))
        write_json(path, cell)
    if skipped:
        log(f"evaluate: {skipped} of {len(pending)} cells not run (time budget); rerun the same command to add them")
    results = aggregate(layout, preset, dev)
    layout.log_timing("evaluate", time.time() - t0, preset=preset.name, cells=len(pending) - skipped)
    return results


# ---------------------------------------------------------------------------------------------- tables
def _stats(values: List[float]) -> Dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a),
            "min": float(a.min()), "max": float(a.max())}


def _fmt(st: Optional[Dict[str, float]], scale: float = 1.0, digits: int = 1) -> str:
    if st is None:
        return "–"
    s = f"{st['mean'] * scale:.{digits}f}"
    return s if st["n"] == 1 else f"{s} ± {st['std'] * scale:.{digits}f} ({st['n']})"


def paired_vs_dense(ppl: Dict[str, Dict[int, Dict[str, Any]]]) -> Dict[str, Dict[int, Dict[str, float]]]:
    """Per variant and length: its perplexity over ``dense``'s of the same stage-2 seed, minus 1 (the seeds'
    data orders move every variant together, so the paired ratio separates variants that the seed spread hides)."""
    out: Dict[str, Dict[int, Dict[str, float]]] = {}
    for n, per_len in ppl.items():
        if n in ("base", "dense"):
            continue
        for L, st in per_len.items():
            ref = ppl.get("dense", {}).get(L, {}).get("seeds", {})
            pairs = [v / ref[s] - 1.0 for s, v in st.get("seeds", {}).items() if s in ref]
            if pairs:
                out.setdefault(n, {})[L] = _stats(pairs)
    return out


def aggregate(layout: Layout, preset: Preset, device: torch.device) -> Dict[str, Any]:
    """Every cell in ``OUT/eval/cells`` -> ``results.json``, ``results.md`` and ``results.png``."""
    cells_dir = os.path.join(layout.eval, "cells")
    cells = [read_json(os.path.join(cells_dir, f)) for f in sorted(os.listdir(cells_dir)) if f.endswith(".json")] \
        if os.path.isdir(cells_dir) else []
    names = sorted({c["name"] for c in cells}, key=lambda n: (n != "base", list(VARIANT_HELP).index(n)
                                                              if n in VARIANT_HELP else 99, n))
    lengths = sorted({c["length"] for c in cells})
    ppl: Dict[str, Dict[int, Dict[str, float]]] = {}
    acc: Dict[str, Dict[str, Dict[int, Dict[str, float]]]] = {}
    for n in names:
        for L in lengths:
            mine = [c for c in cells if c["name"] == n and c["length"] == L]
            vals = [c["ppl"] for c in mine if "ppl" in c]
            if vals:
                ppl.setdefault(n, {})[L] = _stats(vals)
                ppl[n][L]["seeds"] = {str(c["seed"]): c["ppl"] for c in mine if "ppl" in c}
            for t in RETRIEVAL_TASKS:
                vals = [c["acc"][t] for c in mine if "acc" in c]
                if vals:
                    acc.setdefault(n, {}).setdefault(t, {})[L] = _stats(vals)
    runs = []
    for n in names:
        for seed in sorted({c["seed"] for c in cells if c["name"] == n}, key=lambda s: -1 if s is None else s):
            s = read_json(os.path.join(layout.pretrain if n == "base" else layout.run(n, seed), "summary.json"))
            runs.append({"name": n, "seed": seed, **{k: s.get(k) for k in ("steps", "tokens", "tokens_per_s",
                                                                           "seq_len", "batch", "loss", "spla")}})
    results = {"preset": preset.name, "device": device_name(device), "torch": torch.__version__,
               "written": time.strftime("%Y-%m-%d %H:%M:%S"), "ppl": ppl, "ppl_vs_dense": paired_vs_dense(ppl),
               "acc": acc, "runs": runs,
               "examples_per_task": preset.examples_per_task, "ppl_windows": preset.ppl_windows,
               "corpus": read_json(os.path.join(layout.corpus, "manifest.json")),
               "pretrain_plan": read_json(os.path.join(layout.pretrain, "plan.json")),
               "continue_plan": read_json(os.path.join(layout.long, "plan.json"))}
    write_json(os.path.join(layout.eval, "results.json"), results)
    with open(os.path.join(layout.eval, "results.md"), "w") as f:
        f.write(markdown(results, names, lengths))
    plot(results, names, lengths, os.path.join(layout.eval, "results.png"))
    return results


def markdown(results: Dict[str, Any], names: List[str], lengths: List[int]) -> str:
    """The tables of ``results.md``."""
    k = lambda L: f"{L // 1024}k" if L % 1024 == 0 else str(L)  # noqa: E731
    lines = [f"Device: {results['device']}; torch {results['torch']}; preset `{results['preset']}`; written "
             f"{results['written']}. Seeds are stage-2 data-order seeds: mean ± sample std (number of seeds) where "
             "there are several.", "", "Training runs:", "",
             "| model | seed | selection | merge | block | topk | seq len | steps | tokens | tokens/s | final loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        sp, dense = r["spla"], r["name"] in ("base", "dense")  # dense: every block selected
        sel, merge, topk = ("–", "dense", "all") if dense else (sp["selection"], sp["merge"], sp["topk"])
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "–"
        lines.append(f"| {r['name']} | {'–' if r['seed'] is None else r['seed']} | {sel} | {merge} | "
                     f"{sp['block_size']} | {topk} | {r['seq_len']} | {r['steps']} | {r['tokens']:,} | {tps} | "
                     f"{r['loss']:.3f} |")
    ppl_l = [L for L in lengths if any(L in results["ppl"].get(n, {}) for n in names)]
    if ppl_l:
        lines += ["", f"Held-out perplexity ({results['ppl_windows']} windows per length):", "",
                  "| model | " + " | ".join(k(L) for L in ppl_l) + " |", "|---|" + "---|" * len(ppl_l)]
        for n in names:
            lines.append(f"| {n} | " + " | ".join(_fmt(results["ppl"].get(n, {}).get(L), digits=2) for L in ppl_l)
                         + " |")
    paired = results.get("ppl_vs_dense", {})
    if paired:
        lines += ["", "Held-out perplexity relative to `dense` of the same seed, % (mean ± std over the seeds; "
                      "negative: lower perplexity than dense):", "",
                  "| model | " + " | ".join(k(L) for L in ppl_l) + " |", "|---|" + "---|" * len(ppl_l)]
        for n in names:
            if n in paired:
                lines.append(f"| {n} | " + " | ".join(_fmt(paired[n].get(L), scale=100.0, digits=2) for L in ppl_l)
                             + " |")
    acc_l = [L for L in lengths if any(L in t for n in names for t in results["acc"].get(n, {}).values())]
    if acc_l:
        lines += ["", f"Retrieval accuracy, % of {results['examples_per_task']} examples per task and length "
                      "(teacher-forced exact match of every answer token):", "",
                  "| model | task | " + " | ".join(k(L) for L in acc_l) + " |", "|---|---|" + "---|" * len(acc_l)]
        for n in names:
            for t in RETRIEVAL_TASKS:
                row = results["acc"].get(n, {}).get(t, {})
                lines.append(f"| {n} | {t} | " + " | ".join(_fmt(row.get(L), scale=100.0, digits=0) for L in acc_l)
                             + " |")
        lines += ["", "Tasks: " + "; ".join(f"`{t}`: {h}" for t, h in TASK_HELP.items()) + "."]
    return "\n".join(lines) + "\n"


def plot(results: Dict[str, Any], names: List[str], lengths: List[int], path: str) -> None:
    """Perplexity and per-task accuracy against length, one line per model (skipped without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 1 + len(RETRIEVAL_TASKS), figsize=(4.2 * (1 + len(RETRIEVAL_TASKS)), 3.6))
    panels = [("held-out perplexity", lambda n: results["ppl"].get(n, {}), 1.0)]
    panels += [(f"{t} accuracy (%)", lambda n, t=t: results["acc"].get(n, {}).get(t, {}), 100.0)
               for t in RETRIEVAL_TASKS]
    for ax, (title, series, scale) in zip(axes, panels):
        for n in names:
            pts = sorted((L, st) for L, st in series(n).items())
            if pts:
                xs = [int(L) for L, _ in pts]
                ax.errorbar(xs, [st["mean"] * scale for _, st in pts], yerr=[st["std"] * scale for _, st in pts],
                            marker="o", capsize=3, label=n)
        ax.set_xscale("log", base=2)
        if scale == 100.0:
            ax.set_ylim(-5, 105)
        ax.set_title(title)
        ax.set_xlabel("context length (tokens)")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"preset {results['preset']} on {results['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="size and budget preset (default tiny)")
    p.add_argument("--out", required=True, help="the study's output folder")
    p.add_argument("--variants", nargs="+", default=None, help="variant names (default: the preset's)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="stage-2 seeds (default: the preset's)")
    p.add_argument("--minutes", type=float, default=None, help="wall-time budget (default: the preset's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    preset = get_preset(args.preset)
    layout = Layout(args.out)
    run(layout, preset, args.variants or preset.variants, args.seeds or preset.seeds, args.minutes, args.device)
    with open(os.path.join(layout.eval, "results.md")) as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
