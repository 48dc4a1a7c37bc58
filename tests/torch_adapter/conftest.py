"""Fixtures of the torch adapter tests: device-parametrised tests run on the CPU, and on
CUDA under the `gpu` marker (skipped where no CUDA device is usable)."""

from __future__ import annotations

import pytest
import torch

from .helpers import DEVICES


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """cpu, and cuda under the gpu marker."""
    return torch.device(request.param)
