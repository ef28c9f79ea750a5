# -*- coding: utf-8 -*-
"""What each Triton kernel of the op costs a Hopper SM, measured without a GPU: registers, spills, shared memory.

    python benchmarks/kernel_resources.py [--heads 32,8 64,4] [--dtype bf16] [--parts fwd bwd] [--out DIR]

Every kernel the forward and the backward launch (all sparse paths: token-major, KV-major, query-tile union with
its fallback; and the sweep's launch settings of the sparse stages), and the four of a decode step (and its
sweep's settings), is compiled for ``sm_90a`` (H100 / H200) by Triton's own compiler and ``ptxas`` on this
machine's CPU, at the benchmarks' shapes (block 64, top-16, D = 128, softmax2 feature map, bf16). No kernel
runs: a stand-in driver gives Triton the Hopper target, and a ``jit_cache_hook`` compiles each launch ahead of
time and skips it. The host code runs on small CPU tensors (T = 4096) with valid selections from the torch
backend.

Per compiled kernel: registers per thread, spill stores / loads (bytes per thread, from ``ptxas -v``), stack,
shared memory per program, and how many programs fit on one SM at once by registers (64K per SM) and by shared
memory (227 KB per program, 228 KB per SM): the occupancy bound. Spills and an occupancy of one 4-warp program
per SM are what to look at before a GPU run; the times themselves need the GPU (bench_forward.py,
bench_backward.py). Needs the Triton CUDA backend's bundled ``ptxas`` (part of the Linux wheel); not under
``TRITON_INTERPRET=1`` (the script clears it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: the kernels must be real JIT functions

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "src"), HERE]

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
REGS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024  # Hopper: 228 KB per SM, of which 227 KB for one program (1 KB per program reserved)
SMEM_RESERVED = 1024
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
BS, TOPK = 64, 16
# the constexprs worth a column (whichever a kernel has)
SHOW = ("G", "GP", "BT", "BQ", "BK", "KC", "PART", "LIN", "ATOMIC", "WORK", "LIN_ATOMIC", "MODE", "TMA", "PDL")


class HopperStub(DriverBase):
    """A driver that reports an sm_90 target and device 0; nothing it compiles is ever launched."""

    @classmethod
    def is_active(cls):
        return True

    def map_python_to_cpp_type(self, ty):
        return ty

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("nothing runs under HopperStub")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def ptxas_usage(ptx: str) -> dict:
    """Registers, spill stores / loads and stack (bytes per thread) of ``ptx`` from ``ptxas -v`` for sm_90a."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([PTXAS, "-arch=sm_90a", "-v", path, "-o", os.devnull], capture_output=True,
                             text=True, check=True).stderr

    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0
    return dict(regs=num(r"Used (\d+) registers"), spill_st=num(r"(\d+) bytes spill stores"),
                spill_ld=num(r"(\d+) bytes spill loads"), stack=num(r"(\d+) bytes stack frame"))


CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
#: kernels whose SASS loops :func:`sass_loops` prints (``--sass NAME``)
SASS_KERNELS: set = set()


def sass_loops(cubin: bytes) -> list:
    """The loops of a kernel's SASS (a backward branch to an earlier instruction closes one): per loop its length in
    instructions and the count of each opcode (predicates and modifiers dropped), outermost first."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([CUOBJDUMP, "-sass", path], capture_output=True, text=True, check=True).stdout
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in
           (re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in sass.splitlines()) if m]
    at = {a: i for i, (a, _) in enumerate(ins)}
    loops = set()
    for i, (a, text) in enumerate(ins):
        m = re.search(r"BRA\s.*?(0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < a and int(m.group(1), 16) in at:
            loops.add((at[int(m.group(1), 16)], i))
    out = []
    for s0, e in sorted(loops):
        ops: dict = {}
        for _, text in ins[s0:e + 1]:
            op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
            ops[op] = ops.get(op, 0) + 1
        out.append(dict(first=s0, length=e - s0 + 1, ops=sorted(ops.items(), key=lambda x: -x[1])))
    return [dict(total=len(ins))] + out


def occupancy(regs: int, warps: int, shared: int) -> dict:
    """Programs of one kernel resident on an SM at once, by registers and by shared memory (0: does not fit)."""
    threads = 32 * warps
    by_regs = REGS_PER_SM // max(1, regs * threads)
    by_smem = SMEM_PER_SM // (shared + SMEM_RESERVED) if shared + SMEM_RESERVED <= SMEM_PER_SM else 0
    return dict(ctas_regs=by_regs, ctas_smem=by_smem, warps_sm=min(by_regs, by_smem) * warps)


SEEN: set = set()


@contextlib.contextmanager
def compile_only(records: list, label: str = "", default: bool = True):
    """Inside: every Triton launch is compiled for sm_90a and recorded in ``records`` (one row per distinct
    compilation over all calls: a kernel compiled under an earlier label is not repeated), not run.
    ``default``: whether these are the op's default launch settings (the ``default`` column)."""

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        c = compile
        if (fn.name, str(key)) in SEEN:
            return True
        SEEN.add((fn.name, str(key)))
        t = time.time()
        src = ASTSource(fn.jit_function, c["signature"], c["constants"], c["configs"][0])
        k = triton.compile(src, target=TARGET,
                           options=dict(num_warps=c["num_warps"], num_stages=c["num_stages"], num_ctas=c["num_ctas"]))
        use = ptxas_usage(k.asm["ptx"])
        names = {p.name: i for i, p in enumerate(fn.jit_function.params)}
        consts = {n: c["constants"].get((names[n],)) for n in SHOW if n in names and (names[n],) in c["constants"]}
        rec = dict(label=label, default="yes" if default else "no", kernel=fn.name, warps=c["num_warps"],
                   stages=c["num_stages"],
                   consts=" ".join(f"{n}={int(v) if isinstance(v, bool) else v}" for n, v in consts.items()),
                   shared_kb=round(k.metadata.shared / 1024, 1), **use,
                   **occupancy(use["regs"], c["num_warps"], k.metadata.shared), compile_s=round(time.time() - t, 1))
        records.append(rec)
        print(" ".join(f"{n}={v}" for n, v in rec.items()), flush=True)
        if fn.name in SASS_KERNELS:
            loops = sass_loops(k.asm["cubin"])
            print(f"# SASS of {fn.name} ({rec['consts']}, {rec['warps']} warps): {loops[0]['total']} instructions")
            for lp in loops[1:]:
                top = ", ".join(f"{op} {n}" for op, n in lp["ops"][:12])
                print(f"#   loop at instruction {lp['first']}: {lp['length']} instructions per iteration; {top}")
        return True  # skip the launch

    old_driver, old_hook = driver._active, knobs.runtime.jit_cache_hook  # None on a machine without a GPU
    driver.set_active(HopperStub())
    knobs.runtime.jit_cache_hook = hook
    try:
        yield records
    finally:
        knobs.runtime.jit_cache_hook = old_hook
        driver._active = old_driver


def _case(HQ: int, H: int, D: int, dtype: torch.dtype, T: int = 4096, seed: int = 0):
    """CPU inputs and a valid selection (torch backend) for a length-T sequence."""
    from spla.ops.spla.chunk import chunk_spla_select
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, T, h, D, generator=g) for h in (HQ, H, H))
    idx = chunk_spla_select(q, k, block_size=BS, topk=TOPK, sink_blocks=1, local_blocks=2, selection="taylor2",
                            cov="diag", rep_keys=1, scale=D ** -0.5, cu_seqlens=None)
    return q.to(dtype), k.to(dtype), v.to(dtype), idx.int()


def run_forward(records: list, HQ: int, H: int, D: int, dtype: torch.dtype, sweep: bool = True):
    """The forward of every sparse path (and the sweep's launch settings of the sparse stages)."""
    import spla.ops.spla.parallel as P
    q, k, v, idx = _case(HQ, H, D, dtype)
    T = q.shape[1]
    opts = dict(block_size=BS, topk=TOPK, sink_blocks=1, local_blocks=2, selection="taylor2", cov="diag",
                rep_keys=1, feature_map_name="softmax2", scale=D ** -0.5, cu_seqlens=None, save_lse=True)
    select = P.select_fwd
    path = P.SPARSE_PATH
    # the selection kernel is compiled as launched; its (unwritten) output is replaced by the valid selection
    P.select_fwd = lambda *a, **kw: (select(*a, **kw), idx[0])[1]
    try:
        for sp in ("kv", "token", "union"):
            P.SPARSE_PATH = sp
            with compile_only(records, f"{HQ}/{H} fwd {sp}"):
                P.parallel_spla_fwd(q, k, v, q, k, **opts)
        if sweep:
            from bench_forward import SPARSE_SWEEP, sweep_setting
            G = HQ // H
            tile = P._topk_tile(BS, G)
            meta = P._prepare_meta((0, T), BS, tile, "cpu")
            qf, kf, vf = (x[0].contiguous() for x in (q, k, v))
            fq, fk = torch.rand(T, HQ, 2 * D).to(dtype), torch.rand(T, H, 2 * D).to(dtype)  # softmax2's width
            glob, gm = torch.zeros(T, HQ, D), torch.zeros(T, HQ)
            fns = dict(kv=P.sparse_kv_fwd, token=P.sparse_fwd, union=functools.partial(P.sparse_union_fwd, tile=tile))
            for sp, settings in SPARSE_SWEEP.items():
                for s in settings:
                    s = sweep_setting(s, tile, G)
                    if s is None:
                        continue
                    if "lin_atomic" in s:
                        s["deterministic"] = not s.pop("lin_atomic")
                    with compile_only(records, f"{HQ}/{H} sweep {sp}", default=False):
                        fns[sp](qf, kf, vf, fq, fk, glob, gm, idx[0], meta, block_size=BS, scale=D ** -0.5, **s)
    finally:
        P.select_fwd, P.SPARSE_PATH = select, path


def run_backward(records: list, HQ: int, H: int, D: int, dtype: torch.dtype):
    """The backward (deterministic and atomic key gradients; token-major and union query side)."""
    import spla.ops.spla.parallel as P
    q, k, v, idx = _case(HQ, H, D, dtype)
    T = q.shape[1]
    o = torch.zeros_like(q)
    lse = torch.zeros(T, HQ)
    do = torch.randn_like(q)
    path, launch = P.SPARSE_PATH, dict(P.SPARSE_LAUNCH)
    # (label, sparse path, deterministic, launch settings other than the defaults: the ones bench_backward.py
    # times beside the defaults)
    # (and the union backward's own tile and key sub-tiles, not yet timed)
    half = P._topk_tile(BS, HQ // H) // 2
    variants = (("", "auto", True, {}), (" atomic", "auto", False, {}), (" kvb_lin_rows=64", "auto", True,
                dict(kvb_lin_rows=64)), ("", "union", True, {}), (" 4 warps", "union", True,
                dict(union_bwd_warps=4, union_bwd_stages=2)),
                (f" tile={half}", "union", True, dict(union_bwd_tile=half)),
                (f" tile={half} 4 warps", "union", True, dict(union_bwd_tile=half, union_bwd_warps=4)),
                (" bk=32", "union", True, dict(union_bwd_bk=32)),
                (" bk=32 4 warps", "union", True, dict(union_bwd_bk=32, union_bwd_warps=4)),
                (" tma", "union", True, dict(union_bwd_tma=True)),
                (" bk=32 tma", "union", True, dict(union_bwd_bk=32, union_bwd_tma=True)))
    try:
        for tag, sp, det, over in variants:
            P.SPARSE_PATH = sp
            P.SPARSE_LAUNCH.update(over)
            with compile_only(records, f"{HQ}/{H} bwd {sp}{tag}", default=not over and det):
                P.parallel_spla_bwd(q, k, v, q, k, o, lse, idx, do, do, lse, block_size=BS, scale=D ** -0.5,
                                    feature_map_name="softmax2", deterministic=det)
            P.SPARSE_LAUNCH.update(launch)
    finally:
        P.SPARSE_PATH = path
        P.SPARSE_LAUNCH.update(launch)


def run_decode(records: list, HQ: int, H: int, D: int, dtype: torch.dtype, B: int = 8, sweep: bool = True):
    """One decode step of the Triton cache (scoring, top-k, attention partials, combine) at batch ``B``, and
    (``sweep``) under each launch setting of ``bench_decode.py --sweep``."""
    import spla.ops.spla.decode_kernels as DK
    from bench_decode import SWEEP, fill_state
    LAUNCH = DK.LAUNCH
    # the bf16 scoring operands a CUDA cache takes (on CPU tensors the op keeps fp32 ones for the interpreter)
    lowp = DK._lowp_scores
    DK._lowp_scores = lambda q, stats: q.dtype == stats.dtype == torch.bfloat16
    st = fill_state(B, 4096, HQ, H, D, BS, TOPK, dtype, "cpu")
    q = torch.randn(B, 1, HQ, D).to(dtype)
    k, v = (torch.randn(B, 1, H, D).to(dtype) for _ in range(2))
    with compile_only(records, f"{HQ}/{H} decode B={B}"):
        st.step(q, k, v)
    base = dict(LAUNCH)
    try:
        for stage, settings in (SWEEP.items() if sweep else ()):
            for cfg in settings:
                LAUNCH.update(base)
                LAUNCH.update(cfg)
                with compile_only(records, f"{HQ}/{H} decode sweep " + " ".join(f"{n}={x}" for n, x in cfg.items()),
                                  default=False):
                    st.step(q, k, v)
    finally:
        LAUNCH.update(base)
        DK._lowp_scores = lowp


COLS = ("label", "default", "kernel", "consts", "warps", "stages", "regs", "spill_st", "spill_ld", "stack", "shared_kb",
        "ctas_regs", "ctas_smem", "warps_sm")


def table(records: list) -> str:
    lines = ["| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLS) + " |" for r in records]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", nargs="+", default=["32,8", "64,4"], help="HQ,H pairs")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--parts", nargs="+", choices=("fwd", "bwd", "decode"), default=["fwd", "bwd", "decode"])
    ap.add_argument("--no-sweep", action="store_true", help="only the default launch settings")
    ap.add_argument("--sass", nargs="*", default=[], metavar="KERNEL",
                    help="also print the loops of these kernels' SASS: instructions per iteration and the opcode mix")
    ap.add_argument("--out", default=None, help="also write kernel_resources.md there")
    args = ap.parse_args(argv)
    SASS_KERNELS.update(args.sass)
    if not os.path.exists(PTXAS):
        print(f"needs Triton's CUDA backend with its ptxas ({PTXAS})", file=sys.stderr)
        return 1
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)[args.dtype]
    records: list = []
    t0 = time.time()
    for hs in args.heads:
        HQ, H = map(int, hs.split(","))
        if "fwd" in args.parts:
            run_forward(records, HQ, H, args.dim, dtype, sweep=not args.no_sweep)
        if "bwd" in args.parts:
            run_backward(records, HQ, H, args.dim, dtype)
        if "decode" in args.parts:
            run_decode(records, HQ, H, args.dim, dtype, sweep=not args.no_sweep)
    text = (f"sm_90a (H100 / H200) via Triton {triton.__version__} and ptxas, compiled on the CPU; {args.dtype}, "
            f"D={args.dim}, block {BS}, top-{TOPK}, softmax2; {len(records)} kernels in {time.time() - t0:.0f} s\n\n"
            + table(records))
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernel_resources.md"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
