# -*- coding: utf-8 -*-
"""Continual pretraining of SPLA models (``spla train``): packed local data, AdamW + warm-up/cosine, DDP,
exact resume. See docs/training.md."""

from spla.train.data import (Corpus, DataError, DataWarning, PackedStream, SyntheticTask, build_corpus, collate,
                             cu_seqlens_of)
from spla.train.trainer import TrainConfig, find_checkpoint, param_groups, select_trainable, train

__all__ = ["TrainConfig", "train", "param_groups", "select_trainable", "find_checkpoint", "Corpus", "DataError",
           "DataWarning", "PackedStream", "SyntheticTask", "build_corpus", "collate", "cu_seqlens_of"]
