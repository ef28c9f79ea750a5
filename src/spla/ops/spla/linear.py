# -*- coding: utf-8 -*-
"""Triton kernels of SPLA's linear branch: the feature map phi and the chunked causal global linear attention.

``glob[t] = phi(q_lin_t)·S_t`` and ``glob_mass[t] = phi(q_lin_t)·z_t`` with the undecayed fp32 state
``S_t = sum_{i<=t} phi(k_lin_i)^T v_i``, ``z_t = sum_{i<=t} phi(k_lin_i)``, restarted at every sequence
(SPEC §4). Two kernels, fla style: :func:`spla_fwd_kernel_linear_h` walks the chunks of one sequence and
stores the state *before* each chunk (fp32), :func:`spla_fwd_kernel_linear` adds the inter-chunk term
``phi(q)·S_chunk`` and the causal intra-chunk term in parallel over chunks.
"""

from __future__ import annotations

import math
import os
from typing import Tuple

import torch
import triton
import triton.language as tl

FMAP_IDS = {"softmax2": 0, "elu1": 1, "relu2": 2}


@triton.jit
def spla_fwd_kernel_feature(
    x,  # [N, NH, DL]
    y,  # [N, NH, F]
    NH: tl.constexpr,
    DL: tl.constexpr,
    F: tl.constexpr,
    BH: tl.constexpr,
    BDL: tl.constexpr,
    FMAP: tl.constexpr,
):
    """phi of one token's heads, computed in fp32 and stored in ``y``'s dtype."""
    i_t = tl.program_id(0).to(tl.int64)
    o_h = tl.arange(0, BH)
    o_d = tl.arange(0, BDL)
    m_x = (o_h[:, None] < NH) & (o_d[None, :] < DL)
    # [BH, BDL]
    b_x = tl.load(x + (i_t * NH + o_h[:, None]) * DL + o_d[None, :], mask=m_x, other=0.).to(tl.float32)
    p_y = y + (i_t * NH + o_h[:, None]) * F + o_d[None, :]
    if FMAP == 0:
        # padded columns -inf (no weight); padded heads stay finite and are never stored
        m_c = (o_d < DL)[None, :]
        b_a = tl.where(m_c, b_x, float('-inf'))
        b_a = tl.exp(b_a - tl.max(b_a, 1)[:, None])
        b_a = b_a / tl.sum(b_a, 1)[:, None]
        b_b = tl.where(m_c, -b_x, float('-inf'))
        b_b = tl.exp(b_b - tl.max(b_b, 1)[:, None])
        b_b = b_b / tl.sum(b_b, 1)[:, None]
        tl.store(p_y, b_a.to(y.dtype.element_ty), mask=m_x)
        tl.store(p_y + DL, b_b.to(y.dtype.element_ty), mask=m_x)
    elif FMAP == 1:
        b_a = tl.where(b_x > 0, b_x + 1., tl.exp(tl.minimum(b_x, 0.)))
        tl.store(p_y, b_a.to(y.dtype.element_ty), mask=m_x)
    else:
        tl.store(p_y, tl.maximum(b_x, 0.).to(y.dtype.element_ty), mask=m_x)
        tl.store(p_y + DL, tl.maximum(-b_x, 0.).to(y.dtype.element_ty), mask=m_x)


def feature_map_fwd(x: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    """phi(x) for `[N, NH, DL]` -> `[N, NH, F]` in ``dtype`` (computed in fp32)."""
    N, NH, DL = x.shape
    F = DL if name == "elu1" else 2 * DL
    y = x.new_empty(N, NH, F, dtype=dtype)
    spla_fwd_kernel_feature[(N,)](x, y, NH=NH, DL=DL, F=F, BH=triton.next_power_of_2(NH),
                                  BDL=triton.next_power_of_2(DL), FMAP=FMAP_IDS[name], num_warps=4)
    return y


@triton.jit(do_not_specialize=['NT'])
def spla_fwd_kernel_linear_h(
    fk,  # [T, H, F]
    v,  # [T, H, DV]
    h,  # [NT, H, F, DV] fp32: the state before each chunk
    z,  # [NT, H, F] fp32
    seq_bos,  # [N] int64
    seq_len,  # [N] int64
    seq_coff,  # [N] int64 first chunk of each sequence
    NT,
    H: tl.constexpr,
    F: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    CDT: tl.constexpr,
):
    i_k, i_v, i_nh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(seq_bos + i_n).to(tl.int64)
    L = tl.load(seq_len + i_n).to(tl.int64)
    coff = tl.load(seq_coff + i_n).to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < F, o_v < DV
    o_c = tl.arange(0, BC)
    # [BK, BV]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    # [BK]
    b_z = tl.zeros([BK], dtype=tl.float32)
    for i_c in range(tl.cdiv(L, BC)):
        i_g = coff + i_c
        m_kv = m_k[:, None] & m_v[None, :]
        tl.store(h + ((i_g * H + i_h) * F + o_k[:, None]) * DV + o_v[None, :], b_h, mask=m_kv)
        if i_v == 0:
            tl.store(z + (i_g * H + i_h) * F + o_k, b_z, mask=m_k)
        o_t = i_c * BC + o_c
        m_t = o_t < L
        # [BC, BK]
        m_tk = m_t[:, None] & m_k[None, :]
        b_fk = tl.load(fk + ((bos + o_t[:, None]) * H + i_h) * F + o_k[None, :], mask=m_tk, other=0.).to(CDT)
        # [BC, BV]
        m_tv = m_t[:, None] & m_v[None, :]
        b_v = tl.load(v + ((bos + o_t[:, None]) * H + i_h) * DV + o_v[None, :], mask=m_tv, other=0.).to(CDT)
        b_h += tl.dot(tl.trans(b_fk), b_v, input_precision=DOT_PREC)
        b_z += tl.sum(b_fk.to(tl.float32), 0)


@triton.jit
def spla_fwd_kernel_linear(
    fq,  # [T, HQ, F]
    fk,  # [T, H, F]
    v,  # [T, H, DV]
    h,  # [NT, H, F, DV] fp32
    z,  # [NT, H, F] fp32
    o,  # [T, HQ, DV] fp32
    om,  # [T, HQ] fp32
    chunk_bos,  # [NT] int64
    chunk_t0,  # [NT] int64
    chunk_len,  # [NT] int64
    HQ: tl.constexpr,
    H: tl.constexpr,
    G: tl.constexpr,
    F: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    CDT: tl.constexpr,
    GB: tl.constexpr = 1,
):
    """Outputs of one chunk, ``BV`` value channels and ``GB`` query heads of one KV head (``GB`` divides ``G``):
    the rows are (head, token) pairs, so the chunk's phi(k), v and state tiles are loaded once for the ``GB``
    heads."""
    i_p, i_v, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_hq0 = i_p * GB  # first query head of this program
    i_h = i_hq0 // G
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    t0 = tl.load(chunk_t0 + i_c).to(tl.int64)
    L = tl.load(chunk_len + i_c).to(tl.int64)
    o_r = tl.arange(0, GB * BC)
    o_tr = t0 + o_r % BC  # token of each row
    hq_r = i_hq0 + o_r // BC  # query head of each row
    m_r = o_tr < L
    o_t = t0 + tl.arange(0, BC)
    m_t = o_t < L
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    # [GB*BC, BV]
    b_o = tl.zeros([GB * BC, BV], dtype=tl.float32)
    # [GB*BC, BC]
    b_A = tl.zeros([GB * BC, BC], dtype=tl.float32)
    # [GB*BC]
    b_m = tl.zeros([GB * BC], dtype=tl.float32)
    for i_k in range(tl.cdiv(F, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < F
        b_fq = tl.load(fq + ((bos + o_tr[:, None]) * HQ + hq_r[:, None]) * F + o_k[None, :],
                       mask=m_r[:, None] & m_k[None, :], other=0.).to(CDT)
        # [BC, BK]
        b_fk = tl.load(fk + ((bos + o_t[:, None]) * H + i_h) * F + o_k[None, :],
                       mask=m_t[:, None] & m_k[None, :], other=0.).to(CDT)
        # [BK, BV]
        m_kv = m_k[:, None] & m_v[None, :]
        b_h = tl.load(h + ((i_c * H + i_h) * F + o_k[:, None]) * DV + o_v[None, :], mask=m_kv, other=0.)
        # [BK]
        b_z = tl.load(z + (i_c * H + i_h) * F + o_k, mask=m_k, other=0.)
        b_o += tl.dot(b_fq.to(tl.float32), b_h, input_precision=DOT_PREC)
        b_A += tl.dot(b_fq, tl.trans(b_fk), input_precision=DOT_PREC)
        b_m += tl.sum(b_fq.to(tl.float32) * b_z[None, :], 1)
    m_A = (o_tr[:, None] >= o_t[None, :]) & m_t[None, :]
    b_A = tl.where(m_A, b_A, 0.)
    # [BC, BV]
    b_v = tl.load(v + ((bos + o_t[:, None]) * H + i_h) * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                  other=0.).to(CDT)
    b_o += tl.dot(b_A.to(CDT), b_v, input_precision=DOT_PREC)
    b_m += tl.sum(b_A, 1)
    tl.store(o + ((bos + o_tr[:, None]) * HQ + hq_r[:, None]) * DV + o_v[None, :], b_o,
             mask=m_r[:, None] & m_v[None, :])
    if i_v == 0:
        tl.store(om + (bos + o_tr) * HQ + hq_r, b_m, mask=m_r)


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def compute_dtype(dtype: torch.dtype):
    """Dtype of the tl.dot operands: the input dtype on GPU; fp32 under the interpreter, whose bf16 math is wrong."""
    if dtype == torch.float32 or INTERPRET:
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


#: Launch settings of the global linear attention, read at every call (``benchmarks/bench_linear.py`` times the
#: alternatives): the sequential state passes (``spla_fwd_kernel_linear_h``, ``spla_bwd_kernel_linear_dh``) run one
#: program per ``state_bk`` features x ``state_bv`` value channels x (sequence, KV head), so smaller tiles mean more
#: programs side by side (each walks every chunk of its sequence); ``state_warps`` / ``state_stages`` their warps
#: and software-pipelining stages (the default: the fastest forward + backward on an H200 at 16k-64k, heads 32/8
#: and 64/4: 75.6 ms summed against 81.4 for 64 x 32 tiles with 2 stages). The forward's output kernel (``spla_fwd_kernel_linear``) runs one program per
#: chunk x ``out_bv`` value channels x ``out_heads`` query heads of one KV head (they share the chunk's phi(k), v and
#: state loads; the largest power of two dividing both it and the group), with ``out_warps`` / ``out_stages``.
#: 4 heads, 128 channels, 8 warps: the forward at 16k-64k, heads 32/8 and 64/4, took 11.5 ms summed against 12.6
#: with 64 channels and 31.3 with 1 head and 4 warps (H200). 4 heads with 32 channels and 4 warps crashed there
#: (illegal memory access, not diagnosed): value tiles under 64 channels run one head per program.
#: The backward's ``spla_bwd_kernel_linear_dq`` takes the same grouping (``dq_heads``, ``dq_warps``); on the H200
#: 2 or 4 heads per program were 2-40% slower than 1 (52.7 ms summed for 1 head), so it stays at 1.
LINEAR_LAUNCH = dict(state_bk=32, state_bv=32, state_warps=4, state_stages=3, out_heads=4, out_bv=128, out_warps=8,
                     out_stages=2, dq_heads=1, dq_warps=4)


def _heads_per_program(want: int, G: int) -> int:
    """The largest power of two that divides both ``want`` and the group size ``G`` (rows of a program are
    (head, token) pairs, so their count must be a power of two)."""
    gb = math.gcd(want, G)
    return gb & -gb


def _state_launch(F: int, DV: int):
    """``(BK, BV, launch kwargs)`` of the state passes for ``F`` features and ``DV`` value channels."""
    L = LINEAR_LAUNCH
    BK = min(L["state_bk"], triton.next_power_of_2(F))
    BV = min(L["state_bv"], triton.next_power_of_2(DV))
    return BK, BV, dict(num_warps=L["state_warps"], num_stages=L["state_stages"])


def global_linear_fwd(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, meta: dict,
                      chunk_size: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
    """Causal global linear attention of packed inputs.

    Args:
        fq (torch.Tensor): `[T, HQ, F]` phi(q_lin). fk (torch.Tensor): `[T, H, F]` phi(k_lin). v: `[T, H, DV]`.
        meta (dict): the packed layout (see ``parallel._prepare_meta``).
    Returns:
        ``glob [T, HQ, DV]`` fp32 and ``glob_mass [T, HQ]`` fp32.
    """
    T, HQ, F = fq.shape
    H, DV = fk.shape[1], v.shape[-1]
    G = HQ // H
    NT = meta["chunk_bos"].numel()
    N = meta["seq_bos"].numel()
    prec, cdt = _dot_prec(fq.dtype), compute_dtype(fq.dtype)
    h = fq.new_empty(NT, H, F, DV, dtype=torch.float32)
    z = fq.new_empty(NT, H, F, dtype=torch.float32)
    BK = min(64, triton.next_power_of_2(F))
    BV = min(LINEAR_LAUNCH["out_bv"], triton.next_power_of_2(DV))
    # grouped heads only with value tiles of >= 64 channels: 4 heads x 32 channels crashed on an H200 (see above)
    GB = _heads_per_program(LINEAR_LAUNCH["out_heads"], G) if BV >= 64 else 1
    BKH, BVH, kw = _state_launch(F, DV)  # the sequential state pass: more, thinner programs
    spla_fwd_kernel_linear_h[(triton.cdiv(F, BKH), triton.cdiv(DV, BVH), N * H)](
        fk, v, h, z, meta["seq_bos"], meta["seq_len"], meta["seq_coff"], NT,
        H=H, F=F, DV=DV, BK=BKH, BV=BVH, BC=chunk_size, DOT_PREC=prec, CDT=cdt, **kw)
    o = fq.new_empty(T, HQ, DV, dtype=torch.float32)
    om = fq.new_empty(T, HQ, dtype=torch.float32)
    spla_fwd_kernel_linear[(HQ // GB, triton.cdiv(DV, BV), NT)](
        fq, fk, v, h, z, o, om, meta["chunk_bos"], meta["chunk_t0"], meta["chunk_len"],
        HQ=HQ, H=H, G=G, F=F, DV=DV, BK=BK, BV=BV, BC=chunk_size, DOT_PREC=prec, CDT=cdt, GB=GB,
        num_warps=LINEAR_LAUNCH["out_warps"], num_stages=LINEAR_LAUNCH["out_stages"])
    return o, om


# ---------------------------------------------------------------------------------------------------------------
# Backward (issue 4)
#
# Upstream gradients of the global term: ``dg = dglob [T, HQ, DV]`` and ``dgm = dglob_mass [T, HQ]``, both already
# multiplied by ``live [T, H]`` (0 where the residual is exactly 0 because nothing is unselected). Then
#   dphi(q)_t = S_t dg_t + z_t dgm_t            = sum_{i<=t} (dg_t·v_i + dgm_t) phi(k)_i
#   dphi(k)_i = sum_{t>=i, g} (v_i·dg_t + dgm_t) phi(q)_t = dH_c v_i + dz_c + intra-chunk
#   dv_i      = sum_{t>=i, g} (phi(q)_t·phi(k)_i) dg_t    = phi(k)_i dH_c + intra-chunk
# with dH_c = sum_{t after chunk c, g} phi(q)_t^T dg_t and dz_c = sum phi(q)_t dgm_t (a reverse scan).
# The forward states S_c are recomputed (spla_fwd_kernel_linear_h) and freed before dH is built, so only one
# ``[NT, H, F, DV]`` fp32 tensor is alive at a time.
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def spla_bwd_kernel_feature(
    x,  # [N, NH, DL]
    dy,  # [N, NH, F] fp32
    dx,  # [N, NH, DL]
    NH: tl.constexpr,
    DL: tl.constexpr,
    F: tl.constexpr,
    BH: tl.constexpr,
    BDL: tl.constexpr,
    FMAP: tl.constexpr,
):
    """d x of phi(x), recomputing phi in fp32 from x."""
    i_t = tl.program_id(0).to(tl.int64)
    o_h = tl.arange(0, BH)
    o_d = tl.arange(0, BDL)
    m_x = (o_h[:, None] < NH) & (o_d[None, :] < DL)
    p_x = (i_t * NH + o_h[:, None]) * DL + o_d[None, :]
    p_y = (i_t * NH + o_h[:, None]) * F + o_d[None, :]
    b_x = tl.load(x + p_x, mask=m_x, other=0.).to(tl.float32)
    b_da = tl.load(dy + p_y, mask=m_x, other=0.).to(tl.float32)
    if FMAP == 0:
        b_db = tl.load(dy + p_y + DL, mask=m_x, other=0.).to(tl.float32)
        m_c = (o_d < DL)[None, :]
        b_a = tl.where(m_c, b_x, float('-inf'))
        b_a = tl.exp(b_a - tl.max(b_a, 1)[:, None])
        b_a = b_a / tl.sum(b_a, 1)[:, None]
        b_b = tl.where(m_c, -b_x, float('-inf'))
        b_b = tl.exp(b_b - tl.max(b_b, 1)[:, None])
        b_b = b_b / tl.sum(b_b, 1)[:, None]
        # softmax Jacobian; the second half is softmax(-x), hence the minus sign
        b_dx = b_a * (b_da - tl.sum(b_a * b_da, 1)[:, None]) - b_b * (b_db - tl.sum(b_b * b_db, 1)[:, None])
    elif FMAP == 1:
        b_dx = b_da * tl.where(b_x > 0, 1., tl.exp(tl.minimum(b_x, 0.)))
    else:
        b_db = tl.load(dy + p_y + DL, mask=m_x, other=0.).to(tl.float32)
        b_dx = tl.where(b_x > 0, b_da, 0.) - tl.where(b_x < 0, b_db, 0.)
    tl.store(dx + p_x, b_dx.to(dx.dtype.element_ty), mask=m_x)


def feature_map_bwd(x: torch.Tensor, dy: torch.Tensor, name: str) -> torch.Tensor:
    """Gradient of ``phi(x)`` for `[N, NH, DL]` x and fp32 `[N, NH, F]` dy -> `[N, NH, DL]` in x's dtype."""
    N, NH, DL = x.shape
    F = dy.shape[-1]
    dx = torch.empty_like(x)
    spla_bwd_kernel_feature[(N,)](x, dy, dx, NH=NH, DL=DL, F=F, BH=triton.next_power_of_2(NH),
                                  BDL=triton.next_power_of_2(DL), FMAP=FMAP_IDS[name], num_warps=4)
    return dx


@triton.jit(do_not_specialize=['NT'])
def spla_bwd_kernel_linear_dh(
    fq,  # [T, HQ, F]
    dg,  # [T, HQ, DV] gradient of the global term (any float dtype)
    dgm,  # [T, HQ] fp32 gradient of its mass
    live,  # [T, H] fp32 1 where the residual is not identically 0
    dh,  # [NT, H, F, DV] fp32: gradient w.r.t. the state before each chunk, from the chunks after it
    dz,  # [NT, H, F] fp32
    seq_bos,  # [N] int64
    seq_len,  # [N] int64
    seq_coff,  # [N] int64
    NT,
    HQ: tl.constexpr,
    H: tl.constexpr,
    G: tl.constexpr,
    F: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    CDT: tl.constexpr,
):
    """Reverse scan over the chunks of one sequence: ``dH_c = sum_{chunks > c} sum_g phi(q)^T dg``."""
    i_k, i_v, i_nh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(seq_bos + i_n).to(tl.int64)
    L = tl.load(seq_len + i_n).to(tl.int64)
    coff = tl.load(seq_coff + i_n).to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < F, o_v < DV
    m_kv = m_k[:, None] & m_v[None, :]
    o_c = tl.arange(0, BC)
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    b_dz = tl.zeros([BK], dtype=tl.float32)
    NC = tl.cdiv(L, BC)
    for i_r in range(NC):
        i_c = NC - 1 - i_r
        i_g = coff + i_c
        tl.store(dh + ((i_g * H + i_h) * F + o_k[:, None]) * DV + o_v[None, :], b_dh, mask=m_kv)
        if i_v == 0:
            tl.store(dz + (i_g * H + i_h) * F + o_k, b_dz, mask=m_k)
        o_t = i_c * BC + o_c
        m_t = o_t < L
        b_live = tl.load(live + (bos + o_t) * H + i_h, mask=m_t, other=0.)
        for g in range(G):
            p_r = (bos + o_t) * HQ + i_h * G + g
            # [BC, BK]
            b_fq = tl.load(fq + p_r[:, None] * F + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.)
            b_fq = b_fq.to(tl.float32)
            # [BC, BV]
            b_dg = tl.load(dg + p_r[:, None] * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.)
            b_dg = b_dg.to(tl.float32) * b_live[:, None]
            b_dh += tl.dot(tl.trans(b_fq.to(CDT)), b_dg.to(CDT), input_precision=DOT_PREC)
            if i_v == 0:
                b_dgm = tl.load(dgm + p_r, mask=m_t, other=0.) * b_live
                b_dz += tl.sum(b_fq * b_dgm[:, None], 0)


@triton.jit
def spla_bwd_kernel_linear_dq(
    fk,  # [T, H, F]
    v,  # [T, H, DV]
    dg,  # [T, HQ, DV]
    dgm,  # [T, HQ] fp32
    live,  # [T, H] fp32
    h,  # [NT, H, F, DV] fp32 forward state before each chunk
    z,  # [NT, H, F] fp32
    dfq,  # [T, HQ, F] fp32 out
    chunk_bos,  # [NT] int64
    chunk_t0,  # [NT] int64
    chunk_len,  # [NT] int64
    HQ: tl.constexpr,
    H: tl.constexpr,
    G: tl.constexpr,
    F: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    CDT: tl.constexpr,
    GB: tl.constexpr = 1,
):
    """``dphi(q)_t = S_c dg_t + z_c dgm_t + sum_{i in chunk, i<=t} (dg_t·v_i + dgm_t) phi(k)_i`` for one chunk,
    ``BK`` features and ``GB`` query heads of one KV head (rows are (head, token) pairs; the chunk's v, phi(k)
    and state tiles are loaded once for them)."""
    i_p, i_k, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_hq0 = i_p * GB
    i_h = i_hq0 // G
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    t0 = tl.load(chunk_t0 + i_c).to(tl.int64)
    L = tl.load(chunk_len + i_c).to(tl.int64)
    o_r = tl.arange(0, GB * BC)
    o_tr = t0 + o_r % BC  # token of each row
    hq_r = i_hq0 + o_r // BC  # query head of each row
    m_r = o_tr < L
    o_t = t0 + tl.arange(0, BC)
    m_t = o_t < L
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < F
    b_live = tl.load(live + (bos + o_tr) * H + i_h, mask=m_r, other=0.)
    b_dgm = tl.load(dgm + (bos + o_tr) * HQ + hq_r, mask=m_r, other=0.) * b_live
    b_dfq = tl.zeros([GB * BC, BK], dtype=tl.float32)
    b_A = tl.zeros([GB * BC, BC], dtype=tl.float32)
    for i_v in range(tl.cdiv(DV, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < DV
        b_dg = tl.load(dg + ((bos + o_tr[:, None]) * HQ + hq_r[:, None]) * DV + o_v[None, :],
                       mask=m_r[:, None] & m_v[None, :], other=0.)
        b_dg = b_dg.to(tl.float32) * b_live[:, None]
        b_v = tl.load(v + ((bos + o_t[:, None]) * H + i_h) * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                      other=0.).to(CDT)
        # [BK, BV]
        b_h = tl.load(h + ((i_c * H + i_h) * F + o_k[:, None]) * DV + o_v[None, :],
                      mask=m_k[:, None] & m_v[None, :], other=0.)
        b_dfq += tl.dot(b_dg, tl.trans(b_h), input_precision=DOT_PREC)
        b_A += tl.dot(b_dg.to(CDT), tl.trans(b_v), input_precision=DOT_PREC)
    m_A = (o_tr[:, None] >= o_t[None, :]) & m_t[None, :] & m_r[:, None]
    b_A = tl.where(m_A, b_A + b_dgm[:, None], 0.)
    b_fk = tl.load(fk + ((bos + o_t[:, None]) * H + i_h) * F + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                   other=0.).to(CDT)
    b_z = tl.load(z + (i_c * H + i_h) * F + o_k, mask=m_k, other=0.)
    b_dfq += tl.dot(b_A.to(CDT), b_fk, input_precision=DOT_PREC) + b_dgm[:, None] * b_z[None, :]
    tl.store(dfq + ((bos + o_tr[:, None]) * HQ + hq_r[:, None]) * F + o_k[None, :], b_dfq,
             mask=m_r[:, None] & m_k[None, :])


@triton.jit
def spla_bwd_kernel_linear_dk(
    fq,  # [T, HQ, F]
    v,  # [T, H, DV]
    dg,  # [T, HQ, DV]
    dgm,  # [T, HQ] fp32
    live,  # [T, H] fp32
    dh,  # [NT, H, F, DV] fp32
    dz,  # [NT, H, F] fp32
    dfk,  # [T, H, F] fp32 out
    chunk_bos,
    chunk_t0,
    chunk_len,
    HQ: tl.constexpr,
    H: tl.constexpr,
    G: tl.constexpr,
    F: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    CDT: tl.constexpr,
):
    """``dphi(k)_i = dH_c v_i + dz_c + sum_g sum_{t in chunk, t>=i} (v_i·dg_t + dgm_t) phi(q)_t``."""
    i_h, i_k, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    t0 = tl.load(chunk_t0 + i_c).to(tl.int64)
    L = tl.load(chunk_len + i_c).to(tl.int64)
    o_t = t0 + tl.arange(0, BC)
    m_t = o_t < L
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < F
    m_tk = m_t[:, None] & m_k[None, :]
    b_live = tl.load(live + (bos + o_t) * H + i_h, mask=m_t, other=0.)
    b_dfk = tl.zeros([BC, BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(DV, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < DV
        b_v = tl.load(v + ((bos + o_t[:, None]) * H + i_h) * DV + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                      other=0.).to(tl.float32)
        b_dh = tl.load(dh + ((i_c * H + i_h) * F + o_k[:, None]) * DV + o_v[None, :],
                       mask=m_k[:, None] & m_v[None, :], other=0.)
        b_dfk += tl.dot(b_v, tl.trans(b_dh), input_precision=DOT_PREC)
    b_dz = tl.load(dz + (i_c * H + i_h) * F + o_k, mask=m_k, other=0.)
    b_dfk += b_dz[None, :]
    # rows: keys i, columns: queries t >= i
    m_A = (o_t[:, None] <= o_t[None, :]) & m_t[None, :] & m_t[:, None]
    for g in range(G):
        p_r = (bos + o_t) * HQ + i_h * G + g
        b_B = tl.zeros([BC, BC], dtype=tl.float32)
        for i_v in range(tl.cdiv(DV, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_tv = m_t[:, None] & (o_v < DV)[None, :]
            b_v = tl.load(v + ((bos + o_t[:, None]) * H + i_h) * DV + o_v[None, :], mask=m_tv, other=0.).to(CDT)
            b_dg = tl.load(dg + p_r[:, None] * DV + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
            b_dg = (b_dg * b_live[:, None]).to(CDT)
            b_B += tl.dot(b_v, tl.trans(b_dg), input_precision=DOT_PREC)
        b_dgm = tl.load(dgm + p_r, mask=m_t, other=0.) * b_live
        b_B = tl.where(m_A, b_B + b_dgm[None, :], 0.)
        b_fq = tl.load(fq + p_r[:, None] * F + o_k[None, :], mask=m_tk, other=0.).to(CDT)
        b_dfk += tl.dot(b_B.to(CDT), b_fq, input_precision=DOT_PREC)
    tl.store(dfk + ((bos + o_t[:, None]) * H + i_h) * F + o_k[None, :], b_dfk, mask=m_tk)


@triton.jit
def spla_bwd_kernel_linear_dv(
    fq,  # [T, HQ, F]
    fk,  # [T, H, F]
    dg,  # [T, HQ, DV]
    live,  # [T, H] fp32
    dh,  # [NT, H, F, DV] fp32
    dv,  # [T, H, DV] fp32 out
    chunk_bos,
    chunk_t0,
    chunk_len,
    HQ: tl.constexpr,
    H: tl.constexpr,
    G: tl.constexpr,
    F: tl.constexpr,
    DV: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    CDT: tl.constexpr,
):
    """``dv_i = phi(k)_i dH_c + sum_g sum_{t in chunk, t>=i} (phi(q)_t·phi(k)_i) dg_t``."""
    i_h, i_v, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    t0 = tl.load(chunk_t0 + i_c).to(tl.int64)
    L = tl.load(chunk_len + i_c).to(tl.int64)
    o_t = t0 + tl.arange(0, BC)
    m_t = o_t < L
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    m_tv = m_t[:, None] & m_v[None, :]
    b_live = tl.load(live + (bos + o_t) * H + i_h, mask=m_t, other=0.)
    b_dv = tl.zeros([BC, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(F, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < F
        b_fk = tl.load(fk + ((bos + o_t[:, None]) * H + i_h) * F + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                       other=0.).to(tl.float32)
        b_dh = tl.load(dh + ((i_c * H + i_h) * F + o_k[:, None]) * DV + o_v[None, :],
                       mask=m_k[:, None] & m_v[None, :], other=0.)
        b_dv += tl.dot(b_fk, b_dh, input_precision=DOT_PREC)
    m_A = (o_t[:, None] <= o_t[None, :]) & m_t[None, :] & m_t[:, None]
    for g in range(G):
        p_r = (bos + o_t) * HQ + i_h * G + g
        b_A = tl.zeros([BC, BC], dtype=tl.float32)
        for i_k in range(tl.cdiv(F, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (o_k < F)[None, :]
            b_fk = tl.load(fk + ((bos + o_t[:, None]) * H + i_h) * F + o_k[None, :], mask=m_tk, other=0.).to(CDT)
            b_fq = tl.load(fq + p_r[:, None] * F + o_k[None, :], mask=m_tk, other=0.).to(CDT)
            b_A += tl.dot(b_fk, tl.trans(b_fq), input_precision=DOT_PREC)
        b_A = tl.where(m_A, b_A, 0.)
        b_dg = tl.load(dg + p_r[:, None] * DV + o_v[None, :], mask=m_tv, other=0.).to(tl.float32)
        b_dg = (b_dg * b_live[:, None]).to(CDT)
        b_dv += tl.dot(b_A.to(CDT), b_dg, input_precision=DOT_PREC)
    tl.store(dv + ((bos + o_t[:, None]) * H + i_h) * DV + o_v[None, :], b_dv, mask=m_tv)


def global_linear_bwd(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, dg: torch.Tensor, dgm: torch.Tensor,
                      live: torch.Tensor, meta: dict, chunk_size: int = 64):
    """Backward of :func:`global_linear_fwd` with the upstream gradients masked by ``live``.

    Args:
        fq, fk, v: as in the forward. dg: `[T, HQ, DV]` gradient of the global term (o_rla's gradient).
        dgm: `[T, HQ]` fp32 gradient of its mass. live: `[T, H]` fp32, 0 where the residual is identically 0.
    Returns:
        ``dfq [T, HQ, F]``, ``dfk [T, H, F]``, ``dv [T, H, DV]``, all fp32 (the sparse backward adds into them).
    """
    T, HQ, F = fq.shape
    H, DV = fk.shape[1], v.shape[-1]
    G = HQ // H
    NT = meta["chunk_bos"].numel()
    N = meta["seq_bos"].numel()
    prec, cdt = _dot_prec(fq.dtype), compute_dtype(fq.dtype)
    BK = min(64, triton.next_power_of_2(F))
    BV = min(64, triton.next_power_of_2(DV))
    BKH, BVH, kw = _state_launch(F, DV)
    common = dict(H=H, F=F, DV=DV, BC=chunk_size, DOT_PREC=prec, CDT=cdt)
    # the forward states, recomputed; freed before the state gradients are built
    h = fq.new_empty(NT, H, F, DV, dtype=torch.float32)
    z = fq.new_empty(NT, H, F, dtype=torch.float32)
    spla_fwd_kernel_linear_h[(triton.cdiv(F, BKH), triton.cdiv(DV, BVH), N * H)](
        fk, v, h, z, meta["seq_bos"], meta["seq_len"], meta["seq_coff"], NT, BK=BKH, BV=BVH, **common, **kw)
    dfq = fq.new_empty(T, HQ, F, dtype=torch.float32)
    GB = _heads_per_program(LINEAR_LAUNCH["dq_heads"], G)
    spla_bwd_kernel_linear_dq[(HQ // GB, triton.cdiv(F, BK), NT)](
        fk, v, dg, dgm, live, h, z, dfq, meta["chunk_bos"], meta["chunk_t0"], meta["chunk_len"],
        HQ=HQ, G=G, BK=BK, BV=BV, **common, GB=GB, num_warps=LINEAR_LAUNCH["dq_warps"], num_stages=2)
    del h, z
    dh = fq.new_empty(NT, H, F, DV, dtype=torch.float32)
    dz = fq.new_empty(NT, H, F, dtype=torch.float32)
    spla_bwd_kernel_linear_dh[(triton.cdiv(F, BKH), triton.cdiv(DV, BVH), N * H)](
        fq, dg, dgm, live, dh, dz, meta["seq_bos"], meta["seq_len"], meta["seq_coff"], NT,
        HQ=HQ, G=G, BK=BKH, BV=BVH, **common, **kw)
    dfk = fq.new_empty(T, H, F, dtype=torch.float32)
    spla_bwd_kernel_linear_dk[(H, triton.cdiv(F, BK), NT)](
        fq, v, dg, dgm, live, dh, dz, dfk, meta["chunk_bos"], meta["chunk_t0"], meta["chunk_len"],
        HQ=HQ, G=G, BK=BK, BV=BV, **common, num_warps=4, num_stages=2)
    dv = fq.new_empty(T, H, DV, dtype=torch.float32)
    spla_bwd_kernel_linear_dv[(H, triton.cdiv(DV, BV), NT)](
        fq, fk, dg, live, dh, dv, meta["chunk_bos"], meta["chunk_t0"], meta["chunk_len"],
        HQ=HQ, G=G, BK=BK, BV=BV, **common, num_warps=4, num_stages=2)
    return dfq, dfk, dv
