"""Loading a sweep spec: YAML in, a validated `SweepSpec` (progprune.config) out.

`load_spec` raises one `SpecError` listing every problem as data (field path + message:
`finetune.epochs: must be an integer in [0, 10000], got -1`), so a typo fails at submit
time instead of an hour into a job. The schema itself lives in `progprune.config`; here
are what a schema cannot know: YAML 1.2 scalars and duplicate keys, the registries
(models, methods, datasets), paths relative to the spec file, and did-you-mean hints.
"""
from __future__ import annotations

import os
import re
import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from progprune.config import DatasetConfig, SweepSpec
from progprune.errors import Problem, ProgpruneError, SpecError, closest_names

_SCHEMES = ("file", "s3", "gs")
_TAG = re.compile(r"^(function|lax|strict|json|chain|tagged)[a-z-]*\[")  # pydantic's, not a field


def load_spec(path, *, output_override: str | None = None, check_paths: bool = True) -> SweepSpec:
    """Read and validate a spec file. Relative checkpoint and data paths resolve against
    the file's directory. `check_paths=False` skips filesystem checks only."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            data = parse_yaml(f.read())
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError([f"cannot read spec: {e}"], source=source) from None
    except SpecError as e:
        raise SpecError(e.issues, source=source) from None
    if output_override is not None and isinstance(data, dict):
        data = {**data, "output": output_override}
    return load_spec_dict(data, source, check_paths=check_paths,
                          base_dir=os.path.dirname(os.path.abspath(source)))


def load_spec_dict(data: Any, source: str = "<spec>", *, check_paths: bool = True,
                   base_dir: str | None = None) -> SweepSpec:
    """Validate parsed spec data; relative paths resolve against `base_dir` (default: cwd)."""
    if data is None:
        raise SpecError(["spec is empty"], source=source)
    if not isinstance(data, dict):
        raise SpecError([f"spec must be a mapping of fields, got {_show(data)}"], source)
    base_dir = base_dir or os.getcwd()
    data = _resolve_paths(data, base_dir)
    problems: list[Problem] = []
    spec = None
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        problems += [_problem(err) for err in e.errors()]
    problems += _registry_problems(data, check_paths)
    if isinstance(data.get("output"), str):
        problems += _output_problems(data["output"])
    if spec is not None:
        problems += _sparse_problems(spec)
    if spec is not None and check_paths:
        spec, bad = _hash_checkpoints(spec)
        problems += bad
    if problems:
        raise SpecError(_dedupe(problems), source=source)
    return _resolve_defaults(spec)


def _hash_checkpoints(spec: SweepSpec) -> tuple[SweepSpec, list[Problem]]:
    """Key base checkpoints by content: new weights under an old file name are new work."""
    import hashlib

    models, problems = [], []
    for i, m in enumerate(spec.models):
        if m.checkpoint and os.path.isfile(m.checkpoint):
            h = hashlib.sha256()
            with open(m.checkpoint, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            if m.sha256 and m.sha256 != h.hexdigest():
                problems.append(Problem(f"models[{i}].sha256", f"{m.checkpoint} has content "
                                        f"{h.hexdigest()}, not {m.sha256}; the file changed"))
            m = m.model_copy(update={"sha256": h.hexdigest()})
        models.append(m)
    return spec.model_copy(update={"models": tuple(models)}), problems


def parse_yaml(text: str):
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (_Loader is a SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = " ".join(str(p) for p in (e.context, e.problem) if p)
        raise SpecError([f"YAML syntax error at {where}{what}"]) from None
    except (yaml.YAMLError, RecursionError) as e:
        raise SpecError([f"YAML syntax error: {e}"]) from None


def dump_yaml(spec: SweepSpec) -> str:
    return yaml.safe_dump(spec.to_dict(), sort_keys=False)


# ---- what the schema cannot know ---------------------------------------------------------
def _resolve_paths(data: dict, base_dir: str) -> dict:
    """data_dir and checkpoints relative to the spec file (strings only; the schema judges
    the rest)."""
    def absolute(p):
        return os.path.normpath(os.path.join(base_dir, os.path.expanduser(p))) if _text(p) else p

    data = dict(data)
    ds = data.get("dataset")
    if isinstance(ds, dict) and "data_dir" in ds:
        data["dataset"] = {**ds, "data_dir": absolute(ds["data_dir"])}
    models = data.get("models")
    if isinstance(models, list):
        data["models"] = [{**m, "checkpoint": absolute(m["checkpoint"])}
                          if isinstance(m, dict) and "checkpoint" in m else m for m in models]
    return data


def _registry_problems(data: dict, check_paths: bool) -> list[Problem]:
    from progprune.data import check_dataset
    from progprune.models import name_problems
    from progprune.pruning import list_methods

    out = []
    models = data.get("models")
    for i, m in enumerate(models if isinstance(models, list) else [models]):
        where = f"models[{i}]" if isinstance(models, list) else "models"
        if isinstance(m, dict):
            m, where = m.get("name"), f"{where}.name"
            ckpt = (models[i] if isinstance(models, list) else {}).get("checkpoint")
            if check_paths and _text(ckpt) and not os.path.isfile(ckpt):
                out.append(Problem(where.replace(".name", ".checkpoint"), f"file not found: {ckpt}"))
        if _text(m):
            out += name_problems(where, m)
    methods = data.get("methods")
    for i, m in enumerate(methods if isinstance(methods, list) else [methods]):
        where = f"methods[{i}]" if isinstance(methods, list) else "methods"
        if isinstance(m, dict):
            m, where = m.get("name"), f"{where}.name"
        if _text(m):
            out += _unknown_name(where, m, list_methods(), "method")
    try:
        raw = data.get("dataset", {})
        ds = DatasetConfig.model_validate({"name": raw} if isinstance(raw, str) else raw)
    except (ValidationError, TypeError, ValueError):
        return out  # the schema already reported it
    try:
        check_dataset(ds)
    except (ProgpruneError, OSError) as e:
        field = getattr(e, "field", None) or "dataset"
        # check_paths=False: the data lives on the cluster, not here
        if check_paths or not (ds.data_dir and field == "dataset.data_dir"):
            out.append(Problem(field, getattr(e, "message", None) or str(e)))
    return out


def _sparse_problems(spec: SweepSpec) -> list[Problem]:
    """Per-method settings only where a method learns sparsity; and a regularised method
    with no sparse learning is another method under its name."""
    from progprune.config import method_overrides
    from progprune.pruning import METHODS

    out, unregularised = [], []
    for i, entry in enumerate(spec.methods):
        m, own = METHODS.get(entry.name), method_overrides(entry)
        if m is None:
            continue
        if not m.sparse:
            if own:
                out.append(Problem(f"methods[{i}]", f"{entry.name} has no sparse learning, so "
                                   f"{', '.join(own)} would change nothing; remove them"))
            continue
        sl = spec.sparse_learning_of(entry)
        if sl.epochs == 0 and not sl.allow_zero_epochs:
            unregularised.append((i, entry.name, "epochs" in own))
    if unregularised:
        where = {f"methods[{i}].epochs" if own else "sparse_learning.epochs" for i, _, own in unregularised}
        names = ", ".join(n for _, n, _ in unregularised)
        out.append(Problem(", ".join(sorted(where)), f"{names} need sparse learning: set the "
                           "epochs > 0 (the reference recipes use 100), or set allow_zero_epochs: "
                           "true (--allow-zero-sl-epochs) to run them unregularised (their rows "
                           "then read '<method>-nosl')"))
    return out


def _unknown_name(path: str, name: str, valid: list[str], kind: str) -> list[Problem]:
    if name in valid:
        return []
    close = _closest(name, valid)
    hint = f"did you mean {close!r}? " if close else ""
    return [Problem(path, f"unknown {kind} {name!r}; {hint}valid: {', '.join(valid)}")]


def _output_problems(v: str | None) -> list[Problem]:
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", v or "")
    if not m:
        return []
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme not in _SCHEMES:
        return [Problem("output", f"unsupported scheme {scheme!r}; use a local path, file://, "
                                  "s3:// or gs://")]
    if scheme != "file" and not rest.split("/")[0]:
        return [Problem("output", f"{scheme}:// needs a bucket, got {_show(v)}")]
    return []


def _resolve_defaults(spec: SweepSpec) -> SweepSpec:
    """Defaults that depend on other settings, filled so the resolved spec states them."""
    aug = spec.dataset.name != "digits"  # flips and crops turn 8x8 digits into other glyphs
    update = {"output": spec.output or f"./runs/{spec.name}"}
    for section in ("base_training", "finetune"):
        node = getattr(spec, section)
        if node.augment is None:
            update[section] = node.model_copy(update={"augment": aug})
    return spec.model_copy(update=update)


# ---- pydantic's errors as our messages ------------------------------------------------------
def _problem(err: dict) -> Problem:
    loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and _TAG.match(x)))
    path = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".")
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _node_at(loc[:-1])
        valid = list(parent.model_fields) if parent else []
        if path == "pruning.method":
            return Problem(path, "unknown field; list methods in the top-level 'methods'")
        close = _closest(str(loc[-1]), valid)
        hint = f"did you mean {close!r}?" if close else f"valid: {', '.join(valid)}"
        return Problem(path, f"unknown field; {hint}")
    if kind == "missing":
        return Problem(path, "required field missing")
    if kind == "progprune":
        plain = "duplicate" in err["msg"] or "empty" in err["msg"] or isinstance(err["input"], dict)
        got = "" if plain else f", got {_show(err['input'])}"
        return Problem(path, err["msg"] + got)
    return Problem(path, f"must be {_describe(loc)}, got {_show(err['input'])}")


def _describe(loc: tuple) -> str:
    """The words a field's declaration carries (`description`), found by walking the
    schema along the error's location."""
    t, desc = SweepSpec, "valid"
    for key in loc:
        if isinstance(t, type) and issubclass(t, BaseModel) and isinstance(key, str):
            info = t.model_fields.get(key)
            if info is None:
                return desc
            t, desc = info.annotation, info.description or desc
        elif isinstance(key, int) and typing.get_origin(t) is tuple:
            t = typing.get_args(t)[0]
            meta = [m for m in getattr(t, "__metadata__", ()) if getattr(m, "description", None)]
            desc = meta[0].description if meta else desc
        else:
            return desc
        t = _unwrap(t)
    if isinstance(t, type) and issubclass(t, BaseModel) and desc == "valid":
        return "a mapping"
    if typing.get_origin(t) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(t)))
    return desc


def _unwrap(t):
    while True:
        if typing.get_origin(t) is typing.Annotated:
            t = typing.get_args(t)[0]
        elif typing.get_origin(t) in (typing.Union, types.UnionType):
            t = next(a for a in typing.get_args(t) if a is not type(None))
        else:
            return t


def _node_at(loc: tuple):
    t = SweepSpec
    for key in loc:
        if isinstance(key, int) and typing.get_origin(t) is tuple:
            t = _unwrap(typing.get_args(t)[0])
        elif isinstance(t, type) and issubclass(t, BaseModel) and key in t.model_fields:
            t = _unwrap(t.model_fields[key].annotation)
        else:
            return None
    return t if isinstance(t, type) and issubclass(t, BaseModel) else None


def _dedupe(problems: list[Problem]) -> list[Problem]:
    return list(dict.fromkeys(problems))


def _text(v) -> bool:
    return isinstance(v, str) and bool(v.strip())


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _closest(word: str, options) -> str | None:
    close = closest_names(word, options)
    return close[0] if close else None


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: `5e-4` is a float (PyYAML's 1.1 resolver reads it
    as a string), only true/false are booleans (`yes`, `no`, `on`, `off` stay strings and
    are then refused), and a key given twice is an error instead of silently last-wins."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping", node.start_mark,
                            f"duplicate key {key!r}", key_node.start_mark)
                    seen.add(key)
                except TypeError:  # unhashable key: the base class reports it
                    pass
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers
         if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                              re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))
