import shutil

import pytest
import torch

from fixtures_data import write_cifar10, write_cifar100, write_imagefolder, write_malicious_pickle
from progprune.config import DatasetConfig
from progprune.data import Splits, batches, check_dataset, list_datasets, load_dataset
from progprune.errors import ProgpruneError


def _ids(x: torch.Tensor) -> set:
    return {bytes(t.numpy()) for t in x}


def _check_splits(s: Splits, num_classes: int):
    assert s.num_classes == num_classes
    for x, y in ((s.train_x, s.train_y), (s.val_x, s.val_y), (s.test_x, s.test_y)):
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert tuple(x.shape[1:]) == s.input_shape and len(x) == len(y) > 0
        assert 0 <= y.min() and y.max() < num_classes
    assert len(s.mean) == len(s.std) == s.input_shape[0]


def test_registry_names():
    assert list_datasets() == ["cifar10", "cifar100", "digits", "imagefolder", "synthetic", "text"]
    with pytest.raises(ProgpruneError, match="unknown dataset 'mnist'; valid: cifar10, cifar100"):
        check_dataset(DatasetConfig(name="mnist"))
    with pytest.raises(ProgpruneError, match="^dataset.name: unknown dataset 'CIFAR10'; did you mean 'cifar10'"):
        check_dataset(DatasetConfig(name="CIFAR10"))


def test_one_registry_shape_and_no_circle():
    """Issue 22: datasets register on the one Registry (a duplicate is refused, not
    overwritten); any module of the package imports alone (data no longer imports folder at
    its bottom, nor folder data's privates); `progprune datasets` lists the registry."""
    import subprocess
    import sys

    from click.testing import CliRunner

    from progprune.cli import main
    from progprune.data import DATASETS, register_dataset

    with pytest.raises(ValueError, match="dataset 'digits' registered twice"):
        register_dataset("digits")(lambda cfg, seed: None)
    assert DATASETS.get("digits").num_classes == 10  # still the original
    for module in ("progprune.data.folder", "progprune.data.memory", "progprune.data._registry",
                   "progprune.data.text"):
        code = f"import {module}, progprune.data as d; print(d.list_datasets())"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == str(list_datasets()), module
    lines = CliRunner().invoke(main, ["datasets"]).output.splitlines()
    assert [ln.split()[0] for ln in lines] == list_datasets()
    assert [ln.endswith("[data_dir]") for ln in lines] == [True, True, False, True, False, True]


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DatasetConfig(name="digits"))


def test_digits_split_sizes_stratified_and_fixed(digits):
    _check_splits(digits, 10)
    assert digits.input_shape == (3, 32, 32)
    assert (len(digits.train_y), len(digits.val_y), len(digits.test_y)) == (1257, 270, 270)
    total = torch.bincount(torch.cat([digits.train_y, digits.val_y, digits.test_y]))
    for y in (digits.val_y, digits.test_y, digits.train_y):
        expected = total * len(y) / total.sum()
        assert (torch.bincount(y, minlength=10) - expected).abs().max() <= 1
    assert torch.equal(digits.train_x[:, 0], digits.train_x[:, 2])  # grey replicated to RGB
    assert digits.train_x.max() > 200  # 0..16 scaled to 0..255
    other_seed = load_dataset(DatasetConfig(name="digits"), seed=123)  # split ignores the run seed
    assert torch.equal(other_seed.val_x, digits.val_x) and torch.equal(other_seed.test_y, digits.test_y)


def test_digits_num_classes_mismatch():
    with pytest.raises(ProgpruneError, match="dataset.num_classes: digits has 10 classes, got 7"):
        check_dataset(DatasetConfig(name="digits", num_classes=7))
    check_dataset(DatasetConfig(name="digits", num_classes=10))


def test_cifar10_pickle_layout(tmp_path):
    d = write_cifar10(tmp_path / "c10", per_batch=10, n_test=20)
    s = load_dataset(DatasetConfig(name="cifar10", data_dir=str(d)))
    _check_splits(s, 10)
    assert (len(s.train_y), len(s.val_y), len(s.test_y)) == (45, 5, 20)
    assert len(set(s.val_y.tolist())) == 5  # stratified: 5 different classes among 5 held out
    assert not _ids(s.train_x) & _ids(s.val_x)
    assert s.mean == (0.4914, 0.4822, 0.4465)


def test_cifar100_pickle_layout(tmp_path):
    d = write_cifar100(tmp_path / "c100", n_train=60, n_test=20)
    s = load_dataset(DatasetConfig(name="cifar100", data_dir=str(d), num_classes=100))
    _check_splits(s, 100)
    assert (len(s.train_y), len(s.val_y), len(s.test_y)) == (54, 6, 20)
    assert not _ids(s.train_x) & _ids(s.val_x)
    with pytest.raises(ProgpruneError, match="cifar100 has 100 classes, got 10"):
        check_dataset(DatasetConfig(name="cifar100", data_dir=str(d), num_classes=10))


def test_cifar_missing_files_named(tmp_path):
    d = write_cifar10(tmp_path / "c10")
    (d / "data_batch_3").unlink()
    (d / "test_batch").unlink()
    with pytest.raises(ProgpruneError) as e:
        check_dataset(DatasetConfig(name="cifar10", data_dir=str(d)))
    assert str(d) in str(e.value) and "data_batch_3, test_batch" in str(e.value)
    with pytest.raises(ProgpruneError, match="set its data directory"):
        load_dataset(DatasetConfig(name="cifar100"))
    with pytest.raises(ProgpruneError, match="is not a directory"):
        check_dataset(DatasetConfig(name="cifar100", data_dir=str(tmp_path / "nope")))


def test_malicious_pickle_refused(tmp_path):
    d = write_cifar10(tmp_path / "c10")
    marker = tmp_path / "pwned"
    write_malicious_pickle(d / "data_batch_2", marker)
    with pytest.raises(ProgpruneError, match=r"data_batch_2: not a CIFAR python-pickle .*system is not allowed"):
        load_dataset(DatasetConfig(name="cifar10", data_dir=str(d)))
    assert not marker.exists()


def test_synthetic_seeded():
    cfg = DatasetConfig(name="synthetic", num_classes=4, image_size=12, synthetic_samples=40)
    a, b, c = load_dataset(cfg, seed=1), load_dataset(cfg, seed=1), load_dataset(cfg, seed=2)
    _check_splits(a, 4)
    assert a.input_shape == (3, 12, 12) and (len(a.train_y), len(a.val_y)) == (40, 10)
    assert torch.equal(a.train_x, b.train_x) and not torch.equal(a.train_x, c.train_x)
    with pytest.raises(ProgpruneError, match="dataset.synthetic_samples"):
        check_dataset(cfg.model_copy(update={"synthetic_samples": 0}))  # past the schema


def test_batches_normalize_and_augment(digits):
    x, y = digits.train_x[:64], digits.train_y[:64]
    (plain, py), = batches(x, y, 64, mean=digits.mean, std=digits.std)
    assert plain.dtype == torch.float32 and plain.shape == (64, 3, 32, 32) and torch.equal(py, y)
    assert abs(plain.mean().item()) < 0.5
    g = torch.Generator().manual_seed(0)
    (aug, ay), = batches(x, y, 64, mean=digits.mean, std=digits.std, augment=True, generator=g)
    assert aug.shape == plain.shape and torch.equal(ay, y)
    assert not torch.equal(aug, plain)
    # every augmented image is a (possibly flipped) shifted copy: same value range
    assert aug.min() >= plain.min() - 1e-5 and aug.max() <= plain.max() + 1e-5
    g = torch.Generator().manual_seed(0)
    (again, _), = batches(x, y, 64, mean=digits.mean, std=digits.std, augment=True, generator=g)
    assert torch.equal(aug, again)


def test_batches_crop_is_a_shift_and_flip():
    x = torch.arange(16 * 16, dtype=torch.float32).reshape(1, 1, 16, 16).div(256 / 255).to(torch.uint8)
    x = x.expand(200, 3, 16, 16).contiguous()
    y = torch.zeros(200, dtype=torch.int64)
    (out, _), = batches(x, y, 200, mean=(0, 0, 0), std=(1 / 255,) * 3, augment=True,
                        generator=torch.Generator().manual_seed(1))
    centre = out[:, 0, 4:12, 4:12]  # away from the reflected border
    src = x[0, 0].float()
    flipped = 0
    for img in centre:
        found = [(dy, dx, f) for f in (False, True) for dy in range(-4, 5) for dx in range(-4, 5)
                 if torch.equal(img, (src.flip(1) if f else src)[4 + dy:12 + dy, 4 + dx:12 + dx])]
        assert found
        flipped += found[0][2]
    assert 50 < flipped < 150


@pytest.mark.parametrize("n, world_size, drop_last", [(100, 4, False), (103, 4, False), (103, 4, True)])
def test_batches_shard_across_ranks(n, world_size, drop_last):
    x = torch.arange(n, dtype=torch.int64).view(n, 1, 1, 1).to(torch.uint8)
    y = torch.arange(n)
    shards = []
    for rank in range(world_size):
        g = torch.Generator().manual_seed(7)  # every rank seeds alike
        ys = [yb for _, yb in batches(x, y, 5, mean=(0,), std=(1,), shuffle=True, generator=g,
                                      rank=rank, world_size=world_size, drop_last=drop_last)]
        shards.append(torch.cat(ys).tolist())
    sizes = {len(s) for s in shards}
    assert len(sizes) == 1
    seen = [i for s in shards for i in s]
    if n % world_size == 0:
        assert sorted(seen) == list(range(n))  # disjoint and covering
    elif drop_last:
        assert len(set(seen)) == len(seen) == (n // world_size) * world_size  # disjoint, tail trimmed
    else:
        assert set(seen) == set(range(n))  # covering; the tail wraps to pad the last shard
        assert len(seen) - n == world_size - n % world_size


def test_batches_augment_tiny_images():
    x = torch.randint(0, 256, (6, 3, 3, 3), dtype=torch.uint8)
    (out, _), = batches(x, torch.zeros(6, dtype=torch.int64), 6, mean=(0.5,) * 3, std=(0.5,) * 3, augment=True)
    assert out.shape == (6, 3, 3, 3)


def test_batches_drop_last():
    x = torch.zeros(10, 1, 2, 2, dtype=torch.uint8)
    y = torch.arange(10)
    assert [len(b) for _, b in batches(x, y, 4, mean=(0,), std=(1,))] == [4, 4, 2]
    assert [len(b) for _, b in batches(x, y, 4, mean=(0,), std=(1,), drop_last=True)] == [4, 4]


def test_degenerate_image_folders_are_refused(tmp_path):
    """Issue 14 #13: one class, or a val/test split lacking classes, would report a top-1
    that means nothing."""
    from PIL import Image

    from progprune.config import DatasetConfig
    from progprune.data import check_dataset
    from progprune.errors import ProgpruneError

    def folder(root, layout):
        for split, classes in layout.items():
            for c in classes:
                (root / split / c).mkdir(parents=True)
                Image.new("RGB", (8, 8)).save(root / split / c / "a.png")
        return root

    one = folder(tmp_path / "one", {"train": ["a"], "val": ["a"]})
    with pytest.raises(ProgpruneError, match="1 class folder; classification needs at least 2"):
        check_dataset(DatasetConfig(name="imagefolder", data_dir=str(one)))
    lacking = folder(tmp_path / "lack", {"train": ["a", "b", "c"], "val": ["a", "b", "c"], "test": ["a"]})
    with pytest.raises(ProgpruneError, match=r"test lacks classes of train/: b, c") as e:
        check_dataset(DatasetConfig(name="imagefolder", data_dir=str(lacking)))
    assert e.value.field == "dataset.data_dir"


def test_cifar_bad_labels_say_what_is_wrong(tmp_path):
    """Issue 23 #30: bad labels read "10 images but 10 labels, or labels outside 0..9"."""
    import pickle

    d = write_cifar10(tmp_path / "c10", per_batch=10)
    path = d / "data_batch_1"
    batch = pickle.loads(path.read_bytes())
    path.write_bytes(pickle.dumps({**batch, b"labels": batch[b"labels"][:9]}, protocol=2))
    with pytest.raises(ProgpruneError) as e:
        load_dataset(DatasetConfig(name="cifar10", data_dir=str(d)))
    assert str(e.value).startswith(f"{path}: 10 images but 9 labels; each image needs one label"), e.value
    path.write_bytes(pickle.dumps({**batch, b"labels": [12, *batch[b"labels"][1:9], -1]}, protocol=2))
    with pytest.raises(ProgpruneError) as e:
        load_dataset(DatasetConfig(name="cifar10", data_dir=str(d)))
    assert str(e.value).startswith(f"{path}: 2 of 10 labels are outside 0..9 (first: 12)"), e.value
    assert "images but" not in str(e.value)


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_data_dir_is_refused_where_nothing_reads_it(tmp_path, name):
    """Issue 23 #18: a data_dir the data set does not read was recorded and never used."""
    from progprune.spec import load_spec_dict

    with pytest.raises(ProgpruneError, match=f"^dataset.data_dir: {name} reads no files, so {tmp_path} "
                                             "would be ignored; .* \\(cifar10, cifar100, imagefolder, text\\)$"):
        check_dataset(DatasetConfig(name=name, data_dir=str(tmp_path)))
    spec = {"name": "s", "models": ["resnet20"], "speedups": [2], "dataset": {"name": name, "data_dir": str(tmp_path)}}
    for check_paths in (True, False):  # not a file check: the cluster's files would not change it
        with pytest.raises(ProgpruneError, match=f"dataset.data_dir: {name} reads no files"):
            load_spec_dict(spec, check_paths=check_paths)


def test_memory_is_checked_before_loading():
    """Issue 23 #8: synthetic at 2048 px tried one 51.5 GB allocation and died with a
    traceback. Now the bytes are estimated up front and refused with the figure, the image
    size that fits, and the streamed alternative; that size then passes."""
    import re

    from progprune.data._registry import machine_memory

    cfg = DatasetConfig(name="synthetic", image_size=4096, num_classes=100_000)  # TBs: refused anywhere
    with pytest.raises(ProgpruneError) as e:
        check_dataset(cfg)
    assert e.value.field == "dataset.image_size"
    need, have, fits = re.fullmatch(
        r"synthetic at 4096 px is held in memory: about ([\d.]+) GB while it loads, more than half of this "
        r"machine's ([\d.]+) GB; use an image size <= (\d+), fewer dataset.synthetic_samples, or an image "
        r"folder \(imagefolder streams its images from disk\)", e.value.message).groups()
    assert float(have) == pytest.approx(machine_memory() / 1e9, abs=0.05) and float(need) > float(have)
    check_dataset(cfg.model_copy(update={"image_size": int(fits)}))
    with pytest.raises(ProgpruneError, match="dataset.image_size"):
        check_dataset(cfg.model_copy(update={"image_size": int(fits) + 1}))


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_memory_estimate_bounds_what_loading_takes(name):
    """The estimate the refusal rests on is an upper bound of the loader's real peak, and
    not far above the images it holds: measured in a process of its own (peak RSS)."""
    import subprocess
    import sys

    code = f"""
import torch
from progprune.config import DatasetConfig
from progprune.data import DATASETS, load_dataset
from sklearn.datasets import load_digits
def status(key):  # kB
    return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith(key + ":"))
load_digits(); torch.ones(1).add_(1)
cfg = DatasetConfig(name={name!r}, image_size=256, synthetic_samples=512)
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
before = status("VmRSS")
s = load_dataset(cfg)
held = sum(getattr(s, f"{{k}}_x").numel() for k in ("train", "val", "test"))
print((status("VmHWM") - before) * 1024, held, DATASETS.get({name!r}).memory(cfg))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grew, held, estimate = map(int, out.stdout.split())
    assert held <= grew <= estimate < 2 * held + 2**27, (grew, held, estimate)
