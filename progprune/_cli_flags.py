"""`progprune prune`'s flags: flag -> the spec field(s) it sets. Types, bounds and defaults
come from the schema (progprune.config), so `prune` and `sweep` validate and hash the same
settings alike. The sparse-learning flags set the method's own settings (methods[0].reg,
...), so the spec refuses them where the method learns no sparsity, as it refuses them in a
sweep spec. Help texts in {braces} are filled from the registries when help is shown."""
from __future__ import annotations

from progprune.config import SPEEDUP, TARGET_METRICS  # no torch: the schema alone
from progprune.fields import interval

_FLAGS = [
    ("--model", ["models[0].name"], str, "registry name, {model_forms} (see `progprune models`)"),
    ("--speedup", ["speedups[0]"], float, f"target speedup (base / pruned, in --target-metric: MACs by default), "
     f"{interval(**SPEEDUP)}"),
    ("--target-metric", ["pruning.target_metric"], str, "what --speedup is a speedup of: "
     f"{', '.join(TARGET_METRICS)} (latency: measured as --latency-batch-size says, on this device)"),
    ("--method", ["methods[0].name"], str, "pruning method (see `progprune methods`)"),
    ("--dataset", ["dataset.name"], str, "{datasets} (see `progprune datasets`)"),
    ("--data-dir", ["dataset.data_dir"], str, "dataset directory ({file_datasets}); never downloads"),
    ("--num-classes", ["dataset.num_classes"], int, "synthetic: class count; others: checked against the data"),
    ("--image-size", ["dataset.image_size"], int, "square input side in pixels, every dataset (models are traced, counted and timed at it)"),
    ("--test-split", ["dataset.test_split"], str, "imagefolder: test, or val (only when you mean it)"),
    ("--eval-batch-size", ["dataset.eval_batch_size"], int, "images per evaluation batch (validation, test); changes no accuracy"),
    ("--checkpoint", ["models[0].checkpoint"], str, "base model (progprune artifact); else it is trained"),
    ("--reset-head/--keep-head", ["models[0].reset_head"], bool,
     "re-initialise the checkpoint's classifier when its class count differs from the data"),
    ("--seed", ["seeds[0]"], int, "seed of base training, sampling and fine-tuning"),
    ("--global/--local", ["pruning.global_pruning"], bool, "one ranking across layers, or per layer"),
    ("--iterative-steps", ["pruning.iterative_steps"], int, "steps of the linear pruning schedule"),
    ("--max-pruning-ratio", ["pruning.max_pruning_ratio"], float, "per-layer cap over the whole run: every layer keeps ceil((1-r) x its starting width) channels; 1.0 = Torch-Pruning's loop"),
    ("--round-to", ["pruning.round_to"], int, "keep channel counts multiples of N"),
    ("--ignore", ["pruning.ignore"], "strs", "module-name patterns kept whole besides the classifier (fnmatch, comma-separated: 'features.0.*,*.se.*')"),
    ("--tolerance", ["pruning.tolerance"], float, "accepted overshoot of a MACs or params target (fraction)"),
    ("--latency-tolerance", ["pruning.latency_tolerance"], float, "accepted overshoot of a latency target "
     "(fraction; the stop rule aims at its middle)"),
    ("--base-epochs", ["base_training.epochs"], int, "base training epochs; 0 keeps the seeded random init (an hf: model: 0 unless set, its own weights)"),
    ("--base-lr", ["base_training.lr"], float, "base training learning rate"),
    ("--sl-epochs", ["methods[0].epochs"], int, "sparse learning epochs ({sparse_methods})"),
    ("--sl-lr", ["methods[0].lr"], float, "sparse learning learning rate"),
    ("--sl-milestones", ["methods[0].milestones"], "ints", "sparse learning: epochs at which lr *= its gamma (e.g. 60,80)"),
    ("--reg", ["methods[0].reg"], float, "sparse-learning regularization (default: the method's recipe)"),
    ("--delta-reg", ["methods[0].delta_reg"], float, "{growing_methods}: regularization growth per epoch"),
    ("--allow-zero-sl-epochs", ["methods[0].allow_zero_epochs"], "flag",
     "let a regularised method run with 0 sparse-learning epochs (its row reads <method>-nosl)"),
    ("--crossing", ["pruning.crossing"], str, "the step crossing the target: fine (within tolerance) or reference (whole step, Torch-Pruning's numbers)"),
    ("--finetune-epochs", ["finetune.epochs"], int, "fine-tuning epochs"),
    ("--finetune-lr", ["finetune.lr"], float, "fine-tuning learning rate"),
    ("--batch-size", ["base_training.batch_size", "sparse_learning.batch_size", "finetune.batch_size"],
     int, "batch size of every training phase"),
    ("--augment/--no-augment", ["base_training.augment", "finetune.augment"], bool,
     "crop+flip in training (default: on, off for digits)"),
    ("--latency-batch-size", ["evaluation.latency_batch_size"], int, "batch size of the latency timing"),
    ("--latency-repeats", ["evaluation.latency_repeats"], int, "timed forward passes per model"),
    ("--runtime", ["evaluation.runtime"], str, "what every latency is measured in: eager, compile (torch.compile), onnxruntime, tensorrt"),
    ("--precision", ["evaluation.precision"], str, "precision of the timed forward: fp32, or fp16/bf16 on a GPU"),
    ("--latency-threads", ["evaluation.threads"], int, "intra-op threads while timing (default: torch's)"),
    ("--export", ["export"], "strs", "also write the final model beside pruned.pt in these formats (onnx, torchscript)"),
    ("--control", ["controls"], "strs", "also run these controls at the same target: random (random importance), "
     "scratch (the pruned architecture trained from scratch); their rows follow in result.parquet"),
    ("--scratch-epochs", ["scratch.epochs"], int, "epochs of the scratch control (default: base + fine-tune epochs)"),
    ("--seq-len", ["dataset.seq_len"], int, "text: tokens per block the causal LM sees (default 512)"),
    ("--text-field", ["dataset.text_field"], str, "text: the field of a .jsonl line holding its text"),
    ("--task", ["task"], str, "what is pruned: {tasks} (default: causal_lm for an hf: model, else images)"),
    ("--dims", ["pruning.dims"], "strs", "causal LMs: what is pruned, comma-separated: heads, mlp, hidden, layers"),
    ("--optimizer", ["finetune.optimizer"], str, "fine-tuning optimizer: sgd, or adamw (causal LMs' recipe)"),
    ("--warmup", ["finetune.warmup"], float, "fine-tuning: fraction of the steps with a linear warm-up (adamw)"),
    ("--gradient-checkpointing", ["finetune.gradient_checkpointing"], "flag",
     "causal LMs: recompute activations in the backward (less memory)"),
]
_SWEEP_FLAGS = ("--runtime", "--precision", "--latency-threads")  # sweep's too: over the spec's
_FLAG_OF = {path: decl.split("/")[0] for decl, paths, _, _ in _FLAGS for path in paths} | {
    "methods[0]": "--method"}
_REQUIRED = ("--model", "--speedup")
