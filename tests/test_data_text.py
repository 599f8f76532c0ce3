"""The `text` data set (progprune.data.text): layouts, the token-id cache, blocks, shards, and
every bad input as one line. Real text (Python's own documentation topics), a real BPE
tokenizer trained here (vocab 512), real files."""
import json
import os
import shutil
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from progprune.config import DatasetConfig
from progprune.data import check_dataset, list_datasets, load_dataset
from progprune.errors import BadInput
from progprune.lm import text
from progprune.data.text import CACHE_ENV, PIECE, load_text
from tests.helpers import write_pydoc_corpus

SEQ = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(folder with train/val/test.txt, tokenizer, the val text)."""
    folder = write_pydoc_corpus(tmp_path_factory.mktemp("pydoc"))
    val = (folder / "val.txt").read_text(encoding="utf-8")
    half = val.index("\n", len(val) // 2) + 1
    (folder / "val.txt").write_text(val[:half], encoding="utf-8")
    (folder / "test.txt").write_text(val[half:], encoding="utf-8")
    return folder, text.train_tokenizer([folder / "train.txt"], vocab_size=512)


def _cfg(d, **kw) -> DatasetConfig:
    return DatasetConfig(name="text", data_dir=str(d), **{"seq_len": SEQ, **kw})


def _docs(corpus) -> list[str]:
    """Three documents of real text per split (paragraphs of the corpus)."""
    folder, _ = corpus
    paras = (folder / "test.txt").read_text(encoding="utf-8").split("\n\n")
    return ["\n\n".join(paras[i::3]) for i in range(3)]


def _ids(tok, s: str) -> list[int]:
    return tok.backend_tokenizer.encode(s, add_special_tokens=False).ids


def _write(d: Path, split: str, layout: str, docs: list[str], field="text"):
    if layout == "txt":
        (d / f"{split}.txt").write_text(docs[0], encoding="utf-8")
    elif layout == "jsonl":
        (d / f"{split}.jsonl").write_text("".join(json.dumps({field: t, "id": i}) + "\n\n"
                                                  for i, t in enumerate(docs)), encoding="utf-8")
    else:  # a folder: a txt, then a jsonl of the rest (sorted, recursively), others skipped
        (d / split / "b").mkdir(parents=True)
        (d / split / "a.txt").write_text(docs[0], encoding="utf-8")
        if len(docs) > 1:
            (d / split / "b" / "c.jsonl").write_text("".join(json.dumps({field: t}) + "\n" for t in docs[1:]),
                                                     encoding="utf-8")
        (d / split / ".hidden.txt").write_text("never read")
        (d / split / "README.md").write_text("never read")


def _text_dir(tmp_path, name, layout, docs) -> Path:
    d = tmp_path / name
    d.mkdir()
    for split in ("train", "val", "test"):
        _write(d, split, layout, docs)
    return d


def test_layouts_give_one_token_stream(corpus, tmp_path):
    _, tok = corpus
    docs = _docs(corpus)
    eos = tok.eos_token_id
    one = {lay: load_text(_cfg(_text_dir(tmp_path, lay, lay, docs[:1])), tok, cache_dir=tmp_path / "c")
           for lay in ("txt", "jsonl", "folder")}
    for split in ("train", "val", "test"):
        ids = [np.asarray(s.tokens(split)).tolist() for s in one.values()]
        assert ids[0] == ids[1] == ids[2] == _ids(tok, docs[0])
    # several documents: EOS between them (not after the last), in a folder's sorted order
    many = {lay: load_text(_cfg(_text_dir(tmp_path, f"{lay}3", lay, docs)), tok, cache_dir=tmp_path / "c")
            for lay in ("jsonl", "folder")}
    want = _ids(tok, docs[0]) + [eos] + _ids(tok, docs[1]) + [eos] + _ids(tok, docs[2])
    for s in many.values():
        assert np.asarray(s.tokens("train")).tolist() == want
    assert s.tokens("train").dtype == np.uint16  # a vocabulary of 512 fits


def test_long_text_is_tokenized_in_pieces_as_a_whole(corpus, tmp_path):
    """The corpus's train text is several pieces long: cut after a newline that a non-space
    follows, its ids are those of the whole text at once."""
    folder, tok = corpus
    whole = (folder / "train.txt").read_text(encoding="utf-8")
    assert len(whole) > 4 * PIECE
    s = load_text(_cfg(folder), tok, cache_dir=tmp_path)
    assert np.array_equal(s.tokens("train"), text.token_ids(folder / "train.txt", tok).numpy())


def test_blocks_shift_by_one_and_count(corpus, tmp_path):
    folder, tok = corpus
    s = load_text(_cfg(folder, eval_batch_size=7), tok, cache_dir=tmp_path)
    assert (s.name, s.num_classes, s.input_shape, s.eval_batch_size, s.mean, s.std) == (
        "text", len(tok), (SEQ,), 7, None, None)
    ids = torch.from_numpy(np.asarray(s.tokens("val"), dtype=np.int64))
    n = (len(ids) - 1) // SEQ  # blocks of SEQ + 1 tokens at stride SEQ
    assert s.size("val") == n and n > 10
    got = list(s.batches("val", 4))
    assert [len(x) for x, _ in got] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    x = torch.cat([b[0] for b in got])
    y = torch.cat([b[1] for b in got])
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (n, SEQ)
    assert torch.equal(x, ids[: n * SEQ].view(n, SEQ))
    assert torch.equal(y, ids[1: n * SEQ + 1].view(n, SEQ))  # the next token of each
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert sum(len(b[0]) for b in s.batches("val", 4, drop_last=True)) == n // 4 * 4


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_take_disjoint_shards_that_cover_the_split(corpus, tmp_path, world):
    folder, tok = corpus
    s = load_text(_cfg(folder), tok, cache_dir=tmp_path)
    n = s.size("val")
    every = Counter(tuple(r) for x, _ in s.batches("val", 64) for r in x.tolist())

    def shard(rank, drop_last, seed=5):
        g = torch.Generator().manual_seed(seed)
        return [tuple(r) for x, _ in s.batches("val", 3, shuffle=True, generator=g, rank=rank,
                                                world_size=world, drop_last=drop_last) for r in x.tolist()]

    trimmed = [shard(r, True) for r in range(world)]
    assert all(len(t) == n // world // 3 * 3 for t in trimmed)
    together = Counter(r for t in trimmed for r in t)
    assert all(together[r] <= every[r] for r in together)  # disjoint: no block twice
    padded = [shard(r, False) for r in range(world)]
    assert {r for t in padded for r in t} == set(every)  # covering (the tail wrapped around)
    assert len({len(t) for t in padded}) == 1
    assert shard(0, True) == trimmed[0] and shard(0, True, seed=6) != trimmed[0]


def _mtimes(folder: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_cache_is_reused_and_rekeyed(corpus, tmp_path, monkeypatch):
    folder, tok = corpus
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    first = load_text(_cfg(data), tok)  # the cache from $PROGPRUNE_CACHE
    root = tmp_path / "cache" / "tokens"
    assert [first.folder] == list(root.iterdir())
    before = _mtimes(first.folder)
    assert set(before) == {"train.bin", "val.bin", "test.bin", "meta.json"}

    shutil.copytree(data, tmp_path / "moved")  # content, not paths, make the key
    again = load_text(_cfg(tmp_path / "moved", seq_len=SEQ * 2), tok)  # seq_len: not in the key
    assert again.folder == first.folder and _mtimes(first.folder) == before
    assert again.size("val") == (again.counts["val"] - 1) // (SEQ * 2)

    with open(data / "val.txt", "a", encoding="utf-8") as f:
        f.write("\nOne more line of validation text.\n")
    changed = load_text(_cfg(data), tok)
    assert changed.folder != first.folder and len(list(root.iterdir())) == 2
    assert changed.counts["val"] > first.counts["val"] and changed.counts["train"] == first.counts["train"]
    assert _mtimes(first.folder) == before  # the old entry is left as it was

    other = text.train_tokenizer([folder / "val.txt"], vocab_size=300)
    assert load_text(_cfg(data), other).folder not in (first.folder, changed.folder)


def test_a_text_field_is_part_of_the_key(corpus, tmp_path):
    _, tok = corpus
    docs = _docs(corpus)
    d = tmp_path / "d"
    d.mkdir()
    for split in ("train", "val", "test"):
        _write(d, split, "jsonl", docs, field="body")
    (d / "train.jsonl").write_text("".join(json.dumps({"body": t, "text": t[:40]}) + "\n" for t in docs))
    body = load_text(_cfg(d, text_field="body"), tok, cache_dir=tmp_path / "c")
    with pytest.raises(BadInput, match="val.jsonl:1 has no 'text' field"):
        load_text(_cfg(d), tok, cache_dir=tmp_path / "c")
    assert body.counts["train"] > 3 * 40 // 4


def test_concurrent_loads_share_one_cache(corpus, tmp_path):
    folder, tok = corpus
    out, errors = [], []

    def load():
        try:
            out.append(load_text(_cfg(folder), tok, cache_dir=tmp_path))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len({s.folder for s in out}) == 1
    assert os.listdir(tmp_path / "tokens") == [out[0].folder.name]  # no staging left behind
    for s in out:
        assert np.array_equal(s.tokens("train"), out[0].tokens("train"))


def _refused(d, tok, cache, **kw) -> BadInput:
    with pytest.raises(BadInput) as e:
        load_text(_cfg(d, **kw), tok, cache_dir=cache)
    msg = str(e.value)
    assert "\n" not in msg and e.value.exit_code == 2
    return e.value


def _bad_dir(tmp_path, corpus, name, files: dict) -> Path:
    """The corpus's three splits, with `files` (relative path -> bytes; None: removed)."""
    folder, _ = corpus
    d = tmp_path / name
    d.mkdir()
    for split in ("train", "val", "test"):
        shutil.copy(folder / f"{split}.txt", d)
    for rel, content in files.items():
        p = d / rel
        if content is None:
            p.unlink()
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
    return d


BAD = [  # (files to change, words the message must hold)
    ({"test.txt": None}, ["has no test split: add", "test.txt (or test.jsonl, or a folder test/"]),
    ({"val.txt": None}, ["has no val split: add", "val.txt", "best epoch on val"]),
    ({"train/a.txt": b"text"}, ["holds train.txt and train for the train split; keep one"]),
    ({"val.txt": None, "val/notes.md": b"x"}, ["val holds no .txt or .jsonl files"]),
    ({"val.txt": b""}, ["val.txt is empty; put text in it, or remove it"]),
    ({"val.txt": b" \n\t\n"}, ["val.txt is empty"]),
    ({"test.txt": b"GIF89a\x00\x01\x02"}, ["test.txt is binary (a NUL byte at byte 6)"]),
    ({"test.txt": b"caf\xe9 au lait"}, ["test.txt is not UTF-8 text (near byte 3); convert it to UTF-8"]),
    ({"test.txt": None, "test.jsonl": b'{"text": "a"}\n{"text": oops}\n'},
     ["test.jsonl:2 is not JSON (", "write one JSON object per line"]),
    ({"test.txt": None, "test.jsonl": b'{"body": "a"}\n'},
     ["test.jsonl:1 has no 'text' field (it has body); set dataset.text_field"]),
    ({"test.txt": None, "test.jsonl": b'{"text": 3}\n'}, ["test.jsonl:1 'text' is int, not a string"]),
    ({"test.txt": None, "test.jsonl": b'{"text": "ok"}\n\xff\n'}, ["test.jsonl:2 is not UTF-8 text"]),
    ({"test.txt": None, "test/x.txt": b"fine text", "test/y/z.txt": b""}, ["z.txt is empty"]),
]


@pytest.mark.parametrize("files,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_one_line_naming_the_file(corpus, tmp_path, files, words):
    _, tok = corpus
    d = _bad_dir(tmp_path, corpus, "d", files)
    e = _refused(d, tok, tmp_path / "cache")
    assert e.field == "dataset.data_dir" and str(d) in str(e)
    for w in words:
        assert w in str(e), str(e)
    assert not (tmp_path / "cache" / "tokens").exists() or not os.listdir(tmp_path / "cache" / "tokens")


def test_a_split_shorter_than_a_block_is_refused(corpus, tmp_path):
    _, tok = corpus
    d = _bad_dir(tmp_path, corpus, "d", {"test.txt": b"Too short a test split."})
    e = _refused(d, tok, tmp_path, seq_len=64)
    assert e.field == "dataset.seq_len" and "the test split has" in str(e) and "seq_len 64" in str(e)


def test_registered_text_set_checks_cheaply_and_needs_a_tokenizer(corpus, tmp_path):
    folder, _ = corpus
    assert "text" in list_datasets()
    check_dataset(_cfg(folder))  # the files are there
    with pytest.raises(BadInput, match="has no test split"):
        check_dataset(_cfg(_bad_dir(tmp_path, corpus, "d", {"test.txt": None})))
    with pytest.raises(BadInput, match="is not a directory"):
        check_dataset(_cfg(tmp_path / "nowhere"))
    with pytest.raises(BadInput) as e:  # an image code path: no tokenizer
        load_dataset(_cfg(folder))
    assert str(e.value) == ("dataset.name: dataset text needs a tokenizer: it is for task causal_lm; "
                            "set task: causal_lm and an hf: model")


def test_a_pickled_copy_reopens_or_rebuilds_its_cache(corpus, tmp_path):
    """What a Ray Train worker gets: the token maps are not pickled (only paths), and a
    node without the cache tokenizes anew to the same ids."""
    import pickle

    folder, tok = corpus
    s = load_text(_cfg(folder), tok, cache_dir=tmp_path / "c")
    want = np.array(s.tokens("train"))
    blob = pickle.dumps(s)
    assert len(blob) < want.nbytes // 2  # the maps stayed behind
    assert np.array_equal(pickle.loads(blob).tokens("train"), want)
    shutil.rmtree(tmp_path / "c")  # another node: no cache there
    copy = pickle.loads(blob)
    assert np.array_equal(copy.tokens("train"), want) and (copy.folder / "meta.json").is_file()
    x, y = next(copy.batches("train", 2))
    assert torch.equal(x[0, 1:], y[0, :-1])
