"""Causal LMs (progprune.lm): declared groups pruned progressively to a params target,
reloaded by transformers with identical logits, perplexity on real English text."""
import math

import pytest
import torch

from transformers import AutoModelForCausalLM  # the llm extra, also in .[test]

from progprune.errors import BadInput
from progprune.lm import models, text
from progprune.lm.artifact import export_hf, is_lm_artifact, load_lm, save_lm
from progprune.lm.prune import count_macs, count_params, prune_lm, prune_to_params
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


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("speedup", [1.5, 2.0])
@pytest.mark.parametrize("metric", ["params", "macs"])
def test_prune_reload_perplexity(family, speedup, metric, corpus, tmp_path):
    folder, tok, val = corpus
    model, loaded_tok = models.load(_saved(family, tok, tmp_path / "base"))
    assert len(loaded_tok) == len(tok)
    heads0 = getattr(model.config, "num_attention_heads", None)
    kv0 = getattr(model.config, "num_key_value_heads", None)
    base_ppl = text.perplexity(model, val, SEQ, batch_size=8, max_blocks=16)

    if metric == "params":
        result = prune_to_params(model, speedup, importance="l2", steps=3, seed=0)
    else:
        result = prune_lm(model, speedup, metric="macs", importance="l2", steps=3, seq_len=SEQ)

    params = count_params(model)
    got = {"params": params, "macs": count_macs(model, SEQ)}[metric]
    base = {"params": result.base_params, "macs": result.base_macs}[metric]
    assert params == result.params and got == result.history[-1][metric]
    assert result.achieved == pytest.approx(base / got) and result.target == base / speedup
    assert result.achieved >= speedup and got <= result.target
    # progressive: each step smaller, the last one lands at or below the target
    assert [h[metric] for h in result.history] == sorted(
        (h[metric] for h in result.history), reverse=True)
    assert len(result.history) == 3 == result.steps and result.history[0][metric] > result.target
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


def _eager_macs_per_token(model, seq_len):
    """MACs a token of a [1, seq_len] forward, by torch's own flop counter (eager attention:
    its CPU SDPA kernel is not in the counter's table)."""
    from torch.utils.flop_counter import FlopCounterMode

    impl = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(input_ids=torch.zeros(1, seq_len, dtype=torch.long), use_cache=False)
    finally:
        model.config._attn_implementation = impl
    return fc.get_total_flops() // 2 // seq_len


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_macs_counter_and_planned_counts_are_exact(family):
    model = tiny_causal_lm(family, vocab_size=300)
    assert count_macs(model, 48) == _eager_macs_per_token(model, 48)
    dims = ("mlp", "layers") if family == "gpt2" else ("heads", "mlp", "hidden", "layers")
    seen = []
    result = prune_lm(model, 1.7, metric="macs", steps=2, dims=dims, seq_len=48,
                      on_step=lambda *a: seen.append(a))
    assert [s[:2] for s in seen] == [(1, 2), (2, 2)] and seen[-1][2] == result.achieved
    assert seen[0][2] == result.base_macs / result.history[0]["macs"] < result.achieved
    assert result.macs == count_macs(model, 48) == _eager_macs_per_token(model, 48)
    assert result.base_macs / result.macs == result.achieved >= 1.7
    assert result.params == count_params(model) < result.base_params


def _cache_agrees(model, ids):
    """The last token's logits from the KV cache equal a full forward's (layer_idx right)."""
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits[:, -1]
        first = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], cache=first.past_key_values,
                     use_cache=True).logits[:, -1]
    return torch.allclose(full, step, atol=1e-5)


@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_hidden_and_layers_reload_with_identical_logits(family, tied, tmp_path):
    from transformers import LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family](
        vocab_size=300, num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
        tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    result = prune_lm(model, 2.5, importance="l1", steps=2, dims=("hidden", "layers"))
    cfg = model.config
    assert result.hidden == cfg.hidden_size == model.model.embed_tokens.embedding_dim < 64
    assert result.layers == cfg.num_hidden_layers == len(model.model.layers) < 4
    assert cfg.head_dim == 16 and cfg.num_attention_heads == 4 and cfg.intermediate_size == 128
    assert family == "llama" or len(cfg.layer_types) == cfg.num_hidden_layers  # Qwen2 has them
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(result.layers))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert model.lm_head.weight.shape == (300, result.hidden)
    assert _cache_agrees(model, ids)
    model.save_pretrained(tmp_path / "pruned")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", local_files_only=True).eval()
    assert count_params(again) == count_params(model) == result.params
    assert torch.allclose(_logits(model, ids), _logits(again, ids), atol=1e-5)
    assert _cache_agrees(again, ids)


def test_taylor_ranks_by_weight_times_gradient():
    """MLP channel 7 of every layer has the largest weights but gives nothing (up_proj row
    zeroed: its output is act(gate) * 0), so its gradient is zero: Taylor cuts it first,
    magnitude keeps it. Channel 9 is small but carries the loss: Taylor keeps it."""
    def model_with_channels():
        model = tiny_causal_lm("llama", vocab_size=300)
        with torch.no_grad():
            for layer in model.model.layers:
                mlp = layer.mlp
                mlp.gate_proj.weight[7] *= 50
                mlp.down_proj.weight[:, 7] *= 50
                mlp.up_proj.weight[7] = 0
                mlp.gate_proj.weight[9] *= 0.2
                mlp.up_proj.weight[9] *= 20  # small in l2, large in effect
        return model

    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(2))
    kept = {}
    for importance in ("taylor", "l2"):
        model = model_with_channels()
        marker = model.model.layers[0].mlp.gate_proj.weight[[7, 9]].clone()
        prune_lm(model, 1.03, importance=importance, steps=1, dims=("mlp",), calib=calib)
        rows = model.model.layers[0].mlp.gate_proj.weight
        kept[importance] = [any(torch.equal(r, m) for r in rows) for m in marker]
        assert model.config.intermediate_size < 256
    assert kept["taylor"] == [False, True]
    assert kept["l2"][0] is True


def test_bad_pruning_settings_are_one_line():
    model = tiny_causal_lm("llama", vocab_size=300)
    for kwargs, match in [
        (dict(importance="slim"), r"'slim' does not apply to causal LMs; use one of l1, l2, random, taylor"),
        (dict(importance="fpgm"), "'fpgm' does not apply"),
        (dict(importance="taylor"), "needs a calibration batch"),
        (dict(importance="taylor", calib=torch.full((1, 4), 300)), "must lie in 0..299"),
        (dict(dims=("heads", "width")), "dim 'width' is unknown; use some of heads, mlp, hidden, layers"),
        (dict(metric="latency"), "metric 'latency' is not one for causal LMs"),
    ]:
        with pytest.raises(BadInput, match=match) as e:
            prune_lm(model, 1.5, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(BadInput, match="'hidden' does not reload in transformers for gpt2"):
        prune_lm(tiny_causal_lm("gpt2", vocab_size=300), 1.5, dims=("mlp", "hidden"))
    with pytest.raises(BadInput, match=r"20.0x macs is out of reach .* MACs per token"):
        prune_lm(model, 20.0, metric="macs", dims=("mlp",))
    assert count_params(model) == count_params(tiny_causal_lm("llama", vocab_size=300))  # nothing cut


@pytest.mark.parametrize("family,dims", [("llama", ("heads", "mlp", "hidden", "layers")),
                                         ("gpt2", ("mlp", "layers"))])
def test_save_load_export_round_trip(family, dims, corpus, tmp_path):
    from transformers import AutoTokenizer

    _, tok, _ = corpus
    model = tiny_causal_lm(family, vocab_size=len(tok))
    result = prune_lm(model, 1.6, steps=2, dims=dims)
    path = save_lm(tmp_path / "pruned.pt", model, tok, history=result.history, meta={"speedup": 1.6})
    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    assert (raw["format"], raw["version"]) == ("progprune-lm", 1) and "tokenizer.json" in raw["tokenizer_files"]
    if family == "gpt2":  # tied: the weight is stored once
        assert raw["tied"] == {"lm_head.weight": "transformer.wte.weight"}
        assert "lm_head.weight" not in raw["state_dict"]
    assert is_lm_artifact(path)

    again, tok2, info = load_lm(path)
    assert info["history"] == result.history and info["meta"] == {"speedup": 1.6}
    assert not again.training and count_params(again) == count_params(model)
    if family == "gpt2":
        assert again.lm_head.weight is again.transformer.wte.weight
    sample = "def f(x):\n    return x"
    assert tok2(sample)["input_ids"] == tok(sample)["input_ids"]
    ids = torch.tensor([tok(sample)["input_ids"]])
    assert torch.equal(_logits(model, ids), _logits(again, ids))

    out = export_hf(path, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tok(sample)["input_ids"] == tok(sample)["input_ids"]
    assert torch.allclose(_logits(hf, ids), _logits(again, ids), atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "pruned.pt"]  # no staging left
    (tmp_path / "empty").mkdir()
    assert export_hf(path, tmp_path / "empty") == str(tmp_path / "empty")  # an empty dir is fine
    assert (tmp_path / "empty" / "config.json").is_file()


def test_artifact_bad_inputs_are_one_line(corpus, tmp_path):
    _, tok, _ = corpus
    image_like = tmp_path / "image.pt"
    torch.save({"format": "progprune.artifact/1", "state_dict": {}}, image_like)
    (tmp_path / "notes.txt").write_text("hello")
    for path in (image_like, tmp_path / "notes.txt"):
        assert not is_lm_artifact(path)
        with pytest.raises(BadInput, match="is not a progprune LM artifact"):
            load_lm(path)
    with pytest.raises(BadInput, match="does not exist"):
        load_lm(tmp_path / "missing.pt")
    path = save_lm(tmp_path / "lm.pt", tiny_causal_lm("llama", vocab_size=len(tok)), None)
    assert load_lm(path)[1] is None  # no tokenizer saved, none loaded
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(BadInput, match="already exists and is not an empty directory") as e:
        export_hf(path, busy)
    assert "\n" not in str(e.value) and sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    with pytest.raises(BadInput, match="is not a progprune LM artifact"):
        export_hf(image_like, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["mistral", "qwen3"])
def test_mistral_and_qwen3_prune_every_dim_and_reload(family, tmp_path):
    """The two families of the issue's list not covered above (Qwen3: q/k norms per head;
    both grouped-query): every dim, MACs target, reloaded by transformers with identical logits."""
    model = tiny_causal_lm(family, vocab_size=300)
    kv0 = model.config.num_key_value_heads
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    result = prune_lm(model, 2.0, metric="macs", importance="l2", steps=2, seq_len=12,
                      dims=("heads", "mlp", "hidden", "layers"))
    assert result.achieved >= 2.0 and result.heads[1] <= kv0 and result.heads[0] == result.heads[1] * 2
    model.save_pretrained(tmp_path / "pruned")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", local_files_only=True).eval()
    assert again.config.model_type == family and count_params(again) == result.params
    assert torch.allclose(_logits(model, ids), _logits(again, ids), atol=1e-5)
