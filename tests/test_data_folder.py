"""imagefolder streams: DataLoader workers decode each batch; recipes, sharding, seeds,
and the folders users really have (corrupt files, odd modes, empty or mismatched splits)."""
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fixtures_data import write_imagefolder
from helpers import progprune_in_process
from progprune.config import DatasetConfig
from progprune.data import check_dataset, load_dataset
from progprune.errors import ProgpruneError
from progprune.data.folder import IMAGENET_MEAN, IMAGENET_STD, FolderSplits, centre_crop_box, decode, random_resized_crop
from progprune.training import calibration_batch, evaluate, recalibrate_bn

PROGPRUNE = Path(sys.executable).with_name("progprune")


def _cfg(d, **kw) -> DatasetConfig:
    return DatasetConfig(name="imagefolder", data_dir=str(d), **{"image_size": 16, **kw})


def _epoch(s, split="train", **kw):
    xs, ys = zip(*s.batches(split, kw.pop("batch_size", 4), **kw))
    return torch.cat(xs), torch.cat(ys)


def test_layout_labels_and_defaults(tmp_path):
    d = write_imagefolder(tmp_path / "f", n_train=4, n_val=2, size=(40, 30))
    # no test/: never report validation images as test accuracy unless asked to
    with pytest.raises(ProgpruneError, match="test is missing; add a test/ split, or set the test split to val"):
        check_dataset(_cfg(d))
    s = load_dataset(_cfg(d, test_split="val", loader_workers=0))
    assert isinstance(s.loaded, FolderSplits) and s.num_classes == 3 and s.input_shape == (3, 16, 16)
    assert (s.size("train"), s.size("val"), s.size("test")) == (12, 6, 6)  # test: val, as asked
    assert (s.mean, s.std) == (IMAGENET_MEAN, IMAGENET_STD)  # folders default to ImageNet's
    x, y = _epoch(s)
    assert x.shape == (12, 3, 16, 16) and x.dtype == torch.float32
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # classes sorted: cat, dog, frog; notes.txt skipped
    # an accelerator gets uint8 crops and normalises them itself (meta: the code path, no values)
    xm, ym = next(iter(s.batches("train", 4, device="meta")))
    assert xm.device.type == ym.device.type == "meta" and xm.shape == (4, 3, 16, 16) and xm.dtype == torch.float32
    # the image size defaults to 224 for folders, and the spec's normalisation wins
    assert load_dataset(DatasetConfig(name="imagefolder", data_dir=str(d), test_split="val")).input_shape == (3, 224, 224)
    s = load_dataset(_cfg(d, test_split="val", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    raw = decode(os.path.join(d, "train", "cat", "0.jpg"), 16, False, 0)
    want = (torch.from_numpy(raw).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    assert torch.allclose(_epoch(s)[0][0], want, atol=1e-5)


def test_evaluation_crop_is_resize_then_centre_crop(tmp_path):
    """Evaluation: shorter side to int(size / 0.875), centre crop: compared with doing
    exactly that in PIL, on a smooth image of each orientation."""
    yy, xx = np.mgrid[0:90, 0:130]
    arr = np.stack([xx * 1.9, yy * 2.8, (xx + yy)], axis=-1).clip(0, 255).astype(np.uint8)
    for a in (arr, arr.transpose(1, 0, 2).copy()):
        Image.fromarray(a).save(tmp_path / "x.png")
        im = Image.open(tmp_path / "x.png")
        w, h = im.size
        short = int(32 / 0.875)  # 36
        nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        top, left = round((nh - 32) / 2), round((nw - 32) / 2)
        ref = np.asarray(im.resize((nw, nh), Image.BILINEAR).crop((left, top, left + 32, top + 32)))
        ours = decode(str(tmp_path / "x.png"), 32, False, 0)
        assert ours.shape == (32, 32, 3) and np.abs(ours.astype(int) - ref).max() <= 2
        assert centre_crop_box(w, h, 32)[2] == pytest.approx(32 * w / nw)


def test_training_crop_follows_the_recipe():
    """Random-resized crops cover 8-100% of the area at aspect 3/4-4/3; seeded."""
    rng = random.Random(0)
    boxes = [random_resized_crop(400, 300, rng) for _ in range(2000)]
    areas = np.array([cw * ch / (400 * 300) for _, _, cw, ch in boxes])
    aspects = np.array([cw / ch for _, _, cw, ch in boxes])
    assert areas.min() >= 0.075 and areas.max() <= 1.0 and areas.std() > 0.2
    assert aspects.min() >= 0.74 and aspects.max() <= 1.34
    assert all(0 <= left and 0 <= top and left + cw <= 400 and top + ch <= 300 for left, top, cw, ch in boxes)
    assert random_resized_crop(400, 300, random.Random(5)) == random_resized_crop(400, 300, random.Random(5))
    assert random_resized_crop(1000, 10, random.Random(0)) == (493, 0, 13, 10)  # fallback: centre, ratio clamped


def test_seeded_and_independent_of_workers_shards_disjoint(tmp_path):
    d = write_imagefolder(tmp_path / "f", n_train=7, n_val=2, size=(48, 40))
    one, two = (load_dataset(_cfg(d, test_split="val", loader_workers=w)) for w in (0, 2))

    def epoch(s, seed, **kw):
        return _epoch(s, shuffle=True, augment=True, generator=torch.Generator().manual_seed(seed), **kw)

    a, b = epoch(one, 3), epoch(two, 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # same seed, 0 or 2 workers: same batches
    c = epoch(one, 4)
    assert not torch.equal(a[0], c[0])  # another epoch seed: another order and other crops
    assert sorted(a[1].tolist()) == sorted(c[1].tolist())
    # two ranks: disjoint, equal shards that together cover the epoch (21 images, padded to 22)
    shards = [epoch(one, 3, rank=r, world_size=2, batch_size=3) for r in (0, 1)]
    assert [len(y) for _, y in shards] == [11, 11]
    flat = {tuple(v) for x, _ in shards for v in x.flatten(1).round(decimals=3).tolist()}
    assert len(flat) == 21
    dropped = [epoch(one, 3, rank=r, world_size=2, batch_size=3, drop_last=True) for r in (0, 1)]
    assert [len(y) for _, y in dropped] == [9, 9]


def test_calibration_and_bn_batches_come_from_the_loader(tmp_path):
    d = write_imagefolder(tmp_path / "f", n_train=6, n_val=2, size=(40, 40))
    s = load_dataset(_cfg(d, test_split="val", loader_workers=1, eval_batch_size=5))
    x, y = calibration_batch(s, "cpu", n=64, seed=1)
    assert x.shape == (18, 3, 16, 16) and len(y) == 18  # capped at the split's size
    assert torch.equal(calibration_batch(s, "cpu", n=5, seed=1)[0], calibration_batch(s, "cpu", n=5, seed=1)[0])
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    assert recalibrate_bn(model, s, "cpu", batches=2, batch_size=4) == 8
    top1, top5 = evaluate(model, s, "test", "cpu")
    assert 0 <= top1 <= top5 == 1.0  # 3 classes: the top 5 hold them all


def test_modes_and_sizes_are_converted(tmp_path):
    root = tmp_path / "f"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
    rgb = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("L").save(root / "train" / "a" / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(root / "train" / "a" / "rgba.png")
    Image.fromarray(rgb).convert("P").save(root / "train" / "a" / "palette.gif.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "train" / "b" / "cmyk.jpg")
    Image.fromarray(rgb[:7, :300 // 7]).save(root / "train" / "b" / "tiny.bmp")
    Image.fromarray(np.tile(rgb, (20, 20, 1))).save(root / "train" / "b" / "big.jpg")  # 600 x 1000: draft
    (root / "train" / "b" / "deeper").mkdir()
    Image.fromarray(rgb).save(root / "train" / "b" / "deeper" / "nested.webp")
    for cls in ("a", "b"):
        Image.fromarray(rgb).save(root / "val" / cls / "v.png")
    s = load_dataset(_cfg(root, test_split="val", loader_workers=0))
    assert s.size("train") == 7
    for augment in (False, True):
        x, y = _epoch(s, augment=augment, generator=torch.Generator().manual_seed(0), batch_size=7)
        assert x.shape == (7, 3, 16, 16) and torch.isfinite(x).all() and y.tolist() == [0] * 3 + [1] * 4
    assert not s.skipped


def _corrupt(root: Path) -> list[Path]:
    bad = [root / "train" / "cat" / "garbage.jpg", root / "train" / "dog" / "truncated.png"]
    bad[0].write_bytes(b"not a jpeg at all" * 10)
    good = (root / "train" / "dog" / "1.png").read_bytes()
    bad[1].write_bytes(good[: len(good) // 2])
    return bad


def test_corrupt_images_are_skipped_and_counted(tmp_path, capfd):
    d = write_imagefolder(tmp_path / "f", n_train=4, n_val=2, size=(24, 24))
    _corrupt(d)
    s = load_dataset(_cfg(d, test_split="val", loader_workers=0))
    assert s.size("train") == 14
    for _ in range(2):  # reported once, not every epoch
        x, y = _epoch(s, shuffle=True, augment=True, generator=torch.Generator().manual_seed(0))
        assert len(y) == 12
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"imagefolder: skipped 2 unreadable image(s) of 14 in {d / 'train'} "
                             "(first: cat/garbage.jpg: UnidentifiedImageError")
    assert s.skipped == {"train": {"cat/garbage.jpg", "dog/truncated.png"}}


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_a_split_with_no_readable_image_is_refused_before_any_work(tmp_path, split):
    """Issue 23 #29: such a split was caught only when a pass over it found nothing (after
    pruning, or a base epoch). Now the data set's check decodes until one image reads, in
    each split: before any work, in prune and sweep alike."""
    d = write_imagefolder(tmp_path / "f", n_train=2, n_val=1, n_test=1, size=(24, 24))
    for p in (d / split).rglob("*.*"):
        if p.suffix in (".png", ".jpg"):
            p.write_bytes(b"\x89PNG broken")
    n = 3 * (2 if split == "train" else 1)
    expected = f"{d / split}: none of its {n} images could be read (first: cat/0."
    with pytest.raises(ProgpruneError) as e:
        check_dataset(_cfg(d))
    assert e.value.field == "dataset.data_dir" and e.value.message.startswith(expected), e.value
    assert "\n" not in str(e.value)
    line = progprune_in_process("prune", "--model", "resnet20", "--speedup", "2", "--dataset", "imagefolder",
                                "--data-dir", d, "--image-size", "32", "--out", tmp_path / "out").stderr
    assert line.startswith(f"error: --data-dir: {expected}") and line.count("\n") == 1, line
    assert not (tmp_path / "out").exists()


def test_a_split_unreadable_after_the_check_is_still_one_error(tmp_path):
    d = write_imagefolder(tmp_path / "f", n_train=2, n_val=1, size=(24, 24))
    s = load_dataset(_cfg(d, test_split="val", loader_workers=0))
    for p in (d / "val").rglob("*.png"):  # the files change after the up-front check
        p.write_bytes(b"\x89PNG broken")
    with pytest.raises(ProgpruneError) as e:
        evaluate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(3)), s, "val", "cpu")
    assert str(e.value).startswith(f"dataset.data_dir: {d / 'val'}: none of its 3 images could be read "
                                   "(first: cat/0.png: UnidentifiedImageError")
    assert "\n" not in str(e.value)


@pytest.mark.timeout(120)  # the listing these links made never ended
def test_links_are_followed_without_cycles_or_other_labels(tmp_path, capfd):
    """Issue 23 #5: `train/cat/loop -> ..` listed the other classes' images under cat, over
    and over (a few such links: a listing that never ends). Links stay followed where they
    lead outside the data folder; a link to a folder holding the class, into another class
    or split, or to a folder listed already is skipped and counted on one line."""
    d = write_imagefolder(tmp_path / "f", n_train=2, n_val=1)
    extra = write_imagefolder(tmp_path / "elsewhere", classes=("x",), n_train=3, n_val=0) / "train" / "x"
    cat, dog, frog = (d / "train" / c for c in ("cat", "dog", "frog"))
    (cat / "loop").symlink_to("..")  # the split: a cycle through every class
    (cat / "up").symlink_to("../..")  # the data folder
    (cat / "v.png").symlink_to("../../val/dog/0.png")  # a validation image of another class
    (cat / "extra").symlink_to(extra)  # other storage: followed
    (dog / "self").symlink_to(".")
    (frog / "again").symlink_to(frog / "more")  # the same folder twice
    (frog / "more").mkdir()
    (frog / "more" / "m.png").write_bytes((frog / "1.png").read_bytes())
    s = load_dataset(_cfg(d, test_split="val", loader_workers=0))
    listed = sorted(zip((p.decode() for p in s.files["train"][1]), s.files["train"][2].tolist()))
    assert listed == [("cat/0.jpg", 0), ("cat/1.png", 0), ("cat/extra/0.jpg", 0), ("cat/extra/1.png", 0),
                      ("cat/extra/2.png", 0), ("dog/0.jpg", 1), ("dog/1.png", 1), ("frog/0.jpg", 2),
                      ("frog/1.png", 2), ("frog/again/m.png", 2)]
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [f"imagefolder: skipped 5 link(s) or folder(s) in {d / 'train'} that would list images twice "
                   "or under another label (first: cat/v.png: link into another class or split); links may "
                   "point within their class folder or outside the data folder"], err


def test_layout_problems_are_one_line_each(tmp_path):
    d = write_imagefolder(tmp_path / "f", n_train=2, n_val=1, n_test=1)
    with pytest.raises(ProgpruneError, match="imagefolder has 3 classes, got 5"):
        check_dataset(_cfg(d, num_classes=5))
    for p in (d / "val" / "dog").iterdir():
        p.unlink()
    with pytest.raises(ProgpruneError, match=f"^dataset.data_dir: {d / 'val' / 'dog'} holds no images .*; add images or remove"):
        check_dataset(_cfg(d))
    for p in (d / "val").rglob("*.png"):
        p.unlink()
    with pytest.raises(ProgpruneError, match=f"^dataset.data_dir: {d / 'val'} holds no images "):
        check_dataset(_cfg(d))
    shutil.rmtree(d / "val")
    write_imagefolder(d, classes=("cat", "dog", "frog", "gnu"), n_train=0, n_val=1)
    with pytest.raises(ProgpruneError, match=f"{d / 'val'} has classes not in train/: gnu"):
        check_dataset(_cfg(d))
    shutil.rmtree(d / "val")
    with pytest.raises(ProgpruneError, match=f"{d / 'val'} is missing"):
        check_dataset(_cfg(d))


def test_prune_on_a_folder_through_the_cli(tmp_path):
    """`progprune prune` on a folder of JPEGs with a corrupt file: the row is written, the
    skipped file is named once, and bad folders exit 2 with one line and nothing written."""
    d = write_imagefolder(tmp_path / "f", n_train=6, n_val=3, n_test=3, size=(40, 36))
    _corrupt(d)
    cmd = [str(PROGPRUNE)] if PROGPRUNE.exists() else [sys.executable, "-m", "progprune"]
    base = [*cmd, "prune", "--model", "resnet20", "--dataset", "imagefolder", "--data-dir", str(d),
            "--speedup", "1.5", "--iterative-steps", "20", "--base-epochs", "1", "--finetune-epochs", "1"]

    def bad(*args) -> str:  # fails before any work: the same click group, in this process
        proc = progprune_in_process(*base[len(cmd):], *args, "--out", str(tmp_path / "bad"))
        assert proc.returncode == 2 and not (tmp_path / "bad").exists(), proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        return line

    # the registry's CIFAR ResNet pools a fixed 8x8 window: 24 px fails before any training
    assert bad("--image-size", "24").startswith("error: --image-size: model 'resnet20' cannot take 3x24x24 inputs")
    proc = subprocess.run([*base, "--image-size", "32", "--out", str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "imagefolder: skipped 2 unreadable image(s) of 20 in" in proc.stdout + proc.stderr
    row = pd.read_parquet(tmp_path / "run" / "result.parquet").iloc[0]
    assert row.status == "ok" and row.dataset == "imagefolder" and row.achieved_speedup >= 1.5
    assert row.final_top1 is not None and row.num_classes == 3
    shutil.rmtree(d / "test" / "frog")
    assert bad("--image-size", "32") == f"error: --data-dir: {d / 'test'} lacks classes of train/: frog"
