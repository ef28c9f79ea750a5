# -*- coding: utf-8 -*-
"""Shared definitions of the SPLA operator (SPEC §2-§4) used by every fast path.

Everything here is a *definition* (feature maps, which blocks are forced, the per-block statistics and
the block score), written once so that the chunked torch path, the Triton wrappers and the decode path
cannot drift apart. The naive reference (``naive.py``) deliberately recomputes the statistics and the
score its own way (per block, with explicit loops) so that the tests compare two independent codings.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

FEATURE_MAPS = ("softmax2", "elu1", "relu2")
SELECTIONS = ("taylor2", "taylor1", "oracle")
COVS = ("diag", "full")
BACKENDS = ("triton", "torch", "naive")


class SPLAOutput(NamedTuple):
    """What :func:`spla.spla_attn` returns (SPEC §5), in this field order."""

    o_sparse: torch.Tensor
    """`[B, T, HQ, Dv]` exact softmax attention over the selected tokens, in the input dtype."""
    o_rla: torch.Tensor
    """`[B, T, HQ, Dv]` unnormalized linear attention over the unselected tokens, in the input dtype."""
    rla_mass: torch.Tensor
    """`[B, T, HQ]` fp32 (fp64 for fp64 inputs): the linear-attention mass of the unselected tokens."""
    indices: torch.Tensor
    """`[B, T, H, topk]` int32 selected block ids, ascending, -1 padded."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reductions and states run in fp32, or in fp64 when the inputs are fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """The linear-branch feature map phi (SPEC §4), applied in fp32 (fp64 for fp64 input), no scale.

    ``softmax2``: ``[softmax(x), softmax(-x)]`` over the last dim (2*Dl features);
    ``elu1``: ``elu(x) + 1`` (Dl features); ``relu2``: ``[relu(x), relu(-x)]`` (2*Dl features).
    """
    x = x.to(compute_dtype(x.dtype))
    if name == "softmax2":
        return torch.cat([torch.softmax(x, -1), torch.softmax(-x, -1)], -1)
    if name == "elu1":
        return F.elu(x) + 1.0
    if name == "relu2":
        return torch.cat([F.relu(x), F.relu(-x)], -1)
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {name!r}")


def feature_dim(dl: int, name: str) -> int:
    """Number of features phi produces from a head dim of ``dl``."""
    return dl if name == "elu1" else 2 * dl


def segments(B: int, T: int, cu_seqlens: Optional[torch.Tensor]) -> List[Tuple[int, int, int]]:
    """The independent sequences as ``(batch, start, end)`` triples."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    cu = cu_seqlens.tolist()
    return [(0, int(cu[i]), int(cu[i + 1])) for i in range(len(cu) - 1) if cu[i + 1] > cu[i]]


def token_positions(B: int, T: int, cu_seqlens: Optional[torch.Tensor], device=None) -> torch.Tensor:
    """Position of every token inside its own sequence, `[B, T]` int64."""
    pos = torch.zeros(B, T, dtype=torch.long, device=device)
    for b, start, end in segments(B, T, cu_seqlens):
        pos[b, start:end] = torch.arange(end - start, device=device)
    return pos


def forced_blocks(c: int, sink_blocks: int, local_blocks: int) -> List[int]:
    """Sorted forced blocks ``F(t)`` of a query whose own block is ``c`` (SPEC §2)."""
    sink = set(range(min(sink_blocks, c + 1)))
    local = set(range(max(0, c - local_blocks + 1), c + 1))
    return sorted(sink | local)


def candidate_range(c: int, sink_blocks: int, local_blocks: int) -> Tuple[int, int]:
    """Candidates ``C(t)`` of a query in block ``c`` are the blocks ``lo <= j < hi`` (maybe empty)."""
    lo, hi = sink_blocks, c - local_blocks + 1
    return lo, max(lo, hi)


class BlockStats(NamedTuple):
    """Statistics of the complete blocks of one sequence and KV head layout ``[NB, H, ...]``, fp32/fp64."""

    mean: torch.Tensor  # [NB, H, D]
    second: Optional[torch.Tensor]  # [NB, H, D] diag variance or [NB, H, D, D] covariance, None for taylor1
    reps: Optional[torch.Tensor]  # [NB, H, R, D] representative keys, None when rep_keys == 0


def block_stats(k: torch.Tensor, block_size: int, *, cov: str = "diag", rep_keys: int = 1,
                second_order: bool = True) -> BlockStats:
    """Block statistics of the complete blocks of one sequence (SPEC §3).

    Args:
        k (torch.Tensor): `[L, H, D]` attention keys (post-RoPE) of one sequence.
        block_size (int): tokens per block; the trailing partial block is ignored.
        cov (str): ``"diag"`` keeps the elementwise variance, ``"full"`` the `[D, D]` covariance.
        rep_keys (int): representative keys per block (largest ``||k_i - mean||``, ties: lower position).
        second_order (bool): compute the second-order statistic (not needed for ``taylor1``).
    """
    L, H, D = k.shape
    nb = L // block_size
    kb = k[: nb * block_size].to(compute_dtype(k.dtype)).view(nb, block_size, H, D)
    mean = kb.mean(1)
    d = kb - mean[:, None]
    second = None
    if second_order:
        if cov == "diag":
            second = (d * d).mean(1)
        else:
            second = torch.einsum("nbhd,nbhe->nhde", d, d) / block_size
    reps = None
    if rep_keys > 0:
        norms = d.norm(dim=-1)  # [nb, bs, H]
        # stable descending sort: equal norms keep the lower position first
        order = torch.sort(norms, dim=1, descending=True, stable=True).indices[:, :rep_keys]  # [nb, R, H]
        reps = torch.gather(kb, 1, order[..., None].expand(-1, -1, -1, D)).transpose(1, 2)  # [nb, H, R, D]
    return BlockStats(mean, second, reps)


def block_log_scores(q: torch.Tensor, stats: BlockStats, scale: float, block_size: int, selection: str,
                     cov: str, k_blocks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Estimated log mean attention weight ``l[t, h, j]`` of query heads on blocks (SPEC §3).

    Args:
        q (torch.Tensor): `[N, H, G, D]` queries (fp32/fp64), grouped by KV head.
        stats (BlockStats): statistics of the blocks to score, `[NB, H, ...]`.
        k_blocks (torch.Tensor, Optional): `[NB, block_size, H, D]` keys, only for ``selection="oracle"``.
    Returns:
        `[N, H, G, NB]` log scores.
    """
    if selection == "oracle":
        s = torch.einsum("nhgd,jbhd->nhgjb", q, k_blocks.to(q.dtype)) * scale
        return torch.logsumexp(s, -1) - math.log(block_size)
    l = torch.einsum("nhgd,jhd->nhgj", q, stats.mean) * scale
    if selection == "taylor2":
        if cov == "diag":
            l = l + 0.5 * scale * scale * torch.einsum("nhgd,jhd->nhgj", q * q, stats.second)
        else:
            l = l + 0.5 * scale * scale * torch.einsum("nhgd,jhde,nhge->nhgj", q, stats.second, q)
    if stats.reps is not None:
        r = torch.einsum("nhgd,jhrd->nhgjr", q, stats.reps).amax(-1) * scale - math.log(block_size)
        l = torch.maximum(l, r)
    return l


def group_scores(l: torch.Tensor) -> torch.Tensor:
    """Group score ``s_j``: per-head softmax over the candidates, summed over the G heads. `[N, H, G, J] -> [N, H, J]`."""
    return torch.softmax(l, -1).sum(2)


def topk_stable(s: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries along the last dim; equal scores prefer the lower index."""
    return torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
