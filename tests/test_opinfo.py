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
