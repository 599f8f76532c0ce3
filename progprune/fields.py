"""Field types that word their own errors, and pydantic's errors as `Problem`s.

`Int(0, 10)` is a strict integer in [0, 10] that fails as `must be an integer in [0, 10],
got -1`, `Num(gt=0, le=1)` a finite number that fails as `must be a number in (0, 1], got 2`:
the bounds are given once and the words are made from them; `problems_of(error, Root)` turns a ValidationError of `Root` into field paths and
those words, with the closest valid name for an unknown field. progprune.config builds the
schema from these types.
"""
from __future__ import annotations

import typing
from typing import Annotated, Literal, Optional

from pydantic import (AfterValidator, BaseModel, BeforeValidator, Field, StrictBool, StrictInt,
                      StrictStr, ValidationError, WrapValidator)
from pydantic_core import PydanticCustomError

from progprune.errors import Problem, did_you_mean, show


def invalid(msg: str) -> PydanticCustomError:
    """An error a validator raises, worded as `msg` (a `Problem`'s message as it is)."""
    return PydanticCustomError("progprune", msg)


def worded(t, desc: str, *validators, **field):
    """`t` whose own errors read `must be <desc>, got <input>` (an item's keep their own)."""
    def wrap(v, handler):
        try:
            return handler(v)
        except ValidationError as e:
            if any(err["loc"] for err in e.errors()):
                raise
            raise invalid(f"must be {desc}, got {show(v)}") from None
    return Annotated[(t, Field(description=desc, **field), *validators, WrapValidator(wrap))]


def Int(lo: int, hi: int):  # noqa: N802 (type factories)
    return worded(StrictInt, f"an integer in [{lo}, {hi}]", ge=lo, le=hi)


def interval(ge=None, gt=None, le=None, lt=None) -> str:
    """The bounds as the errors word them: `interval(gt=1, le=10_000)` -> `in (1, 10000]`."""
    def num(v):
        return f"{v:g}" if isinstance(v, float) else str(v)

    lo, hi = (f"[{num(ge)}" if gt is None else f"({num(gt)}"), (f"{num(le)}]" if lt is None else f"{num(lt)})")
    return f"in {lo}, {hi}"


def Num(**bounds):  # noqa: N802: a finite number within `bounds` (ge|gt and le|lt, both given)
    return worded(float, f"a number {interval(**bounds)}", strict=True, allow_inf_nan=False, **bounds)


def Opt(t):  # noqa: N802
    desc = next(m.description for m in t.__metadata__ if getattr(m, "description", None))
    return worded(Optional[t], f"{desc} (or null)")


def OneOf(*values: str):  # noqa: N802
    return worded(Literal[values], "one of " + ", ".join(values))


def Items(item, desc: str, n: int, *validators):  # noqa: N802: a list of at most n
    return worded(tuple[item, ...], f"{desc} (at most {n})", *validators, strict=False, max_length=n)


Bool = worded(StrictBool, "true or false")
Text = worded(StrictStr, "a non-empty string", min_length=1, max_length=4096)


def one_or_many(v):
    return [v] if isinstance(v, (str, int, float)) and not isinstance(v, bool) else v


def named(what: str) -> BeforeValidator:
    """A `what` given by its name alone or as a mapping with `name` and its settings."""
    def item(v):
        if isinstance(v, (str, dict)):
            return {"name": v} if isinstance(v, str) else v
        raise invalid(f"must be a {what} name or a mapping with name and its settings, got {show(v)}")
    return BeforeValidator(item)


def _distinct(v: tuple) -> tuple:
    if not v:
        raise invalid("must not be empty")
    seen = set()
    for key in (x.name if isinstance(x, BaseModel) else x for x in v):
        if key in seen:
            raise invalid(f"duplicate entry {key!r}")
        seen.add(key)
    return v


def Grid(item, what: str):  # noqa: N802: one value or a non-empty list of distinct values
    return Annotated[Items(item, f"a list of {what}", 10_000), BeforeValidator(one_or_many),
                     AfterValidator(_distinct)]


def problems_of(error: ValidationError, root: type[BaseModel]) -> list[Problem]:
    """`error` (from validating `root`) as one Problem per error: its field path and words."""
    return [_problem(err, root) for err in error.errors()]


def _problem(err: dict, root: type[BaseModel]) -> Problem:
    loc = err["loc"]
    path = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".")
    if err["type"] == "extra_forbidden":
        valid = list(_type_at(root, loc[:-1]).model_fields)
        return Problem(path, "unknown field" + (did_you_mean(str(loc[-1]), valid)
                                                or f"; valid: {', '.join(valid)}"))
    if err["type"] == "missing":
        return Problem(path, "required field missing")
    if err["type"] == "progprune":
        return Problem(path, err["msg"])
    what = "a mapping" if err["type"] == "model_type" else "valid"  # else: a key not a string
    return Problem(path, f"must be {what}, got {show(err['input'])}")


def _type_at(t, loc: tuple):
    """The type of the field at `loc` below model `t` (an int: a list's item)."""
    for key in loc:
        t = typing.get_args(t)[0] if isinstance(key, int) else t.model_fields[key].annotation
        while typing.get_origin(t) is typing.Annotated:
            t = t.__origin__
    return t
