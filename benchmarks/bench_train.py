# -*- coding: utf-8 -*-
"""`spla train` on 1 GPU and on N GPUs (torchrun, DDP) with the same global batch: same losses? tokens/s?

    python benchmarks/bench_train.py --tokenizer out/tok --gpus 1 2          # on a machine with 2 GPUs
    python benchmarks/bench_train.py --tokenizer out/tok --gpus 1 --steps 30 --seq-len 16384

A random-init SPLA Llama (hidden 512, 8 layers, 8 query / 2 KV heads of 64, SwiGLU 1536, merge="rattention")
trains from scratch on a local corpus (the top-level .py files of the Python standard library, offline; 25% of the
sequences replaced by the built-in synthetic retrieval task) for ``--steps`` optimizer steps at ``--seq-len``,
global batch ``--batch-size`` sequences, micro-batch 1, bf16 autocast. Every GPU count runs the very same
command (``torchrun --nproc_per_node N -m spla.cli train ...``): the trainer splits each global batch over the
processes and accumulates, so the updates are the same up to floating-point reduction order. Printed: the
per-step losses side by side, the largest difference from the 1-GPU run, and tokens/s (steady state: the
median over the steps after the first 3) with the scaling efficiency.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time


def write_config(path: str, vocab: int, seq_len: int) -> None:
    from transformers import LlamaConfig
    LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2, head_dim=64, vocab_size=vocab, max_position_embeddings=2 * seq_len,
                rope_theta=500000.0, tie_word_embeddings=True).save_pretrained(path)


def stdlib_corpus(path: str) -> str:
    """The top-level ``.py`` files of the running Python's standard library as a jsonl corpus, sorted by name."""
    root = sysconfig.get_paths()["stdlib"]
    with open(path, "w") as f:
        for name in sorted(os.listdir(root)):
            if name.endswith(".py"):
                with open(os.path.join(root, name), encoding="utf-8", errors="replace") as src:
                    f.write(json.dumps({"text": src.read()}) + "\n")
    return path


def read_metrics(out: str):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="a tokenizer directory (e.g. saved SmolLM2 tokenizer)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (sequences per optimizer step)")
    p.add_argument("--data", default=None,
                   help="corpus files/folder (default: the top-level .py files of the Python standard library, "
                        "written as OUT/corpus.jsonl)")
    p.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    p.add_argument("--out", default=None, help="write the per-step table as JSON here")
    a = p.parse_args()
    from transformers import AutoTokenizer
    vocab = len(AutoTokenizer.from_pretrained(a.tokenizer))
    work = a.work or tempfile.mkdtemp(prefix="spla-bench-train-")
    cfg_dir = os.path.join(work, "config")
    write_config(cfg_dir, vocab, a.seq_len)
    shutil.copytree(a.tokenizer, cfg_dir, dirs_exist_ok=True)
    data = a.data or stdlib_corpus(os.path.join(work, "corpus.jsonl"))
    runs = {}
    for n in a.gpus:
        out = os.path.join(work, f"gpus{n}")
        shutil.rmtree(out, ignore_errors=True)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] \
            if n > 1 else [sys.executable]
        cmd = launcher + ["-m", "spla.cli", "train", "--model", cfg_dir, "--init", "random", "--merge", "rattention",
                          "--data", data, "--synthetic-ratio", "0.25", "--out", out, "--seq-len", str(a.seq_len),
                          "--batch-size", str(a.batch_size), "--micro-batch-size", "1", "--steps", str(a.steps),
                          "--warmup", "5", "--lr", "3e-4", "--save-every", str(10 * a.steps), "--seed", "0",
                          "--no-progress", "--no-tensorboard", "--data-cache", os.path.join(work, "data-cache")]
        print("$", " ".join(cmd), flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True)
        runs[n] = dict(metrics=read_metrics(out), wall_s=time.time() - t0)
    base = runs[a.gpus[0]]["metrics"]
    print(f"\n{'step':>5} " + " ".join(f"{f'loss {n} GPU':>12}" for n in a.gpus))
    for i, rec in enumerate(base):
        print(f"{rec['step']:>5} " + " ".join(f"{runs[n]['metrics'][i]['loss']:>12.5f}" for n in a.gpus))
    print(f"\n{'GPUs':>5} {'max |dloss|':>12} {'max rel':>9} {'tokens/s':>10} {'scaling':>8} {'wall s':>7}")
    tps = {}
    for n in a.gpus:
        m = runs[n]["metrics"]
        d = [abs(x["loss"] - y["loss"]) for x, y in zip(m, base)]
        rel = max(di / abs(y["loss"]) for di, y in zip(d, base))
        tps[n] = statistics.median(x["tokens_per_s"] for x in m[3:]) if len(m) > 3 else m[-1]["tokens_per_s"]
        eff = tps[n] / (tps[a.gpus[0]] * n / a.gpus[0])
        print(f"{n:>5} {max(d):>12.2e} {rel:>9.2e} {tps[n]:>10.0f} {eff:>8.2f} {runs[n]['wall_s']:>7.0f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({str(n): runs[n] for n in a.gpus}, f, indent=1)


if __name__ == "__main__":
    main()
