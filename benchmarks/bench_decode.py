# -*- coding: utf-8 -*-
"""One layer's decode step: SPLA (Triton kernels) beside dense decoding over the same cache, same run.

    python benchmarks/bench_decode.py                       # T in 16k..128k, batch 1/8/32, HQ=32 H=8 D=128 bf16
    python benchmarks/bench_decode.py --lengths 131072 --batches 8
    python benchmarks/bench_decode.py --sweep 131072x1 131072x8 --lengths 131072 --batches 1 8
        # first time each kernel's launch settings at those (T x batch), take the fastest, then the table

For each (T, batch): the device-to-device copy bandwidth (measured here), dense SDPA decoding over a
contiguous [B, H, T, D] copy of the cache, FlexAttention decoding (torch.compile) when it compiles, and
the whole SPLA step (scoring, which also writes the new token to the caches; top-k; split-K attention;
combine, which also adds the token to the linear state: four kernels, replayed as a CUDA graph; the graph
also restores ``lengths`` so every replay decodes position T) with the block statistics stored in fp32 and in
bf16 (the default of a bf16 cache; the sweep runs with it), and its stages alone (graphs of scoring / top-k /
split-K attention / combine, fp32 statistics). Bytes each step must
move are counted: SPLA reads the block statistics, the selected K/V/k_lin blocks and the linear state (read
and written back by the combine); dense reads all of K and V. Achieved bandwidth = counted bytes / time.
"""

from __future__ import annotations

import argparse
import torch
import torch.nn.functional as F
import triton
from triton.runtime.errors import OutOfResources

from peers import flex_attention_fn
from spla.ops.spla.decode import SPLADecodeState
from spla.ops.spla.decode_kernels import (LAUNCH, decode_attend, decode_combine, decode_partials, decode_score,
                                         decode_select, decode_topk)
from spla.ops.spla.utils import block_stats, feature_map


def fill_state(B, T, HQ, H, D, bs, topk, dtype, dev, stats_dtype=None):
    """A decode state holding T random tokens per sequence (statistics computed in bulk, as prefill does)."""
    st = SPLADecodeState(B, H, D, block_size=bs, topk=topk, dtype=dtype, device=dev, capacity=T + bs,
                         stats_dtype=stats_dtype, backend="triton")
    g = torch.Generator(device=dev).manual_seed(0)
    for x in (st.k, st.v, st.k_lin):
        x[:, :T] = torch.randn(B, T, H, x.shape[-1], generator=g, device=dev, dtype=dtype)
    nb = T // bs
    for b in range(B):
        s = block_stats(st.k[b, :T], bs, rep_keys=st.rep_keys)
        st.mean[b, :nb], st.second[b, :nb], st.reps[b, :nb] = s.mean, s.second, s.reps
        fk = feature_map(st.k_lin[b, :T], st.fmap)
        st.S[b] = torch.einsum("thf,thd->hfd", fk, st.v[b, :T].float())
        st.z[b] = fk.sum(0)
    st.lengths.fill_(T)
    st.max_length = T
    return st


def spla_bytes(B, T, HQ, H, D, bs, topk, R, elt=2, stats_elt=4):
    """Bytes one SPLA step moves: statistics, selected K/V/k_lin, the state (read + write), q, new token, outputs."""
    nb = T // bs
    stats = B * H * nb * D * stats_elt * (2 + R)
    kv = B * H * topk * bs * (3 * D) * elt  # K, V, k_lin of the selected blocks
    state = 2 * B * H * (2 * D) * (D + 1) * 4  # the combine reads S, z and writes them back
    return stats + kv + state + B * HQ * 4 * D * elt + B * H * 3 * D * elt


def copy_bandwidth(dev, n=1 << 29) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second) of a 512 MiB buffer."""
    x = torch.empty(n, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    return 2 * n / (triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200) * 1e-3)


def graph_us(fn):
    """Median time (us) of ``fn`` captured as a CUDA graph (nan if it cannot be captured)."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return triton.testing.do_bench(g.replay, warmup=10, rep=100) * 1e3
    except Exception as e:  # noqa: BLE001
        print(f"# CUDA graph capture failed: {type(e).__name__}: {e}")
        return float("nan")


#: alternatives timed by --sweep, per stage: the LAUNCH entries each one sets
SWEEP = dict(
    score=[dict(score_tile=t, score_warps=w) for t, w in ((16, 2), (32, 2), (32, 4), (64, 4), (64, 8), (128, 8))]
    + [dict(score_tile=32, score_warps=4, score_tiles_per_program=n) for n in (2, 4, 8)]
    + [dict(score_tile=32, score_warps=w, score_tiles_per_program=n, score_stages=s)
       for n, s, w in ((4, 2, 4), (4, 3, 4), (8, 2, 4), (8, 3, 4), (16, 3, 4), (8, 3, 8))],
    topk=[dict(topk_chunk=c, topk_warps=w) for c, w in ((256, 4), (512, 4), (1024, 4), (1024, 8), (2048, 8))]
    + [dict(topk_split=n, topk_chunk=c, topk_warps=w) for n, c, w in ((4, 512, 4), (8, 256, 4), (16, 128, 4),
                                                                        (8, 256, 8))],
    attn=[dict(attn_split=s, attn_warps=w) for s, w in ((1, 4), (1, 8), (2, 4), (2, 8), (4, 4))]
    + [dict(attn_slices_per_program=n, attn_stages=s, attn_warps=w)
       for n, s, w in ((2, 1, 4), (4, 1, 4), (8, 1, 4), (4, 2, 4), (4, 3, 4), (8, 3, 4), (4, 3, 8))]
    + [dict(attn_lowp=1, attn_warps=w, attn_slices_per_program=n) for w, n in ((4, 1), (8, 1), (4, 4))]
    # a block's two (four) halves (quarters) in one program: the combine keeps top-k partials, the registers
    # of a slice are those of attn_split=2 (4)
    + [dict(attn_split=s, attn_slices_per_program=s, attn_stages=n, attn_warps=w)
       for s, n, w in ((2, 1, 4), (2, 2, 4), (2, 3, 4), (4, 2, 4), (4, 3, 4), (2, 2, 8))],
    comb=[dict(combine_bv=b, combine_warps=w) for b, w in ((16, 2), (16, 4), (32, 4), (64, 4), (64, 8))],
)


def stage_fns(st, q, new):
    """Each kernel of the step alone, on inputs the previous stages made now (``lengths`` already at T + 1; the
    token is written again at every call): {"score", "topk", "attn", "comb"} -> callable."""
    kn, vn, kln = new
    sc = decode_score(st, q, new=new)
    idx = decode_topk(st, *sc)
    parts = decode_partials(st, q, q, idx)
    return dict(score=lambda: decode_score(st, q, new=new), topk=lambda: decode_topk(st, *sc),
                attn=lambda: decode_partials(st, q, q, idx),
                comb=lambda: decode_combine(st, q, parts, q.dtype, new=(kln, vn)))


def sweep(st, q, new, out, stages=tuple(SWEEP)):
    """Each stage alone (a CUDA graph, lengths held at T + 1) under every setting of ``SWEEP``; the other
    settings stay at their defaults; the "attn" settings are timed with the combine after them (attention +
    combine). Returns {stage: [(setting, us)]}."""
    _, vn, kln = new
    base = dict(LAUNCH)
    res = {}
    st.lengths.add_(1)
    try:
        for stage in stages:
            settings = SWEEP[stage]
            res[stage] = []
            for cfg in settings:
                LAUNCH.update(base)
                LAUNCH.update(cfg)
                try:
                    fns = stage_fns(st, q, new)
                except OutOfResources as e:  # e.g. a tile whose pipeline stages exceed shared memory
                    print(f"#   {stage:>5} {cfg}: does not fit ({str(e).splitlines()[0]})", file=out, flush=True)
                    continue
                if stage == "attn":  # the split changes the combine's work too (topk x split partials): time both
                    def fn(attn=fns["attn"]):
                        return decode_combine(st, q, attn(), q.dtype, new=(kln, vn))
                else:
                    fn = fns[stage]
                us = graph_us(fn)
                if us != us:  # nan: capture failed (printed)
                    continue
                res[stage].append((cfg, us))
                print(f"#   {stage:>5} {cfg}: {us:.1f} us", file=out, flush=True)
    finally:
        LAUNCH.update(base)
        st.lengths.sub_(1)
    return res


def tune(shapes, HQ, H, D, bs, topk, dtype, dev, stages=tuple(SWEEP)):
    """--sweep: time every setting at each ``TxB`` shape, print the table, set LAUNCH to the fastest in total."""
    import sys
    total, seen = {}, {}  # per setting: time summed over the shapes, shapes where it ran
    print(f"{'T':>7} {'B':>3} {'stage':>6} {'default us':>10} {'best us':>8}  best setting")
    for shape in shapes:
        T, B = (int(x) for x in shape.lower().split("x"))
        q = torch.randn(B, HQ, D, device=dev, dtype=dtype)
        new = tuple(torch.randn(B, H, D, device=dev, dtype=dtype) for _ in range(3))
        st = fill_state(B, T, HQ, H, D, bs, topk, dtype, dev)
        for stage, rs in sweep(st, q, new, sys.stdout, stages).items():
            cfg, us = min(rs, key=lambda r: r[1])
            default = next((u for c, u in rs if all(LAUNCH[k] == v for k, v in c.items())), float("nan"))
            print(f"{T:>7} {B:>3} {stage:>6} {default:>10.1f} {us:>8.1f}  {cfg}", flush=True)
            for c, u in rs:
                key = (stage, tuple(sorted(c.items())))
                total[key] = total.get(key, 0.0) + u
                seen[key] = seen.get(key, 0) + 1
        st = None
        torch.cuda.empty_cache()
    for stage in stages:
        key = min((k for k in total if k[0] == stage and seen[k] == len(shapes)), key=lambda k: total[k])
        LAUNCH.update(dict(key[1]))
    print(f"# launch settings used below (least total time over {' '.join(shapes)}): {LAUNCH}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "H"))
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--sweep", nargs="+", default=[], metavar="TxB",
                   help="first time each kernel alone under every launch setting of SWEEP at these (T x batch), "
                        "e.g. 131072x8; per kernel the setting with the least total time is used for the table "
                        "(LAUNCH in decode_kernels.py holds the defaults)")
    p.add_argument("--sweep-stages", nargs="+", default=list(SWEEP), choices=list(SWEEP),
                   help="the kernels --sweep times (default: all)")
    p.add_argument("--graph-layers", type=int, default=0, metavar="N",
                   help="also time N layers' steps (N caches) in one CUDA graph, SPLA and dense alike, and report "
                        "the time per layer: how a model's decode graph runs them, without the per-replay launch "
                        "latency that a one-layer graph pays (default 0: off)")
    p.add_argument("--launch", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override LAUNCH entries for this run, e.g. attn_split=2 combine_bv=16")
    a = p.parse_args()
    for kv in a.launch:
        key, val = kv.split("=")
        if key not in LAUNCH:
            p.error(f"unknown launch setting {key!r}; known: {', '.join(LAUNCH)}")
        LAUNCH[key] = int(val)
    dev, dtype = "cuda", torch.bfloat16
    HQ, H = a.heads
    D, bs, topk = a.dim, a.block_size, a.topk
    name = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth(dev)
    print(f"# {name}; device-to-device copy {copy_bw / 1e12:.2f} TB/s; HQ={HQ} H={H} D={D} bf16, SPLA block {bs} "
          f"top{topk}; launch {LAUNCH}")
    tiny = torch.zeros(HQ * D, device=dev)
    print(f"# measurement floor: a graph of one tiny kernel {graph_us(lambda: tiny.add_(1)):.1f} us, of four "
          f"{graph_us(lambda: [tiny.add_(1) for _ in range(4)]):.1f} us (the same timer as every column)")
    if a.sweep:
        tune(a.sweep, HQ, H, D, bs, topk, dtype, dev, a.sweep_stages)
    flex = None
    if not a.no_flex:
        try:
            flex = flex_attention_fn()  # recompile limit raised: one compiled kernel per (T, batch)
        except Exception as e:  # noqa: BLE001
            print(f"# FlexAttention unavailable: {e}")
    hdr = (f"{'T':>7} {'B':>3} {'dense us':>9} {'dense TB/s':>10} {'flex us':>8} {'score':>7} {'topk':>7} "
           f"{'attn':>7} {'comb':>7} {'step us':>8} {'x dense':>8} {'MB':>7} {'TB/s':>6} {'%copy':>6} {'bf16st us':>9} "
           f"{'x dense':>8} {'MB':>7} {'%copy':>6}")
    print(hdr)
    rows = []
    for T in a.lengths:
        for B in a.batches:
            row = dict(T=T, B=B)
            q = torch.randn(B, HQ, D, device=dev, dtype=dtype)
            kn, vn, kln = (torch.randn(B, H, D, device=dev, dtype=dtype) for _ in range(3))
            for tag, sdt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):  # bf16: the default of a bf16 cache
                try:
                    st = fill_state(B, T, HQ, H, D, bs, topk, dtype, dev, stats_dtype=sdt)
                except torch.cuda.OutOfMemoryError:
                    print(f"{T:>7} {B:>3}  out of memory building the cache")
                    torch.cuda.empty_cache()
                    break
                if tag == "fp32":
                    kd = st.k[:, :T].transpose(1, 2).contiguous()  # dense baseline's own contiguous copy
                    vd = st.v[:, :T].transpose(1, 2).contiguous()
                    qd = q[:, :, None]
                    row["dense_us"] = triton.testing.do_bench(
                        lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True), warmup=10, rep=100) * 1e3
                    row["flex_us"] = float("nan")
                    if flex is not None:
                        try:
                            row["flex_us"] = triton.testing.do_bench(
                                lambda: flex(qd, kd, vd, enable_gqa=True), warmup=10, rep=100) * 1e3
                        except Exception as e:  # noqa: BLE001
                            print(f"# FlexAttention failed at T={T} B={B}: {type(e).__name__}")
                            flex = None
                    del kd, vd

                def step():
                    st.lengths.add_(1)  # the new token is position T; the graph restores lengths after the step
                    out = decode_attend(st, q, q, decode_select(st, q, new=(kn, vn, kln)), new=(kln, vn))
                    st.lengths.sub_(1)
                    return out

                row[f"step_{tag}"] = graph_us(step)
                if tag == "fp32":  # each stage alone, lengths held at T + 1 (the token written again each replay)
                    st.lengths.add_(1)
                    row.update({k: graph_us(f) for k, f in stage_fns(st, q, (kn, vn, kln)).items()})
                    st.lengths.sub_(1)
                row[f"mb_{tag}"] = spla_bytes(B, T, HQ, H, D, bs, topk, st.rep_keys,
                                              stats_elt=4 if sdt is None else 2) / 1e6
                st = None  # free the cache before the next one
                torch.cuda.empty_cache()
            if "step_bf16" not in row:
                continue
            db = B * H * T * 2 * D * 2
            row["dense_tbs"] = db / row["dense_us"] / 1e6
            for tag in ("fp32", "bf16"):
                row[f"x_{tag}"] = row["dense_us"] / row[f"step_{tag}"]
                row[f"tbs_{tag}"] = row[f"mb_{tag}"] / row[f"step_{tag}"]
                row[f"copy_{tag}"] = 100 * row[f"tbs_{tag}"] * 1e12 / copy_bw
            if a.graph_layers:
                row.update(layers_us(a.graph_layers, B, T, HQ, H, D, bs, topk, dtype, dev))
            rows.append(row)
            print(f"{T:>7} {B:>3} {row['dense_us']:>9.1f} {row['dense_tbs']:>10.2f} {row['flex_us']:>8.1f} "
                  f"{row['score']:>7.1f} {row['topk']:>7.1f} {row['attn']:>7.1f} "
                  f"{row['comb']:>7.1f} {row['step_fp32']:>8.1f} "
                  f"{row['x_fp32']:>8.2f} {row['mb_fp32']:>7.1f} {row['tbs_fp32']:>6.2f} {row['copy_fp32']:>5.0f}% "
                  f"{row['step_bf16']:>9.1f} {row['x_bf16']:>8.2f} {row['mb_bf16']:>7.1f} {row['copy_bf16']:>5.0f}%",
                  flush=True)
    if a.graph_layers:
        print(f"# per layer inside one CUDA graph of {a.graph_layers} layers (distinct caches; bf16 statistics); "
              f"% copy: SPLA's counted bytes per layer time over the copy bandwidth")
        print(f"{'T':>7} {'B':>3} {'dense us':>9} {'SPLA us':>8} {'x dense':>8} {'TB/s':>6} {'%copy':>6}")
        for row in rows:
            if "layer_spla_us" not in row:
                print(f"{row['T']:>7} {row['B']:>3}  {row.get('layer_note', 'not run')}")
                continue
            tbs = row["mb_bf16"] / row["layer_spla_us"]
            print(f"{row['T']:>7} {row['B']:>3} {row['layer_dense_us']:>9.1f} {row['layer_spla_us']:>8.1f} "
                  f"{row['layer_dense_us'] / row['layer_spla_us']:>8.2f} {tbs:>6.2f} {100 * tbs * 1e12 / copy_bw:>5.0f}%")
    return rows


def layers_us(n, B, T, HQ, H, D, bs, topk, dtype, dev) -> dict:
    """Per-layer time of ``n`` layers' decode steps captured in one CUDA graph (each layer its own cache, so
    nothing one layer reads is cached for the next), for SPLA (bf16 statistics, the default of a bf16 cache)
    and for dense SDPA over contiguous copies: what one layer costs inside a model's decode graph."""
    states, dense = [], []
    try:
        for i in range(n):
            st = fill_state(B, T, HQ, H, D, bs, topk, dtype, dev, stats_dtype=torch.bfloat16)
            dense.append((st.k[:, :T].transpose(1, 2).contiguous(), st.v[:, :T].transpose(1, 2).contiguous()))
            states.append(st)
    except torch.cuda.OutOfMemoryError:
        states = dense = None
        torch.cuda.empty_cache()
        return dict(layer_note=f"out of memory building {n} caches")
    q = torch.randn(n, B, HQ, D, device=dev, dtype=dtype)
    new = torch.randn(n, 3, B, H, D, device=dev, dtype=dtype)

    def spla():
        for i, st in enumerate(states):
            kn, vn, kln = new[i]
            st.lengths.add_(1)
            decode_attend(st, q[i], q[i], decode_select(st, q[i], new=(kn, vn, kln)), new=(kln, vn))
            st.lengths.sub_(1)

    def dense_fn():
        for i, (kd, vd) in enumerate(dense):
            F.scaled_dot_product_attention(q[i][:, :, None], kd, vd, enable_gqa=True)

    out = dict(layer_spla_us=graph_us(spla) / n, layer_dense_us=graph_us(dense_fn) / n)
    states = dense = None
    torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    main()
