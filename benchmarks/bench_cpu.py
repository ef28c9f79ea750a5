# -*- coding: utf-8 -*-
"""CPU cost of the torch backend: wall time and peak RSS, forward and forward+backward, beside dense SDPA.

Every case runs in its own subprocess so that its peak RSS (``ru_maxrss``) is its own. Reported:
wall time (best of ``--repeat``), the process's peak RSS, and the peak above the inputs' footprint.

    python benchmarks/bench_cpu.py                      # T = 4k, 16k, 64k (the issue's grid)
    python benchmarks/bench_cpu.py --lengths 4096 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def run_case(method: str, mode: str, T: int, repeat: int) -> dict:
    import torch
    import torch.nn.functional as F

    from spla import spla_attn

    torch.manual_seed(0)
    HQ, H, D = 8, 2, 64
    q = torch.randn(1, T, HQ, D, requires_grad=mode == "fwdbwd")
    k = torch.randn(1, T, H, D, requires_grad=mode == "fwdbwd")
    v = torch.randn(1, T, H, D, requires_grad=mode == "fwdbwd")
    base = _rss_mb()

    def step():
        if method == "spla":
            out = spla_attn(q, k, v, block_size=64, topk=16, backend="torch")
            loss = out.o_sparse.float().sum() + out.o_rla.float().sum()
        else:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=True)
            loss = o.sum()
        if mode == "fwdbwd":
            loss.backward()
            for x in (q, k, v):
                x.grad = None

    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        if mode == "fwd":
            with torch.no_grad():
                step()
        else:
            step()
        times.append(time.perf_counter() - t0)
    peak = _rss_mb()
    return dict(method=method, mode=mode, T=T, seconds=min(times), peak_rss_mb=peak, above_inputs_mb=peak - base)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--methods", nargs="+", default=["spla", "sdpa"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"])
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--out", default=None, help="write the rows as JSON lines here")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case in this process
    a = p.parse_args()
    if a.case:
        method, mode, T = a.case.split(":")
        print(json.dumps(run_case(method, mode, int(T), a.repeat)))
        return
    import torch
    print(f"# CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; B=1 HQ=8 H=2 D=64 fp32, SPLA block 64 topk 16 (torch backend)")
    rows = []
    print(f"{'T':>7} {'mode':>7} {'method':>6} {'seconds':>9} {'peak RSS MB':>12} {'above inputs MB':>16}")
    for T in a.lengths:
        for mode in a.modes:
            for method in a.methods:
                r = subprocess.run([sys.executable, __file__, "--case", f"{method}:{mode}:{T}", "--repeat",
                                    str(a.repeat)], capture_output=True, text=True)
                if r.returncode != 0:
                    print(f"{T:>7} {mode:>7} {method:>6}  failed: {r.stderr.strip().splitlines()[-1:]}")
                    continue
                row = json.loads(r.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{T:>7} {mode:>7} {method:>6} {row['seconds']:>9.2f} {row['peak_rss_mb']:>12.0f} "
                      f"{row['above_inputs_mb']:>16.0f}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
