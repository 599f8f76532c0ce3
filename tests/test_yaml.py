"""progprune._yaml: plain scalars read by the YAML 1.2 core schema (the README's promise), in
the parser itself and through a spec file; what progprune writes reads back the same."""
from __future__ import annotations

import math

import pytest
import yaml

from progprune._yaml import dump_yaml, parse_yaml
from progprune.errors import SpecError
from progprune.spec import dump_yaml as dump_spec, load_spec, load_spec_dict


@pytest.mark.parametrize("text, value", [
    # ints: decimal (leading zeros are decimal), 0o octal, 0x hex
    ("010", 10), ("0o10", 8), ("0x1F", 31), ("-0", 0), ("+7", 7), ("0", 0),
    # floats
    ("5e-4", 5e-4), ("1E-2", 0.01), ("1.", 1.0), (".5", 0.5), ("+.5", 0.5), ("1.5e+3", 1500.0),
    ("-.inf", -math.inf), (".Inf", math.inf),
    # booleans: these six only
    ("true", True), ("True", True), ("FALSE", False),
    # null
    ("null", None), ("~", None), ("", None), ("NULL", None),
    # strings in YAML 1.2 (YAML 1.1 read each as something else)
    ("1:30", "1:30"), ("1_000", "1_000"), ("0b11", "0b11"), ("+0o7", "+0o7"), ("0o8", "0o8"),
    ("yes", "yes"), ("no", "no"), ("on", "on"), ("off", "off"), ("y", "y"), ("Yes", "Yes"),
    ("2024-01-01", "2024-01-01"), ("=", "="), ("1.2.3", "1.2.3"),
], ids=repr)
def test_plain_scalars_follow_the_yaml_1_2_core_schema(text, value):
    assert parse_yaml(f"a: {text}\n") == {"a": value}
    assert type(parse_yaml(f"a: {text}\n")["a"]) is type(value)


def test_nan_is_a_float():
    assert math.isnan(parse_yaml("a: .nan")["a"])


@pytest.mark.parametrize("text, value", [("!!int '010'", 10), ("!!int 0o10", 8), ("!!str 010", "010"),
                                         ("!!float 1", 1.0), ("!!bool 'true'", True)])
def test_explicit_tags_read_by_the_same_rules(text, value):
    assert parse_yaml(f"a: {text}") == {"a": value}


@pytest.mark.parametrize("text", ["!!bool yes", "!!int 1_000", "!!int 1:30", "!!float abc",
                                  "!!timestamp nope",
                                  "!!timestamp 2024-01-01", "!!binary aGk=", "!!set {a}"])
def test_a_tag_its_text_does_not_fit_is_one_spec_error(text):
    with pytest.raises(SpecError, match="YAML syntax error"):
        parse_yaml(f"a: {text}", "s.yaml")


def test_pyyaml_own_safe_loader_is_left_alone():
    import progprune.spec  # noqa: F401 (everything that reads YAML is imported)

    assert yaml.safe_load("a: [010, 1:30, yes]") == {"a": [8, 90, True]}


# ---- through a spec file ---------------------------------------------------------------------
def _spec(tmp_path, body: str):
    p = tmp_path / "s.yaml"
    p.write_text("name: y\nmodels: [resnet20]\nspeedups: [2]\n" + body)
    return p


@pytest.mark.parametrize("seeds, expected", [("[010]", (10,)), ("[0o10]", (8,)), ("[0x1F]", (31,)),
                                             ("[007, 1_0]", None), ("[1:30]", None)])
def test_spec_seeds(tmp_path, seeds, expected):
    p = _spec(tmp_path, f"seeds: {seeds}\n")
    if expected is not None:
        assert load_spec(p).seeds == expected
        return
    with pytest.raises(SpecError) as e:
        load_spec(p)
    bad = "1_0" if "1_0" in seeds else "1:30"
    assert e.value.problems == [f"seeds[{1 if bad == '1_0' else 0}]: must be an integer in "
                                f"[0, 4294967295], got '{bad}'"]


@pytest.mark.parametrize("word", ["yes", "on", "off", "no", "y"])
def test_spec_yes_on_off_are_not_booleans(tmp_path, word):
    with pytest.raises(SpecError, match=f"finetune.use_gpu: must be true or false, got '{word}'"):
        load_spec(_spec(tmp_path, f"finetune: {{use_gpu: {word}}}\n"))


@pytest.mark.parametrize("name", ["0o10", "1e3", "010", "yes", "0x1f", "1.5", "null"])
def test_a_resolved_spec_reads_back_the_same(tmp_path, name):
    """The resolved spec (sweep output's spec.resolved.yaml, prune --print-spec) names a sweep
    whose name reads as a number or a boolean in YAML 1.1 or 1.2: quoted, so both read it back."""
    s = load_spec_dict({"name": name, "models": "resnet20", "speedups": 2})
    text = dump_spec(s)
    p = tmp_path / "resolved.yaml"
    p.write_text(text)
    assert load_spec(p) == s
    assert yaml.safe_load(text)["name"] == name  # a YAML 1.1 reader too


def test_dump_yaml_reads_back_by_either_version():
    data = {"s": ["010", "0o10", "1e3", "yes", "1:30", "x", "", "null", ".5", "~", "0x1F"],
            "n": [1, 2.5, 1e-5, None, True, math.inf, -0.0, 10 ** 20]}
    text = dump_yaml(data)
    assert parse_yaml(text) == data and yaml.safe_load(text) == data
