# -*- coding: utf-8 -*-
"""Turn a pretrained dense HF causal LM into an SPLA model, in place.

Every decoder layer's ``self_attn`` is replaced by :class:`spla.layers.SPLAAttention`, which adopts the
existing q/k/v/o projections (and Qwen3's q_norm/k_norm) without copying them, so the state-dict keys of the
dense checkpoint stay valid; the only new parameters are the merge norms (``self_attn.rla_norm.weight``, and
``self_attn.sparse_norm.weight`` for ``merge="rattention"``).

The model's config and class are switched to registered ``SPLA<Arch>Config`` / ``SPLA<Arch>ForCausalLM``
subclasses (model types ``spla_llama``, ``spla_mistral``, ``spla_qwen2``, ``spla_qwen3``) whose config
carries the SPLA options under ``spla``. ``save_pretrained`` therefore writes a ``config.json`` that
``AutoModelForCausalLM.from_pretrained`` rebuilds as the converted model once ``spla`` is imported.
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple, Type, Union

import torch.nn as nn

from spla.layers.spla import GroupRMSNorm, SPLAAttention, SPLAConfig
from spla.models.cache import SPLACache

#: model_type -> (transformers module, config class, causal-LM class)
SUPPORTED_ARCHITECTURES: Dict[str, Tuple[str, str, str]] = {
    "llama": ("transformers.models.llama", "LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("transformers.models.mistral", "MistralConfig", "MistralForCausalLM"),
    "qwen2": ("transformers.models.qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("transformers.models.qwen3", "Qwen3Config", "Qwen3ForCausalLM"),
}
PREFIX = "spla_"
_CLASSES: Dict[str, Tuple[type, type]] = {}


def _base_model_type(model_type: Optional[str]) -> Optional[str]:
    if model_type and model_type.startswith(PREFIX):
        return model_type[len(PREFIX):]
    return model_type


def spla_classes(base: str) -> Tuple[Type, Type]:
    """The ``(SPLA<Arch>Config, SPLA<Arch>ForCausalLM)`` pair of a supported model type (built once)."""
    if base in _CLASSES:
        return _CLASSES[base]
    import importlib
    mod_name, cfg_name, lm_name = SUPPORTED_ARCHITECTURES[base]
    mod = importlib.import_module(mod_name)
    cfg_cls, lm_cls = getattr(mod, cfg_name), getattr(mod, lm_name)
    spla_cfg = type("SPLA" + cfg_name, (cfg_cls,), {"model_type": PREFIX + base, "__module__": __name__,
                                                   "__doc__": f"{cfg_name} plus the SPLA options under ``spla``."})

    def __init__(self, config):
        lm_cls.__init__(self, config)
        convert(self, SPLAConfig.from_dict(getattr(config, "spla", None) or {}))

    def _init_weights(self, module):
        if isinstance(module, GroupRMSNorm):
            module.reset_parameters()
        else:
            lm_cls._init_weights(self, module)

    def generate(self, *args, **kwargs):
        """``generate`` with the SPLA decode cache by default (greedy / sampling; beam search keeps HF's cache)."""
        gen = kwargs.get("generation_config") or self.generation_config
        beams = kwargs.get("num_beams", getattr(gen, "num_beams", 1) or 1)
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is None and beams == 1 \
                and kwargs.get("use_cache", True) is not False:
            kwargs["past_key_values"] = SPLACache(config=self.config)
        with warnings.catch_warnings():  # newer transformers call it `cache`; the old name works in all 5.x
            warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
            return lm_cls.generate(self, *args, **kwargs)

    spla_lm = type("SPLA" + lm_name, (lm_cls,), {"config_class": spla_cfg, "__init__": __init__,
                                                "_init_weights": _init_weights, "generate": generate,
                                                "__module__": __name__,
                                                "__doc__": f"{lm_name} whose attention layers are SPLAAttention."})
    _CLASSES[base] = (spla_cfg, spla_lm)
    return spla_cfg, spla_lm


def register_auto_classes() -> None:
    """Register the SPLA config/model classes with transformers' Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    for base in SUPPORTED_ARCHITECTURES:
        cfg_cls, lm_cls = spla_classes(base)
        try:
            AutoConfig.register(PREFIX + base, cfg_cls, exist_ok=True)
            AutoModelForCausalLM.register(cfg_cls, lm_cls, exist_ok=True)
        except TypeError:  # older signatures without exist_ok
            try:
                AutoConfig.register(PREFIX + base, cfg_cls)
                AutoModelForCausalLM.register(cfg_cls, lm_cls)
            except ValueError:
                pass


def _drop_sliding_window(model: nn.Module) -> None:
    cfg = model.config
    uses = getattr(cfg, "sliding_window", None) is not None and (
        getattr(cfg, "use_sliding_window", True) or "sliding_attention" in (getattr(cfg, "layer_types", None) or []))
    if uses:
        warnings.warn(f"spla.convert: the sliding window ({cfg.sliding_window} tokens) of this "
                      f"{type(model).__name__} is dropped: SPLA layers select blocks from the whole causal context. "
                      "Below the window length the dense model's outputs are reproduced exactly.", stacklevel=3)
    if hasattr(cfg, "sliding_window"):
        cfg.sliding_window = None
    if hasattr(cfg, "use_sliding_window"):
        cfg.use_sliding_window = False
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = ["full_attention"] * len(cfg.layer_types)
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "has_sliding_layers"):
        inner.has_sliding_layers = False


def convert(model: nn.Module, config: Optional[Union[SPLAConfig, dict]] = None) -> nn.Module:
    """Replace the attention of every decoder layer of ``model`` by :class:`SPLAAttention`, in place.

    Args:
        model: a transformers ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` or
            ``Qwen3ForCausalLM`` (dense, or already converted: then only the options change).
        config: :class:`SPLAConfig` or a dict of its fields; default ``SPLAConfig()``.
    Returns:
        the same ``model`` object, now an SPLA model. With ``merge="residual"`` (default) and fresh merge
        weights it computes exactly top-k block-sparse attention; with ``topk`` covering all blocks it
        reproduces the dense model.
    Raises:
        ValueError: for any other architecture (named in the message) or a bad config field.
    """
    config = SPLAConfig() if config is None else SPLAConfig.from_dict(config)
    config.validate()
    hf_cfg = getattr(model, "config", None)
    model_type = getattr(hf_cfg, "model_type", None)
    base = _base_model_type(model_type)
    if base not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"spla.convert supports Llama, Mistral, Qwen2 and Qwen3 causal LMs, got architecture "
                         f"{type(model).__name__} (model_type={model_type!r})")
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(model, "lm_head"):
        raise ValueError(f"spla.convert needs a causal LM (with .model.layers and .lm_head), got architecture "
                         f"{type(model).__name__}; load it with AutoModelForCausalLM")
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        if isinstance(attn, SPLAAttention):
            attn.set_config(config)
            continue
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not isinstance(getattr(attn, name, None), nn.Linear):
                raise ValueError(f"spla.convert: layer {i} attention {type(attn).__name__} of architecture "
                                 f"{type(model).__name__} has no nn.Linear {name}")
        if getattr(attn, "sinks", None) is not None:
            raise ValueError(f"spla.convert: attention sinks of {type(model).__name__} are not supported")
        heads, kv_heads = hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads
        new = SPLAAttention(hf_cfg.hidden_size, heads, kv_heads, attn.head_dim, config,
                            layer_idx=getattr(attn, "layer_idx", i), scale=attn.scaling,
                            q_proj=attn.q_proj, k_proj=attn.k_proj, v_proj=attn.v_proj, o_proj=attn.o_proj,
                            q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None))
        new.config = hf_cfg
        layer.self_attn = new
    _drop_sliding_window(model)
    hf_cfg.spla = config.to_dict()
    cfg_cls, lm_cls = spla_classes(base)
    register_auto_classes()
    if type(hf_cfg) is not cfg_cls:
        hf_cfg.__class__ = cfg_cls
    if type(model) is not lm_cls and type(model) in lm_cls.__mro__:
        model.__class__ = lm_cls
    return model


def spla_config_of(model: nn.Module) -> Optional[SPLAConfig]:
    """The SPLAConfig a converted model runs with (``None`` for a dense model)."""
    d = getattr(getattr(model, "config", None), "spla", None)
    return SPLAConfig.from_dict(d) if d else None
