# -*- coding: utf-8 -*-
"""The ``spla`` command line: ``spla demo``, ``spla convert``, ``spla generate``, ``spla eval ruler``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

METHOD_HELP = ("dense | taylor1 (mean key, MoBA/InfLLM-V2 style) | taylor2 (paper's 2nd-order score) | "
               "taylor2+rep (2nd order + 1 representative key, spla default) | oracle (exact block mass)")


def _spla_config_from_args(args: argparse.Namespace):
    from spla.layers import SPLAConfig
    return SPLAConfig(block_size=args.block_size, topk=args.topk, sink_blocks=args.sink_blocks,
                      local_blocks=args.local_blocks, selection=args.selection, cov=args.cov,
                      rep_keys=args.rep_keys, feature_map=args.feature_map, merge=args.merge)


def _add_spla_options(p: argparse.ArgumentParser, topk: int = 16) -> None:
    g = p.add_argument_group("SPLA options (see SPEC.md)")
    g.add_argument("--block-size", type=int, default=64, help="tokens per KV block (default 64)")
    g.add_argument("--topk", type=int, default=topk, help=f"blocks per query, sink/local included (default {topk})")
    g.add_argument("--sink-blocks", type=int, default=1, help="leading blocks always attended (default 1)")
    g.add_argument("--local-blocks", type=int, default=2, help="trailing blocks always attended, own included (default 2)")
    g.add_argument("--selection", default="taylor2", choices=["taylor2", "taylor1", "oracle"],
                   help="block score: 2nd-order Taylor (default), mean key, or exact (oracle)")
    g.add_argument("--cov", default="diag", choices=["diag", "full"], help="2nd-order statistic (default diag)")
    g.add_argument("--rep-keys", type=int, default=1, help="representative keys per block, 0..4 (default 1)")
    g.add_argument("--feature-map", default="softmax2", choices=["softmax2", "elu1", "relu2"],
                   help="feature map of the residual linear branch (default softmax2)")
    g.add_argument("--merge", default="residual", choices=["residual", "rattention", "none"],
                   help="residual: o_sparse + RMSNorm_w(o_rla) with w=0 at conversion (default); "
                        "rattention: RMSNorm(o_sparse) + RMSNorm(o_rla), for training from scratch; "
                        "none: o_sparse only (top-k block-sparse attention, no residual branch)")


def _dtype(name: str):
    """The torch dtype of a ``--dtype`` choice (fp32, bf16, fp16)."""
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# ---------------------------------------------------------------------------------------------- demo
def _demo(args: argparse.Namespace) -> int:
    from spla.demo import run_demo
    run_demo(lengths=args.lengths, depths=args.depths, block_size=args.block_size, topk=args.topk,
             probe_tokens=args.probe_tokens, seed=args.seed, out_dir=args.out, device=args.device,
             threads=args.threads, plot=not args.no_plot, methods=args.methods)
    return 0


# ---------------------------------------------------------------------------------------------- convert
def _convert(args: argparse.Namespace) -> int:
    from spla.models import convert, load, load_tokenizer
    cfg = _spla_config_from_args(args)
    dtype = _dtype(args.dtype)
    print(f"loading {args.model} ...", flush=True)
    model = load(args.model, dtype=dtype)
    convert(model, cfg)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    tok = load_tokenizer(args.model)
    tok.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved SPLA model ({type(model).__name__}, {n / 1e6:.1f}M parameters) and its tokenizer to {args.out}")
    print(f"SPLA options (config.json -> 'spla'): {cfg.to_dict()}")
    print(f"load it with spla.load({args.out!r}) or, after `import spla`, "
          f"AutoModelForCausalLM.from_pretrained({args.out!r})")
    return 0


# ---------------------------------------------------------------------------------------------- generate
def _generate(args: argparse.Namespace) -> int:
    import time

    import torch

    from spla.models import greedy_generate, load, load_tokenizer, spla_config_of
    if (args.prompt is None) == (args.prompt_file is None):
        raise SystemExit("spla generate: give exactly one of --prompt and --prompt-file")
    text = args.prompt if args.prompt is not None else open(args.prompt_file, encoding="utf-8").read()
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _dtype(args.dtype)
    model = load(args.model, dtype=dtype, device=dev)
    if not args.dense and spla_config_of(model) is None:
        from spla.models import convert
        convert(model, _spla_config_from_args(args))
    tok = load_tokenizer(args.model)
    if args.chat:
        if not tok.chat_template:
            raise SystemExit(f"spla generate --chat: the tokenizer of {args.model!r} has no chat template")
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids.to(dev)
    else:
        ids = tok(text, return_tensors="pt").input_ids.to(dev)
    kind = "dense" if spla_config_of(model) is None else "SPLA"
    graph = dev.startswith("cuda") and not args.no_cuda_graph
    print(f"{kind} model, {ids.shape[1]} prompt tokens, {args.max_new_tokens} new tokens, greedy, "
          f"{'CUDA-graph' if graph else 'eager'} decode loop on {dev}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    out, info = greedy_generate(model, ids, args.max_new_tokens, cuda_graph=graph, stop_at_eos=not args.ignore_eos,
                                pad_token_id=tok.pad_token_id, return_info=True)
    dt = time.perf_counter() - t0
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    n_new = out.shape[1] - ids.shape[1]
    line = f"{n_new} new tokens{' (stopped at end of sequence)' if info['stopped_at_eos'] else ''}, {dt:.2f} s in all"
    if info.get("replays"):
        line += f"; decode {info['replays'] / info['replay_s']:.1f} tokens/s over {info['replays']} graph replays"
    print(line, file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------- eval
def _eval_ruler(args: argparse.Namespace) -> int:
    from spla.demo import run_ruler_eval
    return run_ruler_eval(model=args.model, tasks=args.tasks, lengths=args.lengths, limit=args.limit,
                          config=_spla_config_from_args(args), out_dir=args.out, device=args.device,
                          threads=args.threads, batch_size=args.batch_size, max_gen_toks=args.max_gen_toks)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spla",
        description="SPLA (Block Sparse Plus Linear Attention) for long-context LLMs: exact attention over a few "
                    "selected KV blocks chosen by a second-order estimate, plus a residual linear branch for the rest.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  spla demo                                  # passkey sweep on the embedded SmolLM2 (1k/2k/4k)\n"
               "  spla demo --depths 3                       # 3 needle positions per length (docs/results.md)\n"
               "  spla convert --model smollm2 --topk 8 --out out/smollm2-spla\n"
               "  spla generate --chat --prompt 'What is the capital of France?' --max-new-tokens 20\n"
               "  spla eval ruler --tasks niah_single_1 --lengths 1024 --limit 5")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser(
        "demo", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="passkey retrieval + attention fidelity of SmolLM2-135M converted to SPLA without training",
        description="Load the embedded SmolLM2-135M-Instruct (offline), convert it to SPLA without training and run a "
                    "needle-in-a-haystack (passkey) sweep. Every method gets the same token budget (--topk blocks of "
                    "--block-size tokens per query) and differs only in how blocks are chosen:\n  " + METHOD_HELP +
                    "\nFor each: passkey accuracy (greedy), fraction of tokens attended, and per-layer fidelity against "
                    "dense attention on the dense model's activations (attention mass captured by the selected blocks, "
                    "recall of the oracle's picks, relative error of the attention output). Prints a table, writes "
                    "results.json, table.md and demo.png to --out. The default (one needle per length, 15 forward passes "
                    "of up to 4k tokens) is sized for a few minutes on 2 idle CPU cores; a GPU is used when present. The conversion adds no residual yet (its weight starts at 0): see "
                    "docs/results.md and docs/training.md.")
    d.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096],
                   help="context lengths in tokens (default 1024 2048 4096; the model handles up to 8192)")
    d.add_argument("--depths", type=int, default=1,
                   help="needle positions per length: 1 = the middle (default, keeps the demo short on 2 CPU cores); "
                        "n > 1 spreads them over 10%%..90%% of the haystack (docs/results.md uses 3)")
    d.add_argument("--block-size", type=int, default=64, help="tokens per KV block (default 64)")
    d.add_argument("--topk", type=int, default=8, help="blocks per query, 1 sink + 2 local included (default 8)")
    d.add_argument("--methods", nargs="+", default=None, metavar="M", help="subset of methods: " + METHOD_HELP)
    d.add_argument("--probe-tokens", type=int, default=32,
                   help="last query tokens whose attention fidelity is measured per layer (default 32)")
    d.add_argument("--seed", type=int, default=0, help="seed of the pass keys (default 0)")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    d.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    d.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    d.set_defaults(func=_demo)

    c = sub.add_parser(
        "convert", help="convert a dense model (smollm2 or a saved HF directory) to SPLA and save it",
        description="Load a dense causal LM (the embedded 'smollm2', or a local directory with a Llama / Mistral / "
                    "Qwen2 / Qwen3 checkpoint), replace its attention by SPLA layers (weights reused, residual merge "
                    "weight 0) and save it with save_pretrained: config.json carries the SPLA options under 'spla', "
                    "the weights go to safetensors, the tokenizer is saved next to them. Nothing is downloaded.")
    c.add_argument("--model", default="smollm2", help="'smollm2' (default) or a local model directory")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weight dtype (default fp32)")
    _add_spla_options(c)
    c.set_defaults(func=_convert)

    g = sub.add_parser(
        "generate", help="greedy text generation with the SPLA decode cache (CUDA-graph decode loop on a GPU)",
        description="Greedy continuation of a prompt by a model loaded offline: the embedded 'smollm2' or a local "
                    "directory (an SPLA model saved by `spla convert` keeps its options). A dense model is converted "
                    "with the SPLA options below unless --dense. Decoding uses spla.models.greedy_generate: the "
                    "prompt is prefilled in bulk, then each new token reads only the block statistics, the selected "
                    "blocks and the linear state; on a GPU the whole decode step is captured once as a CUDA graph "
                    "and replayed. The continuation goes to stdout, timings to stderr.")
    g.add_argument("--model", default="smollm2", help="'smollm2' (default) or a local model directory")
    g.add_argument("--prompt", default=None, help="the prompt text")
    g.add_argument("--prompt-file", default=None, help="read the prompt from this file instead")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message in the tokenizer's chat template (instruct models, e.g. "
                        "the embedded SmolLM2-Instruct, which otherwise may end at once)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="generate exactly --max-new-tokens tokens (default: stop at the end-of-sequence token)")
    g.add_argument("--dense", action="store_true", help="do not convert a dense model (baseline)")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weight dtype (default fp32)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on a GPU too")
    _add_spla_options(g)
    g.set_defaults(func=_generate)

    e = sub.add_parser("eval", help="evaluate dense vs SPLA models (subcommand: ruler)",
                       description="Evaluations of a dense model and its SPLA conversion side by side.")
    esub = e.add_subparsers(dest="eval_command", metavar="SUITE")
    r = esub.add_parser(
        "ruler", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="lm-eval's offline RULER tasks, dense vs SPLA",
        description="Run lm-evaluation-harness RULER tasks on the dense model and on its SPLA conversion (same "
                    "weights, no training) and print a side-by-side table. Only the tasks whose data lm-eval "
                    "synthesizes locally can run offline: niah_single_1, niah_multikey_2, niah_multikey_3, ruler_vt, "
                    "ruler_cwe, ruler_fwe. Tasks that need the Hugging Face Hub (essays, SQuAD, HotpotQA) are reported "
                    "as not runnable offline. Needs the 'eval' extra (pip install -e '.[eval]'). Generation "
                    "recomputes SPLA attention from the KV cache at every step: correct, not yet fast.")
    r.add_argument("--model", default="smollm2", help="'smollm2' (default) or a local model directory (dense or SPLA)")
    r.add_argument("--tasks", nargs="+", default=["niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt",
                                                  "ruler_cwe", "ruler_fwe"], help="RULER task names (default: all six offline ones)")
    r.add_argument("--lengths", type=int, nargs="+", default=[1024], help="RULER max_seq_lengths (default 1024)")
    r.add_argument("--limit", type=int, default=10, help="examples per task and length (default 10)")
    r.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size (default 1)")
    r.add_argument("--max-gen-toks", type=int, default=None,
                   help="cap on generated tokens per answer (default: the task's own, 128 for most RULER tasks)")
    r.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    r.add_argument("--out", default="out/ruler", help="output folder (default out/ruler)")
    _add_spla_options(r, topk=8)
    r.set_defaults(func=_eval_ruler)
    e.set_defaults(func=lambda a: (e.print_help() or 0))

    # `spla train` (issue 7): continual pretraining, defined in spla.train.cli
    from spla.train.cli import add_train_parser
    add_train_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
