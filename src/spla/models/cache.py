# -*- coding: utf-8 -*-
"""``SPLACache``: a transformers ``Cache`` whose layers are SPLA decode states (SPEC §7).

Each layer holds a :class:`spla.ops.spla.decode.SPLADecodeState`: K, V and k_lin, the block statistics of
complete blocks, and the fp32 linear state. The first forward through a layer prefills it in bulk (the
parallel op, then statistics and state in one pass); later forwards append tokens and read only the block
statistics, the selected blocks and the state. ``SPLAAttention`` recognizes this cache and uses it.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from spla.ops.spla.decode import SPLADecodeState


class SPLACacheLayer(CacheLayerMixin):
    """One layer's SPLA decode state behind the transformers cache-layer interface."""

    is_compileable = False
    is_croppable = False

    def __init__(self, **kwargs):
        super().__init__()
        self.state: Optional[SPLADecodeState] = None
        self.seen = 0  # positions the model has fed through this layer (padding included)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def set_state(self, state: SPLADecodeState) -> None:
        self.state = state
        self.dtype, self.device = state.dtype, state.k.device
        self.keys, self.values = state.k, state.v
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        raise ValueError("SPLACache layers are filled by SPLAAttention (spla.convert-ed models), not by a dense "
                         "attention's cache.update; use a DynamicCache for unconverted layers")

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = None
        self.seen = 0
        self.keys = self.values = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("SPLACache does not support beam search yet; use greedy or sampling decoding")


class SPLACache(Cache):
    """The cache converted models generate with: one :class:`SPLACacheLayer` per decoder layer."""

    def __init__(self, num_layers: Optional[int] = None, config=None, **kwargs):
        if num_layers is None and config is not None:
            num_layers = getattr(config, "num_hidden_layers", None)
        layers: List[SPLACacheLayer] = [SPLACacheLayer() for _ in range(num_layers or 0)]
        super().__init__(layers=layers)

    def layer_state(self, layer_idx: int, create: Callable[[], SPLADecodeState], n_new: int = 0) -> SPLADecodeState:
        """The decode state of ``layer_idx`` (created by ``create()`` on first use); ``n_new`` positions arrive."""
        while len(self.layers) <= layer_idx:
            self.layers.append(SPLACacheLayer())
        layer = self.layers[layer_idx]
        if layer.state is None:
            layer.set_state(create())
        layer.seen += n_new
        return layer.state

    def reserve(self, n: int) -> None:
        """Room for ``n`` more tokens in every layer's state now, so the next ``n`` steps allocate nothing and
        can be captured in a CUDA graph (:meth:`SPLADecodeState.reserve`)."""
        for layer in self.layers:
            if layer.state is not None:
                layer.state.reserve(n)

    def count_replays(self, n: int) -> None:
        """After a captured step was replayed ``n`` times: its host-side counters (positions seen, the decode
        states' ``max_length``) moved once, at the capture, while the device ones moved at every replay."""
        for layer in self.layers:
            layer.seen += n - 1
            if layer.state is not None:
                layer.state.max_length += n - 1
