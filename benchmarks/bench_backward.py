# -*- coding: utf-8 -*-
"""Forward+backward benchmark of SPLA's Triton backend beside torch SDPA (flash) and fla's ``parallel_nsa``.

    python benchmarks/bench_backward.py [--full] [--T ...] [--heads 32,8 64,4] [--model-step] [--out DIR]

B=1, bf16, D=Dv=128, block 64, top-16 (sink 1, local 2, taylor2 diag, 1 representative key, softmax2,
``q_lin=q``, ``k_lin=k``), N(0,1) inputs (``--data local``: AR(1) queries with a real model's selection locality,
``benchmarks/inputs.py``). One "fwd+bwd" = the op's forward, then the gradients of q, k, v
(and for SPLA of both outputs o_sparse and o_rla) with ``torch.autograd.grad``; CUDA-event medians after warm-up.
Columns: SPLA forward alone, forward+backward with the deterministic (KV-block-major) and the atomic
key-gradient pass, ``spla_fwdbwd_union_ms`` the deterministic one with ``SPARSE_PATH="union"`` (forward and the
backward's query-side pass per query tile over the tile's union of selected blocks; ``spla_fwdbwd_union_w4_ms``
the same with the backward's union kernel at 4 warps / 2 stages, ``spla_fwdbwd_union_half_ms`` with union tiles of
half the selection's tile in both directions, ``spla_fwdbwd_union_bk32_ms`` / ``_bk32_w4_ms`` with the backward's
union kernel at 32-key sub-tiles (8 / 4 warps), ``spla_fwdbwd_qtoken_ms`` the defaults with the backward's query side
token-major; ``bwd_<stage>_ms`` the deterministic backward's
stages, timed inside one backward call with CUDA events (``parallel_spla_bwd``'s ``stage`` hook);
``spla_fwdbwd_kvb64_ms`` the default with the key-gradient pass's linear part at 64 rows per step, its setting
before 2026-12-05), the top-k branch alone (``spla.topk_attn``'s path, no linear branch, deterministic), SDPA
causal (flash backend, K/V expanded to the query heads outside the timing), fla ``parallel_nsa`` (G >= 16 only:
HQ=64/H=4), FlexAttention (compiled, causal block-sparse mask of the same token budget given in advance: 8
blocks of 128 per 128-query block, ``benchmarks/peers.py``), speedups, and the peak memory of one
forward+backward (SPLA and SDPA, 64k and 128k, HQ=32/H=8) above the inputs.
``--model-step``: one training step (forward, backward, AdamW) of an 8-layer Llama-style model (d_model 1024,
16 query / 4 KV heads of 64, SwiGLU 2816, vocab 32000, bf16 weights) at T=64k, SPLA attention
(``spla.layers.SPLAAttention``, merge="residual") vs the same model with SDPA; tokens/s, OOM reported.
Default: a reduced grid that fits in ~4 minutes on one H100 (``--full`` for T = 4k..128k x both head configs);
a time budget (``--budget`` seconds) skips what is left once spent. Writes ``bench_backward.csv`` / ``.md`` to
``--out`` (default ``$OUT`` or the current directory) and nothing else.
fla: imported as installed (e.g. ``pip install --target /tmp/site .whl/fla_core-0.6.0-py3-none-any.whl`` and
``PYTHONPATH=/tmp/site``); if that fails, the wheels in ``.whl`` are unpacked into a temporary directory under the
current directory that is removed at exit.
"""

from __future__ import annotations

import argparse
import atexit
import csv
import glob
import os
import shutil
import sys
import tempfile
import time
import traceback
import zipfile

BS, TOPK, SINK, LOCAL, R = 64, 16, 1, 2, 1
START = time.time()


def import_fla():
    try:
        from fla.ops.nsa import parallel_nsa
        return parallel_nsa
    except Exception:
        pass
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".whl")
    wheels = sorted(glob.glob(os.path.join(root, "*.whl")))
    if not wheels:
        print("# fla not importable and no wheels in .whl: NSA skipped", flush=True)
        return None
    tmp = tempfile.mkdtemp(prefix=".bench_fla_site_", dir=os.getcwd())
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            z.extractall(tmp)
    sys.path.insert(0, tmp)
    try:
        from fla.ops.nsa import parallel_nsa
        return parallel_nsa
    except Exception:
        traceback.print_exc()
        print("# fla import failed: NSA skipped", flush=True)
        return None


def timeit(fn, budget_s=1.0, warmup=2, max_iters=20):
    """Median ms of ``fn`` over CUDA events, as many runs as fit in ``budget_s`` (at least 3)."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.time()
    fn()
    torch.cuda.synchronize()
    est = time.time() - t0
    n = int(max(3, min(max_iters, budget_s / max(est, 1e-4))))
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def peak_mem(fn):
    """Peak GiB allocated by one call of ``fn`` above what was allocated before it."""
    import torch
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 30


def make(T, HQ, H, D, seed=0, device="cuda", data="random"):
    from inputs import attention_inputs
    return tuple(x.requires_grad_() for x in attention_inputs(1, T, HQ, H, D, data=data, device=device, seed=seed))


def spla_opts(D):
    """The options of ``parallel_spla_attn`` / ``parallel_spla_fwd`` this benchmark runs SPLA with."""
    return dict(block_size=BS, topk=TOPK, sink_blocks=SINK, local_blocks=LOCAL, selection="taylor2", cov="diag",
                rep_keys=R, feature_map_name="softmax2", scale=D ** -0.5, cu_seqlens=None)


BWD_STAGES = ("features", "linear", "query", "keys", "features_bwd")


def bwd_stage_ms(q, k, v, reps=5):
    """Median ms of each stage of SPLA's backward (deterministic; ``parallel_spla_bwd``'s ``stage`` hook, CUDA
    events around each stage inside one backward call) after one forward: {"bwd_<stage>_ms": ms}."""
    import contextlib
    import torch
    from spla.ops.spla import parallel as P
    opts = spla_opts(q.shape[-1])
    with torch.no_grad():
        o, o_rla, mass, idx, lse = P.parallel_spla_fwd(q, k, v, q, k, save_lse=True, **opts)
    ws = [torch.randn_like(x) for x in (o, o_rla, mass)]
    times = {n: [] for n in BWD_STAGES}
    pending = []

    @contextlib.contextmanager
    def stage(name):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        yield
        b.record()
        pending.append((name, a, b))

    for i in range(reps + 1):  # the first call warms up
        pending.clear()
        with torch.no_grad():
            P.parallel_spla_bwd(q, k, v, q, k, o, lse, idx, *ws, block_size=opts["block_size"], scale=opts["scale"],
                                feature_map_name=opts["feature_map_name"], deterministic=True, stage=stage)
        torch.cuda.synchronize()
        if i:
            for name, a, b in pending:
                times[name].append(a.elapsed_time(b))
    return {f"bwd_{n}_ms": sorted(x)[len(x) // 2] for n, x in times.items() if x}


def spla_fns(q, k, v, deterministic):
    import torch
    from spla.ops.spla import parallel as P
    opts = spla_opts(q.shape[-1])
    do = torch.randn_like(q)
    do_rla = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            return P.parallel_spla_attn(q, k, v, q, k, **opts)

    def fwd_bwd():
        out = P.parallel_spla_attn(q, k, v, q, k, deterministic=deterministic, **opts)
        return torch.autograd.grad([out.o_sparse, out.o_rla], [q, k, v], [do, do_rla])

    def topk_fwd_bwd():  # spla.topk_attn's path: no linear branch
        out = P.parallel_spla_attn(q, k, v, q, k, deterministic=deterministic, residual=False, **opts)
        return torch.autograd.grad(out.o_sparse, [q, k, v], do)
    return fwd, fwd_bwd, topk_fwd_bwd


def sdpa_fns(q, k, v, flash: bool = False):
    """SDPA causal forward+backward on K/V expanded to the query heads, with the backend torch picks (cuDNN
    attention on Hopper: 218 ms at 64k, 32 heads, on an H100), or ``flash=True`` the flash backend (379 ms there),
    which older runs forced and reported as "SDPA"."""
    import contextlib
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    G = q.shape[2] // k.shape[2]
    qt = q.detach().transpose(1, 2).contiguous().requires_grad_()
    kt = k.detach().repeat_interleave(G, 2).transpose(1, 2).contiguous().requires_grad_()
    vt = v.detach().repeat_interleave(G, 2).transpose(1, 2).contiguous().requires_grad_()
    do = torch.randn_like(qt)

    def fwd_bwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if flash else contextlib.nullcontext():
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
            return torch.autograd.grad(o, [qt, kt, vt], do)
    return fwd_bwd, (qt, kt, vt)


def run_case(T, HQ, H, D, nsa, rec, budget_s, atomic=True, data="random", union=True):
    import torch
    from spla.ops.spla import parallel as P
    q, k, v = make(T, HQ, H, D, data=data)
    G = HQ // H
    fwd, fb_det, fb_topk = spla_fns(q, k, v, True)
    _, fb_atomic, _ = spla_fns(q, k, v, False)
    try:
        rec["spla_fwd_ms"] = timeit(fwd, budget_s)
        rec["spla_fwdbwd_ms"] = timeit(fb_det, budget_s)
        rec["topk_fwdbwd_ms"] = timeit(fb_topk, budget_s)
        try:
            rec.update(bwd_stage_ms(q, k, v))
        except Exception:
            traceback.print_exc()
        # the key-gradient pass's linear part at 64 rows per step, its setting before 2026-12-05 (32 now: at 64 it
        # spills 600 bytes per thread on sm_90a, benchmarks/kernel_resources.py)
        lin_rows = P.SPARSE_LAUNCH["kvb_lin_rows"]
        try:
            P.SPARSE_LAUNCH["kvb_lin_rows"] = 64
            rec["spla_fwdbwd_kvb64_ms"] = timeit(fb_det, budget_s)
        finally:
            P.SPARSE_LAUNCH["kvb_lin_rows"] = lin_rows
    except torch.OutOfMemoryError:
        rec["spla_fwdbwd_ms"] = "OOM"
    except Exception as e:
        traceback.print_exc()
        rec["spla_fwdbwd_ms"] = f"error: {type(e).__name__}"
    torch.cuda.empty_cache()
    if union:
        path, launch, bq = P.SPARSE_PATH, dict(P.SPARSE_LAUNCH), P.BWD_QUERY_PATH
        try:
            P.SPARSE_PATH = "union"
            rec["spla_fwdbwd_union_ms"] = timeit(fb_det, budget_s)
            # the backward's union kernel at 4 warps / 2 stages instead of its own setting (8 / 2)
            P.SPARSE_LAUNCH.update(union_bwd_warps=4, union_bwd_stages=2)
            rec["spla_fwdbwd_union_w4_ms"] = timeit(fb_det, budget_s)
            # union tiles of half the selection's, forward and backward (smaller unions, 92 KB of shared memory)
            P.SPARSE_LAUNCH.update(launch)
            half = P._topk_tile(BS, HQ // H) // 2
            P.SPARSE_LAUNCH.update(union_tile=half, union_bwd_tile=half)
            rec["spla_fwdbwd_union_half_ms"] = timeit(fb_det, budget_s)
            # the backward's union kernel at 32-key sub-tiles (the forward's winning setting on an H100), at its
            # own 8 warps / 2 stages (no spills) and at 4 warps / 2 stages
            P.SPARSE_LAUNCH.update(launch)
            P.SPARSE_LAUNCH.update(union_bwd_bk=32)
            rec["spla_fwdbwd_union_bk32_ms"] = timeit(fb_det, budget_s)
            P.SPARSE_LAUNCH.update(union_bwd_warps=4)
            rec["spla_fwdbwd_union_bk32_w4_ms"] = timeit(fb_det, budget_s)
            # the defaults with the backward's query side token-major (BWD_QUERY_PATH="token"), in the same process
            P.SPARSE_LAUNCH.update(launch)
            P.SPARSE_PATH = path
            P.BWD_QUERY_PATH = "token"
            rec["spla_fwdbwd_qtoken_ms"] = timeit(fb_det, budget_s)
        except Exception:
            traceback.print_exc()
        finally:
            P.SPARSE_PATH, P.BWD_QUERY_PATH = path, bq
            P.SPARSE_LAUNCH.update(launch)
        torch.cuda.empty_cache()
    if atomic:
        try:
            rec["spla_fwdbwd_atomic_ms"] = timeit(fb_atomic, budget_s, warmup=1, max_iters=5)
        except Exception:
            traceback.print_exc()
    torch.cuda.empty_cache()
    for key, flash in (("sdpa_fwdbwd_ms", False), ("sdpa_flash_fwdbwd_ms", True)):
        try:
            fb, keep = sdpa_fns(q, k, v, flash=flash)
            rec[key] = timeit(fb, budget_s, warmup=1)
            del fb, keep
        except torch.OutOfMemoryError:
            rec[key] = "OOM"
        torch.cuda.empty_cache()
    try:  # FlexAttention, block-sparse mask of the same token budget given in advance (benchmarks/peers.py)
        from peers import flex_attention_fn, flex_block_mask, flex_block_sparse
        mask = flex_block_mask(T, 128, TOPK * BS // 128, device="cuda")
        fx = flex_attention_fn()
        do = torch.randn_like(q)

        def flex_fb():
            return torch.autograd.grad(flex_block_sparse(fx, q, k, v, mask, D ** -0.5), [q, k, v], do)
        rec["flex_fwdbwd_ms"] = timeit(flex_fb, budget_s, warmup=2)
    except Exception:
        traceback.print_exc()
    torch.cuda.empty_cache()
    if nsa is not None and G >= 16 and G & (G - 1) == 0:
        try:
            g_cmp = torch.rand(1, T, HQ, device="cuda", dtype=q.dtype)
            g_slc = torch.rand(1, T, HQ, device="cuda", dtype=q.dtype)
            do = torch.randn_like(q)

            def nsa_fb():
                o = nsa(q, k, v, g_cmp=g_cmp, g_slc=g_slc, block_counts=TOPK, block_size=BS, scale=D ** -0.5)
                return torch.autograd.grad(o, [q, k, v], do)
            rec["nsa_fwdbwd_ms"] = timeit(nsa_fb, budget_s, warmup=1)
        except Exception:
            traceback.print_exc()
    for n in ("sdpa", "nsa", "flex"):
        x = rec.get(f"{n}_fwdbwd_ms")
        if isinstance(x, float) and isinstance(rec.get("spla_fwdbwd_ms"), float):
            rec[f"speedup_{n}"] = x / rec["spla_fwdbwd_ms"]


def run_memory(T, HQ, H, D, rec):
    import torch
    q, k, v = make(T, HQ, H, D)
    _, fb, _ = spla_fns(q, k, v, True)
    try:
        rec["spla_peak_gib"] = peak_mem(fb)
    except torch.OutOfMemoryError:
        rec["spla_peak_gib"] = "OOM"
    del fb
    torch.cuda.empty_cache()
    try:
        fbs, keep = sdpa_fns(q, k, v)
        rec["sdpa_peak_gib"] = peak_mem(fbs)
        del fbs, keep
    except torch.OutOfMemoryError:
        rec["sdpa_peak_gib"] = "OOM"
    torch.cuda.empty_cache()


def build_model(attn: str, layers=8, d=1024, heads=16, kv_heads=4, ffn=2816, vocab=32000, device="cuda"):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from spla.layers.spla import SPLAAttention, SPLAConfig, apply_rope

    class SDPAAttention(nn.Module):
        def __init__(self):
            super().__init__()
            D = d // heads
            self.q_proj = nn.Linear(d, heads * D, bias=False)
            self.k_proj = nn.Linear(d, kv_heads * D, bias=False)
            self.v_proj = nn.Linear(d, kv_heads * D, bias=False)
            self.o_proj = nn.Linear(heads * D, d, bias=False)

        def forward(self, x, position_embeddings):
            B, L, _ = x.shape
            D = d // heads
            q = self.q_proj(x).view(B, L, heads, D)
            k = self.k_proj(x).view(B, L, kv_heads, D)
            v = self.v_proj(x).view(B, L, kv_heads, D)
            cos, sin = position_embeddings
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=True).transpose(1, 2)
            return self.o_proj(o.reshape(B, L, -1)), None

    class Block(nn.Module):
        def __init__(self, i):
            super().__init__()
            self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
            if attn == "spla":
                cfg = SPLAConfig(block_size=BS, topk=TOPK, sink_blocks=SINK, local_blocks=LOCAL)
                self.attn = SPLAAttention(d, heads, kv_heads, d // heads, config=cfg, layer_idx=i)
            else:
                self.attn = SDPAAttention()
            self.gate = nn.Linear(d, ffn, bias=False)
            self.up = nn.Linear(d, ffn, bias=False)
            self.down = nn.Linear(ffn, d, bias=False)

        def forward(self, x, pe):
            x = x + self.attn(self.n1(x), position_embeddings=pe)[0]
            h = self.n2(x)
            return x + self.down(F.silu(self.gate(h)) * self.up(h))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            self.blocks = nn.ModuleList([Block(i) for i in range(layers)])
            self.norm = nn.RMSNorm(d)
            self.head = nn.Linear(d, vocab, bias=False)

        def forward(self, ids):
            D = d // heads
            inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=ids.device).float() / D))
            f = torch.arange(ids.shape[1], device=ids.device).float()[:, None] * inv
            emb = torch.cat([f, f], -1)
            pe = (emb.cos().to(torch.bfloat16)[None], emb.sin().to(torch.bfloat16)[None])  # [1, T, D]
            x = self.emb(ids)
            for b in self.blocks:
                x = b(x, pe)
            return self.head(self.norm(x))

    torch.manual_seed(0)
    return Model().to(device, torch.bfloat16)


def run_model_step(T, rec, steps=3):
    import torch
    import torch.nn.functional as F
    for attn in ("spla", "sdpa"):
        model = opt = None
        try:
            model = build_model(attn)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            ids = torch.randint(0, 32000, (1, T + 1), device="cuda")

            def step():
                logits = model(ids[:, :-1])
                loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), ids[0, 1:])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            torch.cuda.reset_peak_memory_stats()
            ms = timeit(step, budget_s=steps * 0.5, warmup=1, max_iters=steps)
            rec[f"{attn}_step_ms"] = ms
            rec[f"{attn}_tok_s"] = T / ms * 1e3
            rec[f"{attn}_step_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        except torch.OutOfMemoryError:
            rec[f"{attn}_step_ms"] = "OOM"
        except Exception:
            traceback.print_exc()
            rec[f"{attn}_step_ms"] = "error"
        del model, opt
        torch.cuda.empty_cache()
    if isinstance(rec.get("spla_step_ms"), float) and isinstance(rec.get("sdpa_step_ms"), float):
        rec["step_speedup"] = rec["sdpa_step_ms"] / rec["spla_step_ms"]


def fmt(x):
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def main():
    from inputs import DATA
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="T = 4k..128k for both head configs (long: ~10+ min)")
    ap.add_argument("--T", type=int, nargs="*", default=None,
                    help="override the sequence lengths (given without values: no op rows, e.g. with --model-step)")
    ap.add_argument("--heads", type=str, nargs="+", default=["32,8", "64,4"], help="HQ,H pairs")
    ap.add_argument("--mem-T", type=int, nargs="*", default=[65536, 131072], help="lengths of the memory rows")
    ap.add_argument("--no-atomic", action="store_true", help="skip the atomic key-gradient variant")
    ap.add_argument("--no-union", action="store_true", help="skip the query-tile union variant")
    ap.add_argument("--data", choices=DATA, default="random",
                    help="random: N(0, 1) q, k, v; local: AR(1) queries (benchmarks/inputs.py)")
    ap.add_argument("--model-step", action="store_true", help="also time a training step of an 8-layer model")
    ap.add_argument("--model-T", type=int, default=65536)
    ap.add_argument("--budget", type=float, default=150.0,
                    help="seconds after which the remaining op-grid cases are skipped (memory rows and the model step "
                         "still run)")
    ap.add_argument("--case-seconds", type=float, default=0.6, help="timing budget of each measurement")
    ap.add_argument("--out", type=str, default=os.environ.get("OUT", "."))
    args = ap.parse_args()

    import torch
    import triton
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    nsa = import_fla()
    name = torch.cuda.get_device_name()
    print(f"# {name}; torch {torch.__version__}, triton {triton.__version__}", flush=True)
    if args.T is not None:
        grid = [(hs, T) for hs in args.heads for T in args.T]
    elif args.full:
        grid = [(hs, T) for hs in args.heads for T in (4096, 8192, 16384, 32768, 65536, 131072)]
    else:
        grid = [("32,8", 8192), ("32,8", 65536), ("64,4", 8192), ("64,4", 65536)]
        grid = [(hs, T) for hs, T in grid if hs in args.heads]
    rows, mem_rows, model_rows = [], [], []

    def over():
        return time.time() - START > args.budget

    def guarded(rows_, rec, fn, *a, **kw):
        """Run one case into ``rec`` (OOM and errors become a note), keep and print the row."""
        try:
            fn(*a, **kw)
        except torch.OutOfMemoryError:
            rec["note"] = "OOM"
        except Exception as e:
            traceback.print_exc()
            rec["note"] = f"error: {type(e).__name__}"
        torch.cuda.empty_cache()
        rows_.append(rec)
        print(" ".join(f"{n}={fmt(x)}" for n, x in rec.items()), f"[{time.time() - START:.0f}s]", flush=True)

    for hs, T in grid:
        HQ, H = map(int, hs.split(","))
        rec = dict(T=T, HQ=HQ, H=H)
        if over():
            rec["note"] = "skipped (time budget)"
            guarded(rows, rec, lambda: None)
        else:
            guarded(rows, rec, run_case, T, HQ, H, 128, nsa, rec, args.case_seconds,
                    atomic=not args.no_atomic and (args.full or T <= 65536), data=args.data,
                    union=not args.no_union)
    for T in args.mem_T:  # cheap (one forward+backward each): not subject to the budget
        rec = dict(T=T, HQ=32, H=8)
        guarded(mem_rows, rec, run_memory, T, 32, 8, 128, rec)
    if args.model_step:  # asked for explicitly: not subject to the budget
        rec = dict(T=args.model_T)
        guarded(model_rows, rec, run_model_step, args.model_T, rec)

    def table(recs, cols):
        cols = [c for c in cols if any(c in r for r in recs)]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in recs]
        return "\n".join(lines)

    out = [f"GPU: {name}; data: {args.data}; B=1, bf16, D=128, block {BS}, top-{TOPK}; times in ms (fwd+bwd = forward + gradients of "
           f"q, k, v), peak memory in GiB above the inputs", ""]
    out.append(table(rows, ["T", "HQ", "H", "spla_fwd_ms", "spla_fwdbwd_ms", "spla_fwdbwd_atomic_ms",
                            "spla_fwdbwd_kvb64_ms", "spla_fwdbwd_union_ms", "spla_fwdbwd_union_w4_ms", "spla_fwdbwd_union_half_ms",
                            "spla_fwdbwd_union_bk32_ms", "spla_fwdbwd_union_bk32_w4_ms", "spla_fwdbwd_qtoken_ms", "topk_fwdbwd_ms", "sdpa_fwdbwd_ms", "sdpa_flash_fwdbwd_ms", "nsa_fwdbwd_ms", "flex_fwdbwd_ms", "speedup_sdpa",
                            "speedup_nsa",
                            "speedup_flex", "note"]))
    if any("bwd_query_ms" in r for r in rows):
        out += ["", "SPLA's backward by stage (deterministic, ms, medians of 5; features: phi(q), phi(k) and the live "
                "rows; linear: the global linear term; query: the query-side pass over the selected blocks; keys: "
                "the key-gradient pass; features_bwd: the feature maps' backward):", "",
                table(rows, ["T", "HQ", "H", *(f"bwd_{n}_ms" for n in BWD_STAGES)])]
    if mem_rows:
        out += ["", table(mem_rows, ["T", "HQ", "H", "spla_peak_gib", "sdpa_peak_gib", "note"])]
    if model_rows:
        out += ["", "Training step, 8 layers, d_model 1024, 16/4 heads of 64, bf16, AdamW:", "",
                table(model_rows, ["T", "spla_step_ms", "spla_tok_s", "spla_step_peak_gib", "sdpa_step_ms",
                                   "sdpa_tok_s", "sdpa_step_peak_gib", "step_speedup", "note"])]
    text = "\n".join(out)
    try:
        os.makedirs(args.out, exist_ok=True)
        allr = [dict(kind="op", **r) for r in rows] + [dict(kind="memory", **r) for r in mem_rows] + \
               [dict(kind="model_step", **r) for r in model_rows]
        names = []
        for r in allr:
            names += [c for c in r if c not in names]
        with open(os.path.join(args.out, "bench_backward.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=names)
            w.writeheader()
            w.writerows(allr)
        with open(os.path.join(args.out, "bench_backward.md"), "w") as f:
            f.write(text + "\n")
    except Exception:
        traceback.print_exc()
    print(f"# total {time.time() - START:.0f}s")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
