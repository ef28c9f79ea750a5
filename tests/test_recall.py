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
    """Every target is the value that followed its key, once, earlier in the haystack; keys are distinct and never
    a value; nothing else is scored."""
    n_queries = min(n_pairs, 1 + extra_q)
    task = R.RecallTask(noise=8, symbols=24, n_pairs=n_pairs, n_queries=n_queries)
    T = task.min_len() + slack
    ids, tgt = task.batch(3, T, np.random.default_rng(seed))
    assert ids.shape == tgt.shape == (3, T) and ids.dtype == tgt.dtype == np.int64
    ctx = T - 2 * n_queries
    for b in range(3):
        row, t = ids[b], tgt[b]
        assert row.min() >= 1 and row.max() < task.vocab
        scored = np.flatnonzero(t != R.IGNORE)
        assert list(scored) == list(ctx + 2 * np.arange(n_queries))
        hay = row[:ctx]
        sym = np.flatnonzero(hay > task.noise)                  # the pairs: (key, value) at (odd, next) offsets
        assert len(sym) == 2 * n_pairs
        keys, vals = hay[sym[0::2]], hay[sym[1::2]]
        assert (sym[0::2] % 2 == 1).all() and (sym[1::2] == sym[0::2] + 1).all()
        assert len(set(keys)) == n_pairs and not set(keys) & set(vals)
        assert len(set(row[scored])) == n_queries                                 # distinct query keys
        for p in scored:
            where = np.flatnonzero(hay == row[p])
            assert len(where) == 1 and t[p] == hay[where[0] + 1] == row[p + 1]


def test_task_shares_one_pool():
    """A symbol is a key in some sequences and a value in others (the design that lets the lookup form)."""
    task = R.RecallTask(noise=8, symbols=16, n_pairs=4, n_queries=2)
    ids, tgt = task.batch(200, task.min_len(), np.random.default_rng(0))
    as_key = set(ids[tgt != R.IGNORE].tolist())
    as_value = set(tgt[tgt != R.IGNORE].tolist())
    assert len(as_key & as_value) == task.symbols


def test_task_errors():
    task = R.RecallTask(n_pairs=8, n_queries=4)
    with pytest.raises(ValueError, match="too short"):
        task.batch(1, task.min_len() - 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_queries"):
        R.RecallTask(n_pairs=2, n_queries=3).batch(1, 64, np.random.default_rng(0))
    with pytest.raises(ValueError, match="symbols"):
        R.RecallTask(symbols=8, n_pairs=8, n_queries=2).batch(1, 64, np.random.default_rng(0))


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
    task = R.RecallTask(noise=8, symbols=64, n_pairs=6, n_queries=5)
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
    with pytest.raises(ValueError, match="no stage-1 model"):
        R.convert_only(preset, out, device=cpu, log=quiet)
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
    # no training: the stage-1 model as dense and as top-k with every selection rule, on the evaluation's sequences
    conv = R.convert_only(preset, out, device=cpu, log=quiet)
    assert list(conv["acc"]) == ["dense"] + list(R.CONVERT_RULES) and conv["stage1_steps"] == preset.short_max_steps
    assert all(0.0 <= a <= 1.0 for a in conv["acc"].values())
    assert conv["rules"]["oracle"]["selection"] == "oracle" and conv["rules"]["taylor1"]["merge"] == "none"
    assert conv["acc"]["dense"] == R.accuracy(_stage1_model(preset, out), preset.task, preset.long_len,
                                              preset.eval_examples, cpu)
    assert "| top-k, oracle |" in open(os.path.join(out, "convert.md")).read()


def _stage1_model(preset, out):
    m = R.build_model(preset, 0)
    m.load_state_dict(torch.load(os.path.join(out, R.STAGE1_FILE), map_location="cpu", weights_only=False)["run"]["model"])
    return m


def test_curriculum_growth():
    p = R.PRESETS["gpu"]
    assert p.next_length(162, 0.5) == 162                       # not solved yet: stay
    assert p.next_length(162, 0.95) == 243                      # solved: x1.5
    assert p.next_length(3000, 0.95) == p.short_len == 4096     # capped at the stage-1 length
    assert p.next_length(4096, 1.0) == 4096
    off = dataclasses.replace(p, curriculum=False)
    assert off.next_length(162, 1.0) == 162
    assert dataclasses.replace(p, grow_by=1.0).next_length(100, 1.0) == 101   # always some growth


def _part(seeds, variants, stage1_steps=10, steps=5):
    preset = dataclasses.asdict(R.PRESETS["tiny"])
    cells = [{"model": "base", "seed": None, "acc": {"128": 0.5, "256": 0.25}}]
    runs = []
    for s in seeds:
        for v in variants:
            runs.append({"variant": v, "seed": s, "steps": steps, "tokens": 100, "seq_len": 256, "batch": 2,
                         "step_s": 0.1, "tokens_per_s": 1000, "final_loss": 1.0, "final_train_acc": 0.5})
            cells.append({"model": v, "seed": s, "acc": {"128": 0.1 * (s + 1), "256": 0.2}})
    return {"preset": preset, "device": "cpu", "parameters": 1000,
            "timings": {"stage1_s": 1.0, "stage2_s": 2.0, "eval_s": 0.5, "total_s": 3.5},
            "stage1": {"steps": stage1_steps, "tokens": 10, "seq_len": 64, "target_len": 64, "batch": 8, "step_s": 0.1,
                       "tokens_per_s": 100, "final_loss": 1.0, "final_train_acc": 0.9, "schedule": [(0, 64)],
                       "learned": True},
            "stage2": runs, "eval": cells}


def test_merge_results(tmp_path):
    """Calls that continued one stage-1 model merge into one table: every run once, the base cell once, the seeds
    of a variant pooled; parts of different stage-1 models, step counts or repeated runs are refused."""
    a, b = _part([0, 1], ["dense", "spla"]), _part([2], ["dense", "spla"])
    c = _part([0], ["spla_elu1"])
    m = R.merge([a, b, c])
    assert [(x["variant"], x["seed"]) for x in m["stage2"]] == \
        [("dense", 0), ("spla", 0), ("dense", 1), ("spla", 1), ("dense", 2), ("spla", 2), ("spla_elu1", 0)]
    assert [c_["model"] for c_ in m["eval"]].count("base") == 1 and m["merged_from"] == 3
    assert R.variants_of(m) == ["dense", "spla", "spla_elu1"]
    t = R.table(m, R.variants_of(m))
    assert t["spla"]["128"] == pytest.approx([0.1, 0.2, 0.3]) and t["spla_elu1"]["128"] == pytest.approx([0.1])
    assert m["timings"]["stage2_s"] == 6.0
    R.write_results(m, str(tmp_path))
    md = open(tmp_path / "results.md").read()
    assert "| spla | 20.0 ± 10.0 (3) |" in md and "| spla_elu1 | 10.0 |" in md
    with pytest.raises(ValueError, match="stage-1 model"):
        R.merge([a, _part([2], ["dense"], stage1_steps=11)])
    with pytest.raises(ValueError, match="step counts"):
        R.merge([a, _part([2], ["dense"], steps=6)])
    with pytest.raises(ValueError, match="appears twice"):
        R.merge([a, _part([1], ["spla"])])
    with pytest.raises(ValueError, match="nothing"):
        R.merge([])
    # the command line: --merge writes the same files
    for name, part in (("a.json", a), ("b.json", b)):
        with open(tmp_path / name, "w") as f:
            json.dump(part, f)
    assert R.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "m")]) == 0
    with open(tmp_path / "m" / "results.json") as f:
        assert len(json.load(f)["stage2"]) == 6


def test_merge_lr_variant_moves_the_residual_scale():
    """``spla_merge_lr30`` trains the residual scale (0 at start) at 30x the learning rate, everything else as
    ``spla``; the summary reports how far it moved."""
    preset = R.PRESETS["tiny"]
    cpu = torch.device("cpu")
    base = R.build_model(preset, 0)
    moved = {}
    for v in ("spla", "spla_merge_lr30"):
        run = R.Run(R.as_variant(base, v, preset, preset.long_len), preset, preset.long_len, 2, 1e-4, 10,
                    seed=0, device=cpu, **R.variant_train(v))
        assert run.merge_scales() == [0.0] * preset.layers
        run.train(3)
        moved[v] = run.summary()["merge_scales"]
        assert len(moved[v]) == preset.layers and all(x > 0 for x in moved[v])
    assert all(b > 10 * a for a, b in zip(moved["spla"], moved["spla_merge_lr30"]))
    assert R.variant_train("spla") == {} and R.variant_train("spla_merge_lr30") == {"merge_lr_mult": 30.0}


@pytest.mark.parametrize("name", list(R.PRESETS), ids=lambda n: f"preset_{n}")   # not "gpu": that id is the marker
def test_presets_are_consistent(name):
    """Every preset's lengths hold its task, its variants are valid at its budget, and its stage-2 length is part
    of what stage 1 grows to (the dense model retrieves there before conversion)."""
    p = R.PRESETS[name]
    for L in (p.short_len, p.long_len) + p.eval_lengths:
        assert L >= p.task.min_len()
    assert p.short_len >= p.long_len or name == "tiny"
    assert p.task.n_queries <= p.task.n_pairs // 2 or name == "tiny"          # no elimination shortcut
    for v in p.variants:
        R.variant_spla(v, p.block_size, p.topk, p.long_len)
    assert p.long_len // (p.block_size * p.topk) >= 8 or name == "tiny"       # at most 1/8 of the context selected


def test_recall_selection_probe_tiny(tmp_path):
    """``experiments.recall_selection`` on a random tiny model: every rule's per-layer fidelity numbers are shares,
    the oracle's picks recall themselves, the floor share exists exactly for the rules with representative keys,
    and a missing stage-1 model or a too-short length is a clear error."""
    from experiments import recall_selection as S
    preset = R.PRESETS["tiny"]
    out = str(tmp_path)
    quiet = lambda s: None  # noqa: E731
    with pytest.raises(ValueError, match="no stage-1 model"):
        S.run(preset, out, [128], 1, torch.device("cpu"), log=quiet)
    model = R.build_model(preset, seed=0)
    torch.save({"run": {"model": model.state_dict(), "step": 0}}, os.path.join(out, R.STAGE1_FILE))
    with pytest.raises(ValueError, match="too short"):
        S.run(preset, out, [8], 1, torch.device("cpu"), log=quiet)
    res = S.run(preset, out, [128], 2, torch.device("cpu"), log=quiet, rep_keys=[2])
    r = res["lengths"]["128"]
    names = set(R.CONVERT_RULES) | {"taylor1_rep2", "taylor2_rep2"}
    assert set(r["probe"]) == names and set(r["acc"]) == names | {"dense"}
    assert set(r["floor"]) == {"taylor1", "taylor2", "taylor2_cov_full", "taylor1_rep2", "taylor2_rep2"}
    for rule, p in r["probe"].items():
        assert len(p["mass"]) == preset.layers
        assert all(0.0 < m <= 1.0 + 1e-9 for m in p["mass"]) and all(0.0 <= x <= 1.0 for x in p["recall"])
    assert r["probe"]["oracle"]["recall"] == [1.0] * preset.layers
    assert all(0.0 <= f <= 1.0 for fl in r["floor"].values() for f in fl)
    assert all(0.0 <= a <= 1.0 for a in r["acc"].values())
    with open(os.path.join(out, "selection.json")) as f:
        assert json.load(f)["lengths"]["128"]["acc"] == r["acc"]
    md = open(os.path.join(out, "selection.md")).read()
    assert "| 128 | taylor2 |" in md and "| 128 | dense |" in md
