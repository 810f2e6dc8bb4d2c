"""kdexp.registry.Registry and the did-you-mean helpers of kdexp.errors."""

from __future__ import annotations

import pytest

from kdexp.errors import UserError, did_you_mean, unknown_choice
from kdexp.registry import Registry


@pytest.fixture
def reg():
    r = Registry("widget")

    @r.register("zeta", color="blue", size=3)
    def zeta():
        return "z"

    r.add("alpha", 1)
    r.add("mango", [2], needs_teacher=True)
    return r


def test_register_returns_the_object_unchanged(reg):
    fn = reg.get("zeta")
    assert fn() == "z"
    assert fn.__name__ == "zeta"
    assert reg.get("alpha") == 1
    assert reg.get("mango") == [2]


def test_duplicate_name_raises(reg):
    with pytest.raises(ValueError, match="alpha"):
        reg.add("alpha", 2)
    with pytest.raises(ValueError):
        reg.register("zeta")(lambda: None)
    assert reg.get("alpha") == 1  # the first registration is kept


def test_unknown_name(reg):
    with pytest.raises(UserError) as info:
        reg.get("mangoo")
    msg = str(info.value)
    assert "widget" in msg and "mangoo" in msg
    assert "did you mean 'mango'?" in msg
    for name in ("alpha", "mango", "zeta"):
        assert name in msg
    # The choices are listed in sorted order.
    assert msg.index("alpha") < msg.index("mango", msg.index("choices")) < msg.rindex("zeta")


def test_unknown_name_without_close_match(reg):
    with pytest.raises(UserError) as info:
        reg.get("qqqqqqqq")
    msg = str(info.value)
    assert "did you mean" not in msg
    assert all(name in msg for name in ("alpha", "mango", "zeta"))


def test_meta(reg):
    assert reg.meta("zeta") == {"color": "blue", "size": 3}
    assert reg.meta("alpha") == {}
    assert reg.meta("mango") == {"needs_teacher": True}
    # meta() returns a copy: the registry cannot be changed through it.
    reg.meta("zeta")["color"] = "red"
    assert reg.meta("zeta")["color"] == "blue"
    with pytest.raises(UserError):
        reg.meta("nope")


def test_names_sorted_contains_iter(reg):
    assert reg.names() == ["alpha", "mango", "zeta"]
    assert list(reg) == ["alpha", "mango", "zeta"]
    assert "mango" in reg
    assert "banana" not in reg
    empty = Registry("thing")
    assert empty.names() == []
    with pytest.raises(UserError):
        empty.get("x")


def test_did_you_mean_helpers():
    assert did_you_mean("fkll", ["fkl", "rkl"]) == " did you mean 'fkl'?"
    assert did_you_mean("zzzzzz", ["fkl", "rkl"]) == ""
    err = unknown_choice("loss", "rkk", ["rkl", "fkl"])
    assert isinstance(err, UserError)
    assert "'rkk'" in str(err) and "did you mean 'rkl'?" in str(err)
    assert str(err).endswith("fkl, rkl")


def test_real_registries_are_consistent():
    from kdexp.data.templates import TEMPLATES
    from kdexp.losses.divergences import DIVERGENCES

    assert DIVERGENCES.names() == sorted(DIVERGENCES.names())
    for name in DIVERGENCES:
        assert "description" in DIVERGENCES.meta(name)
    assert {"alpaca", "compact", "none"} <= set(TEMPLATES)
