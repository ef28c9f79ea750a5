# -*- coding: utf-8 -*-
"""Triton kernels of one SPLA decode step (SPEC §7), used by :class:`SPLADecodeState` on CUDA.

A step is four launches (after ``lengths += 1``) and no host sync (so it can be captured in a CUDA graph):

1. ``spla_decode_fwd_kernel_score``: the candidate blocks of every (sequence ``b``, KV head ``h``) are split
   into tiles, one program per tile: it reads the tile's block statistics once and writes the per-head log
   estimates ``l`` (second order, floored by the representative keys) and a partial log-sum-exp. The first
   tile's program also writes the new token to the K/V/k_lin caches (and, when it completes a block, that
   block's statistics).
2. ``spla_decode_fwd_kernel_select``: per ``(b, h)``, merges the partial log-sum-exps, forms the group score
   ``s_j`` of every block (forced blocks first, blocks that are neither forced nor candidates never) and
   keeps the top-k of packed (score, block) keys with ``tl.topk``, chunk by chunk.
3. ``spla_decode_fwd_kernel_attn``: one program per selected block, or per group of selected blocks merged by
   an online softmax, or per slice of one (split-K over the selection): exact attention partials (max, sum,
   weighted values) over the visible tokens and, over the same K/V tiles, the selected linear term and its
   mass; unselected blocks are never read.
4. ``spla_decode_fwd_kernel_combine``: per ``(b, h)`` and slice of value channels, adds the new token to the fp32
   linear state, then the log-sum-exp combine of the partials, the global term ``phi(q)·S`` and the subtraction
   (zero where every visible token was selected, by count).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from spla.ops.spla.linear import compute_dtype
from spla.ops.spla.parallel import block_stats_tile



@triton.jit
def _newest_token(lengths, i_bh, HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, BG: tl.constexpr,
                  BS: tl.constexpr, LOCAL: tl.constexpr):
    """Where the newest token of (sequence, KV head) ``i_bh`` stands: its position ``t``, its own block ``c``, the
    end ``hi`` of the candidate blocks, and the query rows ``rows [BG]`` (mask ``m_g``) of the KV head's group."""
    i_b, i_h = i_bh // H, i_bh % H
    t = tl.load(lengths + i_b).to(tl.int64) - 1
    c = t // BS
    o_g = tl.arange(0, BG)
    return t, c, c - LOCAL + 1, i_b * HQ + i_h * G + o_g, o_g < G


@triton.jit
def _write_token(k_new, v_new, kl_new, k, v, k_lin, mean, var, reps, i_b, i_h, t, T_cap, NB_cap,
                 H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
                 DL: tl.constexpr, BDL: tl.constexpr, BS: tl.constexpr, BSP: tl.constexpr, R: tl.constexpr,
                 SECOND: tl.constexpr):
    """Write the newest token (position ``t``) of (sequence ``i_b``, KV head ``i_h``) to the K/V/k_lin caches
    and, when it completes its block, that block's statistics (from the cached keys and the new key held in
    registers). Nothing of this step reads them before a later launch: the block is the token's own (forced)."""
    i_bh = i_b * H + i_h
    o_d, o_v, o_l = tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BDL)
    m_d = o_d < D
    b_k = tl.load(k_new + i_bh * D + o_d, mask=m_d, other=0.).to(k.dtype.element_ty)
    tok = (i_b * T_cap + t) * H + i_h
    tl.store(k + tok * D + o_d, b_k, mask=m_d)
    tl.store(v + tok * DV + o_v, tl.load(v_new + i_bh * DV + o_v, mask=o_v < DV, other=0.).to(v.dtype.element_ty),
             mask=o_v < DV)
    tl.store(k_lin + tok * DL + o_l,
             tl.load(kl_new + i_bh * DL + o_l, mask=o_l < DL, other=0.).to(k_lin.dtype.element_ty), mask=o_l < DL)
    if (t + 1) % BS == 0:
        j = (t + 1) // BS - 1
        o_s = tl.arange(0, BSP)
        m_k = (o_s < BS)[:, None] & m_d[None, :]
        pos = j * BS + o_s
        b_blk = tl.load(k + ((i_b * T_cap + pos[:, None]) * H + i_h) * D + o_d[None, :],
                        mask=m_k & (pos < t)[:, None], other=0.).to(tl.float32)
        b_blk = tl.where((pos == t)[:, None], b_k.to(tl.float32)[None, :], b_blk)
        p = ((i_b * NB_cap + j) * H + i_h) * D
        block_stats_tile(b_blk, m_k, o_s, o_d, m_d, mean + p, var + p, reps + p * R, D, BS, BSP, R, SECOND)


@triton.jit
def spla_decode_fwd_kernel_score(q, mean, var, reps, lengths, lbuf, p_m, p_s, k_new, v_new, kl_new, k, v, k_lin,
                                 scale, log_bs, NB_cap, NBS, NT, T_cap,
                                 HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, BG: tl.constexpr,
                                 D: tl.constexpr, BD: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
                                 DL: tl.constexpr, BDL: tl.constexpr, R: tl.constexpr, BS: tl.constexpr,
                                 BSP: tl.constexpr, SINK: tl.constexpr, LOCAL: tl.constexpr, TAYLOR2: tl.constexpr,
                                 BJ: tl.constexpr, APPEND: tl.constexpr, TPP: tl.constexpr = 1,
                                 NSTAGES: tl.constexpr = 1, LOWP: tl.constexpr = False, PDL: tl.constexpr = False):
    """``TPP`` consecutive tiles of ``BJ`` candidate blocks of one (sequence, KV head): log estimates and one
    partial log-sum-exp over them (online across the tiles; ``NSTAGES`` > 1 software-pipelines the tiles' loads).
    With ``APPEND`` the program-0 also writes the newest token to the caches (``_write_token``). ``LOWP``: q and
    the statistics are bf16 and enter the dots as they are (``_lowp_scores``), else fp32 with tf32x3 dots.
    ``PDL``: lets the next launch of the step start early (programmatic dependent launch; it waits for this one
    before it reads what this one writes). The step's first launch itself starts after all earlier work."""
    i_p = tl.program_id(0).to(tl.int64)
    if PDL:
        gdc_launch_dependents()
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    # q is loaded beside the length, not after it: the step is bound by memory latency at small batches
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    q_rows = i_b * HQ + i_h * G + tl.arange(0, BG)
    b_q = tl.load(q + q_rows[:, None] * D + o_d[None, :], mask=(tl.arange(0, BG) < G)[:, None] & m_d[None, :],
                  other=0.)
    t, c, hi, rows, m_g = _newest_token(lengths, i_bh, HQ, H, G, BG, BS, LOCAL)
    if APPEND:
        if i_p == 0:
            _write_token(k_new, v_new, kl_new, k, v, k_lin, mean, var, reps, i_b, i_h, t, T_cap, NB_cap, H, D, BD,
                         DV, BDV, DL, BDL, BS, BSP, R, TAYLOR2)
    b_m = tl.full([BG], float("-inf"), tl.float32)
    b_sum = tl.zeros([BG], tl.float32)
    j0 = i_p * (TPP * BJ)
    if (j0 < hi) & (j0 + TPP * BJ > SINK):
        if LOWP:
            # q and the statistics are bf16: the matrix units take them as they are (fp32 accumulation), and q*q
            # rounded to bf16, the operands of the parallel op's bf16 scoring (spla_fwd_kernel_topk)
            b_qd = b_q
            b_q2 = (b_q.to(tl.float32) * b_q.to(tl.float32)).to(b_q.dtype)
        else:  # a new name: b_q keeps its load's dtype (a compiled branch may not retype it)
            b_qd = b_q.to(tl.float32)
            b_q2 = b_qd * b_qd
        for u in tl.range(0, TPP, num_stages=NSTAGES):
            o_j = j0 + u * BJ + tl.arange(0, BJ)
            m_j = (o_j >= SINK) & (o_j < hi)
            base = ((i_b * NB_cap + o_j) * H + i_h) * D  # [BJ]
            m_jd = m_j[:, None] & m_d[None, :]
            if LOWP:
                b_mean = tl.load(mean + base[:, None] + o_d[None, :], mask=m_jd, other=0.)
                b_l = tl.dot(b_qd, tl.trans(b_mean)) * scale  # [BG, BJ]
            else:
                b_mean = tl.load(mean + base[:, None] + o_d[None, :], mask=m_jd, other=0.).to(tl.float32)
                b_l = tl.dot(b_qd, tl.trans(b_mean), input_precision="tf32x3") * scale  # [BG, BJ]
            if TAYLOR2:
                if LOWP:
                    b_var = tl.trans(tl.load(var + base[:, None] + o_d[None, :], mask=m_jd, other=0.))
                    b_l += 0.5 * scale * scale * tl.dot(b_q2, b_var)
                else:
                    b_var = tl.load(var + base[:, None] + o_d[None, :], mask=m_jd, other=0.).to(tl.float32)
                    b_l += 0.5 * scale * scale * tl.dot(b_q2, tl.trans(b_var), input_precision="tf32x3")
            for r in tl.static_range(R):
                rbase = (((i_b * NB_cap + o_j) * H + i_h) * R + r) * D
                if LOWP:
                    b_rep = tl.load(reps + rbase[:, None] + o_d[None, :], mask=m_jd, other=0.)
                    b_r = tl.dot(b_qd, tl.trans(b_rep))
                else:
                    b_rep = tl.load(reps + rbase[:, None] + o_d[None, :], mask=m_jd, other=0.).to(tl.float32)
                    b_r = tl.dot(b_qd, tl.trans(b_rep), input_precision="tf32x3")
                b_l = tl.maximum(b_l, b_r * scale - log_bs)
            # padded heads get a finite 0 (never stored), non-candidates -inf
            b_l = tl.where(m_g[:, None], b_l, 0.)
            b_l = tl.where(m_j[None, :], b_l, float("-inf"))
            tl.store(lbuf + rows[:, None] * NBS + o_j[None, :], b_l, mask=m_g[:, None] & m_j[None, :])
            # online log-sum-exp over this program's tiles (-inf until a candidate is seen)
            b_mn = tl.maximum(b_m, tl.max(b_l, 1))
            b_ref = tl.where(b_mn == float("-inf"), 0., b_mn)
            b_sum = b_sum * tl.exp(b_m - b_ref) + tl.sum(tl.exp(b_l - b_ref[:, None]), 1)
            b_m = b_mn
    tl.store(p_m + rows * NT + i_p, b_m, mask=m_g)
    tl.store(p_s + rows * NT + i_p, b_sum, mask=m_g)


@triton.jit
def spla_decode_fwd_kernel_select(lbuf, p_m, p_s, lengths, indices, part, NBS, NT, SPAN,
                                  HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, BG: tl.constexpr,
                                  BS: tl.constexpr, SINK: tl.constexpr, LOCAL: tl.constexpr,
                                  TOPK: tl.constexpr, KP: tl.constexpr, BNT: tl.constexpr, BC: tl.constexpr,
                                  MODE: tl.constexpr = 0, NSPLIT: tl.constexpr = 1, PDL: tl.constexpr = False):
    """Group scores of the blocks of one (sequence, KV head) and their top-k (ascending, -1 padded).

    ``MODE`` 0: one program per (sequence, KV head) over all blocks, writes ``indices``. ``MODE`` 1: program
    ``(i_bh, i_sp)`` takes blocks ``i_sp * SPAN ...`` and writes its ``KP`` best packed keys to
    ``part [B*H, NSPLIT, KP]``; ``MODE`` 2: one program per (sequence, KV head) merges the ``NSPLIT`` partial
    lists into ``indices`` (the top-k split over ``NSPLIT`` programs: two short launches instead of one long).
    ``PDL``: launched as a programmatic dependent of the previous launch: lets the next one start, then waits for
    the previous one's writes before reading anything."""
    i_bh = tl.program_id(0).to(tl.int64)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    BIG = 2147483647
    NONE = -9223372036854775807 - 1
    INF_BITS = 0x7F800000
    o_k = tl.arange(0, KP)
    if MODE == 2:
        o_p = tl.arange(0, NSPLIT * KP)
        b_top = tl.topk(tl.load(part + i_bh * (NSPLIT * KP) + o_p), KP)
    else:
        t, c, hi, rows, m_g = _newest_token(lengths, i_bh, HQ, H, G, BG, BS, LOCAL)
        # per-head log-sum-exp over the candidates from the tiles' partials
        o_n = tl.arange(0, BNT)
        m_gn = m_g[:, None] & (o_n < NT)[None, :]
        b_pm = tl.load(p_m + rows[:, None] * NT + o_n[None, :], mask=m_gn, other=float("-inf"))
        b_ps = tl.load(p_s + rows[:, None] * NT + o_n[None, :], mask=m_gn, other=0.)
        b_mx = tl.max(b_pm, 1)
        b_mx = tl.where(b_mx == float("-inf"), 0., b_mx)
        b_lse = b_mx + tl.log(tl.sum(b_ps * tl.exp(b_pm - b_mx[:, None]), 1))  # [BG]
        # packed (score, block) keys: ties go to the lower block, as the torch top-k of the op
        j_lo, j_hi = 0, c + 1
        if MODE == 1:
            i_sp = tl.program_id(1).to(tl.int64)
            j_lo = i_sp * SPAN
            j_hi = tl.minimum(c + 1, j_lo + SPAN)
        b_top = tl.full([KP], NONE, tl.int64)
        for j0 in range(j_lo, j_hi, BC):
            o_j = j0 + tl.arange(0, BC)
            is_cand = (o_j >= SINK) & (o_j < hi) & (o_j < j_hi)
            m_l = m_g[:, None] & is_cand[None, :]
            b_l = tl.load(lbuf + rows[:, None] * NBS + o_j[None, :], mask=m_l, other=float("-inf"))
            b_s = tl.sum(tl.where(m_l, tl.exp(b_l - b_lse[:, None]), 0.), 0)  # [BC]
            b_bits = b_s.to(tl.int32, bitcast=True)
            b_bits = b_bits ^ ((b_bits >> 31) & 0x7FFFFFFF)
            forced = (o_j <= c) & (o_j < j_hi) & ((o_j < SINK) | (o_j >= hi))
            b_bits = tl.where(forced, INF_BITS, b_bits)
            b_key = (b_bits.to(tl.int64) << 32) | (BIG - o_j).to(tl.int64)
            b_key = tl.where(is_cand | forced, b_key, NONE)
            b_top = tl.topk(tl.join(b_top, tl.topk(b_key, KP)).reshape([2 * KP]), KP)
        if MODE == 1:
            tl.store(part + (i_bh * NSPLIT + tl.program_id(1)) * KP + o_k, b_top)
    if MODE != 1:
        b_idx = tl.where((b_top != NONE) & (o_k < TOPK), BIG - (b_top & 0xFFFFFFFF), BIG)
        b_idx = tl.sort(b_idx)
        b_idx = tl.where(b_idx < BIG, b_idx, -1).to(tl.int32)
        tl.store(indices + i_bh * TOPK + o_k, b_idx, mask=o_k < TOPK)


@triton.jit
def _phi(x, m, FMAP: tl.constexpr):
    """Feature map of rows of x `[N, BL]` (mask m `[BL]` of real lanes): returns the two halves (fp32)."""
    if FMAP == 0:  # softmax2: [softmax(x), softmax(-x)] over the real lanes
        # one reciprocal per row, then products: a division per element is a dozen instructions, and the decode
        # attention applies this to every row of every selected block
        xp = tl.where(m[None, :], x, float("-inf"))
        ep = tl.exp(xp - tl.max(xp, 1)[:, None])
        f1 = ep * (1. / tl.sum(ep, 1))[:, None]
        xn = tl.where(m[None, :], -x, float("-inf"))
        en = tl.exp(xn - tl.max(xn, 1)[:, None])
        f2 = en * (1. / tl.sum(en, 1))[:, None]
    elif FMAP == 1:  # elu1: elu(x) + 1 (single half; the second is zero)
        f1 = tl.where(m[None, :], tl.where(x > 0, x + 1., tl.exp(tl.minimum(x, 0.))), 0.)
        f2 = tl.zeros_like(f1)
    else:  # relu2: [relu(x), relu(-x)]
        f1 = tl.where(m[None, :], tl.maximum(x, 0.), 0.)
        f2 = tl.where(m[None, :], tl.maximum(-x, 0.), 0.)
    return f1, f2


@triton.jit
def _attn_slice(blk, i_u, b_q, fq1, fq2, k, v, k_lin, t, i_b, i_h, T_cap, o_i, o_d, o_v, o_l, m_d, m_v, m_l, scale,
                b_m, b_l, b_acc, b_lin, b_mass, n_vis, H: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                DL: tl.constexpr, BS: tl.constexpr, SPLIT: tl.constexpr, FMAP: tl.constexpr, CDT: tl.constexpr):
    """One slice (``BS`` rows of selected block ``blk``, -1 for an empty slot) merged into the running softmax
    statistics, output, selected linear term and its mass; returns them."""
    pos = tl.maximum(blk, 0) * (BS * SPLIT) + (i_u % SPLIT) * BS + o_i
    m_i = (blk >= 0) & (pos <= t)  # [BS] visible selected tokens of this slice
    tok = (i_b * T_cap + pos) * H + i_h  # [BS]
    b_k = tl.load(k + tok[:, None] * D + o_d[None, :], mask=m_i[:, None] & m_d[None, :], other=0.).to(CDT)
    b_v = tl.load(v + tok[:, None] * DV + o_v[None, :], mask=m_i[:, None] & m_v[None, :], other=0.).to(CDT)
    b_kl = tl.load(k_lin + tok[:, None] * DL + o_l[None, :], mask=m_i[:, None] & m_l[None, :],
                   other=0.).to(tl.float32)
    # exact attention over this slice, merged online
    b_s = tl.dot(b_q, tl.trans(b_k)) * scale  # [BG, BS]
    b_s = tl.where(m_i[None, :], b_s, float("-inf"))
    b_mn = tl.maximum(b_m, tl.max(b_s, 1))
    b_ms = tl.where(b_mn == float("-inf"), 0., b_mn)
    b_p = tl.exp(b_s - b_ms[:, None])
    b_r = tl.exp(b_m - b_ms)  # 0 while nothing was visible (b_m = -inf)
    b_l = b_l * b_r + tl.sum(b_p, 1)
    b_acc = b_acc * b_r[:, None] + tl.dot(b_p.to(CDT), b_v)
    # selected linear term over the same tiles (additive)
    fk1, fk2 = _phi(b_kl, m_l, FMAP)
    b_w = tl.dot(fq1, tl.trans(fk1.to(CDT))) + tl.dot(fq2, tl.trans(fk2.to(CDT)))  # [BG, BS]
    b_w = tl.where(m_i[None, :], b_w, 0.)
    b_lin += tl.dot(b_w.to(CDT), b_v)
    b_mass += tl.sum(b_w, 1)
    n_vis += tl.sum(m_i.to(tl.int32), 0)
    return b_mn, b_l, b_acc, b_lin, b_mass, n_vis


@triton.jit
def spla_decode_fwd_kernel_attn(q, q_lin, k, v, k_lin, indices, lengths, p_m, p_l, p_acc, p_lin, p_mass, p_cnt,
                                scale, T_cap, HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
                                BG: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, DV: tl.constexpr,
                                BDV: tl.constexpr, DL: tl.constexpr, BDL: tl.constexpr, BS: tl.constexpr,
                                TOPK: tl.constexpr, FMAP: tl.constexpr, SPLIT: tl.constexpr, UPP: tl.constexpr = 1,
                                NSTAGES: tl.constexpr = 1, CDT: tl.constexpr = tl.float32, PDL: tl.constexpr = False):
    """Partials of ``UPP`` consecutive slices of ``BS`` rows each (a slice is 1/``SPLIT`` of a selected block;
    slice ``u`` holds rows ``(u % SPLIT) * BS ...`` of the ``u // SPLIT``-th selected block), merged by an online
    softmax into partial slot ``i_s`` of ``TOPK * SPLIT / UPP``; ``NSTAGES`` > 1 software-pipelines the loads.
    ``CDT``: the dtype of the matrix-unit operands (fp32, or the 16-bit input dtype: half the registers per tile);
    the feature maps, softmax statistics and accumulators stay fp32. With one slice per program (the default) its
    block index is loaded beside q, before the query's feature map: the step is bound by memory latency at small
    batches, and the K/V loads then wait for one round trip fewer. ``PDL`` (programmatic dependent launch): q, its
    feature map and the length come first, overlapping the selection's tail, then the wait for the selection and
    only then the block index (q and q_lin are written before the step, never by its launches)."""
    i_bh = tl.program_id(0).to(tl.int64)
    if PDL:
        gdc_launch_dependents()
    i_s = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    t = tl.load(lengths + i_b).to(tl.int64) - 1
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    o_d, o_v, o_l = tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BDL)
    m_d, m_v, m_l = o_d < D, o_v < DV, o_l < DL
    o_i = tl.arange(0, BS)
    rows = i_b * HQ + i_h * G + o_g  # [BG]
    if UPP == 1 and not PDL:
        blk0 = tl.load(indices + i_bh * TOPK + i_s // SPLIT).to(tl.int64)
    b_q = tl.load(q + rows[:, None] * D + o_d[None, :], mask=m_g[:, None] & m_d[None, :], other=0.).to(CDT)
    b_ql = tl.load(q_lin + rows[:, None] * DL + o_l[None, :], mask=m_g[:, None] & m_l[None, :], other=0.).to(tl.float32)
    fq1, fq2 = _phi(b_ql, m_l, FMAP)
    fq1, fq2 = fq1.to(CDT), fq2.to(CDT)
    if PDL:
        gdc_wait()
        if UPP == 1:
            blk0 = tl.load(indices + i_bh * TOPK + i_s // SPLIT).to(tl.int64)
    b_m = tl.full([BG], float("-inf"), tl.float32)
    b_l = tl.zeros([BG], tl.float32)
    b_acc = tl.zeros([BG, BDV], tl.float32)
    b_lin = tl.zeros([BG, BDV], tl.float32)
    b_mass = tl.zeros([BG], tl.float32)
    n_vis = tl.sum(tl.zeros([BS], tl.int32), 0)
    if UPP == 1:
        b_m, b_l, b_acc, b_lin, b_mass, n_vis = _attn_slice(
            blk0, i_s, b_q, fq1, fq2, k, v, k_lin, t, i_b, i_h, T_cap, o_i, o_d, o_v, o_l, m_d, m_v, m_l, scale,
            b_m, b_l, b_acc, b_lin, b_mass, n_vis, H, D, DV, DL, BS, SPLIT, FMAP, CDT)
    else:
        for u in tl.range(0, UPP, num_stages=NSTAGES):
            i_u = i_s * UPP + u
            blk = tl.load(indices + i_bh * TOPK + i_u // SPLIT).to(tl.int64)
            b_m, b_l, b_acc, b_lin, b_mass, n_vis = _attn_slice(
                blk, i_u, b_q, fq1, fq2, k, v, k_lin, t, i_b, i_h, T_cap, o_i, o_d, o_v, o_l, m_d, m_v, m_l, scale,
                b_m, b_l, b_acc, b_lin, b_mass, n_vis, H, D, DV, DL, BS, SPLIT, FMAP, CDT)
    NS: tl.constexpr = TOPK * SPLIT // UPP
    o = rows * NS + i_s  # [BG]
    tl.store(p_m + o, b_m, mask=m_g)
    tl.store(p_l + o, b_l, mask=m_g)
    tl.store(p_acc + o[:, None] * DV + o_v[None, :], b_acc, mask=m_g[:, None] & m_v[None, :])
    tl.store(p_lin + o[:, None] * DV + o_v[None, :], b_lin, mask=m_g[:, None] & m_v[None, :])
    tl.store(p_mass + o, b_mass, mask=m_g)
    tl.store(p_cnt + i_bh * NS + i_s, n_vis)


@triton.jit
def _state_half(S_half, z_half, o_l, o_v, m_l, m_v, DV: tl.constexpr):
    """Pointers to one half of the fp32 state (``DL`` feature rows, this program's value slice) and its loaded
    tiles ``S [BDL, BV]``, ``z [BDL]``."""
    p_S = S_half + o_l[:, None] * DV + o_v[None, :]
    b_S = tl.load(p_S, mask=m_l[:, None] & m_v[None, :], other=0.)
    b_z = tl.load(z_half + o_l, mask=m_l, other=0.)
    return p_S, b_S, b_z


@triton.jit
def _state_term(p_S, b_S, z_half, b_z, f, k_f, b_vn, o_l, m_l, m_v, i_v, APPEND: tl.constexpr):
    """``f·S_half`` `[BG, BV]` and ``f·z_half`` `[BG]` from a loaded half (:func:`_state_half`). With ``APPEND``
    the half first takes the new token (``k_f^T v``, ``k_f``) and is written back (z by the slice-0 program
    only)."""
    if APPEND:
        b_S += tl.trans(k_f) * b_vn[None, :]
        tl.store(p_S, b_S, mask=m_l[:, None] & m_v[None, :])
        b_z += tl.sum(k_f, 0)
        if i_v == 0:
            tl.store(z_half + o_l, b_z, mask=m_l)
    return tl.dot(f, b_S, input_precision="tf32x3"), tl.sum(f * b_z[None, :], 1)


@triton.jit
def spla_decode_fwd_kernel_combine(q_lin, S, z, lengths, p_m, p_l, p_acc, p_lin, p_mass, p_cnt, o, o_rla, rla_mass,
                                   kl_new, v_new,
                                   HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, BG: tl.constexpr,
                                   DV: tl.constexpr, BV: tl.constexpr, DL: tl.constexpr, BDL: tl.constexpr,
                                   F: tl.constexpr, NSLOT: tl.constexpr, KP: tl.constexpr, FMAP: tl.constexpr,
                                   APPEND: tl.constexpr, PDL: tl.constexpr = False):
    """Log-sum-exp combine of the per-block partials, the global term ``phi(q)·S`` and the subtraction, for one
    (sequence, KV head) and one slice of ``BV`` value channels (the state is read in ``[DL, BV]`` tiles).
    With ``APPEND`` the state first takes the newest token, ``S += phi(k_lin) v^T``, ``z += phi(k_lin)``
    (each program updates its own slice of S; the slice-0 program updates z), and is written back. ``NSLOT``:
    the partial slots per row (top-k x attn_split / attn_slices_per_program).
    Every load comes before the first store: a decode step at small batch is bound by memory latency, and the
    compiler cannot move a load above a store that may alias it, so loads placed after the output stores would
    each wait for their own round trip. ``PDL`` (programmatic dependent launch): the state, the query's and new
    token's features come first, overlapping the attention's tail (nothing of this step's earlier launches writes
    them), then the wait for the attention and the partials' loads."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    o_g = tl.arange(0, BG)
    m_g = o_g < G
    rows = i_bh * G + o_g  # == i_b * HQ + i_h * G + o_g
    o_v, o_l = i_v * BV + tl.arange(0, BV), tl.arange(0, BDL)
    m_v, m_l = o_v < DV, o_l < DL
    m_gv = m_g[:, None] & m_v[None, :]
    o_s = tl.arange(0, KP)
    m_gs = m_g[:, None] & (o_s < NSLOT)[None, :]
    # loads: the query's and the new token's features, the state halves, then the partials' statistics
    t = tl.load(lengths + i_b).to(tl.int64) - 1
    b_ql = tl.load(q_lin + rows[:, None] * DL + o_l[None, :], mask=m_g[:, None] & m_l[None, :], other=0.).to(tl.float32)
    if APPEND:
        b_kl = tl.load(kl_new + i_bh * DL + o_l, mask=m_l, other=0.).to(tl.float32)
        b_vn = tl.load(v_new + i_bh * DV + o_v, mask=m_v, other=0.).to(tl.float32)
    else:  # unread
        b_vn = tl.zeros([BV], tl.float32)
    p_S1, b_S1, b_z1 = _state_half(S + i_bh * F * DV, z + i_bh * F, o_l, o_v, m_l, m_v, DV)
    if F > DL:
        p_S2, b_S2, b_z2 = _state_half(S + (i_bh * F + DL) * DV, z + i_bh * F + DL, o_l, o_v, m_l, m_v, DV)
    if PDL:
        gdc_wait()
    b_pm = tl.load(p_m + rows[:, None] * NSLOT + o_s[None, :], mask=m_gs, other=float("-inf"))  # [BG, NSLOT]
    b_pl = tl.load(p_l + rows[:, None] * NSLOT + o_s[None, :], mask=m_gs, other=0.)
    b_mass = tl.sum(tl.load(p_mass + rows[:, None] * NSLOT + o_s[None, :], mask=m_gs, other=0.), 1)
    n_sel = tl.sum(tl.load(p_cnt + i_bh * NSLOT + o_s, mask=o_s < NSLOT, other=0), 0)
    # the exact branch: max over the partials, then rescaled sums, every slot's [BG, BV] tile in one [BG, KP, BV]
    # load: a loop over the slots converted each loaded tile to the accumulator's layout through shared memory
    # (a barrier per slot), so each slot's loads waited for the previous slot's
    b_mx = tl.max(b_pm, 1)
    b_mx = tl.where(b_mx == float("-inf"), 0., b_mx)
    b_w = tl.exp(b_pm - b_mx[:, None])  # [BG, KP], 0 on padded slots and rows
    b_den = tl.sum(b_w * b_pl, 1)
    p_3 = (rows[:, None] * NSLOT + o_s[None, :])[:, :, None] * DV + o_v[None, None, :]
    m_3 = m_gs[:, :, None] & m_v[None, None, :]
    b_acc = tl.sum(b_w[:, :, None] * tl.load(p_acc + p_3, mask=m_3, other=0.), 1)
    b_lin = tl.sum(tl.load(p_lin + p_3, mask=m_3, other=0.), 1)
    # the global linear term from the state; zero where every visible token was selected (counted)
    f1, f2 = _phi(b_ql, m_l, FMAP)
    if APPEND:
        k1, k2 = _phi(b_kl[None, :], m_l, FMAP)
    else:  # unread
        k1, k2 = f1, f2
    b_glob, b_gm = _state_term(p_S1, b_S1, z + i_bh * F, b_z1, f1, k1, b_vn, o_l, m_l, m_v, i_v, APPEND)
    if F > DL:
        g2, m2 = _state_term(p_S2, b_S2, z + i_bh * F + DL, b_z2, f2, k2, b_vn, o_l, m_l, m_v, i_v, APPEND)
        b_glob += g2
        b_gm += m2
    b_o = b_acc / tl.where(b_den > 0, b_den, 1.)[:, None]
    tl.store(o + rows[:, None] * DV + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_gv)
    empty = n_sel == t + 1
    b_r = tl.where(empty, 0., b_glob - b_lin)
    tl.store(o_rla + rows[:, None] * DV + o_v[None, :], b_r.to(o_rla.dtype.element_ty), mask=m_gv)
    if i_v == 0:
        tl.store(rla_mass + rows, tl.where(empty, 0., b_gm - b_mass), mask=m_g)


_FMAP = {"softmax2": 0, "elu1": 1, "relu2": 2}

#: Launch settings of the four kernels, read at every call (``benchmarks/bench_decode.py --sweep`` times the
#: alternatives):
#: - ``score_tile`` candidate blocks per scoring tile, ``score_tiles_per_program`` tiles each scoring program
#:   loops over (one partial log-sum-exp per program), ``score_stages`` software-pipelining stages of that loop;
#: - ``topk_chunk`` blocks per top-k round, ``topk_split`` programs per (sequence, KV head) sharing the blocks
#:   before a merge launch;
#: - ``attn_split`` slices per selected block (each ``block_size / attn_split`` rows),
#:   ``attn_slices_per_program`` slices each attention program merges online (one partial slot per program:
#:   the combine merges ``topk * attn_split / attn_slices_per_program``), ``attn_stages`` pipelining stages,
#:   ``attn_lowp=1`` 16-bit matrix-unit operands for 16-bit inputs (fp32 accumulation; fp32 inputs and the
#:   interpreter keep fp32 operands);
#: - ``combine_bv`` value channels per combine program, and each kernel's warps.
#: The defaults are the fastest of the sweep on an H200 at 128k, batch 1 and 8 (docs/benchmarks.md):
#: 4 tiles per scoring program, pipelined in 2 stages, took the scoring from 121-148 to 101 us at batch 8 (the
#: step from 240 to 190 us); the top-k split over 16 programs of 128 blocks took the top-k from 24.4 to 12.3 us
#: at batch 1 and from 24.8 to 17.8 us at batch 8; 16-bit attention operands took attention + combine from 72.1
#: to 62-64 us at batch 8 (the step from 190 to 177 us); several blocks per attention program (merged online)
#: were no faster. ``attn_split=2`` (the default since the third session of 2026-12-06): on the H200 of 2026-11-28
#: it made the attention 2.7 us faster and the combine, which merges twice the partials, 7.5 us slower; since the
#: combine's rewrite, on an H100 at 128k (bench_decode.py, two calls): attention + combine 60.5 -> 51.8 us at batch
#: 8 and 21.5 -> 19.0 at batch 1 (--sweep), the step 117.5 -> 116.2 and 43.2 -> 40.9 us in the same call (per layer
#: in a 2-layer graph 113.6 -> 112.9 and 41.2 -> 39.5). Half the rows per program: 128 registers instead of 246,
#: twice the programs per SM (Nsight Compute: 45 against 48 us at batch 8, occupancy 24% against 12%).
LAUNCH = dict(score_tile=32, score_warps=4, score_tiles_per_program=4, score_stages=2, topk_chunk=128, topk_warps=4,
              topk_split=16,
              attn_split=2, attn_slices_per_program=1, attn_stages=1, attn_warps=4, attn_lowp=1, combine_bv=32,
              combine_warps=4, pdl=1)
# ``pdl=1``: the step's launches after the first are programmatic dependent launches (Hopper and later): each may
# start while the previous one finishes, loads what no launch of the step writes (q, q_lin, the state), then waits
# for the previous launch (``gdc_wait``) before reading its outputs. A launch whose inputs needed a copy (not
# contiguous: the copy would run just before it) is launched plainly. H100, 128k, same call (bench_decode.py
# --launch pdl=0 / 1, second session of 2026-12-06): batch 1 45.6 against 47.3 us per step (43.2 against 44.6 per
# layer in a 2-layer graph), batch 8 122.6 against 123.3 (118.0 against 118.9); outputs bit for bit the same
# (test_gpu_decode_pdl_same_steps, eager and CUDA graph).


def _launch(key: str, value):
    return LAUNCH[key] if value is None else value


_SM90: dict = {}


def _pdl(*xs: torch.Tensor) -> bool:
    """Whether a launch reading ``xs`` goes as a programmatic dependent launch: ``LAUNCH["pdl"]`` on, a Hopper or
    later GPU, and every input contiguous (no copy kernel between the launch and the one it depends on)."""
    if not LAUNCH["pdl"] or not xs[0].is_cuda:
        return False
    dev = xs[0].device.index if xs[0].device.index is not None else torch.cuda.current_device()
    if dev not in _SM90:
        _SM90[dev] = torch.cuda.get_device_capability(dev)[0] >= 9
    return _SM90[dev] and all(x.is_contiguous() for x in xs)


def _p2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def decode_score(state, q: torch.Tensor, tile: Optional[int] = None, new=None):
    """Stage 1 of the selection: log estimates ``lbuf [B, HQ, NB_cap]`` of the candidate blocks and the
    partial log-sum-exps ``p_m, p_s [B, HQ, NT]`` of their programs (each ``LAUNCH["score_tiles_per_program"]``
    tiles of ``tile`` blocks).
    ``new = (k, v, k_lin)`` (`[B, H, *]`) of the newest token, already counted in ``state.lengths``: also
    written to the caches (with the statistics of a block it completes)."""
    B, HQ, D = q.shape
    H, G, bs = state.H, HQ // state.H, state.block_size
    tile = _launch("score_tile", tile)
    tpp = LAUNCH["score_tiles_per_program"]
    NB_cap = state.mean.shape[1]
    NBS = max(NB_cap, 1)  # the capacity, not the longest length: no host sync
    NT = triton.cdiv(NBS, tile * tpp)
    lbuf = torch.empty(B, HQ, NBS, dtype=torch.float32, device=q.device)
    p_m = torch.empty(B, HQ, NT, dtype=torch.float32, device=q.device)
    p_s = torch.empty_like(p_m)
    R = state.rep_keys
    Dv, Dl = state.Dv, state.Dl
    k_new, v_new, kl_new = (x.contiguous() for x in new) if new is not None else (q, q, q)
    pdl = _pdl(q)  # the first launch of the step: not a dependent launch itself, it only lets the next one start
    spla_decode_fwd_kernel_score[(NT, B * H)](
        q.contiguous(), state.mean, state.second, state.reps if R else state.mean, state.lengths, lbuf, p_m, p_s,
        k_new, v_new, kl_new, state.k, state.v, state.k_lin, state.scale, math.log(bs), NB_cap, NBS, NT,
        state.k.shape[1], HQ=HQ, H=H, G=G, BG=_p2(G), D=D, BD=_p2(D), DV=Dv, BDV=_p2(Dv), DL=Dl, BDL=_p2(Dl),
        R=R, BS=bs, BSP=_p2(bs), SINK=state.sink_blocks, LOCAL=state.local_blocks,
        TAYLOR2=state.selection == "taylor2", BJ=tile, APPEND=new is not None, TPP=tpp,
        NSTAGES=LAUNCH["score_stages"], LOWP=_lowp_scores(q, state.mean), PDL=pdl, num_warps=LAUNCH["score_warps"])
    return lbuf, p_m, p_s


def _lowp_scores(q: torch.Tensor, stats: torch.Tensor) -> bool:
    """Score with bf16 dot operands when q and the statistics are both bf16 (a bf16 model with
    ``stats_dtype=torch.bfloat16``): the operands the parallel op scores a bf16 model with (its fp32 statistics
    rounded to bf16 on load, q*q rounded to bf16). The interpreter's bf16 dots are wrong, so never on the CPU."""
    return q.dtype == stats.dtype == torch.bfloat16 and q.is_cuda


def decode_topk(state, lbuf: torch.Tensor, p_m: torch.Tensor, p_s: torch.Tensor,
                chunk: Optional[int] = None) -> torch.Tensor:
    """Stage 2 of the selection: the top-k blocks `[B, H, topk]` int32 (ascending, -1 padded) from the scores.
    With ``LAUNCH["topk_split"]`` = n > 1: n programs per (sequence, KV head) each keep the top-k of a share of
    the block capacity, then one merges them (two launches)."""
    B, HQ, NBS = lbuf.shape
    H, topk = state.H, state.topk
    NT = p_m.shape[-1]
    chunk = _launch("topk_chunk", chunk)
    out = torch.empty(B, H, topk, dtype=torch.int32, device=lbuf.device)
    KP = _p2(topk, 2)
    nsplit = LAUNCH["topk_split"]
    if nsplit < 1 or nsplit & (nsplit - 1):
        raise ValueError(f"topk_split={nsplit} must be a power of two")
    span = triton.cdiv(NBS, nsplit)
    BC = max(KP, min(_p2(chunk, 2), _p2(NBS if nsplit == 1 else span, 2)))
    pdl = _pdl(lbuf, p_m, p_s)
    common = dict(HQ=HQ, H=H, G=HQ // H, BG=_p2(HQ // H), BS=state.block_size, SINK=state.sink_blocks,
                  LOCAL=state.local_blocks, TOPK=topk, KP=KP, BNT=_p2(NT, 2), BC=BC, NSPLIT=nsplit,
                  num_warps=LAUNCH["topk_warps"], PDL=pdl, **({"launch_pdl": True} if pdl else {}))
    if nsplit == 1:
        spla_decode_fwd_kernel_select[(B * H,)](lbuf, p_m, p_s, state.lengths, out, out, NBS, NT, NBS, MODE=0,
                                                **common)
        return out
    part = torch.empty(B * H, nsplit, KP, dtype=torch.int64, device=lbuf.device)
    spla_decode_fwd_kernel_select[(B * H, nsplit)](lbuf, p_m, p_s, state.lengths, out, part, NBS, NT, span,
                                                   MODE=1, **common)
    spla_decode_fwd_kernel_select[(B * H,)](lbuf, p_m, p_s, state.lengths, out, part, NBS, NT, span, MODE=2,
                                            **common)
    return out


def decode_select(state, q: torch.Tensor, tile: Optional[int] = None, chunk: Optional[int] = None,
                  new=None) -> torch.Tensor:
    """Selected blocks `[B, H, topk]` int32 (ascending, -1 padded) of the newest token of every sequence.

    Two launches, no host sync (CUDA-graph capturable): the scoring kernel splits the candidate blocks of
    every (sequence, KV head) into tiles of ``tile`` blocks (one program each: log estimates, partial
    log-sum-exp), the selection kernel (one program per (sequence, KV head)) merges the partials, forms the
    group scores and keeps the top-k of packed (score, block) keys, ``chunk`` blocks at a time. ``new``: see
    :func:`decode_score`.
    """
    return decode_topk(state, *decode_score(state, q, tile, new), chunk=chunk)


def decode_partials(state, q: torch.Tensor, q_lin: torch.Tensor, indices: torch.Tensor):
    """Split-K partials of the newest token over its selected blocks: each selected block is cut into
    ``LAUNCH["attn_split"]`` slices of its rows (fewer where a slice would have under 16 rows), and each program
    merges ``LAUNCH["attn_slices_per_program"]`` consecutive slices into one partial slot."""
    B, HQ, D = q.shape
    H, G, bs, topk = state.H, HQ // state.H, state.block_size, state.topk
    split, upp = LAUNCH["attn_split"], LAUNCH["attn_slices_per_program"]
    if split < 1 or split & (split - 1) or bs % split:
        raise ValueError(f"attn_split={split} must be a power of two that divides block_size={bs}")
    while split > 1 and bs // split < 16:  # the matrix units need slices of 16 rows or more (small blocks)
        split //= 2
    if upp < 1 or (topk * split) % upp:
        raise ValueError(f"attn_slices_per_program={upp} must divide topk x attn_split = {topk * split}")
    ns = topk * split // upp
    Dv, Dl = state.Dv, state.Dl
    dev = q.device
    p_m = torch.empty(B, HQ, ns, dtype=torch.float32, device=dev)
    p_l, p_mass = torch.empty_like(p_m), torch.empty_like(p_m)
    p_acc = torch.empty(B, HQ, ns, Dv, dtype=torch.float32, device=dev)
    p_lin = torch.empty_like(p_acc)
    p_cnt = torch.empty(B, H, ns, dtype=torch.int32, device=dev)
    pdl = _pdl(q, q_lin, indices)
    spla_decode_fwd_kernel_attn[(B * H, ns)](
        q.contiguous(), q_lin.contiguous(), state.k, state.v, state.k_lin, indices.contiguous(), state.lengths,
        p_m, p_l, p_acc, p_lin, p_mass, p_cnt, state.scale, state.k.shape[1], HQ=HQ, H=H, G=G, BG=_p2(G), D=D,
        BD=_p2(D), DV=Dv, BDV=_p2(Dv), DL=Dl, BDL=_p2(Dl), BS=bs // split, TOPK=topk, FMAP=_FMAP[state.fmap],
        SPLIT=split, UPP=upp, NSTAGES=LAUNCH["attn_stages"],
        CDT=compute_dtype(q.dtype) if LAUNCH["attn_lowp"] else tl.float32, num_warps=LAUNCH["attn_warps"],
        PDL=pdl, **({"launch_pdl": True} if pdl else {}))
    return p_m, p_l, p_acc, p_lin, p_mass, p_cnt


def decode_combine(state, q_lin: torch.Tensor, partials, out_dtype: torch.dtype, new=None):
    """``o_sparse, o_rla [B, HQ, Dv]`` (``out_dtype``) and ``rla_mass [B, HQ]`` fp32 from the partials and the state;
    ``new = (k_lin, v)`` (`[B, H, *]`) of the newest token: first added to the linear state."""
    B, HQ, Dl = q_lin.shape
    H, Dv = state.H, state.Dv
    o = torch.empty(B, HQ, Dv, dtype=out_dtype, device=q_lin.device)
    o_rla = torch.empty_like(o)
    mass = torch.empty(B, HQ, dtype=torch.float32, device=q_lin.device)
    BV = min(_p2(Dv), LAUNCH["combine_bv"])
    ns = partials[0].shape[-1]  # partial slots: top-k x attn_split / attn_slices_per_program
    pdl = _pdl(q_lin, *(new or ()))
    kl_new, v_new = (x.contiguous() for x in new) if new is not None else (q_lin, q_lin)
    spla_decode_fwd_kernel_combine[(B * H, triton.cdiv(Dv, BV))](
        q_lin.contiguous(), state.S, state.z, state.lengths, *partials, o, o_rla, mass, kl_new, v_new, HQ=HQ, H=H,
        G=HQ // H, BG=_p2(HQ // H), DV=Dv, BV=BV, DL=Dl, BDL=_p2(Dl), F=state.S.shape[2], NSLOT=ns,
        KP=_p2(ns, 2), FMAP=_FMAP[state.fmap], APPEND=new is not None, num_warps=LAUNCH["combine_warps"],
        PDL=pdl, **({"launch_pdl": True} if pdl else {}))
    return o, o_rla, mass


def decode_attend(state, q: torch.Tensor, q_lin: torch.Tensor, indices: torch.Tensor, new=None):
    """Outputs of the newest token given its selection: ``o_sparse, o_rla [B, HQ, Dv]`` (q's dtype),
    ``rla_mass [B, HQ]`` fp32. Two launches: split-K attention over the selected blocks, then the combine
    (``new = (k_lin, v)``: see :func:`decode_combine`)."""
    return decode_combine(state, q_lin, decode_partials(state, q, q_lin, indices), q.dtype, new)

