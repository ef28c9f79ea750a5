# -*- coding: utf-8 -*-
"""Triton kernels of one SPLA decode step (SPEC §7), used by :class:`SPLADecodeState` on CUDA.

Per sequence ``b`` and KV head ``h`` a step

1. ``spla_decode_fwd_kernel_score``: reads the block statistics of the candidate blocks once, computes the
   per-head log estimates ``l`` (second order, floored by the representative keys), their log-sum-exp over
   the candidates, and writes the group score ``s_j`` of every block (``+inf`` for forced blocks, ``-inf``
   for blocks that are neither forced nor candidates). A top-k of ``s`` is then the selection.
2. ``spla_decode_fwd_kernel_attn``: one program per selected block (split-K over the selection): exact
   attention partials (max, sum, weighted values) over the block's visible tokens and, over the same K/V
   tiles, the selected linear term and its mass; unselected blocks are never read.
3. a small combine (log-sum-exp over the partials), the global term ``phi(q)·S`` and the subtraction.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from spla.ops.spla.utils import feature_map as torch_feature_map


@triton.jit
def spla_decode_fwd_kernel_score(q, mean, var, reps, lengths, lbuf, s_out, scale, log_bs, NB_cap, NBS,
                                 HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, BG: tl.constexpr,
                                 D: tl.constexpr, BD: tl.constexpr, R: tl.constexpr, BS: tl.constexpr,
                                 SINK: tl.constexpr, LOCAL: tl.constexpr, TAYLOR2: tl.constexpr,
                                 BJ: tl.constexpr):
    i_bh = tl.program_id(0).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    t = tl.load(lengths + i_b).to(tl.int64) - 1
    c = t // BS
    lo = SINK
    hi = c - LOCAL + 1
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    # [BG, BD] queries of the group, fp32
    b_q = tl.load(q + (i_b * HQ + i_h * G + o_g[:, None]) * D + o_d[None, :], mask=m_g[:, None] & m_d[None, :],
                  other=0.).to(tl.float32)
    b_q2 = b_q * b_q
    m_run = tl.full([BG], float("-inf"), tl.float32)
    s_run = tl.zeros([BG], tl.float32)
    # pass 1: estimates of the candidate blocks, their running log-sum-exp per head
    for j0 in range(lo, hi, BJ):
        o_j = j0 + tl.arange(0, BJ)
        m_j = o_j < hi
        base = ((i_b * NB_cap + o_j) * H + i_h) * D  # [BJ]
        m_jd = m_j[:, None] & m_d[None, :]
        b_mean = tl.load(mean + base[:, None] + o_d[None, :], mask=m_jd, other=0.)  # [BJ, BD]
        b_l = tl.dot(b_q, tl.trans(b_mean), input_precision="ieee") * scale  # [BG, BJ]
        if TAYLOR2:
            b_var = tl.load(var + base[:, None] + o_d[None, :], mask=m_jd, other=0.)
            b_l += 0.5 * scale * scale * tl.dot(b_q2, tl.trans(b_var), input_precision="ieee")
        for r in tl.static_range(R):
            rbase = (((i_b * NB_cap + o_j) * H + i_h) * R + r) * D
            b_rep = tl.load(reps + rbase[:, None] + o_d[None, :], mask=m_jd, other=0.)
            b_l = tl.maximum(b_l, tl.dot(b_q, tl.trans(b_rep), input_precision="ieee") * scale - log_bs)
        # padded heads get a finite 0 (ignored later), blocks past the candidates -inf
        b_l = tl.where(m_g[:, None], b_l, 0.)
        b_l = tl.where(m_j[None, :], b_l, float("-inf"))
        tl.store(lbuf + (i_b * HQ + i_h * G + o_g[:, None]) * NBS + o_j[None, :], b_l,
                 mask=m_g[:, None] & m_j[None, :])
        m_new = tl.maximum(m_run, tl.max(b_l, 1))
        s_run = s_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(b_l - m_new[:, None]), 1)
        m_run = m_new
    lse = m_run + tl.log(s_run)  # [BG]
    # pass 2: group score of every block of the sequence so far
    for j0 in range(0, c + 1, BJ):
        o_j = j0 + tl.arange(0, BJ)
        is_cand = (o_j >= lo) & (o_j < hi)
        b_l = tl.load(lbuf + (i_b * HQ + i_h * G + o_g[:, None]) * NBS + o_j[None, :],
                      mask=m_g[:, None] & is_cand[None, :], other=float("-inf"))
        b_p = tl.where(m_g[:, None] & is_cand[None, :], tl.exp(b_l - lse[:, None]), 0.)
        b_s = tl.sum(b_p, 0)  # [BJ]
        forced = (o_j <= c) & ((o_j < SINK) | (o_j >= c - LOCAL + 1))
        b_s = tl.where(is_cand, b_s, float("-inf"))
        b_s = tl.where(forced, float("inf"), b_s)
        tl.store(s_out + i_bh * NBS + o_j, b_s, mask=o_j < NBS)


@triton.jit
def _phi(x, m, FMAP: tl.constexpr):
    """Feature map of rows of x `[N, BL]` (mask m `[BL]` of real lanes): returns the two halves (fp32)."""
    if FMAP == 0:  # softmax2: [softmax(x), softmax(-x)] over the real lanes
        xp = tl.where(m[None, :], x, float("-inf"))
        ep = tl.exp(xp - tl.max(xp, 1)[:, None])
        f1 = ep / tl.sum(ep, 1)[:, None]
        xn = tl.where(m[None, :], -x, float("-inf"))
        en = tl.exp(xn - tl.max(xn, 1)[:, None])
        f2 = en / tl.sum(en, 1)[:, None]
    elif FMAP == 1:  # elu1: elu(x) + 1 (single half; the second is zero)
        f1 = tl.where(m[None, :], tl.where(x > 0, x + 1., tl.exp(tl.minimum(x, 0.))), 0.)
        f2 = tl.zeros_like(f1)
    else:  # relu2: [relu(x), relu(-x)]
        f1 = tl.where(m[None, :], tl.maximum(x, 0.), 0.)
        f2 = tl.where(m[None, :], tl.maximum(-x, 0.), 0.)
    return f1, f2


@triton.jit
def spla_decode_fwd_kernel_attn(q, q_lin, k, v, k_lin, indices, lengths, p_m, p_l, p_acc, p_lin, p_mass, p_cnt,
                                scale, T_cap, HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
                                BG: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, DV: tl.constexpr,
                                BDV: tl.constexpr, DL: tl.constexpr, BDL: tl.constexpr, BS: tl.constexpr,
                                TOPK: tl.constexpr, FMAP: tl.constexpr):
    i_bh = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    t = tl.load(lengths + i_b).to(tl.int64) - 1
    blk = tl.load(indices + i_bh * TOPK + i_s).to(tl.int64)
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    o_d, o_v, o_l = tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BDL)
    m_d, m_v, m_l = o_d < D, o_v < DV, o_l < DL
    o_i = tl.arange(0, BS)
    pos = tl.maximum(blk, 0) * BS + o_i
    m_i = (blk >= 0) & (pos <= t)  # [BS] visible selected tokens of this block
    rows = i_b * HQ + i_h * G + o_g  # [BG]
    b_q = tl.load(q + rows[:, None] * D + o_d[None, :], mask=m_g[:, None] & m_d[None, :], other=0.).to(tl.float32)
    tok = (i_b * T_cap + pos) * H + i_h  # [BS]
    b_k = tl.load(k + tok[:, None] * D + o_d[None, :], mask=m_i[:, None] & m_d[None, :], other=0.).to(tl.float32)
    b_v = tl.load(v + tok[:, None] * DV + o_v[None, :], mask=m_i[:, None] & m_v[None, :], other=0.).to(tl.float32)
    # exact attention partials over this block
    b_s = tl.dot(b_q, tl.trans(b_k)) * scale  # [BG, BS]
    b_s = tl.where(m_i[None, :], b_s, float("-inf"))
    b_m = tl.max(b_s, 1)
    b_ms = tl.where(b_m == float("-inf"), 0., b_m)
    b_p = tl.exp(b_s - b_ms[:, None])
    b_acc = tl.dot(b_p, b_v)  # [BG, BDV]
    # selected linear term over the same tiles
    b_ql = tl.load(q_lin + rows[:, None] * DL + o_l[None, :], mask=m_g[:, None] & m_l[None, :], other=0.).to(tl.float32)
    b_kl = tl.load(k_lin + tok[:, None] * DL + o_l[None, :], mask=m_i[:, None] & m_l[None, :], other=0.).to(tl.float32)
    fq1, fq2 = _phi(b_ql, m_l, FMAP)
    fk1, fk2 = _phi(b_kl, m_l, FMAP)
    b_w = tl.dot(fq1, tl.trans(fk1)) + tl.dot(fq2, tl.trans(fk2))  # [BG, BS]
    b_w = tl.where(m_i[None, :], b_w, 0.)
    b_lin = tl.dot(b_w, b_v)
    o = rows * TOPK + i_s  # [BG]
    tl.store(p_m + o, b_m, mask=m_g)
    tl.store(p_l + o, tl.sum(b_p, 1), mask=m_g)
    tl.store(p_acc + o[:, None] * DV + o_v[None, :], b_acc, mask=m_g[:, None] & m_v[None, :])
    tl.store(p_lin + o[:, None] * DV + o_v[None, :], b_lin, mask=m_g[:, None] & m_v[None, :])
    tl.store(p_mass + o, tl.sum(b_w, 1), mask=m_g)
    tl.store(p_cnt + i_bh * TOPK + i_s, tl.sum(m_i.to(tl.int32), 0))


_FMAP = {"softmax2": 0, "elu1": 1, "relu2": 2}


def _p2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def decode_select(state, q: torch.Tensor) -> torch.Tensor:
    """Selected blocks `[B, H, topk]` int32 (ascending, -1 padded) of the newest token of every sequence."""
    B, HQ, D = q.shape
    H, G, bs, topk = state.H, HQ // state.H, state.block_size, state.topk
    NB_cap = state.mean.shape[1]
    NBS = NB_cap  # the capacity, not the longest length: no host sync, CUDA-graph capturable
    lbuf = torch.empty(B, HQ, NBS, dtype=torch.float32, device=q.device)
    s = torch.empty(B, H, NBS, dtype=torch.float32, device=q.device)
    R = state.rep_keys
    spla_decode_fwd_kernel_score[(B * H,)](
        q.contiguous(), state.mean, state.second, state.reps if R else state.mean, state.lengths, lbuf, s,
        state.scale, math.log(bs), NB_cap, NBS, HQ=HQ, H=H, G=G, BG=_p2(G), D=D, BD=_p2(D), R=R, BS=bs,
        SINK=state.sink_blocks, LOCAL=state.local_blocks, TAYLOR2=state.selection == "taylor2", BJ=64)
    # blocks past a shorter sequence's end were not written: they are neither forced nor candidates
    c = (state.lengths - 1) // bs
    s = torch.where(torch.arange(NBS, device=q.device)[None, None, :] <= c[:, None, None], s, float("-inf"))
    k = min(topk, NBS)
    vals, idx = torch.topk(s, k, dim=-1)
    idx = torch.where(vals > float("-inf"), idx, torch.iinfo(torch.int32).max).sort(-1).values
    out = torch.full((B, H, topk), -1, dtype=torch.int32, device=q.device)
    out[..., :k] = torch.where(idx == torch.iinfo(torch.int32).max, -1, idx).to(torch.int32)
    return out


def decode_attend(state, q: torch.Tensor, q_lin: torch.Tensor, indices: torch.Tensor):
    """Outputs of the newest token given its selection: ``o_sparse, o_rla [B, HQ, Dv]``, ``rla_mass [B, HQ]``."""
    B, HQ, D = q.shape
    H, G, bs, topk = state.H, HQ // state.H, state.block_size, state.topk
    Dv, Dl = state.Dv, state.Dl
    dev = q.device
    p_m = torch.empty(B, HQ, topk, dtype=torch.float32, device=dev)
    p_l, p_mass = torch.empty_like(p_m), torch.empty_like(p_m)
    p_acc = torch.empty(B, HQ, topk, Dv, dtype=torch.float32, device=dev)
    p_lin = torch.empty_like(p_acc)
    p_cnt = torch.empty(B, H, topk, dtype=torch.int32, device=dev)
    spla_decode_fwd_kernel_attn[(B * H, topk)](
        q.contiguous(), q_lin.contiguous(), state.k, state.v, state.k_lin, indices.contiguous(), state.lengths,
        p_m, p_l, p_acc, p_lin, p_mass, p_cnt, state.scale, state.k.shape[1], HQ=HQ, H=H, G=G, BG=_p2(G), D=D,
        BD=_p2(D), DV=Dv, BDV=_p2(Dv), DL=Dl, BDL=_p2(Dl), BS=bs, TOPK=topk, FMAP=_FMAP[state.fmap])
    # combine the split-K partials by log-sum-exp
    m = p_m.amax(-1, keepdim=True)
    w = torch.exp(p_m - m)  # blocks with no visible token have m = -inf -> weight 0
    o = (w[..., None] * p_acc).sum(2) / (w * p_l).sum(-1, keepdim=True)
    sel_lin, sel_mass = p_lin.sum(2), p_mass.sum(-1)
    fq = torch_feature_map(q_lin, state.fmap).view(B, H, G, -1)
    glob = torch.einsum("bhgf,bhfd->bhgd", fq, state.S).reshape(B, HQ, Dv)
    gmass = torch.einsum("bhgf,bhf->bhg", fq, state.z).reshape(B, HQ)
    empty = (p_cnt.sum(-1) == state.lengths[:, None]).repeat_interleave(G, 1)  # [B, HQ]: count, not cancellation
    o_rla = torch.where(empty[..., None], 0.0, glob - sel_lin)
    mass = torch.where(empty, 0.0, gmass - sel_mass)
    return o, o_rla, mass
