# -*- coding: utf-8 -*-
"""SPLAConfig validation and the SPLAAttention layer (SPEC §6) against the operator."""

import pytest
import torch

from spla import spla_attn
from spla.layers import SPLAAttention, SPLAConfig
from spla.layers.spla import apply_rope, cu_seqlens_from_position_ids, key_padding
from tests.utils import rel_err


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("field,value", [
    ("block_size", 0), ("block_size", 2.0), ("topk", 0), ("topk", 2), ("sink_blocks", -1), ("local_blocks", 0),
    ("selection", "taylor3"), ("cov", "low_rank"), ("rep_keys", 5), ("rep_keys", -1), ("feature_map", "exp"),
    ("backend", "cuda"), ("merge", "gate"), ("rla_norm", "layernorm"), ("norm_eps", 0.0), ("impl", "flash"),
])
def test_config_rejects_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        SPLAConfig(**{field: value})


def test_config_rep_keys_not_above_block_size():
    with pytest.raises(ValueError, match="rep_keys"):
        SPLAConfig(block_size=2, topk=4, rep_keys=3)


def test_config_dict_round_trip_and_unknown_fields():
    cfg = SPLAConfig(block_size=32, topk=6, selection="taylor1", rep_keys=0, merge="rattention", rla_norm="mass")
    assert SPLAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="no field"):
        SPLAConfig.from_dict({"block_size": 32, "top_k": 4})
    with pytest.raises(ValueError, match="no field"):
        cfg.replace(blocksize=3)
    with pytest.raises(ValueError, match="topk"):
        cfg.replace(topk=1)


# ---------------------------------------------------------------------------------------------- helpers
def _layer(cfg, seed=0, hidden=48, heads=6, kv_heads=2, head_dim=8, qk_norm=False, w_rla=None):
    torch.manual_seed(seed)
    layer = SPLAAttention(hidden, heads, kv_heads, head_dim, cfg, layer_idx=0, qk_norm=qk_norm).double()
    if w_rla is not None:
        with torch.no_grad():
            layer.rla_norm.weight.normal_(0, w_rla)
    return layer


def _rope(layer, B, T):
    return layer._rope(T, 0, None, torch.device("cpu"), torch.float64)


def _reference(layer, x, cfg, backend="naive"):
    """o_proj(merge(spla_attn)) computed by hand from the layer's own weights (naive op by default)."""
    B, T, _ = x.shape
    HQ, H, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = layer.q_proj(x).view(B, T, HQ, D)
    k = layer.k_proj(x).view(B, T, H, D)
    v = layer.v_proj(x).view(B, T, H, D)
    if layer.q_norm is not None:
        q, k = layer.q_norm(q).to(q.dtype), layer.k_norm(k).to(k.dtype)
    cos, sin = _rope(layer, B, T)
    out = spla_attn(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, q, k, scale=layer.scaling,
                    **cfg.replace(backend=backend).op_kwargs())
    return out, layer.o_proj(layer.merge(out.o_sparse, out.o_rla, out.rla_mass).to(x.dtype).reshape(B, T, -1))


# ---------------------------------------------------------------------------------------------- layer
@pytest.mark.parametrize("merge,rla_norm", [("residual", "rmsnorm"), ("rattention", "rmsnorm"), ("residual", "mass")])
@pytest.mark.parametrize("selection,rep_keys", [("taylor2", 1), ("taylor1", 0), ("oracle", 0), ("taylor2", 2)])
def test_layer_matches_naive_op(merge, rla_norm, selection, rep_keys):
    cfg = SPLAConfig(block_size=8, topk=4, selection=selection, rep_keys=rep_keys, merge=merge, rla_norm=rla_norm)
    layer = _layer(cfg, w_rla=0.5 if merge == "residual" else None)
    x = torch.randn(2, 77, 48, dtype=torch.float64)
    # the dense-mask naive reference for one combination (slow), the op's torch backend for the others
    naive = (merge, rla_norm, selection, rep_keys) == ("residual", "rmsnorm", "taylor2", 1)
    _, ref = _reference(layer, x, cfg, backend="naive" if naive else "torch")
    for impl in ("blocks", "op"):
        layer.set_config(cfg.replace(impl=impl))
        out, _ = layer(x)
        assert rel_err(out, ref) < 1e-12, impl


def test_fresh_residual_merge_is_exactly_topk_sparse_attention():
    cfg = SPLAConfig(block_size=8, topk=3, sink_blocks=1, local_blocks=1)
    layer = _layer(cfg, qk_norm=True)
    assert torch.count_nonzero(layer.rla_norm.weight) == 0
    x = torch.randn(1, 90, 48, dtype=torch.float64)
    naive, _ = _reference(layer, x, cfg)
    assert naive.o_rla.abs().sum() > 0  # there is a residual, the fresh merge ignores it
    expect = layer.o_proj(naive.o_sparse.reshape(1, 90, -1))
    for impl in ("blocks", "op"):
        layer.set_config(cfg.replace(impl=impl))
        out, _ = layer(x)
        assert rel_err(out, expect) < 1e-12, impl


def test_decode_rows_match_full_sequence():
    """Rows after a prefix (the decoding path) get exactly the outputs of the full-sequence call."""
    cfg = SPLAConfig(block_size=8, topk=4, rep_keys=1)
    layer = _layer(cfg, w_rla=0.3)
    g = torch.Generator().manual_seed(1)
    L, HQ, H, D = 70, 6, 2, 8
    q, ql = torch.randn(L, HQ, D, generator=g, dtype=torch.float64), torch.randn(L, HQ, D, generator=g, dtype=torch.float64)
    k, kl = torch.randn(L, H, D, generator=g, dtype=torch.float64), torch.randn(L, H, D, generator=g, dtype=torch.float64)
    v = torch.randn(L, H, D, generator=g, dtype=torch.float64)
    full = spla_attn(q[None], k[None], v[None], ql[None], kl[None], scale=layer.scaling,
                     **cfg.replace(backend="naive").op_kwargs())
    for n in (1, 5, 17):
        idx = layer.select_rows(q[L - n:], k)
        assert torch.equal(idx, full.indices[0, L - n:])
        o, r, m = layer.blocks_attend(q[L - n:], k, v, ql[L - n:], kl)
        assert rel_err(o, full.o_sparse[0, L - n:]) < 1e-12
        assert rel_err(r, full.o_rla[0, L - n:]) < 1e-12
        assert rel_err(m, full.rla_mass[0, L - n:]) < 1e-12


def test_padding_and_packing_match_separate_sequences():
    cfg = SPLAConfig(block_size=8, topk=4)
    layer = _layer(cfg, w_rla=0.5)
    lens = (37, 60)
    xs = [torch.randn(1, n, 48, dtype=torch.float64) for n in lens]
    refs = [layer(x)[0] for x in xs]
    # left padding with a 2-D mask; RoPE positions count real tokens only
    T = max(lens)
    x = torch.zeros(2, T, 48, dtype=torch.float64)
    mask = torch.zeros(2, T, dtype=torch.long)
    pos = torch.zeros(2, T, dtype=torch.long)
    for b, n in enumerate(lens):
        x[b, T - n:] = xs[b][0]
        mask[b, T - n:] = 1
        pos[b, T - n:] = torch.arange(n)
    cos, sin = layer._rope(T, 0, pos, torch.device("cpu"), torch.float64)
    for impl in ("blocks", "op"):
        layer.set_config(cfg.replace(impl=impl))
        out, _ = layer(x, position_embeddings=(cos, sin), attention_mask=mask)
        for b, n in enumerate(lens):
            assert rel_err(out[b, T - n:], refs[b][0]) < 1e-12, impl
    # packed batch: B == 1, positions restart, cu_seqlens derived from position_ids
    xp = torch.cat(xs, 1)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    assert cu_seqlens_from_position_ids(pos).tolist() == [0, 37, 97]
    cos, sin = layer._rope(sum(lens), 0, pos, torch.device("cpu"), torch.float64)
    for impl in ("blocks", "op"):
        layer.set_config(cfg.replace(impl=impl))
        out, _ = layer(xp, position_embeddings=(cos, sin), position_ids=pos)
        assert rel_err(out[0, :37], refs[0][0]) < 1e-12 and rel_err(out[0, 37:], refs[1][0]) < 1e-12, impl


def test_key_padding_reads_hf_masks():
    valid = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    m4 = causal[None, None] & valid[:, None, None, :]
    assert torch.equal(key_padding(m4, 2, 5), valid)
    additive = torch.where(m4, 0.0, torch.finfo(torch.float32).min)
    assert torch.equal(key_padding(additive, 2, 5), valid)
    assert torch.equal(key_padding(valid.long(), 2, 5), valid)
    assert key_padding(None, 2, 5) is None and key_padding(torch.ones(2, 5), 2, 5) is None
    with pytest.raises(ValueError, match="attention_mask"):
        key_padding(torch.ones(2, 5, 5), 2, 5)


def test_gradients_reach_projections_and_merge_weights():
    cfg = SPLAConfig(block_size=8, topk=3, local_blocks=1, impl="blocks")
    layer = _layer(cfg)
    layer.float()
    x = torch.randn(1, 50, 48, requires_grad=True)
    out, _ = layer(x)
    out.square().sum().backward()
    assert layer.rla_norm.weight.grad is not None and layer.rla_norm.weight.grad.abs().sum() > 0
    assert layer.q_proj.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", ["op", "blocks"])
def test_layer_under_bf16_autocast(impl):
    """Training under bf16 autocast: the projections give bf16 while HF's rotary cos/sin stay fp32; the layer
    must hand the op one dtype (a GPU training run with `spla train` failed here) and stay close to fp32."""
    torch.manual_seed(0)
    cfg = SPLAConfig(block_size=32, topk=3, merge="rattention", impl=impl)
    layer = SPLAAttention(64, 4, 2, 32, config=cfg)
    x = torch.randn(1, 100, 64)
    pos = torch.arange(100)[None]
    cos, sin = layer._rope(100, 0, pos, x.device, torch.float32)
    ref = layer(x, (cos, sin))[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, (cos, sin))[0]
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert rel_err(out.float(), ref) < 3e-2
