# -*- coding: utf-8 -*-
"""SPLA decoding: a per-layer cache and the decode step, torch path (SPEC §7).

The cache keeps, per batch element: K, V and k_lin of every token, the statistics (mean, second-order
statistic, representative keys) of every complete block, and the fp32 linear state ``S`` (`[H, F, Dv]`)
with its mass ``z`` (`[H, F]`). A step reads the statistics, the selected blocks and ``S``; it never reads
an unselected block. The open (incomplete) block needs no statistics: it is always one of the forced
local blocks, so it is never scored; its statistics are computed from the cached keys, once, when it
completes (one block read per ``block_size`` tokens).

Prefill fills the cache in bulk (statistics of all complete blocks at once, the state by one matmul);
appending several tokens to a non-empty cache (chunked prefill) runs them as successive steps.
"""

from __future__ import annotations

from typing import Optional

import torch

from spla.ops.spla.chunk import _sparse_chunk, select_query_block
from spla.ops.spla.interface import spla_attn
from spla.ops.spla.utils import (BlockStats, SPLAOutput, block_stats, compute_dtype, feature_map, feature_dim)


class SPLADecodeState:
    """Decoding cache of one attention layer for a batch of sequences of possibly different lengths.

    Args:
        batch_size, num_kv_heads, head_dim, value_dim, lin_dim: cache geometry (``lin_dim`` = Dl of k_lin).
        block_size, topk, sink_blocks, local_blocks, selection, cov, rep_keys, feature_map, scale:
            the options of :func:`spla.spla_attn`; decoding reproduces it at every position.
        dtype, device: of the K/V cache. capacity: tokens to allocate up front (grows by doubling).
        stats_dtype: storage of the block statistics. Default: bf16 for a bf16 cache on the Triton backend,
            where it reproduces the selection of :func:`spla.spla_attn`'s Triton kernels, which score a bf16
            model with bf16 statistics and bf16 dot operands (70 of 70 steps agreed on an H200 against 45 of 70
            with fp32 statistics, ``test_triton_decode_on_gpu``), and halves the largest read of a long-context
            step; else fp32 (fp64 for an fp64 cache), which reproduces the torch backend's fp32 scores.
        backend: ``"triton"`` (CUDA kernels), ``"torch"``, or ``None`` (Triton on CUDA when the options allow).
    """

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, value_dim: Optional[int] = None,
                 lin_dim: Optional[int] = None, *, block_size: int = 64, topk: int = 16, sink_blocks: int = 1,
                 local_blocks: int = 2, selection: str = "taylor2", cov: str = "diag", rep_keys: int = 1,
                 feature_map: str = "softmax2", scale: Optional[float] = None, dtype=torch.float32,
                 device=None, capacity: int = 0, stats_dtype=None, backend: Optional[str] = None):
        self.B, self.H, self.D = batch_size, num_kv_heads, head_dim
        self.Dv, self.Dl = value_dim or head_dim, lin_dim or head_dim
        self.opts = dict(block_size=block_size, topk=topk, sink_blocks=sink_blocks, local_blocks=local_blocks,
                         selection=selection, cov=cov, rep_keys=rep_keys)
        if selection == "taylor1" and cov == "full":
            cov = "diag"  # taylor1 never reads the second-order statistic: keep the small one
        self.block_size, self.topk = block_size, topk
        self.sink_blocks, self.local_blocks = sink_blocks, local_blocks
        self.selection, self.cov, self.rep_keys, self.fmap = selection, cov, rep_keys, feature_map
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.dtype, self.device = dtype, device
        kernels_apply = selection in ("taylor2", "taylor1") and cov == "diag"
        if backend is None:
            backend = "triton" if torch.device(device or "cpu").type == "cuda" and kernels_apply else "torch"
        if backend not in ("triton", "torch"):
            raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")
        if backend == "triton" and not kernels_apply:
            raise ValueError(f"backend='triton' decoding supports selection taylor1/taylor2 with cov='diag', got "
                             f"selection={selection!r}, cov={cov!r}; use backend='torch'")
        self.backend = backend
        acc = compute_dtype(dtype)
        sdt = stats_dtype
        if sdt is None:
            sdt = torch.bfloat16 if dtype == torch.bfloat16 and backend == "triton" else acc
        if not (isinstance(sdt, torch.dtype) and sdt.is_floating_point):
            raise ValueError(f"stats_dtype must be a floating torch.dtype or None, got {stats_dtype!r}")
        Fd = feature_dim(self.Dl, feature_map)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_length = 0  # host copy of lengths.max(): growing the cache needs no device sync
        self.k = torch.zeros(batch_size, 0, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch_size, 0, num_kv_heads, self.Dv, dtype=dtype, device=device)
        self.k_lin = torch.zeros(batch_size, 0, num_kv_heads, self.Dl, dtype=dtype, device=device)
        self.mean = torch.zeros(batch_size, 0, num_kv_heads, head_dim, dtype=sdt, device=device)
        sec = (head_dim, head_dim) if cov == "full" else (head_dim,)
        self.second = torch.zeros(batch_size, 0, num_kv_heads, *sec, dtype=sdt, device=device)
        self.reps = torch.zeros(batch_size, 0, num_kv_heads, rep_keys, head_dim, dtype=sdt, device=device)
        self.S = torch.zeros(batch_size, num_kv_heads, Fd, self.Dv, dtype=acc, device=device)
        self.z = torch.zeros(batch_size, num_kv_heads, Fd, dtype=acc, device=device)
        if capacity:
            self._grow(capacity)

    # ------------------------------------------------------------------ storage
    def _grow(self, need: int) -> None:
        """Make room for ``need`` tokens per sequence (capacity doubles, in whole blocks)."""
        cap = self.k.shape[1]
        if need <= cap:
            return
        bs = self.block_size
        new = max(need, 2 * cap, bs)
        new = -(-new // bs) * bs

        def pad(x, n):
            return torch.cat([x, x.new_zeros(x.shape[0], n - x.shape[1], *x.shape[2:])], 1)

        self.k, self.v, self.k_lin = pad(self.k, new), pad(self.v, new), pad(self.k_lin, new)
        nb = new // bs
        self.mean, self.second, self.reps = pad(self.mean, nb), pad(self.second, nb), pad(self.reps, nb)

    def _complete_block(self, b: int, j: int) -> None:
        """Statistics of block ``j`` of sequence ``b`` from its cached keys (it just became complete)."""
        bs = self.block_size
        st = block_stats(self.k[b, j * bs:(j + 1) * bs], bs, cov=self.cov, rep_keys=self.rep_keys)
        self.mean[b, j] = st.mean[0]
        self.second[b, j] = st.second[0]
        if self.rep_keys:
            self.reps[b, j] = st.reps[0]

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more tokens per sequence now, so that the next ``n`` Triton steps allocate
        nothing and sync nothing (then they can be captured and replayed as a CUDA graph)."""
        self._grow(self.max_length + n)

    def _claim_slot(self) -> None:
        """Room for one more token per sequence (counted on the host: no device sync)."""
        self._grow(self.max_length + 1)
        self.max_length += 1

    def _append(self, k, v, k_lin) -> None:
        """Append one token per sequence (`[B, H, *]`): caches, linear state, completed-block statistics
        (torch backend; the Triton step writes them inside its kernels)."""
        self._claim_slot()
        rows = torch.arange(self.B, device=k.device)
        self.k[rows, self.lengths], self.v[rows, self.lengths] = k, v
        self.k_lin[rows, self.lengths] = k_lin
        fk = feature_map(k_lin, self.fmap)  # [B, H, F]
        self.S += fk[..., None] * v.to(fk.dtype)[:, :, None, :]
        self.z += fk
        self.lengths += 1
        for b in (self.lengths % self.block_size == 0).nonzero().flatten().tolist():
            self._complete_block(b, int(self.lengths[b]) // self.block_size - 1)

    # ------------------------------------------------------------------ prefill and steps
    def prefill(self, q, k, v, q_lin=None, k_lin=None, key_valid: Optional[torch.Tensor] = None) -> SPLAOutput:
        """Run :func:`spla.spla_attn` on whole prompts (`[B, T, *]`, empty cache) and fill the cache in bulk.

        ``key_valid [B, T]`` (bool) marks real tokens of left/right-padded prompts: each row is then its own
        sequence of its real tokens (positions count real tokens only); padded rows of the outputs are 0.
        """
        if self.max_length != 0:
            return self.step(q, k, v, q_lin, k_lin)
        q_lin = q if q_lin is None else q_lin
        k_lin = k if k_lin is None else k_lin
        if key_valid is not None and not bool(key_valid.all()):
            return self._prefill_rows(q, k, v, q_lin, k_lin, key_valid)
        out = spla_attn(q, k, v, q_lin, k_lin, feature_map=self.fmap, scale=self.scale, **self.opts)
        for b in range(k.shape[0]):
            self._fill_row(b, k[b].detach(), v[b].detach(), k_lin[b].detach())
        return out

    def _prefill_rows(self, q, k, v, q_lin, k_lin, key_valid) -> SPLAOutput:
        B, T, HQ = q.shape[:3]
        acc = compute_dtype(q.dtype)
        o = q.new_zeros(B, T, HQ, self.Dv)
        o_rla = torch.zeros_like(o)
        mass = q.new_zeros(B, T, HQ, dtype=acc)
        indices = torch.full((B, T, self.H, self.topk), -1, dtype=torch.int32, device=q.device)
        for b in range(B):
            rows = key_valid[b].nonzero().flatten()
            if rows.numel() == 0:
                continue
            out = spla_attn(*(x[b, rows][None] for x in (q, k, v, q_lin, k_lin)), feature_map=self.fmap,
                            scale=self.scale, **self.opts)
            o[b, rows], o_rla[b, rows], mass[b, rows], indices[b, rows] = (x[0] for x in out)
            self._fill_row(b, k[b, rows].detach(), v[b, rows].detach(), k_lin[b, rows].detach())
        return SPLAOutput(o, o_rla, mass, indices)

    def _fill_row(self, b: int, k, v, k_lin) -> None:
        """Bulk-fill row ``b`` of an empty cache with a whole sequence (`[L, H, *]`)."""
        L, bs = k.shape[0], self.block_size
        self._grow(L)
        self.k[b, :L], self.v[b, :L], self.k_lin[b, :L] = k, v, k_lin
        nb = L // bs
        if nb:
            st = block_stats(k, bs, cov=self.cov, rep_keys=self.rep_keys)
            self.mean[b, :nb], self.second[b, :nb] = st.mean, st.second
            if self.rep_keys:
                self.reps[b, :nb] = st.reps
        fk = feature_map(k_lin, self.fmap)  # [L, H, F]
        self.S[b] += torch.einsum("thf,thd->hfd", fk, v.to(fk.dtype))
        self.z[b] += fk.sum(0)
        self.lengths[b] = L
        self.max_length = max(self.max_length, L)

    @torch.no_grad()
    def step(self, q, k, v, q_lin=None, k_lin=None) -> SPLAOutput:
        """Append ``n >= 1`` new tokens per sequence (`[B, n, *]`) and return their outputs, token by token."""
        q_lin = q if q_lin is None else q_lin
        k_lin = k if k_lin is None else k_lin
        outs = [self._step_one(q[:, i], k[:, i], v[:, i], q_lin[:, i], k_lin[:, i]) for i in range(q.shape[1])]
        # one token (the common decode step): views, no copies
        return SPLAOutput(*(x[0].unsqueeze(1) if len(x) == 1 else torch.stack(x, 1) for x in zip(*outs)))

    def _step_one(self, q, k, v, q_lin, k_lin):
        """One token per sequence: q `[B, HQ, D]`, k `[B, H, D]`, v `[B, H, Dv]`."""
        if self.backend == "triton":
            from spla.ops.spla.decode_kernels import decode_attend, decode_select
            self._claim_slot()
            # contiguous before the step's first launch: a copy between two of its launches would keep the later
            # one from starting early (decode_kernels.LAUNCH["pdl"])
            q, k, v, q_lin, k_lin = (x.contiguous() for x in (q, k, v, q_lin, k_lin))
            self.lengths += 1  # the kernels write the token at lengths - 1 and update the state
            indices = decode_select(self, q, new=(k, v, k_lin))
            o, o_rla, mass = decode_attend(self, q, q_lin, indices, new=(k_lin, v))
            return o, o_rla, mass, indices
        self._append(k, v, k_lin)
        B, HQ, D = q.shape
        H, G, bs = self.H, HQ // self.H, self.block_size
        acc = compute_dtype(q.dtype)
        o = q.new_zeros(B, HQ, self.Dv, dtype=acc)
        o_rla = torch.zeros_like(o)
        mass = q.new_zeros(B, HQ, dtype=acc)
        indices = torch.full((B, H, self.topk), -1, dtype=torch.int32, device=q.device)
        heads = torch.arange(H, device=q.device)[:, None]
        for b in range(B):
            t = int(self.lengths[b]) - 1
            c = t // bs
            qb = q[b].to(acc).view(1, H, G, D)
            kb = None
            if self.selection == "oracle":  # the yardstick reads every key of the complete blocks
                kb = self.k[b, :c * bs].to(acc).view(c, bs, H, D)
            stats = BlockStats(self.mean[b].to(acc), self.second[b].to(acc),
                               self.reps[b].to(acc) if self.rep_keys else None)
            sel = select_query_block(qb, c, stats, kb, block_size=bs, topk=self.topk, sink_blocks=self.sink_blocks,
                                     local_blocks=self.local_blocks, selection=self.selection, cov=self.cov,
                                     scale=self.scale)[0]  # [H, m]
            indices[b, :, :sel.shape[-1]] = sel.to(torch.int32)
            # gather the selected blocks only: [H, nsel * bs, *]
            pos = (sel[..., None] * bs + torch.arange(bs, device=q.device)).flatten(1)
            K, V, KL = (x[b, pos.clamp(max=x.shape[1] - 1), heads].to(acc) for x in (self.k, self.v, self.k_lin))
            valid = pos <= t
            fq = feature_map(q_lin[b].view(1, H, G, -1), self.fmap)
            ob, sel_lin, sel_mass = _sparse_chunk(qb, fq, K, V, feature_map(KL, self.fmap), valid[None], self.scale)
            o[b] = ob.flatten(1, 2)[0]
            if int(valid.sum(-1).min()) <= t:  # some visible token is unselected in at least one group
                glob = torch.einsum("hgf,hfd->hgd", fq[0], self.S[b])
                gmass = torch.einsum("hgf,hf->hg", fq[0], self.z[b])
                empty = (valid.sum(-1) == t + 1)[:, None]  # [H, 1]: count, never trust cancellation
                o_rla[b] = torch.where(empty[..., None], 0.0, glob - sel_lin[0]).flatten(0, 1)
                mass[b] = torch.where(empty, 0.0, gmass - sel_mass[0]).flatten()
        return o.to(q.dtype), o_rla.to(q.dtype), mass, indices
