"""The width-based MACs counter agrees with torch-pruning's own count, before and after pruning."""
import pytest
import torch
import torch_pruning as tp

from progprune.macs import MacsCounter, count_exact
from progprune.models import build_model, classifier_layers, example_inputs, list_models


def _tp_macs(model, ex):
    return int(tp.utils.count_ops_and_params(model, ex)[0])


def _pruner(model, ex, global_pruning, ratio=0.3):
    return tp.pruner.BasePruner(
        model, ex, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio, global_pruning=global_pruning,
        ignored_layers=classifier_layers(model, 10))


@pytest.mark.parametrize("name", list_models())
def test_counter_matches_torch_pruning_before_and_after_pruning(name):
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    ex = example_inputs()
    base = _tp_macs(model, ex)
    counter = MacsCounter(model, ex, expected=base)
    assert counter.ok, f"{name}: fast counter declined an in-registry model"
    assert counter.macs() == base
    assert count_exact(model, ex) == tuple(int(v) for v in tp.utils.count_ops_and_params(model, ex))

    for global_pruning in (True, False):
        m = build_model(name, 10).eval()
        c = MacsCounter(m, ex, expected=base)
        _pruner(m, ex, global_pruning).step()
        now = _tp_macs(m, ex)
        assert now < base
        assert c.macs() == now, f"{name} global={global_pruning}: counter {c.macs()} vs tp {now}"


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_macs_if_pruned_predicts_the_real_count(name):
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    ex = example_inputs()
    counter = MacsCounter(model, ex, expected=_tp_macs(model, ex))
    pruner = _pruner(model, ex, global_pruning=False, ratio=0.25)
    is_out = pruner.DG.is_out_channel_pruning_fn
    groups = [g for g in pruner.step(interactive=True) if len(g[0].idxs)]
    assert len(groups) >= 4
    # several groups of different kinds: first, last, and ones from the middle
    picked = {0, 1, len(groups) // 2, len(groups) - 1}
    checked = 0
    for i, group in enumerate(groups):
        if i in picked:
            predicted = counter.macs_if_pruned(group, is_out)
            group.prune()
            assert predicted == _tp_macs(model, ex) == counter.macs(), f"{name} group {i}"
            checked += 1
        else:
            group.prune()
    assert checked == len(picked)


def test_macs_if_pruned_partial_count_matches_a_real_partial_prune():
    """`n` = only the first n root channels: what the crossing step relies on."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    ex = example_inputs()
    counter = MacsCounter(model, ex)
    pruner = _pruner(model, ex, global_pruning=False)
    is_out = pruner.DG.is_out_channel_pruning_fn
    group = next(g for g in pruner.step(interactive=True) if len(g[0].idxs) >= 3)
    dep = group[0].dep
    idxs = list(group[0].idxs)[:2]
    predicted = counter.macs_if_pruned(group, is_out, 2)
    pruner.DG.get_pruning_group(dep.target.module, dep.handler, idxs).prune()
    assert predicted == _tp_macs(model, ex)


def test_counter_declines_unsupported_modules():
    """tp counts GELU, which the width counter does not model: it must decline, not guess."""
    assert torch.nn.GELU in tp.utils.op_counter.MODULES_MAPPING
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GELU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 30 * 30, 2))
    ex = torch.randn(1, 3, 32, 32)
    assert not MacsCounter(model, ex, expected=_tp_macs(model, ex)).ok
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 30 * 30, 2))
    c = MacsCounter(plain, ex, expected=_tp_macs(plain, ex))
    assert c.ok and c.macs() == _tp_macs(plain, ex)


def test_counter_declines_when_first_count_disagrees():
    model = build_model("resnet20", 10).eval()
    ex = example_inputs()
    assert not MacsCounter(model, ex, expected=_tp_macs(model, ex) + 1).ok


class _Small(torch.nn.Module):
    """conv -> norm -> conv -> fc; with LayerNorm (over channels) the fast counter declines."""

    def __init__(self, layernorm: bool):
        super().__init__()
        self.layernorm = layernorm
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.norm = torch.nn.LayerNorm(16) if layernorm else torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = self.conv(x)
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if self.layernorm else self.norm(x)
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


@pytest.mark.parametrize("kind", ["batchnorm", "layernorm"])
def test_outcome_names_the_counter_that_ran_the_loop(kind):
    """A model the fast counter does not know falls back to Torch-Pruning's count, and the
    outcome (hence the row's macs_counter column) says so."""
    from types import SimpleNamespace

    from progprune.pruning import make_pruner, progressive_prune

    torch.manual_seed(0)
    model = _Small(kind == "layernorm").eval()
    ex = example_inputs()
    cfg = SimpleNamespace(method="l1", global_pruning=True, iterative_steps=20, max_pruning_ratio=1.0, round_to=None)
    out = progressive_prune(model, make_pruner(model, ex, cfg, 10), ex, 1.5)
    assert out.status == "ok" and out.achieved_speedup >= 1.5
    assert out.macs_counter == ("fast" if kind == "batchnorm" else "torch_pruning")
    assert (out.macs, out.params) == count_exact(model, ex)
