# -*- coding: utf-8 -*-
"""The SPLA study of issue 8: pretrain a small dense model, continue it at long context as dense / top-k /
SPLA, evaluate perplexity and RULER-style retrieval. See ``experiments/README.md``."""
