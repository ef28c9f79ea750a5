# -*- coding: utf-8 -*-
"""The associative-recall study (``experiments/recall.py``): the task's layout, the metric, the pipeline."""

import dataclasses
import json
import os
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from experiments import recall as R


@settings(max_examples=40, deadline=None)
@given(n_pairs=st.integers(1, 12), extra_q=st.integers(0, 11), slack=st.integers(0, 40), seed=st.integers(0, 2 ** 16))
def test_task_layout(n_pairs, extra_q, slack, seed):
    """Every target is the value that followed its key, once, earlier in the haystack; nothing else is scored."""
    n_queries = min(n_pairs, 1 + extra_q)
    task = R.RecallTask(noise=8, keys=16, values=16, n_pairs=n_pairs, n_queries=n_queries)
    T = task.min_len() + slack
    ids, tgt = task.batch(3, T, np.random.default_rng(seed))
    assert ids.shape == tgt.shape == (3, T) and ids.dtype == tgt.dtype == np.int64
    key_lo, val_lo = 1 + task.noise, 1 + task.noise + task.keys
    ctx = T - 2 * n_queries
    for b in range(3):
        row, t = ids[b], tgt[b]
        assert row.min() >= 1 and row.max() < task.vocab
        scored = np.flatnonzero(t != R.IGNORE)
        assert list(scored) == list(ctx + 2 * np.arange(n_queries))
        hay = row[:ctx]
        is_key = (hay >= key_lo) & (hay < val_lo)
        assert is_key.sum() == n_pairs and len(set(hay[is_key])) == n_pairs      # distinct keys, each once
        assert ((hay >= val_lo).sum()) == n_pairs                                 # one value after each key
        assert len(set(row[scored])) == n_queries                                 # distinct query keys
        for p in scored:
            where = np.flatnonzero(hay == row[p])
            assert len(where) == 1 and t[p] == hay[where[0] + 1] == row[p + 1] and t[p] >= val_lo


def test_task_errors():
    task = R.RecallTask(n_pairs=8, n_queries=4)
    with pytest.raises(ValueError, match="too short"):
        task.batch(1, task.min_len() - 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_queries"):
        R.RecallTask(n_pairs=2, n_queries=3).batch(1, 64, np.random.default_rng(0))


class _Peek(torch.nn.Module):
    """A cheating 'model' whose hidden state at t is the one-hot of token t+1 (right) or all zeros (wrong)."""

    def __init__(self, vocab, right):
        super().__init__()
        self.vocab, self.right = vocab, right
        self.lm_head = torch.nn.Identity()
        self.model = self._inner

    def _inner(self, input_ids, **_):
        nxt = torch.roll(input_ids, -1, dims=1)
        h = torch.nn.functional.one_hot(nxt, self.vocab).float() if self.right else \
            torch.zeros(*input_ids.shape, self.vocab)
        return types.SimpleNamespace(last_hidden_state=h)

    def eval(self):
        return self


def test_accuracy_metric():
    task = R.RecallTask(noise=8, keys=32, values=32, n_pairs=6, n_queries=5)
    cpu = torch.device("cpu")
    assert R.accuracy(_Peek(task.vocab, True), task, 100, 7, cpu, batch_tokens=250) == 1.0
    assert R.accuracy(_Peek(task.vocab, False), task, 100, 7, cpu) == 0.0


def test_recall_pipeline_tiny(tmp_path):
    """Stage 1, stage 2 (two variants, two seeds, the same step count) and the evaluation on the CPU."""
    preset = dataclasses.replace(R.PRESETS["tiny"], short_minutes=1.0, short_max_steps=6, variant_minutes=1.0,
                                 long_max_steps=5, eval_examples=2)
    out = str(tmp_path / "recall")
    cpu, quiet = torch.device("cpu"), (lambda s: None)
    with pytest.raises(ValueError, match="no stage-1 model"):
        R.run(preset, out, ["dense"], [0], device=cpu, log=quiet, stage="2")
    # stage 1 alone, twice: the second call continues the first (model, optimizer, data stream, curriculum)
    first = R.run(dataclasses.replace(preset, short_max_steps=4), out, ["dense"], [0], device=cpu, log=quiet,
                  stage="1")["stage1"]
    assert first["steps"] == 4 and os.path.exists(os.path.join(out, R.STAGE1_FILE)) and first["learned"] is False
    res = R.run(preset, out, ["dense", "spla"], [0, 1], device=cpu, log=quiet)
    assert res["stage1"]["steps"] == preset.short_max_steps   # 4 + 2 more in the second call
    again = R.run(preset, out, ["dense"], [0], device=cpu, log=quiet, stage="2")
    assert again["stage1"]["steps"] == preset.short_max_steps  # stage 2 alone trains no stage-1 step
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["stage2"] == again["stage2"]           # each call writes its own results
    assert again["stage2"][0]["final_loss"] == res["stage2"][0]["final_loss"]  # same base, seed: same run
    runs = {(r["variant"], r["seed"]): r for r in res["stage2"]}
    assert set(runs) == {("dense", 0), ("spla", 0), ("dense", 1), ("spla", 1)}
    assert len({r["steps"] for r in runs.values()}) == 1 and len({r["tokens"] for r in runs.values()}) == 1
    assert runs[("spla", 0)]["spla"]["merge"] == "residual" and runs[("dense", 0)]["spla"]["merge"] == "none"
    names = [(c["model"], c["seed"]) for c in res["eval"]]
    assert names == [("base", None), ("dense", 0), ("spla", 0), ("dense", 1), ("spla", 1)]
    for c in res["eval"]:
        assert set(c["acc"]) == {str(L) for L in preset.eval_lengths}
        assert all(0.0 <= a <= 1.0 for a in c["acc"].values())
    md = open(os.path.join(out, "results.md")).read()
    assert "| dense |" in md and "Query accuracy" in md and "did not learn" in md   # the last call's (dense only)
    with pytest.raises(ValueError, match="unknown variant"):
        R.run(preset, out, ["nope"], [0], device=torch.device("cpu"), log=lambda s: None)


def test_curriculum_growth():
    p = R.PRESETS["gpu"]
    assert p.next_length(162, 0.5) == 162                       # not solved yet: stay
    assert p.next_length(162, 0.95) == 243                      # solved: x1.5
    assert p.next_length(400, 0.95) == p.short_len == 512       # capped at the stage-1 length
    assert p.next_length(512, 1.0) == 512
    off = dataclasses.replace(p, curriculum=False)
    assert off.next_length(162, 1.0) == 162
    assert dataclasses.replace(p, grow_by=1.0).next_length(100, 1.0) == 101   # always some growth


@settings(max_examples=25, deadline=None)
@given(seg=st.integers(2, 12), slack=st.integers(0, 30), seed=st.integers(0, 2 ** 16))
def test_copy_warmup_layout(seg, slack, seed):
    """The warm-up rows: the segment stands earlier at a varying offset and every scored target is the token that
    followed the current one there; mixed batches put those rows first."""
    task = R.RecallTask(noise=8, keys=16, values=16, n_pairs=2, n_queries=2)
    T = max(2 * seg, task.min_len()) + slack
    ids, tgt = task.copy_batch(4, T, seg, np.random.default_rng(seed))
    for b in range(4):
        rep = ids[b, T - seg:]
        scored = np.flatnonzero(tgt[b] != R.IGNORE)
        assert list(scored) == list(range(T - seg, T - 1))
        assert (tgt[b, scored] == ids[b, scored + 1]).all()
        starts = [a for a in range(T - 2 * seg + 1) if (ids[b, a:a + seg] == rep).all()]
        assert starts                                   # the segment stands earlier
    mixed, mt = task.train_batch(6, T, np.random.default_rng(seed), copy_frac=0.5, copy_len=seg)
    assert mixed.shape == (6, T)
    for b in range(3):                                  # copy rows first ...
        assert (mt[b] != R.IGNORE).sum() == seg - 1
    for b in range(3, 6):                               # ... then recall rows
        assert (mt[b] != R.IGNORE).sum() == task.n_queries
    with pytest.raises(ValueError, match="copy segment"):
        task.copy_batch(1, 10, 6, np.random.default_rng(0))


def test_recall_loss_accuracy_skips_copy_rows():
    vocab = 20
    ids = torch.randint(1, vocab, (4, 10))
    tgt = torch.full((4, 10), R.IGNORE)
    tgt[:2, 3] = torch.roll(ids, -1, 1)[:2, 3]          # rows 0-1 (copies): the cheat gets them right
    tgt[2:, 5] = 0                                      # rows 2-3 (recall): token 0 never comes next: wrong
    model = _Peek(vocab, True)
    _, acc_all = R.recall_loss(model, ids, tgt)
    _, acc_recall = R.recall_loss(model, ids, tgt, skip_rows=2)
    assert float(acc_all) == 0.5 and float(acc_recall) == 0.0
