# -*- coding: utf-8 -*-
"""The Triton forward (``backend="triton"``) against the torch and naive backends.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (set in conftest.py), so the shapes stay small; the
``gpu`` tests run on the device machine (``pytest -m gpu tests/test_parallel.py``).
"""

import math

import pytest
import torch

from spla import spla_attn
from spla.ops.spla.chunk import SparseSelectedFunction, chunk_global_linear_attn, finish_residual
from spla.ops.spla.utils import feature_map
from tests.utils import assert_close, make_inputs, rel_err

OUTS = ("o_sparse", "o_rla", "rla_mass")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, T, HQ, H, D, Dv=None, lin=False, dtype=torch.float32, seed=0, requires_grad=False, device=DEVICE):
    return [x.detach().to(device).requires_grad_(requires_grad)
            for x in make_inputs(B, T, HQ, H, D, Dv=Dv, lin=lin, dtype=dtype, seed=seed, requires_grad=False)]


def _check(tri, ref, ratio, name=""):
    assert torch.equal(tri.indices, ref.indices), f"{name}: selected blocks differ"
    for n in OUTS:
        out = getattr(tri, n)
        assert out.dtype == getattr(ref, n).dtype and out.shape == getattr(ref, n).shape
        assert_close(f"{name}{n}", getattr(ref, n).float(), out.float(), ratio)


# one case per line: T (odd), HQ, H, D, Dv, feature map, rep_keys, selection, block, topk, sink, local
CASES = [
    (67, 3, 3, 64, 64, "softmax2", 1, "taylor2", 16, 3, 1, 1),
    (157, 3, 1, 64, 48, "elu1", 4, "taylor2", 32, 4, 1, 2),
    (139, 8, 1, 128, 128, "relu2", 0, "taylor2", 32, 3, 0, 1),
    (101, 16, 2, 64, 32, "softmax2", 1, "taylor1", 16, 4, 1, 2),
    (99, 4, 2, 128, 64, "softmax2", 4, "taylor1", 16, 6, 2, 1),
]


@pytest.mark.parametrize("T,HQ,H,D,Dv,fmap,rep,sel,bs,topk,sink,local", CASES,
                         ids=[f"T{c[0]}-HQ{c[1]}-H{c[2]}-D{c[3]}-Dv{c[4]}-{c[5]}-R{c[6]}-{c[7]}-bs{c[8]}-k{c[9]}"
                              for c in CASES])
def test_parallel_vs_torch(T, HQ, H, D, Dv, fmap, rep, sel, bs, topk, sink, local):
    torch.manual_seed(42)
    inputs = _inputs(1, T, HQ, H, D, Dv=Dv, seed=T + HQ)
    opts = dict(block_size=bs, topk=topk, sink_blocks=sink, local_blocks=local, feature_map=fmap, rep_keys=rep,
                selection=sel)
    tri = spla_attn(*inputs, backend="triton", **opts)
    ref = spla_attn(*inputs, backend="torch", **opts)
    _check(tri, ref, 2e-5)
    # the residual is not trivially zero in these cases: some tokens have unselected blocks
    assert (ref.rla_mass != 0).any()


@pytest.mark.parametrize("chunk,HQ,H,rep,sel,cu", [(32, 1, 1, 1, "taylor2", None),
                                                     pytest.param(64, 3, 1, 2, "taylor2", None, marks=pytest.mark.slow),
                                                     (32, 8, 1, 0, "taylor1", (0, 300, 301, 1000)),
                                                     (16, 3, 1, 1, "taylor2", (0, 500, 1000))])
def test_select_chunk_widths(chunk, HQ, H, rep, sel, cu, monkeypatch):
    """The selection kernel scoring ``chunk`` candidate blocks per loop step (``TOPK_CHUNK``; a top-k of the chunk,
    then one bitonic merge into the running top) selects the torch backend's blocks: 1000 tokens in blocks of 16
    (up to 60 candidates, several merges per token), G = 1, 3 and 8, packed sequences."""
    import spla.ops.spla.parallel as P
    from spla.ops.spla.chunk import chunk_spla_select
    monkeypatch.setattr(P, "TOPK_CHUNK", chunk)
    q, k = _inputs(1, 1000, HQ, H, 64, seed=chunk + HQ)[:2]
    opts = dict(block_size=16, topk=5, sink_blocks=1, local_blocks=1, selection=sel, cov="diag", rep_keys=rep,
                scale=64 ** -0.5)
    cu_t = None if cu is None else torch.tensor(cu, device=q.device)
    tile = P._topk_tile(16, HQ // H)
    meta = P._prepare_meta(cu or (0, 1000), 16, tile, q.device)
    stats = P.block_stats_fwd(k[0], meta, 16, rep, sel == "taylor2")
    got = P.select_fwd(q[0], stats, meta, H=H, block_size=16, tile=tile, topk=5,
                       sink_blocks=1, local_blocks=1, selection=sel, rep_keys=rep, scale=64 ** -0.5)
    ref = chunk_spla_select(q, k, cu_seqlens=cu_t, **opts)[0]
    assert torch.equal(got, ref)


def test_select_16bit_statistics(monkeypatch):
    """Block statistics stored in bf16 (``STATS_16BIT``): the stats kernel stores the fp32 statistics to within one
    bf16 step (the interpreter truncates where a GPU rounds to nearest: exact there, ``test_gpu_select_16bit_
    statistics``), and the selection kernel reads them as the fp32 copies of the same values. On the CPU the switch
    keeps fp32 (the interpreter scores in fp32)."""
    import spla.ops.spla.parallel as P
    q, k = _inputs(1, 260, 6, 2, 64, seed=31)[:2]
    q, k = q[0], k[0]
    tile = P._topk_tile(16, 3)
    meta = P._prepare_meta((0, 260), 16, tile, q.device)
    s32 = P.block_stats_fwd(k, meta, 16, 2, True)
    s16 = P.block_stats_fwd(k, meta, 16, 2, True, torch.bfloat16)
    for a, b in zip(s32, s16):
        assert b.dtype == torch.bfloat16
        assert ((a - b.float()).abs() <= a.abs() * 2 ** -7).all()
    opts = dict(H=2, block_size=16, tile=tile, topk=5, sink_blocks=1, local_blocks=1, selection="taylor2",
                rep_keys=2, scale=64 ** -0.5)
    got = P.select_fwd(q, s16, meta, **opts)
    ref = P.select_fwd(q, tuple(x.float() for x in s16), meta, **opts)
    assert torch.equal(got, ref)
    monkeypatch.setattr(P, "STATS_16BIT", True)
    assert P.selection_stats_dtype(q) == torch.float32  # CPU: fp32 (the interpreter computes in fp32)
    assert P.selection_stats_dtype(q.to(torch.bfloat16)) == torch.float32


@pytest.mark.parametrize("path", ["token", "kv-chunked", "kv-atomic", "union"])
def test_parallel_sparse_paths(path, monkeypatch):
    """Every sparse stage (token-major; KV-major with its partials split over several token chunks, its selected
    linear terms as fp32 partials summed by the merge, or with ``DETERMINISTIC`` off fp32 atomics; query-tile
    unions)."""
    import spla.ops.spla.parallel as P
    monkeypatch.setattr(P, "UNION_MIN_SHARE", 0.0)  # the union kernel runs wherever unions are small
    if path in ("token", "union"):
        monkeypatch.setattr(P, "SPARSE_PATH", path)
    else:
        monkeypatch.setattr(P, "SPARSE_PATH", "kv")
        monkeypatch.setattr(P, "DETERMINISTIC", path != "kv-atomic")
        # per token H * topk * G * (Dv * (4 + 4) + 4 + 4) bytes (fp32, deterministic): 40 tokens a chunk (atomic: 80)
        monkeypatch.setattr(P, "PARTIAL_BYTES", 40 * 1 * 4 * 3 * (48 * 8 + 8))
    inputs = _inputs(1, 113, 3, 1, 64, Dv=48, seed=23)
    opts = dict(block_size=16, topk=4, rep_keys=1, feature_map="relu2")
    tri = spla_attn(*inputs, backend="triton", **opts)
    ref = spla_attn(*inputs, backend="torch", **opts)
    _check(tri, ref, 2e-5, f"{path} ")


@pytest.mark.parametrize("T,HQ,H,D,Dv,cu,residual,grads,load", [
    # packed, odd lengths, an empty sequence, G = 3; unions of up to 3 blocks per 16-token tile take the union
    # kernel, the larger ones the token-major fallback (both occur: asserted)
    (130, 3, 1, 64, 64, (0, 29, 29, 100, 130), True, True, 3 / 64),
    (99, 8, 1, 128, 64, None, True, False, None),  # G = 8, D = 128, Dv != D
    (83, 2, 2, 64, 64, None, True, False, 0.0),  # G = 1 (64-token tiles), every tile token-major
    (77, 4, 2, 64, 64, None, False, False, None),  # topk_attn: no linear branch
])
def test_union_path(T, HQ, H, D, Dv, cu, residual, grads, load, monkeypatch):
    """The query-tile union stage (``SPARSE_PATH="union"``) against the torch backend: outputs and (through the
    saved log-sum-exp) the gradients of all five inputs; ``load``: its fallback threshold ``UNION_MAX_LOAD``."""
    import spla.ops.spla.parallel as P
    from spla import topk_attn
    monkeypatch.setattr(P, "SPARSE_PATH", "union")
    monkeypatch.setattr(P, "UNION_MIN_SHARE", 0.0)  # the union kernel runs wherever unions are small
    if load is not None:
        monkeypatch.setattr(P, "UNION_MAX_LOAD", load)
    inputs = _inputs(1, T, HQ, H, D, Dv=Dv, seed=T + HQ, requires_grad=grads)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int64, device=DEVICE)
    opts = dict(block_size=16, topk=4, rep_keys=1, cu_seqlens=cu_t)
    fn = spla_attn if residual else topk_attn
    tri = fn(*inputs, backend="triton", **opts)  # fresh buffers are poisoned (conftest): unwritten rows would show
    ref = fn(*inputs, backend="torch", **opts)
    _check(tri, ref, 2e-5, "union ")
    if load is not None and load > 0:  # the threshold splits the tiles: both kernels ran
        tile = P._topk_tile(16, HQ // H)
        meta = P._prepare_meta(tuple(cu) if cu else (0, T), 16, tile, DEVICE)
        ucount = P._tile_unions(ref.indices.reshape(T, H, 4), meta, tile)[1]
        work, fallback = P._union_split(ucount, meta, tile, load * tile * 4)
        assert work.numel() > 0 and fallback.numel() > 0
    if grads:
        w = [torch.randn_like(getattr(ref, n)) for n in OUTS]
        g_tri = torch.autograd.grad(sum((getattr(tri, n) * x).sum() for n, x in zip(OUTS, w)), inputs)
        g_ref = torch.autograd.grad(sum((getattr(ref, n) * x).sum() for n, x in zip(OUTS, w)), inputs)
        for name, a, b in zip(("q", "k", "v", "q_lin", "k_lin"), g_tri, g_ref):
            assert_close(f"d{name}", b, a, 1e-4)


def _stage_inputs(T, HQ, H, D, bs, topk, cu, seed=5):
    """The sparse stage's inputs from the Triton stages before it (packed `[T, ...]`): q, k, v, phi(q), phi(k),
    the global term and its mass, the selection, the index tables, the selection tile and (block_size, scale)."""
    import spla.ops.spla.parallel as P
    q, k, v = (x[0].contiguous() for x in _inputs(1, T, HQ, H, D, seed=seed))
    tile = P._topk_tile(bs, HQ // H)
    meta = P._prepare_meta(cu, bs, tile, DEVICE)
    scale = D ** -0.5
    idx = P.select_packed_fwd(q, k, meta, H=H, block_size=bs, tile=tile, topk=topk, sink_blocks=1, local_blocks=2,
                              selection="taylor2", rep_keys=1, scale=scale)
    fq, fk, glob, gm = P.linear_branch_fwd(q, k, v, meta, "softmax2", q.dtype)
    return q, k, v, fq, fk, glob, gm, idx, meta, tile, dict(block_size=bs, scale=scale)


@pytest.mark.parametrize("bk,tma", [(32, False), pytest.param(16, False, marks=pytest.mark.slow), (64, True)])
def test_token_stage_key_subtiles(bk, tma):
    """The token-major stage with blocks walked in sub-tiles of 32 or 16 keys (``bk``, a launch setting), or with
    its 64-key tiles loaded through tensor descriptors (``tma``, TMA bulk copies), gives the outputs and log-sum-exp
    of whole 64-key pointer-loaded blocks, G = 3: packed odd lengths, or for the bulk copies (which need every
    sequence length a multiple of the sub-tile) two sequences of 128 and 64 tokens."""
    import spla.ops.spla.parallel as P
    T, HQ = (192, 6) if tma else (203, 6)
    cu = (0, 128, 192) if tma else (0, 150, 203)
    qf, kf, vf, fq, fk, glob, gm, idx, meta, tile, sp = _stage_inputs(T, HQ, 2, 64, 64, 4, cu)
    assert P._key_loads(kf, vf, fk, bk, meta, tma)[3] == tma
    lse_ref, lse = torch.empty(T, HQ, device=DEVICE), torch.empty(T, HQ, device=DEVICE)
    ref = P.sparse_fwd(qf, kf, vf, fq, fk, glob, gm, idx, meta, lse=lse_ref, **sp)
    out = P.sparse_fwd(qf, kf, vf, fq, fk, glob, gm, idx, meta, lse=lse, bk=bk, tma=tma, **sp)
    for name, a, b in zip(OUTS + ("lse",), out + (lse,), ref + (lse_ref,)):
        assert_close(f"bk={bk} tma={tma} {name}", b, a, 1e-5)


@pytest.mark.parametrize("fallback,det", [("kv", True), ("kv", False), ("token", True)])
def test_union_fallback_paths(fallback, det, monkeypatch):
    """The union stage's per-token fallback on either path (KV-major: deterministic partials or atomics, over
    several partial chunks), packed odd lengths with an empty sequence, G = 3: the same o, o_rla, rla_mass and
    log-sum-exp as the token-major stage on every row (fresh buffers are poisoned: an unwritten row shows)."""
    import spla.ops.spla.parallel as P
    T, HQ, H, bs, topk = 130, 6, 2, 16, 4
    qf, kf, vf, fq, fk, glob, gm, idx, meta, tile, sp = _stage_inputs(T, HQ, H, 64, bs, topk, (0, 29, 29, 100, 130))
    ref_lse = torch.empty(T, HQ, device=DEVICE)
    ref = P.sparse_fwd(qf, kf, vf, fq, fk, glob, gm, idx, meta, lse=ref_lse, **sp)
    # partials for 11 tokens at a time (22 with atomics): the fallback's rows (tokens 77-99 here) span 3 (2) chunks
    monkeypatch.setattr(P, "PARTIAL_BYTES", 11 * H * topk * 3 * (64 * 4 + 4 + 4 * 64 + 4))
    monkeypatch.setattr(P, "UNION_MIN_SHARE", 0.0)  # the union kernel runs wherever unions are small
    load = 3 / 64  # unions of up to 3 blocks per 16-token tile take the union kernel
    ucount = P._tile_unions(idx, meta, tile)[1]
    work, fb = P._union_split(ucount, meta, tile, load * tile * topk)
    assert work.numel() > 0 and fb.numel() > 0
    lse = torch.empty(T, HQ, device=DEVICE)
    # the atomic KV-major path subtracts in place from the global term: give it a copy
    out = P.sparse_union_fwd(qf, kf, vf, fq, fk, glob.clone(), gm.clone(), idx, meta, tile=tile, lse=lse,
                             max_load=load, deterministic=det, fallback_path=fallback, **sp)
    for name, a, b in zip(OUTS + ("lse",), out + (lse,), ref + (ref_lse,)):
        assert_close(f"{fallback} {name}", b, a, 1e-5)


@pytest.mark.parametrize("utile,bk", [pytest.param(8, 64, marks=pytest.mark.slow), (4, 32), pytest.param(16, 16, marks=pytest.mark.slow),
                                       (2, 64)])
def test_union_tile_and_key_subtiles(utile, bk, monkeypatch):
    """The union stage over tiles other than the selection's 16 tokens (8 and 4, and 2, which is raised to the
    16-row minimum: 4 tokens x 4 padded heads for G = 3), with 64-, 32- and 16-key sub-tiles, gives the token-major
    stage's o, o_rla, rla_mass and lse on every row: packed odd lengths, G = 3, block 64, poisoned buffers. The
    tile comes from ``SPARSE_LAUNCH["union_tile"]``; one that is not a power of two is a ValueError."""
    import spla.ops.spla.parallel as P
    T, HQ = 203, 6
    qf, kf, vf, fq, fk, glob, gm, idx, meta, tile, sp = _stage_inputs(T, HQ, 2, 64, 64, 4, (0, 150, 203))
    assert tile == 16 and meta["tile"] == 16
    lse_ref, lse = torch.empty(T, HQ, device=DEVICE), torch.empty(T, HQ, device=DEVICE)
    ref = P.sparse_fwd(qf, kf, vf, fq, fk, glob, gm, idx, meta, lse=lse_ref, **sp)
    monkeypatch.setitem(P.SPARSE_LAUNCH, "union_tile", utile)
    out = P.sparse_union_fwd(qf, kf, vf, fq, fk, glob, gm, idx, meta, lse=lse, bk=bk, max_load=1.0, **sp)
    for name, a, b in zip(OUTS + ("lse",), out + (lse,), ref + (lse_ref,)):
        assert_close(f"tile={utile} bk={bk} {name}", b, a, 1e-5)
    with pytest.raises(ValueError, match="power of two"):
        P.sparse_union_fwd(qf, kf, vf, fq, fk, glob, gm, idx, meta, tile=12, **sp)


@pytest.mark.parametrize("bk,lin", [(32, True), (64, False)])
def test_union_tma_key_loads(bk, lin):
    """The union stage with its key sub-tiles loaded through tensor descriptors (``tma=True``, Hopper bulk copies;
    the interpreter emulates them) gives the token-major stage's o, o_rla, rla_mass and lse on every row: two
    packed sequences whose lengths are multiples of the sub-tile (the only case that takes bulk copies: a sub-tile
    never crosses into the next sequence), G = 3, 32- and 64-key sub-tiles, with and without the linear branch,
    poisoned buffers. Odd sequence lengths, and heads whose channels are not a power of two, keep pointer loads."""
    import spla.ops.spla.parallel as P
    T, HQ = 192, 6
    qf, kf, vf, fq, fk, glob, gm, idx, meta, tile, sp = _stage_inputs(T, HQ, 2, 64, 64, 4, (0, 128, 192))
    if not lin:
        fq, fk = qf, kf
    assert P._key_loads(kf, vf, fk, bk, meta, True)[3]
    lse_ref, lse = torch.empty(T, HQ, device=DEVICE), torch.empty(T, HQ, device=DEVICE)
    ref = P.sparse_fwd(qf, kf, vf, fq, fk, glob, gm, idx, meta, lse=lse_ref, lin=lin, **sp)
    for tma in (True, False):  # the TMA loads (the default) and the pointer loads
        lse = torch.full_like(lse, float("nan"))
        out = P.sparse_union_fwd(qf, kf, vf, fq, fk, glob, gm, idx, meta, lse=lse, bk=bk, max_load=1.0, lin=lin,
                                 tma=tma, **sp)
        for name, a, b in zip(OUTS + ("lse",), out + (lse,), ref + (lse_ref,)):
            assert_close(f"tma={tma} bk={bk} lin={lin} {name}", b, a, 1e-5)
    odd = P._prepare_meta((0, 150, 203), 64, tile, DEVICE)
    assert not P._key_loads(kf, vf, fk, bk, odd, True)[3]
    assert not P._key_loads(kf[..., :48].contiguous(), vf, fk, bk, meta, True)[3]
    assert not P._key_loads(kf, vf, fk, bk, meta, False)[3]


def test_union_split():
    """The fallback split: (tile, head) pairs with small unions, and every token (not past its sequence) of the
    others, per head."""
    import spla.ops.spla.parallel as P
    meta = P._prepare_meta((0, 5, 8), 16, 4, "cpu")  # tiles: [0, 4), [4, 5), [5, 8) (sequence 2 at token 5)
    ucount = torch.tensor([[3, 9], [1, 2], [8, 1]], dtype=torch.int32)  # [NQ=3, H=2]
    work, fb = P._union_split(ucount, meta, 4, 4.0)
    assert work.tolist() == [0, 2, 3, 5]  # tile * H + head
    assert fb.tolist() == [t * 2 + 1 for t in range(4)] + [t * 2 for t in (5, 6, 7)]  # token * H + head


@pytest.mark.parametrize("fallback", ["kv", "token"])
def test_union_min_share_runs_every_row_per_token(fallback, monkeypatch):
    """Where fewer than ``UNION_MIN_SHARE`` of the (tile, KV head) pairs have small unions, the union stage runs
    the per-token path on every row (``_union_split`` gives no work list): the token-major stage's outputs and lse
    on every row (poisoned buffers), packed odd lengths, G = 3."""
    import spla.ops.spla.parallel as P
    T, HQ, H, bs, topk = 130, 6, 2, 16, 4
    qf, kf, vf, fq, fk, glob, gm, idx, meta, tile, sp = _stage_inputs(T, HQ, H, 64, bs, topk, (0, 29, 29, 100, 130))
    ucount = P._tile_unions(idx, meta, tile)[1]
    load = 3 / 64
    share = (ucount <= load * tile * topk).float().mean().item()
    assert 0 < share < 1
    work, fb = P._union_split(ucount, meta, tile, load * tile * topk, min_share=share + 1e-3)
    assert work.numel() == 0 and fb is None
    work, fb = P._union_split(ucount, meta, tile, load * tile * topk, min_share=share - 1e-3)
    assert work.numel() > 0 and fb.numel() > 0
    ref_lse, lse = torch.empty(T, HQ, device=DEVICE), torch.empty(T, HQ, device=DEVICE)
    ref = P.sparse_fwd(qf, kf, vf, fq, fk, glob, gm, idx, meta, lse=ref_lse, **sp)
    monkeypatch.setattr(P, "UNION_MIN_SHARE", share + 1e-3)
    out = P.sparse_union_fwd(qf, kf, vf, fq, fk, glob.clone(), gm.clone(), idx, meta, tile=tile, lse=lse,
                             max_load=load, fallback_path=fallback, **sp)
    for name, a, b in zip(OUTS + ("lse",), out + (lse,), ref + (ref_lse,)):
        assert_close(f"{fallback} {name}", b, a, 1e-5)


def test_tile_unions():
    """The union lists: ascending, de-duplicated, -1 ignored, per tile and KV head, tiles within sequences."""
    import spla.ops.spla.parallel as P
    idx = torch.tensor([[[0, 1], [2, -1]], [[1, 3], [2, 2]], [[0, -1], [5, 4]]], dtype=torch.int32)  # [T=3, H=2, K=2]
    meta = P._prepare_meta((0, 2, 3), 16, 2, "cpu")  # sequences [0, 2) and [2, 3): tiles {0, 1} and {2}
    ul, n = P._tile_unions(idx, meta, 2)
    assert n.tolist() == [[3, 1], [1, 2]]
    assert ul[0, 0, :3].tolist() == [0, 1, 3] and ul[0, 1, :1].tolist() == [2]
    assert ul[1, 0, :1].tolist() == [0] and ul[1, 1, :2].tolist() == [4, 5]


def test_parallel_vs_naive_linear_inputs():
    """Separate q_lin / k_lin (Dl != D), batch of 2, against the dense ground truth."""
    inputs = _inputs(2, 61, 3, 1, 64, Dv=32, lin=True, seed=7)
    q, k, v, ql, kl = inputs
    ql, kl = ql[..., :48].contiguous(), kl[..., :48].contiguous()
    opts = dict(block_size=16, topk=3, rep_keys=2, feature_map="softmax2")
    tri = spla_attn(q, k, v, ql, kl, backend="triton", **opts)
    ref = spla_attn(q, k, v, ql, kl, backend="naive", **opts)
    _check(tri, ref, 2e-5)


def test_parallel_varlen():
    """Packed sequences: blocks restart at each sequence start; equal to the torch backend and to per-sequence runs."""
    inputs = _inputs(1, 130, 3, 1, 64, seed=3)
    cu = torch.tensor([0, 29, 29, 100, 130], dtype=torch.int64, device=DEVICE)
    opts = dict(block_size=16, topk=4, rep_keys=1)
    tri = spla_attn(*inputs, backend="triton", cu_seqlens=cu, **opts)
    ref = spla_attn(*inputs, backend="torch", cu_seqlens=cu, **opts)
    _check(tri, ref, 2e-5, "varlen ")
    a, b = 29, 100
    one = spla_attn(*(x[:, a:b] for x in inputs), backend="triton", **opts)
    assert torch.equal(one.indices, tri.indices[:, a:b])
    assert_close("segment o_sparse", tri.o_sparse[:, a:b], one.o_sparse, 1e-6)


def test_parallel_dense_limit():
    """T <= topk * block_size: every block selected, SPLA is causal attention and the residual is exactly 0."""
    q, k, v = _inputs(1, 75, 4, 1, 64, seed=5)
    out = spla_attn(q, k, v, backend="triton", block_size=16, topk=5)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(4, 2).transpose(1, 2), v.repeat_interleave(4, 2).transpose(1, 2),
        is_causal=True).transpose(1, 2)
    assert_close("o_sparse", ref, out.o_sparse, 2e-5)
    assert (out.o_rla == 0).all() and (out.rla_mass == 0).all()


@pytest.mark.parametrize("dtype,ratio", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_parallel_low_precision(dtype, ratio):
    """16-bit inputs: outputs in the input dtype, close to the fp32 torch backend run on the same indices."""
    q, k, v = _inputs(1, 97, 4, 1, 64, seed=11, dtype=dtype)
    opts = dict(block_size=16, topk=3)
    tri = spla_attn(q, k, v, backend="triton", **opts)
    assert tri.o_sparse.dtype == dtype and tri.o_rla.dtype == dtype and tri.rla_mass.dtype == torch.float32
    ref = _reference_on_indices(q.float(), k.float(), v.float(), tri.indices, opts["block_size"])
    for n in OUTS:
        assert_close(n, getattr(ref, n), getattr(tri, n).float(), ratio)
    # the selection matches the fp32 torch backend on the upcast inputs except at near-ties
    sel = spla_attn(q.float(), k.float(), v.float(), backend="torch", **opts).indices
    assert (sel == tri.indices).float().mean() > 0.97


def _reference_on_indices(q, k, v, indices, block_size, fmap="softmax2", cu_seqlens=None, q_lin=None, k_lin=None):
    """The torch backend's stages 2-4 on given indices (fp32)."""
    q_lin = q if q_lin is None else q_lin
    k_lin = k if k_lin is None else k_lin
    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        o, sl, sm = SparseSelectedFunction.apply(q, k, v, q_lin, k_lin, indices, block_size, scale, fmap, cu_seqlens)
        g, gm = chunk_global_linear_attn(feature_map(q_lin, fmap), feature_map(k_lin, fmap), v, cu_seqlens)
        return finish_residual(q, o, g, gm, sl, sm, indices, block_size, cu_seqlens)


def test_parallel_fallback_selection():
    """selection='oracle' and cov='full' take the torch indices; the other stages still run in Triton."""
    inputs = _inputs(1, 70, 4, 1, 64, seed=13)
    for opts in (dict(selection="oracle"), dict(cov="full", rep_keys=2)):
        tri = spla_attn(*inputs, backend="triton", block_size=16, topk=3, **opts)
        ref = spla_attn(*inputs, backend="torch", block_size=16, topk=3, **opts)
        _check(tri, ref, 2e-5, f"{opts} ")


def test_parallel_gradients():
    """Gradients through the (recompute) backward equal the torch backend's, to every input."""
    inputs = _inputs(1, 61, 6, 2, 64, Dv=32, lin=True, seed=17, requires_grad=True)
    opts = dict(block_size=16, topk=3, feature_map="elu1")
    tri = spla_attn(*inputs, backend="triton", **opts)
    ref = spla_attn(*inputs, backend="torch", **opts)
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(getattr(ref, n).shape, generator=g).to(DEVICE) for n in OUTS]
    gt = torch.autograd.grad(sum((getattr(tri, n) * w).sum() for n, w in zip(OUTS, ws)), inputs)
    gr = torch.autograd.grad(sum((getattr(ref, n) * w).sum() for n, w in zip(OUTS, ws)), inputs)
    for i, (a, b) in enumerate(zip(gt, gr)):
        assert_close(f"grad[{i}]", b, a, 1e-5)


def test_parallel_rejects_fp64():
    q, k, v = _inputs(1, 32, 2, 2, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match="fp64"):
        spla_attn(q, k, v, backend="triton", block_size=16, topk=3)


# ----------------------------------------------------------------------------------------------- GPU only

GPU_CASES = [(3, 3, 64, 64, "softmax2", 1, "taylor2"), (32, 8, 128, 64, "elu1", 0, "taylor1"),
             (64, 4, 128, 128, "relu2", 4, "taylor2")]


@pytest.mark.gpu
@pytest.mark.parametrize("HQ,H,D,Dv,fmap,rep,sel", GPU_CASES)
def test_gpu_vs_torch(HQ, H, D, Dv, fmap, rep, sel):
    """fp32 at T=2051 with blocks of 64 and top-16 (ieee dots): same indices up to near-ties, same outputs."""
    inputs = _inputs(1, 2051, HQ, H, D, Dv=Dv, seed=HQ + D)
    opts = dict(block_size=64, topk=16, feature_map=fmap, rep_keys=rep, selection=sel)
    tri = spla_attn(*inputs, backend="triton", **opts)
    ref = spla_attn(*inputs, backend="torch", **opts)
    agree = (tri.indices == ref.indices).all(-1).float().mean().item()
    assert agree > 0.999, f"token-head selections agreeing: {agree}"
    same = _reference_on_indices(*inputs, tri.indices, 64, fmap)
    for n in OUTS:
        assert_close(n, getattr(same, n), getattr(tri, n), 1e-4)


@pytest.mark.gpu
def test_gpu_varlen():
    inputs = _inputs(1, 5000, 16, 4, 128, seed=2)
    cu = torch.tensor([0, 1000, 1001, 3333, 5000], device=DEVICE)
    tri = spla_attn(*inputs, backend="triton", cu_seqlens=cu)
    ref = spla_attn(*inputs, backend="torch", cu_seqlens=cu)
    assert (tri.indices == ref.indices).all(-1).float().mean().item() > 0.999
    same = _reference_on_indices(*inputs, tri.indices, 64, cu_seqlens=cu)
    for n in OUTS:
        assert_close(n, getattr(same, n), getattr(tri, n), 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_gpu_long_low_precision(dtype):
    """bf16 at T=32k vs fp32 arithmetic on the same indices, and selection agreement with fp32."""
    q, k, v = _inputs(1, 32768, 32, 8, 128, seed=9, dtype=dtype)
    tri = spla_attn(q, k, v, backend="triton")
    assert not any(torch.isnan(getattr(tri, n)).any() for n in OUTS)
    ref = spla_attn(q.float(), k.float(), v.float(), backend="triton")
    agree = (tri.indices == ref.indices).float().mean().item()
    assert agree > 0.95, f"selected blocks agreeing with fp32: {agree}"
    # fp32 arithmetic on the low-precision run's own indices (the Triton stages in fp32, ieee dots; the fp32
    # Triton path itself is checked against the torch backend above)
    same = _triton_fp32_on_indices(q.float(), k.float(), v.float(), tri.indices, 64)
    for n, a in zip(OUTS, same):
        assert_close(n, a, getattr(tri, n).float(), 2e-2)


def _triton_fp32_on_indices(q, k, v, indices, block_size):
    from spla.ops.spla.parallel import _prepare_meta, linear_branch_fwd, sparse_fwd
    B, T, HQ, D = q.shape
    H = k.shape[2]
    meta = _prepare_meta(tuple(range(0, B * T + 1, T)), block_size, 16, q.device)
    qf, kf, vf = (x.reshape(B * T, *x.shape[2:]) for x in (q, k, v))
    fq, fk, g, gm = linear_branch_fwd(qf, kf, vf, meta, "softmax2", torch.float32)
    outs = sparse_fwd(qf, kf, vf, fq, fk, g, gm, indices.reshape(B * T, H, -1), meta, block_size=block_size,
                      scale=D ** -0.5)
    return [x.view(B, T, *x.shape[1:]) for x in outs]


@pytest.mark.gpu
def test_gpu_sparse_paths_agree(monkeypatch):
    """bf16 at T=8k, GQA 4: the token-major, KV-major and query-tile union sparse stages (also with TMA key loads)
    give the same outputs; the KV-major
    stage is deterministic (its selected linear terms are summed by the merge, not by atomics) and agrees with
    its atomic variant (``deterministic=False``)."""
    import spla.ops.spla.parallel as P
    q, k, v = _inputs(1, 8192, 32, 8, 128, seed=6, dtype=torch.bfloat16)
    monkeypatch.setattr(P, "SPARSE_PATH", "kv")
    kv = spla_attn(q, k, v, backend="triton")
    again = spla_attn(q, k, v, backend="triton")
    for n in OUTS:
        assert torch.equal(getattr(kv, n), getattr(again, n)), n
    monkeypatch.setattr(P, "DETERMINISTIC", False)
    atomic = spla_attn(q, k, v, backend="triton")
    for n in OUTS:
        assert_close(n, getattr(atomic, n).float(), getattr(kv, n).float(), 1e-2)
    monkeypatch.setattr(P, "SPARSE_PATH", "token")
    tok = spla_attn(q, k, v, backend="triton")
    monkeypatch.setattr(P, "SPARSE_PATH", "union")
    uni = spla_attn(q, k, v, backend="triton")  # random data: some tiles take the union kernel, some the fallback
    monkeypatch.setattr(P, "UNION_MAX_LOAD", 0.0)
    uni_fallback = spla_attn(q, k, v, backend="triton")  # every tile per token (KV-major for G = 4)
    monkeypatch.setattr(P, "UNION_MAX_LOAD", 1.0)
    uni_all = spla_attn(q, k, v, backend="triton")  # every tile through the union kernel
    monkeypatch.setitem(P.SPARSE_LAUNCH, "union_tma", True)
    uni_tma = spla_attn(q, k, v, backend="triton")  # the same, key sub-tiles as TMA bulk copies
    for other in (kv, uni, uni_fallback, uni_all, uni_tma):
        assert torch.equal(other.indices, tok.indices)
        for n in OUTS:
            assert_close(n, getattr(tok, n).float(), getattr(other, n).float(), 1e-2)


@pytest.mark.gpu
def test_gpu_select_16bit_statistics(monkeypatch):
    """bf16 at T=8k, GQA 4 and 16: bf16 statistics (``STATS_16BIT``) are the fp32 ones rounded to nearest, and the
    selection is the same bit for bit (the scoring kernel rounds fp32 statistics to bf16 on load)."""
    import spla.ops.spla.parallel as P
    for HQ, H in ((32, 8), (64, 4)):
        q, k, v = _inputs(1, 8192, HQ, H, 128, seed=8, dtype=torch.bfloat16)
        tile = P._topk_tile(64, HQ // H)
        meta = P._prepare_meta((0, 8192), 64, tile, q.device)
        s32 = P.block_stats_fwd(k[0], meta, 64, 1, True)
        s16 = P.block_stats_fwd(k[0], meta, 64, 1, True, torch.bfloat16)
        for a, b in zip(s32, s16):
            assert torch.equal(a.to(torch.bfloat16), b)
        monkeypatch.setattr(P, "STATS_16BIT", False)  # fp32 statistics
        assert P.selection_stats_dtype(q[0]) == torch.float32
        ref = spla_attn(q, k, v, backend="triton").indices
        monkeypatch.setattr(P, "STATS_16BIT", True)  # the default
        assert P.selection_stats_dtype(q[0]) == torch.bfloat16
        assert torch.equal(spla_attn(q, k, v, backend="triton").indices, ref)


@pytest.mark.gpu
def test_gpu_dense_limit_vs_sdpa():
    """T = topk * block_size in bf16: every block selected, equal to SDPA, zero residual."""
    q, k, v = _inputs(1, 1024, 32, 8, 128, seed=4, dtype=torch.bfloat16)
    out = spla_attn(q, k, v, backend="triton")
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(4, 2).transpose(1, 2), v.repeat_interleave(4, 2).transpose(1, 2),
        is_causal=True).transpose(1, 2)
    assert_close("o_sparse", ref.float(), out.o_sparse.float(), 1e-2)
    assert (out.o_rla == 0).all() and (out.rla_mass == 0).all()
    assert math.isfinite(rel_err(out.o_sparse, ref))


@pytest.mark.parametrize("HQ,H", [(4, 4), (6, 2), (8, 1)])
def test_dense_path_matches_naive(HQ, H):
    """The dense fast path's pieces (CUDA-only as a path, plain torch as functions): SDPA on expanded K/V equals
    the naive backend with every block selected, forward and gradients (fp64); indices, zero residual."""
    from spla.ops.spla.naive import naive_spla_attn
    from spla.ops.spla.parallel import dense_fwd, dense_sdpa
    T, bs, topk = 77, 16, 5   # 5 blocks of 16 cover 77 tokens: every block selected
    q, k, v = make_inputs(2, T, HQ, H, 32)
    scale = 32 ** -0.5
    ref = naive_spla_attn(q, k, v, block_size=bs, topk=topk, scale=scale)
    o, o_rla, rla_mass, idx = dense_fwd(q, k, v, block_size=bs, topk=topk, scale=scale)
    assert rel_err(o, ref.o_sparse) < 1e-12
    assert (o_rla == 0).all() and (rla_mass == 0).all() and o_rla.shape == ref.o_rla.shape
    assert idx.dtype == torch.int32 and idx.shape == (2, T, H, topk) and idx.is_contiguous()
    want = [sorted(int(b) for b in row if b >= 0) for row in ref.indices.reshape(-1, topk)]
    got = [sorted(int(b) for b in row if b >= 0) for row in idx.reshape(-1, topk)]
    assert got == want
    assert dense_fwd(q, k, v, block_size=bs, topk=topk, scale=scale)[3].data_ptr() != idx.data_ptr()  # own copy
    do = torch.randn_like(o)
    g_ref = torch.autograd.grad(ref.o_sparse, (q, k, v), do)
    g = torch.autograd.grad(dense_sdpa(q, k, v, scale), (q, k, v), do)
    for name, a, b in zip("qkv", g, g_ref):
        assert rel_err(a, b) < 1e-12, name
