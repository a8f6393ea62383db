"""P semantics, layout math and the reshard planner (single process, no collectives)."""
from __future__ import annotations

import pickle

import pytest

from meshpar import P
from meshpar.sharding.reshard import Step, plan


def test_p_semantics():
    assert P("x", None) == P("x")
    assert P(("x",)) == P("x")
    assert hash(P("x", ("y", "z"))) == hash(P("x", ("y", "z")))
    assert P("x").axes_of(0) == ("x",) and P("x").axes_of(3) == ()
    assert P(None, ("y", "z")).axes_of(1) == ("y", "z")
    assert P("x", unreduced=["y"]) != P("x")
    assert P("x", unreduced=["y"]).reduced() == P("x")
    assert P("x", ("y", "z")).used_axes() == {"x", "y", "z"}
    assert pickle.loads(pickle.dumps(P("x", unreduced=["y"]))) == P("x", unreduced=["y"])
    with pytest.raises(AttributeError):
        P("x").entries = ()
    with pytest.raises(TypeError):
        P(3)


def test_plan_gather_slice_alltoall_reduce():
    assert plan(P("x"), P(), 2) == [Step("all_gather", ("x",), 0)]
    assert plan(P(), P(None, "x"), 2) == [Step("slice", ("x",), 1)]
    assert plan(P("x"), P(None, "x"), 2) == [Step("all_to_all", ("x",), 1, 0)]
    assert plan(P(unreduced=["x"]), P("x"), 2) == [Step("reduce_scatter", ("x",), 0)]
    assert plan(P(unreduced=["x"]), P(), 2) == [Step("psum", ("x",))]
    assert plan(P(("x", "y")), P("x"), 1) == [Step("all_gather", ("y",), 0)]
    assert plan(P("x"), P(("x", "y")), 1) == [Step("slice", ("y",), 0)]
    assert plan(P("x", "y"), P("x", "y"), 2) == []
