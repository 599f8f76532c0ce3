"""YAML as progprune reads and writes it: the YAML 1.2 core schema, a key given twice refused.

PyYAML resolves plain scalars by YAML 1.1, where `010` is 8, `1:30` is 90, `1_000` is 1000,
`yes`/`on` are booleans, `2024-01-01` is a date and `5e-4` is a string. The core schema of
YAML 1.2, which the README promises, reads them as:

| scalar | tag | example |
|---|---|---|
| `true True TRUE false False FALSE` | bool | (`yes no on off y n` are strings) |
| `null Null NULL ~` and empty | null | |
| `[-+]?[0-9]+` | int, decimal | `010` is 10, `-0` is 0 |
| `0o[0-7]+`, `0x[0-9a-fA-F]+` | int, octal / hex | `0o10` is 8, `0x1F` is 31 |
| `[-+]?(.[0-9]+ or [0-9]+(.[0-9]*)?)([eE][-+]?[0-9]+)?` | float | `5e-4`, `1.`, `.5` |
| `[-+]?.inf`, `.nan` (each in 3 spellings) | float | |
| anything else | str | `1:30`, `1_000`, `0b11`, `2024-01-01` |

Tags other than these and `!!str`, `!!seq`, `!!map` (`!!timestamp`, `!!binary`, `!!set`)
are refused. `parse_yaml` reads by that table with its own loader class (`yaml.SafeLoader` is not
touched); `dump_yaml` writes plain data so that both readings agree: a string that either
YAML 1.1 or 1.2 would read as something else is quoted.
"""
from __future__ import annotations

import re

import yaml
from yaml.resolver import BaseResolver

from progprune.errors import SpecError

_T = "tag:yaml.org,2002:"
_INT = r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+"
_FLOAT = (r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
          r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")
_BOOL = r"true|True|TRUE|false|False|FALSE"
# (tag, pattern, first characters); int before float: `10` matches both
_CORE = [(_T + "bool", _BOOL, "tTfF"), (_T + "int", _INT, "-+0123456789"),
         (_T + "float", _FLOAT, "-+0123456789."), (_T + "null", r"null|Null|NULL|~|", ["n", "N", "~", ""]),
         (_T + "merge", r"<<", "<")]  # merge keys: not core, but PyYAML's and harmless


def parse_yaml(text: str, source: str | None = None):
    """`text` as plain data (YAML 1.2 core schema); a syntax error is a SpecError with its
    line and column."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (_Loader is a SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = " ".join(str(p) for p in (e.context, e.problem) if p)
        raise SpecError([f"YAML syntax error at {where}{what}"], source) from None
    except (yaml.YAMLError, RecursionError, ValueError, TypeError) as e:  # e.g. !!timestamp junk
        raise SpecError([f"YAML syntax error: {e}"], source) from None


def dump_yaml(data) -> str:
    """Plain data as YAML that reads back the same by YAML 1.2 (parse_yaml) and by 1.1."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


class _CoreResolver(BaseResolver):
    yaml_implicit_resolvers: dict = {}
    for _tag, _rx, _first in _CORE:
        for _ch in _first:
            yaml_implicit_resolvers.setdefault(_ch, []).append((_tag, re.compile(f"^(?:{_rx})$")))
    del _tag, _rx, _first, _ch


_CORE_RESOLVER = _CoreResolver()


def _scalar(loader, node, pattern: str, kind: str) -> str:
    value = loader.construct_scalar(node)
    if not re.fullmatch(pattern, value):
        raise yaml.constructor.ConstructorError(
            None, None, f"{value!r} is not {kind} (YAML 1.2)", node.start_mark)
    return value


def _int(loader, node) -> int:
    v = _scalar(loader, node, _INT, "an integer")
    return int(v[2:], 8) if v.startswith("0o") else int(v[2:], 16) if v.startswith("0x") else int(v)


def _float(loader, node) -> float:
    v = _scalar(loader, node, f"{_FLOAT}|{_INT}", "a number").lower()
    if v.endswith((".inf", ".nan")):
        return float(v.replace(".", ""))
    return float(_int(loader, node)) if re.fullmatch(_INT, v) and v[:2] in ("0o", "0x") else float(v)


def _bool(loader, node) -> bool:
    return _scalar(loader, node, _BOOL, "true or false").lower() == "true"


class _Loader(yaml.SafeLoader):
    """SafeLoader with the YAML 1.2 core schema's scalars (module doc), and a key given
    twice an error instead of silently last-wins."""

    yaml_implicit_resolvers = _CoreResolver.yaml_implicit_resolvers
    # the core schema's tags only: `!!timestamp`, `!!binary`, `!!set` ... are refused as unknown
    yaml_constructors = {**{k: v for k, v in yaml.SafeLoader.yaml_constructors.items()
                            if k in (None, _T + "null", _T + "str", _T + "seq", _T + "map")},
                         _T + "int": _int, _T + "float": _float, _T + "bool": _bool}

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == _T + "merge":
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


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes a string YAML 1.2 would read as another type (`0o10`,
    `1e3`); SafeDumper already quotes those YAML 1.1 would (`010`, `yes`, `1:30`)."""

    def resolve(self, kind, value, implicit):
        tag = super().resolve(kind, value, implicit)
        if kind is yaml.ScalarNode and implicit[0] and tag == _T + "str":
            return _CORE_RESOLVER.resolve(kind, value, implicit)
        return tag
