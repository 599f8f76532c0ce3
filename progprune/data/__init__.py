"""Data sets by the name users write in `dataset.name` (`progprune datasets` lists them).

Every loader returns an object with `size(split)`, `batches(split, ...)`, `mean`, `std`,
`input_shape` and `num_classes`:
* `memory`: digits, CIFAR-10/100 and synthetic, held whole on the device as uint8 and
  augmented a batch at a time as tensor ops (`batches`);
* `folder`: imagefolder, streamed: its images are decoded per batch in worker processes;
* `text`: text for causal LMs, registered here, loaded by `progprune.data.text` (token blocks).
Nothing here downloads.
"""
from progprune.data._registry import (
    DATASETS,
    check_dataset,
    check_num_classes,
    list_datasets,
    load_dataset,
    need_dir,
    register_dataset,
)
from progprune.data.batches import batches, sample_order
from progprune.data.memory import Splits
from progprune.data.folder import IMAGENET_MEAN, IMAGENET_STD, FolderSplits  # noqa: E402 (fills DATASETS)
from progprune.data import text as _text  # noqa: E402, F401 (fills DATASETS: text)

__all__ = [
    "DATASETS",
    "FolderSplits",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Splits",
    "batches",
    "check_dataset",
    "check_num_classes",
    "list_datasets",
    "load_dataset",
    "need_dir",
    "register_dataset",
    "sample_order",
]
