# -*- coding: utf-8 -*-
"""The ``spla`` command line: ``spla demo`` (more subcommands come with the model and training work)."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _demo(args: argparse.Namespace) -> int:
    from spla.demo import run_synthetic_demo
    return run_synthetic_demo(length=args.length, block_size=args.block_size, topk=args.topk, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spla",
        description="SPLA (Block Sparse Plus Linear Attention) for long-context LLMs: exact attention over a few "
                    "selected KV blocks chosen by a second-order estimate, plus a residual linear branch for the rest.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("demo", help="run SPLA on a long structured synthetic sequence and compare it with dense attention",
                       description="Plant needles in a long random key sequence, run spla_attn and report which blocks "
                                   "each selection method finds and how close the sparse output is to dense attention.")
    d.add_argument("--length", type=int, default=4096, help="sequence length in tokens (default 4096)")
    d.add_argument("--block-size", type=int, default=64, help="tokens per KV block (default 64)")
    d.add_argument("--topk", type=int, default=8, help="blocks selected per token, forced ones included (default 8)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.set_defaults(func=_demo)
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
