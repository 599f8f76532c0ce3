"""The model registry drives these tests: every registered model builds, runs and prunes."""
import importlib.util
import re

import pytest
import torch
import torch_pruning as tp

from progprune.errors import ProgpruneError
from progprune.models import MODELS, build_model, classifier_layers, example_inputs, list_models


def _prune_once(model):
    ignored = classifier_layers(model)
    assert len(ignored) == 1
    x = example_inputs()
    pruner = tp.pruner.BasePruner(
        model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.3, ignored_layers=ignored,
    )
    pruner.step()
    return ignored[0]


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_runs_and_prunes(name):
    torch.manual_seed(0)
    models = {k: build_model(name, k).eval() for k in (10, 100)}
    for num_classes, model in models.items():
        with torch.no_grad():
            assert model(torch.randn(2, 3, 32, 32)).shape == (2, num_classes)
    model = models[10]  # pruning once is enough; tracing is the slow part
    macs0, params0 = tp.utils.count_ops_and_params(model, example_inputs())
    classifier = _prune_once(model)
    macs1, params1 = tp.utils.count_ops_and_params(model, example_inputs())
    assert macs1 < macs0 and params1 < params0
    assert getattr(classifier, "out_features", getattr(classifier, "out_channels", None)) == 10
    assert classifier in classifier_layers(model)  # the classifier stayed whole
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name, num_classes, macs_m, params_m", [
    ("resnet56", 10, 127.12, 0.86),   # Torch-Pruning reproduce/readme.md, ResNet-56 / CIFAR-10
    ("vgg19", 100, 512.73, 20.09),    # VGG-19 / CIFAR-100
])
def test_published_base_figures(name, num_classes, macs_m, params_m):
    macs, params = tp.utils.count_ops_and_params(build_model(name, num_classes).eval(), example_inputs())
    assert round(macs / 1e6, 2) == macs_m
    assert round(params / 1e6, 2) == params_m


def test_names_match_torch_pruning_benchmark_registry():
    expected = {f"resnet{d}" for d in (20, 32, 44, 56, 110)} | {f"vgg{d}" for d in (11, 13, 16, 19)} | {"mobilenetv2"}
    assert set(list_models()) == expected == set(MODELS.names())


def test_unknown_model_lists_valid_names():
    with pytest.raises(ProgpruneError) as e:
        build_model("resnet57", 10)
    msg = str(e.value)
    assert "unknown model 'resnet57'" in msg and "tv:NAME" in msg
    assert all(n in msg for n in list_models())


def test_bad_num_classes():
    with pytest.raises(ProgpruneError, match="num_classes"):
        build_model("resnet20", 0)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision installed")
def test_torchvision_prefix_without_torchvision():
    with pytest.raises(ProgpruneError, match=r"pip install 'progprune\[models\]'"):
        build_model("tv:resnet18", 10)
    with pytest.raises(ProgpruneError, match=r"'timm:resnet18' needs timm"):
        build_model("timm:resnet18", 10)


def test_py_factory_names(tmp_path, monkeypatch):
    """py:module:factory: imported from the working directory, called with num_classes=;
    a factory that fails to import, is missing or returns no module is one clear error.
    (torchvision and timm models: tests/test_real_models.py, in their own environment.)"""
    (tmp_path / "my_nets.py").write_text(
        "import torch\n"
        "def tiny(num_classes):\n    return torch.nn.Linear(4, num_classes)\n"
        "def nothing(num_classes):\n    return 'not a module'\n")
    (tmp_path / "broken_nets.py").write_text("import no_such_package_here\n")
    monkeypatch.chdir(tmp_path)
    assert build_model("py:my_nets:tiny", 7).out_features == 7
    for name, words in [("py:my_nets:nothing", "returned a str, not a torch.nn.Module"),
                        ("py:my_nets:absent", "my_nets has no callable 'absent'"),
                        ("py:broken_nets:f", "cannot import broken_nets (ModuleNotFoundError"),
                        ("py:my_nets", "write py:package.module:factory")]:
        with pytest.raises(ProgpruneError, match=re.escape(words)):
            build_model(name, 7)


def test_example_inputs_shape():
    assert example_inputs().shape == (1, 3, 32, 32)
    assert example_inputs((1, 64, 48)).shape == (1, 1, 64, 48)


# ---- your own model: what its forward returns, its class count, code that exits ----------
_OUTPUTS = '''
import sys
from collections import OrderedDict
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes, wrap):
        super().__init__()
        self.conv, self.fc, self.wrap = nn.Conv2d(3, 8, 3), nn.Linear(8, num_classes), wrap

    def forward(self, x):
        y = self.fc(self.conv(x).mean((2, 3)))
        return self.wrap(y)


class Output(OrderedDict):  # what transformers' ModelOutput is: a mapping with attributes
    def __getattr__(self, k):
        return self[k]


class HasLogits:
    def __init__(self, logits):
        self.logits, self.loss = logits, None


def tensor(num_classes): return Net(num_classes, lambda y: y)
def model_output(num_classes): return Net(num_classes, lambda y: Output(logits=y, hidden=y))
def plain_object(num_classes): return Net(num_classes, HasLogits)
def with_logits(num_classes): return Net(num_classes, lambda y: {"logits": y, "aux": y})
def one_tuple(num_classes): return Net(num_classes, lambda y: (y,))
def two_tuple(num_classes): return Net(num_classes, lambda y: (y, y[:, :2]))
def no_logits(num_classes): return Net(num_classes, lambda y: {"scores": y})
def five_classes(num_classes): return Net(5, lambda y: y)
def exits(num_classes): sys.exit(0)
def forward_exits(num_classes): return Net(num_classes, lambda y: sys.exit(3))
'''


@pytest.fixture
def own_models(tmp_path, monkeypatch):
    (tmp_path / "own_outputs.py").write_text(_OUTPUTS)
    (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit(0)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize("factory", ["tensor", "model_output", "plain_object", "with_logits", "one_tuple"])
def test_unambiguous_logits_are_taken(own_models, factory):
    """A forward that returns transformers' ModelOutput, an object with .logits, a dict with
    'logits' or a 1-tuple: its logits are used (`y.float()` used to raise AttributeError)."""
    from progprune.models import check_input_size, logits_of

    name = f"py:own_outputs:{factory}"
    model = build_model(name, 10).eval()
    check_input_size(model, name, (3, 32, 32), 10)
    with torch.no_grad():
        assert logits_of(model(torch.zeros(2, 3, 32, 32)), name).shape == (2, 10)


@pytest.mark.parametrize("factory, words", [
    ("two_tuple", "returned a tuple of 2 (Tensor [1, 10], Tensor [1, 2])"),
    ("no_logits", "returned a dict with keys 'scores'"),
])
def test_ambiguous_outputs_are_one_line_up_front(own_models, factory, words):
    from progprune.models import check_input_size

    name = f"py:own_outputs:{factory}"
    with pytest.raises(ProgpruneError) as e:
        check_input_size(build_model(name, 10), name, (3, 32, 32), 10)
    assert str(e.value).startswith(f"model {name!r}: its forward {words}, which holds no unambiguous logits")


def test_a_model_of_another_class_count_is_refused_up_front(own_models):
    """A factory that ignores num_classes: refused before any work (it used to run to a
    row with top-1 0.00% whose artifact `load_pruned` then refused)."""
    from progprune.models import check_input_size

    model = build_model("py:own_outputs:five_classes", 10)
    with pytest.raises(ProgpruneError) as e:
        check_input_size(model, "py:own_outputs:five_classes", (3, 32, 32), 10)
    assert str(e.value).startswith("model 'py:own_outputs:five_classes' outputs 5 values per image, "
                                   "the data has 10 classes; build it with num_classes=10")


@pytest.mark.parametrize("name, words", [
    ("py:own_outputs:exits", "model 'py:own_outputs:exits': exits(num_classes=10) failed (SystemExit(0)"),
    ("py:exits_at_import:build", "model 'py:exits_at_import:build': cannot import exits_at_import (SystemExit(0)"),
])
def test_a_factory_that_exits_is_bad_input(own_models, name, words):
    """sys.exit in the factory or at import ended the process with status 0 and no output."""
    with pytest.raises(ProgpruneError) as e:
        build_model(name, 10)
    assert str(e.value).startswith(words)


def test_a_forward_that_exits_is_bad_input(own_models):
    from progprune.models import check_input_size

    name = "py:own_outputs:forward_exits"
    with pytest.raises(ProgpruneError) as e:
        check_input_size(build_model(name, 10), name, (3, 32, 32), 10)
    assert str(e.value).startswith(f"model {name!r}: its forward pass raised SystemExit(3)")
