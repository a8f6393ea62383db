"""Shared fixtures: one persistent 8-rank gloo pool per test session, hypothesis profiles."""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from meshpar.testing import WorkerPool

settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=150, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def pool():
    p = WorkerPool(world_size=int(os.environ.get("MESHPAR_TEST_WORLD", "8")))
    yield p
    p.close()
