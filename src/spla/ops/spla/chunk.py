# -*- coding: utf-8 -*-
"""The torch backend of SPLA: the algorithm the Triton kernels follow, in chunked PyTorch.

Memory grows linearly in T: no ``T x T`` or ``T x (T / block_size) x heads`` tensor is ever built.

1. :func:`chunk_spla_select` - block statistics per sequence, then per query block (all queries of one
   block share the forced and candidate sets) the block scores, the per-head softmax over the candidates,
   the group sum and a stable top-k.
2. :class:`SparseSelectedFunction` - per query chunk, gather the selected K/V blocks and compute the exact
   softmax attention over them and, over the same gathered tiles, the selected linear term
   ``sum_{i in U} (phi(q)·phi(k_i)) v_i`` and its mass. The backward recomputes each chunk (nothing but the
   inputs and the indices is saved) and scatters the gradients of the gathered tiles back.
3. :func:`chunk_global_linear_attn` - causal global linear attention ``phi(q_t)·S_t`` with an fp32 state,
   chunk-parallel.
4. ``o_rla = global - selected``, set to exactly 0 where the selected tokens are all the visible ones.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from spla.ops.spla.utils import (SPLAOutput, block_log_scores, block_stats, candidate_range, compute_dtype,
                                 feature_map, forced_blocks, group_scores, segments, token_positions,
                                 topk_stable)

# elements a gathered query chunk may hold (K, V and k_lin tiles together), bounds the working set
GATHER_BUDGET = 1 << 24


@torch.no_grad()
def chunk_spla_select(q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int, sink_blocks: int,
                      local_blocks: int, selection: str, cov: str, rep_keys: int, scale: float,
                      cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Selected blocks per token and KV head, `[B, T, H, topk]` int32, ascending, -1 padded (SPEC §2-§3)."""
    B, T, HQ, D = q.shape
    H = k.shape[2]
    G = HQ // H
    acc = compute_dtype(q.dtype)
    indices = torch.full((B, T, H, topk), -1, dtype=torch.int32, device=q.device)
    for b, start, end in segments(B, T, cu_seqlens):
        L = end - start
        ks = k[b, start:end]
        nb = L // block_size
        stats = None
        if selection != "oracle" and nb > 0:
            stats = block_stats(ks, block_size, cov=cov, rep_keys=rep_keys, second_order=selection == "taylor2")
        kb = ks[: nb * block_size].to(acc).view(nb, block_size, H, D)
        for c in range((L + block_size - 1) // block_size):
            t0, t1 = c * block_size, min((c + 1) * block_size, L)
            forced = torch.tensor(forced_blocks(c, sink_blocks, local_blocks), device=q.device)
            lo, hi = candidate_range(c, sink_blocks, local_blocks)
            n_free = topk - forced.numel()
            n = t1 - t0
            if hi - lo <= n_free:
                sel = torch.cat([forced, torch.arange(lo, hi, device=q.device)]).sort().values
                indices[b, start + t0:start + t1, :, :sel.numel()] = sel.to(torch.int32)
                continue
            qc = q[b, start + t0:start + t1].to(acc).view(n, H, G, D)
            sub = None
            if stats is not None:
                sub = type(stats)(*(None if x is None else x[lo:hi] for x in stats))
            l = block_log_scores(qc, sub, scale, block_size, selection, cov, kb[lo:hi])
            chosen = topk_stable(group_scores(l), n_free) + lo  # [n, H, n_free]
            sel = torch.cat([forced.expand(n, H, -1), chosen], -1).sort(-1).values
            indices[b, start + t0:start + t1, :, :sel.shape[-1]] = sel.to(torch.int32)
    return indices


def _chunk_rows(L: int, block_size: int, per_row: int):
    """Query row ranges ``[t0, t1)`` inside single blocks, each small enough for the gather budget."""
    rows = max(1, min(block_size, GATHER_BUDGET // max(per_row, 1)))
    for c0 in range(0, L, block_size):
        c1 = min(c0 + block_size, L)
        for t0 in range(c0, c1, rows):
            yield t0, min(t0 + rows, c1)


def _gather(x_blocks: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """`[H, NB, bs, D]` blocks gathered by `[n, H, K]` block ids -> `[n, H, K * bs, D]`."""
    H = x_blocks.shape[0]
    n, _, K = idx.shape
    heads = torch.arange(H, device=idx.device)[None, :, None]
    out = x_blocks[heads, idx]  # [n, H, K, bs, D]
    return out.reshape(n, H, K * x_blocks.shape[2], x_blocks.shape[3])


def _sparse_chunk(qc, fq, K, V, FK, valid, scale):
    """Exact attention over the gathered tokens and the selected linear term over the same tiles.

    qc `[n, H, G, D]`, fq = phi(q_lin) `[n, H, G, F]`, K/V/FK = gathered k, v, phi(k_lin) `[n, H, N, *]`,
    valid `[n, H, N]` bool. Returns o `[n, H, G, Dv]`, sel_lin `[n, H, G, Dv]`, sel_mass `[n, H, G]`.
    """
    s = torch.einsum("nhgd,nhkd->nhgk", qc, K) * scale
    s = s.masked_fill(~valid[:, :, None], float("-inf"))
    o = torch.einsum("nhgk,nhkd->nhgd", torch.softmax(s, -1), V)
    w = torch.einsum("nhgf,nhkf->nhgk", fq, FK) * valid[:, :, None]
    return o, torch.einsum("nhgk,nhkd->nhgd", w, V), w.sum(-1)


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """`[L, H, D]` -> zero-padded `[H, NB, block_size, D]`."""
    L, H, D = x.shape
    nb = (L + block_size - 1) // block_size
    xp = x.new_zeros(nb * block_size, H, D)
    xp[:L] = x
    return xp.view(nb, block_size, H, D).permute(2, 0, 1, 3)


def _iter_chunks(q, k, v, q_lin, k_lin, indices, block_size, cu_seqlens, fmap=None):
    """Yield per query chunk its rows, positions, validity and the gathered K, V, k_lin tiles.

    With ``fmap`` the third gathered tile is phi(k_lin), computed once per sequence (forward only).
    """
    B, T, HQ, D = q.shape
    H, Dv = k.shape[2], v.shape[-1]
    acc = compute_dtype(q.dtype)
    for b, start, end in segments(B, T, cu_seqlens):
        L = end - start
        kls = k_lin[b, start:end]
        kls = feature_map(kls, fmap) if fmap else kls.to(acc)
        kb, vb, klb = (_blocks(x, block_size) for x in (k[b, start:end].to(acc), v[b, start:end].to(acc), kls))
        per_row = H * indices.shape[-1] * block_size * (D + Dv + kls.shape[-1])
        for t0, t1 in _chunk_rows(L, block_size, per_row):
            idx = indices[b, start + t0:start + t1].long()  # [n, H, K]
            idxc = idx.clamp(min=0)
            pos = idxc[..., None] * block_size + torch.arange(block_size, device=q.device)  # [n, H, K, bs]
            t = torch.arange(t0, t1, device=q.device)[:, None, None, None]
            valid = ((idx[..., None] >= 0) & (pos <= t)).flatten(2)  # [n, H, N]
            yield (b, start, L, slice(start + t0, start + t1), idxc, pos.flatten(2), valid,
                   _gather(kb, idxc), _gather(vb, idxc), _gather(klb, idxc))


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
        for b, _, _, rows, _, _, valid, K, V, FK in _iter_chunks(q, k, v, q_lin, k_lin, indices, block_size,
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
        seg_pad = {}
        for b, start, L, rows, _, pos, valid, K, V, KL in _iter_chunks(q, k, v, q_lin, k_lin, indices, block_size,
                                                                       cu_seqlens):
            n = rows.stop - rows.start
            with torch.enable_grad():
                leaves = [q[b, rows].to(acc).view(n, H, G, D), q_lin[b, rows].to(acc).view(n, H, G, Dl), K, V, KL]
                leaves = [x.detach().requires_grad_() for x in leaves]
                qc, qlc, K_, V_, KL_ = leaves
                outs = _sparse_chunk(qc, feature_map(qlc, fmap), K_, V_, feature_map(KL_, fmap), valid, scale)
                grads = torch.autograd.grad(
                    outs, leaves, (do[b, rows].view(n, H, G, Dv), dsel_lin[b, rows].view(n, H, G, Dv),
                                   dsel_mass[b, rows].view(n, H, G)))
            gq, gql, gK, gV, gKL = grads
            dq[b, rows] += gq.flatten(1, 2)
            dql[b, rows] += gql.flatten(1, 2)
            # scatter the gathered tiles' gradients back: flat index = head * padded_len + position
            if (b, start) not in seg_pad:
                padded = ((L + block_size - 1) // block_size) * block_size
                seg_pad[(b, start)] = [torch.zeros(H * padded, x.shape[-1], dtype=acc, device=q.device)
                                       for x in (k, v, k_lin)]
            bufs = seg_pad[(b, start)]
            padded = bufs[0].shape[0] // H
            flat = (pos + torch.arange(H, device=q.device)[None, :, None] * padded).reshape(-1)
            for buf, g in zip(bufs, (gK, gV, gKL)):
                buf.index_add_(0, flat, g.reshape(-1, g.shape[-1]))
        for (b, start), bufs in seg_pad.items():
            padded = bufs[0].shape[0] // H
            L = next(e - s for bb, s, e in segments(B, T, cu_seqlens) if (bb, s) == (b, start))
            for dst, buf in zip((dk, dv, dkl), bufs):
                dst[b, start:start + L] += buf.view(H, padded, -1)[:, :L].transpose(0, 1)
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
    outs, masses = [], []
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
        o = (inter + intra).reshape(nc * C, HQ, Dv + 1)[:L]
        outs.append((b, start, end, o))
    o = fq.new_zeros(B, T, HQ, Dv + 1)
    for b, start, end, ob in outs:
        o[b, start:end] = ob
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
                    cu_seqlens: Optional[torch.Tensor] = None) -> SPLAOutput:
    """The torch backend of :func:`spla.spla_attn` (arguments already validated and defaulted)."""
    indices = chunk_spla_select(q, k, block_size=block_size, topk=topk, sink_blocks=sink_blocks,
                                local_blocks=local_blocks, selection=selection, cov=cov, rep_keys=rep_keys,
                                scale=scale, cu_seqlens=cu_seqlens)
    o_sparse, sel_lin, sel_mass = SparseSelectedFunction.apply(q, k, v, q_lin, k_lin, indices, block_size, scale,
                                                               feature_map_name, cu_seqlens)
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
