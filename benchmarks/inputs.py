# -*- coding: utf-8 -*-
"""Benchmark inputs: random N(0, 1) q, k, v, or queries with the selection locality of a real model.

Random queries are independent from token to token, so adjacent tokens select different blocks (they share only
the forced sink and local blocks). A real model's adjacent queries mostly agree (``bench_locality.py``: on
SmolLM2 at 8k, 16 consecutive tokens select 25.5 distinct blocks between them, against 65.6 on random data). Kernels
that share loads between adjacent queries (the query-tile union stage) must be timed on data that has this
property too. ``data="local"`` gives each query head an AR(1) process along the tokens,
``q_t = rho q_{t-1} + sqrt(1 - rho^2) eps_t`` (unit variance, correlation ``rho^n`` at distance n), with
k, v still N(0, 1). ``LOCAL_RHO`` is calibrated so that SPLA's selection (block 64, top-16) gives unions close to
SmolLM2's at 8k; ``bench_locality.py`` prints the synthetic data's unions beside the real ones.
"""

from __future__ import annotations

import torch

#: AR(1) correlation of adjacent queries of ``data="local"`` (calibrated on SmolLM2 at 8k, docs/benchmarks.md)
LOCAL_RHO = 0.985
DATA = ("random", "local")


def ar1(eps: torch.Tensor, rho: float, chunk: int = 256) -> torch.Tensor:
    """The stationary AR(1) process along dim 0 driven by ``eps [T, ...]`` (N(0, 1)):
    ``x_0 = eps_0``, ``x_t = rho x_{t-1} + sqrt(1 - rho^2) eps_t``, computed in fp32 chunks of ``chunk`` steps
    (one matmul per chunk with the decay matrix, then the carried state: T / chunk sequential steps)."""
    if not 0 <= rho < 1:
        raise ValueError(f"rho must be in [0, 1), got {rho}")
    T = eps.shape[0]
    x = eps.float().reshape(T, -1)
    a = (1 - rho * rho) ** 0.5
    i = torch.arange(chunk, device=eps.device, dtype=torch.float64)
    lag = i[:, None] - i[None, :]
    decay = torch.where(lag >= 0, rho ** lag.clamp(min=0), 0.)  # [chunk, chunk] rho^(i-j), j <= i
    carry_w = (rho ** (i + 1)).float()[:, None]  # weight of the previous chunk's last state at step i
    decay = decay.float()
    out = torch.empty_like(x)
    prev = None
    for t0 in range(0, T, chunk):
        e = x[t0:t0 + chunk]
        n = e.shape[0]
        if prev is None:  # x_0 = eps_0 (already stationary), then the recurrence
            e = torch.cat([e[:1] / a, e[1:]])
        y = a * (decay[:n, :n] @ e)
        if prev is not None:
            y += carry_w[:n] * prev
        out[t0:t0 + n] = y
        prev = y[-1:]
    return out.view(eps.shape)


def attention_inputs(B: int, T: int, HQ: int, H: int, D: int, *, data: str = "random", device="cuda",
                     dtype=torch.bfloat16, seed: int = 0, rho: float = LOCAL_RHO):
    """``q [B, T, HQ, D]``, ``k, v [B, T, H, D]`` in ``dtype``: N(0, 1), or with ``data="local"`` AR(1) queries
    (:func:`ar1`, correlation ``rho`` between adjacent tokens)."""
    if data not in DATA:
        raise ValueError(f"data must be one of {DATA}, got {data!r}")
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(T, B, HQ, D, device=device, generator=g)
    if data == "local":
        q = ar1(q, rho)
    k = torch.randn(B, T, H, D, device=device, generator=g)
    v = torch.randn(B, T, H, D, device=device, generator=g)
    return q.transpose(0, 1).to(dtype).contiguous(), k.to(dtype), v.to(dtype)
