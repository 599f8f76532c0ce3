"""Text for causal LMs: a tokenizer trained offline on the corpus, token ids, perplexity."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import BadInput

EOS = "<|endoftext|>"


def train_tokenizer(paths, vocab_size: int):
    """A byte-level BPE tokenizer trained on `paths` in-process (no hub), as a transformers
    fast tokenizer (so it saves next to the model and AutoTokenizer loads it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(p) for p in paths], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


def read_text(path) -> str:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"{path} does not exist", field="dataset.data_dir") from None
    except UnicodeDecodeError as e:
        raise BadInput(f"{path} is not UTF-8 text (byte {e.start}); convert it",
                       field="dataset.data_dir") from None
    if not text.strip():
        raise BadInput(f"{path} is empty", field="dataset.data_dir")
    return text


def token_ids(path, tokenizer) -> torch.Tensor:
    ids = tokenizer.backend_tokenizer.encode(read_text(path), add_special_tokens=False).ids
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int, batch_size: int,
               max_blocks: int | None = None) -> float:
    """exp(mean next-token NLL) over non-overlapping `seq_len` blocks of `ids`."""
    n = len(ids) // seq_len
    if n == 0:
        raise BadInput(f"{len(ids)} tokens is less than one block of seq_len {seq_len}",
                       field="dataset.seq_len")
    blocks = ids[: n * seq_len].view(n, seq_len)[:max_blocks]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for batch in blocks.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                               batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll / count)
