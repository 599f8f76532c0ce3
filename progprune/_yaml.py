"""Reading YAML as a spec needs it: YAML 1.2 scalars and a key given twice refused."""
from __future__ import annotations

import re

import yaml

from progprune.errors import SpecError


def parse_yaml(text: str, source: str | None = None):
    """`text` as plain data; a syntax error is a SpecError with its line and column."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (_Loader is a SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = " ".join(str(p) for p in (e.context, e.problem) if p)
        raise SpecError([f"YAML syntax error at {where}{what}"], source) from None
    except (yaml.YAMLError, RecursionError) as e:
        raise SpecError([f"YAML syntax error: {e}"], source) from None


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
                            f"duplicate key {key!r}", key_node.start_mark)
                    seen.add(key)
                except TypeError:  # unhashable key: the base class reports it
                    pass
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers
         if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                              re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))
