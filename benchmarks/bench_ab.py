# -*- coding: utf-8 -*-
"""Compare two source trees of spla on the GPU in one call: the union sparse stage, the forward and forward+backward.

    python3 benchmarks/bench_ab.py new                                  # spla from src/ (PYTHONPATH decides)
    git archive BASE src | tar -x -C /tmp/base                          # on the CPU box: the base commit's tree
    PYTHONPATH=/tmp/base/src python3 benchmarks/bench_ab.py base        # same machine, same call

B=1, bf16, block 64, top-16, one representative key; by default T = 64k, HQ/H = 32/8, on AR(1) queries (a real
model's locality, ``inputs.py``) and on random ones. Per data: the query-tile union stage with every tile on the
union kernel (no fallback), ``spla_attn`` forward, and forward+backward (random output gradients), each the median
of ``triton.testing.do_bench``; trees with the TMA key loads (``SPARSE_LAUNCH["union_tma"]``) also time the union
stage, the forward and forward+backward with them on. One line per data set, prefixed ``AB <tag>``, so two runs read
side by side.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inputs import DATA, attention_inputs  # noqa: E402
from spla import spla_attn  # noqa: E402
from spla.ops.spla.linear import feature_map_fwd, global_linear_fwd  # noqa: E402
from spla.ops.spla.parallel import (LINEAR_CHUNK, SPARSE_LAUNCH, _prepare_meta, _topk_tile, block_stats_fwd,  # noqa: E402
                                    select_fwd, sparse_union_fwd)


def bench(fn, rep: int) -> float:
    """Median of do_bench over about ``rep`` ms, at least 10 calls (do_bench alone would run a 60 ms call once)."""
    t = triton.testing.do_bench(fn, warmup=1, rep=1)
    return triton.testing.do_bench(fn, warmup=max(10, 2 * t), rep=max(rep, 10 * t))


def run(tag: str, T: int, HQ: int, H: int, D: int, data: str, bs: int = 64, topk: int = 16) -> dict:
    q, k, v = attention_inputs(1, T, HQ, H, D, data=data)
    opts = dict(block_size=bs, topk=topk, sink_blocks=1, local_blocks=2, rep_keys=1)
    scale = D ** -0.5
    with torch.no_grad():
        qf, kf, vf = q[0], k[0], v[0]
        tile = _topk_tile(bs, HQ // H)
        meta = _prepare_meta((0, T), bs, tile, q.device)
        # the stage functions themselves, not parallel.py's later helpers: this script also runs against older trees
        stats = block_stats_fwd(kf, meta, bs, 1, True)
        idx = select_fwd(qf, stats, meta, H=H, block_size=bs, tile=tile, topk=topk, sink_blocks=1, local_blocks=2,
                         selection="taylor2", rep_keys=1, scale=scale)
        fq, fk = feature_map_fwd(qf, "softmax2", q.dtype), feature_map_fwd(kf, "softmax2", q.dtype)
        glob, gm = global_linear_fwd(fq, fk, vf, meta, LINEAR_CHUNK)
        union = bench(lambda: sparse_union_fwd(qf, kf, vf, fq, fk, glob, gm, idx, meta, tile=tile, max_load=1.0,
                                               block_size=bs, scale=scale), 20)
        fwd = bench(lambda: spla_attn(q, k, v, backend="triton", **opts), 20)
        tma = "union_tma" in SPARSE_LAUNCH  # trees before the TMA key loads have no such setting
        if tma:
            ref = sparse_union_fwd(qf, kf, vf, fq, fk, glob, gm, idx, meta, tile=tile, max_load=1.0, block_size=bs,
                                   scale=scale)
            got = sparse_union_fwd(qf, kf, vf, fq, fk, glob, gm, idx, meta, tile=tile, max_load=1.0, block_size=bs,
                                   scale=scale, tma=True)
            tma_err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, ref))
            union_tma = bench(lambda: sparse_union_fwd(qf, kf, vf, fq, fk, glob, gm, idx, meta, tile=tile,
                                                       max_load=1.0, block_size=bs, scale=scale, tma=True), 20)
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    out = spla_attn(qs, ks, vs, backend="triton", **opts)
    grads = (torch.randn_like(out.o_sparse), torch.randn_like(out.o_rla))
    del out

    def fwd_bwd():
        o = spla_attn(qs, ks, vs, backend="triton", **opts)
        torch.autograd.backward((o.o_sparse, o.o_rla), grads)

    rec = dict(union_ms=union, fwd_ms=fwd, fwd_bwd_ms=bench(fwd_bwd, 10))
    if tma:  # forward and backward with both union kernels on TMA key loads
        saved = dict(SPARSE_LAUNCH)
        SPARSE_LAUNCH.update(union_tma=True, union_bwd_tma=True)
        with torch.no_grad():
            rec["fwd_tma_ms"] = bench(lambda: spla_attn(q, k, v, backend="triton", **opts), 20)
        rec["fwd_bwd_tma_ms"] = bench(fwd_bwd, 10)
        SPARSE_LAUNCH.update(saved)
    print(f"AB {tag} {torch.cuda.get_device_name()} T={T} {HQ}/{H} {data}: union stage (every tile) "
          f"{rec['union_ms']:.2f} ms | forward {rec['fwd_ms']:.2f} ms | forward+backward {rec['fwd_bwd_ms']:.1f} ms"
          + (f" | TMA key loads: union stage {union_tma:.2f} ms (rel. err. {tma_err:.1e}), forward "
             f"{rec['fwd_tma_ms']:.2f} ms, forward+backward {rec['fwd_bwd_tma_ms']:.1f} ms" if tma else ""),
          flush=True)
    torch.cuda.empty_cache()
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tag", help="a name for this tree in the output lines (e.g. new, base)")
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--heads", default="32,8", help="HQ,H")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--data", nargs="+", choices=DATA, default=list(DATA))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    HQ, H = map(int, a.heads.split(","))
    for data in a.data:
        run(a.tag, a.T, HQ, H, a.dim, data)


if __name__ == "__main__":
    main()
