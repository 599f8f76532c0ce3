"""progprune.config, one schema (issue 9): `prune` is a one-combination sweep spec built
from its flags, so both commands share defaults, validation and combo_id; defaults live in
the schema alone (not restated by library functions or help texts). The CLI's one-line
errors are test_cli.py's; prune runs that check a row are test_cli_prune.py's."""
from __future__ import annotations

import json

import pytest
import yaml

from progprune.cli import one_combination_spec
from progprune.config import SweepSpec
from progprune.spec import load_spec, load_spec_dict
from helpers import progprune as cli

FAST = ["--dataset", "synthetic", "--num-classes", "4", "--base-epochs", "0", "--finetune-epochs", "0",
        "--iterative-steps", "40", "--latency-repeats", "1"]


def test_prune_and_sweep_share_defaults_and_combo_id(tmp_path):
    flags = {"model": "resnet20", "speedup": 2.0, "seed": 3, "finetune_lr": 0.02}
    one = load_spec_dict(one_combination_spec(flags)).combinations()[0]
    # the same settings written as a user's sweep spec
    p = tmp_path / "s.yaml"
    p.write_text("name: other-name\nmodels: [resnet20]\nspeedups: [2]\nseeds: [3]\n"
                 "finetune: {lr: 0.02, num_workers: 0}\n")
    (grid,) = load_spec(p).combinations()
    assert one.combo_id() == grid.combo_id()
    assert one.base == grid.base and one.finetune == grid.finetune
    # the same through the command line a user types (Click's own parsing of every flag,
    # boolean pairs such as --global/--local included, left unset)
    r = cli("prune", "--model", "resnet20", "--speedup", "2", "--seed", "3", "--finetune-lr", "0.02",
            "--print-spec")
    assert r.returncode == 0, r.stderr
    (typed,) = load_spec_dict(yaml.safe_load(r.stdout)).combinations()
    assert typed.combo_id() == grid.combo_id()
    assert typed.prune.global_pruning and typed.base.augment is False  # digits: no augmentation
    # a setting the user changes changes the id
    other = load_spec_dict(one_combination_spec({**flags, "finetune_lr": 0.03})).combinations()[0]
    assert other.combo_id() != one.combo_id()


def test_an_hf_model_is_its_own_base_unless_the_spec_trains_it():
    """Task causal_lm: base_training.epochs is 0 unless set (README: the model is its own
    base); it was TrainConfig's 15 epochs of SGD at lr 0.05 on the text, silently. Images
    keep the schema's default."""
    from progprune.config import TrainConfig

    lm = {"name": "lm", "models": ["hf:/models/m"], "speedups": [2], "dataset": {"name": "text", "data_dir": "/d"}}
    default = SweepSpec.model_fields["base_training"].default.epochs
    assert default > 0
    assert SweepSpec.model_validate(lm).base_training.epochs == 0
    assert SweepSpec.model_validate({**lm, "task": "causal_lm"}).base_training.epochs == 0
    partial = SweepSpec.model_validate({**lm, "base_training": {"lr": 0.01}}).base_training
    assert (partial.epochs, partial.lr) == (0, 0.01)
    assert SweepSpec.model_validate({**lm, "base_training": {"epochs": 2}}).base_training.epochs == 2
    assert SweepSpec.model_validate({**lm, "base_training": TrainConfig(lr=0.01)}).base_training.epochs == 0
    assert SweepSpec.model_validate({**lm, "base_training": TrainConfig(epochs=3)}).base_training.epochs == 3
    # `progprune prune hf:PATH` without --base-epochs; with it
    flags = {"model": "hf:/models/m", "speedup": 2.0, "dataset": "text", "data_dir": "/d", "batch_size": 8}
    (combo,) = SweepSpec.model_validate(one_combination_spec(flags)).combinations()
    assert (combo.base.epochs, combo.base.batch_size) == (0, 8)
    (combo,) = SweepSpec.model_validate(one_combination_spec({**flags, "base_epochs": 1})).combinations()
    assert combo.base.epochs == 1
    # images: unchanged
    (combo,) = SweepSpec.model_validate(one_combination_spec({"model": "resnet20", "speedup": 2.0})).combinations()
    assert combo.base.epochs == default


def test_defaults_live_in_the_schema_alone():
    s = load_spec_dict(one_combination_spec({"model": "resnet20", "speedup": 2.0}))
    d = SweepSpec.model_fields
    assert s.base_training.epochs == d["base_training"].default.epochs
    assert s.base_training.lr == d["base_training"].default.lr
    assert s.finetune.batch_size == d["finetune"].default.batch_size
    help_text = cli("prune", "--help").stdout
    assert f"[default: {d['base_training'].default.lr}]" in help_text
    # a grid's default shows as a user writes it (the method's name, not its settings)
    method_help = " ".join(help_text.split("--method", 1)[1].split("--dataset", 1)[0].split())
    assert method_help.endswith(f"[default: {d['methods'].default[0].name}]"), method_help
    # lists of names come from the registries (issue 22), not from words written beside them
    from progprune.data import list_datasets
    from progprune.pruning import get_method, list_methods

    flat = " ".join(help_text.split())
    assert f"--dataset TEXT {', '.join(list_datasets())} (see `progprune datasets`)" in flat
    sparse = ", ".join(m for m in list_methods() if get_method(m).sparse)
    assert f"sparse learning epochs ({sparse})" in flat


def _schema_defaults(model=SweepSpec, out=None) -> dict:
    """Every setting's name -> the defaults the schema declares for it (in any section)."""
    from pydantic import BaseModel

    from progprune.config import PruneConfig

    out = {} if out is None else out
    for name, f in model.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            _schema_defaults(f.annotation, out)
        elif not f.is_required():
            out.setdefault(name, []).append(f.get_default())
    return out if model is not SweepSpec else _schema_defaults(PruneConfig, out)


def _library_functions():
    """(where, function) for every function and method the modules of progprune define
    (the Ray layer included)."""
    import importlib
    import inspect
    import pkgutil

    import progprune

    for info in pkgutil.walk_packages(progprune.__path__, "progprune."):
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isfunction(obj):
                yield f"{mod.__name__}.{name}", obj
            elif inspect.isclass(obj):
                for attr, fn in vars(obj).items():
                    if inspect.isfunction(fn):
                        yield f"{mod.__name__}.{name}.{attr}", fn


def test_library_functions_do_not_restate_schema_defaults():
    """Issue 22: a library parameter named like a setting takes the setting's value from
    the caller; a default equal to the schema's is a second declaration that silently stays
    when the schema's changes (None, "unset", is no restatement)."""
    import inspect

    defaults = _schema_defaults()
    restated = [f"{where}({p.name}={p.default!r})" for where, fn in _library_functions()
                for p in inspect.signature(fn).parameters.values()
                if p.name in defaults and p.default is not inspect.Parameter.empty
                and p.default is not None and any(p.default == d and type(p.default) is type(d)
                                                  for d in defaults[p.name])]
    assert not restated, restated


def test_print_spec_is_a_sweep_spec_and_matches_the_run(tmp_path):
    r = cli("prune", "--model", "resnet20", "--speedup", "1.5", *FAST, "--print-spec")
    assert r.returncode == 0, r.stderr
    p = tmp_path / "grown.yaml"
    p.write_text(r.stdout)
    spec = load_spec(p)
    assert [c.model for c in spec.combinations()] == ["resnet20"]
    run = cli("prune", "--model", "resnet20", "--speedup", "1.5", *FAST, "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    row = json.loads(run.stdout.strip().splitlines()[-1])
    assert row["combo_id"] == spec.combinations()[0].combo_id()


def test_print_spec_can_be_grown_into_a_sweep(tmp_path):
    r = cli("prune", "--model", "vgg11", "--speedup", "2", "--print-spec")
    d = yaml.safe_load(r.stdout)
    d["speedups"] = [1.5, 2, 3]
    d["models"].append({"name": "resnet20"})
    assert len(load_spec_dict(d).combinations()) == 6




def test_eval_batch_size_is_a_setting_that_changes_no_result():
    """Issue 23 #32: --eval-batch-size sets dataset.eval_batch_size; like loader_workers it
    changes no accuracy, so no key (a rerun with another one keeps its rows)."""
    flags = {"model": "resnet20", "speedup": 2.0}
    plain = load_spec_dict(one_combination_spec(flags)).combinations()[0]
    small = load_spec_dict(one_combination_spec({**flags, "eval_batch_size": 16})).combinations()[0]
    assert small.dataset.eval_batch_size == 16 and plain.dataset.eval_batch_size == 128
    assert small.combo_id() == plain.combo_id() and small.base_key() == plain.base_key()
    r = cli("prune", "--model", "resnet20", "--speedup", "2", "--eval-batch-size", "0", "--print-spec")
    assert r.returncode == 2 and r.stderr.startswith("error: --eval-batch-size: must be an integer in [1, 65536]"), r.stderr


def _bounded_fields():
    """(section, field, bounds) of every number or integer setting the schema bounds."""
    import annotated_types as at

    from progprune.config import SweepSpec

    sections = {name: f.annotation for name, f in SweepSpec.model_fields.items()
                if hasattr(f.annotation, "model_fields")}
    for section, model in sections.items():
        for name, f in model.model_fields.items():
            b = {type(m).__name__.lower(): getattr(m, type(m).__name__.lower())
                 for m in f.metadata if isinstance(m, (at.Gt, at.Ge, at.Lt, at.Le))}
            if b:
                yield section, name, b


def test_every_bound_error_states_the_bounds_the_schema_checks():
    """Words and bounds come from one declaration: a value just past each upper bound is
    refused with the interval that refused it (issue 23 item 26: `speedups` said `> 1` while
    10000 was its upper bound)."""
    cases = list(_bounded_fields())
    assert len(cases) >= 20
    for section, name, b in cases:
        hi = b.get("le", b.get("lt"))
        value = hi + 1 if "le" in b else hi  # just outside
        lo = f"[{b['ge']}" if "ge" in b else f"({b['gt']}"
        up = f"{b['le']}]" if "le" in b else f"{b['lt']})"
        spec = {"name": "t", "models": "resnet20", "speedups": 2, section: {name: value}}
        try:
            load_spec_dict(spec, check_paths=False)
        except Exception as e:  # noqa: BLE001: SpecError, checked below
            msg = str(e)
        else:
            raise AssertionError(f"{section}.{name}={value!r} was accepted")
        assert f"{section}.{name}: must be " in msg and f"in {lo}, {up}" in msg, msg


def test_speedup_errors_state_the_schema_bounds():
    from progprune.config import SPEEDUP
    from progprune.errors import SpecError

    for v in (10_001, 1.0, 1e9):
        try:
            load_spec_dict({"name": "t", "models": "resnet20", "speedups": [v]})
        except SpecError as e:
            assert e.problems == [f"speedups[0]: must be a number in ({SPEEDUP['gt']}, {SPEEDUP['le']}], "
                                  f"got {v!r}"]
        else:
            raise AssertionError(v)
    r = cli("prune", "--model", "resnet20", "--speedup", "10001", "--print-spec")
    assert r.returncode == 2 and r.stderr == "error: --speedup: must be a number in (1, 10000], got 10001.0\n"
    assert "(1, 10000]" in " ".join(cli("prune", "--help").stdout.split())


# combo_ids of the shipped specs as progprune computed them before evaluation.runtime,
# precision, threads and `export:` existed (sha256 of the ids joined by ","; the first id):
# settings added later must leave existing sweeps' rows where they are
_SHIPPED_IDS = {"cifar100_vgg19.yaml": ("930598bccb6591cd", "5311735dae3c9955"),
                "cifar10_resnet56.yaml": ("06b4e0c733775899", "da8fa864d36c5310"),
                "digits_smoke.yaml": ("de8a6a27c57c61e7", "b89af7838b5f7350")}


@pytest.mark.parametrize("name", sorted(_SHIPPED_IDS))
def test_shipped_specs_keep_their_combo_ids(name):
    import hashlib
    from pathlib import Path

    from progprune.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "ray_jobs" / name, check_paths=False)
    ids = [c.combo_id() for c in spec.combinations() if c.control is None]  # the demo gained a random control
    assert (hashlib.sha256(",".join(ids).encode()).hexdigest()[:16], ids[0]) == _SHIPPED_IDS[name]
    timed = spec.model_copy(update={"evaluation": spec.evaluation.model_copy(update={"runtime": "onnxruntime"})})
    assert timed.combinations()[0].combo_id() != ids[0]  # a latency in another runtime is another row


def test_text_settings_default_for_text_refused_elsewhere_and_hash_as_before():
    """Issue 21: dataset.seq_len (null: 512 for text) and text_field are the text set's; an
    image set refuses them by name, and while unset they leave every key as it was."""
    from progprune.config import DatasetConfig
    from progprune.errors import SpecError

    plain = DatasetConfig(name="digits")
    assert "seq_len" not in plain.key() and "text_field" not in plain.key()
    text = DatasetConfig(name="text", data_dir="d")
    assert (text.seq_len, text.text_field) == (512, "text") and text.key()["seq_len"] == 512
    assert DatasetConfig(name="text", data_dir="d", seq_len=64).key() != text.key()
    assert DatasetConfig(name="text", data_dir="d", text_field="body").key()["text_field"] == "body"
    for setting in ({"seq_len": 64}, {"text_field": "body"}):
        with pytest.raises(SpecError) as e:
            load_spec_dict({"name": "t", "models": "resnet20", "speedups": 2,
                            "dataset": {"name": "cifar10", "data_dir": "c", **setting}}, check_paths=False)
        (k,) = setting
        assert e.value.problems == [f"dataset.{k}: read by the text data set only (task causal_lm); "
                                    "cifar10 would ignore it: remove it"]
