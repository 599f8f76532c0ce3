"""Model registry and model names of every kind. Registry names and architectures match
Torch-Pruning's CIFAR benchmark registry (`reproduce/registry.py`), so base MACs/params
compare 1:1 with its published tables; `tv:NAME`, `timm:NAME` and `py:module:factory` build
torchvision, timm and your own models (see `_kinds`)."""
from progprune.models._kinds import KINDS, build_model, check_input_size, kind_of, name_problems
from progprune.models._registry import (
    MODELS,
    classifier_layers,
    example_inputs,
    head_name,
    list_models,
    register_model,
)
from progprune.models import mobilenetv2, resnet, vgg  # noqa: F401,E402  (fill MODELS)
from progprune.models._attention import attention_heads, sync_attention  # noqa: E402
from progprune.models._outputs import describe_output, logits_of  # noqa: E402

__all__ = [
    "KINDS",
    "MODELS",
    "attention_heads",
    "build_model",
    "check_input_size",
    "classifier_layers",
    "describe_output",
    "example_inputs",
    "head_name",
    "kind_of",
    "list_models",
    "logits_of",
    "name_problems",
    "register_model",
    "sync_attention",
]
