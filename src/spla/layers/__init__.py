# -*- coding: utf-8 -*-
from spla.layers.spla import GroupRMSNorm, SPLAAttention, SPLAConfig

__all__ = ["SPLAAttention", "SPLAConfig", "GroupRMSNorm"]
