"""progprune.registry.Registry: register (three forms), duplicates refused, get with
did-you-mean and the valid list, natural order."""
from __future__ import annotations

import pytest

from progprune.errors import BadInput
from progprune.registry import Registry, natural_key


def _models() -> Registry:
    reg = Registry("model", field="models")

    @reg.register
    def resnet110(num_classes):
        return ("resnet110", num_classes)

    @reg.register("resnet20")
    def _r20(num_classes):
        return ("resnet20", num_classes)

    reg.register("resnet56", lambda num_classes: ("resnet56", num_classes))
    return reg


def test_three_ways_to_register_return_the_object():
    reg = Registry("thing")
    obj = object()
    assert reg.register("a", obj) is obj

    def fn():
        pass

    assert reg.register(fn) is fn and reg.register("named")(fn) is fn
    assert reg.get("a") is obj and reg.get("fn") is fn and reg.get("named") is fn


def test_names_in_natural_order_everywhere():
    reg = _models()
    assert reg.names() == ["resnet20", "resnet56", "resnet110"]
    assert list(reg) == reg.names() and [n for n, _ in reg.items()] == reg.names()
    assert len(reg) == 3 and "resnet56" in reg and "resnet57" not in reg
    assert reg.get("resnet110")(10) == ("resnet110", 10)
    assert sorted(["b10", "b9", "a"], key=natural_key) == ["a", "b9", "b10"]


def test_a_name_registered_twice_is_refused_and_the_first_kept():
    reg = _models()
    first = reg.get("resnet20")
    with pytest.raises(ValueError, match="model 'resnet20' registered twice"):
        reg.register("resnet20", object())
    with pytest.raises(ValueError):
        @reg.register
        def resnet56():
            pass
    assert reg.get("resnet20") is first and len(reg) == 3


def test_unknown_name_is_bad_input_with_the_closest_and_the_valid_ones():
    reg = _models()
    with pytest.raises(BadInput) as e:
        reg.get("resnet21")
    assert e.value.field == "models" and e.value.exit_code == 2
    assert str(e.value) == ("models: unknown model 'resnet21'; did you mean 'resnet20'? "
                            "valid: resnet20, resnet56, resnet110")


def test_unknown_without_a_close_name_lists_the_valid_ones():
    reg = _models()
    assert reg.unknown("transformer") == "unknown model 'transformer'; valid: resnet20, resnet56, resnet110"
    assert reg.unknown("RESNET56") == ("unknown model 'RESNET56'; did you mean 'resnet56'? "
                                       "valid: resnet20, resnet56, resnet110")  # case differs only


def test_a_name_of_the_wrong_type_is_bad_input_too():
    reg = _models()
    with pytest.raises(BadInput, match=r"unknown model \['resnet20'\]; valid"):
        reg.get(["resnet20"])  # unhashable: not a TypeError
    assert reg.unknown(7) == "unknown model 7; valid: resnet20, resnet56, resnet110"
