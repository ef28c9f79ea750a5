# -*- coding: utf-8 -*-
"""The peer baselines the benchmarks time beside SPLA compute what they claim (CPU, eager, small shapes)."""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.peers import flex_attention_fn, flex_block_mask, flex_block_sparse
from tests.utils import rel_err


def test_flex_block_mask_has_spla_budget_and_matches_masked_sdpa():
    """8 blocks of 128 per 128-query block (own + sink + previous + random earlier), i.e. the 1024 tokens of
    SPLA's top-16 x 64; FlexAttention under it equals SDPA with the same mask written densely."""
    T, blk = 1280, 128
    mask = flex_block_mask(T, blk, kv_blocks=8)
    dense = mask.to_dense()[0, 0].bool()  # [NQ, NKV] blocks each query block reads
    nq = T // blk
    for i in range(nq):
        row = dense[i].nonzero().flatten().tolist()
        assert row[-1] == i and all(j <= i for j in row)
        assert len(row) == min(i + 1, 8)
        if i >= 1:
            assert 0 in row and i - 1 in row
    torch.manual_seed(0)
    q, k, v = torch.randn(1, T, 8, 32), torch.randn(1, T, 2, 32), torch.randn(1, T, 2, 32)
    out = flex_block_sparse(flex_attention_fn(compile=False), q, k, v, mask)
    tok = dense.repeat_interleave(blk, 0).repeat_interleave(blk, 1) & torch.ones(T, T, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(4, 2).transpose(1, 2),
                                         v.repeat_interleave(4, 2).transpose(1, 2), attn_mask=tok).transpose(1, 2)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("T,kv_blocks", [(1000, 8), (1024, 2)])
def test_flex_block_mask_rejects_bad_arguments(T, kv_blocks):
    with pytest.raises(ValueError):
        flex_block_mask(T, 128, kv_blocks)


@pytest.mark.slow
@pytest.mark.no_poison
def test_flex_block_sparse_compiled_matches_eager():
    """The compiled kernel (what the GPU benchmarks time) skips blocks by the block lists: same output."""
    T = 1280
    mask = flex_block_mask(T, 128, kv_blocks=8)
    torch.manual_seed(1)
    q, k, v = torch.randn(1, T, 4, 32), torch.randn(1, T, 2, 32), torch.randn(1, T, 2, 32)
    ref = flex_block_sparse(flex_attention_fn(compile=False), q, k, v, mask)
    out = flex_block_sparse(flex_attention_fn(compile=True), q, k, v, mask)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.no_poison
def test_flex_block_sparse_backward_reaches_inputs():
    """The forward+backward benchmark differentiates the compiled Flex baseline (no CPU backward in torch):
    gradients reach q, k and v and match those of SDPA under the same mask written densely."""
    T = 1280
    mask = flex_block_mask(T, 128, kv_blocks=8, device="cuda")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, T, h, 64, device="cuda", requires_grad=True) for h in (8, 2, 2))
    out = flex_block_sparse(flex_attention_fn(), q, k, v, mask)
    grads = torch.autograd.grad(out.square().sum(), [q, k, v])
    blocks = mask.to_dense()[0, 0].bool()
    tok = blocks.repeat_interleave(128, 0).repeat_interleave(128, 1) & torch.ones(T, T, dtype=torch.bool,
                                                                                  device="cuda").tril()
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(4, 2).transpose(1, 2),
                                         v.repeat_interleave(4, 2).transpose(1, 2), attn_mask=tok).transpose(1, 2)
    refs = torch.autograd.grad(ref.square().sum(), [q, k, v])
    for g, r in zip(grads, refs):
        assert rel_err(g, r) < 1e-2


def test_gpu_suite_script_parses_and_covers_its_usage():
    """benchmarks/run_gpu_suite.sh: valid bash, and every step its usage line names has a case branch."""
    import os
    import re
    import subprocess
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "run_gpu_suite.sh")
    subprocess.run(["bash", "-n", path], check=True)
    text = open(path).read()
    usage = re.search(r"run_gpu_suite\.sh \[([a-z|-]+)\]", text).group(1).split("|")
    branches = set(re.findall(r"^\s+([a-z|-]+)\)", text, flags=re.M))
    named = {w for b in branches for w in b.split("|")}
    assert set(usage) <= named, set(usage) - named


def test_locality_union_sizes_count_each_tile_once():
    """bench_locality's union count: tiles of n consecutive tokens past the dense regime, -1 padding ignored, a
    block shared by the tile's tokens counted once."""
    from benchmarks.bench_locality import BS, TOPK, union_sizes
    T, H = (TOPK + 4) * BS, 2
    first = TOPK * BS
    idx = torch.full((T, H, TOPK), -1, dtype=torch.int32)
    t = torch.arange(T)
    idx[:, 0, 0] = 0  # head 0: every token block 0, and its own block
    idx[:, 0, 1] = (t // BS).int()
    idx[:, 1, :3] = torch.stack([t % 5, t % 5 + 5, torch.full_like(t, 11)], 1).int()  # head 1: 5-periodic pairs
    u = union_sizes(idx, [1, 4, 64])
    assert u[1].shape == (T - first, H) and (u[1][:, 0] == 2).all() and (u[1][:, 1] == 3).all()
    assert u[4].shape == ((T - first) // 4, H)
    assert (u[4][:, 0] == 2).all()  # a 4-token tile never crosses a block here: block 0 + its own block
    assert (u[4][:, 1] == 9).all()  # 4 consecutive residues mod 5, twice, and block 11
    assert (u[64][:, 0] == 2).all() and (u[64][:, 1] == 11).all()
    with pytest.raises(ValueError, match="no tile"):
        union_sizes(idx[:first + 10], [64])


def test_ar1_inputs_follow_the_recurrence():
    """benchmarks/inputs.py: the chunked AR(1) equals the step-by-step recurrence across chunk boundaries, keeps
    unit variance and lag-1 correlation rho; attention_inputs gives the shapes and rejects unknown data."""
    from benchmarks.inputs import ar1, attention_inputs
    g = torch.Generator().manual_seed(0)
    e = torch.randn(300, 2, 3, generator=g, dtype=torch.float64)
    rho, a = 0.9, (1 - 0.9 ** 2) ** 0.5
    ref = torch.empty_like(e)
    ref[0] = e[0]
    for t in range(1, 300):
        ref[t] = rho * ref[t - 1] + a * e[t]
    assert rel_err(ar1(e, rho, chunk=64).double(), ref) < 1e-6
    x = ar1(torch.randn(100000, 8, generator=g), 0.985)
    assert (x.var(0) - 1).abs().max() < 0.15
    assert ((x[1:] * x[:-1]).mean(0) / x.var(0) - 0.985).abs().max() < 0.01
    q, k, v = attention_inputs(2, 100, 4, 2, 32, data="local", device="cpu", dtype=torch.float32)
    assert q.shape == (2, 100, 4, 32) and k.shape == v.shape == (2, 100, 2, 32) and q.is_contiguous()
    with pytest.raises(ValueError, match="data"):
        attention_inputs(1, 8, 1, 1, 8, data="zeros", device="cpu")
    with pytest.raises(ValueError, match="rho"):
        ar1(e, 1.0)


def test_local_inputs_select_locally():
    """The forward benchmark's ``--data local`` queries make adjacent tokens share their selection: 16-token tiles
    select far fewer distinct blocks than on random data (SmolLM2 at 8k: 25.5 against 65.6, docs/benchmarks.md)."""
    from benchmarks.bench_locality import OPTS, union_sizes
    from benchmarks.inputs import attention_inputs
    from spla.ops.spla.chunk import chunk_spla_select
    u = {}
    for data in ("random", "local"):
        q, k, _ = attention_inputs(1, 4096, 4, 2, 64, data=data, device="cpu", dtype=torch.float32)
        idx = chunk_spla_select(q, k, scale=64 ** -0.5, **OPTS)[0]
        u[data] = union_sizes(idx, [16])[16].mean().item()
    assert u["local"] < 30 < 36 < u["random"], u


def test_kernels_compile_for_hopper_without_spilling_much():
    """benchmarks/kernel_resources.py: every kernel of the forward, the backward and a decode step (GQA 4 and 16,
    D = 128, bf16, default launch settings) compiles for sm_90a with Triton's own compiler and ptxas on this CPU, which
    the interpreter the other CPU tests use never does; no default spills more than 128 bytes per thread (the
    spills of the settings that measured slow on the GPU ran to 600-1900 bytes, docs/benchmarks.md) and every
    one fits in an SM's shared memory."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {n: x for n, x in os.environ.items() if n != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "kernel_resources.py"), "--heads", "32,8",
                          "64,4", "--no-sweep"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [r.split("|")[1:-1] for r in run.stdout.splitlines() if r.startswith(("| 32/8", "| 64/4"))]
    cols = [c.strip() for c in next(r for r in run.stdout.splitlines() if r.startswith("| label")).split("|")[1:-1]]
    recs = [dict(zip(cols, (x.strip() for x in r))) for r in rows]
    kernels = {r["kernel"] for r in recs}
    for name in ("spla_fwd_kernel_stats", "spla_fwd_kernel_topk", "spla_fwd_kernel_sparse", "spla_fwd_kernel_sparse_kv",
                 "spla_fwd_kernel_merge", "spla_fwd_kernel_sparse_union", "spla_fwd_kernel_linear",
                 "spla_bwd_kernel_sparse", "spla_bwd_kernel_sparse_kv", "spla_bwd_kernel_sparse_union",
                 "spla_bwd_kernel_linear_dq", "spla_decode_fwd_kernel_score", "spla_decode_fwd_kernel_attn",
                 "spla_decode_fwd_kernel_combine"):
        assert name in kernels, name
    defaults = [r for r in recs if r["default"] == "yes"]
    assert {"spla_fwd_kernel_sparse_union", "spla_bwd_kernel_sparse_kv", "spla_decode_fwd_kernel_score"} <= {
        r["kernel"] for r in defaults}
    for r in defaults:
        assert int(r["spill_st"]) <= 128 and int(r["ctas_smem"]) >= 1, r


def test_forward_flop_count_runs_and_counts_the_selection(monkeypatch):
    """bench_forward.count (the FLOPs and floor every forward table reports) runs off the GPU and counts the
    sparse FLOPs from the selection actually made: every visible selected key, for each query head of the group."""
    import os
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..", "benchmarks"))  # as the script runs
    from benchmarks.bench_forward import BS, TOPK, count
    T, HQ, H, D = 3 * BS + 5, 4, 2, 32
    idx = torch.full((1, T, H, TOPK), -1, dtype=torch.int32)
    t = torch.arange(T)
    idx[0, :, :, 0] = (t // BS).int()[:, None]  # each token selects its own block only
    cnt = count(T, HQ, H, D, D, 2 * D, idx)
    own = int(((t % BS) + 1).sum())  # causal keys of the own block
    assert cnt["sparse_attn"] == own * (HQ // H) * H * (2 * D + 2 * D)
    assert cnt["glob"] > 0 and cnt["bytes"] > 0 and cnt["select"] >= 0
