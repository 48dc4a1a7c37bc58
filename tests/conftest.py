"""Shared test setup: the `gpu` marker skips where no CUDA device is usable."""

from __future__ import annotations

from pathlib import Path

import pytest

from cupyquant._xp import gpu_available

FIXTURES = Path(__file__).parent / "fixtures" / "bnb-0.50.2"


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a usable CUDA device (cupy.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cp():
    """CuPy, for tests marked gpu."""
    import cupy

    return cupy
