"""The unit tier never starts Ray: a test that leaves a Ray instance running fails here."""

from __future__ import annotations

import sys

import pytest


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture(autouse=True)
def no_ray_started():
    """(In a whole-suite run the session's Ray of the other tiers may already be up: only a new one counts.)"""
    before = _ray_running()
    yield
    assert before or not _ray_running(), "a unit test started Ray; it belongs in tests/ray or tests/e2e"
