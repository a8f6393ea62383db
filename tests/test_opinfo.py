"""OpInfo differential test: meshpar against the dense op on torch's OpInfo samples (float64, 2 ranks).

Each (op, operand kind) is pass / refuse / wrong / crash (see :mod:`meshpar.testing.opinfo`);
a refusal is an acceptable answer, a wrong number or a crash is not. The quick slice (everyday
ops, one sample per kind) runs in CI; the whole database runs under ``HYPOTHESIS_PROFILE=thorough``
or ``-m thorough``. ``bench/opinfo_coverage.py`` runs the whole database against DTensor too.
"""
from __future__ import annotations

import pytest

pytest.importorskip("expecttest", reason="torch's OpInfo database needs expecttest (pip install -e .[test])")

from meshpar.testing.opinfo import EVERYDAY, KINDS, failures, merge_ranks, run_ops, summarize  # noqa: E402


def _report(records) -> str:
    return "\n".join(f"{op} [{kind}] {st}: {detail[:300]}" for op, kind, st, detail in failures(records))


def test_everyday_ops_never_wrong(pool):
    records = merge_ranks(pool.run(run_ops, (2,), ("x",), list(EVERYDAY), KINDS, ("meshpar",), 1))
    summary = summarize(records, ("meshpar",))["meshpar"]
    assert sum(summary[k]["attempted"] for k in KINDS) >= len(EVERYDAY), summary   # the slice really ran
    bad = failures(records)
    assert not bad, f"{len(bad)} wrong/crash results:\n{_report(records)}"


@pytest.mark.thorough
def test_whole_opinfo_database_never_wrong(pool):
    before, pool.timeout_s = pool.timeout_s, 4 * 3600.0
    try:
        records = merge_ranks(pool.run(run_ops, (2,), ("x",), None, KINDS, ("meshpar",), 2))
    finally:
        pool.timeout_s = before
    bad = failures(records)
    assert not bad, f"{len(bad)} wrong/crash results:\n{_report(records)}"


# ---------------------------------------------------------------------------- the harness itself
class _FakeOp:
    """A minimal OpInfo stand-in for :func:`run_op`: one float64 sample of shape (4, 3)."""

    variant_test_name = ""
    supports_autograd = True

    def __init__(self, name: str):
        self.name = name
        self.memo: dict = {}

    def sample_inputs(self, device, dtype, requires_grad=False):
        import torch
        from torch.testing._internal.opinfo.core import SampleInput
        g = torch.Generator().manual_seed(0)
        yield SampleInput(torch.randn(4, 3, dtype=dtype, generator=g, requires_grad=requires_grad))

    def __call__(self, x):
        import torch

        from meshpar import ShardedTensor
        if not isinstance(x, ShardedTensor):
            return x * 2.0
        if self.name == "wrong_under_no_grad":
            return x * (3.0 if not torch.is_grad_enabled() else 2.0)
        # "stale_memo": a no-grad call memoises a plan that a later grad call replays wrongly
        key = (x.spec, tuple(x.shape))
        if not torch.is_grad_enabled():
            self.memo[key] = 3.0
            return x * 2.0
        return x * self.memo.get(key, 2.0)


def _run_fake(mesh, name):
    from meshpar.testing.opinfo import run_op
    return run_op(_FakeOp(name), mesh, KINDS, ("meshpar",))


@pytest.mark.parametrize("name", ["wrong_under_no_grad", "stale_memo"])
def test_harness_calls_twice_no_grad_first(pool, name):
    """Each sample runs under no_grad, then with grad, both compared with dense: a defect that shows
    only without autograd, or only when a second call replays what the first memoised, is caught."""
    rec = merge_ranks([[r] for r in pool.run(_run_fake, (2,), ("x",), name)])[0]
    statuses = {k: v["status"] for k, v in rec["results"]["meshpar"].items()}
    assert statuses == {k: "wrong" for k in KINDS}, rec
