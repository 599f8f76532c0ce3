"""progressive_prune lands at or just above the target, on every model kind and method."""
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from progprune import _tp
from progprune.config import PruneConfig
from progprune.errors import BadInput, ProgpruneError
from progprune.models import build_model, example_inputs
from progprune.pruning import (METHODS, Method, get_method, list_methods, make_pruner,
                               progressive_prune, register_method)

NUM_CLASSES = 10



def _trained_like(model):
    """BN scales as training leaves them (spread out); a fresh init has them all 1.0."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.5)


def _prune(name, target, *, method="group_norm", global_pruning=True, steps=400, round_to=None,
           crossing="fine", calib=None, seed=0, on_step=None, trained_like=False):
    torch.manual_seed(seed)
    model = build_model(name, NUM_CLASSES).eval()
    if trained_like:
        _trained_like(model)
    ex = example_inputs()
    cfg = PruneConfig(method=method, global_pruning=global_pruning, iterative_steps=steps, round_to=round_to,
                      crossing=crossing)
    pruner = make_pruner(model, ex, cfg, NUM_CLASSES)
    out = progressive_prune(model, pruner, ex, target, cfg, calib=calib, on_step=on_step)
    return model, out


def _classifier(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]


def _check_outcome(model, out, target, max_overshoot_pct=0.5):
    assert out.status == "ok", out
    assert out.achieved_speedup >= target
    assert out.overshoot_pct <= max_overshoot_pct, f"overshoot {out.overshoot_pct:.3f}%"
    macs, params = tp.utils.count_ops_and_params(model, example_inputs())
    assert (out.macs, out.params) == (int(macs), int(params))
    assert out.base_macs / out.macs == out.achieved_speedup
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, NUM_CLASSES)
    cls = _classifier(model)
    assert getattr(cls, "out_features", getattr(cls, "out_channels", None)) == NUM_CLASSES


@pytest.mark.parametrize("name, target", [
    ("resnet20", 1.5), ("resnet20", 2.0), ("resnet20", 3.0),
    ("vgg11", 2.0), ("vgg11", 4.0),
    ("mobilenetv2", 1.5), ("mobilenetv2", 2.55),
    ("resnet56", 2.55),
])
def test_lands_at_target_with_small_overshoot(name, target):
    seen = []
    model, out = _prune(name, target, on_step=lambda step, s: seen.append((step, s)))
    _check_outcome(model, out, target)
    # on_step saw every step, with rising speedups, ending at the outcome
    assert [st for st, _ in seen] == list(range(1, out.steps + 1))
    assert [v for _, v in seen] == sorted(v for _, v in seen)
    assert seen[-1][1] == pytest.approx(out.achieved_speedup)
    assert 0 < out.steps < 400
    assert out.params < out.base_params
    # the history is JSON-able (it goes into the artifact), and so is the whole outcome
    assert json.loads(json.dumps(out.history)) == out.history and out.history
    assert json.loads(json.dumps(dataclasses.asdict(out)))["crossing_cut"] == out.crossing_cut


def test_local_pruning():
    model, out = _prune("resnet20", 2.0, global_pruning=False)
    _check_outcome(model, out, 2.0)


@pytest.mark.parametrize("name, target", [
    ("resnet20", 2.0),
    ("vgg11", 3.0),
])
def test_round_to_keeps_multiples_and_never_undershoots(name, target):
    model, out = _prune(name, target, round_to=8)
    assert out.status == "ok" and out.achieved_speedup >= target
    cls = _classifier(model)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m is not cls]
    bad = {n: m.out_channels for n, m in model.named_modules() if m in convs and m.out_channels % 8}
    assert not bad, f"widths not multiples of 8: {bad}"
    assert (cls.out_features if isinstance(cls, nn.Linear) else cls.out_channels) == NUM_CLASSES
    macs, _ = tp.utils.count_ops_and_params(model, example_inputs())
    assert out.macs == int(macs)


def test_unreachable_target_stops_at_the_step_cap():
    model, out = _prune("resnet20", 1000.0, steps=40)
    assert out.status == "unreachable"
    assert out.achieved_speedup < 1000.0
    assert out.steps == 40
    macs, _ = tp.utils.count_ops_and_params(model, example_inputs())
    assert out.macs == int(macs)


def test_reference_loop_overshoots_at_least_as_much():
    target = 2.0
    _, ours = _prune("resnet20", target)
    ref_model, ref = _prune("resnet20", target, crossing="reference")
    assert ref.status == "ok" and ref.achieved_speedup >= target
    assert ref.achieved_speedup >= ours.achieved_speedup >= target
    macs, _ = tp.utils.count_ops_and_params(ref_model, example_inputs())
    assert ref.macs == int(macs)


@pytest.mark.parametrize("method", list_methods())
def test_every_method_reaches_the_target(method, calib):
    model, out = _prune("resnet20", 1.5, method=method, steps=50, calib=calib, trained_like=True)
    assert out.status == "ok", out
    assert out.achieved_speedup >= 1.5
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, NUM_CLASSES)
    assert _classifier(model).out_features == NUM_CLASSES


@pytest.mark.parametrize("method", ["slim", "group_slim"])
def test_bn_scale_methods_prune_an_untrained_model(method):
    """`progprune prune --method slim --base-epochs 0 --sl-epochs 0` must still prune."""
    _, out = _prune("resnet20", 1.5, method=method, steps=50)
    assert out.status == "ok" and out.achieved_speedup >= 1.5


@pytest.mark.parametrize("target", [1.0, 0.5, -2.0, float("nan")])
def test_target_must_exceed_one(target):
    model = build_model("resnet20", NUM_CLASSES).eval()
    ex = example_inputs()
    cfg = PruneConfig(iterative_steps=10)
    pruner = make_pruner(model, ex, cfg, NUM_CLASSES)
    with pytest.raises(ProgpruneError, match="speedup must be a number > 1"):
        progressive_prune(model, pruner, ex, target, cfg)


@pytest.mark.parametrize("method", ["taylor", "hessian", "obdc"])
def test_gradient_methods_need_calibration_data(method):
    model = build_model("resnet20", NUM_CLASSES).eval()
    ex = example_inputs()
    cfg = PruneConfig(method=method, iterative_steps=10)
    pruner = make_pruner(model, ex, cfg, NUM_CLASSES)
    with pytest.raises(ProgpruneError, match="needs calibration data"):
        progressive_prune(model, pruner, ex, 1.5, cfg)
    assert pruner.current_step == 0


def test_unknown_method_lists_valid_names():
    with pytest.raises(ProgpruneError) as e:
        get_method("l3")
    assert "unknown method 'l3'" in str(e.value)
    assert all(m in str(e.value) for m in list_methods())


def test_a_method_name_registered_twice_is_refused():
    """The registry never overwrites silently (it used to: the second entry won)."""
    l1 = get_method("l1")
    with pytest.raises(ValueError, match="method 'l1' registered twice"):
        register_method(Method("l1", lambda nc: tp.importance.RandomImportance()))
    assert get_method("l1") is l1 and len(METHODS) == len(list_methods())


class _ThroughNumpy(nn.Module):
    """A forward that leaves torch for numpy: it runs without gradients, but autograd (and
    so Torch-Pruning's tracing) refuses it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        return self.fc(torch.from_numpy(self.conv(x).mean((2, 3)).numpy()))


def test_a_model_torch_pruning_cannot_trace_is_bad_input():
    """One line naming Torch-Pruning's error (it was a NameError: the except clause named
    an exception class the module did not import)."""
    model = _ThroughNumpy().eval()
    with pytest.raises(BadInput, match=r"^Torch-Pruning cannot build the dependency graph of this "
                                       r"model \(RuntimeError: Can't call numpy\(\) on Tensor"):
        make_pruner(model, example_inputs(), PruneConfig(iterative_steps=5), NUM_CLASSES)


class _Drift(nn.Module):
    """Where the fast MACs counter loses a tensor's origin (here `a` goes through a flatten
    and back: no tensor of that shape came from a layer) it ties the ReLU calls to the latest
    module whose output had their input's shape: `b`, though the ReLUs follow `a`. The counts
    agree while the two convs are as wide; once `b` is pruned more (its weights are smaller)
    the fast count runs low, so the loop believes the target reached before it is."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(3, 16, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(32, NUM_CLASSES)
        with torch.no_grad():
            self.b.weight.mul_(0.01)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        a = a.flatten(2).reshape(a.shape)
        for _ in range(8):
            a = self.act(a)
        return self.fc(torch.cat([a.mean((2, 3)), b.mean((2, 3))], 1))


def test_the_exact_count_fallback_reports_every_step():
    """When the fast counter drifts the loop finishes with exact counts; `on_step` hears
    those steps too (it used to stop hearing at the drift), the last with the outcome's
    speedup."""
    torch.manual_seed(0)
    model, ex = _Drift().eval(), example_inputs()
    cfg = PruneConfig(method="l1", iterative_steps=20)
    seen = []
    out = progressive_prune(model, make_pruner(model, ex, cfg, NUM_CLASSES), ex, 1.5, cfg,
                            on_step=lambda step, s: seen.append((step, s)))
    assert out.status == "ok" and out.macs_counter == "torch_pruning"
    assert out.macs_fallback.startswith("its count drifted from Torch-Pruning's while pruning (")
    assert [step for step, _ in seen] == list(range(1, out.steps + 1))
    assert seen[-1][1] == out.achieved_speedup >= 1.5
    assert seen[-2][1] >= 1.5  # the fast count's belief, before the exact count said otherwise


def test_registry_entries_carry_method_needs():
    assert {m for m in list_methods() if get_method(m).sparse} == {"slim", "group_slim", "group_sl", "growing_reg"}
    assert {m: get_method(m).gradients for m in list_methods() if get_method(m).gradients} == {
        "taylor": "taylor", "hessian": "hessian", "obdc": "obdc"}
    # what a method needs before each step lives in its entry, not in the loop
    assert {m for m in list_methods() if get_method(m).before_step} == {"taylor", "hessian", "obdc"}
    # Torch-Pruning's published sparse-learning recipes
    assert {m: dict(get_method(m).sparse_defaults) for m in list_methods() if get_method(m).sparse} == {
        "slim": {"reg": 1e-5}, "group_slim": {"reg": 1e-5}, "group_sl": {"reg": 5e-4},
        "growing_reg": {"reg": 1e-4, "delta_reg": 1e-5}}
    assert all(not get_method(m).sparse_defaults for m in list_methods() if not get_method(m).sparse)


@pytest.mark.parametrize("sparse, expected", [
    (None, {"reg": 1e-4, "delta_reg": 1e-5}),
    (SimpleNamespace(reg=None, delta_reg=None), {"reg": 1e-4, "delta_reg": 1e-5}),
    (SimpleNamespace(reg=3e-4, delta_reg=None), {"reg": 3e-4, "delta_reg": 1e-5}),
    (SimpleNamespace(reg=3e-4, delta_reg=2e-5), {"reg": 3e-4, "delta_reg": 2e-5}),
])
def test_sparse_settings_override_the_recipe_defaults(sparse, expected):
    assert get_method("growing_reg").pruner_kwargs(sparse) == expected
    model = build_model("resnet20", NUM_CLASSES).eval()
    pruner = make_pruner(model, example_inputs(), PruneConfig(method="growing_reg", iterative_steps=10),
                         NUM_CLASSES, sparse)
    assert isinstance(pruner, tp.pruner.GrowingRegPruner)
    assert (pruner.base_reg, pruner.delta_reg) == (expected["reg"], expected["delta_reg"])
    assert get_method("group_slim").pruner_kwargs(None) == {"reg": 1e-5, "group_lasso": True}


@pytest.mark.parametrize("name", ["resnet20", "vgg11", "mobilenetv2"])
def test_obdc_prunes_every_model_kind_and_leaves_no_hooks(name, calib):
    model, out = _prune(name, 1.3, method="obdc", steps=30, calib=calib, trained_like=True)
    _check_outcome(model, out, 1.3, max_overshoot_pct=100)
    hooked = [n for n, m in model.named_modules() if m._forward_pre_hooks or m._backward_hooks]
    assert not hooked, hooked
    assert all(p.grad is None for p in model.parameters())


def test_obdc_ranks_by_the_fisher_not_by_magnitude(calib):
    """OBD-C and plain L2 pick different channels on the same weights."""
    _, obdc = _prune("resnet20", 1.5, method="obdc", steps=30, calib=calib, trained_like=True)
    _, l2 = _prune("resnet20", 1.5, method="group_norm", steps=30, calib=calib, trained_like=True)
    assert obdc.history != l2.history


# ---- what is really wrong when nothing can be pruned -----------------------------------
class _OnlyHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, NUM_CLASSES)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def test_nothing_prunable_is_said_up_front():
    """A model whose only layer is the classifier, or ignore patterns that match every
    prunable layer: one line saying so (it used to run every step and end 'unreachable ...
    use more iterative_steps')."""
    with pytest.raises(BadInput) as e:
        make_pruner(_OnlyHead().eval(), example_inputs(), PruneConfig(iterative_steps=5), NUM_CLASSES)
    assert str(e.value) == ("the model has nothing Torch-Pruning can prune: no Conv/Linear layer besides "
                            "the classifier head, which is kept whole ('fc'); choose a model with hidden layers")
    for patterns in (["*"], ["layer*"]):
        with pytest.raises(BadInput) as e:
            make_pruner(build_model("resnet20", NUM_CLASSES), example_inputs(),
                        PruneConfig(iterative_steps=5, ignore=patterns), NUM_CLASSES)
        assert e.value.field == "pruning.ignore"
        assert e.value.message.startswith(f"{patterns} leave nothing to prune: every prunable layer matches")


def test_non_finite_weights_are_refused_before_the_first_step():
    model = build_model("resnet20", NUM_CLASSES).eval()
    cfg = PruneConfig(iterative_steps=5)
    pruner = make_pruner(model, example_inputs(), cfg, NUM_CLASSES)
    with torch.no_grad():
        model.layer2[0].conv2.weight.fill_(float("nan"))
    with pytest.raises(BadInput, match=r"^the model has non-finite weights \(layer2\.0\.conv2\.weight holds nan/inf\)"):
        progressive_prune(model, pruner, example_inputs(), 2.0, cfg)
    assert pruner.current_step == 0


# ---- attention: Torch-Pruning 1.6.1's global head ranking on steps that remove no head -----
class _Attention(nn.Module):
    """timm's Attention layout (qkv, num_heads, head_dim, proj): what progprune prunes by heads."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class _Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), _Attention(dim, heads), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _TinyViT(nn.Module):
    def __init__(self, dim=24, depth=2, heads=3, patch=8):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(*[_Block(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, NUM_CLASSES)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


@pytest.mark.parametrize("max_ratio", [1.0, 0.9], ids=["pruner_step", "planned_step"])
def test_global_head_pruning_survives_steps_that_remove_no_head(max_ratio, tmp_path):
    """Torch-Pruning 1.6.1 leaves `head_thres` unset on a step whose global head ranking
    removes no head, then reads it: `UnboundLocalError` (timm's vit_tiny_patch16_224, 400
    steps, global, 2x). With 400 steps most steps remove no head (6 heads here, one every
    ~67 steps' worth of the schedule); both ways a step runs (pruner.step(), and the
    planned step a cap < 1 takes) prune through them, remove whole heads, and reload."""
    from progprune.artifacts import load_artifact, save_artifact

    torch.manual_seed(0)
    model, ex = _TinyViT().eval(), example_inputs()
    cfg = PruneConfig(iterative_steps=400, max_pruning_ratio=max_ratio)
    out = progressive_prune(model, make_pruner(model, ex, cfg, NUM_CLASSES), ex, 1.3, cfg)
    assert out.status == "ok" and out.achieved_speedup >= 1.3 and out.steps > 2
    heads = [(m.num_heads, m.qkv.out_features) for m in model.modules() if isinstance(m, _Attention)]
    assert sum(h for h, _ in heads) < 6  # heads did go, whole (head_dim kept)
    assert all(q == 3 * h * 8 for h, q in heads)
    path = save_artifact(tmp_path / "vit.pt", model, model_name="py:tiny_vit:build", num_classes=NUM_CLASSES,
                         history=out.history)
    again, _ = load_artifact(path, factory=lambda num_classes: _TinyViT())  # the history replays
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


class _Concat(nn.Module):
    """Two branches concatenated, then a conv: the groups' index mappings shift as they are pruned."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 12, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 20, 3, padding=1), nn.BatchNorm2d(20), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(32, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, NUM_CLASSES))

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.cat([self.a(x), self.b(x)], 1))


def _groups(pruner):
    return [[(str(d), list(i), list(g[k].root_idxs)) for k, (d, i) in enumerate(g)]
            for g in _tp.all_groups(pruner)]


def _twin_pruners(name: str, cfg: PruneConfig):
    """Two pruners of the same seeded, trained-like model: one stepped as Torch-Pruning does,
    one within `_tp.mappings_cached`."""
    pruners = []
    for _ in range(2):
        torch.manual_seed(0)
        model = _Concat().eval() if name == "concat" else build_model(name, NUM_CLASSES)
        _trained_like(model)
        pruners.append(make_pruner(model, example_inputs(), cfg, NUM_CLASSES))
    return pruners


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2", "concat"])
def test_cached_mappings_and_groups_prune_what_torch_pruning_prunes(name):
    """Within `_tp.mappings_cached` (the loop's steps) index mappings are recomputed only after
    a prune and groups are walked with offsets (through the concat too, shifted by its
    offsets, which move as it is pruned): every step prunes
    the same channels as Torch-Pruning's own `pruner.step()`, and every group (members,
    indices, root indices) is the one Torch-Pruning builds."""
    cfg = PruneConfig(global_pruning=True, iterative_steps=20)
    own, cached = _twin_pruners(name, cfg)
    remade = 0
    for step in range(8):
        own.step()
        with _tp.mappings_cached(cached):
            cached.step()
        assert cached.pruning_history() == own.pruning_history(), step
        for (n, a), b in zip(own.model.state_dict().items(), cached.model.state_dict().values()):
            assert a.shape == b.shape and torch.equal(a, b), (step, n)  # the same channels of every layer
        with _tp.mappings_cached(cached):
            mine = _groups(cached)
        assert mine == _groups(cached) == _groups(own), step
        remade = sum(v is not None for v in cached.DG._progprune_structures.values())
    assert len(own.pruning_history()) > 8 and remade > 0  # something pruned; some groups re-made
    if name == "concat":  # the branches' groups map through the concat: re-made with its offsets
        assert any(off for v in cached.DG._progprune_structures.values() if v for _, off in v)
        # Torch-Pruning ranks b (after a in the concat) first, so a step never moves an offset
        # it reads later; pruning a first does: b's group must map through the new offset
        with _tp.mappings_cached(cached):
            _groups(cached)
            module = cached.model.a[0]
            _tp.prune_group(cached, module, tp.prune_conv_out_channels, [0, 1])
            mine = _groups(cached)
        assert mine == _groups(cached)
    assert not hasattr(cached.DG, "_progprune_mappings") and "get_pruning_group" not in vars(cached.DG)


def _scores(pruner):
    """Every ranked group's importance, by whatever `pruner.importance` is now."""
    return [pruner.importance(g) for g in _tp.all_groups(pruner)]


@pytest.mark.parametrize("name, method", [("resnet20", "group_norm"), ("mobilenetv2", "l1"),
                                          ("concat", "group_sl"), ("concat", "lamp"), ("resnet20", "l2")])
def test_cached_magnitude_importance_is_torch_prunings_bit_for_bit(name, method):
    """Within `_tp.mappings_cached` a magnitude importance takes runs of indices as slices and
    squares in one pass: at every step, every group's scores are bitwise the ones
    Torch-Pruning's own `__call__` gives for the same group, and the steps prune the same
    channels as `pruner.step()` outside the block."""
    cfg = PruneConfig(method=method, global_pruning=True, iterative_steps=20)
    own, cached = _twin_pruners(name, cfg)
    for step in range(6):
        with _tp.mappings_cached(cached):
            assert type(cached.importance) is not type(own.importance)  # the fast path is on
            fast = _scores(cached)
        slow = _scores(cached)  # upstream's __call__, the same groups
        assert len(fast) == len(slow) > 0
        for a, b in zip(fast, slow):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), step
        own.step()
        with _tp.mappings_cached(cached):
            cached.step()
        assert cached.pruning_history() == own.pruning_history(), step
    assert type(cached.importance) is type(own.importance)  # upstream's again after the block
    assert "get_all_groups" not in vars(cached.DG)


def test_cached_magnitude_importance_slices_only_runs():
    """Runs of indices become slices; anything else (gaps, repeats, negatives, out of range)
    is indexed as upstream indexes it, out-of-range ones raising as upstream does."""
    from progprune._tp.cached import _rows, _run

    t = torch.arange(10.0)
    assert _run([3, 4, 5]) == slice(3, 6) and _run([0]) == slice(0, 1)
    assert _run([]) is None and _run([1, 3, 3]) is None and _run([2, 1, 3]) is None and _run([-1, 0]) is None
    for idxs in ([3, 4, 5], [1, 3, 2], [0, 0, 1], [9]):
        assert torch.equal(_rows(t, idxs), t[idxs])
    with pytest.raises(IndexError):
        _rows(t, [9, 10])
    other = PruneConfig(method="slim")  # BN-scale importance brings its own __call__: upstream's path
    torch.manual_seed(0)
    model = build_model("resnet20", NUM_CLASSES)
    pruner = make_pruner(model, example_inputs(), other, NUM_CLASSES)
    imp = pruner.importance
    with _tp.mappings_cached(pruner):
        assert pruner.importance is imp


@pytest.mark.parametrize("name", ["concat", "resnet20"])
def test_groups_re_made_for_any_subset_are_torch_prunings(name):
    """A group walked with offsets (through the concat: shifted by its offsets) is, for
    subsets of its channels in any order, member for member the one Torch-Pruning's own walk
    builds; and the concat's groups are among those walked so."""
    import random

    torch.manual_seed(0)
    model = _Concat().eval() if name == "concat" else build_model(name, NUM_CLASSES)
    pruner = make_pruner(model, example_inputs(), PruneConfig(global_pruning=True), NUM_CLASSES)
    graph, rng = pruner.DG, random.Random(0)

    def flat(g):
        return [(str(d), list(i), list(g[k].root_idxs)) for k, (d, i) in enumerate(g)]

    with _tp.mappings_cached(pruner):
        roots = [_tp.root(g)[:2] + (len(g[0].idxs),) for g in _tp.all_groups(pruner)]
        remade = [k for k, v in graph._progprune_structures.items() if v is not None]  # the walks taken
        for module, handler, n in roots:
            for size in (1, n // 2, n):
                idxs = rng.sample(range(n), size)
                mine = graph.get_pruning_group(module, handler, idxs)
                assert flat(mine) == flat(type(graph).get_pruning_group(graph, module, handler, idxs)), idxs
    assert len(remade) == len(roots)
    if name == "concat":  # some members shifted by the concat's offsets
        assert any(off for k in remade for _, off in graph._progprune_structures[k])
