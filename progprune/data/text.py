"""The `text` data set (task causal_lm): a folder of text, tokenized once with the model's
tokenizer into a token-id cache, streamed in fixed-length blocks.

Layout: for each split (train, val, test) one of `D/<split>.txt` (one document),
`D/<split>.jsonl` (one document per line, its text in field `dataset.text_field`) or a
folder `D/<split>/` of such files (recursively, in sorted order of their relative paths;
hidden files and other suffixes skipped). A split's documents are joined with the
tokenizer's EOS between them.

Cache: one numpy file per split (uint16 ids when the vocabulary fits, else uint32) under
`<cache_dir>/tokens/<key>/` (cache_dir: the argument, else $PROGPRUNE_CACHE, else
~/.cache/progprune), key = sha256 of the tokenizer (its backend JSON, or its vocabulary) and
EOS id, each file's content hash (not its path: a moved data folder keeps its cache) and
the text field. It is written in a staging folder and renamed into place, so concurrent
loaders on one node never read half of it; the first one there wins, a later one reuses it.

Blocks: `seq_len` + 1 tokens at stride `seq_len`: x its first `seq_len`, y its last (x shifted
by one), so every token but a split's first is predicted exactly once.

Long documents are tokenized a piece at a time (about 64 K characters, cut after a newline
that a non-space follows, which no byte-level BPE merges across; at most 1 M characters),
so memory stays flat however large a file is; the cut depends on the text alone, so the
same text gives the same ids in every layout.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from progprune._atomic import StagedDir
from progprune.config import TEXT, DatasetConfig
from progprune.data._registry import need_dir, register_dataset
from progprune.data.batches import sample_order
from progprune.errors import BadInput

SPLITS = ("train", "val", "test")
SUFFIXES = (".txt", ".jsonl")
LAYOUT = "<split>.txt, <split>.jsonl or a folder <split>/ of .txt/.jsonl files, for train, val and test"
CACHE_ENV = "PROGPRUNE_CACHE"
FORMAT = 1  # of the cache (the piece rule, the file layout): a change makes new keys
PIECE, HARD = 1 << 16, 1 << 20  # characters of text a tokenizer call sees: usually, at most
_READ = 1 << 20  # bytes read at a time
_CUT = re.compile(r"\n(?=\S)")
_FIELD = "dataset.data_dir"
_WHY = {"val": " (fine-tuning picks its best epoch on val)", "test": " (perplexity is reported on test)"}


# ---- layout --------------------------------------------------------------------------
def split_files(root: Path, split: str) -> list[Path]:
    """The files of `split` under `root`, in reading order; one line when there are none."""
    found = [p for p in (root / f"{split}.txt", root / f"{split}.jsonl", root / split) if p.exists()]
    if len(found) > 1:
        raise BadInput(f"{root} holds {' and '.join(p.name for p in found)} for the {split} split; "
                       "keep one", field=_FIELD)
    if not found:
        raise BadInput(f"{root} has no {split} split: add {root / split}.txt (or {split}.jsonl, or a "
                       f"folder {split}/ of .txt/.jsonl files){_WHY.get(split, '')}", field=_FIELD)
    path = found[0]
    if path.suffix in SUFFIXES:
        if not path.is_file():
            raise BadInput(f"{path} is not a file; make it one ({LAYOUT})", field=_FIELD)
        return [path]
    if not path.is_dir():
        raise BadInput(f"{path} is not a folder; make it one, or name it {split}.txt or "
                       f"{split}.jsonl", field=_FIELD)
    files = []
    for d, dirs, names in os.walk(path):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        files += [Path(d) / n for n in names if not n.startswith(".") and Path(n).suffix in SUFFIXES]
    if not files:
        raise BadInput(f"{path} holds no .txt or .jsonl files; put the {split} text there", field=_FIELD)
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


def check_layout(cfg: DatasetConfig) -> dict[str, list[Path]]:
    """Cheap (nothing is read): split -> its files."""
    root = need_dir(cfg, LAYOUT)
    return {s: split_files(root, s) for s in SPLITS}


# ---- reading: documents, checked, cut into pieces -------------------------------------
def _bad(path, where: str, what: str) -> BadInput:
    return BadInput(f"{path}{where} {what}", field=_FIELD)


def _text_chunks(path: Path) -> Iterator[str]:
    """`path` decoded as UTF-8 (a BOM dropped), a chunk at a time; refused when it holds a
    NUL byte (binary), is not UTF-8 or holds only white space."""
    dec = codecs.getincrementaldecoder("utf-8-sig")()
    at, text = 0, False
    with open(path, "rb") as f:
        while block := f.read(_READ):
            if (nul := block.find(b"\0")) >= 0:
                raise _bad(path, "", f"is binary (a NUL byte at byte {at + nul}); give UTF-8 text")
            try:
                s = dec.decode(block)
            except UnicodeDecodeError as e:
                raise _bad(path, "", f"is not UTF-8 text (near byte {at + e.start}); convert it to "
                                     "UTF-8") from None
            at += len(block)
            text = text or not s.isspace() and s != ""
            yield s
    try:
        dec.decode(b"", final=True)
    except UnicodeDecodeError:
        raise _bad(path, "", "is not UTF-8 text (it ends inside a character); convert it to UTF-8") from None
    if not text:
        raise _bad(path, "", "is empty; put text in it, or remove it")


def _jsonl_docs(path: Path, text_field: str) -> Iterator[str]:
    """The non-blank `text_field` strings of a .jsonl file, one per line; each line checked."""
    docs = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f":{n}"
            if b"\0" in raw:
                raise _bad(path, where, "is binary (a NUL byte); give UTF-8 JSON lines")
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError:
                raise _bad(path, where, "is not UTF-8 text; convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise _bad(path, where, f"is not JSON ({e.msg}); write one JSON object per line") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = f" (it has {', '.join(map(str, record))})" if isinstance(record, dict) else ""
                raise _bad(path, where, f"has no {text_field!r} field{keys}; set dataset.text_field "
                                        "to the field that holds the text")
            text = record[text_field]
            if not isinstance(text, str):
                raise _bad(path, where, f"{text_field!r} is {type(text).__name__}, not a string; "
                                        "write the text as a JSON string")
            if text.strip():
                docs += 1
                yield text
    if not docs:
        raise _bad(path, "", f"is empty (no line with {text_field!r} text); put text in it, or remove it")


def _pieces(chunks) -> Iterator[str]:
    """The text of `chunks` cut into pieces: after the first newline followed by a non-space
    at or past PIECE characters, else at HARD; by the text alone, however it was chunked."""
    carry = ""
    for chunk in chunks:
        carry += chunk
        while len(carry) > PIECE:
            m = _CUT.search(carry, PIECE - 1)
            if m and m.end() <= HARD:
                cut = m.end()
            elif len(carry) > HARD:
                cut = HARD
            else:
                break  # the next chunk decides
            yield carry[:cut]
            carry = carry[cut:]
    if carry:
        yield carry


def _documents(files: list[Path], text_field: str) -> Iterator[Iterator[str]]:
    """Each document of `files`, as its pieces."""
    for path in files:
        if path.suffix == ".jsonl":
            for doc in _jsonl_docs(path, text_field):
                yield _pieces([doc])
        else:
            yield _pieces(_text_chunks(path))


# ---- tokenizing into the cache ---------------------------------------------------------
def _encoder(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: batches in parallel, in Rust
        return lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return lambda texts: [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def _eos(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise BadInput("the model's tokenizer has no EOS token, which separates documents; give the "
                       "hf: model a tokenizer with eos_token set", field="model")
    return int(eos)


def _dtype(tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32)


def _write_split(files, text_field: str, tokenizer, out: Path) -> int:
    """Tokenize a split's documents into `out` (raw ids, EOS between documents): its length.
    Pieces go to the tokenizer about HARD characters at a time, across documents."""
    encode, eos, dtype = _encoder(tokenizer), _eos(tokenizer), _dtype(tokenizer)
    limit = np.iinfo(dtype).max
    n = 0
    with open(out, "wb") as f:
        def write(items):  # pieces, and None for an EOS
            nonlocal n
            encoded = iter(encode([t for t in items if t is not None]))
            for t in items:
                a = np.asarray([eos] if t is None else next(encoded), dtype=np.int64)
                if len(a) and a.max() > limit:
                    raise BadInput(f"the tokenizer gave id {a.max()} beyond its own length "
                                   f"{len(tokenizer)}; give a consistent tokenizer", field="model")
                a.astype(dtype).tofile(f)
                n += len(a)

        batch, size = [], 0
        for i, doc in enumerate(_documents(files, text_field)):
            if i:
                batch.append(None)
            for piece in doc:
                batch.append(piece)
                size += len(piece)
                if size >= HARD:
                    write(batch)
                    batch, size = [], 0
        write(batch)
    return n


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what maps text to ids: the backend's JSON (less its padding and
    truncation, which a call may set) or the vocabulary, and the EOS id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        for setting in ("padding", "truncation"):
            spec.pop(setting, None)
    else:
        spec = {"class": type(tokenizer).__name__, "vocab": tokenizer.get_vocab()}
    text = json.dumps([spec, _eos(tokenizer)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _file_hash(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_key(files: dict[str, list[Path]], tokenizer, text_field: str) -> str:
    contents = {s: [[p.suffix, _file_hash(p)] for p in paths] for s, paths in files.items()}
    text = json.dumps({"format": FORMAT, "tokenizer": tokenizer_fingerprint(tokenizer),
                       "text_field": text_field, "files": contents}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cache_root(cache_dir: str | None = None) -> Path:
    """`cache_dir`, else $PROGPRUNE_CACHE, else ~/.cache/progprune."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/progprune").expanduser()


def _build(cfg: DatasetConfig, tokenizer, cache_dir: str | None) -> Path:
    """The cache folder of `cfg`'s text under this tokenizer, tokenized here if it is not
    there yet (small splits first: a bad file fails before the large one is read)."""
    files = check_layout(cfg)
    dest = cache_root(cache_dir) / "tokens" / cache_key(files, tokenizer, cfg.text_field)
    if (dest / "meta.json").is_file():
        return dest
    staged = StagedDir(dest)
    with staged as stage:
        counts = {s: _write_split(files[s], cfg.text_field, tokenizer, Path(stage) / f"{s}.bin")
                  for s in ("val", "test", "train")}
        meta = {"format": FORMAT, "dtype": _dtype(tokenizer).name, "vocab": len(tokenizer), "tokens": counts}
        Path(stage, "meta.json").write_text(json.dumps(meta, indent=1))
        if not (dest / "meta.json").is_file():  # else another loader published it meanwhile
            staged.publish([f"{s}.bin" for s in SPLITS] + ["meta.json"])  # meta.json last: ready
    return dest


# ---- the splits ------------------------------------------------------------------------
@dataclass
class TextSplits:
    """Token blocks of the three splits, with the interface of the image sets' `Splits`
    (`size`, `batches`, `num_classes`: the logits' width, `input_shape`: (seq_len,)).
    The token files are opened (memory-mapped) at first use; a pickled copy (a Ray Train
    worker) opens them again where it lands, and tokenizes anew where they are missing."""

    cfg: DatasetConfig
    tokenizer: object
    cache_dir: str | None
    folder: Path  # the cache's
    counts: dict  # split -> tokens
    dtype: str
    name: str = "text"
    num_classes: int = 0  # len(tokenizer): the vocabulary, the logits' width
    input_shape: tuple = ()  # (seq_len,)
    eval_batch_size: int | None = None
    mean: None = None
    std: None = None
    _maps: dict = field(default_factory=dict, repr=False)

    @property
    def seq_len(self) -> int:
        return self.input_shape[0]

    def tokens(self, split: str) -> np.memmap:
        """The split's token ids (read-only, memory-mapped)."""
        if split not in self._maps:
            if not (self.folder / "meta.json").is_file():  # a copy on another node
                self.folder = _build(self.cfg, self.tokenizer, self.cache_dir)
            self._maps[split] = np.memmap(self.folder / f"{split}.bin", dtype=self.dtype, mode="r",
                                          shape=(self.counts[split],))
        return self._maps[split]

    def size(self, split: str) -> int:
        """Blocks in `split`: seq_len + 1 tokens each, at stride seq_len."""
        return (self.counts[split] - 1) // self.seq_len

    def batches(self, split: str, batch_size: int, *, device="cpu", shuffle: bool = False,
                generator: torch.Generator | None = None, rank: int = 0, world_size: int = 1,
                drop_last: bool = False, augment=None):
        """(x, y) int64 batches [B, seq_len] on `device`, y = x shifted by one token.
        Shuffling and sharding as the image sets (`progprune.data.batches.sample_order`):
        ranks seeding `generator` alike take disjoint shards. `augment`: text has none."""
        idx = sample_order(self.size(split), batch_size, shuffle=shuffle, generator=generator,
                           rank=rank, world_size=world_size, drop_last=drop_last).numpy()
        ids = self.tokens(split)
        span = np.arange(self.seq_len + 1)
        device = torch.device(device)
        for start in range(0, len(idx), batch_size):
            rows = idx[start:start + batch_size, None] * self.seq_len + span
            block = torch.from_numpy(ids[rows].astype(np.int64))
            if device.type == "cuda":
                block = block.pin_memory()
            block = block.to(device, non_blocking=True)
            yield block[:, :-1].contiguous(), block[:, 1:].contiguous()

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}  # maps are reopened where the copy lands


def load_text(cfg: DatasetConfig, tokenizer, *, seed: int = 0, cache_dir: str | None = None) -> TextSplits:
    """`cfg`'s text (data_dir, seq_len, text_field) as token blocks of `tokenizer`'s ids,
    tokenized once into the cache (see the module's doc). `seed`: the splits are fixed
    files, so nothing depends on it."""
    del seed
    folder = _build(cfg, tokenizer, cache_dir)
    meta = json.loads((folder / "meta.json").read_text())
    counts = meta["tokens"]
    splits = TextSplits(cfg, tokenizer, cache_dir, folder, counts, meta["dtype"], num_classes=len(tokenizer),
                        input_shape=(cfg.seq_len,), eval_batch_size=cfg.eval_batch_size)
    for s in SPLITS:
        if splits.size(s) < 1:
            raise BadInput(f"the {s} split has {counts[s]} tokens, fewer than one block of seq_len "
                           f"{cfg.seq_len} + 1; lower dataset.seq_len or add {s} text",
                           field="dataset.seq_len")
    return splits


# ---- the registry entry (`progprune datasets`, spec checks) --------------------------------
def _check_text(cfg: DatasetConfig) -> None:
    check_layout(cfg)


@register_dataset(TEXT, check=_check_text, data_dir=True, num_classes=None,
                  doc="text for causal LMs (task causal_lm): <split>.txt, <split>.jsonl or <split>/ "
                      "for train, val, test; tokenized once, cached, read in blocks of seq_len")
def _load_text(cfg: DatasetConfig, seed: int = 0, tokenizer=None, cache_dir: str | None = None):
    if tokenizer is None:
        raise BadInput(f"dataset {TEXT} needs a tokenizer: it is for task causal_lm; set task: "
                       "causal_lm and an hf: model", field="dataset.name")
    return load_text(cfg, tokenizer, seed=seed, cache_dir=cache_dir)
