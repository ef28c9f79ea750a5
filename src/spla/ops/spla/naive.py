# -*- coding: utf-8 -*-
"""Ground truth of SPLA: dense ``T x T`` masks, written for clarity, usable in fp64.

Every sequence is handled on its own; per KV head and query token the selection is built exactly as
SPEC §2-§3 words it, then both outputs are computed from explicit token masks (no subtraction).
O(T^2) time and memory: for tests and small inputs only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from spla.ops.spla.utils import SPLAOutput, compute_dtype, feature_map, forced_blocks, segments


def _naive_block_log_scores(q, kseq, scale, block_size, nb, selection, cov, rep_keys):
    """``l[t, hq, j]`` for every query ``t`` and complete block ``j`` of one sequence, one block at a time."""
    L, HQ, D = q.shape
    H = kseq.shape[1]
    G = HQ // H
    kq = kseq.repeat_interleave(G, dim=1)  # [L, HQ, D]: the KV head each query head reads
    out = q.new_full((L, HQ, nb), float("-inf"))
    for j in range(nb):
        kj = kq[j * block_size:(j + 1) * block_size]  # [bs, HQ, D]
        logits = torch.einsum("thd,ihd->thi", q, kj) * scale  # [L, HQ, bs]
        if selection == "oracle":
            out[:, :, j] = torch.logsumexp(logits, -1) - math.log(block_size)
            continue
        mean = kj.mean(0)  # [HQ, D]
        dev = kj - mean
        est = scale * torch.einsum("thd,hd->th", q, mean)
        if selection == "taylor2":
            if cov == "diag":
                var = (dev ** 2).mean(0)
                quad = torch.einsum("thd,hd->th", q ** 2, var)
            else:
                sigma = torch.einsum("ihd,ihe->hde", dev, dev) / block_size
                quad = torch.einsum("thd,hde,the->th", q, sigma, q)
            est = est + 0.5 * scale ** 2 * quad
        if rep_keys > 0:
            norms = dev.norm(dim=-1)  # [bs, HQ]
            for h in range(HQ):
                # largest deviation first; among equal norms the lower position first
                order = sorted(range(block_size), key=lambda i: (-norms[i, h].item(), i))[:rep_keys]
                floor = logits[:, h, order].amax(-1) - math.log(block_size)
                est[:, h] = torch.maximum(est[:, h], floor)
        out[:, :, j] = est
    return out


def naive_spla_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lin: Optional[torch.Tensor] = None,
                    k_lin: Optional[torch.Tensor] = None, *, block_size: int = 64, topk: int = 16,
                    sink_blocks: int = 1, local_blocks: int = 2, selection: str = "taylor2", cov: str = "diag",
                    rep_keys: int = 1, feature_map_name: str = "softmax2", scale: Optional[float] = None,
                    cu_seqlens: Optional[torch.Tensor] = None) -> SPLAOutput:
    """Dense-mask reference of :func:`spla.spla_attn` (same arguments, already validated)."""
    B, T, HQ, D = q.shape
    H, Dv = k.shape[2], v.shape[-1]
    G = HQ // H
    q_lin = q if q_lin is None else q_lin
    k_lin = k if k_lin is None else k_lin
    scale = D ** -0.5 if scale is None else scale
    acc = compute_dtype(q.dtype)

    o_sparse = q.new_zeros(B, T, HQ, Dv, dtype=acc)
    o_rla = q.new_zeros(B, T, HQ, Dv, dtype=acc)
    mass = q.new_zeros(B, T, HQ, dtype=acc)
    indices = torch.full((B, T, H, topk), -1, dtype=torch.int32, device=q.device)

    for b, start, end in segments(B, T, cu_seqlens):
        L = end - start
        qs, ks, vs = (x[b, start:end].to(acc) for x in (q, k, v))
        nb = L // block_size
        with torch.no_grad():
            l = _naive_block_log_scores(qs.detach(), ks.detach(), scale, block_size, nb, selection, cov, rep_keys)
        # token-level selection mask U[t, h, i] per KV head
        U = torch.zeros(L, H, L, dtype=torch.bool, device=q.device)
        for t in range(L):
            c = t // block_size
            forced = forced_blocks(c, sink_blocks, local_blocks)
            cands = list(range(sink_blocks, c - local_blocks + 1))
            n_free = topk - len(forced)
            for h in range(H):
                chosen = cands
                if len(cands) > n_free:
                    # group score: per-head softmax over the candidates, summed over the group
                    s = torch.softmax(l[t, h * G:(h + 1) * G][:, cands], -1).sum(0)
                    order = sorted(range(len(cands)), key=lambda j: (-s[j].item(), j))[:n_free]
                    chosen = [cands[j] for j in order]
                sel = sorted(set(forced) | set(chosen))
                indices[b, start + t, h, :len(sel)] = torch.tensor(sel, dtype=torch.int32)
                for j in sel:
                    U[t, h, j * block_size:min((j + 1) * block_size, t + 1)] = True
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        Uq = U.repeat_interleave(G, dim=1)  # [L, HQ, L]
        R = causal[:, None, :] & ~Uq  # residual (unselected) tokens
        kq, vq = ks.repeat_interleave(G, dim=1), vs.repeat_interleave(G, dim=1)
        logits = torch.einsum("thd,ihd->thi", qs, kq) * scale
        p = torch.softmax(logits.masked_fill(~Uq, float("-inf")), -1)
        o_sparse[b, start:end] = torch.einsum("thi,ihd->thd", p, vq)
        fq = feature_map(q_lin[b, start:end], feature_map_name)
        fk = feature_map(k_lin[b, start:end], feature_map_name).repeat_interleave(G, dim=1)
        w = torch.einsum("thf,ihf->thi", fq, fk) * R
        o_rla[b, start:end] = torch.einsum("thi,ihd->thd", w, vq)
        mass[b, start:end] = w.sum(-1)
    return SPLAOutput(o_sparse.to(q.dtype), o_rla.to(q.dtype), mass, indices)
