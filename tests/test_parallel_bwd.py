# -*- coding: utf-8 -*-
"""The Triton backward (issue 4) against the torch backend's autograd (and the naive backend once).

On CPU the kernels run under ``TRITON_INTERPRET=1`` (conftest.py) at small shapes; most cases take the torch
(oracle) selection so that the interpreter spends its time in the backward kernels (the selection has no
gradient). ``gpu`` tests: ``pytest -m gpu tests/test_parallel_bwd.py`` on the device machine.
"""

import pytest
import torch

import spla.ops.spla.parallel as P
from spla import spla_attn
from tests.utils import assert_close, make_inputs, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("q", "k", "v", "q_lin", "k_lin")


def _inputs(T, HQ, H, D, Dv=None, Dl=None, dtype=torch.float32, seed=0):
    xs = make_inputs(1, T, HQ, H, D, Dv=Dv, Dl=Dl, lin=True, dtype=torch.float32, seed=seed, requires_grad=False)
    return [x.to(DEVICE, dtype) for x in xs]


def _weights(out, seed=7, outputs=(0, 1, 2)):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(x.shape, generator=g).to(x.device) for x in out[:3]]
    return [ws[i] if i in outputs else None for i in range(3)]


def _loss(out, ws):
    return sum((o.float() * w).sum() for o, w in zip(out[:3], ws) if w is not None)


def _grads(inputs, backend, opts, outputs=(0, 1, 2)):
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = spla_attn(*leaves, backend=backend, **opts)
    _loss(out, _weights(out, outputs=outputs)).backward()
    return out, [x.grad for x in leaves]


def _triton_grads_both(inputs, opts, monkeypatch, outputs=(0, 1, 2)):
    """One Triton forward, then the backward twice: deterministic (KV-block-major) and with fp32 atomics."""
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = spla_attn(*leaves, backend="triton", **opts)
    loss = _loss(out, _weights(out, outputs=outputs))
    res = {}
    for det in (True, False):
        monkeypatch.setattr(P, "DETERMINISTIC", det)
        res[det] = torch.autograd.grad(loss, leaves, retain_graph=True)
    return out, res


# T (odd), HQ, H, D, Dv, Dl, feature map, block, topk, sink, local, selection, cu_seqlens
CASES = [
    (83, 3, 3, 64, 64, None, "softmax2", 16, 3, 1, 1, "oracle", None),     # GQA 1
    (71, 3, 1, 128, 64, 32, "elu1", 16, 3, 1, 1, "oracle", None),        # GQA 3, D 128, Dl != D
    (67, 8, 1, 64, 32, None, "relu2", 16, 3, 0, 1, "oracle", None),       # GQA 8 (token-major forward)
    (91, 4, 2, 64, 64, None, "softmax2", 16, 3, 1, 1, "oracle", (0, 37, 91)),  # packed
    (77, 4, 2, 64, 64, None, "softmax2", 16, 3, 1, 1, "taylor2", None),   # the Triton selection too
]


@pytest.mark.parametrize("T,HQ,H,D,Dv,Dl,fmap,bs,topk,sink,local,sel,cu", CASES,
                         ids=[f"T{c[0]}-G{c[1] // c[2]}-D{c[3]}-{c[6]}-{c[11]}" + ("-packed" if c[12] else "")
                              for c in CASES])
def test_backward_vs_torch(T, HQ, H, D, Dv, Dl, fmap, bs, topk, sink, local, sel, cu, monkeypatch):
    """fp32 gradients of all five inputs, both key-gradient passes, vs the torch backend's autograd."""
    inputs = _inputs(T, HQ, H, D, Dv=Dv, Dl=Dl, seed=T)
    opts = dict(block_size=bs, topk=topk, sink_blocks=sink, local_blocks=local, feature_map=fmap, selection=sel,
                cu_seqlens=None if cu is None else torch.tensor(cu, device=DEVICE))
    tri, grads = _triton_grads_both(inputs, opts, monkeypatch)
    ref, ref_grads = _grads(inputs, "torch", opts)
    assert torch.equal(tri.indices, ref.indices)
    assert (ref.rla_mass != 0).any() and (ref.rla_mass == 0).any()  # live and exactly-zero residual rows
    for det, gs in grads.items():
        for n, a, b in zip(NAMES, gs, ref_grads):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert b.abs().sum() > 0, f"{n}: reference gradient is zero, the case tests nothing"
            assert_close(f"{'det' if det else 'atomic'} d{n}", b, a, 2e-5)


def test_backward_vs_naive_partial_outputs(monkeypatch):
    """Only o_sparse, then only the residual outputs carry a gradient (None upstream grads); naive reference."""
    inputs = _inputs(53, 4, 2, 64, seed=3)
    opts = dict(block_size=16, topk=2, sink_blocks=1, local_blocks=1, selection="oracle")
    for outputs in ((0,), (1, 2)):
        _, grads = _triton_grads_both(inputs, opts, monkeypatch, outputs=outputs)
        _, ref = _grads(inputs, "naive", opts, outputs=outputs)
        for det, gs in grads.items():
            for n, a, b in zip(NAMES, gs, ref):
                if b is None:
                    # o_sparse does not depend on q_lin, k_lin; the residual outputs not on q, k (the naive graph
                    # leaves them unused): the Triton gradient must be exactly 0
                    assert (outputs == (0,)) == (n in ("q_lin", "k_lin")) or n == "v", n
                    assert (a == 0).all(), f"{outputs} d{n} should be 0"
                    continue
                assert_close(f"{outputs} d{n}", b, a, 2e-5)


def test_backward_deterministic_bitwise(monkeypatch):
    """The KV-block-major pass is bitwise reproducible, also where busy blocks are split into chunks whose
    partials are reduced in order (KV_CAP=7 entries per work item here), and still matches the torch backend."""
    inputs = _inputs(75, 4, 2, 64, seed=11)
    opts = dict(block_size=16, topk=3, sink_blocks=1, local_blocks=1, selection="oracle")
    monkeypatch.setattr(P, "DETERMINISTIC", True)
    monkeypatch.setattr(P, "KV_CAP", 7)
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = spla_attn(*leaves, backend="triton", **opts)
    loss = _loss(out, _weights(out))
    g1 = torch.autograd.grad(loss, leaves, retain_graph=True)
    g2 = torch.autograd.grad(loss, leaves)
    _, ref = _grads(inputs, "torch", opts)
    for n, a, b, r in zip(NAMES, g1, g2, ref):
        assert torch.equal(a, b), f"d{n} differs between two deterministic backwards"
        assert_close(f"split d{n}", r, a, 2e-5)


# ------------------------------------------------------------------------------------------------- GPU

def _gpu_inputs(T, HQ, H, D, dtype, seed):
    """q, k, v, q_lin, k_lin drawn on the GPU (the CPU fp64 generator is slow at 32k-64k)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(1, T, HQ, D), (1, T, H, D), (1, T, H, D), (1, T, HQ, D), (1, T, H, D)]
    return [torch.randn(s, device="cuda", generator=g).to(dtype) for s in shapes]


def _fp32_grads_on_indices(inputs, indices, bs, fmap, ws):
    """fp32 Triton forward stages + backward on given indices (ieee dots): the reference for 16-bit runs."""
    from spla.ops.spla.parallel import _prepare_meta, linear_branch_fwd, parallel_spla_bwd, sparse_fwd
    q, k, v, ql, kl = (x.float().contiguous() for x in inputs)
    B, T, HQ, D = q.shape
    H = k.shape[2]
    scale = D ** -0.5
    meta = _prepare_meta((0, T), bs, 1, q.device)
    fq, fk, g, gm = linear_branch_fwd(ql[0], kl[0], v[0], meta, fmap, torch.float32)
    lse = q.new_empty(T, HQ)
    o, _, _ = sparse_fwd(q[0], k[0], v[0], fq, fk, g, gm, indices.reshape(T, H, -1), meta, block_size=bs,
                         scale=scale, lse=lse)
    return parallel_spla_bwd(q, k, v, ql, kl, o.view(1, T, HQ, -1), lse, indices, *ws, block_size=bs, scale=scale,
                             feature_map_name=fmap)


# T, HQ, H, D, Dv, cu_seqlens, UNION_MAX_LOAD (None: the default), residual
UNION_CASES = [
    (83, 4, 2, 64, 64, None, 3 / 32, True),  # G = 2 (32-token tiles): small unions take the union kernel, large
    # ones the token-major fallback (both occur: asserted)
    (91, 3, 1, 128, 64, (0, 37, 37, 91), None, True),  # G = 3, D = 128, packed with an empty sequence
    (67, 8, 1, 64, 32, None, None, False),  # G = 8 (8-token tiles), no linear branch (topk_attn)
]


@pytest.mark.parametrize("T,HQ,H,D,Dv,cu,load,residual", UNION_CASES)
def test_union_backward_vs_torch(T, HQ, H, D, Dv, cu, load, residual, monkeypatch):
    """``SPARSE_PATH="union"``: the query-tile backward (``spla_bwd_kernel_sparse_union`` with its token-major
    fallback) gives the torch backend's fp32 gradients, with both key-gradient passes (its atomic variant adds
    dk, dv, dphi(k) per union block)."""
    from spla import topk_attn
    monkeypatch.setattr(P, "SPARSE_PATH", "union")
    monkeypatch.setattr(P, "UNION_MIN_SHARE", 0.0)  # the union kernel runs wherever unions are small
    if load is not None:
        monkeypatch.setattr(P, "UNION_MAX_LOAD", load)
    inputs = _inputs(T, HQ, H, D, Dv=Dv, seed=T + 1)
    opts = dict(block_size=16, topk=3, sink_blocks=1, local_blocks=1, selection="oracle",
                cu_seqlens=None if cu is None else torch.tensor(cu, device=DEVICE))
    if residual:
        tri, grads = _triton_grads_both(inputs, opts, monkeypatch)
        ref, ref_grads = _grads(inputs, "torch", opts)
        names = NAMES
    else:
        leaves = [x.clone().requires_grad_() for x in inputs[:3]]
        tri = topk_attn(*leaves, backend="triton", **opts)
        ref_leaves = [x.clone().requires_grad_() for x in inputs[:3]]
        ref = spla_attn(*ref_leaves, backend="torch", **opts)
        w = torch.randn(ref.o_sparse.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        ref_grads = torch.autograd.grad((ref.o_sparse * w).sum(), ref_leaves)
        grads = {}
        for det in (True, False):
            monkeypatch.setattr(P, "DETERMINISTIC", det)
            grads[det] = torch.autograd.grad((tri.o_sparse * w).sum(), leaves, retain_graph=True)
        names = NAMES[:3]
    assert torch.equal(tri.indices, ref.indices)
    if load is not None:  # the threshold splits the tiles: both query-side kernels ran
        tile = P._topk_tile(16, HQ // H)
        meta = P._prepare_meta(tuple(cu) if cu else (0, T), 16, tile, DEVICE)
        ucount = P._tile_unions(ref.indices.reshape(T, H, -1), meta, tile)[1]
        work, fallback = P._union_split(ucount, meta, tile, load * tile * 3)
        assert work.numel() > 0 and fallback.numel() > 0
    for det, gs in grads.items():
        for n, a, b in zip(names, gs, ref_grads):
            assert b.abs().sum() > 0, f"{n}: reference gradient is zero, the case tests nothing"
            assert_close(f"union {'det' if det else 'atomic'} d{n}", b, a, 2e-5)


@pytest.mark.parametrize("utile,bk,tma", [(4, 32, False), (2, 16, False), (16, 64, False), (4, 32, True)])
def test_union_backward_tile_and_key_subtiles(utile, bk, tma, monkeypatch):
    """The union backward over its own tile (``SPARSE_LAUNCH["union_bwd_tile"]``: 4 tokens, 2 raised to the 16-row
    minimum of 4 for G = 3, or the selection's 16) and key sub-tiles of 16 or all 32 keys of a block
    (``union_bwd_bk``), every tile on the union kernel (``UNION_MAX_LOAD`` 1): the torch backend's fp32 gradients,
    packed odd lengths, both key-gradient passes. ``tma``: forward and backward union kernels load their key
    sub-tiles through tensor descriptors (``union_tma``, ``union_bwd_tma``), on sequences of 96 and 128 tokens (bulk
    copies need every sequence length a multiple of the sub-tile)."""
    monkeypatch.setattr(P, "SPARSE_PATH", "union")
    monkeypatch.setattr(P, "UNION_MIN_SHARE", 0.0)  # the union kernel runs wherever unions are small
    monkeypatch.setattr(P, "UNION_MAX_LOAD", 1.0)
    monkeypatch.setitem(P.SPARSE_LAUNCH, "union_bwd_tile", utile)
    monkeypatch.setitem(P.SPARSE_LAUNCH, "union_bwd_bk", bk)
    monkeypatch.setitem(P.SPARSE_LAUNCH, "union_tma", tma)
    monkeypatch.setitem(P.SPARSE_LAUNCH, "union_bwd_tma", tma)
    T, cu = (224, (0, 96, 224)) if tma else (131, (0, 90, 131))
    inputs = _inputs(T, 3, 1, 64, seed=13)
    opts = dict(block_size=32, topk=2, sink_blocks=1, local_blocks=1, selection="oracle",
                cu_seqlens=torch.tensor(cu, device=DEVICE))
    k0, v0 = inputs[1][0], inputs[2][0]
    assert P._key_loads(k0, v0, k0, bk, P._prepare_meta(cu, 32, 1, DEVICE), tma)[3] == tma
    tri, grads = _triton_grads_both(inputs, opts, monkeypatch)
    ref, ref_grads = _grads(inputs, "torch", opts)
    assert torch.equal(tri.indices, ref.indices)
    for det, gs in grads.items():
        for n, a, b in zip(NAMES, gs, ref_grads):
            assert b.abs().sum() > 0, f"{n}: reference gradient is zero, the case tests nothing"
            assert_close(f"union tile={utile} bk={bk} tma={tma} {'det' if det else 'atomic'} d{n}", b, a, 2e-5)


@pytest.mark.gpu
def test_gpu_backward_vs_torch(monkeypatch):
    """fp32 on the GPU at T=2051, GQA 4, blocks of 64, top-16: vs the torch backend on the same indices."""
    inputs = _inputs(2051, 16, 4, 128, seed=21)
    opts = dict(block_size=64, topk=16, selection="oracle")
    _, grads = _triton_grads_both(inputs, opts, monkeypatch)
    _, ref = _grads(inputs, "torch", opts)
    for det, gs in grads.items():
        for n, a, b in zip(NAMES, gs, ref):
            assert_close(f"{'det' if det else 'atomic'} d{n}", b, a, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("det", [True, False])
def test_gpu_backward_bf16_32k(det, monkeypatch):
    """bf16 at T=32k (HQ=32, H=8, D=128) vs fp32 arithmetic on the bf16 run's own indices.

    Bound: relative (Frobenius) error <= 3e-2 for each of the five gradients (bf16 has an 8-bit mantissa; the
    dots take bf16 operands and accumulate in fp32, dq / dq_lin / dk_lin are rounded to bf16).
    """
    monkeypatch.setattr(P, "DETERMINISTIC", det)
    inputs = _gpu_inputs(32768, 32, 8, 128, torch.bfloat16, seed=5)
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = spla_attn(*leaves, backend="triton", block_size=64, topk=16)
    ws = [w.to(torch.bfloat16) if i < 2 else w for i, w in enumerate(_weights(out))]
    _loss(out, ws).backward()
    ref = _fp32_grads_on_indices(inputs, out.indices, 64, "softmax2", ws)
    for n, x, b in zip(NAMES, leaves, ref):
        assert x.grad.dtype == torch.bfloat16 and not torch.isnan(x.grad).any()
        err = rel_err(x.grad.float(), b)
        print(f"d{n}: relative error {err:.2e}")
        assert err <= 3e-2, f"d{n}: relative error {err:.3e} > 3e-2"


@pytest.mark.gpu
@pytest.mark.parametrize("HQ,H", [(32, 8), (64, 4)])
def test_gpu_union_backward_agrees(HQ, H, monkeypatch):
    """bf16 at 8k on queries with a real model's locality (AR(1), benchmarks/inputs.py) and random keys: the
    union path (forward and backward, with the token-major fallback for large unions) gives the default path's
    outputs and gradients (both deterministic)."""
    from benchmarks.inputs import ar1
    q, k, v, ql, kl = _gpu_inputs(8192, HQ, H, 128, torch.float32, seed=9)
    q = ar1(q[0], 0.985)[None]
    inputs = [x.to(torch.bfloat16) for x in (q, k, v, ql, kl)]
    res = {}
    for path in ("auto", "union"):
        monkeypatch.setattr(P, "SPARSE_PATH", path)
        leaves = [x.clone().requires_grad_() for x in inputs]
        out = spla_attn(*leaves, backend="triton", block_size=64, topk=16)
        _loss(out, _weights(out)).backward()
        res[path] = (out, [x.grad for x in leaves])
    (a, ga), (b, gb) = res["union"], res["auto"]
    assert torch.equal(a.indices, b.indices)
    for n in ("o_sparse", "o_rla"):
        assert rel_err(getattr(a, n).float(), getattr(b, n).float()) < 1e-2, n
    for n, x, y in zip(NAMES, ga, gb):
        err = rel_err(x.float(), y.float())
        print(f"d{n}: union vs default {err:.2e}")
        assert err < 1e-2, n


@pytest.mark.gpu
def test_gpu_backward_memory_linear():
    """Forward+backward peak memory grows linearly: 64k vs 16k (bf16, HQ=32, H=8, D=128) within 4.6x (quadratic
    would be 16x), and nothing near a T x T tensor at 64k."""
    peaks = {}
    for T in (16384, 65536):
        torch.cuda.empty_cache()
        inputs = _gpu_inputs(T, 32, 8, 128, torch.bfloat16, seed=1)
        leaves = [x.requires_grad_() for x in inputs]
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = spla_attn(*leaves, backend="triton", block_size=64, topk=16)
        (out.o_sparse.float().sum() + out.o_rla.float().sum() + out.rla_mass.sum()).backward()
        torch.cuda.synchronize()
        peaks[T] = torch.cuda.max_memory_allocated() - base
        assert all(x.grad is not None and not torch.isnan(x.grad).any() for x in leaves)
        del out, leaves, inputs
    print({T: f"{p / 2 ** 30:.2f} GiB" for T, p in peaks.items()})
    assert peaks[65536] <= 4.6 * peaks[16384], peaks
    # one bf16 T x T score matrix of a single head at 64k would be 8 GiB
    assert peaks[65536] < 24 * 2 ** 30, peaks


@pytest.mark.parametrize("T,HQ,H,cu", [(83, 4, 2, None), (67, 8, 1, None), (91, 4, 2, (0, 37, 91))])
def test_topk_attn_triton_matches_spla_sparse_branch(T, HQ, H, cu, monkeypatch):
    """topk_attn (no linear branch: the Triton kernels run with LIN=False, forward and backward) gives
    spla_attn's o_sparse and indices, zero o_rla / rla_mass, and the gradients of q, k, v that o_sparse alone
    gives (torch backend's autograd), for the KV-major (G=2) and token-major (G=8) forward, both key-gradient
    passes, and a packed batch."""
    from spla import topk_attn
    opts = dict(block_size=16, topk=3, sink_blocks=1, local_blocks=1, selection="oracle")
    cu_t = None if cu is None else torch.tensor(cu, device=DEVICE)
    q, k, v, _, _ = _inputs(T, HQ, H, 64, seed=T)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = spla_attn(*ref_leaves, backend="torch", cu_seqlens=cu_t, **opts)
    w = torch.randn(ref.o_sparse.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ref_g = torch.autograd.grad((ref.o_sparse * w).sum(), ref_leaves)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = topk_attn(*leaves, backend="triton", cu_seqlens=cu_t, **opts)
    assert torch.equal(out.indices, ref.indices)
    assert_close("o_sparse", out.o_sparse, ref.o_sparse, 1e-5)
    assert torch.count_nonzero(out.o_rla) == 0 and torch.count_nonzero(out.rla_mass) == 0
    loss = (out.o_sparse * w).sum()
    for det in (True, False):
        monkeypatch.setattr(P, "DETERMINISTIC", det)
        for name, g, r in zip(NAMES, torch.autograd.grad(loss, leaves, retain_graph=True), ref_g):
            assert_close(f"d{name} (deterministic={det})", g, r, 1e-4)


@pytest.mark.gpu
def test_gpu_topk_attn_matches_spla_sparse_branch():
    """On CUDA, bf16 at 16k (HQ=32, H=8, D=128): topk_attn's o_sparse, indices and q/k/v gradients equal those
    spla_attn gives through o_sparse alone (same kernels with and without the linear branch)."""
    from spla import topk_attn
    q, k, v = _gpu_inputs(16384, 32, 8, 128, torch.bfloat16, seed=2)[:3]
    a = [x.clone().requires_grad_() for x in (q, k, v)]
    b = [x.clone().requires_grad_() for x in (q, k, v)]
    out = topk_attn(*a, block_size=64, topk=16)
    ref = spla_attn(*b, block_size=64, topk=16)
    assert torch.equal(out.indices, ref.indices)
    assert rel_err(out.o_sparse.float(), ref.o_sparse.float()) < 1e-3  # two compilations of the same kernel
    assert torch.count_nonzero(out.o_rla) == 0
    w = torch.randn_like(out.o_sparse)
    for n, g, r in zip(NAMES, torch.autograd.grad((out.o_sparse * w).sum(), a),
                       torch.autograd.grad((ref.o_sparse * w).sum(), b)):
        assert rel_err(g.float(), r.float()) < 1e-2, n


@pytest.mark.parametrize("launch", [dict(), dict(state_bk=32, state_bv=16, state_stages=1, out_heads=4),
                                    dict(state_bk=16, state_bv=16, state_warps=2, state_stages=3, out_bv=32,
                                         out_heads=4),  # 32-channel tiles: one head per program
                                    dict(state_bk=32, state_bv=32, out_heads=2, out_warps=8, dq_heads=2),
                                    dict(out_heads=1, dq_heads=4, dq_warps=8)])
@pytest.mark.parametrize("HQ", [12, 8])
def test_global_linear_launch_settings(launch, HQ, monkeypatch):
    """The global linear attention's kernels (forward and backward) under the launch settings ``bench_linear.py``
    sweeps (state-pass tiles; query heads per forward-output / backward-dq program: 2 and 4, which becomes 2 for
    a group of 6): equal to the torch chunk path's outputs and autograd gradients (fp32, two packed sequences,
    one not a multiple of the chunk, GQA 6 and 4; 160 features and 96 value channels, so partial tiles)."""
    from spla.ops.spla import linear as lin
    from spla.ops.spla.chunk import chunk_global_linear_attn
    from spla.ops.spla.parallel import LINEAR_CHUNK, _prepare_meta
    for key, val in launch.items():
        monkeypatch.setitem(lin.LINEAR_LAUNCH, key, val)
    T, H, F, DV = 150, 2, 160, 96  # several feature and value tiles per program, the last ones partial
    cu = (0, 83, T)
    g = torch.Generator().manual_seed(3)
    fq, fk = torch.rand(T, HQ, F, generator=g), torch.rand(T, H, F, generator=g)
    v = torch.randn(T, H, DV, generator=g)
    dg, dgm = torch.randn(T, HQ, DV, generator=g), torch.randn(T, HQ, generator=g)
    live = (torch.rand(T, H, generator=g) > 0.2).float()
    meta = _prepare_meta(cu, 32, 1, "cpu")
    o, om = lin.global_linear_fwd(fq, fk, v, meta, LINEAR_CHUNK)
    xs = [x.clone().double().requires_grad_() for x in (fq, fk, v)]
    ro, rom = chunk_global_linear_attn(*(x[None] for x in xs), torch.tensor(cu), LINEAR_CHUNK)
    assert_close("glob", ro[0].detach(), o, 1e-5)
    assert_close("glob_mass", rom[0].detach(), om, 1e-5)
    lv = live.double().repeat_interleave(HQ // H, 1)
    ((ro[0] * (dg.double() * lv[..., None])).sum() + (rom[0] * dgm.double() * lv).sum()).backward()
    grads = lin.global_linear_bwd(fq, fk, v, dg * lv[..., None].float(), dgm * lv.float(), live, meta, LINEAR_CHUNK)
    for n, a, x in zip(("dfq", "dfk", "dv"), grads, xs):
        assert_close(n, x.grad, a, 1e-5)


def test_backward_stage_hook():
    """``parallel_spla_bwd(stage=...)`` encloses its five stages in order, each once, and changes no gradient
    (bitwise: the deterministic key-gradient pass)."""
    import contextlib
    T, HQ, H, D, bs = 77, 3, 1, 64, 16
    q, k, v = _inputs(T, HQ, H, D, seed=4)[:3]
    opts = dict(block_size=bs, topk=4, sink_blocks=1, local_blocks=2, selection="taylor2", cov="diag", rep_keys=1,
                feature_map_name="softmax2", scale=D ** -0.5, cu_seqlens=None)
    o, o_rla, mass, idx, lse = P.parallel_spla_fwd(q, k, v, q, k, save_lse=True, **opts)
    ws = [torch.randn_like(x) for x in (o, o_rla, mass)]
    bwd = dict(block_size=bs, scale=D ** -0.5, feature_map_name="softmax2", deterministic=True)
    ref = P.parallel_spla_bwd(q, k, v, q, k, o, lse, idx, *ws, **bwd)
    seen = []

    @contextlib.contextmanager
    def stage(name):
        seen.append(name)
        yield

    out = P.parallel_spla_bwd(q, k, v, q, k, o, lse, idx, *ws, stage=stage, **bwd)
    assert seen == ["features", "linear", "query", "keys", "features_bwd"]
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
