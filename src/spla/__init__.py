# -*- coding: utf-8 -*-
"""spla: Block Sparse Plus Linear Attention (SPLA) for long-context language models."""

from spla.ops import SPLAOutput, spla_attn

__version__ = "0.1.0"
__all__ = ["spla_attn", "SPLAOutput", "__version__"]
