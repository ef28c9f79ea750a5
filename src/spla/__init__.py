# -*- coding: utf-8 -*-
"""spla: Block Sparse Plus Linear Attention (SPLA) for long-context language models."""

import importlib.util as _ilu

from spla.layers import SPLAAttention, SPLAConfig
from spla.ops import SPLAOutput, spla_attn, topk_attn

__version__ = "0.1.0"
__all__ = ["spla_attn", "topk_attn", "SPLAOutput", "SPLAConfig", "SPLAAttention", "convert", "load", "__version__"]

if _ilu.find_spec("transformers") is not None:
    # HF integration: `convert`, `load`, and AutoModelForCausalLM.from_pretrained on saved SPLA models
    from spla.models import convert, load, register_auto_classes as _register

    _register()
else:  # the op and the layer work without transformers
    def convert(*args, **kwargs):
        raise ImportError("spla.convert needs transformers: pip install -e '.[hf]'")

    def load(*args, **kwargs):
        raise ImportError("spla.load needs transformers: pip install -e '.[hf]'")
