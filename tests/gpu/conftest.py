"""The GPU rung: every test in this folder is marked ``gpu`` and, unless it can run, skipped with one line
saying why.

``EE_MEGATRON_GPU_TESTS=1 python -m pytest -q -m gpu tests/gpu`` runs it on CUDA (NCCL for the tests
needing two GPUs or more); the CPU suite hides CUDA (``tests/conftest.py``), so there it is skipped.
``EE_MEGATRON_GPU_TESTS=cpu`` runs the same tests with the CPU standing in for the GPU (gloo for NCCL):
the comparisons are then CPU against CPU and prove nothing about CUDA, but the rung itself is checked
to run end to end on a machine without a GPU.

The tiny runs reuse the gloo parity tests' argv builder and harness (``megatron/testing/training.py``)
and the fp32 attention reference of the unit tests (``megatron/testing/attention.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent

MODE = os.environ.get("EE_MEGATRON_GPU_TESTS")
DRY_RUN = MODE == "cpu"


def _skip_reason() -> str | None:
    if MODE not in ("1", "cpu"):
        return "GPU rung: run it with EE_MEGATRON_GPU_TESTS=1 python -m pytest -m gpu tests/gpu (CUDA is hidden here)"
    if MODE == "1" and not torch.cuda.is_available():
        return "GPU rung: no CUDA device visible"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _skip_reason()
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device under test (the CPU in a dry run)."""
    return torch.device("cpu" if DRY_RUN else "cuda")


@pytest.fixture(scope="session")
def device_flag(device) -> str:
    return device.type


@pytest.fixture(scope="session")
def half() -> torch.dtype:
    return torch.bfloat16


@pytest.fixture(scope="session")
def num_devices() -> int:
    """Devices a multi-process test may use (two in a dry run, played by CPU processes)."""
    return 2 if DRY_RUN else torch.cuda.device_count()


@pytest.fixture(scope="session")
def backend() -> str:
    return "gloo" if DRY_RUN else "nccl"
