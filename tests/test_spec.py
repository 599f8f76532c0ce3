"""The sweep spec: shipped recipes load, every bad field is named by path, the grid expands
deterministically, and no input makes `load_spec_dict` raise anything but SpecError."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from progprune.config import ComboConfig, FinetuneConfig, ModelEntry, SweepSpec
from progprune.errors import ProgpruneError, SpecError
from progprune.spec import load_spec, load_spec_dict

RAY_JOBS = Path(__file__).resolve().parent.parent / "ray_jobs"
SPECS = sorted(p for p in RAY_JOBS.glob("*.yaml") if p.name != "runtime_env.yaml")
HAVE_PRUNING = importlib.util.find_spec("progprune.pruning") is not None

VALID = {
    "name": "t",
    "dataset": "digits",
    "models": ["resnet20", "vgg11"],
    "speedups": [1.5, 2.0],
    "methods": ["group_norm"],
    "seeds": [0, 1],
}


def spec_with(**changes) -> dict:
    d = copy.deepcopy(VALID)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = d
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return d


def problems(data, **kw) -> list[str]:
    with pytest.raises(SpecError) as e:
        load_spec_dict(data, **kw)
    return e.value.problems


# ---- shipped specs ------------------------------------------------------------------
def test_ray_jobs_has_the_recipes():
    names = {p.name for p in SPECS}
    assert {"digits_smoke.yaml", "cifar10_resnet56.yaml", "cifar100_vgg19.yaml"} <= names


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_shipped_spec_loads(path):
    try:
        spec = load_spec(path, check_paths=False)
    except SpecError as e:
        # tv:NAME recipes (imagenet_resnet50) need torchvision, which this environment lacks
        # on purpose (README, Testing): then that must be the only problem. The realmodels
        # suite loads and dry-runs them with torchvision installed.
        import importlib.util

        assert importlib.util.find_spec("torchvision") is None, e.problems
        assert e.problems and all("needs torchvision, which is not installed" in str(p) for p in e.problems), e.problems
        return
    assert spec.combinations()
    assert load_spec_dict(spec.to_dict(), check_paths=False) == spec


def test_digits_smoke_checks_paths_too():
    spec = load_spec(RAY_JOBS / "digits_smoke.yaml")  # no data_dir: nothing to skip
    assert spec.finetune.use_gpu is False and spec.resources.gpus_per_task == 0
    assert len(spec.combinations()) == 2 * 3 * 2  # models x speedups x (group_norm, its random control)


def test_gpu_recipe_missing_data_dir_is_reported_when_checked(tmp_path):
    d = load_spec(RAY_JOBS / "cifar10_resnet56.yaml", check_paths=False).to_dict()
    d["dataset"]["data_dir"] = str(tmp_path / "nope")
    (msg,) = problems(d)
    assert msg.startswith("dataset.data_dir:") and "nope" in msg


def test_cifar10_recipe_matches_the_reference():
    s = load_spec(RAY_JOBS / "cifar10_resnet56.yaml", check_paths=False)
    assert s.base_training.milestones == (120, 150, 180) and s.base_training.epochs == 200
    assert s.sparse_learning.reg == 5e-4 and s.sparse_learning.milestones == (60, 80)
    assert s.finetune.weight_decay == 5e-4 and s.finetune.batch_size == 128
    assert s.method_names == ("group_norm", "group_sl") and s.seeds == (0, 1, 2)


def test_runtime_env_excludes_heavy_paths():
    env = yaml.safe_load((RAY_JOBS / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert {".git", ".venv", "runs/"} <= set(env["excludes"])
    assert all(isinstance(v, str) for v in env["env_vars"].values())


# ---- defaults and shapes --------------------------------------------------------------
def test_minimal_spec_fills_defaults():
    s = load_spec_dict({"name": "m", "models": "resnet20", "speedups": 2})
    assert s.models == (ModelEntry(name="resnet20"),)
    assert s.speedups == (2.0,) and s.method_names == ("group_norm",) and s.seeds == (0,)
    assert s.dataset.name == "digits" and s.output == "./runs/m"
    assert s.finetune == FinetuneConfig(augment=False)  # digits: no crop+flip
    assert (s.finetune.epochs, s.finetune.lr, s.finetune.num_workers) == (10, 0.05, 1)
    assert s.base_training.epochs == 15 and s.base_training.augment is False
    assert (s.evaluation.latency_batch_size, s.evaluation.latency_repeats) == (1, 20)
    assert s.resources.max_concurrent == 4


def test_dataset_mapping_form():
    s = load_spec_dict(spec_with(dataset={"name": "synthetic", "num_classes": 4,
                                          "synthetic_samples": 64}))
    assert (s.dataset.name, s.dataset.num_classes, s.dataset.synthetic_samples) == (
        "synthetic", 4, 64)


def test_absurd_speedup_is_not_a_spec_error():
    assert load_spec_dict(spec_with(speedups=[1000])).speedups == (1000.0,)


def test_yaml_scalars(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: y\nmodels: [resnet20]\nspeedups: [2]\n"
                 "finetune: {weight_decay: 5e-4, lr: 1E-2, use_gpu: false}\n")
    s = load_spec(p)
    assert s.finetune.weight_decay == 5e-4 and s.finetune.lr == 0.01


# ---- one test per bad field, exact path in the message ----------------------------------
@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"finetune__epochs": -1}, "finetune.epochs: must be an integer in [0, 10000], got -1"),
        ({"finetune__epochs": 10**20}, "finetune.epochs: must be an integer in [0, 10000], got 10"),
        ({"pruning__iterative_steps": 10**20}, "pruning.iterative_steps: must be an integer in [1, 100000]"),
        ({"seeds": [2**64]}, "seeds[0]: must be an integer in [0, 4294967295], got 18446744073709551616"),
        ({"sparse_learning__reg": float("inf")}, "sparse_learning.reg: must be a number in [0, 1] (or null), got inf"),
        ({"dataset": {"name": "synthetic", "synthetic_samples": 10**9}},
         "dataset.synthetic_samples: must be an integer in [1, 100000]"),
        ({"speedups": [1.5, 0.5]}, "speedups[1]: must be a number in (1, 10000], got 0.5"),
        ({"speedups": "fast"}, "speedups[0]: must be a number in (1, 10000], got 'fast'"),
        ({"speedups": {"a": 1}}, "speedups: must be a list of numbers in (1, 10000] (at most 10000), got {'a': 1}"),
        ({"speedups": [1.0]}, "speedups[0]: must be a number in (1, 10000], got 1.0"),
        ({"speedups": [2, float("nan")]}, "speedups[1]: must be a number in (1, 10000], got nan"),
        ({"speedups": [True]}, "speedups[0]: must be a number in (1, 10000], got True"),
        ({"speedups": [2.0, 2]}, "speedups: duplicate entry 2"),
        ({"speedups": []}, "speedups: must not be empty"),
        ({"models": []}, "models: must not be empty"),
        ({"models": ["resnet20", "resnet20"]}, "models: duplicate entry 'resnet20'"),
        ({"models": [{"checkpoint": None}]}, "models[0].name: required field missing"),
        ({"models": [{"name": "resnet20", "checkpont": "x"}]},
         "models[0].checkpont: unknown field; did you mean 'checkpoint'?"),
        ({"models": [42]}, "models[0]: must be a model name or a mapping"),
        ({"methods": []}, "methods: must not be empty"),
        ({"methods": ["group_norm", "group_norm"]}, "methods: duplicate entry 'group_norm'"),
        ({"seeds": [0, 0]}, "seeds: duplicate entry 0"),
        ({"seeds": [-1]}, "seeds[0]: must be an integer in [0, 4294967295], got -1"),
        ({"seeds": [1.5]}, "seeds[0]: must be an integer in [0, 4294967295], got 1.5"),
        ({"base_training__lr": 0}, "base_training.lr: must be a number in (0, 10], got 0"),
        ({"base_training__lr": -0.1}, "base_training.lr: must be a number in (0, 10], got -0.1"),
        ({"base_training__lr": "0.1"}, "base_training.lr: must be a number in (0, 10], got '0.1'"),
        ({"base_training__epochs": True}, "base_training.epochs: must be an integer in [0, 10000], got True"),
        ({"base_training__batch_size": 0}, "base_training.batch_size: must be an integer in [1, 65536]"),
        ({"base_training__schedule": "step"}, "base_training.schedule: must be one of cosine, multistep"),
        ({"base_training__milestones": [80, 60]}, "base_training.milestones: must be a list of increasing"),
        ({"base_training__augment": "yes"}, "base_training.augment: must be true or false (or null), got 'yes'"),
        ({"sparse_learning__reg": -1}, "sparse_learning.reg: must be a number in [0, 1] (or null), got -1"),
        ({"sparse_learning__epochs": -5}, "sparse_learning.epochs: must be an integer in [0, 10000], got -5"),
        ({"pruning__iterative_steps": 0}, "pruning.iterative_steps: must be an integer in [1, 100000], got 0"),
        ({"pruning__max_pruning_ratio": 0}, "pruning.max_pruning_ratio: must be a number in (0, 1]"),
        ({"pruning__max_pruning_ratio": 1.5}, "pruning.max_pruning_ratio: must be a number in (0, 1]"),
        ({"pruning__round_to": 0}, "pruning.round_to: must be an integer in [1, 4096] (or null), got 0"),
        ({"pruning__global_pruning": 1}, "pruning.global_pruning: must be true or false, got 1"),
        ({"pruning__method": "l1"}, "pruning.method: unknown field; list methods in the top-level"),
        ({"finetune__num_workers": -1}, "finetune.num_workers: must be an integer in [0, 1024], got -1"),
        ({"finetune__use_gpu": "true"}, "finetune.use_gpu: must be true or false, got 'true'"),
        ({"finetune__batch_size": 0}, "finetune.batch_size: must be an integer in [1, 65536], got 0"),
        ({"finetune__max_failures": -1}, "finetune.max_failures: must be an integer in [0, 100]"),
        ({"evaluation__latency_repeats": 0}, "evaluation.latency_repeats: must be an integer in [1, 10000]"),
        ({"resources__max_concurrent": 0}, "resources.max_concurrent: must be an integer in [1, 100000], got 0"),
        ({"resources__gpus_per_task": -1}, "resources.gpus_per_task: must be a number in [0, 64]"),
        ({"finetune": [1]}, "finetune: must be a mapping, got [1]"),
        ({"name": "Bad Name"}, "name: must be a name matching [a-z0-9][a-z0-9_.-]*"),
        ({"name": 3}, "name: must be a name matching"),
        ({"output": "ftp://host/x"},
         "output: unsupported scheme 'ftp'; use a local path, file://, s3:// or gs://"),
        ({"output": "s3://"}, "output: s3:// needs a bucket"),
        ({"output": ""}, "output: must be a non-empty string"),
        ({"dataset": {"name": "digits", "image_size": 0}},
         "dataset.image_size: must be an integer in [1, 4096] (or null), got 0"),
        ({"dataset": "mnist"}, "dataset.name: unknown dataset 'mnist'"),
        ({"dataset": {"name": "cifar10"}}, "dataset.data_dir: cifar10 reads"),
        ({"models": ["resnet21"]}, "models[0]: unknown model 'resnet21'; did you mean 'resnet20'?"),
        ({"models": [{"name": "vgg12"}]}, "models[0].name: unknown model 'vgg12'"),
        ({"finetune__epoch": 3}, "finetune.epoch: unknown field; did you mean 'epochs'?"),
        ({"finetun": {}}, "finetun: unknown field; did you mean 'finetune'?"),
        ({"zzz": 1}, "zzz: unknown field; valid: name, task, dataset"),
        # issue 24: controls
        ({"controls": ["lottery"]}, "controls[0]: must be one of random, scratch, got 'lottery'"),
        ({"controls": ["random", "random"]}, "controls: must be a list of controls (random, scratch)"),
        ({"controls": ["scratch"], "scratch__epochs": 0}, "scratch.epochs: scratch.epochs is 0: a model trained "
         "from scratch for no epochs is its random initialisation; set scratch.epochs (--scratch-epochs) to at least 1"),
        ({"controls": ["scratch"], "base_training__epochs": 0, "finetune__epochs": 0},
         "scratch.epochs: base_training.epochs + finetune.epochs is 0, the scratch control's default"),
        ({"scratch__epochs": 4}, "scratch.epochs: there is no scratch control (controls: [scratch])"),
        ({"controls": "random", "methods": ["l1", "random"]}, "methods[1]: random is the random control"),
        ({"controls": ["scratch"], "models": [{"name": "resnet20", "checkpoint": "/x.pt"}]},
         "scratch.epochs: models[0] starts from a checkpoint, whose training progprune does not know"),
    ],
    ids=lambda v: str(v)[:40] if isinstance(v, dict) else "",
)
def test_bad_field_is_named(changes, expected):
    msgs = problems(spec_with(**changes))
    assert any(m.startswith(expected) for m in msgs), msgs


@pytest.mark.skipif(not HAVE_PRUNING, reason="progprune.pruning not written yet")
def test_unknown_method_is_named():
    msgs = problems(spec_with(methods=["group_norm", "grup_norm"]))
    assert any(m.startswith("methods[1]: unknown method 'grup_norm'; did you mean 'group_norm'?")
               for m in msgs), msgs


@pytest.mark.parametrize("key", ["name", "models", "speedups"])
def test_required_fields(key):
    d = copy.deepcopy(VALID)
    del d[key]
    assert f"{key}: required field missing" in problems(d)


def test_every_problem_is_reported_together():
    d = spec_with(finetune__epochs=-1, speedups=[1.5, 0.5], pruning__iterative_steps=0,
                  output="ftp://x/y", models=["resnet20", "nope"])
    msgs = problems(d)
    assert len(msgs) == 5, msgs
    for path in ("finetune.epochs", "speedups[1]", "pruning.iterative_steps", "output",
                 "models[1]"):
        assert any(m.startswith(path + ":") for m in msgs), (path, msgs)
    err = SpecError(msgs, source="x.yaml")
    assert isinstance(err, ProgpruneError) and str(err).startswith("x.yaml: ")


def test_tv_models_are_checked_with_the_spec():
    """Issue 14 #11: a tv: model is judged at load time, not in a task after Ray started."""
    if importlib.util.find_spec("torchvision") is None:
        (msg,) = problems(spec_with(models=["tv:resnet18"]))
        assert msg == ("models[0]: model 'tv:resnet18' needs torchvision, which is not installed; "
                       "run pip install 'progprune[models]'")
    else:
        assert load_spec_dict(spec_with(models=["tv:resnet18"])).models[0].name == "tv:resnet18"
        (msg,) = problems(spec_with(models=["tv:resnet19"]))
        assert msg.startswith("models[0]: unknown torchvision model 'tv:resnet19'; did you mean 'tv:resnet18'?")


def test_spec_must_be_a_mapping():
    assert problems([1, 2])[0].startswith("spec must be a mapping")
    assert problems(None) == ["spec is empty"]


# ---- paths ----------------------------------------------------------------------------
def test_checkpoint_resolves_against_spec_dir(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "base.pt").write_bytes(b"x")
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(spec_with(
        models=["resnet20", {"name": "vgg11", "checkpoint": "ck/base.pt"}])))
    s = load_spec(p)
    assert (s.models[1].name, s.models[1].checkpoint) == ("vgg11", str(tmp_path / "ck" / "base.pt"))
    assert s.models[1].sha256 == __import__("hashlib").sha256(b"x").hexdigest()
    assert s.combinations()[-1].base_checkpoint == str(tmp_path / "ck" / "base.pt")
    assert s.combinations()[0].base_checkpoint is None


def test_missing_checkpoint(tmp_path):
    d = spec_with(models=["resnet20", {"name": "vgg11", "checkpoint": "no/such.pt"}])
    msgs = problems(d, base_dir=str(tmp_path))
    assert msgs == [f"models[1].checkpoint: file not found: {tmp_path / 'no' / 'such.pt'}"]
    # check_paths=False skips the filesystem, not the other rules
    assert load_spec_dict(d, base_dir=str(tmp_path), check_paths=False).models[1].checkpoint
    assert problems({**d, "seeds": [-1]}, check_paths=False) == [
        "seeds[0]: must be an integer in [0, 4294967295], got -1"]


@pytest.mark.parametrize(
    "dataset, expected",
    [
        ("mnist", "dataset.name: unknown dataset 'mnist'"),
        ({"name": "synthetic", "num_classes": 1}, "dataset.num_classes: synthetic needs >= 2"),
        ({"name": "cifar10"}, "dataset.data_dir: cifar10 reads"),  # missing, not unreadable
    ],
)
def test_dataset_rules_kept_without_path_checks(dataset, expected):
    (msg,) = problems(spec_with(dataset=dataset), check_paths=False)
    assert msg.startswith(expected), msg


def test_data_dir_resolves_against_spec_dir(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(spec_with(dataset={"name": "cifar10", "data_dir": "data/c10"})))
    assert load_spec(p, check_paths=False).dataset.data_dir == str(tmp_path / "data" / "c10")
    with pytest.raises(SpecError, match=r"dataset\.data_dir: .*data/c10"):
        load_spec(p)


@pytest.mark.parametrize("out", ["./runs/x", "/abs/x", "file:///tmp/x", "s3://b/x", "gs://b/x"])
def test_supported_outputs(out):
    assert load_spec_dict(spec_with(output=out)).output == out


def test_output_override(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(VALID))
    assert load_spec(p, output_override="s3://bucket/run").output == "s3://bucket/run"
    with pytest.raises(SpecError, match="unsupported scheme 'ftp'"):
        load_spec(p, output_override="ftp://h/x")


# ---- file and YAML errors -----------------------------------------------------------------
def test_yaml_syntax_error_has_line_and_column(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: t\nmodels: [resnet20\nspeedups: [2]\n")
    with pytest.raises(SpecError) as e:
        load_spec(p)
    (msg,) = e.value.problems
    assert "YAML syntax error at line 3, column" in msg, msg
    assert e.value.source == str(p)


def test_duplicate_yaml_key(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: t\nmodels: [resnet20]\nspeedups: [2]\nspeedups: [3]\n")
    with pytest.raises(SpecError, match=r"line 4, column 1: .*duplicate key 'speedups'"):
        load_spec(p)


def test_yaml_yes_is_not_a_boolean(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: t\nmodels: [resnet20]\nspeedups: [2]\nfinetune: {use_gpu: yes}\n")
    with pytest.raises(SpecError, match="finetune.use_gpu: must be true or false, got 'yes'"):
        load_spec(p)


@pytest.mark.parametrize("content", [None, b"\xff\xfe\x00bad", "", "- a\n- b\n"])
def test_unreadable_or_empty_file(tmp_path, content):
    p = tmp_path / "s.yaml"
    if content is not None:
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SpecError):
        load_spec(p)


def test_directory_is_not_a_spec(tmp_path):
    with pytest.raises(SpecError, match="cannot read spec"):
        load_spec(tmp_path)


# ---- round trip and combinations -------------------------------------------------------------
def test_round_trip_through_yaml(tmp_path):
    s = load_spec(RAY_JOBS / "cifar10_resnet56.yaml", check_paths=False)
    d = s.to_dict()
    assert load_spec_dict(d, check_paths=False) == s
    p = tmp_path / "resolved.yaml"
    p.write_text(yaml.safe_dump(d))
    assert load_spec(p, check_paths=False) == s
    assert "method" not in d["pruning"]


def test_combinations_count_order_and_ids():
    s = load_spec_dict(spec_with(methods=["group_norm", "l1"] if HAVE_PRUNING else ["group_norm"]))
    combos = s.combinations()
    n_methods = len(s.methods)
    assert len(combos) == 2 * 2 * n_methods * 2
    assert all(isinstance(c, ComboConfig) and c.sweep == "t" for c in combos)
    keys = [(c.model, c.target_speedup, c.method, c.seed) for c in combos]
    assert keys == sorted(keys, key=lambda k: (
        [m.name for m in s.models].index(k[0]), s.speedups.index(k[1]), s.method_names.index(k[2]), k[3]))
    assert keys[:2] == [("resnet20", 1.5, "group_norm", 0), ("resnet20", 1.5, "group_norm", 1)]
    ids = [c.combo_id() for c in combos]
    assert len(set(ids)) == len(ids)
    again = load_spec_dict(copy.deepcopy(spec_with(
        methods=list(s.method_names)))).combinations()
    assert [c.combo_id() for c in again] == ids
    # the sweep name is display only
    renamed = load_spec_dict(spec_with(name="other", methods=list(s.method_names))).combinations()
    assert [c.combo_id() for c in renamed] == ids


def test_combo_carries_settings():
    s = load_spec_dict(spec_with(pruning={"iterative_steps": 50, "round_to": 8},
                                 finetune={"epochs": 2, "lr": 0.02},
                                 evaluation={"latency_repeats": 3}))
    c = s.combinations()[0]
    assert c.prune.iterative_steps == 50 and c.prune.round_to == 8
    assert c.prune.method == "group_norm"
    assert c.finetune.epochs == 2 and c.finetune.lr == 0.02
    assert c.evaluation.latency_repeats == 3 and c.dataset == s.dataset


# ---- property: nothing but SpecError escapes -------------------------------------------------
_KEYS = [
    "name", "dataset", "models", "speedups", "methods", "seeds", "base_training",
    "sparse_learning", "pruning", "finetune", "evaluation", "resources", "output",
    "epochs", "lr", "milestones", "checkpoint", "data_dir", "num_classes", "round_to",
    "use_gpu", "num_workers", "max_concurrent", "iterative_steps", "max_pruning_ratio",
    "schedule", "augment", "gamma", "reg", "image_size", "batch_size",
]
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
    st.sampled_from(["resnet20", "vgg11", "group_norm", "digits", "cifar10", "s3://b/x",
                     "ftp://x", "tv:", "multistep", "../x.pt", "\x00"]),
    st.just(10**400),
)
_keys = st.one_of(st.sampled_from(_KEYS), st.text(max_size=8), st.integers(), st.none())
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=12,
)


def _check(data):
    try:
        spec = load_spec_dict(data)
    except SpecError:
        return
    assert isinstance(spec, SweepSpec)
    assert load_spec_dict(spec.to_dict()) == spec
    spec.combinations()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _values, max_size=8))
def test_random_specs_raise_only_spec_error(data):
    _check(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_valid_specs_raise_only_spec_error(data):
    d = load_spec(RAY_JOBS / "digits_smoke.yaml").to_dict()
    for _ in range(data.draw(st.integers(1, 3))):
        node = d
        # walk down a random path of existing keys/indices, then replace/delete/add there
        while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
            key = data.draw(st.sampled_from(list(node) if isinstance(node, dict)
                                            else range(len(node))))
            if not isinstance(node[key], (dict, list)):
                break
            node = node[key]
        if isinstance(node, dict):
            key = data.draw(st.sampled_from(list(node) + ["extra"]) | _keys)
        elif isinstance(node, list) and node:
            key = data.draw(st.integers(0, len(node) - 1))
        else:
            continue
        if data.draw(st.booleans()) and isinstance(node, dict):
            node.pop(key, None)
        else:
            node[key] = data.draw(_values)
    _check(d)


def test_finetune_batch_is_global_and_must_split_evenly():
    msgs = problems(spec_with(finetune={"batch_size": 64, "num_workers": 3}))
    assert msgs == ["finetune: batch_size 64 (the global batch) must be a multiple of num_workers 3"]
    assert load_spec_dict(spec_with(finetune={"batch_size": 64, "num_workers": 4})).finetune.batch_size == 64


def test_sparse_settings_follow_each_methods_recipe():
    """Issue 12: per-method published defaults, explicit settings win, a regularised method
    with no sparse learning is refused unless allowed (and then named so in its row)."""
    s = load_spec_dict(spec_with(methods=["slim", "growing_reg", "group_sl", "l1"],
                                 sparse_learning={"epochs": 2}))
    by = {c.method: c.sparse for c in s.combinations() if c.model == "resnet20" and c.seed == 0
          and c.target_speedup == 1.5}
    assert by["slim"].reg == 1e-5 and by["group_sl"].reg == 5e-4 and by["l1"] is None
    assert (by["growing_reg"].reg, by["growing_reg"].delta_reg) == (1e-4, 1e-5)
    assert s.sparse_learning.reg is None  # the resolved spec keeps "the method's recipe"
    s = load_spec_dict(spec_with(methods=["slim"], sparse_learning={"epochs": 2, "reg": 3e-3}))
    assert s.combinations()[0].sparse.reg == 3e-3
    (msg,) = problems(spec_with(methods=["slim", "l1"], sparse_learning={"epochs": 0}))
    assert msg.startswith("sparse_learning.epochs: slim need sparse learning")
    ok = load_spec_dict(spec_with(methods=["slim"], sparse_learning={"epochs": 0, "allow_zero_epochs": True}))
    from progprune.pipeline import build_row

    assert build_row(ok.combinations()[0]).method == "slim-nosl"


def test_crossing_is_a_setting():
    assert load_spec_dict(VALID).pruning.crossing == "fine"
    s = load_spec_dict(spec_with(pruning={"crossing": "reference"}))
    assert {c.prune.crossing for c in s.combinations()} == {"reference"}
    assert problems(spec_with(pruning={"crossing": "exact"})) == [
        "pruning.crossing: must be one of fine, reference, got 'exact'"]


def test_methods_carry_their_own_sparse_settings():
    """Issue 12: `methods: [{name: slim, reg: 1e-5}]`: a method's own settings override
    `sparse_learning:` for it alone, round-trip through the resolved spec, and are refused
    where they would change nothing."""
    s = load_spec_dict(spec_with(
        methods=["group_norm", {"name": "slim", "reg": 3e-5, "epochs": 4},
                 {"name": "growing_reg", "delta_reg": 2e-5}, "group_sl"],
        sparse_learning={"epochs": 2, "lr": 0.02}))
    by = {c.method: c.sparse for c in s.combinations() if c.model == "resnet20" and c.seed == 0
          and c.target_speedup == 1.5}
    assert by["group_norm"] is None
    assert (by["slim"].reg, by["slim"].epochs, by["slim"].lr) == (3e-5, 4, 0.02)
    assert (by["growing_reg"].reg, by["growing_reg"].delta_reg, by["growing_reg"].epochs) == (1e-4, 2e-5, 2)
    assert (by["group_sl"].reg, by["group_sl"].epochs) == (5e-4, 2)
    assert s.method_names == ("group_norm", "slim", "growing_reg", "group_sl")
    # own settings are part of the combination's identity, the others' ids do not move
    plain = load_spec_dict(spec_with(methods=["group_norm", "slim", "growing_reg", "group_sl"],
                                     sparse_learning={"epochs": 2, "lr": 0.02}))
    ids = {(c.method, c.model, c.target_speedup, c.seed): c.combo_id() for c in plain.combinations()}
    for c in s.combinations():
        same = ids[(c.method, c.model, c.target_speedup, c.seed)] == c.combo_id()
        assert same == (c.method in ("group_norm", "group_sl"))
    # the resolved spec keeps bare names where a method has no sparse learning, states each
    # recipe value that nothing else sets (issue 22: combinations() needs no registry), and
    # reloads equal
    dumped = s.to_dict()["methods"]
    assert dumped == ["group_norm", {"name": "slim", "sparse": True, "epochs": 4, "reg": 3e-5},
                      {"name": "growing_reg", "sparse": True, "reg": 1e-4, "delta_reg": 2e-5},
                      {"name": "group_sl", "sparse": True, "reg": 5e-4}]
    assert load_spec_dict(s.to_dict()) == s
    assert load_spec_dict(s.to_dict()).combinations() == s.combinations()


@pytest.mark.parametrize("methods, sl, expected", [
    ([{"name": "group_norm", "reg": 1e-4}], {},
     "methods[0].reg: group_norm has no sparse learning, so its reg would change nothing; remove it"),
    ([{"name": "slim", "delta_reg": 1e-5}], {},
     "methods[0].delta_reg: slim does not grow its regularization, so its delta_reg would change nothing"),
    ([{"name": "slim", "reg": 2}], {}, "methods[0].reg: must be a number in [0, 1] (or null), got 2"),
    ([{"name": "slim", "rge": 1e-4}], {}, "methods[0].rge: unknown field; did you mean 'reg'?"),
    ([{"name": "slmi"}], {}, "methods[0].name: unknown method 'slmi'; did you mean 'slim'?"),
    ([{"reg": 1e-4}], {}, "methods[0].name: required field missing"),
    ([7], {}, "methods[0]: must be a method name or a mapping with name and its settings, got 7"),
    (["slim", {"name": "slim", "reg": 1e-4}], {}, "methods: duplicate entry 'slim'"),
    ([{"name": "slim", "epochs": 0}], {"epochs": 3},
     "methods[0].epochs: slim need sparse learning"),
])
def test_per_method_settings_are_validated(methods, sl, expected):
    msgs = problems(spec_with(methods=methods, sparse_learning=sl))
    assert len(msgs) == 1 and msgs[0].startswith(expected), msgs


def test_per_method_zero_epochs_opt_in():
    s = load_spec_dict(spec_with(methods=[{"name": "slim", "epochs": 0, "allow_zero_epochs": True},
                                          "group_sl"], sparse_learning={"epochs": 3}))
    from progprune.pipeline import build_row

    rows = {build_row(c).method for c in s.combinations()}
    assert rows == {"slim-nosl", "group_sl"}


def test_pruning_ignore_patterns():
    """pruning.ignore: one pattern or a list; part of the key only when set, so specs
    written before it existed keep their combo_ids."""
    plain = load_spec_dict(spec_with()).combinations()[0]
    one = load_spec_dict(spec_with(pruning__ignore="layer1.*")).combinations()[0]
    assert one.prune.ignore == ("layer1.*",)
    assert load_spec_dict(spec_with(pruning__ignore=["a.*", "*.fc"])).pruning.ignore == ("a.*", "*.fc")
    assert one.combo_id() != plain.combo_id() and one.sparse_key() != plain.sparse_key()
    (msg,) = problems(spec_with(pruning__ignore=[""]))
    assert msg.startswith("pruning.ignore[0]: must be a non-empty string")


def test_py_factory_checked_at_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nets_ok.py").write_text("def f(num_classes):\n    return None\n")
    assert load_spec_dict(spec_with(models=["py:nets_ok:f"])).models[0].name == "py:nets_ok:f"
    (msg,) = problems(spec_with(models=["py:nets_missing:f"]))
    assert msg.startswith("models[0]: model 'py:nets_missing:f': cannot import nets_missing (ModuleNotFoundError")


def test_dataset_image_size_normalisation_and_loader_workers():
    """image_size defaults by data set (224 for folders, 32 for the 32-px sets); mean/std
    take three numbers; settings added later keep old combo_ids while unset, and the loader
    worker count is in no key (it changes no result)."""
    plain = load_spec_dict(spec_with()).combinations()[0]
    assert plain.dataset.image_size == 32
    assert set(plain.dataset.key()) == {"name", "data_dir", "num_classes", "image_size",
                                        "synthetic_samples", "test_split"}
    workers = load_spec_dict(spec_with(dataset={"name": "digits", "loader_workers": 3})).combinations()[0]
    assert workers.combo_id() == plain.combo_id() and workers.base_key() == plain.base_key()
    norm = load_spec_dict(spec_with(dataset={"name": "digits", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]}))
    assert norm.dataset.mean == (0.5, 0.4, 0.3)
    assert norm.combinations()[0].combo_id() != plain.combo_id()
    (msg,) = problems(spec_with(dataset={"name": "digits", "std": [0.2, 0, 0.2]}))
    assert msg.startswith("dataset.std[1]: must be a number in (0, 1]"), msg
    (msg,) = problems(spec_with(dataset={"name": "digits", "mean": [0.5, 0.5]}))
    assert msg.startswith("dataset.mean"), msg


def test_a_methods_null_setting_means_unset():
    """`methods: [{name: slim, milestones: null}]`: null is "not set here" (the spec's
    sparse_learning value applies), not a value that reaches the milestone check (it once
    escaped as a TypeError)."""
    s = load_spec_dict(spec_with(methods=[{"name": "slim", "milestones": None, "reg": None}],
                                 sparse_learning={"epochs": 3, "milestones": [2]}))
    sl = s.combinations()[0].sparse
    assert sl.milestones == (2,) and sl.reg == 1e-5  # the spec's milestones, slim's recipe reg
    assert s.to_dict()["methods"] == [{"name": "slim", "sparse": True, "reg": 1e-5}]


def test_shipped_specs_keep_their_ids():
    """Issue 22: settings that moved (each method's recipe into the resolved spec) or were
    added (the sparse-learning optimiser) leave the shipped specs' keys as they were."""
    combos = load_spec(RAY_JOBS / "cifar10_resnet56.yaml", check_paths=False).combinations()
    assert [c.combo_id() for c in combos[:4]] == [
        "da8fa864d36c5310", "c7910659a4a675d7", "177c00078780a608", "e9e87fabeb563122"]
    assert combos[3].method == "group_sl" and combos[3].sparse_key() == "8e7948af6f909af4"
    smoke = [c for c in load_spec(RAY_JOBS / "digits_smoke.yaml").combinations() if c.control is None]
    assert [c.combo_id() for c in smoke] == ["b89af7838b5f7350", "3efa4e305124753d", "4a1b292aa944101f",
                                             "5816e3cbe742f284", "5d91b6eef7daefda", "5dacbb47ca78f371"]


def test_sparse_learning_optimiser_is_settings():
    """Issue 22: momentum, weight decay, gamma and augmentation of sparse learning were
    hard-coded in the pipeline; now settings (per method too) that reach its training and
    its keys, hashed only when changed."""
    plain = load_spec_dict(spec_with(methods=["slim"], sparse_learning={"epochs": 2})).combinations()[0]
    t = plain.sparse.training()
    assert (t.momentum, t.weight_decay, t.gamma, t.augment, t.schedule) == (0.9, 0.0, 0.1, True, "cosine")
    assert (t.epochs, t.lr, t.batch_size) == (2, plain.sparse.lr, plain.sparse.batch_size)
    changed = load_spec_dict(spec_with(methods=[{"name": "slim", "momentum": 0.8}],
                                       sparse_learning={"epochs": 2, "milestones": [1], "gamma": 0.5}))
    c = changed.combinations()[0]
    t = c.sparse.training()
    assert (t.momentum, t.gamma, t.schedule, t.milestones) == (0.8, 0.5, "multistep", (1,))
    assert c.combo_id() != plain.combo_id() and c.sparse_key() != plain.sparse_key()
    assert c.base_key() == plain.base_key()
    (msg,) = problems(spec_with(sparse_learning={"momentum": 1.0}))
    assert msg.startswith("sparse_learning.momentum: must be a number in [0, 1)")


def test_combinations_need_no_registry(tmp_path):
    """Issue 22: the resolved spec states which methods learn sparsity and their recipe
    values, so building combinations from it imports no registry (and no torch)."""
    import json
    import subprocess
    import sys

    resolved = load_spec_dict(spec_with(methods=["group_norm", "growing_reg"],
                                        sparse_learning={"epochs": 2})).to_dict()
    (tmp_path / "r.json").write_text(json.dumps(resolved))
    code = ("import json, sys\nfrom progprune.config import SweepSpec\n"
            "s = SweepSpec.model_validate(json.load(open('r.json')))\n"
            "print(json.dumps({c.method: c.sparse and [c.sparse.reg, c.sparse.delta_reg] for c in s.combinations()}),"
            " 'progprune.pruning' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path).stdout
    assert out.split() == ['{"group_norm":', 'null,', '"growing_reg":', '[0.0001,', '1e-05]}', "False", "False"], out


def test_a_method_says_truly_whether_it_learns_sparsity():
    assert load_spec_dict(spec_with(methods=[{"name": "slim", "sparse": True}])).methods[0].sparse
    assert problems(spec_with(methods=[{"name": "slim", "sparse": False}])) == [
        "methods[0].sparse: slim learns sparsity; remove the setting (the method registry fills it)"]


def test_checkpoints_are_keyed_by_content(tmp_path):
    import torch

    from progprune.models import build_model

    ck = tmp_path / "base.pt"
    d = {"name": "t", "models": [{"name": "resnet20", "checkpoint": str(ck)}], "speedups": [2]}
    torch.manual_seed(0)
    torch.save(build_model("resnet20", 10).state_dict(), ck)
    first = load_spec_dict(d)
    torch.manual_seed(1)
    torch.save(build_model("resnet20", 10).state_dict(), ck)  # new weights, same file name
    second = load_spec_dict(d)
    (a,), (b,) = first.combinations(), second.combinations()
    assert a.base_checkpoint == b.base_checkpoint and a.combo_id() != b.combo_id()
    assert len(b.base_checkpoint_sha256) == 64 and b.base_key() != a.base_key()
    # the resolved spec pins the content: a later change of the file is refused
    pinned = first.to_dict()
    from progprune.errors import SpecError

    with pytest.raises(SpecError, match=r"models\[0\]\.sha256: .* the file changed"):
        load_spec_dict(pinned)
