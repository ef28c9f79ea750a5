# -*- coding: utf-8 -*-
"""The SPLA operator: the chunked torch backend against the naive ground truth and against the spec."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spla import spla_attn
from spla.ops.spla.naive import _naive_block_log_scores
from spla.ops.spla.utils import candidate_range, forced_blocks
from tests.utils import assert_close, make_inputs, rel_err

OUTS = ("o_sparse", "o_rla", "rla_mass")


def _loss_weights(out, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(getattr(out, n).shape, generator=g, dtype=torch.float64) for n in OUTS]


def _compare(inputs, ratio, grad_ratio=None, **opts):
    """Run naive and torch on the same inputs; compare indices, outputs and gradients of all inputs."""
    ref = spla_attn(*inputs, backend="naive", **opts)
    out = spla_attn(*inputs, backend="torch", **opts)
    assert torch.equal(ref.indices, out.indices), "selected blocks differ"
    for n in OUTS:
        assert getattr(out, n).dtype == (getattr(ref, n).dtype)
        assert_close(n, getattr(ref, n), getattr(out, n), ratio)
    if grad_ratio is None:
        return ref, out
    ws = _loss_weights(ref)
    leaves = [x for x in inputs if x.requires_grad]
    g_ref = torch.autograd.grad(sum((getattr(ref, n).double() * w).sum() for n, w in zip(OUTS, ws)), leaves)
    g_out = torch.autograd.grad(sum((getattr(out, n).double() * w).sum() for n, w in zip(OUTS, ws)), leaves)
    for i, (a, b) in enumerate(zip(g_ref, g_out)):
        assert_close(f"grad[{i}]", a, b, grad_ratio)
    return ref, out


@pytest.mark.parametrize("T", [97, 203])
@pytest.mark.parametrize("HQ,H", [(2, 2), (6, 2), (8, 1)])
@pytest.mark.parametrize("D,Dv", [(64, 64), (128, 48)])
def test_torch_vs_naive_fp64(T, HQ, H, D, Dv):
    inputs = make_inputs(1, T, HQ, H, D, Dv=Dv, seed=T + HQ + D)
    _compare(inputs, 1e-10, 1e-9, block_size=32, topk=4)


@pytest.mark.parametrize("selection,cov,rep_keys", [
    ("taylor2", "diag", 0), ("taylor2", "diag", 1), ("taylor2", "diag", 4), ("taylor2", "full", 0),
    ("taylor2", "full", 2), ("taylor1", "diag", 0), ("taylor1", "diag", 3), ("oracle", "diag", 1)])
def test_selection_options(selection, cov, rep_keys):
    inputs = make_inputs(1, 229, 4, 2, 64, seed=rep_keys)
    _compare(inputs, 1e-10, 1e-9, block_size=32, topk=4, selection=selection, cov=cov, rep_keys=rep_keys)


@pytest.mark.parametrize("fmap", ["softmax2", "elu1", "relu2"])
def test_feature_maps_and_linear_inputs(fmap):
    # separate q_lin / k_lin with their own head dim: gradients reach all five inputs
    inputs = make_inputs(2, 150, 6, 2, 64, Dv=32, Dl=48, seed=7, lin=True)
    _compare(inputs, 1e-10, 1e-9, block_size=32, topk=3, feature_map=fmap, scale=0.1)


@pytest.mark.parametrize("sink_blocks,local_blocks,topk", [(0, 1, 2), (2, 1, 4), (1, 3, 5), (0, 2, 2)])
def test_forced_blocks(sink_blocks, local_blocks, topk):
    inputs = make_inputs(1, 260, 3, 1, 64, seed=topk)
    _compare(inputs, 1e-10, 1e-9, block_size=32, topk=topk, sink_blocks=sink_blocks, local_blocks=local_blocks)


def test_packed_sequences():
    lens = [45, 130, 1, 96, 64]
    T = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    inputs = make_inputs(1, T, 6, 2, 64, seed=3)
    opts = dict(block_size=32, topk=3)
    _, packed = _compare(inputs, 1e-10, 1e-9, cu_seqlens=cu, **opts)
    # each sequence alone gives the same result as its slice of the packed batch
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = spla_attn(*(x[:, s:e] for x in inputs), backend="torch", **opts)
        for n in OUTS + ("indices",):
            a, b = getattr(alone, n), getattr(packed, n)[:, s:e]
            assert torch.equal(a, b) if n == "indices" else (a - b).abs().max() < 1e-12, n


def test_batch_matches_single():
    inputs = make_inputs(3, 140, 4, 2, 64, seed=5, requires_grad=False)
    full = spla_attn(*inputs, block_size=32, topk=3)
    for b in range(3):
        one = spla_attn(*(x[b:b + 1] for x in inputs), block_size=32, topk=3)
        for n in OUTS + ("indices",):
            assert torch.allclose(getattr(full, n)[b:b + 1].double(), getattr(one, n).double(), atol=1e-12)


@pytest.mark.parametrize("HQ,H", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_dense_limit_equals_sdpa(HQ, H, backend):
    """With every block selected SPLA is dense causal attention and the residual is exactly zero."""
    T, D = 150, 64
    q, k, v = make_inputs(2, T, HQ, H, D, dtype=torch.float32, seed=11, requires_grad=False)
    out = spla_attn(q, k, v, block_size=32, topk=math.ceil(T / 32), backend=backend)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=True).transpose(1, 2)
    assert_close("o_sparse", ref, out.o_sparse, 1e-5)
    assert (out.o_rla == 0).all() and (out.rla_mass == 0).all()
    nb = torch.arange(T) // 32 + 1  # every token selects exactly its visible blocks
    assert ((out.indices >= 0).sum(-1) == nb[None, :, None]).all()


def test_indices_are_a_valid_topk():
    """The free picks are a top-k of the spec's group score; forced blocks are present; -1 padding is last."""
    bs, topk, sink, local = 32, 5, 1, 2
    q, k, v = make_inputs(1, 321, 6, 2, 64, seed=21, requires_grad=False)
    out = spla_attn(q, k, v, block_size=bs, topk=topk, sink_blocks=sink, local_blocks=local)
    G = 3
    scale = 64 ** -0.5
    l = _naive_block_log_scores(q[0], k[0], scale, bs, 321 // bs, "taylor2", "diag", 1)  # [T, HQ, NB]
    checked = 0
    for t in range(321):
        c = t // bs
        forced = forced_blocks(c, sink, local)
        lo, hi = candidate_range(c, sink, local)
        for h in range(2):
            idx = out.indices[0, t, h].tolist()
            sel = [j for j in idx if j >= 0]
            assert sel == sorted(sel) and idx[len(sel):] == [-1] * (topk - len(sel))
            assert set(forced) <= set(sel)
            cands = list(range(lo, hi))
            if not cands:
                continue
            s = torch.softmax(l[t, h * G:(h + 1) * G, lo:hi], -1).sum(0)
            picked = [j - lo for j in sel if j not in forced]
            rest = [j for j in range(len(cands)) if j not in picked]
            assert len(picked) == min(len(cands), topk - len(forced))
            if rest:
                assert s[picked].min() >= s[rest].max() - 1e-12
                checked += 1
    assert checked > 100


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(1, 170), H=st.integers(1, 2), G=st.sampled_from([1, 2, 3]), bs=st.sampled_from([32, 48]),
       topk=st.integers(3, 6), sink=st.integers(0, 1), local=st.integers(1, 2), selection=st.sampled_from(
           ["taylor2", "taylor1", "oracle"]), rep=st.integers(0, 4), fmap=st.sampled_from(["softmax2", "elu1", "relu2"]),
       seed=st.integers(0, 2 ** 16))
def test_property_torch_equals_naive(T, H, G, bs, topk, sink, local, selection, rep, fmap, seed):
    q, k, v = make_inputs(1, T, H * G, H, 32, seed=seed, requires_grad=False)
    opts = dict(block_size=bs, topk=topk, sink_blocks=sink, local_blocks=local, selection=selection,
                rep_keys=rep, feature_map=fmap)
    ref = spla_attn(q, k, v, backend="naive", **opts)
    out = spla_attn(q, k, v, backend="torch", **opts)
    assert torch.equal(ref.indices, out.indices)
    for n in OUTS:
        assert_close(n, getattr(ref, n), getattr(out, n), 1e-10)


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(T=st.integers(1, 400), p0_frac=st.floats(0, 1), G=st.sampled_from([1, 3]), topk=st.integers(3, 7),
       sink=st.integers(0, 2), local=st.integers(1, 3), sel=st.sampled_from(
           [("taylor2", "diag", 1), ("taylor2", "full", 2), ("taylor1", "diag", 0), ("oracle", "diag", 0)]),
       seed=st.integers(0, 2 ** 16))
def test_select_rows_matches_per_block(T, p0_frac, G, topk, sink, local, sel, seed, monkeypatch):
    """The grouped selection of the torch path (many query blocks scored at once, each row masked to its own
    candidates, groups bounded by the chunk budget) picks exactly what one query block at a time picks."""
    from spla.ops.spla import chunk
    from spla.ops.spla.utils import block_stats
    monkeypatch.setattr(chunk, "CHUNK_BUDGET", 1 << 12)          # several groups even at these sizes (same value
    # on every example, so the function-scoped fixture is safe to share)
    selection, cov, rep = sel
    topk = max(topk, sink + local)                                  # the op requires it (validate_inputs)
    bs, H, D = 16, 2, 16
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(T, H * G, D, generator=g, dtype=torch.float64), torch.randn(T, H, D, generator=g, dtype=torch.float64)
    p0 = min(T - 1, int(p0_frac * T))
    opts = dict(block_size=bs, topk=topk, sink_blocks=sink, local_blocks=local, selection=selection, cov=cov,
                scale=D ** -0.5)
    got = chunk.select_rows(q[p0:], k, p0, rep_keys=rep, **opts)
    nb = T // bs
    stats = block_stats(k, bs, cov=cov, rep_keys=rep, second_order=selection == "taylor2") \
        if selection != "oracle" and nb else None
    kb = k[:nb * bs].view(nb, bs, H, D) if selection == "oracle" else None
    want = torch.full_like(got, -1)
    for t in range(p0, T):
        sel_t = chunk.select_query_block(q[t].view(1, H, G, D), t // bs, stats, kb, **opts)
        want[t - p0, :, :sel_t.shape[-1]] = sel_t[0].to(torch.int32)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype,ratio", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_low_precision_inputs(dtype, ratio):
    """16-bit inputs: outputs in the input dtype, rla_mass fp32, close to the fp64 result on the same selection."""
    x64 = make_inputs(1, 200, 4, 2, 64, seed=2, requires_grad=False)
    xl = [x.to(dtype) for x in x64]
    out = spla_attn(*xl, block_size=32, topk=3)
    ref = spla_attn(*(x.double() for x in xl), block_size=32, topk=3)
    assert out.o_sparse.dtype == dtype and out.o_rla.dtype == dtype and out.rla_mass.dtype == torch.float32
    assert out.indices.dtype == torch.int32
    same = (out.indices == ref.indices).all(-1)  # compare where the selections agree
    assert same.float().mean() > 0.9
    for n in OUTS:
        a, b = getattr(out, n), getattr(ref, n)
        assert_close(n, b[same.any(-1)], a[same.any(-1)], ratio)


def test_subtraction_error_fp32_16k():
    """fp32 vs fp64 at T = 16k: the residual computed by subtraction stays accurate (bound: 1e-4 relative)."""
    T = 16384
    q, k, v = make_inputs(1, T, 1, 1, 64, seed=9, requires_grad=False)
    opts = dict(block_size=64, topk=8)
    ref = spla_attn(q, k, v, **opts)  # fp64
    out = spla_attn(q.float(), k.float(), v.float(), **opts)
    agree = (out.indices == ref.indices).all(-1).all(-1)[0]
    assert agree.float().mean() > 0.95
    for n in ("o_rla", "rla_mass"):
        assert_close(n, getattr(ref, n)[0, agree], getattr(out, n)[0, agree], 1e-4)
    # the per-token relative error of the residual mass, late in the sequence where the global sum is largest
    m_ref, m_out = ref.rla_mass[0, -1024:].double(), out.rla_mass[0, -1024:].double()
    assert ((m_out - m_ref).abs() / m_ref.abs()).max() < 1e-4


def _base():
    return make_inputs(1, 64, 4, 2, 32, dtype=torch.float32, requires_grad=False)


@pytest.mark.parametrize("change,name", [
    (lambda a: a.update(q=a["q"][0]), "q"),
    (lambda a: a.update(k=a["k"][..., :16]), "k"),
    (lambda a: a.update(k=torch.randn(1, 64, 3, 32)), "HQ"),
    (lambda a: a.update(v=torch.randn(1, 63, 2, 32)), "v"),
    (lambda a: a.update(v=a["v"].double()), "v"),
    (lambda a: a.update(q=a["q"].int()), "q"),
    (lambda a: a.update(q_lin=torch.randn(1, 64, 4, 32)), "q_lin"),
    (lambda a: a.update(q_lin=torch.randn(1, 64, 4, 32), k_lin=torch.randn(1, 64, 2, 16)), "k_lin"),
    (lambda a: a.update(topk=2, sink_blocks=1, local_blocks=2), "topk"),
    (lambda a: a.update(local_blocks=0), "local_blocks"),
    (lambda a: a.update(block_size=0), "block_size"),
    (lambda a: a.update(rep_keys=5), "rep_keys"),
    (lambda a: a.update(selection="taylor3"), "selection"),
    (lambda a: a.update(cov="low_rank"), "cov"),
    (lambda a: a.update(feature_map="gelu"), "feature_map"),
    (lambda a: a.update(backend="cuda"), "backend"),
    (lambda a: a.update(scale=-1.0), "scale"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 30, 60])), "cu_seqlens"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 30, 64.0])), "cu_seqlens"),
    (lambda a: a.update(q=torch.randn(2, 64, 4, 32), k=torch.randn(2, 64, 2, 32), v=torch.randn(2, 64, 2, 32),
                        cu_seqlens=torch.tensor([0, 64])), "cu_seqlens"),
])
def test_bad_input_raises_value_error(change, name):
    q, k, v = _base()
    args = dict(q=q, k=k, v=v)
    change(args)
    with pytest.raises(ValueError, match=name):
        spla_attn(**args)


def test_no_gradient_through_selection():
    """Indices are integers without grad; gradients exist for all five inputs through both outputs."""
    q, k, v, ql, kl = make_inputs(1, 100, 2, 1, 32, seed=4, lin=True)
    out = spla_attn(q, k, v, ql, kl, block_size=32, topk=3)
    assert not out.indices.requires_grad
    (out.o_sparse.sum() + out.o_rla.sum()).backward()
    for x in (q, k, v, ql, kl):
        assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_topk_attn_is_the_sparse_branch_alone(backend):
    """topk_attn = spla_attn's o_sparse and indices with o_rla / rla_mass exactly 0; q, k, v gradients of o_sparse."""
    from spla import topk_attn
    q, k, v = make_inputs(1, 75, 6, 2, 32, dtype=torch.float64, requires_grad=False, seed=4)[:3]
    opts = dict(block_size=16, topk=3, sink_blocks=1, local_blocks=1, backend=backend)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = topk_attn(*leaves, **opts)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = spla_attn(*ref_leaves, **opts)
    assert torch.equal(out.indices, ref.indices)
    assert rel_err(out.o_sparse, ref.o_sparse) < 1e-12
    assert torch.count_nonzero(out.o_rla) == 0 and torch.count_nonzero(out.rla_mass) == 0
    w = torch.randn_like(out.o_sparse)
    for g, r in zip(torch.autograd.grad((out.o_sparse * w).sum(), leaves),
                    torch.autograd.grad((ref.o_sparse * w).sum(), ref_leaves)):
        assert rel_err(g, r) < 1e-10
    with pytest.raises(ValueError, match="topk"):
        topk_attn(q, k, v, topk=1, sink_blocks=1, local_blocks=1)
