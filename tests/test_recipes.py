"""The causal-LM recipe (ray_jobs/llm_qwen2p5_0p5b.yaml, and its copy in
manifests/overlays/gpu-llm) cannot run here: no Qwen2.5 weights, no WikiText-2, no GPU. Its
dry run against a stand-in of the same layout (a tiny random Qwen2 written by save_pretrained
with a BPE tokenizer trained offline, and a folder of train/val/test .txt of real English
text) plans every combination and writes nothing; what a user can get wrong when filling the
volume (a split missing, the tokenizer left behind, another model's tokenizer) is one line."""
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, progprune, progprune_in_process, tiny_causal_lm, write_pydoc_corpus

RECIPE = "llm_qwen2p5_0p5b.yaml"
SPECS = [ROOT / "ray_jobs" / RECIPE, ROOT / "manifests" / "overlays" / "gpu-llm" / "specs" / RECIPE]
# where the recipe says the volume holds them (docs/deploy.md, "A causal LM")
MODEL_DIR, TEXT_DIR = "/data/models/Qwen2.5-0.5B", "/data/text/wikitext-2"
# the GPU cluster the recipe is for (a dry run does not connect): without --address the dry
# run is of this machine's embedded Ray, whose lack of a GPU is refused
GPU_CLUSTER = ("--address", "ray://gpu-head:10001")


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """(model dir, text dir, vocabulary size) shaped like the recipe's volume."""
    from progprune.lm.text import train_tokenizer

    root = tmp_path_factory.mktemp("standin")
    text = write_pydoc_corpus(root / "wikitext-2")
    val = (text / "val.txt").read_text(encoding="utf-8")
    (text / "val.txt").write_text(val[: len(val) // 2], encoding="utf-8")
    (text / "test.txt").write_text(val[len(val) // 2:], encoding="utf-8")
    tok = train_tokenizer([text / "train.txt"], vocab_size=384)
    model = root / "Qwen2.5-0.5B"
    tiny_causal_lm("qwen2", vocab_size=len(tok)).save_pretrained(model)
    tok.save_pretrained(model)
    return model, text, len(tok)


def _pointed(spec_path: Path, tmp_path: Path, model, text) -> Path:
    """The recipe with its volume paths pointed at the stand-in, and nothing else changed."""
    spec = yaml.safe_load(spec_path.read_text())
    assert spec["models"] == [f"hf:{MODEL_DIR}"] and spec["dataset"]["data_dir"] == TEXT_DIR, spec_path
    spec["models"] = [f"hf:{model}"]
    spec["dataset"]["data_dir"] = str(text)
    spec["output"] = str(tmp_path / "out")
    path = tmp_path / RECIPE
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_llm_recipe_plans_every_combination_against_a_stand_in(spec_path, standin, tmp_path, monkeypatch):
    from progprune.spec import load_spec

    model, text, _ = standin
    monkeypatch.setenv("PROGPRUNE_CACHE", str(tmp_path / "cache"))
    path = _pointed(spec_path, tmp_path, model, text)
    r = progprune_in_process("sweep", path, "--dry-run", *GPU_CLUSTER)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("sweep llm-qwen2p5-0p5b: 6 combinations (1 models x 3 speedups x 1 target metrics x 2 methods "
            "x 1 seeds)") in r.stdout, r.stdout
    assert "prune task 1.0 GPU / 4.0 CPU; fine-tune 2 Ray Train worker(s), use_gpu=True" in r.stdout
    spec = load_spec(path)
    combos = spec.combinations()
    assert sorted((c.target_speedup, c.method) for c in combos) == sorted(
        (s, m) for s in (1.25, 1.5, 2.0) for m in ("l2", "taylor"))
    lines = [ln for ln in r.stdout.splitlines() if "[       todo]" in ln]
    assert len(lines) == 6
    for c, line in zip(combos, lines):
        assert c.combo_id() in line and c.method in line and f"{c.target_speedup}x params" in line, line
    # what the recipe is: the model as its own base, the LM fine-tune, on GPUs
    assert spec.task == "causal_lm" and spec.base_training.epochs == 0
    ft = spec.finetune
    assert (ft.optimizer, ft.epochs, ft.use_gpu, ft.gradient_checkpointing) == ("adamw", 1, True, True)
    assert 0 < ft.warmup < 1 and 1e-5 <= ft.lr <= 1e-4 and spec.resources.gpus_per_task == 1
    assert spec.dataset.seq_len == 512 and tuple(spec.pruning.dims) == ("heads", "mlp")
    # a dry run writes nothing: no output, no token cache
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def _broken_standin(tmp_path, standin, break_it):
    import shutil

    model, text, _ = standin
    shutil.copytree(model, tmp_path / "model")
    shutil.copytree(text, tmp_path / "text")
    break_it(tmp_path / "model", tmp_path / "text")
    return _pointed(SPECS[0], tmp_path, tmp_path / "model", tmp_path / "text")


def _no_tokenizer(model, _text):
    for f in model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()


def _another_models_tokenizer(model, text):
    from progprune.lm.text import train_tokenizer

    for f in model.iterdir():
        if f.name.startswith("tokenizer"):
            f.unlink()
    train_tokenizer([text / "train.txt"], vocab_size=512).save_pretrained(model)


@pytest.mark.parametrize("break_it, words", [
    (lambda _m, text: (text / "test.txt").unlink(),
     "dataset.data_dir: {text} has no test split: add {text}/test.txt"),
    (_no_tokenizer, "models[0]: {model} has no tokenizer"),
    (_another_models_tokenizer, "models[0]: its tokenizer has 512 tokens but the model's embedding has 384 rows"),
], ids=["no test split", "no tokenizer", "another model's tokenizer"])
def test_a_volume_filled_wrong_is_one_line_and_nothing_written(standin, tmp_path, monkeypatch, break_it, words):
    """transformers 5 builds an empty tokenizer for a model directory that has none, and a
    larger vocabulary than the embedding fails only on the first batch: both are refused
    before any work."""
    monkeypatch.setenv("PROGPRUNE_CACHE", str(tmp_path / "cache"))
    assert standin[2] == 384
    path = _broken_standin(tmp_path, standin, break_it)
    r = progprune_in_process("sweep", path, "--dry-run", *GPU_CLUSTER)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stdout + r.stderr
    assert words.format(model=tmp_path / "model", text=tmp_path / "text") in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_a_model_without_its_tokenizer_is_refused_by_a_real_process(standin, tmp_path):
    path = _broken_standin(tmp_path, standin, _no_tokenizer)
    r = progprune("sweep", path, "--dry-run", *GPU_CLUSTER)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: models[0]: {tmp_path / 'model'} has no tokenizer (none of tokenizer.json, tokenizer_config.json, "
        "vocab.json, tokenizer.model); save the model's tokenizer there (tokenizer.save_pretrained)"]
    assert not (tmp_path / "out").exists()
