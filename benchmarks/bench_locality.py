# -*- coding: utf-8 -*-
"""How local is SPLA's per-token selection on a real model? The K/V a query-tile kernel would load.

    python benchmarks/bench_locality.py [--T 4096 8192] [--tiles 1 4 16 64] [--out DIR]

The GPU kernels load every selected block once per (token, KV head) (token-major) or once per few tokens that chose
it (KV-major). A kernel that tiles n consecutive queries and loads the union of their selected blocks once would
read ``union / (n x topk)`` of that: 1 when adjacent tokens share nothing, 1/n when they all agree. On random data
they share only the forced blocks (sink + local), so the benchmarks' random inputs cannot show what real
activations would give. This measures it.

SmolLM2-135M-Instruct (embedded, offline, fp32, CPU; 30 layers, 9 query / 3 KV heads, head dim 64) reads T tokens
of natural text (Python standard library sources, concatenated) with dense attention. A forward pre-hook on every
attention module projects q and k (post-RoPE, as SPLA sees them) and runs SPLA's selection (torch backend, block
64, top-16, the library's defaults otherwise). For query tiles of n consecutive tokens (aligned to n) and each KV
head, it counts the union of the selected blocks. Only tiles whose tokens are all past the dense regime
(position >= topk x block) count. The same is computed for random N(0, 1) q and k of the same shapes, and for the
forward benchmark's ``--data local`` inputs (``inputs.py``: AR(1) queries, ``rho = LOCAL_RHO``, N(0, 1) keys): that
column is the calibration of the synthetic data against the real model. The table gives the mean union in blocks
and the load ratio, over layers and heads, with the layers' minimum and maximum.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

import torch

from spla.ops.spla.chunk import chunk_spla_select

try:  # as a script (benchmarks/ on sys.path) or as benchmarks.bench_locality (the tests)
    from inputs import LOCAL_RHO, ar1
except ImportError:
    from benchmarks.inputs import LOCAL_RHO, ar1

BS, TOPK = 64, 16
OPTS = dict(block_size=BS, topk=TOPK, sink_blocks=1, local_blocks=2, selection="taylor2", cov="diag", rep_keys=1)


def union_sizes(indices: torch.Tensor, tiles: List[int]) -> Dict[int, torch.Tensor]:
    """``indices [T, H, K]`` (-1 padded) -> per tile size n, the union size of each full tile past the dense
    regime, ``[tiles, H]`` (float)."""
    T, H, _ = indices.shape
    nb = (T + BS - 1) // BS
    sel = torch.zeros(T, H, nb + 1, dtype=torch.bool)
    sel.scatter_(2, torch.where(indices >= 0, indices.long(), nb), True)
    sel = sel[..., :nb]
    first = TOPK * BS  # positions before this select every visible block
    out = {}
    for n in tiles:
        t0 = (first + n - 1) // n * n
        m = (T - t0) // n
        if m <= 0:
            raise ValueError(f"T={T} leaves no tile of {n} tokens past position {first}")
        out[n] = sel[t0:t0 + m * n].view(m, n, H, nb).any(1).sum(-1).float()
    return out


def natural_tokens(tok, T: int) -> torch.Tensor:
    """T tokens of Python standard library sources (a fixed list of large, prose-rich modules), concatenated."""
    root = os.path.dirname(os.__file__)
    ids: List[int] = []
    for name in ("argparse.py", "typing.py", "inspect.py", "dataclasses.py", "subprocess.py", "tarfile.py"):
        with open(os.path.join(root, name), encoding="utf-8") as f:
            ids += tok.encode(f.read())
        if len(ids) >= T:
            return torch.tensor([ids[:T]])
    raise ValueError(f"the listed standard library files hold only {len(ids)} tokens, fewer than T={T}")


def measure(T: int, tiles: List[int], model, tok) -> dict:
    from tqdm.auto import tqdm

    from spla.demo import _project, attach_probes

    attn = [layer.self_attn for layer in model.model.layers]
    real: Dict[int, List[torch.Tensor]] = {n: [] for n in tiles}
    rand: Dict[int, List[torch.Tensor]] = {n: [] for n in tiles}
    local: Dict[int, List[torch.Tensor]] = {n: [] for n in tiles}
    bar = tqdm(total=len(attn), desc=f"T={T}", unit="layer")
    gen = torch.Generator().manual_seed(T)

    def probe(layer, module, hidden, cos, sin):
        q, k = _project(module, hidden[0], cos, sin)[:2]
        scale = module.head_dim ** -0.5
        synthetic = [(torch.randn(q.shape, generator=gen), torch.randn(k.shape, generator=gen)) for _ in range(2)]
        synthetic[1] = (ar1(synthetic[1][0], LOCAL_RHO), synthetic[1][1])
        for store, (qq, kk) in ((real, (q, k)), (rand, synthetic[0]), (local, synthetic[1])):
            idx = chunk_spla_select(qq[None].float(), kk[None].float(), scale=scale, **OPTS)[0]
            for n, u in union_sizes(idx, tiles).items():
                store[n].append(u)  # [tiles, H] of this layer
        bar.update(1)

    hooks = attach_probes(attn, [probe])
    try:
        with torch.no_grad():
            model(natural_tokens(tok, T), logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
        bar.close()
    res = {"T": T, "tiles": {}}
    for n in tiles:
        row = {}
        for name, store in (("real", real), ("random", rand), ("local", local)):
            per_layer = torch.stack([u.mean() for u in store[n]])  # [layers]
            mean = torch.cat([u.flatten() for u in store[n]]).mean()
            row[name] = dict(union=mean.item(), ratio=(mean / (n * TOPK)).item(),
                             ratio_min_layer=(per_layer.min() / (n * TOPK)).item(),
                             ratio_max_layer=(per_layer.max() / (n * TOPK)).item(),
                             per_layer_ratio=(per_layer / (n * TOPK)).tolist())
        res["tiles"][n] = row
    return res


def plot(results: List[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        ns = sorted(int(n) for n in r["tiles"])
        layers = len(r["tiles"][ns[0]]["real"]["per_layer_ratio"])
        for i in range(layers):
            ax.plot(ns, [r["tiles"][n]["real"]["per_layer_ratio"][i] for n in ns], color="tab:blue", alpha=0.15, lw=1)
        ax.plot(ns, [r["tiles"][n]["real"]["ratio"] for n in ns], "o-", color="tab:blue", lw=2,
                label="SmolLM2 activations (mean; faint: each layer)")
        ax.plot(ns, [r["tiles"][n]["random"]["ratio"] for n in ns], "s--", color="tab:red", lw=2, label="random q, k")
        ax.plot(ns, [r["tiles"][n]["local"]["ratio"] for n in ns], "^-.", color="tab:green", lw=2,
                label=f"synthetic AR(1) q (rho {LOCAL_RHO}), random k")
        ax.plot(ns, [1 / n for n in ns], ":", color="gray", label="1/n (all tokens of a tile agree)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("query tile (consecutive tokens)")
        ax.set_ylabel("K/V blocks loaded / per-token loads")
        ax.set_title(f"union of selected blocks, T={r['T']}, block {BS}, top-{TOPK}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=[4096, 8192], help="context lengths (at most 8192)")
    ap.add_argument("--tiles", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="query tile sizes")
    ap.add_argument("--out", default=os.environ.get("OUT", "out/locality"))
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from spla.models import load, load_tokenizer
    tok = load_tokenizer("smollm2")
    model = load("smollm2").eval()
    results = [measure(T, a.tiles, model, tok) for T in a.T]
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "locality.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = ["| T | tile | real: union (blocks) | real: load ratio | layers' min-max | random: union | random: load ratio "
             f"| AR(1) rho {LOCAL_RHO}: union | AR(1): load ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for n, row in r["tiles"].items():
            re, ra, lo = row["real"], row["random"], row["local"]
            lines.append(f"| {r['T']} | {n} | {re['union']:.1f} | {re['ratio']:.3f} | {re['ratio_min_layer']:.3f}-"
                         f"{re['ratio_max_layer']:.3f} | {ra['union']:.1f} | {ra['ratio']:.3f} | {lo['union']:.1f} | "
                         f"{lo['ratio']:.3f} |")
    table = "\n".join(lines)
    with open(os.path.join(a.out, "locality.md"), "w") as f:
        f.write(table + "\n")
    plot(results, os.path.join(a.out, "locality.png"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
