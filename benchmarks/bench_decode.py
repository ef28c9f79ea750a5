# -*- coding: utf-8 -*-
"""One layer's decode step: SPLA (Triton kernels) beside dense decoding over the same cache, same run.

    python benchmarks/bench_decode.py                       # T in 16k..128k, batch 1/8/32, HQ=32 H=8 D=128 bf16
    python benchmarks/bench_decode.py --lengths 131072 --batches 8

For each (T, batch): the device-to-device copy bandwidth (measured here), dense SDPA decoding over a
contiguous [B, H, T, D] copy of the cache, FlexAttention decoding (torch.compile) when it compiles, and
the SPLA step (selection + attention + combine; eager and as a CUDA graph). Bytes each step must read are
counted: SPLA reads the block statistics, the selected K/V/k_lin blocks and the linear state; dense reads
all of K and V. Achieved bandwidth = counted bytes / time.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
import triton

from spla.ops.spla.decode import SPLADecodeState
from spla.ops.spla.decode_kernels import decode_attend, decode_select
from spla.ops.spla.utils import block_stats, feature_map


def fill_state(B, T, HQ, H, D, bs, topk, dtype, dev):
    """A decode state holding T random tokens per sequence (statistics computed in bulk, as prefill does)."""
    st = SPLADecodeState(B, H, D, block_size=bs, topk=topk, dtype=dtype, device=dev, capacity=T + bs,
                         backend="triton")
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
    return st


def spla_bytes(B, T, HQ, H, D, bs, topk, R, elt=2):
    nb = T // bs
    stats = B * H * nb * D * 4 * (2 + R)
    kv = B * H * topk * bs * (3 * D) * elt  # K, V, k_lin of the selected blocks
    state = B * H * (2 * D) * (D + 1) * 4
    return stats + kv + state + B * HQ * 2 * D * elt


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "H"))
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    a = p.parse_args()
    dev, dtype = "cuda", torch.bfloat16
    HQ, H = a.heads
    D, bs, topk = a.dim, a.block_size, a.topk
    name = torch.cuda.get_device_name()
    x = torch.empty(1 << 29, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    t_copy = triton.testing.do_bench(lambda: y.copy_(x), warmup=25, rep=200)
    copy_bw = 2 * x.numel() / (t_copy * 1e-3)
    del x, y
    print(f"# {name}; device-to-device copy {copy_bw / 1e12:.2f} TB/s; HQ={HQ} H={H} D={D} bf16, SPLA block {bs} "
          f"top{topk}")
    flex = None
    if not a.no_flex:
        try:
            from torch.nn.attention.flex_attention import flex_attention
            flex = torch.compile(flex_attention, dynamic=False)
        except Exception as e:  # noqa: BLE001
            print(f"# FlexAttention unavailable: {e}")
    hdr = (f"{'T':>7} {'B':>3} {'dense us':>9} {'dense TB/s':>10} {'flex us':>8} {'spla us':>8} {'graph us':>9} "
           f"{'x dense':>8} {'spla MB':>8} {'spla TB/s':>9} {'% copy':>7}")
    print(hdr)
    rows = []
    for T in a.lengths:
        for B in a.batches:
            try:
                st = fill_state(B, T, HQ, H, D, bs, topk, dtype, dev)
            except torch.cuda.OutOfMemoryError:
                print(f"{T:>7} {B:>3}  out of memory building the cache")
                torch.cuda.empty_cache()
                continue
            q = torch.randn(B, HQ, D, device=dev, dtype=dtype)
            kd = st.k[:, :T].transpose(1, 2).contiguous()  # dense baseline's own contiguous copy
            vd = st.v[:, :T].transpose(1, 2).contiguous()
            qd = q[:, :, None]
            t_dense = triton.testing.do_bench(
                lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True), warmup=10, rep=100)
            t_flex = float("nan")
            if flex is not None:
                try:
                    t_flex = triton.testing.do_bench(lambda: flex(qd, kd, vd, enable_gqa=True), warmup=10, rep=100)
                except Exception as e:  # noqa: BLE001
                    print(f"# FlexAttention failed at T={T} B={B}: {type(e).__name__}")
                    flex = None
            del kd, vd

            def step():
                idx = decode_select(st, q)
                return decode_attend(st, q, q, idx)

            t_spla = triton.testing.do_bench(step, warmup=10, rep=100)
            t_graph = float("nan")
            try:
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(3):
                        step()
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    step()
                t_graph = triton.testing.do_bench(g.replay, warmup=10, rep=100)
            except Exception as e:  # noqa: BLE001
                print(f"# CUDA graph capture failed: {type(e).__name__}: {e}")
            best = min(t_spla, t_graph) if not math.isnan(t_graph) else t_spla
            sb = spla_bytes(B, T, HQ, H, D, bs, topk, st.rep_keys)
            db = B * H * T * 2 * D * 2
            row = dict(T=T, B=B, dense_us=t_dense * 1e3, flex_us=t_flex * 1e3, spla_us=t_spla * 1e3,
                       graph_us=t_graph * 1e3, speedup=t_dense / best, spla_mb=sb / 1e6,
                       spla_tbs=sb / (best * 1e-3) / 1e12, dense_tbs=db / (t_dense * 1e-3) / 1e12)
            rows.append(row)
            print(f"{T:>7} {B:>3} {row['dense_us']:>9.1f} {row['dense_tbs']:>10.2f} {row['flex_us']:>8.1f} "
                  f"{row['spla_us']:>8.1f} {row['graph_us']:>9.1f} {row['speedup']:>8.1f} {row['spla_mb']:>8.1f} "
                  f"{row['spla_tbs']:>9.2f} {100 * sb / (best * 1e-3) / copy_bw:>6.0f}%", flush=True)
            del st
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
