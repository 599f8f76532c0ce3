"""Causal LMs (progprune.lm): declared groups pruned progressively to a params target,
reloaded by transformers with identical logits, perplexity on real English text."""
import math

import pytest
import torch

from transformers import AutoModelForCausalLM  # the llm extra, also in .[test]

from progprune.errors import BadInput
from progprune.lm import models, text
from progprune.lm.prune import count_params, prune_to_params
from tests.helpers import tiny_causal_lm, write_pydoc_corpus

SEQ = 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = write_pydoc_corpus(tmp_path_factory.mktemp("pydoc"))
    tok = text.train_tokenizer([folder / "train.txt"], vocab_size=512)
    return folder, tok, text.token_ids(folder / "val.txt", tok)


def _saved(family, tok, folder):
    model = tiny_causal_lm(family, vocab_size=len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return f"hf:{folder}"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("speedup", [1.5, 2.0])
def test_prune_reload_perplexity(family, speedup, corpus, tmp_path):
    folder, tok, val = corpus
    model, loaded_tok = models.load(_saved(family, tok, tmp_path / "base"))
    assert len(loaded_tok) == len(tok)
    heads0 = getattr(model.config, "num_attention_heads", None)
    kv0 = getattr(model.config, "num_key_value_heads", None)
    base_ppl = text.perplexity(model, val, SEQ, batch_size=8, max_blocks=16)

    result = prune_to_params(model, speedup, importance="l2", steps=3, seed=0)

    params = count_params(model)
    assert params == result.params and result.base_params / params >= speedup
    # progressive: each step smaller, the last one lands at or below the target
    assert [h["params"] for h in result.history] == sorted(
        (h["params"] for h in result.history), reverse=True)
    assert len(result.history) == 3 and params <= result.target_params
    cfg = model.config
    if family == "gpt2":  # heads stay whole (no head_dim in GPT-2's config)
        assert result.heads is None and cfg.n_inner == result.intermediate < 512
    else:
        assert cfg.intermediate_size == result.intermediate < 256
        heads, kv = result.heads
        assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (heads, kv)
        assert 1 <= kv <= kv0 and heads == kv * (heads0 // kv0)  # whole KV groups
        assert cfg.head_dim == 64 // heads0
    pruned_ppl = text.perplexity(model, val, SEQ, batch_size=8, max_blocks=16)
    assert math.isfinite(base_ppl) and math.isfinite(pruned_ppl)

    ids = torch.randint(0, len(tok), (2, 24), generator=torch.Generator().manual_seed(1))
    model.save_pretrained(tmp_path / "pruned")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", local_files_only=True)
    assert count_params(again) == params
    assert torch.allclose(_logits(model, ids), _logits(again.eval(), ids), atol=1e-5)


def test_importance_picks_the_weakest_units_and_random_differs(corpus):
    _, tok, _ = corpus
    model = tiny_causal_lm("qwen2", vocab_size=len(tok))
    attn = model.model.layers[0].self_attn
    mlp = model.model.layers[0].mlp
    with torch.no_grad():  # KV group 1 (query heads 2, 3) near zero
        for w in (attn.q_proj.weight[32:], attn.k_proj.weight[16:], attn.v_proj.weight[16:],
                  attn.o_proj.weight[:, 32:], attn.q_proj.bias[32:], attn.k_proj.bias[16:],
                  attn.v_proj.bias[16:]):
            w.mul_(1e-3)
        kept_q = attn.q_proj.weight[:32].clone()
        gate, up, down = (m.weight.clone() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    prune_to_params(model, 1.05, importance="l1", steps=1, dims=("heads",))
    assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 2
    assert torch.equal(attn.q_proj.weight, kept_q)  # the strong group stayed, whole
    assert model.config.intermediate_size == 256  # dims=heads: MLP untouched

    prune_to_params(model, 1.02, importance="l1", steps=1, dims=("mlp",))
    width = model.config.intermediate_size
    assert width < 256
    score = gate.abs().sum(1) + up.abs().sum(1) + down.abs().sum(0)
    kept = torch.sort(torch.argsort(score, stable=True)[256 - width:]).values
    assert torch.equal(mlp.gate_proj.weight, gate[kept]) and torch.equal(mlp.down_proj.weight, down[:, kept])

    a, b = (tiny_causal_lm("llama", vocab_size=len(tok)) for _ in range(2))
    prune_to_params(a, 1.5, importance="random", steps=2, seed=0)
    prune_to_params(b, 1.5, importance="random", steps=2, seed=1)
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)


def test_bad_inputs_are_one_line(corpus, tmp_path):
    _, tok, _ = corpus
    with pytest.raises(BadInput, match="out of reach"):
        prune_to_params(tiny_causal_lm("gpt2", vocab_size=len(tok)), 10.0, importance="l2", steps=2)
    with pytest.raises(BadInput, match="does not apply"):
        prune_to_params(tiny_causal_lm("gpt2", vocab_size=len(tok)), 1.5, importance="bn_scale", steps=2)
    with pytest.raises(BadInput, match="no config.json"):
        models.load(f"hf:{tmp_path}")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(BadInput, match="is empty"):
        text.read_text(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(BadInput, match="not UTF-8"):
        text.read_text(tmp_path / "bin.txt")
