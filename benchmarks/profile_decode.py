# -*- coding: utf-8 -*-
"""Eager decode steps for a profiler: fills a bf16 SPLA cache (bf16 statistics) and runs a few steps, each the
kernels of ``decode_select`` + ``decode_attend``, so that Nsight Compute sees every kernel of a warm step.

    ncu --kernel-name regex:spla_decode --launch-skip 10 --launch-count 5 --section SpeedOfLight \\
        --section Occupancy --section WarpStateStats python benchmarks/profile_decode.py --T 131072 --batch 8

(five launches per step at the default launch settings: skipping 10 profiles the third step).
"""

from __future__ import annotations

import argparse

import torch

from bench_decode import fill_state
from spla.ops.spla.decode_kernels import LAUNCH, decode_attend, decode_select


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=131072)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "H"))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--launch", nargs="*", default=[], metavar="KEY=VALUE", help="override LAUNCH entries")
    a = p.parse_args()
    for kv in a.launch:
        key, val = kv.split("=")
        if key not in LAUNCH:
            p.error(f"unknown launch setting {key!r}; known: {', '.join(LAUNCH)}")
        LAUNCH[key] = int(val)
    HQ, H = a.heads
    B, T, D, dev, dtype = a.batch, a.T, 128, "cuda", torch.bfloat16
    st = fill_state(B, T, HQ, H, D, 64, 16, dtype, dev, stats_dtype=torch.bfloat16)
    q = torch.randn(B, HQ, D, device=dev, dtype=dtype)
    new = tuple(torch.randn(B, H, D, device=dev, dtype=dtype) for _ in range(3))
    for _ in range(a.steps):
        st.lengths.add_(1)
        decode_attend(st, q, q, decode_select(st, q, new=new), new=(new[2], new[1]))
        st.lengths.sub_(1)
    torch.cuda.synchronize()
    print(f"# {a.steps} steps at T={T} B={B}, launch {LAUNCH}")


if __name__ == "__main__":
    main()
