"""Loading a sweep spec: YAML in, a validated `SweepSpec` (progprune.config) out.

`load_spec` raises one `SpecError` listing every problem as a field path and what to change
(`finetune.epochs: must be an integer in [0, 10000], got -1`). The schema words its own
errors; here is what it cannot know: the registries, files, paths relative to the spec. The
spec it returns is resolved: defaults that depend on other settings or on a registry (each
method's recipe) are filled, so the resolved spec states them.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

from pydantic import ValidationError

from progprune._files import not_a_regular_file
from progprune import _yaml
from progprune._yaml import parse_yaml
from progprune.config import DatasetConfig, SweepSpec, method_overrides, scratch_overrides
from progprune.errors import BadInput, Problem, ProgpruneError, SpecError, show
from progprune.fields import problems_of


def load_spec(path, *, output_override: str | None = None, check_paths: bool = True,
              overrides: dict | None = None) -> SweepSpec:
    """Read and validate a spec file. Relative checkpoint and data paths resolve against
    the file's directory. `check_paths=False` skips filesystem checks only. `overrides`
    ({"evaluation": {"runtime": ...}}, the sweep's flags) are set over the file's sections."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            data = parse_yaml(f.read(), source)
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError([f"cannot read spec: {e}"], source=source) from None
    if output_override is not None and isinstance(data, dict):
        data = {**data, "output": output_override}
    for head, fields in (overrides or {}).items() if isinstance(data, dict) else ():
        section = data.get(head)
        data = {**data, head: {**(section if isinstance(section, dict) else {}), **fields}}
    return load_spec_dict(data, source, check_paths=check_paths,
                          base_dir=os.path.dirname(os.path.abspath(source)))


def load_spec_dict(data: Any, source: str = "<spec>", *, check_paths: bool = True,
                   base_dir: str | None = None) -> SweepSpec:
    """Validate parsed spec data; relative paths resolve against `base_dir` (default: cwd)."""
    if data is None:
        raise SpecError(["spec is empty"], source=source)
    if not isinstance(data, dict):
        raise SpecError([f"spec must be a mapping of fields, got {show(data)}"], source)
    data, problems = _files(data, base_dir or os.getcwd(), check_paths)
    spec = None
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        problems += [Problem(p.path, "unknown field; list methods in the top-level 'methods'")
                     if p.path == "pruning.method" else p for p in problems_of(e, SweepSpec)]
    problems += _registry_problems(data, check_paths)
    if spec is not None:
        problems += _sparse_problems(spec) + _runtime_problems(spec) + _control_problems(spec) + _task_problems(spec)
    if problems:
        raise SpecError(list(dict.fromkeys(problems)), source=source)
    return _resolve_defaults(spec)


def dump_yaml(spec: SweepSpec) -> str:
    """The spec as YAML that `load_spec` (YAML 1.2) and YAML 1.1 readers read back the same."""
    return _yaml.dump_yaml(spec.to_dict())


# ---- what the schema cannot know ---------------------------------------------------------
def _files(data: dict, base_dir: str, check: bool) -> tuple[dict, list[Problem]]:
    """data_dir and checkpoints resolve against the spec's directory. With `check`, each
    checkpoint must exist and is keyed by its content (sha256): new weights under an old
    file name are new work, and a pinned sha256 the file no longer has is refused."""
    def absolute(p):
        return os.path.normpath(os.path.join(base_dir, os.path.expanduser(p))) if _text(p) else p

    data, problems = dict(data), []
    ds = data.get("dataset")
    if isinstance(ds, dict) and "data_dir" in ds:
        data["dataset"] = {**ds, "data_dir": absolute(ds["data_dir"])}
    def hf_absolute(name):  # hf:PATH resolves like a checkpoint (hf:org/name stays as written)
        if not (_text(name) and name.startswith("hf:")):
            return name
        path = name[3:]
        return "hf:" + absolute(path) if path.startswith((".", "/", "~")) or os.path.isdir(
            os.path.join(base_dir, path)) else name

    if isinstance(data.get("models"), str):
        data["models"] = hf_absolute(data["models"])
    if isinstance(data.get("models"), list):
        data["models"] = models = [{**m, "name": hf_absolute(m.get("name"))} if isinstance(m, dict) and "name" in m
                                   else dict(m) if isinstance(m, dict) else hf_absolute(m) for m in data["models"]]
        for i, m in enumerate(models):
            if not (isinstance(m, dict) and "checkpoint" in m):
                continue
            ckpt = m["checkpoint"] = absolute(m["checkpoint"])
            if not (check and _text(ckpt)):
                continue
            what = not_a_regular_file(ckpt)
            if what:
                problems.append(Problem(f"models[{i}].checkpoint", f"file not found: {ckpt}" if what == "not found"
                                        else f"{ckpt} is {what}; give the checkpoint file"))
                continue
            with open(ckpt, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            pinned = m.get("sha256")
            if _text(pinned) and pinned != digest:
                problems.append(Problem(f"models[{i}].sha256", f"{ckpt} has content {digest}, "
                                        f"not {pinned}; the file changed"))
            if pinned is None or _text(pinned):
                m["sha256"] = digest
    return data, problems


def _registry_problems(data: dict, check_paths: bool) -> list[Problem]:
    """Model, method and data set names, judged as written so that they are reported
    together with the schema's problems."""
    from progprune.data import check_dataset
    from progprune.models import name_problems
    from progprune.pruning import get_method

    out = [p for where, name in _names(data, "models") if not name.startswith("hf:")
           for p in name_problems(where, name)]
    if check_paths:
        out += [Problem(where, e.message) for where, name in _names(data, "models") if name.startswith("hf:")
                for e in _hf_problem(name)]
    for where, name in _names(data, "methods"):
        try:
            get_method(name)
        except BadInput as e:
            out.append(Problem(where, e.message))
    try:
        raw = data.get("dataset", {})
        ds = DatasetConfig.model_validate({"name": raw} if isinstance(raw, str) else raw)
    except ValidationError:
        return out  # the schema reported it
    try:
        check_dataset(ds, files=check_paths)  # check_paths=False: the data lives on the cluster, not here
    except (ProgpruneError, OSError) as e:
        out.append(Problem(getattr(e, "field", None) or "dataset", getattr(e, "message", None) or str(e)))
    return out


def _hf_problem(name: str) -> list:
    from progprune.lm.models import local_dir

    try:
        local_dir(name, download=False)  # hf:org/name not cached here: the workers fetch it
    except BadInput as e:
        return [e]
    return []


def _names(data: dict, key: str):
    """(path, name) of each entry of a grid of names or {name: ...} mappings, as written."""
    grid = data.get(key)
    for i, entry in enumerate(grid if isinstance(grid, list) else [grid]):
        where = f"{key}[{i}]" if isinstance(grid, list) else key
        if isinstance(entry, dict):
            entry, where = entry.get("name"), f"{where}.name"
        if _text(entry):
            yield where, entry


def _sparse_problems(spec: SweepSpec) -> list[Problem]:
    """Per-method settings only where a method learns sparsity; and a regularised method
    with no sparse learning is another method under its name."""
    from progprune.pruning import METHODS, get_method

    out, unregularised = [], []
    for i, entry in enumerate(spec.methods):
        if entry.name not in METHODS:
            continue  # reported as unknown
        m, own = get_method(entry.name), method_overrides(entry)
        if entry.sparse is not None and entry.sparse != m.sparse:
            out.append(Problem(f"methods[{i}].sparse", f"{entry.name} learns {'' if m.sparse else 'no '}"
                               "sparsity; remove the setting (the method registry fills it)"))
        # one problem per setting, at its own path: `prune` names the flag that set it
        if not m.sparse:
            out += [Problem(f"methods[{i}].{k}", f"{entry.name} has no sparse learning, so its "
                            f"{k} would change nothing; remove it") for k in own]
        elif "delta_reg" in own and "delta_reg" not in m.sparse_defaults:
            out.append(Problem(f"methods[{i}].delta_reg", f"{entry.name} does not grow its "
                               "regularization, so its delta_reg would change nothing; remove it"))
        if m.sparse:
            sl = spec.sparse_learning_of(entry)
            if sl.epochs == 0 and not sl.allow_zero_epochs:
                unregularised.append((f"methods[{i}].epochs" if "epochs" in own
                                      else "sparse_learning.epochs", entry.name))
    if unregularised:
        out.append(Problem(", ".join(sorted({w for w, _ in unregularised})),
                           f"{', '.join(n for _, n in unregularised)} need sparse learning: set "
                           "the epochs > 0 (the reference recipes use 100), or set "
                           "allow_zero_epochs: true (--allow-zero-sl-epochs) to run them "
                           "unregularised (their rows then read '<method>-nosl')"))
    return out


def _control_problems(spec: SweepSpec) -> list[Problem]:
    """Controls that can mean something: a random control beside a method named random would
    be the same run twice; the scratch control needs a training length it can state."""
    out = []
    if "random" in spec.controls:
        out += [Problem(f"methods[{i}]", "random is the random control (controls: [random]) too; remove it "
                        "from methods: the control's rows are random's, marked control: random")
                for i, m in enumerate(spec.methods) if m.name == "random"]
    own = scratch_overrides(spec.scratch)
    if "scratch" not in spec.controls:
        return out + [Problem(f"scratch.{k}", "there is no scratch control (controls: [scratch]), so this "
                              "would change nothing; remove it or add the control") for k in own]
    if "epochs" not in own:
        ckpt = [i for i, m in enumerate(spec.models) if m.checkpoint]
        if ckpt:
            return out + [Problem("scratch.epochs", f"models[{ckpt[0]}] starts from a checkpoint, whose "
                                  "training progprune does not know; set scratch.epochs (--scratch-epochs) "
                                  "to the epochs the scratch control trains for")]
    epochs = spec.scratch_training().epochs
    if epochs == 0:
        what = "scratch.epochs is 0" if "epochs" in own else (
            "base_training.epochs + finetune.epochs is 0, the scratch control's default")
        out.append(Problem("scratch.epochs", f"{what}: a model trained from scratch for no epochs is "
                           "its random initialisation; set scratch.epochs (--scratch-epochs) to at least 1"))
    return out


def _task_problems(spec: SweepSpec) -> list[Problem]:
    """What the spec's task cannot run (an image model in an LM sweep, and the reverse)."""
    from progprune.tasks import get_task
    from progprune.tasks.causal_lm import image_only_problems

    task = get_task(spec.task)
    return task.spec_problems(spec) if hasattr(task, "spec_problems") else image_only_problems(spec)


def _runtime_problems(spec: SweepSpec, device=None) -> list[Problem]:
    """The runtime and exports can run here: their packages installed, the precision one the
    runtime runs (and, with `device`, one it runs on that device)."""
    from progprune.export import check_format
    from progprune.runtimes import get_runtime

    out = []
    try:
        get_runtime(spec.evaluation.runtime).check(device, spec.evaluation.precision)
    except BadInput as e:
        out.append(Problem(e.field or "evaluation.runtime", e.message))
    for fmt in spec.export:
        try:
            check_format(fmt, field="export")
        except BadInput as e:
            out.append(Problem("export", e.message))
    return out


def check_runtime(spec: SweepSpec, device) -> None:
    """SpecError unless the spec's runtime and precision run on `device` (a sweep: its task's
    kind of device, cuda where resources.gpus_per_task > 0; prune: this process's)."""
    problems = _runtime_problems(spec, device)
    if problems:
        raise SpecError(problems)


def _resolve_defaults(spec: SweepSpec) -> SweepSpec:
    """Defaults that depend on other settings or a registry, filled so the resolved spec
    states them: each method says whether it learns sparsity and carries its recipe's
    values (slim's reg, ...) where neither it nor `sparse_learning:` sets them."""
    aug = spec.dataset.name not in ("digits", "text")  # flips and crops turn 8x8 digits into other glyphs
    update = {"output": spec.output or f"./runs/{spec.name}",
              "methods": tuple(_with_recipe(spec, entry) for entry in spec.methods)}
    for section in ("base_training", "finetune"):
        node = getattr(spec, section)
        if node.augment is None:
            update[section] = node.model_copy(update={"augment": aug})
    spec = spec.model_copy(update=update)
    if "scratch" in spec.controls and spec.scratch.epochs is None:  # stated: base + fine-tune epochs
        spec = spec.model_copy(update={"scratch": spec.scratch.model_copy(
            update={"epochs": spec.scratch_training().epochs})})
    return spec


def _with_recipe(spec: SweepSpec, entry):
    from progprune.pruning import get_method

    m = get_method(entry.name)
    sl = spec.sparse_learning_of(entry)
    recipe = {k: v for k, v in m.sparse_defaults.items() if getattr(sl, k) is None} if m.sparse else {}
    return entry.model_copy(update={"sparse": m.sparse, **recipe})


def _text(v) -> bool:
    return isinstance(v, str) and bool(v.strip())
