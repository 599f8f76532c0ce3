"""Loading `hf:PATH` causal LMs offline, and which families progprune knows how to prune."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import BadInput

PREFIX = "hf:"
# model_type -> the dims progprune can prune so that transformers reloads the result. GPT-2's
# config has no head_dim (it is n_embd // n_head on reload, and c_attn's q/k/v are n_embd
# wide), so its heads and hidden size stay whole: its MLP narrows and its layers go.
FAMILIES = {
    "llama": ("heads", "mlp", "hidden", "layers"),
    "mistral": ("heads", "mlp", "hidden", "layers"),
    "qwen2": ("heads", "mlp", "hidden", "layers"),
    "qwen3": ("heads", "mlp", "hidden", "layers"),
    "gpt2": ("mlp", "layers"),
}


# what save_pretrained writes for a tokenizer (fast: tokenizer.json; slow BPE: vocab.json;
# SentencePiece: tokenizer.model), any one of which AutoTokenizer loads from
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def family(model) -> str:
    kind = getattr(model.config, "model_type", None)
    if kind not in FAMILIES:
        raise BadInput(f"model architecture {kind!r} is not supported for pruning; "
                       f"supported: {', '.join(sorted(FAMILIES))}", field="model")
    return kind


def is_repo_id(spec: str) -> bool:
    """`hf:org/name` (a Hugging Face Hub id) rather than a directory: exactly one slash, no
    leading ./ or / or ~, and no such directory here."""
    name = spec[len(PREFIX):]
    return (name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()
            and all(part and not part.startswith(".") for part in name.split("/")))


def local_dir(spec: str, *, download: bool = True) -> Path | None:
    """`hf:PATH` -> the directory, checked to hold a config.json. `hf:org/name` -> its snapshot
    in the Hugging Face cache (HF_HOME honoured), else, where `download` and the hub is not
    switched off (HF_HUB_OFFLINE=1), downloaded into that cache; None when `download` is
    False and it is not cached (a driver leaves the download to the workers)."""
    if not spec.startswith(PREFIX):
        raise BadInput(f"{spec!r} is not an hf: model; write hf:PATH", field="model")
    if is_repo_id(spec):
        return _from_hub(spec[len(PREFIX):], download)
    path = Path(spec[len(PREFIX):]).expanduser()
    if not (path / "config.json").is_file():
        raise BadInput(f"{path} has no config.json: give hf:PATH a directory written by "
                       "save_pretrained", field="model")
    return path


def _from_hub(repo: str, download: bool) -> Path | None:
    import os

    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # noqa: BLE001 - huggingface_hub raises several kinds for "not cached"
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not download:
        return None
    if offline:
        raise BadInput(f"hf:{repo} is not in the Hugging Face cache ({HF_HUB_CACHE}) and the hub is off "
                       "(HF_HUB_OFFLINE=1); download it there, or give hf:PATH a local directory", field="model")
    try:
        return Path(snapshot_download(repo))
    except Exception as e:  # noqa: BLE001 - network, auth, no such repo: one line
        raise BadInput(f"hf:{repo} could not be downloaded ({type(e).__name__}: {str(e).splitlines()[0]}); "
                       f"fill the cache ({HF_HUB_CACHE}) or give hf:PATH a local directory", field="model") from None


def load(spec: str):
    """(model in eval mode, tokenizer or None) from `hf:PATH`, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = local_dir(spec)
    try:
        # float32 whatever the checkpoint's dtype (the Hub's are often bf16): AdamW on bf16
        # weights rounds most of a small update away; bf16 autocast on a GPU keeps the speed
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as e:
        raise BadInput(f"cannot load {path} as a causal LM: {str(e).splitlines()[0]}",
                       field="model") from None
    family(model)
    tokenizer = None
    if has_tokenizer(path):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(spec: str):
    """The tokenizer saved beside `hf:PATH`'s model, offline; BadInput when there is none
    (a causal LM's text is tokenized with its own tokenizer). Checked by its files first:
    given a directory with none, transformers 5 builds an empty tokenizer of the config's
    model type (one token; every text encodes to no ids) instead of failing."""
    from transformers import AutoTokenizer

    path = local_dir(spec)
    if not has_tokenizer(path):
        raise BadInput(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the model's "
                       "tokenizer there (tokenizer.save_pretrained)", field="model")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise BadInput(f"{path} has no tokenizer that loads offline ({str(e).splitlines()[0]}); save the "
                       "model's tokenizer there (tokenizer.save_pretrained)", field="model") from None
