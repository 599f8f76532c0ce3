"""One registry shape for every kind of named thing users type (models, datasets,
pruning methods, and what later features add): register, get, names, did-you-mean,
duplicates refused.

    MODELS = Registry("model", field="models")

    @MODELS.register            # keyed by the function's name
    def resnet20(num_classes): ...

    DATASETS.register("cifar10", entry)   # or an explicit name and object
"""
from __future__ import annotations

import re
from typing import Callable, Generic, Iterator, TypeVar

from progprune.errors import BadInput, did_you_mean

T = TypeVar("T")


def natural_key(name: str) -> list:
    """resnet20 < resnet56 < resnet110 (numbers compare as numbers)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class Registry(Generic[T]):
    """Names users type -> the objects they name. `kind` words the errors ("unknown
    method 'x'"); `field` is the spec field an unknown name is reported at."""

    def __init__(self, kind: str, field: str | None = None):
        self.kind, self.field = kind, field
        self._items: dict[str, T] = {}

    def register(self, name: str | Callable | None = None, obj: T | None = None):
        """`register(name, obj)` -> obj; `@register` or `@register("name")` as a decorator
        (the bare form keys by the function's __name__). A name registered twice is a
        programming error (ValueError), never a silent overwrite."""
        if callable(name) and obj is None:  # bare decorator
            return self._add(name.__name__, name)
        if obj is not None:
            return self._add(name, obj)
        return lambda fn: self._add(name or fn.__name__, fn)

    def _add(self, name: str, obj: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._items[name] = obj
        return obj

    def get(self, name: str) -> T:
        """The object registered as `name`; else BadInput naming the close and valid names."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise BadInput(self.unknown(name), field=self.field) from None

    def unknown(self, name) -> str:
        """The words for a name that is not registered."""
        hint = did_you_mean(str(name), self._items) if isinstance(name, str) else ""
        if not hint and isinstance(name, str):  # CIFAR10 -> cifar10
            lower = {n.lower(): n for n in self._items}
            if name.lower() in lower:
                hint = f"; did you mean {lower[name.lower()]!r}?"
        # "unknown model 'x'; did you mean 'y'? valid: ..." or "unknown model 'x'; valid: ..."
        return f"unknown {self.kind} {name!r}{hint or ';'} valid: {', '.join(self.names())}"

    def names(self) -> list[str]:
        """Registered names in natural order (resnet20 before resnet110)."""
        return sorted(self._items, key=natural_key)

    def __contains__(self, name) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def items(self):
        return [(n, self._items[n]) for n in self.names()]
