# -*- coding: utf-8 -*-
"""Peer baselines shared by the benchmarks: FlexAttention with a causal block-sparse mask of SPLA's budget.

FlexAttention (``torch.nn.attention.flex_attention``, compiled) is what a generic block-sparse kernel reaches
when a whole query block shares one selection that is given in advance: it has no per-token selection and no
scoring cost. The mask here has the token budget of SPLA's default top-16 x 64: per 128-query block, its own
block (causal, partial) plus 7 earlier blocks of 128, fully visible: the first (sink), the previous one and 5
others drawn at random (fixed seed); query blocks with fewer than 7 earlier blocks see all of them.
"""

from __future__ import annotations

from typing import Optional

import torch


def flex_block_mask(T: int, block: int = 128, kv_blocks: int = 8, device=None, seed: int = 0):
    """The causal block-sparse ``BlockMask`` described in the module docstring (``T`` a multiple of ``block``)."""
    from torch.nn.attention.flex_attention import BlockMask
    if T % block:
        raise ValueError(f"T={T} must be a multiple of block={block}")
    if kv_blocks < 3:
        raise ValueError(f"kv_blocks must be >= 3 (own, sink, previous), got {kv_blocks}")
    nq = T // block
    g = torch.Generator().manual_seed(seed)
    full_n = torch.zeros(nq, dtype=torch.int32)
    full_idx = torch.zeros(nq, nq, dtype=torch.int32)
    # the token-level rule, so that every path (eager included) computes the same attention; the block lists
    # only tell the compiled kernel which blocks to skip and which need no masking
    allowed = torch.eye(nq, dtype=torch.bool)
    for i in range(nq):
        if i <= kv_blocks - 1:
            pick = list(range(i))
        else:  # sink, previous, and kv_blocks - 3 others from 1 .. i - 2
            others = (torch.randperm(i - 2, generator=g)[: kv_blocks - 3] + 1).tolist()
            pick = sorted({0, i - 1, *others})
        full_n[i] = len(pick)
        full_idx[i, :len(pick)] = torch.tensor(pick, dtype=torch.int32)
        allowed[i, pick] = True
    own_n = torch.ones(nq, dtype=torch.int32)
    own_idx = torch.zeros(nq, nq, dtype=torch.int32)
    own_idx[:, 0] = torch.arange(nq, dtype=torch.int32)
    allowed = allowed.flatten().to(device)

    def causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & allowed[(q_idx // block) * nq + kv_idx // block]

    def put(x):
        return x[None, None].to(device)

    return BlockMask.from_kv_blocks(put(own_n), put(own_idx), put(full_n), put(full_idx), BLOCK_SIZE=block,
                                   mask_mod=causal, seq_lengths=(T, T))


def flex_attention_fn(compile: bool = True, recompile_limit: int = 64):
    """``flex_attention``, compiled unless ``compile=False`` (eager materializes the scores: tests only).

    A benchmark grid compiles one kernel per shape; dynamo's default limit of 8 recompilations would silently
    drop later shapes to the eager path (quadratic memory), so the limit is raised to ``recompile_limit``.
    """
    from torch.nn.attention.flex_attention import flex_attention
    if not compile:
        return flex_attention
    import torch._dynamo.config as dcfg
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dcfg, name):
            setattr(dcfg, name, max(getattr(dcfg, name), recompile_limit))
    return torch.compile(flex_attention, dynamic=False)


def flex_block_sparse(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: Optional[float] = None):
    """Block-sparse attention of ``[B, T, HQ, D]`` inputs (GQA allowed) under ``mask``; returns ``[B, T, HQ, Dv]``."""
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask, scale=scale,
             enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)
