"""The sweep spec: one YAML file naming models x target speedups x methods x seeds.

`load_spec` turns the YAML into a tree of frozen dataclasses, or raises one `SpecError`
listing every problem by field path (`finetune.epochs: must be an integer >= 0, got -1`),
so a typo fails at submit time instead of an hour into a job. `SweepSpec.combinations()`
expands the grid into the `ComboConfig`s the pipeline runs; `SweepSpec.to_dict()` is the
resolved spec (every default filled) that is written next to the results and loads again.
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from progprune.config import (
    ComboConfig,
    DatasetConfig,
    PruneConfig,
    SparseConfig,
    TrainConfig,
)
from progprune.errors import ProgpruneError, SpecError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    checkpoint: str | None = None  # absolute after loading; None -> train the base model


@dataclass(frozen=True)
class FinetuneSpec:
    train: TrainConfig
    num_workers: int = 1  # Ray Train workers; 0 = train in-process inside the task
    use_gpu: bool = False
    max_failures: int = 1  # Ray Train FailureConfig: worker restarts before giving up


@dataclass(frozen=True)
class Resources:
    gpus_per_task: float = 0.0
    cpus_per_task: float = 1.0
    max_concurrent: int = 4  # bounds concurrent Train runs (each costs head memory)


@dataclass(frozen=True)
class SweepSpec:
    name: str
    dataset: DatasetConfig
    models: tuple[ModelEntry, ...]
    speedups: tuple[float, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    base_training: TrainConfig
    sparse_learning: SparseConfig
    pruning: PruneConfig  # method is a placeholder; each combination sets its own
    finetune: FinetuneSpec
    latency_batch_size: int
    latency_repeats: int
    resources: Resources
    output: str  # local path (relative to the working directory), file://, s3://, gs://

    def combinations(self) -> list[ComboConfig]:
        """models x speedups x methods x seeds, in that nesting order (last varies fastest)."""
        return [
            ComboConfig(
                model=m.name,
                dataset=self.dataset,
                target_speedup=s,
                prune=dataclasses.replace(self.pruning, method=meth),
                seed=seed,
                base=self.base_training,
                base_checkpoint=m.checkpoint,
                sparse=self.sparse_learning,
                finetune=self.finetune.train,
                latency_batch_size=self.latency_batch_size,
                latency_repeats=self.latency_repeats,
                sweep=self.name,
            )
            for m, s, meth, seed in itertools.product(
                self.models, self.speedups, self.methods, self.seeds
            )
        ]

    def to_dict(self) -> dict:
        """The resolved spec as plain YAML-safe data; `load_spec_dict` accepts it again."""
        pruning = dataclasses.asdict(self.pruning)
        pruning.pop("method")
        ft = self.finetune
        return _plain(
            {
                "name": self.name,
                "dataset": dataclasses.asdict(self.dataset),
                "models": [dataclasses.asdict(m) for m in self.models],
                "speedups": self.speedups,
                "methods": self.methods,
                "seeds": self.seeds,
                "base_training": dataclasses.asdict(self.base_training),
                "sparse_learning": dataclasses.asdict(self.sparse_learning),
                "pruning": pruning,
                "finetune": {
                    **dataclasses.asdict(ft.train),
                    "num_workers": ft.num_workers,
                    "use_gpu": ft.use_gpu,
                    "max_failures": ft.max_failures,
                },
                "evaluation": {
                    "latency_batch_size": self.latency_batch_size,
                    "latency_repeats": self.latency_repeats,
                },
                "resources": dataclasses.asdict(self.resources),
                "output": self.output,
            }
        )


def _plain(obj):
    # yaml.safe_dump refuses tuples
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ---- loading -------------------------------------------------------------------------
def load_spec(
    path, *, output_override: str | None = None, check_paths: bool = True
) -> SweepSpec:
    """Read and validate a spec file. Relative checkpoint and data paths resolve against
    the file's directory. `check_paths=False` skips filesystem checks only."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError([f"cannot read spec: {e}"], source=source) from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (_Loader is a SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = " ".join(str(p) for p in (e.context, e.problem) if p)
        raise SpecError([f"YAML syntax error at {where}{what}"], source=source) from None
    except (yaml.YAMLError, RecursionError) as e:
        raise SpecError([f"YAML syntax error: {e}"], source=source) from None
    if output_override is not None and isinstance(data, dict):
        data = {**data, "output": output_override}
    return load_spec_dict(
        data,
        source,
        check_paths=check_paths,
        base_dir=os.path.dirname(os.path.abspath(source)),
    )


def load_spec_dict(
    data: Any,
    source: str = "<spec>",
    *,
    check_paths: bool = True,
    base_dir: str | None = None,
) -> SweepSpec:
    """Validate already-parsed spec data; relative paths resolve against `base_dir`
    (default: the working directory)."""
    if data is None:
        raise SpecError(["spec is empty"], source=source)
    if not isinstance(data, dict):
        raise SpecError([f"spec must be a mapping of fields, got {_show(data)}"], source)
    v = _Validator(base_dir or os.getcwd(), check_paths)
    spec = v.spec(data)
    if v.problems:
        raise SpecError(v.problems, source=source)
    return spec


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
                            f"duplicate key {key!r}", key_node.start_mark,
                        )
                    seen.add(key)
                except TypeError:  # unhashable key: the base class reports it
                    pass
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in (
        "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


# ---- field checks: each returns the converted value or raises _Bad(message) ---------
class _Bad(Exception):
    pass


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(lo: int) -> Callable:
    def check(v):
        if not _is_int(v) or v < lo:
            raise _Bad(f"must be an integer >= {lo}, got {_show(v)}")
        return v

    return check


def _num(desc: str, ok: Callable[[float], bool]) -> Callable:
    def check(v):
        try:
            good = (_is_int(v) or isinstance(v, float)) and math.isfinite(v) and ok(v)
        except OverflowError:  # an int too large for a float
            good = False
        if not good:
            raise _Bad(f"must be a number {desc}, got {_show(v)}")
        return float(v)

    return check


def _bool(v):
    if not isinstance(v, bool):
        raise _Bad(f"must be true or false, got {_show(v)}")
    return v


def _choice(*options) -> Callable:
    def check(v):
        if v not in options or not isinstance(v, str):
            raise _Bad(f"must be one of {', '.join(options)}, got {_show(v)}")
        return v

    return check


def _optional(check: Callable) -> Callable:
    def opt(v):
        if v is None:
            return None
        try:
            return check(v)
        except _Bad as e:
            raise _Bad(f"{e} (or null)") from None

    return opt


def _str(v):
    if not isinstance(v, str) or not v.strip():
        raise _Bad(f"must be a non-empty string, got {_show(v)}")
    return v


def _milestones(v):
    if not (
        isinstance(v, list)
        and all(_is_int(m) and m >= 1 for m in v)
        and all(a < b for a, b in zip(v, v[1:]))
    ):
        raise _Bad(f"must be a list of increasing integers >= 1, got {_show(v)}")
    return tuple(v)


_POSITIVE = _num("> 0", lambda x: x > 0)
_NONNEG = _num(">= 0", lambda x: x >= 0)

_TRAIN = {
    "epochs": _int(0),
    "lr": _POSITIVE,
    "momentum": _num("in [0, 1)", lambda x: 0 <= x < 1),
    "weight_decay": _NONNEG,
    "batch_size": _int(1),
    "schedule": _choice("cosine", "multistep"),
    "milestones": _milestones,
    "gamma": _POSITIVE,
    "augment": _bool,
}
_SPARSE = {
    "epochs": _int(0),
    "lr": _POSITIVE,
    "reg": _NONNEG,
    "delta_reg": _NONNEG,
    "batch_size": _int(1),
    "milestones": _milestones,
}
_PRUNE = {
    "global_pruning": _bool,
    "iterative_steps": _int(1),
    "max_pruning_ratio": _num("in (0, 1]", lambda x: 0 < x <= 1),
    "round_to": _optional(_int(1)),
    "tolerance": _NONNEG,
}
_FINETUNE = {**_TRAIN, "num_workers": _int(0), "use_gpu": _bool, "max_failures": _int(0)}
_FINETUNE_DEFAULTS = {
    **dataclasses.asdict(TrainConfig(epochs=0, lr=0.01)),
    "num_workers": 1,
    "use_gpu": False,
    "max_failures": 1,
}
_EVALUATION = {"latency_batch_size": _int(1), "latency_repeats": _int(1)}
_RESOURCES = {"gpus_per_task": _NONNEG, "cpus_per_task": _NONNEG, "max_concurrent": _int(1)}
_DATASET = {
    "name": _str,
    "data_dir": _optional(_str),
    "num_classes": _optional(_int(1)),
    "image_size": _int(1),
    "synthetic_samples": _int(1),
}
_TOP = (
    "name", "dataset", "models", "speedups", "methods", "seeds", "base_training",
    "sparse_learning", "pruning", "finetune", "evaluation", "resources", "output",
)
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_SCHEMES = ("file", "s3", "gs")


def _closest(word: str, options) -> str | None:
    """difflib's best match; ties go to the longer common prefix (resnet21 -> resnet20)."""
    close = difflib.get_close_matches(word, list(options), n=5)
    if not close:
        return None
    best = difflib.SequenceMatcher(None, word, close[0]).ratio()
    ties = [c for c in close if difflib.SequenceMatcher(None, word, c).ratio() == best]
    return max(ties, key=lambda c: len(os.path.commonprefix([word, c])))


def _unknown(key, valid) -> str:
    close = _closest(str(key), valid)
    if close:
        return f"unknown field; did you mean {close!r}?"
    return f"unknown field; valid: {', '.join(valid)}"


class _Validator:
    def __init__(self, base_dir: str, check_paths: bool):
        self.base_dir = base_dir
        self.check_paths = check_paths
        self.problems: list[str] = []

    def bad(self, path: str, msg: str) -> None:
        self.problems.append(f"{path}: {msg}")

    def path(self, p: str) -> str:
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(p)))

    def section(self, data, path: str, schema: dict, defaults: dict) -> dict:
        """Fields of one mapping; a bad field keeps its default so loading can go on."""
        out = dict(defaults)
        if data is None:
            return out
        if not isinstance(data, dict):
            self.bad(path, f"must be a mapping, got {_show(data)}")
            return out
        for key, value in data.items():
            if key not in schema:
                hint = _unknown(key, schema)
                if path == "pruning" and key == "method":
                    hint = "unknown field; list methods in the top-level 'methods'"
                self.bad(f"{path}.{key}", hint)
                continue
            try:
                out[key] = schema[key](value)
            except _Bad as e:
                self.bad(f"{path}.{key}", str(e))
        return out

    def grid(self, data, path: str, item: Callable, what: str) -> tuple:
        """A list (or one scalar) of distinct valid items; never empty."""
        if not isinstance(data, list):
            try:
                return (item(data),)
            except _Bad:
                self.bad(path, f"must be a list of {what}, got {_show(data)}")
                return ()
        if not data:
            self.bad(path, f"must not be empty; give a list of {what}")
        out = []
        for i, v in enumerate(data):
            try:
                out.append(item(v))
            except _Bad as e:
                self.bad(f"{path}[{i}]", str(e))
        return tuple(out)

    def unique(self, path: str, items, key=lambda x: x) -> None:
        seen = set()
        for x in items:
            if key(x) in seen:
                self.bad(path, f"duplicate entry {_show(key(x))}")
            seen.add(key(x))

    def known(self, path: str, names, valid: list[str], kind: str) -> None:
        """Registry names; `path` is formatted with the item's index."""
        for i, n in enumerate(names):
            if n not in valid and not (kind == "model" and n.startswith("tv:") and len(n) > 3):
                close = _closest(n, valid)
                hint = f"did you mean {close!r}? " if close else ""
                self.bad(path.format(i), f"unknown {kind} {n!r}; {hint}valid: {', '.join(valid)}")

    # ---- sections ------------------------------------------------------------------
    def spec(self, d: dict) -> SweepSpec:
        for key in d:
            if key not in _TOP:
                self.bad(str(key), _unknown(key, _TOP))
        for key in ("name", "models", "speedups"):
            if key not in d:
                self.bad(key, "required field missing")
        name = self.name(d.get("name"))
        models = self.models(d.get("models", []))
        speedups = self.grid(d.get("speedups", []), "speedups",
                             _num("> 1", lambda x: x > 1), "numbers > 1")
        self.unique("speedups", speedups)
        methods = self.grid(d.get("methods", ["group_norm"]), "methods", _str, "method names")
        self.unique("methods", methods)
        from progprune.pruning import list_methods  # lazy: torch + torch-pruning

        self.known("methods[{}]", methods, list_methods(), "method")
        seeds = self.grid(d.get("seeds", [0]), "seeds", _int(0), "integers >= 0")
        self.unique("seeds", seeds)
        ft = self.section(d.get("finetune"), "finetune", _FINETUNE, _FINETUNE_DEFAULTS)
        ev = self.section(d.get("evaluation"), "evaluation", _EVALUATION,
                          {"latency_batch_size": 1, "latency_repeats": 20})
        res = self.section(d.get("resources"), "resources", _RESOURCES,
                           dataclasses.asdict(Resources()))
        prune = self.section(d.get("pruning"), "pruning", _PRUNE,
                             dataclasses.asdict(PruneConfig()))
        return SweepSpec(
            name=name,
            dataset=self.dataset(d.get("dataset")),
            models=models,
            speedups=speedups,
            methods=methods,
            seeds=seeds,
            base_training=TrainConfig(**self.section(
                d.get("base_training"), "base_training", _TRAIN,
                dataclasses.asdict(TrainConfig()))),
            sparse_learning=SparseConfig(**self.section(
                d.get("sparse_learning"), "sparse_learning", _SPARSE,
                dataclasses.asdict(SparseConfig()))),
            pruning=PruneConfig(**prune),
            finetune=FinetuneSpec(
                train=TrainConfig(**{k: ft[k] for k in _TRAIN}),
                num_workers=ft["num_workers"],
                use_gpu=ft["use_gpu"],
                max_failures=ft["max_failures"],
            ),
            latency_batch_size=ev["latency_batch_size"],
            latency_repeats=ev["latency_repeats"],
            resources=Resources(**res),
            output=self.output(d.get("output", f"./runs/{name}")),
        )

    def name(self, v) -> str:
        if v is None:
            return "sweep"
        if not isinstance(v, str) or not _NAME.fullmatch(v):
            self.bad("name", f"must match [a-z0-9][a-z0-9_.-]* (it is used in paths), "
                             f"got {_show(v)}")
            return "sweep"
        return v

    def models(self, data) -> tuple[ModelEntry, ...]:
        def entry(v):
            if isinstance(v, str) and v.strip():
                return ModelEntry(v)
            if isinstance(v, dict):
                return v  # validated below with its own field paths
            raise _Bad(f"must be a model name or a mapping with name, checkpoint, "
                       f"got {_show(v)}")

        raw = self.grid(data, "models", entry, "model names or {name, checkpoint} mappings")
        out, paths = [], []
        for i, v in enumerate(raw):
            if isinstance(v, ModelEntry):
                out.append(v)
                paths.append(f"models[{i}]")
                continue
            f = self.section(v, f"models[{i}]", {"name": _str, "checkpoint": _optional(_str)},
                             {"name": None, "checkpoint": None})
            if f["name"] is None:
                if "name" not in v:
                    self.bad(f"models[{i}].name", "required field missing")
                continue
            ckpt = f["checkpoint"]
            if ckpt is not None:
                ckpt = self.path(ckpt)
                if self.check_paths and not os.path.isfile(ckpt):
                    self.bad(f"models[{i}].checkpoint", f"file not found: {ckpt}")
            out.append(ModelEntry(f["name"], ckpt))
            paths.append(f"models[{i}].name")
        self.unique("models", out, key=lambda m: m.name)
        from progprune.models import list_models  # lazy: imports torch

        valid = list_models()
        for p, m in zip(paths, out):
            self.known(p, [m.name], valid, "model")
        return tuple(out)

    def dataset(self, data) -> DatasetConfig:
        if isinstance(data, str):
            data = {"name": data}
        before = len(self.problems)
        f = self.section(data, "dataset", _DATASET, dataclasses.asdict(DatasetConfig()))
        if f["data_dir"] is not None:
            f["data_dir"] = self.path(f["data_dir"])
        cfg = DatasetConfig(**f)
        if len(self.problems) > before:
            return cfg
        from progprune.data import check_dataset  # lazy: imports torch

        try:
            check_dataset(cfg)
        except (ProgpruneError, OSError) as e:
            msg = str(e)  # data.py names the field itself ("dataset.data_dir: ...")
            if not re.match(r"dataset[.:]", msg):
                msg = f"dataset: {msg}"
            # check_paths=False: the data lives on the cluster, not here
            skip = not self.check_paths and cfg.data_dir and msg.startswith("dataset.data_dir:")
            if not skip:
                self.problems.append(msg)
        return cfg

    def output(self, v) -> str:
        try:
            v = _str(v)
        except _Bad as e:
            self.bad("output", str(e))
            return ""
        m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", v)
        if m:
            scheme, rest = m.group(1).lower(), m.group(2)
            if scheme not in _SCHEMES:
                self.bad("output", f"unsupported scheme {scheme!r}; "
                                   "use a local path, file://, s3:// or gs://")
            elif scheme != "file" and not rest.split("/")[0]:
                self.bad("output", f"{scheme}:// needs a bucket, got {_show(v)}")
        return v
