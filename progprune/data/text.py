"""text: token blocks for causal LMs (task causal_lm), registered here so that specs and
`progprune datasets` know it. Its loader is `progprune.lm.data.load_text`, imported when
used (it needs the model's tokenizer, which only the causal_lm task has)."""
from __future__ import annotations

from progprune.config import TEXT, DatasetConfig
from progprune.data._registry import register_dataset
from progprune.errors import BadInput


def _check_text(cfg: DatasetConfig) -> None:
    from progprune.lm.data import check_layout

    check_layout(cfg)


@register_dataset(TEXT, check=_check_text, data_dir=True, num_classes=None,
                  doc="text for causal LMs (task causal_lm): <split>.txt, <split>.jsonl or <split>/ "
                      "for train, val, test; tokenized once, cached, read in blocks of seq_len")
def _load_text(cfg: DatasetConfig, seed: int = 0, tokenizer=None, cache_dir: str | None = None):
    if tokenizer is None:
        raise BadInput(f"dataset {TEXT} needs a tokenizer: it is for task causal_lm; set task: "
                       "causal_lm and an hf: model", field="dataset.name")
    from progprune.lm.data import load_text

    return load_text(cfg, tokenizer, seed=seed, cache_dir=cache_dir)
