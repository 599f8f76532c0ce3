"""progprune.errors: the hierarchy's exit codes, one_line, did_you_mean, SpecError's wording."""
from __future__ import annotations

import pytest

from progprune.errors import (BadInput, CombinationFailed, Problem, ProgpruneError, SpecError,
                              closest_names, did_you_mean, one_line, show)


def test_exit_codes_follow_the_hierarchy():
    assert issubclass(SpecError, BadInput) and issubclass(BadInput, ProgpruneError)
    assert issubclass(CombinationFailed, ProgpruneError) and not issubclass(CombinationFailed, BadInput)
    assert (ProgpruneError("x").exit_code, BadInput("x").exit_code, SpecError("x").exit_code,
            CombinationFailed("x").exit_code) == (1, 2, 2, 1)


def test_field_prefixes_the_message_and_stays_readable():
    e = BadInput("file not found", field="models[0].checkpoint")
    assert str(e) == "models[0].checkpoint: file not found"
    assert (e.message, e.field) == ("file not found", "models[0].checkpoint")
    assert str(BadInput("plain")) == "plain"


def test_spec_error_joins_its_problems_after_the_source():
    e = SpecError([Problem("finetune.epochs", "must be >= 0, got -1"), "no path"], source="s.yaml")
    assert str(e) == "s.yaml: finetune.epochs: must be >= 0, got -1; no path"
    assert e.problems == ["finetune.epochs: must be >= 0, got -1", "no path"]
    assert SpecError(Problem("a", "b")).problems == ["a: b"]


@pytest.mark.parametrize("exc, kw, expected", [
    (ValueError("first\nsecond"), {}, "first"),
    (ValueError("\n\n  indented first  \nsecond"), {}, "indented first"),
    (ValueError(""), {}, "ValueError"),                       # empty: the type names it
    (ValueError(""), {"with_type": True}, "ValueError"),      # not "ValueError: ValueError"
    (OSError("disk full"), {"with_type": True}, "OSError: disk full"),
    (ValueError("x" * 300), {}, "x" * 197 + "..."),
    (ValueError("abcdef"), {"limit": 5}, "ab..."),
    (ValueError("abcde"), {"limit": 5}, "abcde"),
])
def test_one_line(exc, kw, expected):
    assert one_line(exc, **kw) == expected


def test_one_line_never_spans_lines_or_exceeds_its_limit():
    text = one_line(RuntimeError("a" * 500 + "\n" + "b" * 10), limit=50)
    assert "\n" not in text and len(text) == 50


def test_did_you_mean():
    options = ["resnet20", "resnet56", "vgg11", "mobilenetv2"]
    assert did_you_mean("resnet21", options) == "; did you mean 'resnet20'?"  # ties: longer prefix
    assert did_you_mean("vgg_11", options) == "; did you mean 'vgg11'?"
    assert did_you_mean("transformer", options) == ""


def test_did_you_mean_without_options_is_empty():
    # difflib refuses n=0 (ValueError): an empty registry's unknown() must list nothing, not crash
    assert did_you_mean("x", []) == ""
    assert closest_names("x", iter(())) == []


def test_closest_names_best_first_and_capped():
    names = closest_names("resnet2", ["resnet20", "resnet56", "resnet110", "vgg11"], n=2)
    assert names == ["resnet20", "resnet56"]
    assert closest_names("zzz", ["resnet20"]) == []


def test_show_quotes_and_cuts():
    assert show("a") == "'a'"
    long = show("y" * 100)
    assert len(long) == 60 and long.endswith("...")
