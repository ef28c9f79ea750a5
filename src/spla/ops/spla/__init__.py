# -*- coding: utf-8 -*-
from spla.ops.spla.chunk import chunk_spla_attn
from spla.ops.spla.interface import spla_attn, topk_attn
from spla.ops.spla.naive import naive_spla_attn
from spla.ops.spla.utils import SPLAOutput

__all__ = ["spla_attn", "topk_attn", "naive_spla_attn", "chunk_spla_attn", "SPLAOutput"]
