# -*- coding: utf-8 -*-
"""`spla train` on CPU: packing and document boundaries, bad data, loss falls, exact resume, what trains."""

import json
import os
import random
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import spla  # noqa: E402
from spla.train import data as D  # noqa: E402
from spla.train.trainer import TrainConfig, _batch_layout, param_groups, select_trainable, train  # noqa: E402

BLOCK, TOPK, SEQ = 8, 3, 64
TRAIN_SEQ = 64  # 8 blocks of 8 > topk 3: the sparse selection is active


@pytest.fixture(autouse=True)
def poison_empty():
    """Overrides conftest's NaN-poisoning of torch.empty here: it defeats transformers' meta-device init in
    from_pretrained (nn.Linear weights land on the CPU while new parameters go to meta), which has nothing to do
    with the training code; kernels' outputs are checked by their own tests."""
    yield


# ---------------------------------------------------------------------------------------------- fixtures
def _byte_tokenizer():
    """A byte-level tokenizer (one token per byte, no merges): encodes any text, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for s in ("<s>", "</s>", "<pad>"):
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (hidden 64, 2 layers, 4 heads / 2 KV heads) converted to SPLA and saved with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM
    d = str(tmp_path_factory.mktemp("tiny_spla"))
    tok = _byte_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    spla.convert(model, spla.SPLAConfig(block_size=BLOCK, topk=TOPK, sink_blocks=1, local_blocks=1))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def _write_corpus(folder, n_docs=24, seed=0, max_words=30):
    """Repetitive word sequences (learnable) in .txt and .jsonl files of varied document lengths."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    lines = []
    for i in range(n_docs):
        start = rng.randrange(len(WORDS))
        n = rng.randrange(2, max_words)
        lines.append(" ".join(WORDS[(start + j) % len(WORDS)] for j in range(n)) + ".")
    with open(os.path.join(folder, "a.txt"), "w") as f:
        f.write(lines[0])
    with open(os.path.join(folder, "b.jsonl"), "w") as f:
        for t in lines[1:]:
            f.write(json.dumps({"text": t}) + "\n")
    return folder


def _cfg(model_dir, out, data, **kw):
    base = dict(out=str(out), model=model_dir, data=[str(data)], seq_len=TRAIN_SEQ, batch_size=4, micro_batch_size=2,
                lr=1e-2, warmup=2, steps=6, save_every=0, seed=0, min_doc_tokens=4, progress=False,
                tensorboard=False, device="cpu", data_cache=None)
    base.update(kw)
    return TrainConfig(**base)


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


# ---------------------------------------------------------------------------------------------- packing
def _corpus(lengths, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, 200, size=n).astype(np.uint32) for n in lengths]
    offsets = np.zeros(len(docs) + 1, np.int64)
    np.cumsum([len(d) for d in docs], out=offsets[1:])
    return D.Corpus(np.concatenate(docs), offsets), docs


def test_packing_boundaries_positions_and_labels():
    lengths = [5, 40, 3, 130, 17, 64, 9]
    corpus, docs = _corpus(lengths)
    stream = D.PackedStream(corpus, seq_len=32, seed=3)
    n_seq = (sum(lengths) * 2) // 32 + 1  # a bit more than two epochs
    seqs = stream.take(n_seq)
    ids = np.concatenate([s["input_ids"] for s in seqs])
    # the token stream is the documents of epoch 0, then of epoch 1, in each epoch's seeded order
    expect = np.concatenate([docs[i] for e in range(3) for i in np.random.default_rng([3, e]).permutation(len(docs))])
    np.testing.assert_array_equal(ids, expect[:len(ids)])
    # position ids restart at every document start and at every sequence start, count up in between
    doc_starts = set(np.cumsum([0] + [len(docs[i]) for e in range(3)
                                      for i in np.random.default_rng([3, e]).permutation(len(docs))]).tolist())
    for k, s in enumerate(seqs):
        pos, lab = s["position_ids"], s["labels"]
        assert len(pos) == 32 and pos[0] == 0
        for t in range(1, 32):
            g = k * 32 + t
            assert (pos[t] == 0) == (g in doc_starts), (k, t)
            if pos[t] != 0:
                assert pos[t] == pos[t - 1] + 1
        # labels: the next token inside the same document, -100 across a boundary and at the end
        assert lab[-1] == D.IGNORE_INDEX
        for t in range(31):
            assert lab[t] == (s["input_ids"][t + 1] if pos[t + 1] != 0 else D.IGNORE_INDEX)
        cu = D.cu_seqlens_of(pos)
        assert cu[0] == 0 and cu[-1] == 32 and np.all(np.diff(cu) > 0)


@pytest.mark.parametrize("synthetic_ratio", [0.0, 0.3])
def test_stream_is_deterministic_and_resumable(tiny_model_dir, synthetic_ratio):
    corpus, _ = _corpus([7, 50, 12, 33, 90, 4, 260, 31])
    T = 256
    task = D.SyntheticTask(spla.models.load_tokenizer(tiny_model_dir), T) if synthetic_ratio else None

    def stream(seed=5):
        return D.PackedStream(corpus, seq_len=T, seed=seed, synthetic=task, synthetic_ratio=synthetic_ratio)

    full = stream().take(20)
    assert any(s["synthetic"] for s in full) == (synthetic_ratio > 0)
    b = stream()
    b.take(7)
    state = json.loads(json.dumps(b.state_dict()))  # survives a JSON round trip (trainer_state.json)
    c = stream()
    c.load_state_dict(state)
    for x, y in zip(full[7:], c.take(13)):
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
        np.testing.assert_array_equal(x["position_ids"], y["position_ids"])
    other = stream(seed=6).take(3)
    assert not all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(full, other))
    with pytest.raises(D.DataError, match="seq_len"):
        D.PackedStream(corpus, seq_len=128, seed=5).load_state_dict(state)


@pytest.mark.parametrize("impl", ["blocks", "op"])  # "op" is the path CUDA training takes (spla_attn + cu_seqlens)
def test_packed_forward_equals_per_document_forward(tiny_model_dir, tmp_path, impl):
    """Documents packed into one row never attend to each other: same logits as one forward per document."""
    tok = spla.models.load_tokenizer(tiny_model_dir)
    corpus = D.build_corpus([_write_corpus(str(tmp_path / "d"), max_words=9)], tok, min_doc_tokens=4,
                            log=lambda m: None)
    stream = D.PackedStream(corpus, seq_len=SEQ, seed=0)
    seqs = stream.take(2)
    ids, pos, labels = D.collate(seqs)
    assert ids.shape == (1, 2 * SEQ)
    model = spla.load(tiny_model_dir)
    spla.convert(model, spla.models.spla_config_of(model).replace(impl=impl))
    # no attention mask: transformers builds a block-diagonal one for the packed row; cu_seqlens wins in the layer
    with torch.no_grad():  # a non-zero residual weight, so the linear branch is exercised too
        for m in model.modules():
            if isinstance(m, spla.SPLAAttention):
                m.rla_norm.weight.normal_(0, 0.5)
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        cu = D.cu_seqlens_of(pos[0].numpy())
        assert len(cu) > 4  # several documents, some longer than a block
        assert max(np.diff(cu)) > TOPK * BLOCK  # at least one document where the sparse selection is active
        for a, b in zip(cu[:-1], cu[1:]):
            single = model(input_ids=ids[:, a:b], use_cache=False).logits[0]
            torch.testing.assert_close(packed[a:b], single, atol=1e-5, rtol=1e-5)


def test_synthetic_examples(tiny_model_dir):
    tok = spla.models.load_tokenizer(tiny_model_dir)
    task = D.SyntheticTask(tok, seq_len=400)
    for seed in range(4):
        ids = task.example(np.random.default_rng(seed))
        assert ids.shape == (400,)
        text = tok.decode(ids.tolist(), skip_special_tokens=True)
        if "pass key" in text:
            key = text.rsplit("The pass key is ", 1)[1].split(".")[0]
            assert text.count(f"The pass key is {key}.") == 2 and key.isdigit()
        else:
            k = text.rsplit("What is the value of key ", 1)[1].split("?")[0]
            v = text.rsplit(f"The value of key {k} is ", 1)[1].split(".")[0]
            assert f"\n{k}: {v}" in text
    with pytest.raises(D.DataError, match="too short"):
        D.SyntheticTask(tok, seq_len=50)
    corpus, _ = _corpus([30, 40, 50])
    s1 = D.PackedStream(corpus, 400, seed=1, synthetic=task, synthetic_ratio=0.5).take(12)
    s2 = D.PackedStream(corpus, 400, seed=1, synthetic=task, synthetic_ratio=0.5).take(12)
    kinds = [s["synthetic"] for s in s1]
    assert any(kinds) and not all(kinds) and kinds == [s["synthetic"] for s in s2]
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(s1, s2))


# ---------------------------------------------------------------------------------------------- bad data
def test_bad_data_messages(tiny_model_dir, tmp_path):
    tok = spla.models.load_tokenizer(tiny_model_dir)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.txt").write_text("   \n")
    (bad / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (bad / "lines.jsonl").write_text('{"text": "ok"}\nnot json\n{"body": "x"}\n{"text": ""}\n')
    (bad / "notes.csv").write_text("a,b\n")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with pytest.raises(D.DataError) as e:
            D.build_corpus([str(bad)], tok, min_doc_tokens=8, log=lambda m: None)
    msg = str(e.value)
    assert "no usable training data in 3 file(s)" in msg
    assert "empty.txt: skipped (empty file)" in msg
    assert "latin1.txt: skipped (not valid UTF-8" in msg
    assert "lines.jsonl: 4 of 4 documents skipped" in msg and "1 lines not valid JSON" in msg
    assert "1 lines without a string field 'text'" in msg and "1 shorter than 8 tokens" in msg
    texts = [str(x.message) for x in w]
    assert any("ignored 1 file(s) of unsupported types" in t for t in texts)
    assert sum("skipped" in t for t in texts) == 3  # one warning per bad file
    # one good file next to the bad ones: the good one is used, the bad ones are still reported
    (bad / "good.md").write_text("alpha beta gamma delta " * 5)
    with pytest.warns(D.DataWarning, match="latin1.txt"):
        corpus = D.build_corpus([str(bad)], tok, min_doc_tokens=8, log=lambda m: None)
    assert corpus.num_docs == 1 and corpus.num_tokens == len("alpha beta gamma delta " * 5) + 1  # bytes + EOS
    with pytest.raises(D.DataError, match="does not exist"):
        D.build_corpus([str(tmp_path / "missing")], tok)
    with pytest.raises(D.DataError, match="unsupported type"):
        D.build_corpus([str(bad / "notes.csv")], tok)
    with pytest.raises(D.DataError, match="no usable documents"):
        D.PackedStream(D.Corpus(np.zeros(0, np.uint32), np.zeros(1, np.int64)), seq_len=SEQ)


def test_parquet_documents_and_missing_column(tiny_model_dir, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    tok = spla.models.load_tokenizer(tiny_model_dir)
    pq.write_table(pa.table({"content": ["alpha beta gamma", "delta omega sigma kappa", None]}), tmp_path / "a.parquet")
    corpus = D.build_corpus([str(tmp_path / "a.parquet")], tok, text_field="content", min_doc_tokens=2,
                            log=lambda m: None, warn=False)
    assert corpus.num_docs == 2
    assert tok.decode(corpus.doc(1).tolist(), skip_special_tokens=True) == "delta omega sigma kappa"
    with pytest.raises(D.DataError, match="no column 'text'"):
        D.build_corpus([str(tmp_path / "a.parquet")], tok, log=lambda m: None, warn=False)


def test_batch_layout():
    cfg = TrainConfig(out="x", batch_size=8)
    assert _batch_layout(cfg, 1) == (1, 8) and _batch_layout(cfg, 2) == (1, 4)
    assert _batch_layout(TrainConfig(out="x", batch_size=8, grad_accum=2), 2) == (2, 2)
    assert _batch_layout(TrainConfig(out="x", batch_size=8, micro_batch_size=4), 1) == (4, 2)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        _batch_layout(TrainConfig(out="x", batch_size=6), 4)
    with pytest.raises(ValueError, match="micro-batch-size x grad-accum"):
        _batch_layout(TrainConfig(out="x", batch_size=8, micro_batch_size=3), 1)


# ---------------------------------------------------------------------------------------------- training
def test_loss_falls_and_checkpoint_loads(tiny_model_dir, tmp_path):
    """Through the CLI: 10 steps on repetitive text; the checkpoint is an SPLA model spla.load reads."""
    from spla.cli import main
    data = _write_corpus(str(tmp_path / "data"))
    out = tmp_path / "run"
    rc = main(["train", "--model", tiny_model_dir, "--data", data, "--out", str(out), "--seq-len", str(TRAIN_SEQ),
               "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-2", "--warmup", "2", "--steps", "10",
               "--save-every", "5", "--min-doc-tokens", "4", "--no-progress", "--no-tensorboard", "--device", "cpu"])
    assert rc == 0
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 11))
    first, last = np.mean([losses[1], losses[2]]), np.mean([losses[9], losses[10]])
    assert last < 0.75 * first, losses
    ckpts = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert ckpts == ["checkpoint-000005", "checkpoint-000010"]
    files = set(os.listdir(out / "checkpoint-000010"))
    assert {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng_state_rank0.pt",
            "trainer_state.json"} <= files
    model = spla.load(str(out / "checkpoint-000010"))
    cfg = spla.models.spla_config_of(model)
    assert cfg.block_size == BLOCK and cfg.topk == TOPK
    trained = {k: v for k, v in model.state_dict().items()}
    start = spla.load(tiny_model_dir).state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)


def test_interrupt_and_resume_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    data = _write_corpus(str(tmp_path / "data"))
    full = train(_cfg(tiny_model_dir, tmp_path / "full", data, steps=4))
    assert full["step"] == 4
    part = train(_cfg(tiny_model_dir, tmp_path / "part", data, steps=4, stop_at=2))
    assert part["interrupted"] and part["step"] == 2
    resumed = train(_cfg(tiny_model_dir, tmp_path / "part", data, steps=4, resume=str(tmp_path / "part")))
    assert resumed["step"] == 4
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
    assert sorted(b) == list(range(1, 5))
    for s in range(1, 5):
        assert abs(a[s] - b[s]) <= 1e-6, (s, a[s], b[s])
    wa = spla.load(str(tmp_path / "full" / "checkpoint-000004")).state_dict()
    wb = spla.load(str(tmp_path / "part" / "checkpoint-000004")).state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)


def test_trainable_spla_changes_only_merge_norms(tiny_model_dir, tmp_path):
    data = _write_corpus(str(tmp_path / "data"))
    model = spla.load(tiny_model_dir)
    n_train, n_total = select_trainable(model, "spla")
    assert n_train == 2 * 4 * 16  # 2 layers x 4 heads x head_dim 16 (the rla_norm weights)
    n_attn, _ = select_trainable(model, "attention")
    assert n_train < n_attn < n_total
    train(_cfg(tiny_model_dir, tmp_path / "s", data, trainable="spla", steps=3, lr=1e-2))
    before = spla.load(tiny_model_dir).state_dict()
    after = spla.load(str(tmp_path / "s" / "checkpoint-000003")).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("rla_norm" in k for k in changed), changed


def test_param_groups_merge_scales(tiny_model_dir, tmp_path):
    """Matrices decay, vectors do not, the SPLA merge scales neither decay nor share the base learning rate; frozen
    parameters are left out; and in training the merge scales move by about lr * merge_lr_mult per step."""
    model = spla.load(tiny_model_dir)
    merge = {id(p) for m in model.modules() if isinstance(m, spla.layers.SPLAAttention) for p in m.merge_parameters()}
    assert len(merge) == 2                                          # rla_norm of the 2 layers (merge="residual")
    decay, no_decay, mg = param_groups(model, 0.1, 1e-3, merge_lr_mult=30.0)
    assert {id(p) for p in mg["params"]} == merge and mg["lr"] == pytest.approx(3e-2) and mg["weight_decay"] == 0
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1 and decay["lr"] == 1e-3
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert not merge & {id(p) for p in decay["params"] + no_decay["params"]}
    n = sum(p.numel() for g in (decay, no_decay, mg) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())
    select_trainable(model, "spla")
    assert [len(g["params"]) for g in param_groups(model, 0.1, 1e-3)] == [2]   # only the merge scales train
    with pytest.raises(ValueError, match="merge_lr_mult"):
        param_groups(model, 0.1, 1e-3, merge_lr_mult=0.0)
    data = _write_corpus(str(tmp_path / "data"))
    moved = {}
    for mult in (1.0, 30.0):
        out = tmp_path / f"m{mult:g}"
        train(_cfg(tiny_model_dir, out, data, steps=3, lr=1e-4, warmup=0, merge_lr_mult=mult))
        sd = spla.load(str(out / "checkpoint-000003")).state_dict()
        moved[mult] = max(float(v.abs().max()) for k, v in sd.items() if "rla_norm" in k)
    assert 0 < moved[1.0] <= 3.5e-4 and 10 * moved[1.0] < moved[30.0] <= 3 * 3e-3 * 1.2


def test_resume_checkpoint_with_older_optimizer_groups(tiny_model_dir, tmp_path, monkeypatch):
    """A checkpoint whose optimizer was grouped as before the merge scales got their own group (2 groups, no
    optimizer_params.json) resumes: every parameter gets its own AdamW state back, by name, and the current
    groups' learning rates at the checkpoint's step."""
    import spla.train.trainer as T

    def legacy_groups(model, weight_decay, lr, merge_lr_mult=1.0):
        ps = [p for p in model.parameters() if p.requires_grad]
        return [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": weight_decay, "lr": lr},
                {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0, "lr": lr}]

    data = _write_corpus(str(tmp_path / "data"))
    out = tmp_path / "old"
    with monkeypatch.context() as m:
        m.setattr(T, "param_groups", legacy_groups)
        train(_cfg(tiny_model_dir, out, data, steps=4, stop_at=2))
    ckpt = str(out / "checkpoint-000002")
    os.remove(os.path.join(ckpt, T.OPTIMIZER_NAMES_FILE))  # what older versions wrote
    old_sd = torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True)
    assert len(old_sd["param_groups"]) == 2

    model = spla.load(ckpt)
    select_trainable(model, "all")
    opt = torch.optim.AdamW(param_groups(model, 0.1, 1e-2, merge_lr_mult=10.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, T.lr_lambda(2, 4, 0.1))
    assert len(opt.param_groups) == 3
    T.load_optimizer_state(opt, sched, model, ckpt, "cpu")
    legacy = [n for g in T._legacy_group_names(model) for n in g]
    params = dict(model.named_parameters())
    for idx, name in enumerate(legacy):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[params[name]][key], old_sd["state"][idx][key]), (name, key)
    lam = T.lr_lambda(2, 4, 0.1)(2)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-2 * lam, 1e-2 * lam, 1e-1 * lam])
    assert sched.last_epoch == 2 and sched.get_last_lr() == pytest.approx([g["lr"] for g in opt.param_groups])
    # and the trainer itself resumes it to the end; new checkpoints record their groups by name
    assert train(_cfg(tiny_model_dir, out, data, steps=4, resume=str(out)))["step"] == 4
    with open(out / "checkpoint-000004" / T.OPTIMIZER_NAMES_FILE) as f:
        assert sum(map(len, json.load(f))) == len(legacy)
    # another --trainable: only the merge scales train now; their moments come back by name
    ck4 = str(out / "checkpoint-000004")
    saved4 = torch.load(os.path.join(ck4, "optimizer.pt"), weights_only=True)
    with open(os.path.join(ck4, T.OPTIMIZER_NAMES_FILE)) as f:
        idx_of = {n: i for i, n in enumerate(n for g in json.load(f) for n in g)}
    model4 = spla.load(ck4)
    select_trainable(model4, "spla")
    opt4 = torch.optim.AdamW(param_groups(model4, 0.1, 1e-2))
    T.load_optimizer_state(opt4, torch.optim.lr_scheduler.LambdaLR(opt4, T.lr_lambda(2, 4, 0.1)), model4, ck4, "cpu")
    merge = [(n, p) for n, p in model4.named_parameters() if p.requires_grad]
    assert len(merge) == 2 and all("rla_norm" in n for n, _ in merge)
    for n, p in merge:
        assert torch.equal(opt4.state[p]["exp_avg"], saved4["state"][idx_of[n]]["exp_avg"])
    # a checkpoint whose recorded names do not match the model is refused clearly
    with open(os.path.join(ckpt, T.OPTIMIZER_NAMES_FILE), "w") as f:
        json.dump([["no.such.weight"] + legacy[1:]], f)
    with pytest.raises(ValueError, match="no.such.weight"):
        T.load_optimizer_state(opt, sched, model, ckpt, "cpu")


def test_two_processes_make_the_same_steps_as_one(tiny_model_dir, tmp_path):
    """DDP under torchrun (2 CPU processes, gloo) with the same global batch: the same losses as 1 process."""
    import subprocess
    import sys
    data = _write_corpus(str(tmp_path / "data"))
    train(_cfg(tiny_model_dir, tmp_path / "one", data, steps=2))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "spla.cli",
           "train", "--model", tiny_model_dir, "--data", data, "--out", str(tmp_path / "two"), "--seq-len",
           str(TRAIN_SEQ), "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-2", "--warmup", "2",
           "--steps", "2", "--save-every", "0", "--min-doc-tokens", "4", "--data-cache", "none", "--no-progress",
           "--no-tensorboard", "--device", "cpu", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 per forward x 1 accumulation x 2 process(es)" in r.stdout  # vs 2 x 2 x 1 in-process
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2]
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-5, (s, a[s], b[s])


def test_cli_generate(tiny_model_dir, capsys, tmp_path):
    """`spla generate` on a saved SPLA model: the continuation on stdout equals greedy generate's text."""
    from spla.cli import main
    from spla.models import load, load_tokenizer
    rc = main(["generate", "--model", tiny_model_dir, "--prompt", "alpha beta gamma delta", "--max-new-tokens", "6",
               "--device", "cpu"])
    assert rc == 0
    cap = capsys.readouterr()
    assert "SPLA model" in cap.err and "eager decode loop" in cap.err
    tok, model = load_tokenizer(tiny_model_dir), load(tiny_model_dir)
    ids = tok("alpha beta gamma delta", return_tensors="pt").input_ids
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)  # stops at EOS
    assert cap.out.rstrip("\n") == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    prompt = tmp_path / "p.txt"
    prompt.write_text("alpha beta")
    assert main(["generate", "--model", tiny_model_dir, "--prompt-file", str(prompt), "--max-new-tokens", "2",
                 "--dense", "--device", "cpu"]) == 0
    assert "SPLA model" in capsys.readouterr().err  # a saved SPLA model stays SPLA; --dense only skips conversion
    with pytest.raises(SystemExit):
        main(["generate", "--model", tiny_model_dir, "--device", "cpu"])  # no prompt
    with pytest.raises(SystemExit, match="chat template"):
        main(["generate", "--model", tiny_model_dir, "--prompt", "alpha", "--chat", "--device", "cpu"])
