# -*- coding: utf-8 -*-
"""The torch backend of SPLA: the algorithm the Triton kernels follow, in chunked PyTorch.

Memory grows linearly in T: no ``T x T`` or ``T x (T / block_size) x heads`` tensor is ever built.

1. :func:`chunk_spla_select` - block statistics per sequence, then the block scores, the per-head softmax over
   each query's candidates, the group sum and a stable top-k; the queries of many query blocks are scored at once
   (each row masked to its own candidate range), in groups bounded by ``CHUNK_BUDGET``.
2. :class:`SparseSelectedFunction` - per query chunk (rows of one query block), gather the union of the
   blocks its tokens selected, and compute with dense GEMMs, masked so that each token sees exactly its
   own selection, the exact softmax attention and, over the same tiles, the selected linear term
   ``sum_{i in U} (phi(q)·phi(k_i)) v_i`` and its mass. On a CPU GEMMs over a shared union beat per-token
   gathers even when the union is several times the per-token selection. The backward recomputes each
   chunk (nothing but the inputs and the indices is saved) and scatters the tiles' gradients back.
3. :func:`chunk_global_linear_attn` - causal global linear attention ``phi(q_t)·S_t`` with an fp32 state,
   chunk-parallel.
4. ``o_rla = global - selected``, set to exactly 0 where the selected tokens are all the visible ones.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from spla.ops.spla.utils import (BlockStats, SPLAOutput, block_log_scores, block_stats, candidate_range, compute_dtype,
                                 feature_map, forced_blocks, group_scores, segments, token_positions,
                                 topk_stable)

# score-like elements (rows x query heads x union tokens) one query chunk may hold; bounds the working set
CHUNK_BUDGET = 1 << 22


def select_query_block(qc: torch.Tensor, c: int, stats: Optional[BlockStats], k_blocks: Optional[torch.Tensor], *,
                       block_size: int, topk: int, sink_blocks: int, local_blocks: int, selection: str, cov: str,
                       scale: float) -> torch.Tensor:
    """Selected blocks of queries that all sit in block ``c`` (SPEC §2-§3): `[n, H, m]` ascending, ``m <= topk``.

    Args:
        qc (torch.Tensor): `[n, H, G, D]` queries (fp32/fp64), grouped by KV head.
        stats (BlockStats, Optional): statistics of the sequence's complete blocks (indexed by block id).
        k_blocks (torch.Tensor, Optional): `[NB, block_size, H, D]` keys of those blocks (``selection="oracle"``).
    """
    n, H = qc.shape[:2]
    forced = torch.tensor(forced_blocks(c, sink_blocks, local_blocks), device=qc.device)
    lo, hi = candidate_range(c, sink_blocks, local_blocks)
    n_free = topk - forced.numel()
    if hi - lo <= n_free:
        return torch.cat([forced, torch.arange(lo, hi, device=qc.device)]).sort().values.expand(n, H, -1)
    sub = None if stats is None else BlockStats(*(None if x is None else x[lo:hi] for x in stats))
    kb = None if k_blocks is None else k_blocks[lo:hi]
    l = block_log_scores(qc, sub, scale, block_size, selection, cov, kb)
    chosen = topk_stable(group_scores(l), n_free) + lo  # [n, H, n_free]
    return torch.cat([forced.expand(n, H, -1), chosen], -1).sort(-1).values


@torch.no_grad()
def select_rows(q: torch.Tensor, k: torch.Tensor, p0: int = 0, *, block_size: int, topk: int, sink_blocks: int,
                local_blocks: int, selection: str, cov: str, rep_keys: int, scale: float) -> torch.Tensor:
    """Selected blocks `[n, H, topk]` (int32, ascending, -1 padded) of the queries at positions ``p0 .. p0+n-1``
    of one sequence whose keys are k `[L, H, D]` (q `[n, HQ, D]`).

    Query blocks with fewer candidates than free slots take them all (:func:`select_query_block`); the others
    (disjoint sink and local sets, ``topk - sink - local`` free picks) are scored many query blocks at a time,
    each row's candidates masked to its own range, in groups bounded by ``CHUNK_BUDGET`` score-like elements.
    """
    n, HQ, D = q.shape
    L, H = k.shape[:2]
    G = HQ // H
    acc = compute_dtype(q.dtype)
    nb = L // block_size
    stats = None
    if selection != "oracle" and nb > 0:
        stats = block_stats(k, block_size, cov=cov, rep_keys=rep_keys, second_order=selection == "taylor2")
    kb = k[: nb * block_size].to(acc).view(nb, block_size, H, D) if selection == "oracle" else None
    idx = torch.full((n, H, topk), -1, dtype=torch.int32, device=q.device)
    c_first, c_last = p0 // block_size, (p0 + n - 1) // block_size

    def few(c: int) -> bool:   # every candidate fits the free slots (this also covers overlapping forced sets)
        lo, hi = candidate_range(c, sink_blocks, local_blocks)
        return hi - lo <= topk - len(forced_blocks(c, sink_blocks, local_blocks))

    c = c_first
    while c <= c_last and few(c):
        r0, r1 = max(c * block_size, p0) - p0, min((c + 1) * block_size, p0 + n) - p0
        sel = select_query_block(q[r0:r1].to(acc).view(r1 - r0, H, G, D), c, stats, kb, block_size=block_size,
                                 topk=topk, sink_blocks=sink_blocks, local_blocks=local_blocks,
                                 selection=selection, cov=cov, scale=scale)
        idx[r0:r1, :, :sel.shape[-1]] = sel.to(torch.int32)
        c += 1
    if c > c_last:
        return idx
    # the rest: every row has sink_blocks + local_blocks forced blocks and n_free candidates to pick
    n_free = topk - sink_blocks - local_blocks
    lo = sink_blocks
    if selection == "oracle":                   # score-like elements per (row, query head, candidate block)
        width = block_size
    elif selection == "taylor2" and cov == "full":
        width = D
    else:
        width = 1 + rep_keys
    per_row = HQ * max(1, c_last - local_blocks + 1 - lo) * width
    step = max(block_size, (CHUNK_BUDGET // per_row) // block_size * block_size)   # rows per group
    forced_off = torch.arange(local_blocks - 1, -1, -1, device=q.device)
    sinks = torch.arange(sink_blocks, device=q.device)
    r = max(c * block_size, p0) - p0
    while r < n:
        r1 = min(n, r + step)
        pos = torch.arange(p0 + r, p0 + r1, device=q.device)
        cb = pos // block_size                                   # each row's own block
        hi_max = int(cb[-1]) - local_blocks + 1
        sub = None if stats is None else BlockStats(*(None if x is None else x[lo:hi_max] for x in stats))
        l = block_log_scores(q[r:r1].to(acc).view(r1 - r, H, G, D), sub, scale, block_size, selection, cov,
                             None if kb is None else kb[lo:hi_max])            # [m, H, G, J]
        valid = torch.arange(lo, hi_max, device=q.device)[None] < (cb - local_blocks + 1)[:, None]   # [m, J]
        sc = group_scores(l.masked_fill(~valid[:, None, None], float("-inf")))
        chosen = topk_stable(sc.masked_fill(~valid[:, None], -1.0), n_free) + lo      # [m, H, n_free]
        forced = torch.cat([sinks.expand(len(pos), -1), cb[:, None] - forced_off[None]], 1)   # [m, sink + local]
        sel = torch.cat([forced[:, None].expand(-1, H, -1), chosen], -1).sort(-1).values
        idx[r:r1] = sel.to(torch.int32)
        r = r1
    return idx


@torch.no_grad()
def chunk_spla_select(q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int, sink_blocks: int,
                      local_blocks: int, selection: str, cov: str, rep_keys: int, scale: float,
                      cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Selected blocks per token and KV head, `[B, T, H, topk]` int32, ascending, -1 padded (SPEC §2-§3)."""
    B, T = q.shape[:2]
    indices = torch.full((B, T, k.shape[2], topk), -1, dtype=torch.int32, device=q.device)
    for b, start, end in segments(B, T, cu_seqlens):
        indices[b, start:end] = select_rows(q[b, start:end], k[b, start:end], block_size=block_size, topk=topk,
                                            sink_blocks=sink_blocks, local_blocks=local_blocks, selection=selection,
                                            cov=cov, rep_keys=rep_keys, scale=scale)
    return indices


def _union(idx: torch.Tensor):
    """Union of the blocks a query chunk selected, per KV head: `[n, H, K]` ids -> padded `[H, u]` ids, mask."""
    H = idx.shape[1]
    heads = [torch.unique(idx[:, h][idx[:, h] >= 0]) for h in range(H)]
    u = max(x.numel() for x in heads)
    U = torch.full((H, u), -1, dtype=torch.long, device=idx.device)
    for h, x in enumerate(heads):
        U[h, :x.numel()] = x
    return U


def _query_chunks(idx: torch.Tensor, t0: int, t1: int, heads_q: int, block_size: int):
    """Split the rows ``[t0, t1)`` of one query block until rows x HQ x union tokens fits the budget."""
    U = _union(idx[t0:t1])
    if t1 - t0 == 1 or (t1 - t0) * heads_q * U.shape[1] * block_size <= CHUNK_BUDGET:
        yield t0, t1, U
        return
    mid = (t0 + t1) // 2
    yield from _query_chunks(idx, t0, mid, heads_q, block_size)
    yield from _query_chunks(idx, mid, t1, heads_q, block_size)


def _sparse_chunk(qc, fq, K, V, FK, valid, scale):
    """Exact attention over the chunk's union of selected tokens and the selected linear term, same tiles.

    qc `[n, H, G, D]`, fq = phi(q_lin) `[n, H, G, F]`, K/V/FK = k, v, phi(k_lin) of the union `[H, N, *]`,
    valid `[n, H, N]` bool (token selected by that query and causal). Dense GEMMs over the union; the mask
    makes each query see exactly its own selection.
    Returns o `[n, H, G, Dv]`, sel_lin `[n, H, G, Dv]`, sel_mass `[n, H, G]`.
    """
    s = torch.einsum("nhgd,hkd->nhgk", qc, K) * scale
    s = s.masked_fill(~valid[:, :, None], float("-inf"))
    o = torch.einsum("nhgk,hkd->nhgd", torch.softmax(s, -1), V)
    w = torch.einsum("nhgf,hkf->nhgk", fq, FK) * valid[:, :, None]
    return o, torch.einsum("nhgk,hkd->nhgd", w, V), w.sum(-1)


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """`[L, H, D]` -> zero-padded `[H, NB, block_size, D]`."""
    L, H, D = x.shape
    nb = (L + block_size - 1) // block_size
    xp = x.new_zeros(nb * block_size, H, D)
    xp[:L] = x
    return xp.view(nb, block_size, H, D).permute(2, 0, 1, 3)


def _iter_chunks(q, k, v, q_lin, k_lin, indices, block_size, cu_seqlens, fmap=None):
    """Yield per query chunk its rows, the union's token positions, validity and the K, V, k_lin tiles.

    With ``fmap`` the third tile is phi(k_lin), computed once per sequence (forward only).
    """
    B, T, HQ, D = q.shape
    H = k.shape[2]
    acc = compute_dtype(q.dtype)
    heads = torch.arange(H, device=q.device)[:, None]
    for b, start, end in segments(B, T, cu_seqlens):
        L = end - start
        kls = k_lin[b, start:end]
        kls = feature_map(kls, fmap) if fmap else kls.to(acc)
        kb, vb, klb = (_blocks(x, block_size) for x in (k[b, start:end].to(acc), v[b, start:end].to(acc), kls))
        idx_seq = indices[b, start:end].long()
        for c0 in range(0, L, block_size):
            for t0, t1, U in _query_chunks(idx_seq, c0, min(c0 + block_size, L), HQ, block_size):
                idx = idx_seq[t0:t1]  # [n, H, K]
                Uc = U.clamp(min=0)
                member = (idx[:, :, :, None] == U[None, :, None, :]).any(2) & (U >= 0)  # [n, H, u]
                pos = (Uc[..., None] * block_size + torch.arange(block_size, device=q.device)).flatten(1)  # [H, N]
                t = torch.arange(t0, t1, device=q.device)[:, None, None]
                valid = member.repeat_interleave(block_size, -1) & (pos[None] <= t)  # [n, H, N]
                tiles = [x[heads, Uc].flatten(1, 2) for x in (kb, vb, klb)]  # [H, N, *]
                yield (b, start, L, slice(start + t0, start + t1), pos, valid, *tiles)


class SparseSelectedFunction(torch.autograd.Function):
    """Exact attention over the selected blocks plus the selected linear term, recomputed in backward."""

    @staticmethod
    def forward(ctx, q, k, v, q_lin, k_lin, indices, block_size, scale, fmap, cu_seqlens):
        B, T, HQ, D = q.shape
        H, Dv = k.shape[2], v.shape[-1]
        G = HQ // H
        acc = compute_dtype(q.dtype)
        o = q.new_empty(B, T, HQ, Dv, dtype=acc)
        sel_lin = q.new_empty(B, T, HQ, Dv, dtype=acc)
        sel_mass = q.new_empty(B, T, HQ, dtype=acc)
        for b, _, _, rows, _, valid, K, V, FK in _iter_chunks(q, k, v, q_lin, k_lin, indices, block_size,
                                                              cu_seqlens, fmap):
            n = rows.stop - rows.start
            qc = q[b, rows].to(acc).view(n, H, G, D)
            fq = feature_map(q_lin[b, rows].view(n, H, G, -1), fmap)
            oc, lc, mc = _sparse_chunk(qc, fq, K, V, FK, valid, scale)
            o[b, rows], sel_lin[b, rows], sel_mass[b, rows] = oc.flatten(1, 2), lc.flatten(1, 2), mc.flatten(1)
        ctx.save_for_backward(q, k, v, q_lin, k_lin, indices, cu_seqlens)
        ctx.args = (block_size, scale, fmap)
        return o, sel_lin, sel_mass

    @staticmethod
    def backward(ctx, do, dsel_lin, dsel_mass):
        q, k, v, q_lin, k_lin, indices, cu_seqlens = ctx.saved_tensors
        block_size, scale, fmap = ctx.args
        B, T, HQ, D = q.shape
        H, Dv, Dl = k.shape[2], v.shape[-1], k_lin.shape[-1]
        G = HQ // H
        acc = compute_dtype(q.dtype)
        dq, dql = torch.zeros_like(q, dtype=acc), torch.zeros_like(q_lin, dtype=acc)
        dk, dv, dkl = (torch.zeros_like(x, dtype=acc) for x in (k, v, k_lin))
        do = torch.zeros_like(dq[..., :1]).expand(B, T, HQ, Dv) if do is None else do.to(acc)
        dsel_lin = torch.zeros_like(do) if dsel_lin is None else dsel_lin.to(acc)
        dsel_mass = torch.zeros_like(do[..., 0]) if dsel_mass is None else dsel_mass.to(acc)
        bufs = {}
        for b, start, L, rows, pos, valid, K, V, KL in _iter_chunks(q, k, v, q_lin, k_lin, indices, block_size,
                                                                    cu_seqlens):
            n = rows.stop - rows.start
            with torch.enable_grad():
                leaves = [q[b, rows].to(acc).view(n, H, G, D), q_lin[b, rows].to(acc).view(n, H, G, Dl), K, V, KL]
                leaves = [x.detach().requires_grad_() for x in leaves]
                qc, qlc, K_, V_, KL_ = leaves
                outs = _sparse_chunk(qc, feature_map(qlc, fmap), K_, V_, feature_map(KL_, fmap), valid, scale)
                gq, gql, gK, gV, gKL = torch.autograd.grad(
                    outs, leaves, (do[b, rows].view(n, H, G, Dv), dsel_lin[b, rows].view(n, H, G, Dv),
                                   dsel_mass[b, rows].view(n, H, G)))
            dq[b, rows] += gq.flatten(1, 2)
            dql[b, rows] += gql.flatten(1, 2)
            # scatter the union tiles' gradients back: flat index = head * padded_len + position
            padded = -(-L // block_size) * block_size
            if (b, start) not in bufs:
                bufs[(b, start)] = (L, [torch.zeros(H * padded, x.shape[-1], dtype=acc, device=q.device)
                                        for x in (k, v, k_lin)])
            flat = (pos + torch.arange(H, device=q.device)[:, None] * padded).reshape(-1)
            for buf, g in zip(bufs[(b, start)][1], (gK, gV, gKL)):
                buf.index_add_(0, flat, g.reshape(-1, g.shape[-1]))
        for (b, start), (L, seg) in bufs.items():
            for dst, buf in zip((dk, dv, dkl), seg):
                dst[b, start:start + L] += buf.view(H, -1, buf.shape[-1])[:, :L].transpose(0, 1)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dql.to(q_lin.dtype), dkl.to(k_lin.dtype),
                None, None, None, None, None)


def chunk_global_linear_attn(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor,
                             cu_seqlens: Optional[torch.Tensor] = None,
                             chunk_size: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
    """Causal, undecayed, unnormalized linear attention over all tokens, chunk-parallel and differentiable.

    Args:
        fq (torch.Tensor): `[B, T, HQ, F]` query features phi(q_lin) (fp32/fp64).
        fk (torch.Tensor): `[B, T, H, F]` key features phi(k_lin).
        v (torch.Tensor): `[B, T, H, Dv]` values.
    Returns:
        ``o [B, T, HQ, Dv] = phi(q_t)·S_t`` and ``mass [B, T, HQ] = phi(q_t)·z_t`` with
        ``S_t = sum_{i<=t} phi(k_i)^T v_i`` and ``z_t = sum_{i<=t} phi(k_i)`` restarted at every sequence.
    """
    B, T, HQ, Fd = fq.shape
    H, Dv = fk.shape[2], v.shape[-1]
    G = HQ // H
    v = v.to(fq.dtype)
    o = fq.new_zeros(B, T, HQ, Dv + 1)  # values and, in the last column, the mass
    C = chunk_size
    for b, start, end in segments(B, T, cu_seqlens):
        L = end - start
        nc = (L + C - 1) // C
        pad = nc * C - L

        def chunks(x):
            x = x[b, start:end]
            x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x
            return x.view(nc, C, *x.shape[1:])

        q_ = chunks(fq).view(nc, C, H, G, Fd)
        k_, v_ = chunks(fk), chunks(v)
        # value and mass together: append a ones column to v
        ve = torch.cat([v_, v_.new_ones(*v_.shape[:-1], 1)], -1)  # [nc, C, H, Dv+1]
        kv = torch.einsum("ncht,nchd->nhtd", k_, ve)  # per-chunk state increments
        state = torch.cumsum(kv, 0) - kv  # exclusive prefix: state before each chunk
        inter = torch.einsum("nchgt,nhtd->nchgd", q_, state)
        a = torch.einsum("nchgt,niht->nhgci", q_, k_)
        a = a * torch.ones(C, C, dtype=torch.bool, device=fq.device).tril()
        intra = torch.einsum("nhgci,nihd->nchgd", a, ve)
        o[b, start:end] = (inter + intra).reshape(nc * C, HQ, Dv + 1)[:L]
    return o[..., :Dv], o[..., Dv]


def selected_token_count(indices: torch.Tensor, block_size: int, cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """How many visible tokens ``i <= t`` the selection covers, `[B, T, H]` (count, never cancellation)."""
    pos = token_positions(*indices.shape[:2], cu_seqlens, indices.device)
    idx = indices.long()
    seen = (pos[:, :, None, None] - idx * block_size + 1).clamp(0, block_size)
    return torch.where(idx >= 0, seen, 0).sum(-1)


def chunk_spla_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lin: torch.Tensor, k_lin: torch.Tensor,
                    *, block_size: int, topk: int, sink_blocks: int, local_blocks: int, selection: str, cov: str,
                    rep_keys: int, feature_map_name: str, scale: float,
                    cu_seqlens: Optional[torch.Tensor] = None, residual: bool = True) -> SPLAOutput:
    """The torch backend of :func:`spla.spla_attn` (arguments already validated and defaulted);
    ``residual=False``: :func:`spla.topk_attn` (no global linear term; o_rla, rla_mass zero)."""
    indices = chunk_spla_select(q, k, block_size=block_size, topk=topk, sink_blocks=sink_blocks,
                                local_blocks=local_blocks, selection=selection, cov=cov, rep_keys=rep_keys,
                                scale=scale, cu_seqlens=cu_seqlens)
    o_sparse, sel_lin, sel_mass = SparseSelectedFunction.apply(q, k, v, q_lin, k_lin, indices, block_size, scale,
                                                               feature_map_name, cu_seqlens)
    if not residual:
        o = o_sparse.to(q.dtype)
        return SPLAOutput(o, torch.zeros_like(o), torch.zeros_like(sel_mass), indices)
    glob, glob_mass = chunk_global_linear_attn(feature_map(q_lin, feature_map_name),
                                               feature_map(k_lin, feature_map_name), v, cu_seqlens)
    return finish_residual(q, o_sparse, glob, glob_mass, sel_lin, sel_mass, indices, block_size, cu_seqlens)


def finish_residual(q, o_sparse, glob, glob_mass, sel_lin, sel_mass, indices, block_size, cu_seqlens) -> SPLAOutput:
    """``o_rla = global - selected`` (SPEC §4), exactly 0 where no visible token is unselected."""
    B, T, HQ = q.shape[:3]
    H = indices.shape[2]
    G = HQ // H
    pos = token_positions(B, T, cu_seqlens, q.device)
    empty = selected_token_count(indices, block_size, cu_seqlens) == (pos + 1)[..., None]  # [B, T, H]
    empty = empty.repeat_interleave(G, dim=2)  # [B, T, HQ]
    mass = torch.where(empty, 0.0, glob_mass - sel_mass)
    o_rla = torch.where(empty[..., None], 0.0, glob - sel_lin)
    return SPLAOutput(o_sparse.to(q.dtype), o_rla.to(q.dtype), mass, indices)
