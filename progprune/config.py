"""The settings, declared once: the sweep spec's schema, shaped like the YAML users write.

Each setting has its type, bounds, default and error words in one place and nowhere else:
the sections (`dataset:`, `pruning:`, ...) in progprune.sections, the spec and its
combinations here (the types are progprune.fields'). Bounds are what can run (every count has
an upper bound), so a typo fails at load time. No torch, no registries, no files: `spec.py`
checks those.
"""
from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Optional

from pydantic import AfterValidator, BeforeValidator, StrictStr, create_model, field_serializer, model_validator

from progprune.fields import Bool, Grid, Int, Items, Num, OneOf, Opt, Text, interval, named, one_or_many, worded
from progprune.sections import (  # noqa: F401 - re-exported: the sections are the spec's
    CONTROLS, DEFAULT_LM_DIMS, EXPORT_FORMATS, LM_DIMS, MAX_SEED, RUNTIMES, SPEEDUP, TARGET_METRICS, TASK_NAMES, TEXT,
    DatasetConfig, EvaluationConfig,
    FinetuneConfig, ModelEntry, PruneConfig, PruningConfig, ResourcesConfig, ScratchConfig, SparseConfig,
    TrainConfig, _distinct, _Node, _storage_uri, scratch_overrides)


# A method, optionally with its own sparse-learning settings, which override the spec's
# `sparse_learning:` for that method only (`methods: [group_norm, {name: slim, reg: 1e-5}]`).
# Built from SparseConfig, so each setting keeps its one declaration (bounds, words).
# `sparse`: whether the method learns sparsity (unset: no). Loading a spec fills it, and the method's
# recipe values (its reg, ...) where nothing else sets them, from the method registry
# (progprune.spec), so the resolved spec states them and `combinations()` needs no registry.
MethodEntry = create_model(
    "MethodEntry", __base__=_Node, __module__=__name__, name=(Text, ...),
    sparse=(Opt(Bool), None),
    **{k: (Optional[Annotated[(f.annotation, *f.metadata)]], None)
       for k, f in SparseConfig.model_fields.items()})


def method_overrides(entry) -> dict:
    """A `methods:` entry's own sparse-learning settings (those it sets)."""
    return {k: v for k, v in entry.model_dump(exclude={"name", "sparse"}).items() if v is not None}


def _own_base(base):
    """A causal LM's base_training: an hf: model is its own base, so its epochs are 0 unless
    the spec sets them (images: TrainConfig's default, a base trained from scratch)."""
    if base is None:
        return {"epochs": 0}
    if isinstance(base, dict):
        return base if "epochs" in base else {**base, "epochs": 0}
    if isinstance(base, TrainConfig) and "epochs" not in base.model_fields_set:
        return base.model_copy(update={"epochs": 0})
    return base


class SweepSpec(_Node):
    """A sweep spec: models x speedups x methods x seeds and the settings they share."""

    name: worded(StrictStr, "a name matching [a-z0-9][a-z0-9_.-]* (it is used in paths)",
                  pattern=r"^[a-z0-9][a-z0-9_.-]*$", max_length=100)
    # what is pruned (progprune.tasks): image classifiers, or Hugging Face causal LMs (hf:
    # models, the text data set); null: causal_lm where the models are hf:, else images
    task: OneOf(*TASK_NAMES) = "image_classification"
    dataset: Annotated[DatasetConfig, named("dataset")] = DatasetConfig()
    models: Grid(Annotated[ModelEntry, named("model")],
                 "model names or {name, checkpoint} mappings")
    speedups: Grid(Num(**SPEEDUP), f"numbers {interval(**SPEEDUP)}")
    methods: Grid(Annotated[MethodEntry, named("method")],
                  "method names or {name, <sparse_learning settings>} mappings") = (
        MethodEntry(name="group_norm"),)
    seeds: Grid(Int(0, MAX_SEED), f"integers in [0, {MAX_SEED}]") = (0,)
    base_training: TrainConfig = TrainConfig()
    sparse_learning: SparseConfig = SparseConfig()
    pruning: PruningConfig = PruningConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    resources: ResourcesConfig = ResourcesConfig()
    # a local path, file://, s3:// or gs://; null: ./runs/<name>
    output: Annotated[Opt(Text), AfterValidator(_storage_uri)] = None
    # write each final model in these formats beside its artifact (the row's export_uris)
    export: Annotated[Items(OneOf(*EXPORT_FORMATS), f"a list of formats ({', '.join(EXPORT_FORMATS)})", 2,
                            AfterValidator(_distinct)),
                      BeforeValidator(one_or_many)] = ()
    # controls at every target (README: "Controls"): random: the same progressive loop with
    # random importance, per (model, target, target metric, seed); scratch: each method's
    # pruned architecture re-initialised and trained from scratch (`scratch:`)
    controls: Annotated[Items(OneOf(*CONTROLS), f"a list of controls ({', '.join(CONTROLS)})", 2,
                              AfterValidator(_distinct)),
                        BeforeValidator(one_or_many)] = ()
    scratch: ScratchConfig = ScratchConfig()

    @model_validator(mode="before")
    @classmethod
    def _task_of_the_models(cls, data):
        """An unset (or null) task: causal_lm when the first model is hf:, else images."""
        if isinstance(data, dict) and data.get("task") is None:
            models = data.get("models")
            first = (models[0] if isinstance(models, (list, tuple)) and models else models)
            name = first.get("name") if isinstance(first, dict) else first
            data = {**data, "task": "causal_lm" if isinstance(name, str) and name.startswith("hf:")
                    else "image_classification"}
        if isinstance(data, dict) and data.get("task") == "causal_lm":
            data = {**data, "base_training": _own_base(data.get("base_training"))}
        return data

    def combinations(self) -> list[ComboConfig]:
        """models x speedups x target metrics x methods x seeds, in that nesting order (last
        varies fastest); with `controls:`, each (model, speedup, target metric) block ends
        with its random controls (one per seed), then the scratch controls of its method
        combinations, in their order.
        Only the methods whose entry says `sparse: true`, which loading a spec fills in
        (`progprune.spec`), carry sparse-learning settings."""

        def sparse(entry) -> SparseConfig | None:
            return self.sparse_learning_of(entry) if entry.sparse else None

        def combo(m, s, metric, method, seed, entry=None, control=None) -> ComboConfig:
            return ComboConfig(
                model=m.name, base_checkpoint=m.checkpoint, base_checkpoint_sha256=m.sha256,
                reset_head=m.reset_head, dataset=self.dataset, target_speedup=s, seed=seed,
                base=self.base_training, sparse=sparse(entry) if entry else None, finetune=self.finetune,
                prune=PruneConfig(**self.pruning.model_dump(exclude={"target_metric"}), method=method,
                                  target_metric=metric),
                evaluation=self.evaluation, sweep=self.name, export=self.export, control=control, task=self.task)

        out = []
        for m in self.models:
            for s in self.speedups:
                for metric in self.pruning.target_metric:
                    block = [combo(m, s, metric, e.name, seed, e) for e in self.methods for seed in self.seeds]
                    out += block
                    if "random" in self.controls:
                        out += [combo(m, s, metric, "random", seed, control="random") for seed in self.seeds]
                    if "scratch" in self.controls:
                        out += [c.scratch_of(self.scratch_training(m)) for c in block]
        return out

    def scratch_training(self, model: ModelEntry | None = None) -> TrainConfig:
        """The from-scratch control's training (of `model`): base_training with `scratch:`
        over it; epochs unset: base_training.epochs + finetune.epochs (0 where the model
        starts from a checkpoint: its training is unknown, and loading refuses that)."""
        update = scratch_overrides(self.scratch)
        if "epochs" not in update:
            update["epochs"] = 0 if model and model.checkpoint else self.base_training.epochs + self.finetune.epochs
        return self.base_training.model_copy(update=update)

    @property
    def method_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.methods)

    def sparse_learning_of(self, entry) -> SparseConfig:
        """`sparse_learning:` with a method's own settings over it (recipe defaults unfilled)."""
        return self.sparse_learning.model_copy(update=method_overrides(entry))

    @field_serializer("methods")
    def _methods_plain(self, methods):  # a bare name where a method has no settings of its own
        return [{"name": m.name, **({"sparse": True} if m.sparse else {}), **o}
                if (o := method_overrides(m)) or m.sparse else m.name for m in methods]

    def to_dict(self) -> dict:
        """The resolved spec as plain YAML-safe data; the loader accepts it again."""
        return self.model_dump(mode="json")


class ComboConfig(_Node):
    """One combination: what the pipeline's stages read. Built by `SweepSpec.combinations`."""

    model: str
    base_checkpoint: Optional[str] = None
    base_checkpoint_sha256: Optional[str] = None  # the key: new weights, same path -> rerun
    reset_head: bool = False
    dataset: DatasetConfig
    target_speedup: float
    seed: int
    base: TrainConfig
    prune: PruneConfig
    sparse: Optional[SparseConfig] = None  # regularised methods only
    finetune: FinetuneConfig
    evaluation: EvaluationConfig = EvaluationConfig()
    sweep: str = ""  # display only: not part of any key
    export: tuple[str, ...] = ()  # formats written beside the final artifact: no figure changes
    control: Optional[str] = None  # random | scratch (progprune.controls); None: a method's
    task: str = "image_classification"  # progprune.tasks
    scratch: Optional[TrainConfig] = None  # control "scratch": its training from scratch

    def scratch_of(self, training: TrainConfig) -> ComboConfig:
        """The from-scratch control of this (method) combination: its pruned architecture,
        re-initialised and trained with `training`."""
        return self.model_copy(update={"control": "scratch", "scratch": training})

    def architecture_of(self) -> ComboConfig:
        """A scratch control's method combination, whose pruned architecture it trains."""
        return self.model_copy(update={"control": None, "scratch": None})

    @property
    def method(self) -> str:
        return self.prune.method

    # ---- keys deciding reuse -------------------------------------------------------
    def base_key(self) -> str:
        """Identity of the base model: same key -> the same trained (or loaded) weights."""
        return _digest({"model": self.model, "dataset": self.dataset.key(), "seed": self.seed,
                        "checkpoint": self.base_checkpoint_sha256 or self.base_checkpoint,
                        "reset_head": self.reset_head,
                        "base": None if self.base_checkpoint else self.base.key(),
                        **({"task": self.task} if self.task != "image_classification" else {})})

    def sparse_key(self) -> str:
        """Identity of the sparse-learned model (base + method + its pruning scope)."""
        p = self.prune
        return _digest({"base": self.base_key(), "method": p.method, "global": p.global_pruning,
                        "max_ratio": p.max_pruning_ratio, "round_to": p.round_to,
                        "sparse": self.sparse.key() if self.sparse else None,
                        **({"ignore": list(p.ignore)} if p.ignore else {})})

    def combo_id(self) -> str:
        """Stable hash of every setting that changes this combination's result row. A scratch
        control's: its method combination's and its training's, nothing else (another method
        in the sweep changes neither); a random control's: its own settings, which name no
        method but `random`, and say `control`."""
        if self.control == "scratch":
            return _digest({"architecture": self.architecture_of().combo_id(), "control": "scratch",
                            "scratch": self.scratch.key()})
        exclude = ({"sweep", "export", "scratch"} | ({"base_checkpoint"} if self.base_checkpoint_sha256 else set())
                   | ({"control"} if self.control is None else set())
                   | ({"task"} if self.task == "image_classification" else set()))
        data = self.model_dump(exclude=exclude)
        data["dataset"] = self.dataset.key()
        data["evaluation"] = self.evaluation.key()
        data["sparse"] = self.sparse.key() if self.sparse else None
        data["base"], data["finetune"] = self.base.key(), self.finetune.key()
        # settings added later hash as before while unset (or, for a MACs target, unused)
        if not self.prune.ignore:
            data["prune"].pop("ignore")
        if tuple(self.prune.dims) == DEFAULT_LM_DIMS:
            data["prune"].pop("dims")
        if self.prune.target_metric == "macs":
            data["prune"].pop("target_metric")
        if self.prune.target_metric != "latency":
            data["prune"].pop("latency_tolerance")
        return _digest(data)


def _digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
