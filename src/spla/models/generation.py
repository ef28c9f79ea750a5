# -*- coding: utf-8 -*-
"""Greedy decoding with static buffers, replayed as one CUDA graph per step on a GPU.

transformers' ``generate`` runs the model's Python code at every step: at 32k context a small model spends
15-20 ms per token on the host while one layer's SPLA decode step takes 0.05-0.3 ms on the GPU
(docs/benchmarks.md). :func:`greedy_generate` removes that overhead for greedy decoding: it prefills the
cache once, then captures one whole decode step of the model (every layer, the token and position updates and
the argmax) as a CUDA graph and replays it. It works for converted SPLA models (with :class:`SPLACache`,
whose states are reserved for every new token first) and for dense transformers models (with transformers'
``StaticCache``), so that the two are compared on equal terms. Without a GPU (or with ``cuda_graph=False``)
the same loop runs eagerly.
"""

from __future__ import annotations

import time
import warnings
from typing import List, Optional, Sequence, Union

import torch

from spla.models.cache import SPLACache
from spla.models.convert import spla_config_of


def _make_cache(model, batch: int, max_len: int):
    """SPLACache for a converted model, transformers' StaticCache (``max_len`` positions) for a dense one."""
    if spla_config_of(model) is not None:
        return SPLACache(config=model.config)
    from transformers import StaticCache
    return StaticCache(config=model.config, max_cache_len=max_len)


def _forward(model, tok, cache, cpos, pos, mask=None, keep: int = 1) -> torch.Tensor:
    with warnings.catch_warnings():  # newer transformers call it `cache`; the old name works in all 5.x
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        out = model(input_ids=tok, attention_mask=mask, past_key_values=cache, cache_position=cpos,
                    position_ids=pos, use_cache=True, logits_to_keep=keep)
    return out.logits[:, -1].argmax(-1, keepdim=True)


def _eos_ids(model, eos_token_id) -> Optional[List[int]]:
    if eos_token_id is None:
        gen = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return None
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(x) for x in eos_token_id]


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, cuda_graph: Optional[bool] = None,
                    attention_mask: Optional[torch.Tensor] = None, stop_at_eos: bool = True,
                    eos_token_id: Optional[Union[int, Sequence[int]]] = None, pad_token_id: Optional[int] = None,
                    return_info: bool = False):
    """Greedy continuation of ``input_ids [B, P]`` by at most ``max_new_tokens`` tokens.

    Args:
        model: a causal LM from transformers, dense or converted by :func:`spla.convert`.
        input_ids: ``[B, P]`` prompt token ids.
        max_new_tokens: the most tokens to add.
        stop_at_eos: as ``generate``: a row that produced an end-of-sequence token gets ``pad_token_id`` from then
            on, and decoding stops once every row has (the output is then shorter). ``False``: exactly
            ``max_new_tokens`` steps, whatever the tokens (as ``generate`` with ``min_new_tokens=max_new_tokens``).
        eos_token_id: the end-of-sequence id(s) (default: the model's generation config, then its config).
        pad_token_id: the id given to finished rows (default: the generation config's, else the first EOS id).
        attention_mask: ``[B, P]``, 1 for prompt tokens and 0 for padding; prompts of different lengths must be
            left-padded (as for ``generate``). Positions count real tokens only.
        cuda_graph: capture the decode step as a CUDA graph and replay it (default: when ``input_ids`` is on a
            GPU). The first new token comes from the prefill, the second from an eager step (it also compiles
            the kernels), every later one from a replay. A failed capture raises ``RuntimeError`` (the cache is
            then unusable); ``cuda_graph=False`` runs the same loop eagerly.
        return_info: also return a dict: ``graph`` (whether replays ran), ``replays``, ``stopped_at_eos`` and,
            when replays ran, ``replay_s`` (wall seconds of all replays, the GPU synchronized before and after).

    Returns:
        ``[B, P + n]`` token ids, ``n <= max_new_tokens`` (and the info dict with ``return_info``). The tokens of
        ``model.generate(input_ids, do_sample=False, max_new_tokens=...)`` (with ``stop_at_eos=False``: plus
        ``min_new_tokens=max_new_tokens``).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, prompt_len >= 1], got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    dev = input_ids.device
    use_graph = dev.type == "cuda" if cuda_graph is None else cuda_graph
    if use_graph and dev.type != "cuda":
        raise ValueError("cuda_graph=True needs input_ids (and the model) on a CUDA device")
    B, P = input_ids.shape
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        m = attention_mask.to(dev).long()
        if bool((m[:, 1:] < m[:, :-1]).any()) or not bool(m[:, -1].all()):
            raise ValueError("attention_mask: only left padding is supported (every row ends with its prompt)")
        pos = m.cumsum(-1) - 1
        pos = pos.masked_fill(m == 0, 1)
        attention_mask = None if bool(m.all()) else m  # nothing padded: the unmasked path
    else:
        pos = torch.arange(P, device=dev)[None].expand(B, P)
    eos = _eos_ids(model, eos_token_id) if stop_at_eos else None
    if eos is not None:
        if pad_token_id is None:
            pad_token_id = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
        pad = torch.tensor(eos[0] if pad_token_id is None else pad_token_id, device=dev)
        eos_t = torch.tensor(eos, device=dev)
    cache = _make_cache(model, B, P + max_new_tokens)
    spla = isinstance(cache, SPLACache)
    # a dense model's steps take the padding mask of every position its static cache holds (new tokens are
    # real); SPLA layers read padding at the prefill only (each decode state knows its rows' lengths)
    s_mask = None
    if attention_mask is not None and not spla:
        attention_mask = s_mask = torch.cat([m, m.new_ones(B, max_new_tokens)], 1)
    tok = _forward(model, input_ids, cache, torch.arange(P, device=dev), pos, attention_mask)
    out = [tok]
    info = dict(graph=False, replays=0, stopped_at_eos=False)
    s_done = torch.isin(tok[:, 0], eos_t) if eos is not None else None  # rows that produced an EOS

    def all_done() -> bool:  # a host sync: only when stopping at EOS
        if eos is not None and bool(s_done.all()):
            info["stopped_at_eos"] = True
        return info["stopped_at_eos"]
    if max_new_tokens > 1 and spla:
        cache.reserve(max_new_tokens)  # room for every later token now: the steps then allocate nothing
    # the static inputs of a step: the last token, its position (both updated inside the step)
    s_tok = tok.clone()
    s_cpos = torch.full((1,), P, device=dev, dtype=torch.long)
    s_pos = pos[:, -1:] + 1  # [B, 1]: each row's next position

    def step() -> torch.Tensor:
        nxt = _forward(model, s_tok, cache, s_cpos, s_pos, s_mask)
        if eos is not None:  # finished rows get the pad id, as in generate
            nxt = torch.where(s_done[:, None], pad, nxt)
            s_done.logical_or_(torch.isin(nxt[:, 0], eos_t))
        s_tok.copy_(nxt)
        s_cpos.add_(1)
        s_pos.add_(1)
        return nxt

    n_eager = 2 if use_graph else max_new_tokens  # the prefill's token, then one eager step (compilation)
    for _ in range(1, min(n_eager, max_new_tokens)):
        if all_done():
            break
        if use_graph:  # warm-up on a side stream, as torch's CUDA-graph recipe asks
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                nxt = step().clone()
            torch.cuda.current_stream().wait_stream(side)
        else:
            nxt = step().clone()
        out.append(nxt)
    if max_new_tokens > n_eager and not all_done():
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                g_out = step()
        except Exception as e:
            raise RuntimeError(f"CUDA graph capture of the decode step failed ({type(e).__name__}: {e}); "
                               "greedy_generate(..., cuda_graph=False) decodes eagerly") from e
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n_eager, max_new_tokens):
            graph.replay()
            out.append(g_out.clone())
            info["replays"] += 1
            if all_done():
                break
        torch.cuda.synchronize()
        info["replay_s"] = time.perf_counter() - t0
        if spla:
            cache.count_replays(info["replays"])
    info["graph"] = info["replays"] > 0
    ids = torch.cat([input_ids] + out, 1)
    return (ids, info) if return_info else ids
