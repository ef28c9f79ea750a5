# -*- coding: utf-8 -*-
"""The Triton forward of SPLA (``backend="triton"``), following the torch backend (``chunk.py``) stage by stage.

1. :func:`spla_fwd_kernel_stats` - per complete block and KV head, fp32: the mean key, the diagonal variance
   and the ``rep_keys`` representative keys (largest ``||k - mean||``, ties: lower position first).
2. :func:`spla_fwd_kernel_topk` - per tile of query tokens inside one query block (they share the forced and
   candidate sets) and KV head: the block scores of all G heads of the group as the rows of one ``tl.dot``,
   pass 1 the per-head log-sum-exp over the candidates (online), pass 2 the group score
   ``s_j = sum_h exp(l_hj - lse_h)`` and an online top-k kept in registers: each score is packed with its
   block id into an int64 key (order-preserving float bits in the high word, ``2^31-1-j`` in the low word, so
   equal scores prefer the lower block) and merged with ``tl.sort``. No ``[T, T/block]`` matrix is written.
   The forced blocks are merged in and the ids sorted ascending, -1 padded.
3. The sparse stage: exact online-softmax attention over the selected blocks and, over the same K/V tiles,
   the selected linear term ``sum_{i in U} (phi(q)·phi(k_i)) v_i`` and its mass, two layouts:
   - :func:`spla_fwd_kernel_sparse` ("token") - one program per query token and KV head, the G query heads as
     the rows of ``tl.dot`` (padded to 16); it finishes the residual itself.
   - :func:`spla_fwd_kernel_sparse_kv` ("kv") - one program per (KV head, selected block, up to BQ tokens that
     selected it): the block is loaded once for BQ tokens (their G heads as 64 rows); per-(token, block)
     partials (log-sum-exp, normalized output, and fp32 selected linear terms) are merged in slot order by
     :func:`spla_fwd_kernel_merge` (deterministic; ``deterministic=False``: the linear terms are subtracted from
     the global term with fp32 atomics instead, summation order not fixed).
   - :func:`spla_fwd_kernel_sparse_union` ("union") - one program per query tile of the selection and KV head:
     the union of the tile's selected blocks is loaded once for all its rows; tiles whose union is large fall
     back to the per-token path "auto" takes (:func:`sparse_union_fwd`).
   "auto" takes "token" for G >= 8 and "kv" below (measured on H100 and H200, bf16, T = 8k-128k; ``_dense_path``).
   ``o_rla = glob - selected`` is exactly 0 where the selected tokens are all the visible ones (decided by
   counting them, as ``chunk.finish_residual`` does).
4. ``linear.py`` - the feature maps and the chunked causal global linear attention (fp32 state).

``selection="oracle"``, ``cov="full"`` and block sizes whose query tile would be below 16 rows take the
indices from :func:`spla.ops.spla.chunk.chunk_spla_select`; every other stage still runs in Triton.
On CUDA, when every block is selected (``T <= topk * block_size``, no ``cu_seqlens``, ``Dv == D``) the op is
causal attention with a zero residual and runs torch's SDPA flash kernel on K/V expanded to the query heads
(:func:`dense_fwd`, :func:`dense_sdpa`).
Gradients (:func:`parallel_spla_bwd`, see the Backward section below): the sparse branch recomputes p from q, k and
the saved per-row log-sum-exp; a token-major pass gives dq and dphi(q_lin), a KV-block-major pass (deterministic,
default) or fp32 atomics in the token pass give dk, dv and dphi(k_lin); the global linear term has its own chunked
kernels (``linear.py``) that recompute the chunk states.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Callable, Dict, Optional, Tuple

import torch
from torch.nn.functional import scaled_dot_product_attention
import triton
import triton.language as tl

from spla.ops.spla.chunk import chunk_spla_select
from spla.ops.spla.linear import (_dot_prec, compute_dtype, feature_map_bwd, feature_map_fwd, global_linear_bwd,
                                  global_linear_fwd)
from spla.ops.spla.utils import SPLAOutput

# chunk length of the global linear attention
LINEAR_CHUNK = 64
# the sparse stage: "kv" (KV-block-major, each selected block loaded once per group of tokens that chose it,
# partials merged per token), "token" (one program per token and KV head, gathers its own blocks; its G heads
# fill the 16 rows of tl.dot from G = 8 on), "union" (one program per query tile of the selection and KV head,
# loads the union of its tokens' blocks once, tiles with large unions per token) or "auto" (_sparse_path: union
# with a KV-major fallback for G < 8, token for G >= 8; measured on an H100, docs/benchmarks.md)
SPARSE_PATH = os.environ.get("SPLA_SPARSE_PATH", "auto")
# the union stage's fallback: a (query tile, KV head) whose union of selected blocks exceeds this fraction of
# tile x topk runs per token, on the per-token path "auto" takes for the group size (sparse_union_fwd; the
# backward: token-major). Timed on an H100 at 64k, 32/8, the union stage at its defaults (bench_forward.py
# --sweep-sparse --sweep-quick): 0.25 kept AR(1) data on the union (28.3 ms; 27.8 at 1.0, 43.8 at 0.125) and sent
# random data's tiles to the KV-major path (49.1 ms against 48.0 for the KV-major path alone; 58.2 at 0.5)
UNION_MAX_LOAD = 0.25
# where fewer than this share of the (query tile, KV head) pairs have unions under that threshold, the union stage
# and the backward's union pass run every row on their per-token path, whole (no work list). On an H100 at 64k,
# 32/8, random data (6.5% of the pairs under the threshold), the backward's query pass took 121 ms on the union
# path with its per-token fallback against 78 ms token-major; AR(1) data has ~100% under it. 0.5 is a guess
# between the two, not timed
UNION_MIN_SHARE = 0.5
# where every block is selected (T <= topk * block_size, no cu_seqlens, Dv == D, CUDA) SPLA is causal attention
# with a zero residual: run torch's SDPA (flash) instead of the sparse kernels
DENSE_FAST_PATH = True
# rows (query tokens x padded group heads) of one scoring tile (64 beat 128 by 7-10% on an H200 at 64k)
TOPK_ROWS = 64
# candidate blocks scored per loop step of the selection (at least the padded top-k): wider chunks make wider
# tl.dot tiles and fewer merges, each a top-k of the chunk then one bitonic merge. None: 32 for groups of 16 or
# more query heads per KV head, else 16 (H200, 64k, top-16: 32 took HQ=64/H=4 from 28.9 to 26.3 ms, and HQ=32/H=8
# from 15.4 to 16.4 ms; 64 was slower for both; the selections differed in 2-4e-5 of the rows, near-tied scores
# summed in another order)
TOPK_CHUNK: Optional[int] = None
# store the selection's block statistics in the 16-bit input dtype (selection_stats_dtype): the scoring kernel's
# dot operands are rounded to it on load anyway, so the selection is the same bit for bit with half the bytes read.
# On by default since 2026-12-05: on an H200 at 64k (bench_forward.py, select_stats16_ms) the selection took 10.4
# against 15.3 ms (32/8) and 16.7 against 26.1 ms (64/4) with the same indices bit for bit
STATS_16BIT = os.environ.get("SPLA_STATS_16BIT", "1") != "0"
# the backward's query-side pass: "union" (per query tile over the tile's union of selected blocks, token-major
# fallback for large unions), "token" (per token), or "auto": union for groups under 8 query heads per KV head (or
# when SPARSE_PATH is "union"), else token. On an H200 at 64k on AR(1) queries with a real model's locality the
# union path made forward+backward 165.8 ms against 204.2 for 32/8 and 246.5 against 237.0 for 64/4
# (bench_backward.py --data local, spla_fwdbwd_union_ms, which also runs the forward's union stage)
BWD_QUERY_PATH = os.environ.get("SPLA_BWD_QUERY_PATH", "auto")


def _bwd_query_path(G: int) -> str:
    """The backward's query-side pass for group size ``G`` (:data:`BWD_QUERY_PATH`)."""
    if BWD_QUERY_PATH != "auto":
        return BWD_QUERY_PATH
    return "union" if SPARSE_PATH == "union" or G < 8 else "token"


@triton.jit
def spla_fwd_kernel_stats(
    k,  # [T, H, D]
    mean,  # [NB, H, D] fp32
    var,  # [NB, H, D] fp32
    reps,  # [NB, H, R, D] fp32
    blk_tok,  # [NB] int64 first token of every complete block
    H: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    BSP: tl.constexpr,
    R: tl.constexpr,
    SECOND: tl.constexpr,
):
    i_b, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    t0 = tl.load(blk_tok + i_b).to(tl.int64)
    o_s = tl.arange(0, BSP)
    o_d = tl.arange(0, BD)
    m_s, m_d = o_s < BS, o_d < D
    m_k = m_s[:, None] & m_d[None, :]
    # [BSP, BD]
    b_k = tl.load(k + ((t0 + o_s[:, None]) * H + i_h) * D + o_d[None, :], mask=m_k, other=0.).to(tl.float32)
    p = (i_b * H + i_h) * D
    block_stats_tile(b_k, m_k, o_s, o_d, m_d, mean + p, var + p, reps + p * R, D, BS, BSP, R, SECOND)


@triton.jit
def block_stats_tile(b_k, m_k, o_s, o_d, m_d, p_mean, p_var, p_reps, D: tl.constexpr, BS: tl.constexpr,
                     BSP: tl.constexpr, R: tl.constexpr, SECOND: tl.constexpr):
    """SPEC §3 statistics of one block's keys ``b_k [BSP, BD]`` (fp32, rows masked by ``m_k``), stored at
    ``p_mean``/``p_var`` (``[D]``) and ``p_reps`` (``[R, D]``): mean, diagonal variance, and the ``R`` keys
    farthest from the mean (ties: the lower position)."""
    # [BD]
    b_mean = tl.sum(b_k, 0) / BS
    tl.store(p_mean + o_d, b_mean.to(p_mean.dtype.element_ty), mask=m_d)
    # [BSP, BD]
    b_d = tl.where(m_k, b_k - b_mean[None, :], 0.)
    if SECOND:
        tl.store(p_var + o_d, (tl.sum(b_d * b_d, 0) / BS).to(p_var.dtype.element_ty), mask=m_d)
    if R > 0:
        # [BSP] squared deviation norms; padded rows can never win
        b_n = tl.where(o_s < BS, tl.sum(b_d * b_d, 1), -1.)
        for r in tl.static_range(R):
            b_max = tl.max(b_n, 0)
            i_sel = tl.min(tl.where(b_n == b_max, o_s, BSP), 0)
            b_r = tl.sum(tl.where(o_s[:, None] == i_sel, b_k, 0.), 0)
            tl.store(p_reps + r * D + o_d, b_r.to(p_reps.dtype.element_ty), mask=m_d)
            b_n = tl.where(o_s == i_sel, -2., b_n)


@triton.jit
def _score(b_q, b_q2, b_mean, b_var, b_rep, m_r, c1, c2, log_bs,
           BT: tl.constexpr, GP: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr, R: tl.constexpr,
           TAYLOR2: tl.constexpr, DOT_PREC: tl.constexpr):
    """Block log scores of `[BT*GP, BD]` query rows on `[KP, BD]` blocks -> `[BT, GP, KP]`."""
    b_s = tl.dot(b_q, tl.trans(b_mean), input_precision=DOT_PREC) * c1
    if TAYLOR2:
        b_s += c2 * tl.dot(b_q2, tl.trans(b_var), input_precision=DOT_PREC)
    b_s = tl.reshape(b_s, [BT, GP, KP])
    if R > 0:
        # [BT*GP, KP*RP] -> [BT, GP, KP, RP]
        b_r = tl.dot(b_q, tl.trans(b_rep), input_precision=DOT_PREC)
        b_r = tl.where(m_r[None, :], b_r, float('-inf'))
        b_r = tl.max(tl.reshape(b_r, [BT, GP, KP, RP]), 3) * c1 - log_bs
        b_s = tl.maximum(b_s, b_r)
    return b_s


@triton.jit
def _first_half(x, BT: tl.constexpr, N: tl.constexpr):
    """`[BT, 2N]` -> its first `N` columns."""
    y = tl.permute(tl.reshape(x, [BT, 2, N]), (0, 2, 1))
    a, b = tl.split(y)
    return a


@triton.jit
def spla_fwd_kernel_topk(
    q,  # [T, HQ, D]
    mean,  # [NB, H, D] fp32
    var,  # [NB, H, D] fp32
    reps,  # [NB, H, R, D] fp32
    indices,  # [T, H, TOPK] int32
    tile_bos,  # [NQ] int64 first token of the tile's sequence
    tile_t0,  # [NQ] int64 first position of the tile inside its sequence
    tile_len,  # [NQ] int64 length of the tile's sequence
    tile_boff,  # [NQ] int64 first complete block of the tile's sequence
    c1,  # scale
    c2,  # 0.5 * scale ** 2
    log_bs,  # log(block_size)
    HQ: tl.constexpr,
    H: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BT: tl.constexpr,
    KP: tl.constexpr,
    KC: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    TOPK: tl.constexpr,
    SINK: tl.constexpr,
    LOCAL: tl.constexpr,
    BS: tl.constexpr,
    TAYLOR2: tl.constexpr,
    DOT_PREC: tl.constexpr,
    CDT: tl.constexpr,
    MERGE: tl.constexpr = True,
):
    i_n, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    bos = tl.load(tile_bos + i_n).to(tl.int64)
    t0 = tl.load(tile_t0 + i_n).to(tl.int64)
    L = tl.load(tile_len + i_n).to(tl.int64)
    boff = tl.load(tile_boff + i_n).to(tl.int64)
    # the tile's own block c, forced set F and candidates lo <= j < hi (SPEC §2)
    c = t0 // BS
    lo = SINK
    hi = tl.maximum(c - LOCAL + 1, lo)
    n_sink = tl.minimum(c + 1, SINK)
    l_lo = tl.maximum(c - LOCAL + 1, n_sink)
    n_loc = c - l_lo + 1
    n_free = TOPK - n_sink - n_loc

    o_t = t0 + tl.arange(0, BT)
    m_t = o_t < L
    o_k = tl.arange(0, KP)
    o_c = tl.arange(0, KC)
    BIG = 2147483647
    if hi - lo > n_free:
        # rows: token-major, group-head-minor [BT*GP]
        o_r = tl.arange(0, BT * GP)
        r_t, r_g = t0 + o_r // GP, o_r % GP
        m_row = (r_t < L) & (r_g < G)
        o_d = tl.arange(0, BD)
        m_d = o_d < D
        # [BT*GP, BD]
        b_q = tl.load(q + ((bos + r_t[:, None]) * HQ + i_h * G + r_g[:, None]) * D + o_d[None, :],
                      mask=m_row[:, None] & m_d[None, :], other=0.).to(tl.float32)
        b_q2 = (b_q * b_q).to(CDT)
        b_q = b_q.to(CDT)
        o_g = tl.arange(0, GP)
        o_kr = tl.arange(0, KC * RP)
        m_r = (o_kr % RP) < R
        b_var = tl.zeros([KC, BD], dtype=CDT)
        b_rep = tl.zeros([KC * RP, BD], dtype=CDT)
        if G > 1:
            # pass 1: per-head log-sum-exp over the candidates, online
            b_m = tl.full([BT, GP], float('-inf'), dtype=tl.float32)
            b_l = tl.zeros([BT, GP], dtype=tl.float32)
            for j0 in range(lo, hi, KC):
                o_j = j0 + o_c
                m_j = o_j < hi
                p_j = (boff + o_j) * H + i_h
                # [KC, BD]
                m_jd = m_j[:, None] & m_d[None, :]
                b_mean = tl.load(mean + p_j[:, None] * D + o_d[None, :], mask=m_jd, other=0.).to(CDT)
                if TAYLOR2:
                    b_var = tl.load(var + p_j[:, None] * D + o_d[None, :], mask=m_jd, other=0.).to(CDT)
                if R > 0:
                    p_r = (boff + j0 + o_kr // RP) * H + i_h
                    m_rr = m_r & ((j0 + o_kr // RP) < hi)
                    # [KP*RP, BD]
                    b_rep = tl.load(reps + (p_r[:, None] * R + o_kr[:, None] % RP) * D + o_d[None, :],
                                    mask=m_rr[:, None] & m_d[None, :], other=0.).to(CDT)
                # [BT, GP, KC]
                b_s = _score(b_q, b_q2, b_mean, b_var, b_rep, m_r, c1, c2, log_bs, BT, GP, KC, RP, R, TAYLOR2, DOT_PREC)
                b_s = tl.where(m_j[None, None, :], b_s, float('-inf'))
                b_mn = tl.maximum(b_m, tl.max(b_s, 2))
                b_l = b_l * tl.exp(b_m - b_mn) + tl.sum(tl.exp(b_s - b_mn[:, :, None]), 2)
                b_m = b_mn
            b_lse = b_m + tl.log(b_l)
        # pass 2: group scores and the online top-k of packed (score, block) keys, kept sorted ascending
        b_top = tl.full([BT, KP], -9223372036854775807 - 1, dtype=tl.int64)
        for j0 in range(lo, hi, KC):
            o_j = j0 + o_c
            m_j = o_j < hi
            p_j = (boff + o_j) * H + i_h
            m_jd = m_j[:, None] & m_d[None, :]
            b_mean = tl.load(mean + p_j[:, None] * D + o_d[None, :], mask=m_jd, other=0.).to(CDT)
            if TAYLOR2:
                b_var = tl.load(var + p_j[:, None] * D + o_d[None, :], mask=m_jd, other=0.).to(CDT)
            if R > 0:
                p_r = (boff + j0 + o_kr // RP) * H + i_h
                m_rr = m_r & ((j0 + o_kr // RP) < hi)
                b_rep = tl.load(reps + (p_r[:, None] * R + o_kr[:, None] % RP) * D + o_d[None, :],
                                mask=m_rr[:, None] & m_d[None, :], other=0.).to(CDT)
            b_s = _score(b_q, b_q2, b_mean, b_var, b_rep, m_r, c1, c2, log_bs, BT, GP, KC, RP, R, TAYLOR2, DOT_PREC)
            if G > 1:
                b_p = tl.where((o_g < G)[None, :, None], tl.exp(b_s - b_lse[:, :, None]), 0.)
                # [BT, KC]
                b_p = tl.sum(b_p, 1)
            else:
                # one head: the softmax is monotone, rank the log scores themselves
                b_p = tl.sum(b_s, 1)
            b_bits = b_p.to(tl.int32, bitcast=True)
            b_bits = b_bits ^ ((b_bits >> 31) & 0x7FFFFFFF)
            b_key = (b_bits.to(tl.int64) << 32) | (BIG - o_j).to(tl.int64)[None, :]
            b_key = tl.where(m_j[None, :], b_key, -9223372036854775807 - 1)
            if MERGE:
                # merge: the KP largest of the running top (sorted ascending) and this chunk. The chunk's KP
                # largest, sorted descending, element-wise maximum with the top is a bitonic sequence holding
                # exactly the KP largest of both (the first step of a bitonic merge); one bitonic merge sorts it
                # again: log2(KP) rounds of compare-and-swap on KP keys instead of a full sort of 2 KP keys
                b_ck = tl.topk(b_key, KP, dim=1)
                b_top = tl.bitonic_merge(tl.maximum(b_top, b_ck), dim=1, descending=False)
            else:
                # benchmark diagnostics only (wrong selection): the cost of the scoring alone
                b_top = tl.maximum(b_top, tl.max(b_key, 1)[:, None])
        # the n_free largest are the last n_free keys
        m_c = (b_top != (-9223372036854775807 - 1)) & (o_k[None, :] >= KP - n_free)
        b_c = tl.where(m_c, BIG - (b_top & 0xFFFFFFFF), BIG)
    else:
        # every candidate is selected
        b_c = tl.zeros([BT, KP], dtype=tl.int64) + tl.where(lo + o_k < hi, lo + o_k, BIG).to(tl.int64)[None, :]
    # the forced blocks: sinks 0..n_sink-1, then the local blocks not already sinks
    b_f = tl.where(o_k < n_sink, o_k, tl.where(o_k < n_sink + n_loc, l_lo + o_k - n_sink, BIG)).to(tl.int64)
    b_f = tl.zeros([BT, KP], dtype=tl.int64) + b_f[None, :]
    b_all = tl.reshape(tl.join(b_c, b_f), [BT, 2 * KP])
    b_all = _first_half(tl.sort(b_all, dim=1), BT, KP)
    b_all = tl.where(b_all < BIG, b_all, -1).to(tl.int32)
    tl.store(indices + ((bos + o_t[:, None]) * H + i_h) * TOPK + o_k[None, :], b_all,
             mask=m_t[:, None] & (o_k[None, :] < TOPK))


@triton.jit
def _global_rows(glob, glob_mass, p_row, o_v, m_o, m_g, DV: tl.constexpr, GP: tl.constexpr, BDV: tl.constexpr,
                 LIN: tl.constexpr):
    """The global linear term `[GP, BDV]` and its mass `[GP]` of rows ``p_row``; zeros (unread) when ``LIN=False``."""
    if LIN:
        b_gl = tl.load(glob + p_row[:, None] * DV + o_v[None, :], mask=m_o, other=0.)
        b_gm = tl.load(glob_mass + p_row, mask=m_g, other=0.)
    else:
        b_gl = tl.zeros([GP, BDV], dtype=tl.float32)
        b_gm = tl.zeros([GP], dtype=tl.float32)
    return b_gl, b_gm


@triton.jit
def _query_rows(q, fq, p_row, m_r, o_d, m_d, o_f, m_f, D: tl.constexpr, F: tl.constexpr, CDT: tl.constexpr,
                LIN: tl.constexpr):
    """Query rows ``p_row`` (``m_r`` real) of q `[rows, BD]` and phi(q) `[rows, BF]` in the compute dtype; without
    the linear branch phi(q) is not read (q is returned in its place, unused)."""
    b_q = tl.load(q + p_row[:, None] * D + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.).to(CDT)
    if LIN:
        b_fq = tl.load(fq + p_row[:, None] * F + o_f[None, :], mask=m_r[:, None] & m_f[None, :], other=0.).to(CDT)
    else:
        b_fq = b_q
    return b_q, b_fq


@triton.jit
def _attend_subtile(b_q, b_fq, k, v, fk, p_kv, m_p, m_s, o_d, m_d, o_v, m_v, o_f, m_f, b_mi, b_li, b_acc, b_lin, b_ms,
                    qk_scale, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, DOT_PREC: tl.constexpr,
                    CDT: tl.constexpr, LIN: tl.constexpr, tma_row=0, tma_h=0, TMA: tl.constexpr = False):
    """One key sub-tile of the sparse stage for a set of query rows: loads K, V (and phi(k)) of keys ``p_kv``
    (``m_p`` real keys), then the online-softmax update of (max, sum, output) with scores masked by ``m_s``
    (rows x keys; rows that see none of them keep their state, also while at -inf) and, over the same tiles, the
    selected linear term and its mass. Returns the updated (max, sum, output, linear term, mass).
    With ``TMA``, ``k, v, fk`` are tensor descriptors of the `[T, H * D]` views, and the sub-tile is the
    consecutive keys from packed row ``tma_row`` of KV head ``tma_h`` (one bulk copy each, no per-element
    addresses; keys of ``m_p`` False inside the sequence are read but get no weight, :func:`_key_loads` keeps
    sub-tiles from crossing a sequence's end)."""
    # [BK, BD], [BK, BDV]
    if TMA:
        b_k = k.load([tma_row, tma_h * D]).to(CDT)
        b_v = v.load([tma_row, tma_h * DV]).to(CDT)
    else:
        b_k = tl.load(k + p_kv[:, None] * D + o_d[None, :], mask=m_p[:, None] & m_d[None, :], other=0.).to(CDT)
        b_v = tl.load(v + p_kv[:, None] * DV + o_v[None, :], mask=m_p[:, None] & m_v[None, :], other=0.).to(CDT)
    # [rows, BK]
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale
    b_s = tl.where(m_s, b_s, float('-inf'))
    b_mn = tl.maximum(b_mi, tl.max(b_s, 1))
    b_alpha = tl.where(b_mn == float('-inf'), 1., tl.exp2(b_mi - b_mn))
    b_p = tl.where(m_s, tl.exp2(b_s - b_mn[:, None]), 0.)
    b_li = b_li * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(CDT), b_v, input_precision=DOT_PREC)
    if LIN:
        # [BK, BF]
        if TMA:
            b_fk = fk.load([tma_row, tma_h * F]).to(CDT)
        else:
            b_fk = tl.load(fk + p_kv[:, None] * F + o_f[None, :], mask=m_p[:, None] & m_f[None, :], other=0.).to(CDT)
        b_w = tl.where(m_s, tl.dot(b_fq, tl.trans(b_fk), input_precision=DOT_PREC), 0.)
        b_lin += tl.dot(b_w.to(CDT), b_v, input_precision=DOT_PREC)
        b_ms += tl.sum(b_w, 1)
    return b_mn, b_li, b_acc, b_lin, b_ms


@triton.jit(do_not_specialize=['scale'])
def spla_fwd_kernel_sparse(
    q,  # [T, HQ, D]
    k,  # [T, H, D]
    v,  # [T, H, DV]
    fq,  # [T, HQ, F]
    fk,  # [T, H, F]
    glob,  # [T, HQ, DV] fp32
    glob_mass,  # [T, HQ] fp32
    indices,  # [T, H, TOPK] int32
    tok_bos,  # [T] int64 first token of each token's sequence
    work,  # [NW] int64 (token) * H + (KV head) of each program, if WORK (else unread: the grid is (T, H))
    o,  # [T, HQ, DV]
    o_rla,  # [T, HQ, DV]
    rla_mass,  # [T, HQ] fp32
    lse,  # [T, HQ] fp32 log2-sum-exp2 of the scaled scores (saved for the backward), if STORE_LSE
    scale,
    HQ: tl.constexpr,
    H: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    DV: tl.constexpr,
    BDV: tl.constexpr,
    F: tl.constexpr,
    BF: tl.constexpr,
    BS: tl.constexpr,
    BK: tl.constexpr,
    TOPK: tl.constexpr,
    BTOPK: tl.constexpr,
    DOT_PREC: tl.constexpr,
    CDT: tl.constexpr,
    LIN: tl.constexpr = True,
    STORE_LSE: tl.constexpr = False,
    WORK: tl.constexpr = False,
    TMA: tl.constexpr = False,
):
    """Token-major sparse attention: one program per (token, KV head) walks its selected blocks. ``TMA``: ``k, v,
    fk`` are tensor descriptors (:func:`_key_loads`), each key sub-tile one bulk copy."""
    if WORK:
        e = tl.load(work + tl.program_id(0)).to(tl.int64)
        i_t, i_h = e // H, e % H
    else:
        i_t, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    bos = tl.load(tok_bos + i_t).to(tl.int64)
    pos = i_t - bos
    o_g = tl.arange(0, GP)
    m_g = o_g < G
    o_d, o_v, o_f = tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BF)
    m_d, m_v, m_f = o_d < D, o_v < DV, o_f < F
    p_row = i_t * HQ + i_h * G + o_g
    # [GP, BD], [GP, BF]
    b_q, b_fq = _query_rows(q, fq, p_row, m_g, o_d, m_d, o_f, m_f, D, F, CDT, LIN)
    # [BTOPK]
    o_i = tl.arange(0, BTOPK)
    b_idx = tl.load(indices + (i_t * H + i_h) * TOPK + o_i, mask=o_i < TOPK, other=-1)
    n_sel = tl.sum((b_idx >= 0).to(tl.int32), 0)

    qk_scale = scale * 1.44269504
    b_mi = tl.full([GP], float('-inf'), dtype=tl.float32)
    b_li = tl.zeros([GP], dtype=tl.float32)
    b_acc = tl.zeros([GP, BDV], dtype=tl.float32)
    b_lin = tl.zeros([GP, BDV], dtype=tl.float32)
    b_ms = tl.zeros([GP], dtype=tl.float32)
    b_cnt = tl.zeros([BK], dtype=tl.int32)
    o_s = tl.arange(0, BK)
    # one flat loop over (selected block, key sub-tile): nested, the pipeline would drain at every block
    NS: tl.constexpr = (BS + BK - 1) // BK
    for it in range(n_sel * NS):
        j = tl.load(indices + (i_t * H + i_h) * TOPK + it // NS).to(tl.int64)
        s0 = (it % NS) * BK
        o_p = j * BS + s0 + o_s
        m_p = ((s0 + o_s) < BS) & (o_p <= pos)
        p_kv = (bos + o_p) * H + i_h
        # a sub-tile past the query can be fully masked (the helper keeps -inf rows from producing NaN)
        b_mi, b_li, b_acc, b_lin, b_ms = _attend_subtile(
            b_q, b_fq, k, v, fk, p_kv, m_p, m_p[None, :], o_d, m_d, o_v, m_v, o_f, m_f, b_mi, b_li, b_acc, b_lin,
            b_ms, qk_scale, D, DV, F, DOT_PREC, CDT, LIN, (bos + j * BS + s0).to(tl.int32), i_h.to(tl.int32), TMA)
        b_cnt += m_p.to(tl.int32)
    b_o = b_acc / b_li[:, None]
    m_o = m_g[:, None] & m_v[None, :]
    tl.store(o + p_row[:, None] * DV + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_o)
    if STORE_LSE:
        tl.store(lse + p_row, b_mi + tl.log2(b_li), mask=m_g)
    # residual = global - selected, exactly 0 when every visible token is selected (counted); without the
    # linear branch (LIN=False: glob unread, b_lin and b_ms stay 0) exactly 0 everywhere
    empty = tl.sum(b_cnt, 0) == pos + 1
    b_gl, b_gm = _global_rows(glob, glob_mass, p_row, o_v, m_o, m_g, DV, GP, BDV, LIN)
    b_r = tl.where(empty, 0., b_gl - b_lin)
    b_rm = tl.where(empty, 0., b_gm - b_ms)
    tl.store(o_rla + p_row[:, None] * DV + o_v[None, :], b_r.to(o_rla.dtype.element_ty), mask=m_o)
    tl.store(rla_mass + p_row, b_rm, mask=m_g)


@triton.jit(do_not_specialize=['scale'])
def spla_fwd_kernel_sparse_union(
    q,  # [T, HQ, D]
    k,  # [T, H, D]
    v,  # [T, H, DV]
    fq,  # [T, HQ, F]
    fk,  # [T, H, F]
    glob,  # [T, HQ, DV] fp32
    glob_mass,  # [T, HQ] fp32
    indices,  # [T, H, TOPK] int32
    ulist,  # [NQ, H, UMAX] int32 the union of the tile's selected blocks, ascending, then padding
    ucount,  # [NQ, H] int32 its length
    work,  # [NW] int64 (tile) * H + (KV head) of each program
    tile_bos,  # [NQ] int64 first token of the tile's sequence
    tile_t0,  # [NQ] int64 the tile's first position in its sequence
    tile_len,  # [NQ] int64 the sequence's length
    o,  # [T, HQ, DV]
    o_rla,  # [T, HQ, DV]
    rla_mass,  # [T, HQ] fp32
    lse,  # [T, HQ] fp32 log2-sum-exp2 of the scaled scores (saved for the backward), if STORE_LSE
    scale,
    HQ: tl.constexpr,
    H: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    DV: tl.constexpr,
    BDV: tl.constexpr,
    F: tl.constexpr,
    BF: tl.constexpr,
    BS: tl.constexpr,
    BK: tl.constexpr,
    BT: tl.constexpr,
    TOPK: tl.constexpr,
    BTOPK: tl.constexpr,
    UMAX: tl.constexpr,
    DOT_PREC: tl.constexpr,
    CDT: tl.constexpr,
    LIN: tl.constexpr = True,
    STORE_LSE: tl.constexpr = False,
    TMA: tl.constexpr = False,
):
    """Query-tile sparse attention: one program per (tile of BT consecutive tokens, KV head) walks the union of the
    blocks its tokens selected, loading each once for all BT x G rows; a row attends to a block's keys only where
    its token selected the block (and causally). Per row the blocks come in the same ascending order as in
    ``spla_fwd_kernel_sparse`` (a block a row did not select leaves its online softmax unchanged), and the
    outputs are written directly: no partials, no atomics. ``TMA``: ``k, v, fk`` are tensor descriptors of
    their `[T, H * D]` views, each key sub-tile one bulk copy (:func:`_attend_subtile`)."""
    e = tl.load(work + tl.program_id(0)).to(tl.int64)
    i_n, i_h = e // H, e % H
    bos = tl.load(tile_bos + i_n).to(tl.int64)
    t0 = tl.load(tile_t0 + i_n).to(tl.int64)
    L = tl.load(tile_len + i_n).to(tl.int64)
    # rows: token-major, group-head-minor [BT*GP]
    o_r = tl.arange(0, BT * GP)
    r_t, r_g = t0 + o_r // GP, o_r % GP
    m_r = (r_t < L) & (r_g < G)
    p_row = (bos + r_t) * HQ + i_h * G + r_g
    o_d, o_v, o_f = tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BF)
    m_d, m_v, m_f = o_d < D, o_v < DV, o_f < F
    # [BT*GP, BD], [BT*GP, BF]
    b_q, b_fq = _query_rows(q, fq, p_row, m_r, o_d, m_d, o_f, m_f, D, F, CDT, LIN)
    # each row's selection [BT*GP, BTOPK]
    o_i = tl.arange(0, BTOPK)
    b_sel = tl.load(indices + ((bos + r_t) * H + i_h)[:, None] * TOPK + o_i[None, :],
                    mask=m_r[:, None] & (o_i < TOPK)[None, :], other=-1)
    n_u = tl.load(ucount + i_n * H + i_h)

    qk_scale = scale * 1.44269504
    b_mi = tl.full([BT * GP], float('-inf'), dtype=tl.float32)
    b_li = tl.zeros([BT * GP], dtype=tl.float32)
    b_acc = tl.zeros([BT * GP, BDV], dtype=tl.float32)
    b_lin = tl.zeros([BT * GP, BDV], dtype=tl.float32)
    b_ms = tl.zeros([BT * GP], dtype=tl.float32)
    o_s = tl.arange(0, BK)
    # the masks in 32-bit integers (positions inside a sequence fit): a 64-bit compare costs two instructions
    # and the masks are most of what the loop issues besides the matrix products
    r_t32, L32 = r_t.to(tl.int32), L.to(tl.int32)
    # the selected keys each row sees, counted from its selection rather than in the loop: of selected block j
    # the keys j*BS .. min(j*BS + BS - 1, t)
    b_cnt = tl.sum(tl.where(b_sel >= 0, tl.minimum(tl.maximum(r_t32[:, None] - b_sel * BS + 1, 0), BS), 0), 1)
    # one flat loop over (union block, key sub-tile): nested, the pipeline would drain at every block
    NS: tl.constexpr = (BS + BK - 1) // BK
    for it in range(n_u * NS):
        j = tl.load(ulist + (i_n * H + i_h) * UMAX + it // NS)
        s0 = (it % NS) * BK
        # rows whose token selected block j
        m_rj = m_r & (tl.sum((b_sel == j).to(tl.int32), 1) > 0)
        o_p = j * BS + s0 + o_s
        m_p = ((s0 + o_s) < BS) & (o_p < L32)
        m_s = m_rj[:, None] & m_p[None, :] & (o_p[None, :] <= r_t32[:, None])
        p_kv = (bos + o_p.to(tl.int64)) * H + i_h
        # rows that see nothing of this sub-tile keep their state
        b_mi, b_li, b_acc, b_lin, b_ms = _attend_subtile(
            b_q, b_fq, k, v, fk, p_kv, m_p, m_s, o_d, m_d, o_v, m_v, o_f, m_f, b_mi, b_li, b_acc, b_lin, b_ms,
            qk_scale, D, DV, F, DOT_PREC, CDT, LIN, (bos + j * BS + s0).to(tl.int32), i_h.to(tl.int32), TMA)
    # every valid row sees at least itself (its own block is always selected)
    b_li = tl.where(m_r, b_li, 1.)
    m_o = m_r[:, None] & m_v[None, :]
    tl.store(o + p_row[:, None] * DV + o_v[None, :], (b_acc / b_li[:, None]).to(o.dtype.element_ty), mask=m_o)
    if STORE_LSE:
        tl.store(lse + p_row, b_mi + tl.log2(b_li), mask=m_r)
    # residual = global - selected, exactly 0 where every visible token is selected (counted per row)
    empty = b_cnt == r_t + 1
    b_gl, b_gm = _global_rows(glob, glob_mass, p_row, o_v, m_o, m_r, DV, BT * GP, BDV, LIN)
    b_r = tl.where(empty[:, None], 0., b_gl - b_lin)
    b_rm = tl.where(empty, 0., b_gm - b_ms)
    tl.store(o_rla + p_row[:, None] * DV + o_v[None, :], b_r.to(o_rla.dtype.element_ty), mask=m_o)
    tl.store(rla_mass + p_row, b_rm, mask=m_r)


@triton.jit(do_not_specialize=['scale', 'NBA', 'e0'])
def spla_fwd_kernel_sparse_kv(
    q,  # [T, HQ, D]
    k,  # [T, H, D]
    v,  # [T, H, DV]
    fq,  # [T, HQ, F]
    fk,  # [T, H, F]
    work_key,  # [NW] int64 (KV head) * NBA + (global block id)
    work_start,  # [NW] int64 first entry of the work item in ``perm``
    work_end,  # [NW] int64 end of the entries of this (KV head, block)
    perm,  # [E] int64 entry ids (t * H + h) * TOPK + slot, grouped by (KV head, block), ascending tokens
    all_tok,  # [NBA] int64 first token of every block (partial blocks included)
    all_len,  # [NBA] int64 its length
    p_lse,  # [E, G] fp32 log2-sum-exp2 of the entry's scores
    p_o,  # [E, G, DV] attention output normalized over the entry's block
    p_lin,  # [E, G, DV] fp32 the entry's selected linear term (unused with LIN_ATOMIC)
    p_lm,  # [E, G] fp32 its mass
    glob,  # [T, HQ, DV] fp32 global linear attention (LIN_ATOMIC: the selected terms are subtracted in place)
    glob_mass,  # [T, HQ] fp32 its mass, likewise
    scale,
    NBA,
    e0,  # first entry id of this token chunk
    HQ: tl.constexpr,
    H: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    DV: tl.constexpr,
    BDV: tl.constexpr,
    F: tl.constexpr,
    BF: tl.constexpr,
    BS: tl.constexpr,
    BK: tl.constexpr,
    BQ: tl.constexpr,
    TOPK: tl.constexpr,
    DOT_PREC: tl.constexpr,
    CDT: tl.constexpr,
    LIN: tl.constexpr,
    LIN_ATOMIC: tl.constexpr = False,
):
    """KV-block-major sparse attention: one program loads one selected block once and serves up to BQ tokens
    that selected it (their G heads as rows), writing per-(token, block) partials merged later (the selected
    linear term too, in fp32, so the merge sums them in slot order; ``LIN_ATOMIC``: subtracted from glob with
    fp32 atomics instead, order not fixed)."""
    i_w = tl.program_id(0).to(tl.int64)
    key = tl.load(work_key + i_w).to(tl.int64)
    i_h, i_b = key // NBA, key % NBA
    start = tl.load(work_start + i_w).to(tl.int64)
    end = tl.load(work_end + i_w).to(tl.int64)
    t_b = tl.load(all_tok + i_b).to(tl.int64)
    n_b = tl.load(all_len + i_b).to(tl.int64)
    # rows: entry-major, group-head-minor [BQ*GP]
    o_r = tl.arange(0, BQ * GP)
    r_e, r_g = start + o_r // GP, o_r % GP
    m_e = r_e < end
    m_r = m_e & (r_g < G)
    b_e = tl.load(perm + r_e, mask=m_e, other=0).to(tl.int64)
    b_t = b_e // (H * TOPK)
    o_d, o_v, o_f = tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BF)
    m_d, m_v, m_f = o_d < D, o_v < DV, o_f < F
    p_row = b_t * HQ + i_h * G + r_g
    # [BQ*GP, BD], [BQ*GP, BF]
    b_q, b_fq = _query_rows(q, fq, p_row, m_r, o_d, m_d, o_f, m_f, D, F, CDT, LIN)
    qk_scale = scale * 1.44269504
    b_m = tl.full([BQ * GP], float('-inf'), dtype=tl.float32)
    b_l = tl.zeros([BQ * GP], dtype=tl.float32)
    b_acc = tl.zeros([BQ * GP, BDV], dtype=tl.float32)
    b_lin = tl.zeros([BQ * GP, BDV], dtype=tl.float32)
    b_ms = tl.zeros([BQ * GP], dtype=tl.float32)
    o_s = tl.arange(0, BK)
    for s0 in range(0, BS, BK):
        o_p = s0 + o_s
        m_p = o_p < n_b
        p_kv = (t_b + o_p) * H + i_h
        # causal: key t_b + p visible to token t when t_b + p <= t; [BQ*GP, BK] (a row can see none of a sub-tile)
        m_s = m_p[None, :] & ((t_b + o_p)[None, :] <= b_t[:, None])
        b_m, b_l, b_acc, b_lin, b_ms = _attend_subtile(
            b_q, b_fq, k, v, fk, p_kv, m_p, m_s, o_d, m_d, o_v, m_v, o_f, m_f, b_m, b_l, b_acc, b_lin, b_ms, qk_scale,
            D, DV, F, DOT_PREC, CDT, LIN)
    # every entry sees at least the first key of its block, so b_l > 0 on valid rows
    b_l = tl.where(m_r, b_l, 1.)
    p_e = (b_e - e0) * G + r_g
    m_o = m_r[:, None] & m_v[None, :]
    tl.store(p_lse + p_e, b_m + tl.log2(b_l), mask=m_r)
    tl.store(p_o + p_e[:, None] * DV + o_v[None, :], (b_acc / b_l[:, None]).to(p_o.dtype.element_ty), mask=m_o)
    if LIN:
        if LIN_ATOMIC:
            # residual = global - selected: subtract this block's linear term (fp32 atomics, order not fixed)
            tl.atomic_add(glob + p_row[:, None] * DV + o_v[None, :], -b_lin, mask=m_o, sem='relaxed')
            tl.atomic_add(glob_mass + p_row, -b_ms, mask=m_r, sem='relaxed')
        else:
            tl.store(p_lin + p_e[:, None] * DV + o_v[None, :], b_lin, mask=m_o)
            tl.store(p_lm + p_e, b_ms, mask=m_r)


@triton.jit(do_not_specialize=['t0', 'e0', 'w0'])
def spla_fwd_kernel_merge(
    p_lse,  # [E, G] fp32
    p_o,  # [E, G, DV]
    p_lin,  # [E, G, DV] fp32 selected linear terms (unread with LIN_ATOMIC)
    p_lm,  # [E, G] fp32 their masses
    indices,  # [T, H, TOPK] int32
    tok_bos,  # [T] int64
    work,  # [NW] int64 (token) * H + (KV head) of each program from entry w0 on, if WORK (else the grid is (T, H))
    glob,  # [T, HQ, DV] fp32 global linear term (LIN_ATOMIC: minus the selected ones already)
    glob_mass,  # [T, HQ] fp32 its mass
    o,  # [T, HQ, DV]
    o_rla,  # [T, HQ, DV]
    rla_mass,  # [T, HQ] fp32
    lse,  # [T, HQ] fp32 log2-sum-exp2 (saved for the backward), if STORE_LSE
    t0,  # first token of this chunk
    e0,  # its first entry id
    w0,  # its first work item (WORK)
    HQ: tl.constexpr,
    H: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    DV: tl.constexpr,
    BDV: tl.constexpr,
    BS: tl.constexpr,
    TOPK: tl.constexpr,
    BTOPK: tl.constexpr,
    STORE_LSE: tl.constexpr = False,
    LIN: tl.constexpr = True,
    LIN_ATOMIC: tl.constexpr = False,
    WORK: tl.constexpr = False,
):
    """Merge the per-block partials of one token and KV head; the residual is 0 where nothing is unselected, and
    everywhere without the linear branch (``LIN=False``: glob, glob_mass unread)."""
    if WORK:
        e = tl.load(work + w0 + tl.program_id(0)).to(tl.int64)
        i_t, i_h = e // H, e % H
    else:
        i_t, i_h = tl.program_id(0).to(tl.int64) + t0, tl.program_id(1).to(tl.int64)
    pos = i_t - tl.load(tok_bos + i_t).to(tl.int64)
    o_g = tl.arange(0, GP)
    m_g = o_g < G
    o_v = tl.arange(0, BDV)
    m_v = o_v < DV
    m_o = m_g[:, None] & m_v[None, :]
    o_i = tl.arange(0, BTOPK)
    b_idx = tl.load(indices + (i_t * H + i_h) * TOPK + o_i, mask=o_i < TOPK, other=-1).to(tl.int64)
    # visible selected tokens, counted from the block ids
    b_cnt = tl.where(b_idx >= 0, tl.minimum(tl.maximum(pos - b_idx * BS + 1, 0), BS), 0)
    empty = tl.sum(b_cnt, 0) == pos + 1
    n_sel = tl.sum((b_idx >= 0).to(tl.int32), 0)
    b_m = tl.full([GP], float('-inf'), dtype=tl.float32)
    b_den = tl.zeros([GP], dtype=tl.float32)
    b_acc = tl.zeros([GP, BDV], dtype=tl.float32)
    b_sl = tl.zeros([GP, BDV], dtype=tl.float32)
    b_sm = tl.zeros([GP], dtype=tl.float32)
    for i in range(n_sel):
        p_e = ((i_t * H + i_h) * TOPK + i - e0) * G + o_g
        b_lse = tl.load(p_lse + p_e, mask=m_g, other=0.)
        b_mn = tl.maximum(b_m, b_lse)
        b_a = tl.exp2(b_m - b_mn)
        b_b = tl.exp2(b_lse - b_mn)
        b_den = b_den * b_a + b_b
        b_oi = tl.load(p_o + p_e[:, None] * DV + o_v[None, :], mask=m_o, other=0.).to(tl.float32)
        b_acc = b_acc * b_a[:, None] + b_b[:, None] * b_oi
        b_m = b_mn
        if LIN and not LIN_ATOMIC:
            b_sl += tl.load(p_lin + p_e[:, None] * DV + o_v[None, :], mask=m_o, other=0.)
            b_sm += tl.load(p_lm + p_e, mask=m_g, other=0.)
    p_row = i_t * HQ + i_h * G + o_g
    tl.store(o + p_row[:, None] * DV + o_v[None, :], (b_acc / b_den[:, None]).to(o.dtype.element_ty), mask=m_o)
    if STORE_LSE:
        tl.store(lse + p_row, b_m + tl.log2(b_den), mask=m_g)
    b_gl, b_gm = _global_rows(glob, glob_mass, p_row, o_v, m_o, m_g, DV, GP, BDV, LIN)
    b_gl, b_gm = b_gl - b_sl, b_gm - b_sm
    tl.store(o_rla + p_row[:, None] * DV + o_v[None, :], tl.where(empty, 0., b_gl).to(o_rla.dtype.element_ty), mask=m_o)
    tl.store(rla_mass + p_row, tl.where(empty, 0., b_gm), mask=m_g)


_META_CACHE: Dict[tuple, dict] = {}


def _prepare_meta(cu: Tuple[int, ...], block_size: int, tile: int, device) -> dict:
    """Index tables of a packed batch: sequences, complete blocks, scoring tiles and linear chunks (cached)."""
    key = (cu, block_size, tile, str(device))
    if key in _META_CACHE:
        return _META_CACHE[key]
    seqs = [(a, b - a) for a, b in zip(cu[:-1], cu[1:]) if b > a]
    bos = torch.tensor([s for s, _ in seqs], dtype=torch.int64)
    lens = torch.tensor([n for _, n in seqs], dtype=torch.int64)

    def ranges(counts: torch.Tensor, step: int):
        """Per sequence ``arange(count) * step``, concatenated, with the sequence id of each entry."""
        sid = torch.repeat_interleave(torch.arange(len(seqs)), counts)
        first = torch.cumsum(counts, 0) - counts
        local = torch.arange(int(counts.sum())) - torch.repeat_interleave(first, counts)
        return sid, local * step, first

    nb = lens // block_size
    bsid, bloc, boff = ranges(nb, block_size)
    qt = (lens + tile - 1) // tile
    qsid, qloc, _ = ranges(qt, tile)
    nc = (lens + LINEAR_CHUNK - 1) // LINEAR_CHUNK
    csid, cloc, coff = ranges(nc, LINEAR_CHUNK)
    na = (lens + block_size - 1) // block_size
    asid, aloc, aoff = ranges(na, block_size)
    meta = dict(
        tok_bos=torch.repeat_interleave(bos, lens),
        tok_aoff=torch.repeat_interleave(aoff, lens),
        all_tok=bos[asid] + aloc, all_len=torch.clamp(lens[asid] - aloc, max=block_size),
        blk_tok=bos[bsid] + bloc,
        tile_bos=bos[qsid], tile_t0=qloc, tile_len=lens[qsid], tile_boff=boff[qsid],
        seq_bos=bos, seq_len=lens, seq_coff=coff,
        chunk_bos=bos[csid], chunk_t0=cloc, chunk_len=lens[csid],
    )
    meta = {n: x.to(device) for n, x in meta.items()}
    meta.update(cu=cu, block_size=block_size, tile=tile)  # the layout itself, to re-tile it (sparse_union_fwd)
    if len(_META_CACHE) > 64:
        _META_CACHE.clear()
    _META_CACHE[key] = meta
    return meta


def _topk_tile(block_size: int, G: int, rows: Optional[int] = None) -> Optional[int]:
    """Query tokens per scoring tile (a power of two dividing block_size), or None when too small for tl.dot."""
    GP = triton.next_power_of_2(G)
    bt = block_size & -block_size  # largest power of two dividing block_size
    bt = min(bt, max(1, (rows or TOPK_ROWS) // GP))
    return bt if bt * GP >= 16 else None


def block_stats_fwd(k: torch.Tensor, meta: dict, block_size: int, rep_keys: int, second: bool,
                    dtype: torch.dtype = torch.float32):
    """Mean / diag variance / representative keys of the complete blocks of packed `[T, H, D]` keys, computed in
    fp32 and stored in ``dtype`` (:func:`selection_stats_dtype`)."""
    T, H, D = k.shape
    NB = meta["blk_tok"].numel()
    mean = k.new_empty(max(NB, 1), H, D, dtype=dtype)
    var = k.new_empty(max(NB, 1), H, D, dtype=dtype) if second else mean
    reps = k.new_empty(max(NB, 1), H, max(rep_keys, 1), D, dtype=dtype) if rep_keys > 0 else mean
    if NB > 0:
        spla_fwd_kernel_stats[(NB, H)](k, mean, var, reps, meta["blk_tok"], H=H, D=D, BD=triton.next_power_of_2(D),
                                       BS=block_size, BSP=triton.next_power_of_2(block_size), R=rep_keys,
                                       SECOND=second, num_warps=4)
    return mean, var, reps


def selection_stats_dtype(q: torch.Tensor) -> torch.dtype:
    """Storage of the selection's block statistics: fp32, or with :data:`STATS_16BIT` the 16-bit dtype the scoring
    kernel rounds them to on load anyway (16-bit inputs on a GPU): half the bytes, the same selection bit for bit."""
    cdt = compute_dtype(q.dtype)
    if STATS_16BIT and cdt != tl.float32:
        return torch.bfloat16 if cdt == tl.bfloat16 else torch.float16
    return torch.float32


def select_fwd(q: torch.Tensor, stats, meta: dict, *, H: int, block_size: int, tile: int, topk: int,
               sink_blocks: int, local_blocks: int, selection: str, rep_keys: int, scale: float,
               merge: bool = True, chunk: Optional[int] = None, num_warps: Optional[int] = None) -> torch.Tensor:
    """Selected block ids of packed `[T, HQ, D]` queries, `[T, H, topk]` int32, ascending, -1 padded.

    ``chunk``: candidate blocks scored per loop step (default :data:`TOPK_CHUNK`, else 32 for groups of 16 or more
    query heads, else 16; at least the padded top-k).
    ``merge=False`` skips the top-k merge (benchmark diagnostics only: the indices are then wrong).
    ``num_warps``: default 8 for tiles of 128 rows or more, else 4 (measured; with 32-block chunks 4 warps spill 72
    bytes per thread on sm_90a and 8 do not, ``benchmarks/kernel_resources.py``: ``bench_forward.py`` times the
    other warp count beside the default, ``select_alt_warps_ms``).
    """
    T, HQ, D = q.shape
    KP = max(16, triton.next_power_of_2(topk))
    G = HQ // H
    GP = triton.next_power_of_2(G)
    KC = max(KP, triton.next_power_of_2(chunk or TOPK_CHUNK or (32 if G >= 16 else 16)))
    mean, var, reps = stats
    indices = q.new_empty(T, H, topk, dtype=torch.int32)
    NQ = meta["tile_bos"].numel()
    spla_fwd_kernel_topk[(NQ, H)](
        q, mean, var, reps, indices, meta["tile_bos"], meta["tile_t0"], meta["tile_len"], meta["tile_boff"],
        scale, 0.5 * scale * scale, math.log(block_size),
        HQ=HQ, H=H, G=G, GP=GP, D=D, BD=triton.next_power_of_2(D), BT=tile,
        KP=KP, KC=KC, R=rep_keys, RP=max(1, triton.next_power_of_2(rep_keys)),
        TOPK=topk, SINK=sink_blocks, LOCAL=local_blocks, BS=block_size, TAYLOR2=selection == "taylor2",
        DOT_PREC=_dot_prec(q.dtype), CDT=compute_dtype(q.dtype), MERGE=merge,
        num_warps=num_warps or (8 if tile * GP >= 128 else 4), num_stages=2)
    return indices


def select_packed_fwd(q: torch.Tensor, k: torch.Tensor, meta: dict, *, H: int, block_size: int, tile: int,
                      topk: int, sink_blocks: int, local_blocks: int, selection: str, rep_keys: int, scale: float,
                      stats_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Block statistics of packed `[T, H, D]` keys, then the selection of packed `[T, HQ, D]` queries: the
    `[T, H, topk]` int32 block ids of :func:`select_fwd` (statistics stored in ``stats_dtype``)."""
    stats = block_stats_fwd(k, meta, block_size, rep_keys, selection == "taylor2", stats_dtype)
    return select_fwd(q, stats, meta, H=H, block_size=block_size, tile=tile, topk=topk, sink_blocks=sink_blocks,
                      local_blocks=local_blocks, selection=selection, rep_keys=rep_keys, scale=scale)


def linear_branch_fwd(q_lin: torch.Tensor, k_lin: torch.Tensor, v: torch.Tensor, meta: dict, feature_map_name: str,
                      dtype: torch.dtype):
    """The residual branch's inputs to the sparse stage, packed: phi(q) `[T, HQ, F]`, phi(k) `[T, H, F]` (in
    ``dtype``) and the causal global linear term `[T, HQ, DV]` with its mass `[T, HQ]` (fp32)."""
    fq = feature_map_fwd(q_lin, feature_map_name, dtype)
    fk = feature_map_fwd(k_lin, feature_map_name, dtype)
    glob, glob_mass = global_linear_fwd(fq, fk, v, meta, LINEAR_CHUNK)
    return fq, fk, glob, glob_mass


def sparse_fwd(q, k, v, fq, fk, glob, glob_mass, indices, meta, *, block_size: int, scale: float, lin: bool = True,
               lse: Optional[torch.Tensor] = None, num_warps: Optional[int] = None, num_stages: Optional[int] = None,
               work: Optional[torch.Tensor] = None, out: Optional[tuple] = None, bk: Optional[int] = None,
               tma: Optional[bool] = None):
    """Sparse attention + selected linear term + residual of packed inputs; returns (o, o_rla, rla_mass).
    Token-major: one program per (token, KV head). Launch settings (and ``bk``, keys per sub-tile; ``tma``, key
    sub-tiles as bulk tensor copies) default to :data:`SPARSE_LAUNCH`.

    ``lin=False``: no linear branch (fq, fk, glob, glob_mass unread): o_rla and rla_mass are exactly zero.
    ``lse``: an fp32 `[T, HQ]` buffer that receives the log2-sum-exp2 of the scaled scores (for the backward).
    ``work``: int64 ``token * H + KV head`` of the only (token, KV head) pairs to compute, written into the
    buffers ``out = (o, o_rla, rla_mass)`` (the union stage's fallback); default every pair, new buffers.
    """
    T, HQ, D = q.shape
    H, DV, F = k.shape[1], v.shape[-1], fk.shape[-1]
    G = HQ // H
    topk = indices.shape[-1]
    if out is None:
        out = (q.new_empty(T, HQ, DV), q.new_empty(T, HQ, DV), q.new_empty(T, HQ, dtype=torch.float32))
    o, o_rla, rla_mass = out
    grid = (T, H) if work is None else (work.numel(), 1)
    if grid[0] > 0:
        BK = max(16, min(bk or SPARSE_LAUNCH["token_bk"], triton.next_power_of_2(block_size)))
        kk, vv, ff, tma = _key_loads(k, v, fk, BK, meta, SPARSE_LAUNCH["token_tma"] if tma is None else tma)
        spla_fwd_kernel_sparse[grid](
            q, kk, vv, fq, ff, glob, glob_mass, indices, meta["tok_bos"], meta["tok_bos"] if work is None else work,
            o, o_rla, rla_mass, rla_mass if lse is None else lse, scale, HQ=HQ, H=H, G=G,
            GP=max(16, triton.next_power_of_2(G)), D=D, BD=triton.next_power_of_2(D), DV=DV,
            BDV=triton.next_power_of_2(DV), F=F, BF=triton.next_power_of_2(F), BS=block_size, BK=BK, TOPK=topk,
            BTOPK=triton.next_power_of_2(topk), DOT_PREC=_dot_prec(q.dtype), CDT=compute_dtype(q.dtype), LIN=lin,
            STORE_LSE=lse is not None, WORK=work is not None, TMA=tma,
            num_warps=num_warps or SPARSE_LAUNCH["token_warps"], num_stages=num_stages or SPARSE_LAUNCH["token_stages"])
    return o, o_rla, rla_mass


def _tile_unions(indices: torch.Tensor, meta: dict, tile: int):
    """The union of the blocks the tokens of each query tile selected, per KV head: ``[NQ, H, tile*TOPK]`` int32
    ascending (padding after ``count``) and ``count [NQ, H]`` int32 (torch: a sort, a de-duplication, a sort)."""
    T, H, K = indices.shape
    r = torch.arange(tile, device=indices.device)
    pos = meta["tile_t0"][:, None] + r[None, :]  # [NQ, tile]
    ok = pos < meta["tile_len"][:, None]
    tok = torch.where(ok, meta["tile_bos"][:, None] + pos, 0)
    big = torch.iinfo(torch.int32).max
    ids = torch.where(ok[:, :, None, None], indices[tok], -1)  # [NQ, tile, H, K]
    ids = torch.where(ids >= 0, ids, big).permute(0, 2, 1, 3).reshape(-1, H, tile * K)
    ids = torch.sort(ids, -1).values
    dup = torch.zeros_like(ids, dtype=torch.bool)
    dup[..., 1:] = ids[..., 1:] == ids[..., :-1]
    ids = torch.sort(torch.where(dup, big, ids), -1).values
    return ids.contiguous(), (ids < big).sum(-1, dtype=torch.int32)


def _union_split(ucount: torch.Tensor, meta: dict, tile: int, cap: float, min_share: float = 0.0):
    """Split the (query tile, KV head) pairs of the union stage: those whose union has at most ``cap`` blocks
    (int64 ``tile * H + head``), and the (token, KV head) pairs of the others (int64 ``token * H + head``).
    Where fewer than ``min_share`` of the pairs have small unions: ``(empty, None)``, every row per token (the
    per-token path over the whole sequence, not a work list)."""
    NQ, H = ucount.shape
    small = (ucount <= cap).view(-1)
    pairs = torch.arange(NQ * H, device=ucount.device)
    if min_share > 0 and int(small.sum()) < min_share * small.numel():
        return pairs[:0], None
    big = pairs[~small]
    n, h = big // H, big % H
    cnt = torch.clamp(meta["tile_len"][n] - meta["tile_t0"][n], max=tile)
    first = meta["tile_bos"][n] + meta["tile_t0"][n]
    total = int(cnt.sum())
    start = torch.cumsum(cnt, 0) - cnt
    local = torch.arange(total, device=ucount.device) - torch.repeat_interleave(start, cnt, output_size=total)
    tok = torch.repeat_interleave(first, cnt, output_size=total) + local
    return pairs[small], tok * H + torch.repeat_interleave(h, cnt, output_size=total)


def _dense_path(G: int) -> str:
    """The per-token sparse path ``SPARSE_PATH="auto"`` takes for group size ``G`` (also the union stage's
    fallback): token-major for 8 query heads per KV head or more, else KV-major (docs/benchmarks.md, table A)."""
    return "token" if G >= 8 else "kv"


def _sparse_path(G: int) -> str:
    """The forward's sparse stage that ``SPARSE_PATH="auto"`` takes for group size ``G``: the query-tile union
    (with :func:`_dense_path`'s per-token fallback for tiles whose union is large) for groups under 8, else
    token-major. H100, 64k, union stage at its defaults (docs/benchmarks.md): 32/8 28.3 ms against 43.5 for
    KV-major on AR(1) queries, 49.1 against 48.0 on random ones; 64/4 (tile of 4 tokens) 32.4 against 42.4 for
    token-major on AR(1) queries but 58.6 against 44.5 on random ones, so G >= 8 stays token-major."""
    return "union" if G < 8 else _dense_path(G)


def _union_tiling(meta: dict, G: int, tile: Optional[int], bk: int, block_size: int, device):
    """The union kernels' tiling (forward and backward): ``tile`` tokens per union tile (None: the selection's tile
    that ``meta`` was made for), raised to the 16-row minimum (tokens x padded group heads), a power of two; the
    index tables re-made for it when it differs from ``meta``'s; keys per sub-tile ``bk`` within [16, block]."""
    tile = max(tile or meta["tile"], triton.cdiv(16, triton.next_power_of_2(G)))
    if tile & (tile - 1):
        raise ValueError(f"the union tile must be a power of two, got {tile}")
    if tile != meta["tile"]:
        meta = _prepare_meta(meta["cu"], meta["block_size"], tile, device)
    return tile, meta, max(16, min(bk, triton.next_power_of_2(block_size)))


def _key_loads(k: torch.Tensor, v: torch.Tensor, fk: torch.Tensor, bk: int, meta: dict, use: bool):
    """The key operands of a sparse kernel with a ``TMA`` option: ``(k, v, fk, True)`` as tensor descriptors (Hopper
    TMA) of the packed `[T, H, *]` tensors viewed as `[T, H * *]` matrices, each with a box of ``bk`` keys by one
    head's channels, or ``(k, v, fk, False)`` unchanged for pointer loads: when ``use`` is off, when a head's
    channels are not a power of two or rows are not 16-byte aligned, or when a sequence's length (``meta["cu"]``)
    is not a multiple of ``bk``. A bulk copy has no per-key mask, so a sub-tile that ran past a sequence's end would
    read the next sequence's keys (weighted 0, but a non-finite value there would still leak in); past the tensor's
    end it reads zeros."""
    cu = meta["cu"]
    if not use or any((b - a) % bk for a, b in zip(cu, cu[1:])):
        return k, v, fk, False
    from triton.tools.tensor_descriptor import TensorDescriptor
    out = []
    for x in (k, v, fk):
        T, H, C = x.shape
        if (C & (C - 1) or not x.is_contiguous() or x.data_ptr() % 16
                or (H * C * x.element_size()) % 16 or C * x.element_size() < 16):
            return k, v, fk, False
        out.append(TensorDescriptor.from_tensor(x.view(T, H * C), [bk, C]))
    return (*out, True)


def sparse_union_fwd(q, k, v, fq, fk, glob, glob_mass, indices, meta, *, block_size: int, scale: float,
                     tile: Optional[int] = None, lin: bool = True, lse: Optional[torch.Tensor] = None,
                     num_warps: Optional[int] = None, num_stages: Optional[int] = None, bk: Optional[int] = None,
                     max_load: Optional[float] = None, deterministic: Optional[bool] = None,
                     fallback_path: Optional[str] = None, tma: Optional[bool] = None):
    """Query-tile sparse stage (``spla_fwd_kernel_sparse_union``): per tile of ``tile`` consecutive tokens (the
    selection's tiles, ``meta``) and KV head, the union of their selected blocks is loaded once for all their rows.
    Returns (o, o_rla, rla_mass) as :func:`sparse_fwd`; the same outputs up to rounding. It reads
    ``union / (tile x topk)`` of the K/V the token-major stage reads (2-10% for 64-16 token tiles on a real
    model's activations, ``benchmarks/bench_locality.py``) and computes scores over the whole union.

    ``max_load`` (default :data:`UNION_MAX_LOAD`): a (tile, KV head) whose union exceeds ``max_load x tile x topk``
    blocks runs per token instead: its rows would compute scores against ``4 x max_load`` times the keys the
    token-major kernel's 16-row tiles do. 0 sends every tile to the fallback, 1 none. The fallback
    (``fallback_path``, default the path ``SPARSE_PATH="auto"`` takes for this group size) is the token-major
    stage (:func:`sparse_fwd`) or the KV-major one (:func:`sparse_kv_fwd`, ``deterministic`` as there) on those
    (token, KV head) rows alone; where fewer than :data:`UNION_MIN_SHARE` of the (tile, KV head) pairs are under
    the threshold (queries without locality), on every row.

    ``tile`` (default ``SPARSE_LAUNCH["union_tile"]``, else the selection's tile that ``meta`` was made for): tokens
    per union tile, raised to at least 16 rows (tokens x padded group heads); a smaller tile has a smaller union
    (less score work per row) and fewer rows per matrix product. ``bk`` (default ``SPARSE_LAUNCH["union_bk"]``):
    keys per sub-tile of a block. ``tma`` (default ``SPARSE_LAUNCH["union_tma"]``): load the key sub-tiles as
    bulk tensor copies (:func:`_key_loads`; pointer loads where it does not apply)."""
    T, HQ, D = q.shape
    H, DV, F = k.shape[1], v.shape[-1], fk.shape[-1]
    G = HQ // H
    GP = triton.next_power_of_2(G)
    topk = indices.shape[-1]
    tile, meta, bk = _union_tiling(meta, G, tile or SPARSE_LAUNCH["union_tile"], bk or SPARSE_LAUNCH["union_bk"],
                                   block_size, q.device)
    ulist, ucount = _tile_unions(indices, meta, tile)
    work, fallback = _union_split(ucount, meta, tile, (UNION_MAX_LOAD if max_load is None else max_load) * tile * topk,
                                  UNION_MIN_SHARE)
    out = (q.new_empty(T, HQ, DV), q.new_empty(T, HQ, DV), q.new_empty(T, HQ, dtype=torch.float32))
    o, o_rla, rla_mass = out
    if work.numel() > 0:
        kk, vv, ff, tma = _key_loads(k, v, fk, bk, meta, SPARSE_LAUNCH["union_tma"] if tma is None else tma)
        spla_fwd_kernel_sparse_union[(work.numel(),)](
            q, kk, vv, fq, ff, glob, glob_mass, indices, ulist, ucount, work, meta["tile_bos"], meta["tile_t0"],
            meta["tile_len"], o, o_rla, rla_mass, rla_mass if lse is None else lse, scale,
            HQ=HQ, H=H, G=G, GP=GP, D=D, BD=triton.next_power_of_2(D), DV=DV,
            BDV=triton.next_power_of_2(DV), F=F, BF=triton.next_power_of_2(F), BS=block_size, BK=bk, BT=tile, TOPK=topk,
            BTOPK=triton.next_power_of_2(topk), UMAX=ulist.shape[-1], DOT_PREC=_dot_prec(q.dtype),
            CDT=compute_dtype(q.dtype), LIN=lin, STORE_LSE=lse is not None, TMA=tma,
            num_warps=num_warps or SPARSE_LAUNCH["union_warps"], num_stages=num_stages or SPARSE_LAUNCH["union_stages"])
    if fallback is None or fallback.numel() > 0:  # None: every row (UNION_MIN_SHARE)
        if (fallback_path or _dense_path(G)) == "kv":
            sparse_kv_fwd(q, k, v, fq, fk, glob, glob_mass, indices, meta, block_size=block_size, scale=scale,
                          lin=lin, lse=lse, deterministic=deterministic, work=fallback, out=out)
        else:
            sparse_fwd(q, k, v, fq, fk, glob, glob_mass, indices, meta, block_size=block_size, scale=scale, lin=lin,
                       lse=lse, work=fallback, out=out)
    return out


# bytes of per-(token, block) partials the KV-major path keeps at once (attention outputs in the input dtype and
# fp32 log-sum-exps; deterministic: also fp32 selected linear terms and masses); it runs in token chunks under it
PARTIAL_BYTES = 3 << 30
# fixed summation orders (the forward's KV-major selected linear terms, the backward's key gradients), default on;
# SPLA_DETERMINISTIC=0 or deterministic=False: fp32 atomics instead
DETERMINISTIC = os.environ.get("SPLA_DETERMINISTIC", "1") != "0"
# launch settings of the sparse stage: the token-major kernel's warps and pipeline stages; the KV-major kernel's
# rows per program (tokens x padded group heads that share one loaded block), warps and stages
# (benchmarks/bench_forward.py --sweep-sparse times alternatives; benchmarks/kernel_resources.py compiles each
# for sm_90a on a CPU and reports registers, spills and shared memory, docs/benchmarks.md "Kernel resources").
# - union_warps / union_stages / union_bk (timed, H100, 64k, AR(1) queries, bench_forward.py --sweep-sparse):
#   32 keys per sub-tile at 4 warps / 2 stages (no spills, 112 KB, 2 programs per SM) took the forward's union
#   stage from 40.4 ms (whole blocks, 8 warps / 2 stages, 176 KB, 1 program per SM) to 27.8 for 32/8 and from
#   50.7 to 32.4 for 64/4; half the tile at 4 warps (28.6, 32/8) was close, both together slower (37.2);
# the rest chosen from those compile facts, not yet timed (the benchmarks time the earlier settings beside them):
# - union_bwd_*: the backward's union kernel holds fp32 dq and dphi(q) for 64 rows beside q, phi(q), do, do_rla:
#   1180 bytes of spills at 4 warps / 2 stages, 120 at 8 warps / 1 stage, none at 8 / 2 (3 stages do not fit);
# - kvb_*: the KV-major key-gradient pass, rows per step of its attention part (PART 0) and of its linear part
#   (PART 1, which holds fp32 dphi(k) [64, 256] and dv [64, 128]): 600 bytes of spills at 64 rows, none at 32.
# - union_tile / union_bk (union_bwd_tile / union_bwd_bk: the backward's): the union tile (None: the selection's
#   tile, 16 tokens for G = 4, 4 for G = 16) and keys per sub-tile; `--sweep-sparse` times smaller ones for the
#   forward (smaller unions, less shared memory per stage), kernel_resources.py compiles both.
# - union_tma: the forward union kernel loads its key sub-tiles (K, V, phi(k): consecutive keys of one head) as
#   Hopper bulk tensor copies through tensor descriptors instead of per-element pointer loads (fewer instructions
#   per sub-tile, copies the pipeline can run ahead). On: H100, 64k, 32/8, AR(1) queries (bench_ab.py, second
#   session of 2026-12-06) the forward took 33.7-34.0 ms against 35.7-36.2 with pointer loads, the union stage
#   20.0 against 21.1; on random queries 60.3 against 59.9 (most of their tiles take the fallback).
#   union_bwd_tma / token_tma: the same in the backward's union kernel / the forward's token-major kernel; off,
#   not resolved / not timed (forward+backward 131.0 against 134.0 ms with both union kernels on TMA).
SPARSE_LAUNCH = dict(token_warps=4, token_stages=2, token_bk=64, kv_rows=64, kv_warps=4, kv_stages=2, union_warps=4,
                     union_stages=2, union_tile=None, union_bk=32, union_bwd_warps=8, union_bwd_stages=2,
                     union_bwd_tile=None, union_bwd_bk=64, kvb_rows=64, kvb_lin_rows=32, kvb_warps=8, kvb_stages=1,
                     union_tma=True, union_bwd_tma=False, token_tma=False)


def _kv_worklist(idx: torch.Tensor, aoff: torch.Tensor, NBA: int, BQ: int):
    """Group the entries of `[n, H, TOPK]` block ids by (KV head, block): the permutation and the work items."""
    n, H, K = idx.shape
    dev = idx.device
    nkeys = H * NBA
    keys = torch.arange(H, device=dev)[None, :, None] * NBA + aoff[:, None, None] + idx.long()
    keys = torch.where(idx >= 0, keys, nkeys).view(-1)
    _, perm = torch.sort(keys, stable=True)
    counts = torch.bincount(keys, minlength=nkeys + 1)[:nkeys]
    offs = torch.cumsum(counts, 0) - counts
    nch = (counts + BQ - 1) // BQ
    NW = int(nch.sum())
    wkey = torch.repeat_interleave(torch.arange(nkeys, device=dev), nch, output_size=NW)
    first = torch.cumsum(nch, 0) - nch
    local = torch.arange(NW, device=dev) - torch.repeat_interleave(first, nch, output_size=NW)
    wstart = offs[wkey] + local * BQ
    wend = offs[wkey] + counts[wkey]
    return perm, wkey, wstart, wend


def sparse_kv_fwd(q, k, v, fq, fk, glob, glob_mass, indices, meta, *, block_size: int, scale: float,
                  lin: bool = True, rows: Optional[int] = None, num_warps: Optional[int] = None,
                  num_stages: Optional[int] = None, lse: Optional[torch.Tensor] = None,
                  deterministic: Optional[bool] = None, work: Optional[torch.Tensor] = None, out=None):
    """KV-block-major sparse stage (each selected block is loaded once per BQ tokens that chose it).

    Processes the tokens in chunks so that the per-(token, block) partials stay under ``PARTIAL_BYTES``.
    The selected linear terms are fp32 partials that the merge subtracts from ``glob`` / ``glob_mass`` in slot
    order (``deterministic``, default :data:`DETERMINISTIC`), or fp32 atomics subtract them in place (order not
    fixed; 2.5% faster on an H200 at 64k, docs/benchmarks.md).
    ``lin=False``: no linear branch (fq, fk, glob, glob_mass unread): o_rla and rla_mass are exactly zero.
    ``work`` (int64 ``token * H + head``) restricts the stage to those (token, KV head) rows, written into ``out``
    = (o, o_rla, rla_mass) (as :func:`sparse_fwd`; the union stage's fallback).
    """
    T, HQ, D = q.shape
    H, DV, F = k.shape[1], v.shape[-1], fk.shape[-1]
    G = HQ // H
    GP = triton.next_power_of_2(G)
    topk = indices.shape[-1]
    rows = rows or SPARSE_LAUNCH["kv_rows"]
    BQ = max(1, rows // GP)
    while BQ * GP < 16:
        BQ *= 2
    NBA = meta["all_tok"].numel()
    pdt = q.dtype
    atomic = not lin or not (DETERMINISTIC if deterministic is None else deterministic)
    entry_bytes = G * (DV * q.element_size() + 4 + (0 if atomic else 4 * DV + 4))
    chunk = max(1, min(T, PARTIAL_BYTES // (H * topk * entry_bytes)))
    if out is None:
        out = (q.new_empty(T, HQ, DV), q.new_empty(T, HQ, DV), q.new_empty(T, HQ, dtype=torch.float32))
    o, o_rla, rla_mass = out
    if work is not None:
        # only the rows of ``work``: the others select nothing here, and the merge runs over ``work`` alone
        work = torch.sort(work).values
        keep = torch.zeros(T * H, dtype=torch.bool, device=q.device)
        keep[work] = True
        indices = torch.where(keep.view(T, H, 1), indices, -1)
        cuts = torch.tensor([t0 * H for t0 in range(0, T, chunk)] + [T * H], device=q.device)
        wcut = torch.searchsorted(work, cuts).tolist()
    E = min(T, chunk) * H * topk
    p_lse = q.new_empty(E, G, dtype=torch.float32)
    p_o = q.new_empty(E, G, DV, dtype=pdt)
    p_lin = p_o if atomic else q.new_empty(E, G, DV, dtype=torch.float32)
    p_lm = p_lse if atomic else q.new_empty(E, G, dtype=torch.float32)
    BK = max(16, min(128, triton.next_power_of_2(block_size)))
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        perm, wkey, wstart, wend = _kv_worklist(indices[t0:t1], meta["tok_aoff"][t0:t1], NBA, BQ)
        e0 = t0 * H * topk
        perm = perm + e0
        if wkey.numel() > 0:
            spla_fwd_kernel_sparse_kv[(wkey.numel(),)](
                q, k, v, fq, fk, wkey, wstart, wend, perm, meta["all_tok"], meta["all_len"],
                p_lse, p_o, p_lin, p_lm, glob, glob_mass, scale, NBA, e0,
                HQ=HQ, H=H, G=G, GP=GP, D=D, BD=triton.next_power_of_2(D), DV=DV, BDV=triton.next_power_of_2(DV),
                F=F, BF=triton.next_power_of_2(F), BS=block_size, BK=BK, BQ=BQ, TOPK=topk,
                DOT_PREC=_dot_prec(q.dtype), CDT=compute_dtype(q.dtype), LIN=lin, LIN_ATOMIC=atomic,
                num_warps=num_warps or SPARSE_LAUNCH["kv_warps"], num_stages=num_stages or SPARSE_LAUNCH["kv_stages"])
        if work is None:
            grid, w0 = (t1 - t0, H), 0
        else:
            w0 = wcut[t0 // chunk]
            grid = (wcut[t0 // chunk + 1] - w0, 1)
        if grid[0] > 0:
            spla_fwd_kernel_merge[grid](
                p_lse, p_o, p_lin, p_lm, indices, meta["tok_bos"], meta["tok_bos"] if work is None else work, glob,
                glob_mass, o, o_rla, rla_mass, rla_mass if lse is None else lse, t0, e0, w0,
                HQ=HQ, H=H, G=G, GP=GP, DV=DV, BDV=triton.next_power_of_2(DV), BS=block_size, TOPK=topk,
                BTOPK=triton.next_power_of_2(topk), STORE_LSE=lse is not None, LIN=lin, LIN_ATOMIC=atomic,
                WORK=work is not None, num_warps=4)
    return o, o_rla, rla_mass


def _expand_kv(x: torch.Tensor, HQ: int) -> torch.Tensor:
    """``[B, T, H, D]`` -> ``[B, T, HQ, D]`` (each KV head repeated for its G query heads; a copy when G > 1).

    The dense path calls SDPA on expanded K/V: its flash kernel takes equal head counts, and SDPA's
    ``enable_gqa`` was 2-3x slower than flash on expanded K/V on an H200 (docs/benchmarks.md)."""
    B, T, H, D = x.shape
    return x if H == HQ else x[:, :, :, None].expand(B, T, H, HQ // H, D).reshape(B, T, HQ, D)


def dense_sdpa(q, k, v, scale: float) -> torch.Tensor:
    """Causal softmax attention of `[B, T, HQ, D]` q over `[B, T, H, D]` k, v (GQA by expansion), `[B, T, HQ, Dv]`."""
    HQ = q.shape[2]
    return scaled_dot_product_attention(q.transpose(1, 2), _expand_kv(k, HQ).transpose(1, 2),
                                        _expand_kv(v, HQ).transpose(1, 2), is_causal=True, scale=scale).transpose(1, 2)


_DENSE_INDICES: Dict[Tuple[int, int, int, torch.device], torch.Tensor] = {}


def _dense_indices(T: int, block_size: int, topk: int, device: torch.device) -> torch.Tensor:
    """``[T, topk]`` int32: blocks ``0..c`` of each token's causal range, then -1 (cached per shape and device)."""
    key = (T, block_size, topk, device)
    idx = _DENSE_INDICES.get(key)
    if idx is None:
        c = torch.arange(T, device=device) // block_size
        ar = torch.arange(topk, device=device)
        idx = torch.where(ar[None, :] <= c[:, None], ar[None, :], -1).to(torch.int32)
        if len(_DENSE_INDICES) > 64:
            _DENSE_INDICES.clear()
        _DENSE_INDICES[key] = idx
    return idx


def dense_fwd(q, k, v, *, block_size: int, topk: int, scale: float):
    """Every block selected (T <= topk * block_size): causal SDPA, a zero residual and indices ``0..c``."""
    B, T, HQ, D = q.shape
    H = k.shape[2]
    o = dense_sdpa(q, k, v, scale)
    indices = _dense_indices(T, block_size, topk, q.device)[None, :, None, :].expand(B, T, H, topk).contiguous()
    o_rla = torch.zeros(B, T, HQ, v.shape[-1], dtype=q.dtype, device=q.device)
    rla_mass = torch.zeros(B, T, HQ, dtype=torch.float32, device=q.device)
    return o, o_rla, rla_mass, indices


def parallel_spla_fwd(q, k, v, q_lin, k_lin, *, block_size, topk, sink_blocks, local_blocks, selection, cov,
                      rep_keys, feature_map_name, scale, cu_seqlens, save_lse: bool = False, residual: bool = True,
                      deterministic: Optional[bool] = None):
    """All forward stages on `[B, T, ...]` inputs; returns (o_sparse, o_rla, rla_mass, indices).
    ``deterministic`` (default :data:`DETERMINISTIC`): fixed summation order in the KV-major sparse stage.

    ``save_lse=True`` appends the fp32 `[B*T, HQ]` log2-sum-exp2 of the sparse branch for the backward (None when
    the dense fast path ran). ``residual=False``: no linear branch at all (q_lin, k_lin unread; o_rla and rla_mass
    are zeros): top-k block-sparse attention only.
    """
    B, T, HQ, D = q.shape
    H = k.shape[2]
    G = HQ // H
    dtype = q.dtype
    if DENSE_FAST_PATH and cu_seqlens is None and T <= topk * block_size and v.shape[-1] == D and q.is_cuda:
        out = dense_fwd(q, k, v, block_size=block_size, topk=topk, scale=scale)
        return (*out, None) if save_lse else out
    if cu_seqlens is None:
        cu = tuple(range(0, B * T + 1, T))
    else:
        cu = tuple(int(x) for x in cu_seqlens.tolist())
    tile = _topk_tile(block_size, G)
    meta = _prepare_meta(cu, block_size, tile or 1, q.device)
    qf, kf, vf = (x.reshape(B * T, *x.shape[2:]).contiguous() for x in (q, k, v))
    if selection == "oracle" or cov == "full" or tile is None:
        indices = chunk_spla_select(q, k, block_size=block_size, topk=topk, sink_blocks=sink_blocks,
                                    local_blocks=local_blocks, selection=selection, cov=cov, rep_keys=rep_keys,
                                    scale=scale, cu_seqlens=cu_seqlens).reshape(B * T, H, topk)
    else:
        indices = select_packed_fwd(qf, kf, meta, H=H, block_size=block_size, tile=tile, topk=topk,
                                    sink_blocks=sink_blocks, local_blocks=local_blocks, selection=selection,
                                    rep_keys=rep_keys, scale=scale, stats_dtype=selection_stats_dtype(q))
    if residual:
        fq, fk, glob, glob_mass = linear_branch_fwd(q_lin.reshape(B * T, HQ, -1).contiguous(),
                                                    k_lin.reshape(B * T, H, -1).contiguous(), vf, meta,
                                                    feature_map_name, dtype)
    else:  # placeholders: with lin=False the kernels read none of them and write o_rla = rla_mass = 0
        fq, fk, glob, glob_mass = qf, kf, qf, qf
    path = SPARSE_PATH if SPARSE_PATH != "auto" else _sparse_path(G)
    if path == "union" and tile:
        sparse = functools.partial(sparse_union_fwd, deterministic=deterministic)
    elif path == "kv":
        sparse = functools.partial(sparse_kv_fwd, deterministic=deterministic)
    else:
        sparse = sparse_fwd
    lse = q.new_empty(B * T, HQ, dtype=torch.float32) if save_lse else None
    o, o_rla, rla_mass = sparse(qf, kf, vf, fq, fk, glob, glob_mass, indices, meta, block_size=block_size, scale=scale,
                                lse=lse, lin=residual)
    DV = v.shape[-1]
    out = (o.view(B, T, HQ, DV), o_rla.view(B, T, HQ, DV), rla_mass.view(B, T, HQ), indices.view(B, T, H, topk))
    return (*out, lse) if save_lse else out


# ---------------------------------------------------------------------------------------------------------------
# Backward (issue 4)
#
# Per row r = (token t, query head h) with the saved log2-sum-exp2 ``lse`` and, per key i of U(t, g):
#   p = exp2(scale*log2e q·k_i - lse), ds = p (do·v_i - delta), delta = do·o           (exact attention)
#   w = phi(q)·phi(k_i), dw = a·v_i + b, a = -live*do_rla, b = -live*drla_mass           (selected linear term)
#   dq = scale sum ds k_i, dphi(q) += sum dw phi(k_i)                                       (token-major pass)
#   dk_i = scale sum ds q, dv_i = sum p do + w a, dphi(k_i) += sum dw phi(q)               (scatter to the keys)
# ``live`` (`[T, H]`) is 0 where the residual is identically 0 (all visible tokens selected, counted), so no
# gradient flows through a term the forward replaced by an exact 0.
# Two ways to get the key gradients:
#   - deterministic (default, ``SPLA_DETERMINISTIC=1``): a KV-block-major pass, one program per (KV head, block)
#     that walks every token that selected the block (inverse index built with a stable torch sort), keeps the
#     block's dk / dv / dphi(k) in registers and writes them once: fixed summation order, no atomics. Blocks
#     selected by more than ``KV_CAP`` (token, slot) entries (the sinks: every token) are split into chunks
#     whose fp32 partials ``spla_bwd_kernel_kv_reduce`` sums in chunk order, so no program walks all T tokens;
#   - atomic (``SPLA_DETERMINISTIC=0`` or ``deterministic=False``): the token-major pass also scatters its key
#     tiles with fp32 ``tl.atomic_add`` (summation order not fixed).
# ---------------------------------------------------------------------------------------------------------------

# most (token, slot) entries one work item of the KV-block-major backward walks; busier blocks are split
KV_CAP = 4096


@triton.jit
def _grad_rows(q, fq, o, do, do_rla, drla_mass, lse, live, delta, p_row, p_live, m_r, o_d, m_d, o_v, m_v, o_f, m_f,
               D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, CDT: tl.constexpr, LIN: tl.constexpr):
    """What the query-side backward needs of rows ``p_row`` (``m_r`` real; ``p_live`` their (token, KV head)):
    q and do in the compute dtype, delta = do·o (also stored, for the KV-major pass), the saved lse and, with the
    linear branch, phi(q), a = -live*do_rla and b = -live*drla_mass (unread placeholders without it)."""
    m_rd, m_rv = m_r[:, None] & m_d[None, :], m_r[:, None] & m_v[None, :]
    b_q = tl.load(q + p_row[:, None] * D + o_d[None, :], mask=m_rd, other=0.).to(tl.float32).to(CDT)
    b_do = tl.load(do + p_row[:, None] * DV + o_v[None, :], mask=m_rv, other=0.).to(tl.float32)
    b_o = tl.load(o + p_row[:, None] * DV + o_v[None, :], mask=m_rv, other=0.).to(tl.float32)
    b_delta = tl.sum(b_do * b_o, 1)
    tl.store(delta + p_row, b_delta, mask=m_r)
    b_lse = tl.load(lse + p_row, mask=m_r, other=0.)
    b_doc = b_do.to(CDT)
    if LIN:
        b_fq = tl.load(fq + p_row[:, None] * F + o_f[None, :], mask=m_r[:, None] & m_f[None, :], other=0.)
        b_fq = b_fq.to(tl.float32).to(CDT)
        b_live = tl.load(live + p_live, mask=m_r, other=0.)
        b_a = -tl.load(do_rla + p_row[:, None] * DV + o_v[None, :], mask=m_rv, other=0.).to(tl.float32)
        b_ac = (b_a * b_live[:, None]).to(CDT)
        b_b = -tl.load(drla_mass + p_row, mask=m_r, other=0.) * b_live
    else:  # unread
        b_fq, b_ac, b_b = b_q, b_doc, b_delta
    return b_q, b_doc, b_delta, b_lse, b_fq, b_ac, b_b


@triton.jit
def _store_grad_rows(dq, dfq, p_row, m_r, o_d, m_d, o_f, m_f, b_dq, b_dfq, scale, D: tl.constexpr,
                     F: tl.constexpr, LIN: tl.constexpr):
    """Write dq (scaled) of rows ``p_row`` and add their selected linear term's dphi(q) to the global term's."""
    tl.store(dq + p_row[:, None] * D + o_d[None, :], (b_dq * scale).to(dq.dtype.element_ty),
             mask=m_r[:, None] & m_d[None, :])
    if LIN:
        m_rf = m_r[:, None] & m_f[None, :]
        p_fq = dfq + p_row[:, None] * F + o_f[None, :]
        tl.store(p_fq, tl.load(p_fq, mask=m_rf, other=0.) + b_dfq, mask=m_rf)


@triton.jit
def _grad_subtile(b_q, b_doc, b_delta, b_lse, b_fq, b_ac, b_b, k, v, fk, dk, dv, dfk, p_kv, m_p, m_s, o_d, m_d, o_v,
                  m_v, o_f, m_f, b_dq, b_dfq, scale, qk_scale, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
                  DOT_PREC: tl.constexpr, CDT: tl.constexpr, LIN: tl.constexpr, ATOMIC: tl.constexpr, tma_row=0,
                  tma_h=0, TMA: tl.constexpr = False):
    """One key sub-tile of the query-side backward for a set of rows: loads K, V (and phi(k)) of keys ``p_kv``
    (``m_p`` real), recomputes p from the saved log-sum-exp under the row x key mask ``m_s``, and accumulates dq
    (unscaled) and the selected linear term's dphi(q). ``ATOMIC``: also adds the keys' dk, dv, dphi(k) with fp32
    atomics (summed over the rows first). Returns (dq, dphi(q)). ``TMA``: the tiles are loaded as in
    :func:`_attend_subtile` (``k, v, fk`` tensor descriptors, consecutive keys from row ``tma_row``)."""
    if TMA:
        b_k = k.load([tma_row, tma_h * D]).to(CDT)
        b_v = v.load([tma_row, tma_h * DV]).to(CDT)
    else:
        b_k = tl.load(k + p_kv[:, None] * D + o_d[None, :], mask=m_p[:, None] & m_d[None, :], other=0.)
        b_k = b_k.to(tl.float32).to(CDT)
        b_v = tl.load(v + p_kv[:, None] * DV + o_v[None, :], mask=m_p[:, None] & m_v[None, :], other=0.)
        b_v = b_v.to(tl.float32).to(CDT)
    # [rows, BK]
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale
    b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.)
    b_dp = tl.dot(b_doc, tl.trans(b_v), input_precision=DOT_PREC)
    b_ds = b_p * (b_dp - b_delta[:, None])
    b_dq += tl.dot(b_ds.to(CDT), b_k, input_precision=DOT_PREC)
    if LIN:
        if TMA:
            b_fk = fk.load([tma_row, tma_h * F]).to(CDT)
        else:
            b_fk = tl.load(fk + p_kv[:, None] * F + o_f[None, :], mask=m_p[:, None] & m_f[None, :], other=0.)
            b_fk = b_fk.to(tl.float32).to(CDT)
        b_w = tl.where(m_s, tl.dot(b_fq, tl.trans(b_fk), input_precision=DOT_PREC), 0.)
        b_dw = tl.where(m_s, tl.dot(b_ac, tl.trans(b_v), input_precision=DOT_PREC) + b_b[:, None], 0.)
        b_dfq += tl.dot(b_dw.to(CDT), b_fk, input_precision=DOT_PREC)
    if ATOMIC:
        b_dkt = tl.dot(tl.trans(b_ds.to(CDT)), b_q, input_precision=DOT_PREC) * scale
        b_dvt = tl.dot(tl.trans(b_p.to(CDT)), b_doc, input_precision=DOT_PREC)
        tl.atomic_add(dk + p_kv[:, None] * D + o_d[None, :], b_dkt, mask=m_p[:, None] & m_d[None, :], sem='relaxed')
        if LIN:
            b_dvt += tl.dot(tl.trans(b_w.to(CDT)), b_ac, input_precision=DOT_PREC)
            b_dfkt = tl.dot(tl.trans(b_dw.to(CDT)), b_fq, input_precision=DOT_PREC)
            tl.atomic_add(dfk + p_kv[:, None] * F + o_f[None, :], b_dfkt, mask=m_p[:, None] & m_f[None, :],
                          sem='relaxed')
        tl.atomic_add(dv + p_kv[:, None] * DV + o_v[None, :], b_dvt, mask=m_p[:, None] & m_v[None, :], sem='relaxed')
    return b_dq, b_dfq


@triton.jit(do_not_specialize=['scale'])
def spla_bwd_kernel_sparse(
    q,  # [T, HQ, D]
    k,  # [T, H, D]
    v,  # [T, H, DV]
    fq,  # [T, HQ, F]
    fk,  # [T, H, F]
    o,  # [T, HQ, DV] forward output of the sparse branch
    do,  # [T, HQ, DV]
    do_rla,  # [T, HQ, DV]
    drla_mass,  # [T, HQ] fp32
    lse,  # [T, HQ] fp32 log2-sum-exp2
    live,  # [T, H] fp32
    indices,  # [T, H, TOPK] int32
    tok_bos,  # [T] int64
    work,  # [NW] int64 (token) * H + (KV head) of each program, if WORK (else unread: the grid is (T, H))
    dq,  # [T, HQ, D] out (q's dtype)
    dfq,  # [T, HQ, F] fp32: holds the global term's gradient, the selected term's is added
    delta,  # [T, HQ] fp32 out: do·o (read by the KV-major pass)
    dk,  # [T, H, D] fp32, ATOMIC only
    dv,  # [T, H, DV] fp32, ATOMIC only (holds the global term's gradient)
    dfk,  # [T, H, F] fp32, ATOMIC only (likewise)
    scale,
    HQ: tl.constexpr,
    H: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    DV: tl.constexpr,
    BDV: tl.constexpr,
    F: tl.constexpr,
    BF: tl.constexpr,
    BS: tl.constexpr,
    BK: tl.constexpr,
    TOPK: tl.constexpr,
    BTOPK: tl.constexpr,
    DOT_PREC: tl.constexpr,
    CDT: tl.constexpr,
    ATOMIC: tl.constexpr,
    LIN: tl.constexpr = True,
    WORK: tl.constexpr = False,
):
    """Token-major backward: one program per token and KV head (its G heads as the rows of tl.dot).
    ``LIN=False``: no linear branch (top-k sparse attention only): fq, fk, do_rla, drla_mass, dfq, dfk unread."""
    if WORK:
        e = tl.load(work + tl.program_id(0)).to(tl.int64)
        i_t, i_h = e // H, e % H
    else:
        i_t, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    bos = tl.load(tok_bos + i_t).to(tl.int64)
    pos = i_t - bos
    o_g = tl.arange(0, GP)
    m_g = o_g < G
    o_d, o_v, o_f = tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BF)
    m_d, m_v, m_f = o_d < D, o_v < DV, o_f < F
    p_row = i_t * HQ + i_h * G + o_g
    b_q, b_doc, b_delta, b_lse, b_fq, b_ac, b_b = _grad_rows(
        q, fq, o, do, do_rla, drla_mass, lse, live, delta, p_row, i_t * H + i_h + 0 * o_g, m_g, o_d, m_d, o_v, m_v,
        o_f, m_f, D, DV, F, CDT, LIN)

    o_i = tl.arange(0, BTOPK)
    b_idx = tl.load(indices + (i_t * H + i_h) * TOPK + o_i, mask=o_i < TOPK, other=-1)
    n_sel = tl.sum((b_idx >= 0).to(tl.int32), 0)
    qk_scale = scale * 1.44269504
    b_dq = tl.zeros([GP, BD], dtype=tl.float32)
    b_dfq = tl.zeros([GP, BF], dtype=tl.float32)
    o_s = tl.arange(0, BK)
    NS: tl.constexpr = (BS + BK - 1) // BK  # one flat loop over (selected block, key sub-tile), as in the forward
    for it in range(n_sel * NS):
        j = tl.load(indices + (i_t * H + i_h) * TOPK + it // NS).to(tl.int64)
        s0 = (it % NS) * BK
        o_p = j * BS + s0 + o_s
        m_p = ((s0 + o_s) < BS) & (o_p <= pos)
        b_dq, b_dfq = _grad_subtile(
            b_q, b_doc, b_delta, b_lse, b_fq, b_ac, b_b, k, v, fk, dk, dv, dfk, (bos + o_p) * H + i_h, m_p,
            m_g[:, None] & m_p[None, :], o_d, m_d, o_v, m_v, o_f, m_f, b_dq, b_dfq, scale, qk_scale, D, DV, F,
            DOT_PREC, CDT, LIN, ATOMIC)
    _store_grad_rows(dq, dfq, p_row, m_g, o_d, m_d, o_f, m_f, b_dq, b_dfq, scale, D, F, LIN)


@triton.jit(do_not_specialize=['scale'])
def spla_bwd_kernel_sparse_union(
    q,  # [T, HQ, D]
    k,  # [T, H, D]
    v,  # [T, H, DV]
    fq,  # [T, HQ, F]
    fk,  # [T, H, F]
    o,  # [T, HQ, DV] forward output of the sparse branch
    do,  # [T, HQ, DV]
    do_rla,  # [T, HQ, DV]
    drla_mass,  # [T, HQ] fp32
    lse,  # [T, HQ] fp32 log2-sum-exp2
    live,  # [T, H] fp32
    indices,  # [T, H, TOPK] int32
    ulist,  # [NQ, H, UMAX] int32 the union of the tile's selected blocks, ascending, then padding
    ucount,  # [NQ, H] int32 its length
    work,  # [NW] int64 (tile) * H + (KV head) of each program
    tile_bos,  # [NQ] int64 first token of the tile's sequence
    tile_t0,  # [NQ] int64 the tile's first position in its sequence
    tile_len,  # [NQ] int64 the sequence's length
    dq,  # [T, HQ, D] out (q's dtype)
    dfq,  # [T, HQ, F] fp32: holds the global term's gradient, the selected term's is added
    delta,  # [T, HQ] fp32 out: do·o (read by the KV-major pass)
    dk,  # [T, H, D] fp32, ATOMIC only
    dv,  # [T, H, DV] fp32, ATOMIC only (holds the global term's gradient)
    dfk,  # [T, H, F] fp32, ATOMIC only (likewise)
    scale,
    HQ: tl.constexpr,
    H: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    DV: tl.constexpr,
    BDV: tl.constexpr,
    F: tl.constexpr,
    BF: tl.constexpr,
    BS: tl.constexpr,
    BK: tl.constexpr,
    BT: tl.constexpr,
    TOPK: tl.constexpr,
    BTOPK: tl.constexpr,
    UMAX: tl.constexpr,
    DOT_PREC: tl.constexpr,
    CDT: tl.constexpr,
    ATOMIC: tl.constexpr,
    LIN: tl.constexpr = True,
    TMA: tl.constexpr = False,
):
    """Query-tile backward, the mirror of ``spla_fwd_kernel_sparse_union``: one program per (tile of BT
    consecutive tokens, KV head) walks the union of the blocks its tokens selected, loading each once for all
    BT x G rows, and computes dq, the selected linear term's dphi(q) and delta for its rows (``ATOMIC``: also the
    keys' dk, dv, dphi(k), one fp32 atomic add per key and union block for the whole tile). ``TMA``: ``k, v, fk``
    are tensor descriptors (:func:`_key_loads`), each key sub-tile one bulk copy."""
    e = tl.load(work + tl.program_id(0)).to(tl.int64)
    i_n, i_h = e // H, e % H
    bos = tl.load(tile_bos + i_n).to(tl.int64)
    t0 = tl.load(tile_t0 + i_n).to(tl.int64)
    L = tl.load(tile_len + i_n).to(tl.int64)
    # rows: token-major, group-head-minor [BT*GP]
    o_r = tl.arange(0, BT * GP)
    r_t, r_g = t0 + o_r // GP, o_r % GP
    m_r = (r_t < L) & (r_g < G)
    p_row = (bos + r_t) * HQ + i_h * G + r_g
    o_d, o_v, o_f = tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BF)
    m_d, m_v, m_f = o_d < D, o_v < DV, o_f < F
    b_q, b_doc, b_delta, b_lse, b_fq, b_ac, b_b = _grad_rows(
        q, fq, o, do, do_rla, drla_mass, lse, live, delta, p_row, (bos + r_t) * H + i_h, m_r, o_d, m_d, o_v, m_v,
        o_f, m_f, D, DV, F, CDT, LIN)
    # each row's selection [BT*GP, BTOPK]
    o_i = tl.arange(0, BTOPK)
    b_sel = tl.load(indices + ((bos + r_t) * H + i_h)[:, None] * TOPK + o_i[None, :],
                    mask=m_r[:, None] & (o_i < TOPK)[None, :], other=-1)
    n_u = tl.load(ucount + i_n * H + i_h)
    qk_scale = scale * 1.44269504
    b_dq = tl.zeros([BT * GP, BD], dtype=tl.float32)
    b_dfq = tl.zeros([BT * GP, BF], dtype=tl.float32)
    o_s = tl.arange(0, BK)
    r_t32, L32 = r_t.to(tl.int32), L.to(tl.int32)  # the masks in 32-bit integers, as in the forward
    NS: tl.constexpr = (BS + BK - 1) // BK  # one flat loop over (union block, key sub-tile), as in the forward
    for it in range(n_u * NS):
        j = tl.load(ulist + (i_n * H + i_h) * UMAX + it // NS)
        s0 = (it % NS) * BK
        # rows whose token selected block j
        m_rj = m_r & (tl.sum((b_sel == j).to(tl.int32), 1) > 0)
        o_p = j * BS + s0 + o_s
        m_p = ((s0 + o_s) < BS) & (o_p < L32)
        m_s = m_rj[:, None] & m_p[None, :] & (o_p[None, :] <= r_t32[:, None])
        b_dq, b_dfq = _grad_subtile(
            b_q, b_doc, b_delta, b_lse, b_fq, b_ac, b_b, k, v, fk, dk, dv, dfk, (bos + o_p.to(tl.int64)) * H + i_h,
            m_p, m_s, o_d, m_d, o_v, m_v, o_f, m_f, b_dq, b_dfq, scale, qk_scale, D, DV, F, DOT_PREC, CDT, LIN, ATOMIC,
            (bos + j * BS + s0).to(tl.int32), i_h.to(tl.int32), TMA)
    _store_grad_rows(dq, dfq, p_row, m_r, o_d, m_d, o_f, m_f, b_dq, b_dfq, scale, D, F, LIN)


@triton.jit(do_not_specialize=['scale', 'NBA'])
def spla_bwd_kernel_sparse_kv(
    q,  # [T, HQ, D]
    k,  # [T, H, D]
    v,  # [T, H, DV]
    fq,  # [T, HQ, F]
    fk,  # [T, H, F]
    do,  # [T, HQ, DV]
    do_rla,  # [T, HQ, DV]
    drla_mass,  # [T, HQ] fp32
    lse,  # [T, HQ] fp32
    delta,  # [T, HQ] fp32
    live,  # [T, H] fp32
    work_key,  # [NW] int64 (KV head) * NBA + (global block id), one item per (KV head, block) selected at all
    work_start,  # [NW] int64 first entry in ``perm``
    work_end,  # [NW] int64 end of its entries
    perm,  # [E] int64 entry ids (t * H + h) * TOPK + slot grouped by (KV head, block), ascending tokens
    all_tok,  # [NBA] int64 first token of every block
    all_len,  # [NBA] int64 its length
    dk,  # [T, H, D] fp32 out (zero where no token selected the block)
    dv,  # [T, H, DV] fp32: the global term's gradient, this block's is added
    dfk,  # [T, H, F] fp32: likewise
    work_slot,  # [NW] int64 -1: write into dk / dv / dfk; else the partial slot of a (KV head, block) split in chunks
    part_a,  # [NP, BSP, PA] fp32 partial dk (PART 0) or dphi(k) (PART 1) of split blocks
    part_v,  # [NP, BSP, DV] fp32 partial dv
    scale,
    NBA,
    HQ: tl.constexpr,
    H: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    DV: tl.constexpr,
    BDV: tl.constexpr,
    F: tl.constexpr,
    BF: tl.constexpr,
    BSP: tl.constexpr,
    BQ: tl.constexpr,
    TOPK: tl.constexpr,
    DOT_PREC: tl.constexpr,
    CDT: tl.constexpr,
    PART: tl.constexpr,
    PA: tl.constexpr,
):
    """KV-block-major backward: the whole block stays on chip, BQ selecting tokens (x G heads) per step;
    the block's key gradients are written once (deterministic). Two launches keep the register tiles small:
    ``PART=0`` the attention (dk, dv += p^T do), ``PART=1`` the selected linear term (dphi(k), dv += w^T a)."""
    i_w = tl.program_id(0).to(tl.int64)
    key = tl.load(work_key + i_w).to(tl.int64)
    i_h, i_b = key // NBA, key % NBA
    start = tl.load(work_start + i_w).to(tl.int64)
    end = tl.load(work_end + i_w).to(tl.int64)
    t_b = tl.load(all_tok + i_b).to(tl.int64)
    n_b = tl.load(all_len + i_b).to(tl.int64)
    o_s = tl.arange(0, BSP)
    m_p = o_s < n_b
    p_kv = (t_b + o_s) * H + i_h
    o_d, o_v, o_f = tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BF)
    m_d, m_v, m_f = o_d < D, o_v < DV, o_f < F
    m_kd, m_kv, m_kf = m_p[:, None] & m_d[None, :], m_p[:, None] & m_v[None, :], m_p[:, None] & m_f[None, :]
    b_v = tl.load(v + p_kv[:, None] * DV + o_v[None, :], mask=m_kv, other=0.).to(tl.float32).to(CDT)
    b_dv = tl.zeros([BSP, BDV], dtype=tl.float32)
    if PART == 0:
        b_k = tl.load(k + p_kv[:, None] * D + o_d[None, :], mask=m_kd, other=0.).to(tl.float32).to(CDT)
        b_dk = tl.zeros([BSP, BD], dtype=tl.float32)
    else:
        b_fk = tl.load(fk + p_kv[:, None] * F + o_f[None, :], mask=m_kf, other=0.).to(tl.float32).to(CDT)
        b_dfk = tl.zeros([BSP, BF], dtype=tl.float32)
    qk_scale = scale * 1.44269504
    o_r = tl.arange(0, BQ * GP)
    n_it = tl.cdiv(end - start, BQ)
    for it in range(n_it):
        r_e = start + tl.cast(it, tl.int64) * BQ + o_r // GP
        r_g = o_r % GP
        m_e = r_e < end
        m_r = m_e & (r_g < G)
        b_e = tl.load(perm + r_e, mask=m_e, other=0).to(tl.int64)
        b_t = b_e // (H * TOPK)
        p_row = b_t * HQ + i_h * G + r_g
        m_rd, m_rv, m_rf = m_r[:, None] & m_d[None, :], m_r[:, None] & m_v[None, :], m_r[:, None] & m_f[None, :]
        # [BQ*GP, BSP]: causal inside the block
        m_s = m_r[:, None] & m_p[None, :] & ((t_b + o_s)[None, :] <= b_t[:, None])
        if PART == 0:
            b_q = tl.load(q + p_row[:, None] * D + o_d[None, :], mask=m_rd, other=0.).to(tl.float32).to(CDT)
            b_do = tl.load(do + p_row[:, None] * DV + o_v[None, :], mask=m_rv, other=0.).to(tl.float32).to(CDT)
            b_lse = tl.load(lse + p_row, mask=m_r, other=0.)
            b_delta = tl.load(delta + p_row, mask=m_r, other=0.)
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * qk_scale
            b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.)
            b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)
            b_ds = b_p * (b_dp - b_delta[:, None])
            b_dk += tl.dot(tl.trans(b_ds.to(CDT)), b_q, input_precision=DOT_PREC)
            b_dv += tl.dot(tl.trans(b_p.to(CDT)), b_do, input_precision=DOT_PREC)
        else:
            b_fq = tl.load(fq + p_row[:, None] * F + o_f[None, :], mask=m_rf, other=0.).to(tl.float32).to(CDT)
            b_live = tl.load(live + b_t * H + i_h, mask=m_r, other=0.)
            b_a = -tl.load(do_rla + p_row[:, None] * DV + o_v[None, :], mask=m_rv, other=0.).to(tl.float32)
            b_a = (b_a * b_live[:, None]).to(CDT)
            b_b = -tl.load(drla_mass + p_row, mask=m_r, other=0.) * b_live
            b_w = tl.where(m_s, tl.dot(b_fq, tl.trans(b_fk), input_precision=DOT_PREC), 0.)
            b_dw = tl.where(m_s, tl.dot(b_a, tl.trans(b_v), input_precision=DOT_PREC) + b_b[:, None], 0.)
            b_dv += tl.dot(tl.trans(b_w.to(CDT)), b_a, input_precision=DOT_PREC)
            b_dfk += tl.dot(tl.trans(b_dw.to(CDT)), b_fq, input_precision=DOT_PREC)
    slot = tl.load(work_slot + i_w).to(tl.int64)
    if slot < 0:
        # the only work item of its block: write the block's gradients
        p_dv = dv + p_kv[:, None] * DV + o_v[None, :]
        tl.store(p_dv, tl.load(p_dv, mask=m_kv, other=0.) + b_dv, mask=m_kv)
        if PART == 0:
            tl.store(dk + p_kv[:, None] * D + o_d[None, :], b_dk * scale, mask=m_kd)
        else:
            p_dfk = dfk + p_kv[:, None] * F + o_f[None, :]
            tl.store(p_dfk, tl.load(p_dfk, mask=m_kf, other=0.) + b_dfk, mask=m_kf)
    else:
        # one chunk of a heavily selected block: a partial, summed in order by spla_bwd_kernel_kv_reduce
        p_row = slot * BSP + o_s
        tl.store(part_v + p_row[:, None] * DV + o_v[None, :], b_dv, mask=m_kv)
        if PART == 0:
            tl.store(part_a + p_row[:, None] * PA + o_d[None, :], b_dk * scale, mask=m_kd)
        else:
            tl.store(part_a + p_row[:, None] * PA + o_f[None, :], b_dfk, mask=m_kf)


@triton.jit(do_not_specialize=['NBA'])
def spla_bwd_kernel_kv_reduce(
    part_a,  # [NP, BSP, PA] fp32
    part_v,  # [NP, BSP, DV] fp32
    dst_a,  # [T, H, DA] fp32 dk or dphi(k)
    dst_v,  # [T, H, DV] fp32 dv
    red_key,  # [NR] int64 (KV head) * NBA + block of every split block
    red_first,  # [NR] int64 its first partial slot
    red_n,  # [NR] int64 its number of partials
    all_tok,  # [NBA] int64
    all_len,  # [NBA] int64
    NBA,
    H: tl.constexpr,
    DA: tl.constexpr,
    BDA: tl.constexpr,
    DV: tl.constexpr,
    BDV: tl.constexpr,
    BSP: tl.constexpr,
    PA: tl.constexpr,
):
    """Sum the partials of one split block in slot order (deterministic) and add them to its rows."""
    i_r = tl.program_id(0).to(tl.int64)
    key = tl.load(red_key + i_r).to(tl.int64)
    i_h, i_b = key // NBA, key % NBA
    first = tl.load(red_first + i_r).to(tl.int64)
    n = tl.load(red_n + i_r).to(tl.int64)
    t_b = tl.load(all_tok + i_b).to(tl.int64)
    n_b = tl.load(all_len + i_b).to(tl.int64)
    o_s, o_a, o_v = tl.arange(0, BSP), tl.arange(0, BDA), tl.arange(0, BDV)
    m_p = o_s < n_b
    m_a, m_v = m_p[:, None] & (o_a < DA)[None, :], m_p[:, None] & (o_v < DV)[None, :]
    b_a = tl.zeros([BSP, BDA], dtype=tl.float32)
    b_v = tl.zeros([BSP, BDV], dtype=tl.float32)
    for j in range(n):
        p_row = (first + tl.cast(j, tl.int64)) * BSP + o_s
        b_a += tl.load(part_a + p_row[:, None] * PA + o_a[None, :], mask=m_a, other=0.)
        b_v += tl.load(part_v + p_row[:, None] * DV + o_v[None, :], mask=m_v, other=0.)
    p_kv = (t_b + o_s) * H + i_h
    p_a = dst_a + p_kv[:, None] * DA + o_a[None, :]
    tl.store(p_a, tl.load(p_a, mask=m_a, other=0.) + b_a, mask=m_a)
    p_v = dst_v + p_kv[:, None] * DV + o_v[None, :]
    tl.store(p_v, tl.load(p_v, mask=m_v, other=0.) + b_v, mask=m_v)


def live_rows(indices: torch.Tensor, meta: dict, block_size: int) -> torch.Tensor:
    """`[T, H]` fp32: 1 where some visible token is unselected (the residual is live), 0 where it is exactly 0."""
    T = indices.shape[0]
    pos = torch.arange(T, device=indices.device) - meta["tok_bos"]
    idx = indices.long()
    seen = (pos[:, None, None] - idx * block_size + 1).clamp(0, block_size)
    cnt = torch.where(idx >= 0, seen, 0).sum(-1)
    return (cnt != (pos + 1)[:, None]).float()


def parallel_spla_bwd(q, k, v, q_lin, k_lin, o, lse, indices, do, do_rla, drla_mass, *, block_size: int,
                      scale: float, feature_map_name: str, cu_seqlens=None, deterministic: Optional[bool] = None,
                      residual: bool = True,
                      stage: Optional[Callable[[str], contextlib.AbstractContextManager]] = None):
    """Gradients of q, k, v, q_lin, k_lin (`[B, T, ...]`) from the saved o, lse (`[B*T, HQ]`) and indices.

    ``residual=False`` (no linear branch in the forward): only the attention's gradients; q_lin, k_lin get None.
    ``stage``: called with the name of each stage, in order (``"features"``: phi(q), phi(k) and the live rows;
    ``"linear"``: the global linear term's gradients; ``"query"``: the query-side pass over the selected blocks;
    ``"keys"``: the key-gradient pass; ``"features_bwd"``: the feature maps' backward), it returns a context
    manager that encloses that stage (``benchmarks/bench_backward.py`` times them with CUDA events).

    Nothing quadratic is allocated: fp32 buffers of the inputs' sizes (dk, dv, dphi(q), dphi(k)), the O(T * topk)
    inverse index of the deterministic pass and, for the global linear term, one ``[T/64, H, F, DV]`` state.
    """
    B, T, HQ, D = q.shape
    H, DV = k.shape[2], v.shape[-1]
    G = HQ // H
    N = B * T
    det = DETERMINISTIC if deterministic is None else deterministic
    stage = stage or (lambda name: contextlib.nullcontext())
    if cu_seqlens is None:
        cu = tuple(range(0, N + 1, T))
    else:
        cu = tuple(int(x) for x in cu_seqlens.tolist())
    meta = _prepare_meta(cu, block_size, _topk_tile(block_size, G) or 1, q.device)
    qf, kf, vf, of = (x.reshape(N, *x.shape[2:]).contiguous() for x in (q, k, v, o))
    qlf, klf = q_lin.reshape(N, HQ, -1).contiguous(), k_lin.reshape(N, H, -1).contiguous()
    idx = indices.reshape(N, H, -1).contiguous()
    topk = idx.shape[-1]
    do = torch.zeros_like(of) if do is None else do.reshape(N, HQ, DV).contiguous()
    if residual:
        do_rla = torch.zeros_like(of) if do_rla is None else do_rla.reshape(N, HQ, DV).contiguous()
        drla_mass = (torch.zeros(N, HQ, dtype=torch.float32, device=q.device) if drla_mass is None
                     else drla_mass.reshape(N, HQ).float().contiguous())
        with stage("features"):
            fq = feature_map_fwd(qlf, feature_map_name, q.dtype)
            fk = feature_map_fwd(klf, feature_map_name, q.dtype)
            live = live_rows(idx, meta, block_size)
        # the global linear term: fp32 dphi(q), dphi(k), dv that the sparse passes add into
        with stage("linear"):
            dfq, dfk, dv = global_linear_bwd(fq, fk, vf, do_rla, drla_mass, live, meta, LINEAR_CHUNK)
    else:  # no linear branch: the kernels (LIN=False) read none of these placeholders
        fq, fk, do_rla, dfq, dfk = qf, kf, of, qf, kf
        drla_mass = live = lse
        dv = torch.zeros(N, H, DV, dtype=torch.float32, device=q.device)
    F = fk.shape[-1]
    dq = torch.empty_like(qf)
    dk = torch.zeros(N, H, D, dtype=torch.float32, device=q.device)
    delta = q.new_empty(N, HQ, dtype=torch.float32)
    common = dict(HQ=HQ, H=H, G=G, D=D, BD=triton.next_power_of_2(D), DV=DV, BDV=triton.next_power_of_2(DV), F=F,
                  BF=triton.next_power_of_2(F), TOPK=topk, DOT_PREC=_dot_prec(q.dtype), CDT=compute_dtype(q.dtype))
    # the query-side pass: token-major, or (_bwd_query_path: "union") per query tile where its union is small
    args = (qf, kf, vf, fq, fk, of, do, do_rla, drla_mass, lse, live, idx)
    outs = (dq, dfq, delta, dk, dv, dfk, scale)
    shared = dict(BS=block_size, BK=max(16, min(64, triton.next_power_of_2(block_size))),
                  BTOPK=triton.next_power_of_2(topk), ATOMIC=not det, LIN=residual, **common)
    with stage("query"):
        tile = _topk_tile(block_size, G)
        work = None
        if _bwd_query_path(G) == "union" and tile:
            # its own tile and keys per sub-tile (SPARSE_LAUNCH union_bwd_tile / union_bwd_bk), as the forward's
            tile, umeta, ubk = _union_tiling(meta, G, SPARSE_LAUNCH["union_bwd_tile"], SPARSE_LAUNCH["union_bwd_bk"],
                                             block_size, q.device)
            ulist, ucount = _tile_unions(idx, umeta, tile)
            uwork, work = _union_split(ucount, umeta, tile, UNION_MAX_LOAD * tile * topk, UNION_MIN_SHARE)
            if uwork.numel() > 0:
                kk, vv, ff, tma = _key_loads(kf, vf, fk, ubk, meta, SPARSE_LAUNCH["union_bwd_tma"])
                spla_bwd_kernel_sparse_union[(uwork.numel(),)](
                    qf, kk, vv, fq, ff, *args[5:], ulist, ucount, uwork, umeta["tile_bos"], umeta["tile_t0"],
                    umeta["tile_len"], *outs, GP=triton.next_power_of_2(G), BT=tile, UMAX=ulist.shape[-1], TMA=tma,
                    **dict(shared, BK=ubk),
                    num_warps=SPARSE_LAUNCH["union_bwd_warps"], num_stages=SPARSE_LAUNCH["union_bwd_stages"])
            del ulist, ucount, uwork
        if work is None or work.numel() > 0:
            spla_bwd_kernel_sparse[(N, H) if work is None else (work.numel(), 1)](
                *args, meta["tok_bos"], meta["tok_bos"] if work is None else work, *outs,
                GP=max(16, triton.next_power_of_2(G)), WORK=work is not None, **shared, num_warps=4, num_stages=2)
        del work
    with stage("keys"):
        if det:
            NBA = meta["all_tok"].numel()
            # work items of at most KV_CAP (token, slot) entries: a block every token selects (the sinks) is split
            # into chunks whose partials are summed in order, so no program walks all T tokens alone
            perm, wkey, wstart, wend = _kv_worklist(idx, meta["tok_aoff"], NBA, KV_CAP)
            wend = torch.minimum(wend, wstart + KV_CAP)  # _kv_worklist gives the end of the block's entries
            nitem = torch.bincount(wkey, minlength=H * NBA)
            split = nitem[wkey] > 1
            wslot = torch.where(split, torch.cumsum(split, 0) - 1, -1)
            NP = int(split.sum())
            BSP = max(16, triton.next_power_of_2(block_size))
            PA = max(D, F)
            part_a = q.new_empty(max(NP, 1), BSP, PA, dtype=torch.float32)
            part_v = q.new_empty(max(NP, 1), BSP, DV, dtype=torch.float32)
            red_key = torch.nonzero(nitem > 1).flatten()
            red_n = nitem[red_key]
            red_first = torch.cumsum(red_n, 0) - red_n
            GP = triton.next_power_of_2(G)
            for part in ((0, 1) if residual else (0,)) if wkey.numel() > 0 else ():
                # rows (tokens x group heads) per step; fp32 tiles are twice the bytes: halve them to stay in shared
                # memory
                rows = SPARSE_LAUNCH["kvb_rows" if part == 0 else "kvb_lin_rows"]
                BQ = max(1, (rows // 2 if q.dtype == torch.float32 else rows) // GP)
                while BQ * GP < 16:
                    BQ *= 2
                spla_bwd_kernel_sparse_kv[(wkey.numel(),)](
                    qf, kf, vf, fq, fk, do, do_rla, drla_mass, lse, delta, live, wkey, wstart, wend, perm,
                    meta["all_tok"], meta["all_len"], dk, dv, dfk, wslot, part_a, part_v, scale, NBA, GP=GP,
                    BSP=BSP, BQ=BQ, PART=part, PA=PA, **common, num_warps=SPARSE_LAUNCH["kvb_warps"],
                    num_stages=SPARSE_LAUNCH["kvb_stages"])
                if red_key.numel() > 0:
                    DA = D if part == 0 else F
                    spla_bwd_kernel_kv_reduce[(red_key.numel(),)](
                        part_a, part_v, dk if part == 0 else dfk, dv, red_key, red_first, red_n, meta["all_tok"],
                        meta["all_len"], NBA, H=H, DA=DA, BDA=triton.next_power_of_2(DA), DV=DV,
                        BDV=triton.next_power_of_2(DV), BSP=BSP, PA=PA, num_warps=8)
            del perm, wkey, wstart, wend, wslot, part_a, part_v
    del fq, fk, delta, live, do, do_rla, drla_mass
    if not residual:
        return dq.view_as(q), dk.to(k.dtype).view_as(k), dv.to(v.dtype).view_as(v), None, None
    with stage("features_bwd"):
        dql = feature_map_bwd(qlf, dfq, feature_map_name)
        del dfq
        dkl = feature_map_bwd(klf, dfk, feature_map_name)
        del dfk
    return (dq.view_as(q), dk.to(k.dtype).view_as(k), dv.to(v.dtype).view_as(v), dql.view_as(q_lin),
            dkl.view_as(k_lin))


class ParallelSPLAFunction(torch.autograd.Function):
    """Triton forward and backward (:func:`parallel_spla_bwd`).

    The forward saves the inputs, o_sparse, the fp32 log2-sum-exp2 and the indices. Where the forward took the
    dense fast path (every block selected: causal SDPA, a zero residual) the backward recomputes SDPA with
    autograd; q_lin / k_lin then get zero gradients, as the residual is identically 0.
    ``opts["deterministic"]`` (default: ``SPLA_DETERMINISTIC``, on) picks the KV-block-major key-gradient pass and
    the forward's fixed-order sum of the selected linear terms.
    """

    @staticmethod
    def forward(ctx, q, k, v, q_lin, k_lin, opts):
        o, o_rla, rla_mass, indices, lse = parallel_spla_fwd(q, k, v, q_lin, k_lin, save_lse=True, **opts)
        ctx.dense = lse is None
        ctx.save_for_backward(q, k, v, q_lin, k_lin, indices, o, lse)
        ctx.opts = opts
        ctx.mark_non_differentiable(indices)
        return o, o_rla, rla_mass, indices

    @staticmethod
    def backward(ctx, do, do_rla, drla_mass, dindices):
        q, k, v, q_lin, k_lin, indices, o, lse = ctx.saved_tensors
        opts = ctx.opts
        if ctx.dense:
            if do is None:
                grads = [torch.zeros_like(x) for x in (q, k, v)]
            else:
                with torch.enable_grad():
                    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
                    out = dense_sdpa(*leaves, opts["scale"])
                    grads = list(torch.autograd.grad(out, leaves, do))
            if not opts.get("residual", True):
                return (*grads, None, None, None)
            return (*grads, torch.zeros_like(q_lin), torch.zeros_like(k_lin), None)
        grads = parallel_spla_bwd(q, k, v, q_lin, k_lin, o, lse, indices, do, do_rla, drla_mass,
                                  block_size=opts["block_size"], scale=opts["scale"],
                                  feature_map_name=opts["feature_map_name"], cu_seqlens=opts["cu_seqlens"],
                                  deterministic=opts.get("deterministic"), residual=opts.get("residual", True))
        return (*grads, None)


def parallel_spla_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lin: torch.Tensor, k_lin: torch.Tensor,
                       *, block_size: int, topk: int, sink_blocks: int, local_blocks: int, selection: str, cov: str,
                       rep_keys: int, feature_map_name: str, scale: float,
                       cu_seqlens: Optional[torch.Tensor] = None, deterministic: Optional[bool] = None,
                       residual: bool = True) -> SPLAOutput:
    """The Triton backend of :func:`spla.spla_attn` (arguments already validated and defaulted).

    Raises:
        ValueError: for fp64 inputs (the kernels compute in fp32; use ``backend="torch"`` for fp64).
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("q_lin", q_lin), ("k_lin", k_lin)):
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name} must be fp16, bf16 or fp32 for backend='triton' (got {x.dtype}); "
                             f"use backend='torch' or 'naive' for fp64")
    opts = dict(block_size=block_size, topk=topk, sink_blocks=sink_blocks, local_blocks=local_blocks,
                selection=selection, cov=cov, rep_keys=rep_keys, feature_map_name=feature_map_name, scale=scale,
                cu_seqlens=cu_seqlens, deterministic=deterministic, residual=residual)
    o, o_rla, rla_mass, indices = ParallelSPLAFunction.apply(q, k, v, q_lin, k_lin, opts)
    return SPLAOutput(o, o_rla, rla_mass, indices)
