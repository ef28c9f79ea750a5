# -*- coding: utf-8 -*-
"""End-to-end ``generate``: a small random Llama at long context, SPLA (SPLACache) beside dense (SDPA), same run.

    python benchmarks/bench_generate.py                          # 32k prompt, batch 1 and 8, 64 new tokens
    python benchmarks/bench_generate.py --context 32768 --batches 1 --new-tokens 128

The model (random weights, bf16): 8 layers, hidden 1024, 16 query / 4 KV heads of dim 64, MLP 2816, vocab
32000. Dense = transformers' SDPA attention with its default dynamic cache; SPLA = the same weights after
``spla.convert`` (block 64, top-16), whose ``generate`` uses :class:`spla.models.SPLACache`. Greedy decoding
with ``min_new_tokens = max_new_tokens`` (every run makes the same number of steps). Timed: a prefill-only
call (``max_new_tokens=1``) and the full call, each the median of ``--repeats`` runs after a warm-up; decode
tokens/s = batch x (new_tokens - 1) / (full - prefill).

``--loop graph`` (default: both loops) times :func:`spla.models.greedy_generate` instead: the same greedy
decoding with the whole decode step of the model captured once as a CUDA graph and replayed (dense with
transformers' ``StaticCache``, SPLA with ``SPLACache``); decode tokens/s = batch x replays / replay time
(median of ``--repeats`` calls); the tokens are checked against the same loop run eagerly (must be equal) and
compared with ``generate``'s.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (kernel compilation, allocator)
    ts = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def graph_rows(dense, sparse, ids, a):
    """Both models through greedy_generate with the CUDA-graph step; tokens checked against generate's."""
    from spla.models import greedy_generate
    B = ids.shape[0]
    rows, base = [], None
    for name, model in (("dense", dense), ("spla", sparse)):
        try:
            # every run makes the same number of steps (as generate with min_new_tokens below)
            t_pre = timed(lambda: greedy_generate(model, ids, 1, stop_at_eos=False), a.repeats)
            runs = [greedy_generate(model, ids, a.new_tokens, stop_at_eos=False, return_info=True)
                    for _ in range(a.repeats + 1)]
        except torch.cuda.OutOfMemoryError:
            print(f"{'graph':>5} {name:>6} {B:>3}  out of memory")
            torch.cuda.empty_cache()
            continue
        out, info = runs[-1]
        # the graph must replay the eager loop exactly (same kernels); transformers' generate runs other dense
        # kernels (dynamic cache) and prefill paths, so on a random bf16 model near-tied logits may flip
        eager = greedy_generate(model, ids, a.new_tokens, cuda_graph=False, stop_at_eos=False)
        same = bool(torch.equal(out, eager))
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
                                 pad_token_id=0)
        new = slice(ids.shape[1], None)
        agree = float((out[:, new] == ref[:, new]).float().mean())
        first = int((out[:, new] != ref[:, new]).any(0).float().argmax()) if agree < 1 else a.new_tokens
        step = statistics.median(i["replay_s"] / i["replays"] for _, i in runs[1:])
        tps = B / step
        base = tps if name == "dense" else base
        ratio = tps / base if base else float("nan")
        rows.append(dict(loop="graph", model=name, B=B, prefill_s=t_pre, decode_tps=tps, ms_step=step * 1e3,
                         same_tokens_as_eager_loop=same, agree_with_generate=agree, first_difference=first))
        print(f"{'graph':>5} {name:>6} {B:>3} {t_pre:>10.3f} {'-':>8} {tps:>13.1f} {step * 1e3:>8.2f} {ratio:>8.2f}"
              f"   graph == eager loop: {same}; tokens equal to generate's: {agree:.0%} (first difference at new "
              f"token {first})", flush=True)
        torch.cuda.empty_cache()
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=32768, help="prompt tokens")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--loop", choices=["hf", "graph", "both"], default="both",
                   help="hf: transformers' generate; graph: spla.models.greedy_generate (CUDA graph); both")
    a = p.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    import spla
    dev = "cuda"
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=a.layers, num_attention_heads=16,
                      num_key_value_heads=4, head_dim=64, vocab_size=32000, max_position_embeddings=2 * a.context,
                      rope_theta=500000.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    dense = LlamaForCausalLM(cfg).to(dev, torch.bfloat16).eval()
    sparse = spla.convert(copy.deepcopy(dense), spla.SPLAConfig(block_size=64, topk=16))
    print(f"# {torch.cuda.get_device_name()}; Llama {a.layers} layers, d=1024, 16/4 heads x 64, bf16; prompt "
          f"{a.context}, {a.new_tokens} new tokens, greedy; SPLA block 64 top-16")
    print(f"{'loop':>5} {'model':>6} {'B':>3} {'prefill s':>10} {'total s':>8} {'decode tok/s':>13} {'ms/step':>8} "
          f"{'x dense':>8}")
    rows = []
    for B in a.batches:
        # ids from 1: generate takes pad_token_id=0 and would otherwise mask every 0 in the prompt as padding
        ids = torch.randint(1, cfg.vocab_size, (B, a.context), device=dev)
        if a.loop in ("graph", "both"):
            rows += graph_rows(dense, sparse, ids, a)
        if a.loop == "graph":
            continue
        base = None
        for name, model in (("dense", dense), ("spla", sparse)):
            kw = dict(do_sample=False, pad_token_id=0)
            try:
                with torch.no_grad():
                    t_pre = timed(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw), a.repeats)
                    t_all = timed(lambda: model.generate(ids, max_new_tokens=a.new_tokens,
                                                         min_new_tokens=a.new_tokens, **kw), a.repeats)
            except torch.cuda.OutOfMemoryError:
                print(f"{name:>6} {B:>3}  out of memory")
                torch.cuda.empty_cache()
                continue
            step = (t_all - t_pre) / (a.new_tokens - 1)
            tps = B / step
            base = tps if name == "dense" else base
            ratio = tps / base if base else float("nan")
            rows.append(dict(loop="hf", model=name, B=B, prefill_s=t_pre, total_s=t_all, decode_tps=tps,
                             ms_step=step * 1e3))
            print(f"{'hf':>5} {name:>6} {B:>3} {t_pre:>10.3f} {t_all:>8.3f} {tps:>13.1f} {step * 1e3:>8.2f} "
                  f"{ratio:>8.2f}", flush=True)
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
