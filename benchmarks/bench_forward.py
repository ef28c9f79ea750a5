# -*- coding: utf-8 -*-
"""Forward benchmark of SPLA's Triton backend beside torch SDPA (flash), FlexAttention and fla's ``parallel_nsa``.

    python benchmarks/bench_forward.py [--T 4096 8192 ...] [--heads 32,8 64,4] [--out DIR]
    python benchmarks/bench_forward.py --sweep-sparse --T 65536   # the sparse stage's launch settings only
    python benchmarks/bench_forward.py --data local ...             # queries with a real model's locality

B=1, bf16, block 64, top-16 (sink 1, local 2, taylor2 diag, 1 representative key, softmax2), random data
(``--data random``: N(0, 1); ``--data local``: AR(1) queries whose selection is as local as SmolLM2's, k, v N(0, 1),
``benchmarks/inputs.py``),
``triton.testing.do_bench`` medians. Per stage: block statistics, selection (scoring + top-k), global linear
attention (feature maps + chunked state), sparse attention with the fused selected-linear term and residual.
FLOPs are counted from the actual selection (keys visited, candidates scored); the floor is
``max(FLOPs / matmul rate, minimal bytes / copy bandwidth)`` with both ceilings measured in the same run.
``topk_attn``: SPLA's top-k branch alone (no linear branch). FlexAttention: compiled ``flex_attention`` under a causal block-sparse mask of the same token budget, given in
advance and shared by each 128-query block (``benchmarks/peers.py``); ``sparse_vs_flex`` = our sparse stage / it.
``sparse_union_ms``: the query-tile union stage (``SPARSE_PATH="union"``), with ``union_blocks`` the mean union of
selected blocks per tile on this data, ``union_tiles`` the fraction of (tile, KV head) pairs under the fallback
threshold ``UNION_MAX_LOAD`` (the rest run per token), ``sparse_union_all_ms`` the time without the fallback and
``sparse_union_half_ms`` with the threshold at 0.5. ``select_ms`` scores fp32 statistics; ``spla_attn`` (``total_ms``)
scores 16-bit ones for 16-bit inputs (``STATS_16BIT``), timed as ``select_stats16_ms``.
``sparse_ms`` is the stage ``spla_attn`` runs (``sparse_path``: since the fourth session of 2026-12-05 the union
stage for groups under 8), ``sparse_alt_ms`` the KV-major path beside it (for G < 8 the union stage's fallback,
for G >= 8 the layout "auto" does not take).
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import sys
import traceback

import torch
import torch.nn.functional as F
import triton

from inputs import DATA, attention_inputs
from peers import flex_attention_fn, flex_block_mask, flex_block_sparse
from spla import spla_attn, topk_attn
from spla.ops.spla.chunk import selected_token_count
from spla.ops.spla.parallel import (LINEAR_CHUNK, UNION_MAX_LOAD, _dense_path, _prepare_meta, _sparse_path,
                                    _tile_unions, _topk_tile, block_stats_fwd, dense_fwd, linear_branch_fwd, select_fwd,
                                    select_packed_fwd, sparse_fwd, sparse_kv_fwd, sparse_union_fwd)

BS, TOPK, SINK, LOCAL, R = 64, 16, 1, 2, 1


def bench(fn, rep=100):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def ceilings():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    flops = 2 * 8192 ** 3 / ms / 1e9  # TFLOP/s
    x = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    bw = 2 * x.numel() * 2 / ms / 1e9  # TB/s (read + write)
    del a, b, x, y
    torch.cuda.empty_cache()
    return flops, bw


def count(T, HQ, H, D, Dv, Fd, indices):
    """FLOPs of each stage from the selection actually made, and the minimal bytes of the whole op."""
    G = HQ // H
    keys = selected_token_count(indices, BS, None).sum().item() * G  # (token, query head, key) triples
    sparse_attn = keys * (2 * D + 2 * Dv)
    sparse_lin = keys * (2 * Fd + 2 * Dv)
    t = torch.arange(T, device=indices.device)
    c = t // BS
    n_forced = torch.clamp(c + 1, max=SINK) + (c - torch.clamp(c - LOCAL + 1, min=SINK) + 1).clamp(min=0)
    n_cand = (c - LOCAL + 1 - SINK).clamp(min=0)
    scored = torch.where(n_cand > TOPK - n_forced, n_cand, 0).sum().item() * HQ
    passes = 2 if G > 1 else 1
    select = scored * 2 * D * (2 + R) * passes
    glob = T * HQ * (2 * Fd * Dv + 2 * LINEAR_CHUNK * (Fd + Dv)) + T * H * 2 * Fd * Dv
    bytes_min = 2 * (T * HQ * D + T * H * (D + Dv) + 2 * T * HQ * Dv) + 4 * T * HQ + 4 * T * H * TOPK
    return dict(sparse_attn=sparse_attn, sparse_lin=sparse_lin, select=select, glob=glob, bytes=bytes_min)


#: scoring-chunk widths timed beside the default (``select_fwd(chunk=...)``)
SELECT_CHUNKS = (16, 32, 64)


def run_one(T, HQ, H, D, peak, bw, rows, data="random"):
    dt = torch.bfloat16
    q, k, v = attention_inputs(1, T, HQ, H, D, data=data, dtype=dt)
    G = HQ // H
    scale = D ** -0.5
    rec = dict(T=T, HQ=HQ, H=H, D=D, data=data)
    opts = dict(block_size=BS, topk=TOPK, sink_blocks=SINK, local_blocks=LOCAL, rep_keys=R)
    with torch.no_grad():
        total = bench(lambda: spla_attn(q, k, v, backend="triton", **opts))
        # the stages alone
        qf, kf, vf = q[0], k[0], v[0]
        tile = _topk_tile(BS, G)
        meta = _prepare_meta((0, T), BS, tile, q.device)
        stats = block_stats_fwd(kf, meta, BS, R, True)
        sel = dict(H=H, block_size=BS, tile=tile, topk=TOPK, sink_blocks=SINK, local_blocks=LOCAL,
                   selection="taylor2", rep_keys=R, scale=scale)
        idx = select_fwd(qf, stats, meta, **sel)
        fq, fk, glob, gm = linear_branch_fwd(qf, kf, vf, meta, "softmax2", dt)
        rec["stats_ms"] = bench(lambda: block_stats_fwd(kf, meta, BS, R, True))
        rec["select_ms"] = bench(lambda: select_fwd(qf, stats, meta, **sel))
        rec["linear_ms"] = bench(lambda: linear_branch_fwd(qf, kf, vf, meta, "softmax2", dt))
        rec["select_nomerge_ms"] = bench(lambda: select_fwd(qf, stats, meta, merge=False, **sel))
        # the selection at the other warp count than its default (kernel_resources.py: with 32-block chunks, the
        # default for G >= 16, 4 warps spill 72 bytes per thread and 8 do not)
        alt_w = 4 if tile * triton.next_power_of_2(G) >= 128 else 8
        rec["select_alt_warps"] = alt_w
        rec["select_alt_warps_ms"] = bench(lambda: select_fwd(qf, stats, meta, num_warps=alt_w, **sel))
        # bf16 statistics (parallel.STATS_16BIT): the time, and whether the selection is the same bit for bit
        stats16 = block_stats_fwd(kf, meta, BS, R, True, torch.bfloat16)
        rec["select_stats16_ms"] = bench(lambda: select_fwd(qf, stats16, meta, **sel))
        rec["select_stats16_same"] = bool(torch.equal(select_fwd(qf, stats16, meta, **sel), idx))
        del stats16
        for c in SELECT_CHUNKS:  # wider scoring chunks (parallel.TOPK_CHUNK): time, and how many (token, KV head)
            # rows select other blocks (near-equal scores may order differently when the dot tile changes)
            rec[f"select_c{c}_ms"] = bench(lambda c=c: select_fwd(qf, stats, meta, chunk=c, **sel))
            other = select_fwd(qf, stats, meta, chunk=c, **sel)
            rec[f"select_c{c}_rows_diff"] = (other != idx).any(-1).float().mean().item()
            rec[f"select_c{c}_slots_diff"] = (other != idx).float().mean().item()
        sp = dict(block_size=BS, scale=scale)
        # the sparse stage spla_attn runs (SPARSE_PATH "auto": the union stage for G < 8), and beside it the
        # per-token layout: for G < 8 the union stage's fallback (KV-major), else the one auto does not take
        path = _sparse_path(G)
        per_token = dict(kv=sparse_kv_fwd, token=sparse_fwd)
        if path == "union":
            main_fn, alt_fn = sparse_union_fwd, per_token[_dense_path(G)]
        else:
            main_fn, alt_fn = per_token[path], per_token["kv" if path == "token" else "token"]
        rec["sparse_path"] = path
        rec["sparse_ms"] = bench(lambda: main_fn(qf, kf, vf, fq, fk, glob, gm, idx, meta, **sp))
        rec["sparse_attn_only_ms"] = bench(lambda: main_fn(qf, kf, vf, fq, fk, glob, gm, idx, meta, lin=False, **sp))
        rec["sparse_alt_ms"] = bench(lambda: alt_fn(qf, kf, vf, fq, fk, glob, gm, idx, meta, **sp), rep=50)
        # the query-tile union stage (parallel.SPARSE_PATH="union"): its time, and the mean union per tile in
        # blocks (random data: adjacent tokens share only the forced blocks; see bench_locality.py), the fraction
        # of (tile, KV head) pairs the union kernel serves (the others run on `path`), and without the fallback
        rec["sparse_union_ms"] = bench(lambda: sparse_union_fwd(qf, kf, vf, fq, fk, glob, gm, idx, meta, tile=tile, **sp),
                                       rep=20)
        ucount = _tile_unions(idx, meta, tile)[1]
        rec["union_blocks"] = ucount.float().mean().item()
        rec["union_tiles"] = (ucount <= UNION_MAX_LOAD * tile * TOPK).float().mean().item()
        rec["sparse_union_all_ms"] = bench(lambda: sparse_union_fwd(qf, kf, vf, fq, fk, glob, gm, idx, meta, tile=tile,
                                                                    max_load=1.0, **sp), rep=20)
        # a looser threshold: for G >= 8 (4-token tiles, unions of about 21 blocks on AR(1) data, about 55 on
        # random data) 0.5 would keep local tiles on the union and send random ones per token
        rec["sparse_union_half_ms"] = bench(lambda: sparse_union_fwd(qf, kf, vf, fq, fk, glob, gm, idx, meta,
                                                                     tile=tile, max_load=0.5, **sp), rep=20)
        if T <= TOPK * BS:
            rec["dense_kernels_ms"] = bench(lambda: dense_fwd(q, k, v, block_size=BS, topk=TOPK, scale=scale))
        rec["total_ms"] = total
        # the top-k branch alone (spla.topk_attn: no linear branch), the NSA / MoBA-style baseline
        rec["topk_attn_ms"] = bench(lambda: topk_attn(q, k, v, backend="triton", **opts))
        cnt = count(T, HQ, H, D, D, fk.shape[-1], idx.view(1, T, H, TOPK))
        del fq, fk, glob, gm, stats
        flops = cnt["sparse_attn"] + cnt["sparse_lin"] + cnt["select"] + cnt["glob"]
        rec["tflop"] = flops / 1e12
        rec["tflops"] = flops / total / 1e9
        floor = max(flops / (peak * 1e9), cnt["bytes"] / (bw * 1e9))
        rec["floor_ms"] = floor
        rec["floor_frac"] = floor / total
        # SDPA causal with the backend torch picks (cuDNN attention on Hopper: 56 ms at 64k, 32 heads, on an H100,
        # against 109 ms for the flash backend, which older runs forced and reported as "SDPA"; the flash backend
        # stays as its own column), K/V expanded to the query heads outside the timing
        qt = q.transpose(1, 2).contiguous()
        kt = k.repeat_interleave(G, 2).transpose(1, 2).contiguous()
        vt = v.repeat_interleave(G, 2).transpose(1, 2).contiguous()
        from torch.nn.attention import SDPBackend, sdpa_kernel
        rec["sdpa_ms"] = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            rec["sdpa_flash_ms"] = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
        rec["sdpa_tflops"] = 4 * T * T / 2 * D * HQ / rec["sdpa_ms"] / 1e9
        del kt, vt
        rec["speedup_sdpa"] = rec["sdpa_ms"] / total
        rec["flex_ms"] = float("nan")
        try:
            mask = flex_block_mask(T, 128, TOPK * BS // 128, device="cuda")
            fx = flex_attention_fn()
            rec["flex_ms"] = bench(lambda: flex_block_sparse(fx, q, k, v, mask, scale))
        except Exception:
            traceback.print_exc()
        rec["sparse_vs_flex"] = rec["sparse_ms"] / rec["flex_ms"]
        rec["nsa_ms"] = float("nan")
        if G >= 16 and G & (G - 1) == 0:
            try:
                from fla.ops.nsa import parallel_nsa
                g_cmp = torch.rand(1, T, HQ, device="cuda", dtype=dt)
                g_slc = torch.rand(1, T, HQ, device="cuda", dtype=dt)
                rec["nsa_ms"] = bench(lambda: parallel_nsa(q, k, v, g_cmp=g_cmp, g_slc=g_slc, block_counts=TOPK,
                                                           block_size=BS, scale=scale))
            except Exception:
                traceback.print_exc()
        rec["speedup_nsa"] = rec["nsa_ms"] / total
    rows.append(rec)
    print(" ".join(f"{n}={x:.4g}" if isinstance(x, float) else f"{n}={x}" for n, x in rec.items()), flush=True)
    torch.cuda.empty_cache()


COLS = ["T", "HQ", "H", "data", "stats_ms", "select_ms", "sparse_ms", "linear_ms", "total_ms", "sdpa_ms", "sdpa_flash_ms",
        "nsa_ms",
        "flex_ms", "topk_attn_ms", "speedup_sdpa", "speedup_nsa", "sparse_vs_flex", "tflops", "floor_ms", "floor_frac", "select_nomerge_ms",
        "select_stats16_ms", "select_stats16_same", "select_alt_warps", "select_alt_warps_ms",
        *(f"select_c{c}_{x}" for c in SELECT_CHUNKS for x in ("ms", "rows_diff", "slots_diff")),
        "sparse_path", "sparse_attn_only_ms", "sparse_alt_ms", "sparse_union_ms", "union_blocks", "union_tiles",
        "sparse_union_all_ms", "sparse_union_half_ms", "dense_kernels_ms"]


#: launch settings timed by --sweep-sparse (parallel.SPARSE_LAUNCH holds the defaults)
#: (a first sweep on an H200 at 64k also tried 32 rows, 3 stages and the token path with 8 warps or 1 / 3 stages:
#: none beat the defaults; docs/benchmarks.md). ``lin_atomic``: the KV-major path's deterministic=False
SPARSE_SWEEP = {"kv": [dict(rows=r, num_warps=w, lin_atomic=a) for a in (False, True) for r in (64, 128)
                       for w in (4, 8)],
                # keys per sub-tile (bk): 32 and 16 halve / quarter the shared memory of a pipeline stage, so 3-4
                # programs fit on an SM instead of 2 (kernel_resources.py); not yet timed
                "token": [dict(num_warps=4, num_stages=2)] + [dict(bk=b, num_warps=4, num_stages=st)
                                                              for b, st in ((32, 2), (32, 4), (16, 3), (16, 4))]
                         # key sub-tiles as TMA bulk copies (SPARSE_LAUNCH["token_tma"])
                         + [dict(num_warps=4, num_stages=st, tma=True) for st in (2, 3)]
                         + [dict(bk=32, num_warps=4, num_stages=2, tma=True)],
                # the union stage: warps / stages, the fallback threshold, the union tile (``tile_x``: times the
                # selection's tile, 16 tokens for G = 4, 4 for G = 16) and keys per sub-tile
                "union": [dict(num_warps=8, num_stages=2, max_load=m) for m in (0.5, 0.25, 1.0)]
                         + [dict(num_warps=w, num_stages=st) for w, st in ((4, 2), (8, 1), (4, 1))]
                         + [dict(tile_x=x, num_warps=w) for x in (0.5, 0.25, 2) for w in (4, 8)]
                         + [dict(bk=32, num_warps=w, num_stages=st) for w, st in ((4, 2), (8, 2), (8, 3))]
                         # the two that won on an H100 (AR(1) data, 64k, 32/8), combined and around
                         + [dict(bk=32, num_warps=4, num_stages=st) for st in (1, 3)]
                         + [dict(tile_x=x, bk=32, num_warps=4, num_stages=st) for x, st in ((0.5, 2), (0.5, 3), (2, 2))]
                         + [dict(tile_x=0.5, num_warps=4, num_stages=st) for st in (1, 3)]
                         # the fallback threshold with the fastest setting on AR(1) data (bk 32, 4 warps, 2 stages)
                         + [dict(bk=32, num_warps=4, num_stages=2, max_load=m) for m in (0.125, 0.25, 0.5, 1.0)]
                         # key sub-tiles as TMA bulk copies (SPARSE_LAUNCH["union_tma"]), every tile on the union
                         # kernel: against the max_load=1.0 setting just above
                         + [dict(bk=32, num_warps=4, num_stages=st, max_load=1.0, tma=True) for st in (2, 3)]
                         + [dict(bk=64, num_warps=4, num_stages=2, max_load=1.0, tma=True)]}


def sweep_setting(setting: dict, tile: int, G: int):
    """One SPARSE_SWEEP entry as keyword arguments of its stage (``tile_x`` resolved against the selection's tile),
    or None when it falls below the union kernel's 16 rows (tokens x padded group heads)."""
    st = dict(setting)
    if "tile_x" in st:
        st["tile"] = int(tile * st.pop("tile_x"))
        if st["tile"] * triton.next_power_of_2(G) < 16:
            return None
    return st


def sweep_sparse(T, HQ, H, D, data="random", quick=False):
    """Time the sparse stages (KV-major, token-major, query-tile union) under each setting of SPARSE_SWEEP
    (``quick``: the KV-major path at its first setting only, the token-major one at its first and its TMA ones, the
    union stage at its last nine: the fallback thresholds and the TMA loads)."""
    dt = torch.bfloat16
    q, k, v = (x[0] for x in attention_inputs(1, T, HQ, H, D, data=data, dtype=dt))
    G, scale = HQ // H, D ** -0.5
    tile = _topk_tile(BS, G)
    meta = _prepare_meta((0, T), BS, tile, q.device)
    out = []
    with torch.no_grad():
        idx = select_packed_fwd(q, k, meta, H=H, block_size=BS, tile=tile, topk=TOPK, sink_blocks=SINK,
                                local_blocks=LOCAL, selection="taylor2", rep_keys=R, scale=scale)
        fq, fk, glob, gm = linear_branch_fwd(q, k, v, meta, "softmax2", dt)
        ref = None
        union = functools.partial(sparse_union_fwd, tile=tile)
        for path, fn in (("kv", sparse_kv_fwd), ("token", sparse_fwd), ("union", union)):
            settings = SPARSE_SWEEP[path]
            if quick:
                settings = dict(union=settings[-9:], token=settings[:1] + settings[-3:]).get(path, settings[:1])
            for st in settings:
                st = sweep_setting(st, tile, G)
                if st is None:
                    continue
                atomic = st.pop("lin_atomic", False)
                if path == "kv":
                    st["deterministic"] = not atomic
                run = lambda: fn(q, k, v, fq, fk, glob.clone(), gm.clone(), idx, meta, block_size=BS, scale=scale, **st)
                try:
                    o = run()[1]  # o_rla: the residual, where the selected linear terms land
                    ms = bench(run, rep=50)
                except triton.runtime.errors.OutOfResources as e:  # a setting the GPU cannot hold
                    print(f"T={T} HQ={HQ} H={H} {path} {st}: does not fit ({e})", flush=True)
                    continue
                finally:
                    st.pop("deterministic", None)
                    st["lin_atomic"] = atomic if path == "kv" else ""
                ref = o if ref is None else ref
                err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
                out.append(dict(T=T, HQ=HQ, H=H, data=data, path=path, **st, ms=ms, rel_err_vs_first=err))
                print(" ".join(f"{n}={x:.4g}" if isinstance(x, float) else f"{n}={x}" for n, x in out[-1].items()),
                      flush=True)
        # the clone of glob / glob_mass (the KV-major path subtracts in place) is inside every timing: time it alone
        out.append(dict(T=T, HQ=HQ, H=H, data=data, path="clone_only", ms=bench(lambda: (glob.clone(), gm.clone()), rep=50)))
        print(out[-1], flush=True)
    del q, k, v, fq, fk, glob, gm
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep-sparse", action="store_true",
                    help="only time the sparse stage's launch settings (SPARSE_SWEEP) at the given T and heads")
    ap.add_argument("--sweep-quick", action="store_true",
                    help="with --sweep-sparse: the KV-major path at its default only, the token-major one at its "
                         "default and TMA settings, the union stage at the last nine settings of SPARSE_SWEEP "
                         "(fallback thresholds, TMA key loads)")
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--heads", type=str, nargs="+", default=["32,8", "64,4"])
    ap.add_argument("--data", choices=DATA, default="random",
                    help="random: N(0, 1) q, k, v; local: AR(1) queries with a real model's selection locality "
                         "(benchmarks/inputs.py)")
    ap.add_argument("--out", type=str, default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    peak, bw = ceilings()
    name = torch.cuda.get_device_name()
    print(f"# {name}: bf16 matmul {peak:.0f} TFLOP/s, copy {bw:.2f} TB/s; torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)
    rows = []
    if args.sweep_sparse:
        for hs in args.heads:
            HQ, H = map(int, hs.split(","))
            for T in args.T:
                rows += sweep_sparse(T, HQ, H, 128, args.data, args.sweep_quick)
        lines = [f"GPU: {name}, data: {args.data}", "",
                 "| T | HQ/H | path | rows | union tile | keys per sub-tile | warps | stages | lin atomic | union max load "
                 "| ms | o_rla rel. err vs first |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['T']} | {r['HQ']}/{r['H']} | {r['path']} | {r.get('rows', '')} | {r.get('tile', '')} | "
                  f"{r.get('bk', '')} | {r.get('num_warps', '')} | {r.get('num_stages', '')} | {r.get('lin_atomic', '')} "
                  f"| {r.get('max_load', '')} | {r['ms']:.2f} | {r.get('rel_err_vs_first', 0):.1e} |" for r in rows]
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "sweep_sparse.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    for hs in args.heads:
        HQ, H = map(int, hs.split(","))
        for T in args.T:
            try:
                run_one(T, HQ, H, 128, peak, bw, rows, args.data)
            except Exception:
                traceback.print_exc()
                torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_forward.csv"), "w", newline="") as f:
        names = []
        for r in rows:
            names += [c for c in r if c not in names]
        w = csv.DictWriter(f, fieldnames=names or COLS)
        w.writeheader()
        w.writerows(rows)
    lines = [f"GPU: {name} (bf16 matmul {peak:.0f} TFLOP/s, copy {bw:.2f} TB/s measured in this run)", "",
             "| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                       for c in COLS) + " |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "bench_forward.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    sys.exit(main())
