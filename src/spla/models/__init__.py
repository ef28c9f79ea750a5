# -*- coding: utf-8 -*-
"""Pretrained HF causal LMs with SPLA attention: :func:`convert`, :func:`load`, the embedded SmolLM2, :func:`greedy_generate`."""

from spla.models.cache import SPLACache
from spla.models.convert import SUPPORTED_ARCHITECTURES, convert, register_auto_classes, spla_config_of
from spla.models.generation import greedy_generate
from spla.models.loading import SMOLLM2_GGUF, load, load_tokenizer, smollm2_dir

__all__ = ["convert", "load", "greedy_generate", "SPLACache", "load_tokenizer", "smollm2_dir", "spla_config_of", "register_auto_classes",
           "SUPPORTED_ARCHITECTURES", "SMOLLM2_GGUF"]
