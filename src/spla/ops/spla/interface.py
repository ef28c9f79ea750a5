# -*- coding: utf-8 -*-
"""The public entry points :func:`spla_attn` (SPEC §5) and :func:`topk_attn` (its top-k branch alone):
validation and backend dispatch."""

from __future__ import annotations

import os
from typing import Optional

import torch

from spla.ops.spla.utils import BACKENDS, COVS, FEATURE_MAPS, SELECTIONS, SPLAOutput

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def validate_inputs(q, k, v, q_lin, k_lin, *, block_size, topk, sink_blocks, local_blocks, selection, cov,
                    rep_keys, feature_map, scale, cu_seqlens, backend) -> None:
    """Raise ``ValueError`` naming the first bad argument (SPEC §5); return silently otherwise."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [B, T, heads, dim], got shape {tuple(x.shape)}")
        if x.dtype not in _FLOATS:
            raise ValueError(f"{name} must be fp16, bf16, fp32 or fp64, got {x.dtype}")
    B, T, HQ, D = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != D:
        raise ValueError(f"k must have shape [B={B}, T={T}, H, D={D}] to match q, got {tuple(k.shape)}")
    H = k.shape[2]
    if H == 0 or HQ % H != 0:
        raise ValueError(f"the number of query heads HQ={HQ} of q must be a multiple of the KV heads H={H} of k "
                         f"(group size G = HQ // H must be an integer)")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must have shape [B={B}, T={T}, H={H}, Dv], got {tuple(v.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {x.device}")
    if T == 0 or D == 0:
        raise ValueError(f"q must have T > 0 and D > 0, got shape {tuple(q.shape)}")
    if (q_lin is None) != (k_lin is None):
        raise ValueError("q_lin and k_lin must be given together (or both left None to use q and k)")
    if q_lin is not None:
        for name, x, heads in (("q_lin", q_lin, HQ), ("k_lin", k_lin, H)):
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[:3] != (B, T, heads):
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{name} must have shape [B={B}, T={T}, {heads}, Dl], got {shape}")
            if x.dtype not in _FLOATS:
                raise ValueError(f"{name} must be fp16, bf16, fp32 or fp64, got {x.dtype}")
            if x.device != q.device:
                raise ValueError(f"{name} must be on the device of q ({q.device}), got {x.device}")
        if q_lin.shape[3] != k_lin.shape[3]:
            raise ValueError(f"q_lin and k_lin must share their last dim Dl, got {q_lin.shape[3]} and {k_lin.shape[3]}")
    _check_int("block_size", block_size, 1)
    _check_int("topk", topk, 1)
    _check_int("sink_blocks", sink_blocks, 0)
    _check_int("local_blocks", local_blocks, 1)
    if topk < sink_blocks + local_blocks:
        raise ValueError(f"topk={topk} must be >= sink_blocks + local_blocks = {sink_blocks + local_blocks} "
                         f"(topk counts the forced blocks too)")
    _check_choice("selection", selection, SELECTIONS)
    _check_choice("cov", cov, COVS)
    if isinstance(rep_keys, bool) or not isinstance(rep_keys, int) or not 0 <= rep_keys <= 4:
        raise ValueError(f"rep_keys must be an int in 0..4, got {rep_keys!r}")
    if rep_keys > block_size:
        raise ValueError(f"rep_keys={rep_keys} must not exceed block_size={block_size}")
    _check_choice("feature_map", feature_map, FEATURE_MAPS)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise ValueError(f"scale must be a positive float or None, got {scale!r}")
    if backend is not None:
        _check_choice("backend", backend, BACKENDS)
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must be a 1-D integer tensor [N+1] of sequence starts and the total length")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if B != 1:
            raise ValueError(f"cu_seqlens requires a packed batch with B == 1, got B={B}; flatten the sequences first")
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={T}, got {cu}")


def pick_backend(q: torch.Tensor, backend: Optional[str]) -> str:
    """``None`` -> the fastest for the device: Triton on CUDA, the chunked torch path elsewhere."""
    if backend is not None:
        return backend
    return "triton" if q.is_cuda else "torch"


def spla_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lin: Optional[torch.Tensor] = None,
              k_lin: Optional[torch.Tensor] = None, *, block_size: int = 64, topk: int = 16, sink_blocks: int = 1,
              local_blocks: int = 2, selection: str = "taylor2", cov: str = "diag", rep_keys: int = 1,
              feature_map: str = "softmax2", scale: Optional[float] = None,
              cu_seqlens: Optional[torch.LongTensor] = None, backend: Optional[str] = None) -> SPLAOutput:
    r"""SPLA attention: exact softmax attention over selected KV blocks + residual linear attention.

    Each query token ``t`` (per KV head) attends exactly to ``topk`` blocks: ``sink_blocks`` sink blocks,
    ``local_blocks`` local blocks (its own included) and the best remaining complete blocks by a
    second-order Taylor estimate of their attention mass. Everything visible it did not select is
    summarized by an unnormalized linear attention computed by subtraction (global minus selected), so
    unselected blocks are never read. See ``docs/math.md`` and ``SPEC.md``.

    Args:
        q (torch.Tensor):
            queries of shape `[B, T, HQ, D]`, RoPE applied.
        k (torch.Tensor):
            keys of shape `[B, T, H, D]`, RoPE applied. GQA: ``HQ % H == 0``, query head ``h`` reads KV head ``h // (HQ // H)``.
        v (torch.Tensor):
            values of shape `[B, T, H, Dv]`.
        q_lin (torch.Tensor, Optional):
            queries of the linear branch, `[B, T, HQ, Dl]` (layers pass the pre-RoPE q). Default: ``q``.
        k_lin (torch.Tensor, Optional):
            keys of the linear branch, `[B, T, H, Dl]`. Default: ``k``.
        block_size (int):
            tokens per KV block. Default: `64`.
        topk (int):
            blocks each token attends to, forced blocks included. Default: `16`.
        sink_blocks (int):
            leading blocks always selected. Default: `1`.
        local_blocks (int):
            trailing blocks (the token's own included) always selected, >= 1. Default: `2`.
        selection (str):
            ``"taylor2"`` (second order), ``"taylor1"`` (mean key, as MoBA) or ``"oracle"`` (exact block mass;
            naive and torch backends read every key). Default: `"taylor2"`.
        cov (str):
            second-order statistic: ``"diag"`` variance or ``"full"`` covariance. Default: `"diag"`.
        rep_keys (int):
            representative keys per block (0..4) that floor the estimate. Default: `1`.
        feature_map (str):
            linear-branch feature map: ``"softmax2"``, ``"elu1"`` or ``"relu2"``. Default: `"softmax2"`.
        scale (float, Optional):
            softmax scale. Default: ``D ** -0.5``.
        cu_seqlens (torch.LongTensor, Optional):
            `[N+1]` cumulative sequence lengths of a packed batch (then ``B == 1``); blocks restart at every
            sequence start. Default: `None`.
        backend (str, Optional):
            ``"triton"``, ``"torch"`` or ``"naive"``; ``None`` picks Triton on CUDA and torch elsewhere.

    Returns:
        :class:`SPLAOutput` ``(o_sparse [B, T, HQ, Dv], o_rla [B, T, HQ, Dv], rla_mass [B, T, HQ] fp32,
        indices [B, T, H, topk] int32)``. Gradients flow to q, k, v, q_lin, k_lin; the selection has none.

    Raises:
        ValueError: on any bad shape, dtype, device, option value or ``cu_seqlens`` (names the argument).
    """
    validate_inputs(q, k, v, q_lin, k_lin, block_size=block_size, topk=topk, sink_blocks=sink_blocks,
                    local_blocks=local_blocks, selection=selection, cov=cov, rep_keys=rep_keys,
                    feature_map=feature_map, scale=scale, cu_seqlens=cu_seqlens, backend=backend)
    return _dispatch(q, k, v, q_lin, k_lin, block_size=block_size, topk=topk, sink_blocks=sink_blocks,
                     local_blocks=local_blocks, selection=selection, cov=cov, rep_keys=rep_keys,
                     feature_map=feature_map, scale=scale, cu_seqlens=cu_seqlens, backend=backend, residual=True)


def topk_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 64, topk: int = 16,
              sink_blocks: int = 1, local_blocks: int = 2, selection: str = "taylor2", cov: str = "diag",
              rep_keys: int = 1, scale: Optional[float] = None, cu_seqlens: Optional[torch.LongTensor] = None,
              backend: Optional[str] = None) -> SPLAOutput:
    r"""Top-k block-sparse attention alone: SPLA's selection and exact attention over the selected blocks,
    without the residual linear branch (the NSA / MoBA / InfLLM-V2 family that SPLA is compared with).

    Same arguments, layout (`[B, T, H, D]`, ``cu_seqlens`` for packed batches) and selection as
    :func:`spla_attn`, less ``q_lin``, ``k_lin`` and ``feature_map``. The linear branch is not computed (the
    Triton backend skips the feature maps, the global state and the selected linear terms, forward and
    backward); ``o_sparse`` and ``indices`` equal those of :func:`spla_attn`.

    Returns:
        :class:`SPLAOutput` ``(o_sparse [B, T, HQ, Dv], o_rla, rla_mass, indices [B, T, H, topk] int32)`` with
        ``o_rla`` and ``rla_mass`` exactly zero. Gradients flow to q, k, v.

    Raises:
        ValueError: on any bad shape, dtype, device, option value or ``cu_seqlens`` (names the argument).
    """
    validate_inputs(q, k, v, None, None, block_size=block_size, topk=topk, sink_blocks=sink_blocks,
                    local_blocks=local_blocks, selection=selection, cov=cov, rep_keys=rep_keys,
                    feature_map="softmax2", scale=scale, cu_seqlens=cu_seqlens, backend=backend)
    return _dispatch(q, k, v, None, None, block_size=block_size, topk=topk, sink_blocks=sink_blocks,
                     local_blocks=local_blocks, selection=selection, cov=cov, rep_keys=rep_keys,
                     feature_map="softmax2", scale=scale, cu_seqlens=cu_seqlens, backend=backend, residual=False)


def _dispatch(q, k, v, q_lin, k_lin, *, block_size, topk, sink_blocks, local_blocks, selection, cov, rep_keys,
              feature_map, scale, cu_seqlens, backend, residual: bool) -> SPLAOutput:
    """Defaults, backend choice and the call (arguments already validated)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q_lin is None:
        q_lin, k_lin = q, k
    opts = dict(block_size=block_size, topk=topk, sink_blocks=sink_blocks, local_blocks=local_blocks,
                selection=selection, cov=cov, rep_keys=rep_keys, feature_map_name=feature_map, scale=scale,
                cu_seqlens=cu_seqlens)
    backend = pick_backend(q, backend)
    if backend == "naive":
        from spla.ops.spla.naive import naive_spla_attn
        out = naive_spla_attn(q, k, v, q_lin, k_lin, **opts)
        return out if residual else out._replace(o_rla=torch.zeros_like(out.o_rla),
                                                 rla_mass=torch.zeros_like(out.rla_mass))
    if backend == "torch":
        from spla.ops.spla.chunk import chunk_spla_attn
        return chunk_spla_attn(q, k, v, q_lin, k_lin, residual=residual, **opts)
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before spla is imported; "
                         "use backend='torch' on CPU")
    from spla.ops.spla.parallel import parallel_spla_attn
    return parallel_spla_attn(q, k, v, q_lin, k_lin, residual=residual, **opts)
