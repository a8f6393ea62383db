"""Shared fixtures: one persistent gloo pool per test session, hypothesis profiles.

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (the default) draws 30 random examples per property
(tests may lower it with their own ``@settings`` where one example is expensive); ``thorough``
draws 150 and also enables the tests marked ``thorough`` (the whole OpInfo database).
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from meshpar.testing import WorkerPool

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=30, deadline=None, database=None, print_blob=True,
                          suppress_health_check=_SUPPRESS)
settings.register_profile("ci-fixed", max_examples=30, deadline=None, derandomize=True, suppress_health_check=_SUPPRESS)
settings.register_profile("dev", max_examples=6, deadline=None, print_blob=True, suppress_health_check=_SUPPRESS)
settings.register_profile("thorough", max_examples=150, deadline=None, print_blob=True, suppress_health_check=_SUPPRESS)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``thorough`` run only under HYPOTHESIS_PROFILE=thorough or ``-m thorough``."""
    if PROFILE == "thorough" or "thorough" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="thorough: run with HYPOTHESIS_PROFILE=thorough or -m thorough")
    for item in items:
        if "thorough" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pool():
    p = WorkerPool(world_size=int(os.environ.get("MESHPAR_TEST_WORLD", "8")))
    yield p
    p.close()


@pytest.fixture(scope="session")
def world_size() -> int:
    return int(os.environ.get("MESHPAR_TEST_WORLD", "8"))
