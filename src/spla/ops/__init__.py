# -*- coding: utf-8 -*-
from spla.ops.spla import SPLAOutput, chunk_spla_attn, naive_spla_attn, spla_attn, topk_attn

__all__ = ["spla_attn", "topk_attn", "naive_spla_attn", "chunk_spla_attn", "SPLAOutput"]
