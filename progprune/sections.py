"""The sections of a sweep spec (dataset:, base_training:, pruning:, ...), each declared once:
its settings' types, bounds, defaults and error words (the types are progprune.fields').
progprune.config assembles them into the spec and its combinations, and re-exports them.
"""
from __future__ import annotations

import re
from typing import Annotated, Optional

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationInfo, create_model,
                      field_validator, model_validator)

from progprune.errors import show
from progprune.fields import (Bool, Grid, Int, Items, Num, OneOf, Opt, Text, interval, invalid,
                              one_or_many, worded)

MAX_SEED = 2**32 - 1  # numpy's and DataLoader workers' seed range
SPEEDUP = {"gt": 1, "le": 10_000}  # a target speedup's bounds
TARGET_METRICS = ("macs", "latency", "params")  # what a target speedup is a speedup of
TASK_NAMES = ("image_classification", "causal_lm")  # progprune.tasks registers each
LM_DIMS = ("heads", "mlp", "hidden", "layers")  # what a causal LM can prune (pruning.dims)
DEFAULT_LM_DIMS = ("heads", "mlp")
CONTROLS = ("random", "scratch")  # progprune.controls: what each is
TEXT = "text"  # the data set of token blocks (task causal_lm; progprune.data.text)


def _increasing(v: tuple) -> tuple:
    if any(a >= b for a, b in zip(v, v[1:])):
        raise ValueError("not increasing")  # worded by Items
    return v


def _distinct(v: tuple) -> tuple:
    if len(set(v)) != len(v):
        raise ValueError("repeated")  # worded by Items
    return v


_MILESTONE = (1, 100_000)  # an epoch number
Milestones = Items(Int(*_MILESTONE), f"a list of increasing integers in [{_MILESTONE[0]}, {_MILESTONE[1]}]", 100,
                   AfterValidator(_increasing))


def _storage_uri(v: str | None) -> str | None:
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", v or "")
    scheme = m and m[1].lower()
    if m and scheme not in ("file", "s3", "gs"):
        raise invalid(f"unsupported scheme {scheme!r}; use a local path, file://, s3:// or gs://")
    if m and scheme != "file" and not m[2].split("/")[0]:
        raise invalid(f"{scheme}:// needs a bucket, got {show(v)}")
    return v


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# ---- the sections of a spec --------------------------------------------------------------
def _rgb(**bounds):
    n = Num(**bounds)
    return Opt(worded(tuple[n, n, n], f"three numbers {interval(**bounds)} (R, G, B)", strict=False))


class DatasetConfig(_Node):
    name: Text = "digits"  # see `progprune datasets`
    data_dir: Opt(Text) = None  # the data sets that read files read them here; never downloads
    num_classes: Opt(Int(1, 100_000)) = None  # synthetic: the class count; others: checked
    # square side in pixels the models see: the size they are traced, counted and timed at.
    # null: 224 for imagefolder (random-resized crops of it in training, resize to
    # image_size/0.875 + centre crop in evaluation), 32 for the others (32-px originals)
    image_size: Opt(Int(1, 4096)) = None
    # synthetic: train samples (val/test: 1/4 each); at most 100,000: 150,000 images, 461 MB
    # at 32 px (one byte a pixel). Larger image sizes are checked against memory (below)
    synthetic_samples: Int(1, 100_000) = 512
    # imagefolder: the split test accuracy is reported on; "val" only when you mean it (val
    # also picks the best epoch, so its accuracy is optimistic)
    test_split: OneOf("test", "val") = "test"
    # per-channel normalisation (0..1 scale); null: the data set's own (CIFAR: its recipe's,
    # imagefolder: ImageNet's, digits/synthetic: measured on the training split)
    mean: _rgb(ge=0, le=1) = None
    std: _rgb(gt=0, le=1) = None
    # imagefolder: DataLoader worker processes decoding images; null: one fewer than the
    # CPUs this process may use (a Ray task's num_cpus), at most 16; 0: decode in-process.
    # Results do not depend on it (each image's crop is seeded by its position)
    loader_workers: Opt(Int(0, 256)) = None
    # images per evaluation batch (validation each epoch, test, every data set): 128 at 224 px
    # is 77 MB per float copy. Changes no accuracy, so it is not part of any key
    eval_batch_size: Int(1, 65_536) = 128
    # text (task causal_lm): tokens the model sees per block (targets: the next seq_len,
    # blocks at stride seq_len); null: 512. Image sets refuse it
    seq_len: Opt(Int(2, 1_048_576)) = None
    text_field: Text = "text"  # text: the field of a .jsonl line that holds its document

    @model_validator(mode="before")
    @classmethod
    def _size_of_the_data(cls, data):
        if isinstance(data, dict) and data.get("image_size") is None:
            data = {**data, "image_size": 224 if data.get("name") == "imagefolder" else 32}
        if isinstance(data, dict) and data.get("name") == TEXT and data.get("seq_len") is None:
            data = {**data, "seq_len": 512}
        return data

    @field_validator("seq_len", "text_field")
    @classmethod
    def _for_text_only(cls, v, info: ValidationInfo):
        name = info.data.get("name")
        if name is not None and name != TEXT and v != cls.model_fields[info.field_name].default:
            raise invalid(f"read by the {TEXT} data set only (task causal_lm); {name} would ignore "
                          "it: remove it")
        return v

    def key(self) -> dict:
        """What identifies the data the models see (hashed into base and combination keys):
        settings added later hash as before while unset (or at their default);
        loader_workers and eval_batch_size change no result."""
        return {k: v for k, v in self.model_dump(exclude={"loader_workers", "eval_batch_size"}).items()
                if (v is not None or k not in ("mean", "std", "seq_len"))
                and not (k == "text_field" and v == "text")}


class TrainConfig(_Node):
    """One training phase (base training; fine-tuning adds its execution settings)."""

    epochs: Int(0, 10_000) = 15
    lr: Num(gt=0, le=10) = 0.05
    momentum: Num(ge=0, lt=1) = 0.9
    weight_decay: Num(ge=0, le=1) = 5e-4
    batch_size: Int(1, 65_536) = 64
    schedule: OneOf("cosine", "multistep") = "cosine"
    milestones: Milestones = ()  # multistep: epochs at which lr *= gamma
    gamma: Num(gt=0, le=1) = 0.1
    augment: Opt(Bool) = None  # random crop + flip; null: on, except for digits (8x8 glyphs)
    # sgd: SGD with `momentum` and the epoch schedule; adamw: AdamW (causal LMs' recipe), its
    # schedule stepped per batch: a linear warm-up over `warmup` of the steps, then `schedule`
    optimizer: OneOf("sgd", "adamw") = "sgd"
    warmup: Num(ge=0, lt=1) = 0.0  # fraction of the training's steps with a linear warm-up

    def key(self) -> dict:
        """What identifies this training (hashed into keys): settings added later hash as
        before while at their defaults."""
        return {k: v for k, v in self.model_dump().items()
                if k not in _TRAIN_ADDED or v != type(self).model_fields[k].default}


_TRAIN_ADDED = ("optimizer", "warmup", "gradient_checkpointing")


class FinetuneConfig(TrainConfig):
    """batch_size is the global batch: with several Ray Train workers each takes its share,
    so the recipe (batch and learning rate) does not change with the worker count."""

    epochs: Int(0, 10_000) = 10
    num_workers: Int(0, 1024) = 1  # Ray Train workers; 0 = train inside the prune task
    use_gpu: Bool = False
    max_failures: Int(0, 100) = 1  # Ray Train worker restarts before the combination fails
    # causal LMs: recompute activations in the backward (transformers' gradient checkpointing):
    # less memory, about a third more compute
    gradient_checkpointing: Bool = False

    @model_validator(mode="after")
    def _batch_splits_evenly(self):
        if self.num_workers > 1 and self.batch_size % self.num_workers:
            raise invalid(f"batch_size {self.batch_size} (the global batch) must be a multiple of "
                       f"num_workers {self.num_workers}")
        return self


class SparseConfig(_Node):
    """Sparse learning before pruning: the regularised methods only (`progprune methods`
    tags them). reg/delta_reg null: each method's published recipe, which the loaded spec
    states in its `methods:` entries and each row records."""

    epochs: Int(0, 10_000) = 10
    lr: Num(gt=0, le=10) = 0.01
    reg: Opt(Num(ge=0, le=1)) = None
    delta_reg: Opt(Num(ge=0, le=1)) = None  # growth of reg per epoch (growing_reg)
    batch_size: Int(1, 65_536) = 64
    milestones: Milestones = ()  # epochs at which lr *= gamma; none: a cosine schedule
    # 0 epochs turns a regularised method into its unregularised self: refused unless you
    # say so here, and then the row's method reads "<name>-nosl"
    allow_zero_epochs: Bool = False
    # the optimiser (SGD) and data of the reference recipes; fixed in code before they were
    # settings, so at these values they hash as before (`key`)
    momentum: Num(ge=0, lt=1) = 0.9
    weight_decay: Num(ge=0, le=1) = 0.0  # the regulariser is the only penalty
    gamma: Num(gt=0, le=1) = 0.1
    augment: Bool = True  # random crop + flip, for every data set

    def training(self) -> TrainConfig:
        """The training phase these settings describe."""
        return TrainConfig(epochs=self.epochs, lr=self.lr, momentum=self.momentum,
                           weight_decay=self.weight_decay, batch_size=self.batch_size,
                           schedule="multistep" if self.milestones else "cosine",
                           milestones=self.milestones, gamma=self.gamma, augment=self.augment)

    def key(self) -> dict:
        """What identifies this sparse learning (hashed into the sparse and combination
        keys): settings added later hash as before while at the value they had."""
        return {k: v for k, v in self.model_dump().items()
                if k not in _SPARSE_ADDED or v != type(self).model_fields[k].default}


_SPARSE_ADDED = ("momentum", "weight_decay", "gamma", "augment")  # hard-coded before


class PruningConfig(_Node):
    global_pruning: Bool = True  # one ranking over all layers (every published recipe)
    iterative_steps: Int(1, 100_000) = 400  # linear schedule; Torch-Pruning's setting
    # a per-layer cap over the whole run: every layer keeps at least ceil((1 - r) x its
    # starting width) channels (round_to respected); a target that needs more is unreachable
    max_pruning_ratio: Num(gt=0, le=1) = 1.0
    round_to: Opt(Int(1, 4096)) = None  # keep channel counts multiples of N
    tolerance: Num(ge=0, le=1) = 0.005  # accept [target, target * (1 + tol)]
    # the step that crosses the target: "fine" prunes part of that step's own selection, in
    # the method's order, to land within tolerance; "reference" takes the whole step, as
    # Torch-Pruning's loop does (its numbers, reproduced exactly)
    crossing: OneOf("fine", "reference") = "fine"
    # what `speedups:` are speedups of (base / pruned): MACs, the latency measured under
    # `evaluation:` (its runtime, batch size, threads, on the task's device), or parameters;
    # a list makes it a sweep axis, as `methods:` is
    target_metric: Grid(OneOf(*TARGET_METRICS), "target metrics") = ("macs",)
    # a latency target accepts a measured speedup in [target, target x (1 + this)]: timing is
    # noisy, so it is wider than `tolerance` (README: "Targets: MACs, latency or parameters")
    latency_tolerance: Num(gt=0, le=1) = 0.05
    # module names kept whole besides the classifier head (fnmatch: "features.0.*", "*.se.*")
    ignore: Annotated[Items(Text, "a list of module-name patterns", 1000),
                      BeforeValidator(one_or_many)] = ()
    # causal LMs: what is pruned: whole attention heads (with grouped-query attention, whole
    # KV groups with their query heads), MLP channels, the hidden size, whole decoder layers
    dims: Annotated[Items(OneOf(*LM_DIMS), f"a list of dims ({', '.join(LM_DIMS)})", len(LM_DIMS),
                          AfterValidator(_distinct)), BeforeValidator(one_or_many)] = DEFAULT_LM_DIMS


class PruneConfig(PruningConfig):
    """What one combination prunes with: the spec's `pruning:` plus its method, and one
    target metric."""

    method: Text = "group_norm"
    target_metric: OneOf(*TARGET_METRICS) = "macs"


RUNTIMES = ("eager", "compile", "onnxruntime", "tensorrt")  # progprune.runtimes registers each
EXPORT_FORMATS = ("onnx", "torchscript")  # progprune.export.FORMATS


class EvaluationConfig(_Node):
    latency_batch_size: Int(1, 4096) = 1
    latency_repeats: Int(1, 10_000) = 20
    # what every latency column is measured in: the model's own forward (eager),
    # torch.compile, ONNX Runtime (CPU; its CUDA provider on a GPU), TensorRT (where installed)
    runtime: OneOf(*RUNTIMES) = "eager"
    precision: OneOf("fp32", "fp16", "bf16") = "fp32"  # fp16/bf16: on a GPU
    threads: Opt(Int(1, 1024)) = None  # intra-op threads while timing; null: torch's default

    def key(self) -> dict:
        """What identifies the timing (hashed into the combination key): settings added later
        hash as before while at their defaults."""
        return {k: v for k, v in self.model_dump().items()
                if k not in _EVALUATION_ADDED or v != type(self).model_fields[k].default}


_EVALUATION_ADDED = ("runtime", "precision", "threads")


# The from-scratch control's training: `base_training:` with these set over it; epochs null:
# base_training.epochs + finetune.epochs (the training the method's model had in all; a
# checkpoint base's is unknown, so there it must be set). Built from TrainConfig, so each
# setting keeps its one declaration (bounds, words).
ScratchConfig = create_model(
    "ScratchConfig", __base__=_Node, __module__=__name__,
    **{k: (Optional[Annotated[(f.annotation, *f.metadata)]], None) for k, f in TrainConfig.model_fields.items()})


def scratch_overrides(node) -> dict:
    """The settings `scratch:` sets (over base_training)."""
    return {k: v for k, v in node.model_dump().items() if v is not None}


class ResourcesConfig(_Node):
    gpus_per_task: Num(ge=0, le=64) = 0.0
    cpus_per_task: Num(ge=0, le=1024) = 1.0
    # bounds concurrent Train runs (each costs head memory), and sets the submission window:
    # max(64, 4 x max_concurrent) combinations in flight (README: scheduling and autoscaling)
    max_concurrent: Int(1, 100_000) = 4


class ModelEntry(_Node):
    name: Text
    checkpoint: Opt(Text) = None  # absolute after loading; null: train the base model
    sha256: Opt(Text) = None  # the checkpoint's content, filled at load; a mismatch is refused
    reset_head: Bool = False  # re-initialise the checkpoint's classifier (other class count)
