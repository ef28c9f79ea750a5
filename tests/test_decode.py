# -*- coding: utf-8 -*-
"""Decoding with the SPLA cache reproduces spla_attn at every position (SPEC §7)."""

import functools

import pytest
import torch

from spla import spla_attn
from spla.ops.spla.decode import SPLADecodeState
from tests.utils import assert_close, make_inputs

OUTS = ("o_sparse", "o_rla", "rla_mass")


def _state(B, H, D, **opts):
    return SPLADecodeState(B, H, D, **opts)


@pytest.mark.parametrize("HQ,H", [(2, 2), (6, 2), (8, 1)])
@pytest.mark.parametrize("opts", [dict(), dict(selection="taylor1", rep_keys=0), dict(cov="full", rep_keys=2),
                                  dict(selection="oracle"), dict(feature_map="elu1", sink_blocks=0, local_blocks=1)])
def test_prefill_then_decode_matches_parallel(HQ, H, opts):
    T, P, D = 230, 100, 64  # prompt of 100 tokens, then 130 decode steps crossing several block boundaries
    q, k, v = make_inputs(1, T, HQ, H, D, seed=HQ + len(opts), requires_grad=False)
    opts = dict(block_size=32, topk=4, **opts)
    ref = spla_attn(q, k, v, **opts)
    st = _state(1, H, D, **opts, dtype=q.dtype)
    pre = st.prefill(q[:, :P], k[:, :P], v[:, :P])
    steps = [st.step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1]) for t in range(P, T)]
    got = [torch.cat([getattr(pre, n)] + [getattr(s, n) for s in steps], 1) for n in OUTS + ("indices",)]
    assert torch.equal(got[3], ref.indices)
    for n, g in zip(OUTS, got):
        assert_close(n, getattr(ref, n), g, 1e-10)


def test_batched_different_lengths_and_chunked_append():
    """Sequences of different lengths decode together; appending several tokens at once works too."""
    H, HQ, D, T = 2, 4, 32, 170
    opts = dict(block_size=32, topk=3, rep_keys=1)
    seqs = [make_inputs(1, T, HQ, H, D, seed=s, requires_grad=False) for s in range(3)]
    refs = [spla_attn(*x, **opts) for x in seqs]
    st = _state(3, H, D, **opts, dtype=torch.float64)
    # different prompt lengths 40, 70, 95: a left-padded batch, padding marked by key_valid
    starts = [40, 70, 95]
    P = max(starts)
    key_valid = torch.zeros(3, P, dtype=torch.bool)
    prompt = [torch.zeros(3, P, *x.shape[2:], dtype=x.dtype) for x in seqs[0]]
    for b, s in enumerate(starts):
        key_valid[b, P - s:] = True
        for j in range(3):
            prompt[j][b, P - s:] = seqs[b][j][0, :s]
    pre = st.prefill(*prompt, key_valid=key_valid)
    for b, s in enumerate(starts):
        assert torch.equal(pre.indices[b, P - s:], refs[b].indices[0, :s])
        assert_close("prefill o_rla", refs[b].o_rla[0, :s], pre.o_rla[b, P - s:], 1e-10)
        assert (pre.o_sparse[b, :P - s] == 0).all()
    # now feed 3 tokens at a time (chunked append), each row at its own position
    for i in range(0, 60, 3):
        pos = [s + i for s in starts]
        xs = [torch.stack([seqs[b][j][0, p:p + 3] for b, p in enumerate(pos)]) for j in range(3)]
        out = st.step(*xs)
        for b, p in enumerate(pos):
            assert torch.equal(out.indices[b], refs[b].indices[0, p:p + 3])
            for n in OUTS:
                assert_close(n, getattr(refs[b], n)[0, p:p + 3], getattr(out, n)[b], 1e-10)


def test_decode_reads_only_selected_blocks():
    """Poisoning every unselected cached block does not change the step's output."""
    H, HQ, D, T = 1, 2, 32, 300
    opts = dict(block_size=32, topk=3)
    q, k, v = make_inputs(1, T, HQ, H, D, seed=3, requires_grad=False)
    st = _state(1, H, D, **opts, dtype=torch.float64)
    st.prefill(q[:, :T - 1], k[:, :T - 1], v[:, :T - 1])
    clean = st.step(q[:, -1:], k[:, -1:], v[:, -1:])
    st2 = _state(1, H, D, **opts, dtype=torch.float64)
    st2.prefill(q[:, :T - 1], k[:, :T - 1], v[:, :T - 1])
    sel_blocks = set(clean.indices[0, 0, 0].tolist()) | {(T - 1) // 32}
    for j in range((T - 1) // 32):
        if j not in sel_blocks:
            for name in ("k", "v", "k_lin"):
                getattr(st2, name)[0, j * 32:(j + 1) * 32] = float("nan")
    poisoned = st2.step(q[:, -1:], k[:, -1:], v[:, -1:])
    for n in OUTS:
        assert torch.equal(getattr(clean, n), getattr(poisoned, n))


@pytest.mark.parametrize("HQ,H,D,opts", [
    (2, 2, 64, dict()), (6, 2, 64, dict(selection="taylor1", rep_keys=0)),
    (8, 1, 128, dict(rep_keys=3, feature_map="elu1")), (16, 1, 64, dict(feature_map="relu2", sink_blocks=0, local_blocks=1))])
def test_triton_decode_kernels_match_torch(HQ, H, D, opts):
    """The Triton decode step (interpreter on CPU) gives the torch step's selection and outputs."""
    B, T, P = 2, 164, 150
    opts = dict(block_size=32, topk=4, **opts)
    xs = make_inputs(B, T, HQ, H, D, seed=HQ + D, dtype=torch.float32, requires_grad=False)
    states = [SPLADecodeState(B, H, D, **opts, backend=be) for be in ("torch", "triton")]
    for st in states:
        st.prefill(*(x[:, :P] for x in xs))
    for t in range(P, T):  # steps crossing block boundaries
        ref, out = (st.step(*(x[:, t:t + 1] for x in xs)) for st in states)
        assert torch.equal(ref.indices, out.indices)
        for n in OUTS:
            assert_close(n, getattr(ref, n), getattr(out, n), 1e-5)


# the slow-marked settings run with `make test-slow` (CI keeps one of each kind: split, low precision, top-k split)
@pytest.mark.parametrize("launch", [dict(attn_split=1, combine_bv=16, score_tile=64),
                                    pytest.param(dict(attn_split=2, topk_chunk=16, score_tile=16, attn_warps=8),
                                                 marks=pytest.mark.slow),
                                    pytest.param(dict(score_tile=16, score_tiles_per_program=3, score_stages=2),
                                                 marks=pytest.mark.slow),
                                    dict(attn_slices_per_program=4, attn_stages=2, attn_lowp=1),
                                    pytest.param(dict(attn_split=2, attn_slices_per_program=2), marks=pytest.mark.slow),
                                    pytest.param(dict(topk_split=4, topk_chunk=16), marks=pytest.mark.slow),
                                    dict(topk_split=2, score_tiles_per_program=2)])
def test_triton_decode_launch_settings(monkeypatch, launch):
    """Other launch settings (a selected block split over two attention programs, several blocks merged online
    by one, narrower combine slices, other tiles, pipelined loops, the top-k split over programs; what
    ``bench_decode.py --sweep`` times) give the torch step's selection and outputs."""
    _triton_steps_match_torch(monkeypatch, launch, (2, 8, 2, 64, 150, 135), dict(block_size=32, topk=4), seed=11,
                              n=5)


@pytest.mark.parametrize("launch", [dict(attn_slices_per_program=8),
                                    pytest.param(dict(attn_split=2, attn_slices_per_program=4, attn_stages=2),
                                                 marks=pytest.mark.slow)])
def test_triton_decode_merged_programs_with_empty_slots(monkeypatch, launch):
    """Attention programs that merge several selected blocks when fewer blocks exist than top-k (the -1 slots
    fall inside one program): the torch step's selection and outputs."""
    _triton_steps_match_torch(monkeypatch, launch, (2, 4, 1, 32, 100, 40), dict(block_size=32, topk=8), seed=5,
                              n=20, padded=True)


def _triton_steps_match_torch(monkeypatch, launch, shape, opts, seed, n, padded=False):
    """Prefill ``P`` tokens, then steps of ``n`` tokens up to ``T`` (``shape = (B, HQ, H, D, T, P)``) with the
    Triton decode kernels under ``launch`` and the torch step: equal selections, outputs within 1e-5
    (``padded``: every step has -1 slots, fewer blocks than top-k)."""
    from spla.ops.spla import decode_kernels as dk
    for key, val in launch.items():
        monkeypatch.setitem(dk.LAUNCH, key, val)
    B, HQ, H, D, T, P = shape
    xs = make_inputs(B, T, HQ, H, D, seed=seed, dtype=torch.float32, requires_grad=False)
    states = [SPLADecodeState(B, H, D, **opts, backend=be) for be in ("torch", "triton")]
    for st in states:
        st.prefill(*(x[:, :P] for x in xs))
    for t in range(P, T, n):
        ref, out = (st.step(*(x[:, t:t + n] for x in xs)) for st in states)
        if padded:
            assert (ref.indices < 0).any()
        assert torch.equal(ref.indices, out.indices)
        for name in OUTS:
            assert_close(name, getattr(ref, name), getattr(out, name), 1e-5)


def test_triton_decode_split_must_divide_block():
    from spla.ops.spla import decode_kernels as dk
    st = SPLADecodeState(1, 1, 32, block_size=32, topk=2, backend="triton")
    q = torch.randn(1, 1, 32)
    idx = torch.zeros(1, 1, 2, dtype=torch.int32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(dk.LAUNCH, "attn_split", 3)  # does not divide the block: refused
        with pytest.raises(ValueError, match="attn_split"):
            dk.decode_partials(st, q, q, idx)
        mp.setitem(dk.LAUNCH, "attn_split", 4)  # slices of 8 rows: halved to 2 slices of 16
        assert dk.decode_partials(st, q, q, idx)[0].shape[-1] == 2 * 2
        mp.setitem(dk.LAUNCH, "attn_split", 1)
        mp.setitem(dk.LAUNCH, "attn_slices_per_program", 3)  # does not divide top-2: refused
        with pytest.raises(ValueError, match="attn_slices_per_program"):
            dk.decode_partials(st, q, q, idx)
        mp.setitem(dk.LAUNCH, "topk_split", 3)  # not a power of two: refused
        lbuf = torch.zeros(1, 1, 4)
        with pytest.raises(ValueError, match="topk_split"):
            dk.decode_topk(st, lbuf, torch.zeros(1, 1, 1), torch.zeros(1, 1, 1))


@pytest.mark.parametrize("stats_dtype", [None, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
def test_triton_decode_many_tiles(monkeypatch, stats_dtype):
    """Several scoring tiles and top-k chunks per (sequence, head), a left-padded shorter sequence, blocks
    completing during the steps: the Triton step (interpreter) gives the torch step's selection, outputs,
    statistics and state. With statistics stored in bf16 the two paths round a few statistics one bf16 ulp
    apart (different fp32 summation order before rounding), which may swap near-tied blocks: there the
    selections must agree at most steps and the outputs wherever they agree."""
    from spla.ops.spla import decode_kernels as dk
    monkeypatch.setattr(dk, "decode_select", functools.partial(dk.decode_select, tile=16, chunk=16))
    B, HQ, H, D, T, P = 2, 4, 2, 64, 730, 700
    opts = dict(block_size=32, topk=6, sink_blocks=1, local_blocks=1, stats_dtype=stats_dtype)
    xs = make_inputs(B, T, HQ, H, D, seed=5, dtype=torch.float32, requires_grad=False)
    states = [SPLADecodeState(B, H, D, **opts, backend=be) for be in ("torch", "triton")]
    valid = torch.ones(B, P, dtype=torch.bool)
    valid[1, :40] = False  # a left-padded, shorter second sequence
    for st in states:
        st.prefill(*(x[:, :P] for x in xs), key_valid=valid)
    agree = 0
    for t in range(P, T, 10):  # 10 tokens per call, crossing block boundaries
        ref, out = (st.step(*(x[:, t:t + 10] for x in xs)) for st in states)
        assert int((out.indices >= 0).sum()) == B * 10 * H * 6  # every step selects topk blocks
        same = (ref.indices == out.indices).all(-1).all(-1)  # [B, 10]
        agree += int(same.all())
        for n in OUTS:
            assert_close(n, getattr(ref, n)[same], getattr(out, n)[same], 1e-5)
    n_calls = len(range(P, T, 10))
    assert agree == n_calls if stats_dtype is None else agree >= 0.75 * n_calls
    tol = 1e-6 if stats_dtype is None else 1e-2
    for name in ("k", "v", "k_lin", "lengths", "mean", "second", "reps", "S", "z"):
        a, b = getattr(states[0], name), getattr(states[1], name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_close(name, a.double(), b.double(), tol if name in ("mean", "second", "reps") else 1e-6)


def test_default_statistics_dtype():
    """bf16 statistics for a bf16 cache on the Triton backend (the parallel op's scoring operands), fp32 otherwise;
    an explicit ``stats_dtype`` wins."""
    def sdt(dtype, backend, stats_dtype=None):
        return SPLADecodeState(1, 1, 64, dtype=dtype, backend=backend, stats_dtype=stats_dtype).mean.dtype
    assert sdt(torch.bfloat16, "triton") == torch.bfloat16
    assert sdt(torch.bfloat16, "torch") == torch.float32
    assert sdt(torch.float16, "triton") == torch.float32
    assert sdt(torch.float32, "triton") == torch.float32
    assert sdt(torch.bfloat16, "triton", torch.float32) == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,ratio,par_agree,lowp,stats_dtype", [
    (torch.float32, 5e-3, 0.9, 0, None), (torch.bfloat16, 2e-2, 0.5, 0, torch.float32),
    (torch.bfloat16, 2e-2, 0.5, 1, torch.float32), (torch.bfloat16, 2e-2, 0.75, 1, torch.bfloat16)])
def test_triton_decode_on_gpu(dtype, ratio, par_agree, lowp, stats_dtype, monkeypatch):
    """On CUDA at 8k context: the Triton step matches the torch step and spla_attn at the same positions
    (``lowp``: the attention kernel with 16-bit matrix-unit operands, ``LAUNCH["attn_lowp"]``; bf16 statistics:
    the scoring kernel takes bf16 q and statistics as dot operands, ``_lowp_scores``).

    With fp32 statistics both decode paths score in fp32 from the same statistics, so their selections must agree at almost
    every step. The parallel op scores bf16 inputs with bf16 dot operands (fp32 accumulation), which moves
    near-tied blocks: on an H100 the two comparisons together agreed at 115 of 140 bf16 steps, hence the
    looser bound for the parallel comparison in bf16. Outputs are compared wherever the selections agree.
    Statistics stored in bf16 are rounded by each path from its own fp32 sums, a few one ulp apart, so there the
    decode paths must agree at 3 of 4 steps (as on the CPU, ``test_triton_decode_many_tiles``).
    """
    from spla.ops.spla import decode_kernels as dk
    monkeypatch.setitem(dk.LAUNCH, "attn_lowp", lowp)
    B, HQ, H, D, P, n = 2, 32, 8, 128, 8192, 70
    xs = [x.cuda() for x in make_inputs(B, P + n, HQ, H, D, seed=1, dtype=dtype, requires_grad=False)]
    opts = dict(block_size=64, topk=16)
    states = [SPLADecodeState(B, H, D, **opts, dtype=dtype, device="cuda", backend=be, stats_dtype=stats_dtype)
              for be in ("torch", "triton")]
    for st in states:
        st.prefill(*(x[:, :P] for x in xs))
    full = spla_attn(*xs, **opts)  # the parallel op on the whole sequence
    agree = {"decode": 0, "parallel": 0}
    for t in range(P, P + n):
        ref, out = (st.step(*(x[:, t:t + 1] for x in xs)) for st in states)
        par = full._replace(**{f: getattr(full, f)[:, t:t + 1] for f in full._fields})
        for key, r in (("decode", ref), ("parallel", par)):
            same = (r.indices == out.indices).all(-1).all(-1)[:, 0]  # exact score ties may differ
            agree[key] += int(same.all())
            for name in OUTS:
                assert_close(name, getattr(r, name)[same].float(), getattr(out, name)[same].float(), ratio)
    print(f"agreement over {n} steps ({dtype}, lowp={lowp}, stats {stats_dtype}): {agree}")
    assert agree["decode"] >= (0.75 if stats_dtype is torch.bfloat16 else 0.9) * n, agree
    assert dk._lowp_scores(xs[0][:, 0], states[1].mean) == (stats_dtype is torch.bfloat16), "scoring operands"
    assert agree["parallel"] >= par_agree * n, agree


@pytest.mark.gpu
def test_gpu_decode_pdl_same_steps(monkeypatch):
    """Programmatic dependent launches (``LAUNCH["pdl"]``) change when the step's launches start, not what they
    compute: 40 bf16 steps at 4k context (a block completed on the way), eager and replayed from a CUDA graph,
    give bit for bit the outputs, selections and caches of plain launches."""
    from spla.ops.spla import decode_kernels as dk
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90 or later")
    B, HQ, H, D, P, n = 2, 32, 8, 128, 4090, 40
    xs = [x.cuda() for x in make_inputs(B, P + n, HQ, H, D, seed=3, dtype=torch.bfloat16, requires_grad=False)]
    runs = []
    for pdl in (0, 1):
        monkeypatch.setitem(dk.LAUNCH, "pdl", pdl)
        st = SPLADecodeState(B, H, D, block_size=64, topk=16, dtype=torch.bfloat16, device="cuda", capacity=P + n)
        st.prefill(*(x[:, :P] for x in xs))
        outs = [st.step(*(x[:, t:t + 1] for x in xs)) for t in range(P, P + n // 2)]
        # the rest replayed from one captured step (inputs copied into the graph's static buffers)
        static = [x[:, P + n // 2:P + n // 2 + 1].clone() for x in xs]
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture (compiles), then undo its token
            snap = {k: getattr(st, k).clone() for k in ("k", "v", "k_lin", "mean", "second", "reps", "S", "z",
                                                        "lengths")}
            st.step(*static)
            for k, x in snap.items():
                getattr(st, k).copy_(x)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            gout = st.step(*static)
        for t in range(P + n // 2, P + n):
            for s_, x in zip(static, xs):
                s_.copy_(x[:, t:t + 1])
            graph.replay()
            outs.append(type(gout)(*(y.clone() for y in gout)))
        torch.cuda.synchronize()
        runs.append((outs, {k: getattr(st, k).clone() for k in ("k", "v", "k_lin", "mean", "second", "reps", "S",
                                                                 "z", "lengths")}))
    (o0, c0), (o1, c1) = runs
    for i, (a, b) in enumerate(zip(o0, o1)):
        for name in OUTS + ("indices",):
            assert torch.equal(getattr(a, name), getattr(b, name)), f"step {i}: {name}"
    for k in c0:
        assert torch.equal(c0[k], c1[k]), k
