# -*- coding: utf-8 -*-
"""The SPLA attention layer (SPEC §6) and its configuration.

:class:`SPLAAttention` is a drop-in token mixer for Llama-like decoders: q, k, v projections (plus the
optional per-head q/k RMSNorm of Qwen3), RoPE on the attention q, k only, :func:`spla.spla_attn` with the
pre-RoPE q, k as the linear-branch inputs, a per-head merge of the two outputs, then ``o_proj``.

Two ways to compute the attention itself (``SPLAConfig.impl``):

- ``"op"``: :func:`spla.spla_attn` (Triton kernels on CUDA, the chunked torch backend on CPU). This is the
  contract; use it for training and prefill on a GPU.
- ``"blocks"``: the selection of the op (``spla.ops.spla.chunk.select_rows`` and the shared block-score definitions of
  ``spla.ops.spla.utils``), then exact softmax attention per query block over the union of the blocks its
  tokens selected, masked per token. It is the fast path on CPU, handles query rows that come after a KV
  cache (decoding), and skips the linear branch when it cannot contribute (``merge="none"``, or
  ``merge="residual"`` with an all-zero norm weight and no gradient needed: a freshly converted model).

``"auto"`` (default) takes ``"op"`` on CUDA and ``"blocks"`` elsewhere. Both give the same outputs up to
fp rounding (``tests/test_layers.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from spla.ops import spla_attn, topk_attn
from spla.ops.spla.chunk import chunk_global_linear_attn, select_rows
from spla.ops.spla.decode import SPLADecodeState
from spla.ops.spla.utils import BACKENDS, COVS, FEATURE_MAPS, SELECTIONS, compute_dtype, feature_map

MERGES = ("residual", "rattention", "none")
RLA_NORMS = ("rmsnorm", "mass")
IMPLS = ("auto", "op", "blocks")


def _bad(field: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"SPLAConfig.{field} must be {expected}, got {value!r}")


@dataclass
class SPLAConfig:
    """Options of an SPLA model: the operator's (SPEC §2-§5) and the layer's (SPEC §6).

    Operator options (passed to :func:`spla.spla_attn`):
        block_size: tokens per KV block. topk: blocks each token attends to, forced ones included.
        sink_blocks / local_blocks: leading / trailing (own included, >= 1) blocks always selected.
        selection: ``"taylor2"`` (second-order estimate), ``"taylor1"`` (mean key, as MoBA / InfLLM-V2) or
        ``"oracle"`` (exact block mass, reads every key: a yardstick). cov: ``"diag"`` or ``"full"``.
        rep_keys: representative keys per block (0..4) that floor the estimate.
        feature_map: linear-branch feature map, ``"softmax2"``, ``"elu1"`` or ``"relu2"``.
        backend: op backend, ``None`` (Triton on CUDA, torch on CPU), ``"triton"``, ``"torch"``, ``"naive"``.

    Layer options:
        merge: ``"residual"`` (convert a dense model: ``o = o_sparse + RMSNorm_w(o_rla)``, ``w`` = 0 at start,
        so a fresh conversion computes exactly top-k sparse attention) or ``"rattention"``
        (``o = RMSNorm_a(o_sparse) + RMSNorm_b(o_rla)``, weights 1, for training from scratch) or ``"none"``
        (``o = o_sparse``: top-k block-sparse attention only, no residual branch and no merge parameters; the
        baseline SPLA is compared with).
        rla_norm: how ``o_rla`` is normalized before its per-head, per-channel weight: ``"rmsnorm"``
        (RMS over the head dim, as RAttention) or ``"mass"`` (divide by ``rla_mass``: normalized linear attention);
        unused with ``merge="none"``.
        norm_eps: epsilon of those norms. impl: ``"auto"``, ``"op"`` or ``"blocks"`` (see the module docstring).
    """

    block_size: int = 64
    topk: int = 16
    sink_blocks: int = 1
    local_blocks: int = 2
    selection: str = "taylor2"
    cov: str = "diag"
    rep_keys: int = 1
    feature_map: str = "softmax2"
    backend: Optional[str] = None
    merge: str = "residual"
    rla_norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    impl: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "SPLAConfig":
        """Raise ``ValueError`` naming the first bad field."""
        for name, minimum in (("block_size", 1), ("topk", 1), ("sink_blocks", 0), ("local_blocks", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise _bad(name, f"an int >= {minimum}", value)
        if self.topk < self.sink_blocks + self.local_blocks:
            raise _bad("topk", f">= sink_blocks + local_blocks = {self.sink_blocks + self.local_blocks} "
                               f"(topk counts the forced blocks too)", self.topk)
        for name, choices in (("selection", SELECTIONS), ("cov", COVS), ("feature_map", FEATURE_MAPS),
                              ("merge", MERGES), ("rla_norm", RLA_NORMS), ("impl", IMPLS)):
            if getattr(self, name) not in choices:
                raise _bad(name, "one of " + ", ".join(map(repr, choices)), getattr(self, name))
        if self.backend is not None and self.backend not in BACKENDS:
            raise _bad("backend", "None or one of " + ", ".join(map(repr, BACKENDS)), self.backend)
        r = self.rep_keys
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= 4 or r > self.block_size:
            raise _bad("rep_keys", f"an int in 0..{min(4, self.block_size)}", r)
        e = self.norm_eps
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not e > 0:
            raise _bad("norm_eps", "a positive float", e)
        return self

    def replace(self, **changes: Any) -> "SPLAConfig":
        """A validated copy with some fields changed (unknown names raise ``ValueError``)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"SPLAConfig has no field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SPLAConfig":
        if isinstance(d, SPLAConfig):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"SPLAConfig.from_dict needs a dict, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"SPLAConfig has no field(s) {sorted(unknown)}")
        return cls(**d)

    def op_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of :func:`spla.spla_attn` this config sets."""
        return dict(block_size=self.block_size, topk=self.topk, sink_blocks=self.sink_blocks,
                    local_blocks=self.local_blocks, selection=self.selection, cov=self.cov, rep_keys=self.rep_keys,
                    feature_map=self.feature_map, backend=self.backend)


class GroupRMSNorm(nn.Module):
    """RMSNorm over the last dim with a weight per head and channel, ``[num_heads, dim]``, computed in fp32."""

    def __init__(self, num_heads: int, dim: int, eps: float = 1e-6, init: float = 1.0, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.init_value = float(init)
        self.weight = nn.Parameter(torch.full((num_heads, dim), float(init), device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(self.init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype != torch.float64 else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y * self.weight.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (HF's rotate-half convention) on ``x [B, T, H, D]`` with ``cos, sin [B, T, D]``."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return (x * cos) + (rotate_half(x) * sin)


def key_padding(attention_mask: Optional[torch.Tensor], B: int, Tk: int) -> Optional[torch.Tensor]:
    """Which of the ``Tk`` keys are real tokens, ``[B, Tk]`` bool, or ``None`` when all are.

    Accepts what HF models hand their attention modules: ``None``; a 2-D ``[B, Tk]`` 0/1 mask; a 4-D
    ``[B, 1, Tq, Tk]`` mask, boolean (True = attend) or additive float (0 = attend). For 4-D masks the last
    query row is read: under a causal + padding mask it sees exactly the non-padding keys.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"SPLAAttention supports tensor attention masks (2-D or 4-D), got "
                         f"{type(attention_mask).__name__}; use attn_implementation='sdpa' or 'eager'")
    m = attention_mask
    if m.dim() == 4:
        m = m[:, 0, -1, :]
        valid = m if m.dtype == torch.bool else m == 0
    elif m.dim() == 2:
        valid = m.bool()
    else:
        raise ValueError(f"attention_mask must be 2-D [B, T] or 4-D [B, 1, Tq, Tk], got shape {tuple(m.shape)}")
    if valid.shape[0] != B or valid.shape[-1] < Tk:
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not cover B={B}, keys={Tk}")
    valid = valid[:, :Tk]
    return None if bool(valid.all()) else valid


def cu_seqlens_from_position_ids(position_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Packed sequences of a ``B == 1`` batch from position ids that restart at 0 (HF's packing convention)."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    p = position_ids[0]
    starts = (p == 0).nonzero().flatten()
    if starts.numel() <= 1 or int(starts[0]) != 0:
        return None
    return torch.cat([starts, starts.new_tensor([p.numel()])]).to(torch.int32)


class SPLAAttention(nn.Module):
    """SPLA attention for a Llama-like decoder layer (SPEC §6).

    Args:
        hidden_size, num_heads, num_kv_heads, head_dim: the usual sizes (GQA when ``num_kv_heads < num_heads``).
        config (SPLAConfig): operator and merge options.
        layer_idx (int): index in the decoder, used for the HF KV cache.
        bias / o_bias: biases of the q/k/v and of the output projections.
        qk_norm (bool): per-head RMSNorm on q and k before RoPE (Qwen3); ``qk_norm_eps`` its epsilon.
        scale (float): softmax scale, default ``head_dim ** -0.5``.
        rope_theta (float): base of the built-in RoPE, used only when ``forward`` gets no ``position_embeddings``.
        q_proj, k_proj, v_proj, o_proj, q_norm, k_norm (nn.Module, optional): existing modules to adopt
            (conversion of a pretrained attention; their parameters are shared, not copied).

    ``forward(hidden_states, position_embeddings=(cos, sin), attention_mask=None, cache=None, ...)`` returns
    ``(output, None)`` like the HF attention modules. The HF KV cache holds ``[k_rope | k_pre_rope]`` as keys
    (twice the head dim) and ``v``: decoding recomputes the selection of the new tokens from the cached keys
    (correct, not yet the fast SPEC §7 cache).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, config: Optional[SPLAConfig] = None, layer_idx: Optional[int] = None,
                 bias: bool = False, o_bias: bool = False, qk_norm: bool = False, qk_norm_eps: float = 1e-6,
                 scale: Optional[float] = None, rope_theta: float = 10000.0, q_proj: Optional[nn.Module] = None,
                 k_proj: Optional[nn.Module] = None, v_proj: Optional[nn.Module] = None,
                 o_proj: Optional[nn.Module] = None, q_norm: Optional[nn.Module] = None,
                 k_norm: Optional[nn.Module] = None):
        super().__init__()
        self.spla_config = (config or SPLAConfig()).validate()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        self.head_dim = head_dim or hidden_size // num_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.layer_idx = layer_idx
        self.scaling = float(scale) if scale is not None else self.head_dim ** -0.5
        self.rope_theta = rope_theta
        self.is_causal = True
        D = self.head_dim
        self.q_proj = q_proj if q_proj is not None else nn.Linear(hidden_size, num_heads * D, bias=bias)
        self.k_proj = k_proj if k_proj is not None else nn.Linear(hidden_size, self.num_kv_heads * D, bias=bias)
        self.v_proj = v_proj if v_proj is not None else nn.Linear(hidden_size, self.num_kv_heads * D, bias=bias)
        self.o_proj = o_proj if o_proj is not None else nn.Linear(num_heads * D, hidden_size, bias=o_bias)
        if q_norm is None and qk_norm:
            q_norm, k_norm = GroupRMSNorm(1, D, qk_norm_eps), GroupRMSNorm(1, D, qk_norm_eps)
        self.q_norm, self.k_norm = q_norm, k_norm
        self._init_merge_norms()

    # ------------------------------------------------------------------ set-up
    def _init_merge_norms(self) -> None:
        c = self.spla_config
        w = self.q_proj.weight
        kw = dict(device=w.device, dtype=w.dtype if w.dtype.is_floating_point else None)
        if c.merge == "none":
            self.sparse_norm = self.rla_norm = None
        elif c.merge == "residual":
            self.sparse_norm = None
            self.rla_norm = GroupRMSNorm(self.num_heads, self.head_dim, c.norm_eps, init=0.0, **kw)
        else:
            self.sparse_norm = GroupRMSNorm(self.num_heads, self.head_dim, c.norm_eps, init=1.0, **kw)
            self.rla_norm = GroupRMSNorm(self.num_heads, self.head_dim, c.norm_eps, init=1.0, **kw)

    def merge_parameters(self) -> List[nn.Parameter]:
        """The merge's per-head scales (``rla_norm``, and ``sparse_norm`` for ``"rattention"``; none for
        ``"none"``): what training should neither weight-decay nor, for a converted model whose residual scale
        starts at 0, leave at the base learning rate (see ``TrainConfig.merge_lr_mult``)."""
        return [m.weight for m in (self.sparse_norm, self.rla_norm) if m is not None]

    def set_config(self, config: SPLAConfig) -> None:
        """Change the operator options (selection, topk, ...) in place; the merge kind cannot change."""
        config = SPLAConfig.from_dict(config).validate()
        if config.merge != self.spla_config.merge:
            raise ValueError(f"SPLAConfig.merge cannot change on an existing layer ({self.spla_config.merge!r} -> "
                             f"{config.merge!r}); convert the dense model again")
        self.spla_config = config
        for m in (self.sparse_norm, self.rla_norm):
            if m is not None:
                m.eps = config.norm_eps

    def extra_repr(self) -> str:
        c = self.spla_config
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"block_size={c.block_size}, topk={c.topk}, selection={c.selection}, rep_keys={c.rep_keys}, "
                f"merge={c.merge}, impl={c.impl}")

    # ------------------------------------------------------------------ forward
    def _rope(self, T: int, past: int, position_ids, device, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=device)[None]
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim))
        freqs = position_ids.float()[..., None] * inv
        emb = torch.cat([freqs, freqs], -1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                attention_mask: Optional[torch.Tensor] = None, cache: Optional[Any] = None,
                past_key_values: Optional[Any] = None, position_ids: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None, **kwargs: Any) -> Tuple[torch.Tensor, None]:
        B, T, _ = hidden_states.shape
        HQ, H, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(hidden_states).view(B, T, HQ, D)
        k = self.k_proj(hidden_states).view(B, T, H, D)
        v = self.v_proj(hidden_states).view(B, T, H, -1)
        if self.q_norm is not None:
            q, k = self.q_norm(q).to(q.dtype), self.k_norm(k).to(k.dtype)
        cache = cache if cache is not None else past_key_values
        if position_embeddings is None:
            past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
            position_embeddings = self._rope(T, past, position_ids, q.device, q.dtype)
        cos, sin = position_embeddings
        # under autocast q, k, v come out of the projections in the autocast dtype while HF's cos/sin stay fp32
        q_rope, k_rope = apply_rope(q, cos, sin).to(q.dtype), apply_rope(k, cos, sin).to(k.dtype)
        k_all, k_lin_all, v_all = k_rope, k, v
        if cache is not None and hasattr(cache, "layer_state"):  # an SPLA decode cache (spla.models.SPLACache)
            o = self._cached_attend(cache, q_rope, k_rope, v, q, k, attention_mask)
            return self.o_proj(o.to(hidden_states.dtype).reshape(B, T, -1)), None
        if cache is not None:
            kk, vv = cache.update(torch.cat([k_rope, k], -1).transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            kk, v_all = kk.transpose(1, 2), vv.transpose(1, 2)
            k_all, k_lin_all = kk[..., :D], kk[..., D:]
        Tk = k_all.shape[1]
        if cu_seqlens is None:
            cu_seqlens = kwargs.get("cu_seq_lens_q")
            if cu_seqlens is None and Tk == T:
                cu_seqlens = cu_seqlens_from_position_ids(position_ids)
        # a packed batch's documents come from cu_seqlens: its block-diagonal 4-D mask is not key padding
        valid = key_padding(attention_mask, B, Tk) if cu_seqlens is None else None
        if cu_seqlens is not None and (B != 1 or Tk != T):
            raise ValueError("cu_seqlens needs a packed batch (B == 1) without a KV cache")
        o_sparse, o_rla, mass = self.attend(q_rope, k_all, v_all, q, k_lin_all, valid, cu_seqlens)
        o = self.merge(o_sparse, o_rla, mass).to(hidden_states.dtype)
        return self.o_proj(o.reshape(B, T, -1)), None

    def _cached_attend(self, cache: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lin: torch.Tensor,
                       k_lin: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """SPEC §7 decoding: the first call prefills this layer's decode state in bulk, later calls append tokens
        and read only the block statistics, the selected blocks and the linear state."""
        B, T, HQ, D = q.shape
        c = self.spla_config
        opts = c.op_kwargs()
        backend = opts.pop("backend")
        fmap = opts.pop("feature_map")
        state = cache.layer_state(self.layer_idx, lambda: SPLADecodeState(
            B, self.num_kv_heads, D, v.shape[-1], k_lin.shape[-1], feature_map=fmap, scale=self.scaling,
            dtype=q.dtype, device=q.device, backend="torch" if backend in ("torch", "naive") else None, **opts),
            n_new=T)
        if state.max_length == 0:
            past = cache.get_seq_length(self.layer_idx) - T
            valid = key_padding(attention_mask, B, past + T)
            out = state.prefill(q, k, v, q_lin, k_lin, key_valid=None if valid is None else valid[:, past:])
        else:
            out = state.step(q, k, v, q_lin, k_lin)
        return self.merge(out.o_sparse, out.o_rla, out.rla_mass)

    def merge(self, o_sparse: torch.Tensor, o_rla: torch.Tensor, rla_mass: torch.Tensor) -> torch.Tensor:
        """Per-head merge of SPEC §6 (fp32); ``merge="none"`` passes ``o_sparse`` through."""
        c = self.spla_config
        acc = torch.promote_types(o_sparse.dtype, torch.float32)
        if c.merge == "none":
            return o_sparse.to(acc)
        if c.rla_norm == "mass":
            r = o_rla.to(acc) / (rla_mass.to(acc)[..., None] + c.norm_eps) * self.rla_norm.weight.to(acc)
        else:
            r = self.rla_norm(o_rla)
        s = o_sparse.to(acc) if self.sparse_norm is None else self.sparse_norm(o_sparse)
        return s + r

    def need_rla(self) -> bool:
        """Whether ``o_rla`` can change the output (or a gradient) of this layer."""
        if self.rla_norm is None:  # merge="none"
            return False
        if self.sparse_norm is not None:
            return True
        w = self.rla_norm.weight
        return bool(w.requires_grad and torch.is_grad_enabled()) or bool(w.detach().ne(0).any())

    def resolve_impl(self, x: torch.Tensor) -> str:
        impl = self.spla_config.impl
        if impl == "auto":
            impl = "op" if x.is_cuda else "blocks"
        return impl

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lin: torch.Tensor, k_lin: torch.Tensor,
               key_valid: Optional[torch.Tensor] = None,
               cu_seqlens: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SPLA outputs of the ``Tq`` query rows, which are the last ``Tq`` of the ``Tk`` keys.

        q `[B, Tq, HQ, D]`, k `[B, Tk, H, D]`, v `[B, Tk, H, Dv]`, q_lin `[B, Tq, HQ, Dl]`, k_lin `[B, Tk, H, Dl]`;
        ``key_valid [B, Tk]`` marks real tokens (padding is dropped and positions count real tokens only).
        Returns ``o_sparse, o_rla [B, Tq, HQ, Dv]`` and ``rla_mass [B, Tq, HQ]``; rows of padding tokens are 0.
        """
        B, Tq, HQ, _ = q.shape
        Tk, Dv = k.shape[1], v.shape[-1]
        impl = self.resolve_impl(q)
        # the op returns o_rla (zero for merge="none"); rows computed here match it unless nothing reads them
        need = self.need_rla() or (impl == "op" and self.rla_norm is not None)
        if impl == "op" and key_valid is None and Tq == Tk:
            out = self.op(q, k, v, q_lin, k_lin, cu_seqlens)
            return out.o_sparse, out.o_rla, out.rla_mass
        acc = compute_dtype(q.dtype)
        o_sparse = q.new_zeros(B, Tq, HQ, Dv, dtype=acc)
        o_rla = q.new_zeros(B, Tq, HQ, Dv, dtype=acc)
        mass = q.new_zeros(B, Tq, HQ, dtype=acc)
        off = Tk - Tq
        for b in range(B):
            if key_valid is not None:
                seqs = [key_valid[b].nonzero().flatten()]
            elif cu_seqlens is not None:
                cu = cu_seqlens.tolist()
                seqs = [torch.arange(cu[i], cu[i + 1], device=q.device) for i in range(len(cu) - 1) if cu[i + 1] > cu[i]]
            else:
                seqs = [torch.arange(Tk, device=q.device)]
            for kidx in seqs:
                rows = kidx[kidx >= off] - off
                n, L = rows.numel(), kidx.numel()
                if n == 0:
                    continue
                args = (q[b, rows], k[b, kidx], v[b, kidx], q_lin[b, rows], k_lin[b, kidx])
                if impl == "op" and n == L:
                    out = self.op(*(x[None] for x in args))
                    res = (out.o_sparse[0], out.o_rla[0], out.rla_mass[0])
                else:
                    res = self.blocks_attend(*args, need_rla=need)
                o_sparse[b, rows], o_rla[b, rows], mass[b, rows] = (r.to(acc) for r in res)
        return o_sparse, o_rla, mass

    def op(self, q, k, v, q_lin, k_lin, cu_seqlens: Optional[torch.Tensor] = None):
        """The operator with this layer's options: :func:`spla.spla_attn`, or :func:`spla.topk_attn` (no linear
        branch computed at all) for ``merge="none"``."""
        opts = self.spla_config.op_kwargs()
        if self.spla_config.merge == "none":
            opts.pop("feature_map")
            return topk_attn(q, k, v, scale=self.scaling, cu_seqlens=cu_seqlens, **opts)
        return spla_attn(q, k, v, q_lin, k_lin, scale=self.scaling, cu_seqlens=cu_seqlens, **opts)

    # ------------------------------------------------------------------ the "blocks" path
    @torch.no_grad()
    def select_rows(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Selected blocks `[n, H, topk]` (int32, ascending, -1 padded) of the last ``n`` tokens of a sequence.

        q `[n, HQ, D]` are the queries of positions ``L-n .. L-1`` of the sequence whose keys are k `[L, H, D]`.
        Same rule and the same shared definitions (``spla.ops.spla.utils``) as the op's selection.
        """
        c = self.spla_config
        return select_rows(q, k, k.shape[0] - q.shape[0], block_size=c.block_size, topk=c.topk,
                           sink_blocks=c.sink_blocks, local_blocks=c.local_blocks, selection=c.selection, cov=c.cov,
                           rep_keys=c.rep_keys, scale=self.scaling)

    def blocks_attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lin: torch.Tensor,
                      k_lin: torch.Tensor, need_rla: bool = True,
                      indices: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SPLA outputs for the last ``n`` tokens of one sequence (q `[n, HQ, D]`, k `[L, H, D]`, ...).

        Per query block: gather the union of the blocks its tokens selected, exact softmax attention masked to
        each token's own selection (and causality). With ``need_rla`` the linear branch is ``global - selected``
        over the same gathered tiles, exactly 0 where nothing visible is unselected; without, ``o_rla`` is 0.
        """
        c = self.spla_config
        n, HQ, D = q.shape
        L, H = k.shape[:2]
        Dv = v.shape[-1]
        G, bs, p0 = HQ // H, c.block_size, L - n
        acc = compute_dtype(q.dtype)
        if indices is None:
            indices = self.select_rows(q.detach(), k.detach())
        nb_all = (L + bs - 1) // bs

        def blocks(x):  # [L, H, d] -> [H, NB, bs, d], zero padded
            xp = x.to(acc).new_zeros(nb_all * bs, H, x.shape[-1])
            xp[:L] = x.to(acc)
            return xp.view(nb_all, bs, H, -1).permute(2, 0, 1, 3)

        kb, vb = blocks(k), blocks(v)
        klb = blocks(feature_map(k_lin, c.feature_map)) if need_rla else None
        heads = torch.arange(H, device=q.device)[:, None]
        # head-major layouts so that every product below is one bmm over the H KV heads
        qh = q.to(acc).view(n, H, G, D).transpose(0, 1).contiguous()  # [H, n, G, D]
        fqh = feature_map(q_lin, c.feature_map).view(n, H, G, -1).transpose(0, 1).contiguous() if need_rla else None
        oh = qh.new_empty(H, n, G, Dv)
        if need_rla:
            lh, mh, cnt = qh.new_empty(H, n, G, Dv), qh.new_empty(H, n, G), qh.new_empty(H, n)
        ar = torch.arange(bs, device=q.device)
        for blk in range(p0 // bs, (L - 1) // bs + 1):
            r0, r1 = max(blk * bs, p0) - p0, min((blk + 1) * bs, L) - p0
            m = r1 - r0
            ids = indices[r0:r1].long().transpose(0, 1)  # [H, m, K]
            present = torch.zeros(H, m, nb_all + 1, dtype=torch.bool, device=q.device)
            present = present.scatter_(2, torch.where(ids >= 0, ids, nb_all), True)[..., :nb_all]  # -1 -> dummy
            used = present.any(1)  # [H, NB]
            U = int(used.sum(-1).max())
            order = torch.sort(used.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :U]  # [H, U]
            ok = torch.gather(used, 1, order)
            K = kb[heads, order].reshape(H, U * bs, D)
            V = vb[heads, order].reshape(H, U * bs, Dv)
            tok = (order[..., None] * bs + ar).reshape(H, 1, U * bs)
            rowmask = (torch.gather(present, 2, order[:, None].expand(H, m, U)) & ok[:, None]).repeat_interleave(bs, -1)
            pos = torch.arange(p0 + r0, p0 + r1, device=q.device)
            mask = rowmask & (tok <= pos[None, :, None])  # [H, m, U*bs]
            sc = torch.bmm(qh[:, r0:r1].reshape(H, m * G, D), K.transpose(1, 2)).view(H, m, G, U * bs)
            sc.mul_(self.scaling).masked_fill_(~mask[:, :, None], float("-inf"))
            p = torch.softmax(sc, -1).view(H, m * G, U * bs)
            oh[:, r0:r1] = torch.bmm(p, V).view(H, m, G, Dv)
            if need_rla:
                KL = klb[heads, order].reshape(H, U * bs, -1)
                w = torch.bmm(fqh[:, r0:r1].reshape(H, m * G, -1), KL.transpose(1, 2)).view(H, m, G, U * bs)
                w = w * mask[:, :, None]
                lh[:, r0:r1] = torch.bmm(w.view(H, m * G, -1), V).view(H, m, G, Dv)
                mh[:, r0:r1] = w.sum(-1)
                cnt[:, r0:r1] = mask.sum(-1)  # selected visible tokens
        o_sparse = oh.transpose(0, 1).reshape(n, HQ, Dv)
        if not need_rla:
            return o_sparse, torch.zeros_like(o_sparse), o_sparse.new_zeros(n, HQ)
        sel_lin, sel_mass = lh.transpose(0, 1).reshape(n, HQ, Dv), mh.transpose(0, 1).reshape(n, HQ)
        count = cnt.transpose(0, 1)  # [n, H]
        fq = feature_map(q_lin, c.feature_map)
        fk = feature_map(k_lin, c.feature_map)
        if p0 == 0:
            glob, glob_mass = chunk_global_linear_attn(fq[None], fk[None], v[None].to(fq.dtype))
            glob, glob_mass = glob[0], glob_mass[0]
        else:
            w = torch.einsum("nhgf,lhf->nhgl", fq.view(n, H, G, -1), fk)
            causal = torch.arange(L, device=q.device)[None] <= torch.arange(p0, L, device=q.device)[:, None]
            w = w * causal[:, None, None]
            glob = torch.einsum("nhgl,lhd->nhgd", w, v.to(w.dtype)).reshape(n, HQ, Dv)
            glob_mass = w.sum(-1).reshape(n, HQ)
        pos = torch.arange(p0, L, device=q.device)
        empty = (count == (pos + 1)[:, None]).repeat_interleave(G, dim=1)  # [n, HQ]
        o_rla = torch.where(empty[..., None], 0.0, glob.to(acc) - sel_lin)
        rla_mass = torch.where(empty, 0.0, glob_mass.to(acc) - sel_mass)
        return o_sparse, o_rla, rla_mass


def spla_layers(model: nn.Module) -> List[SPLAAttention]:
    """All :class:`SPLAAttention` modules of a model, in order."""
    return [m for m in model.modules() if isinstance(m, SPLAAttention)]


__all__ = ["SPLAConfig", "SPLAAttention", "GroupRMSNorm", "apply_rope", "key_padding", "spla_layers",
           "cu_seqlens_from_position_ids", "MERGES", "RLA_NORMS", "IMPLS"]
