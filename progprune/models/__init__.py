"""Model registry. Names and architectures match Torch-Pruning's CIFAR benchmark registry
(`reproduce/registry.py`), so base MACs/params compare 1:1 with its published tables;
`tv:NAME` builds a torchvision classification model when torchvision is installed."""
from progprune.models._registry import (
    MODELS,
    build_model,
    classifier_layers,
    example_inputs,
    list_models,
    register_model,
)
from progprune.models import mobilenetv2, resnet, vgg  # noqa: F401,E402  (fill MODELS)

__all__ = [
    "MODELS",
    "build_model",
    "classifier_layers",
    "example_inputs",
    "list_models",
    "register_model",
]
