"""Fixtures of the benchmark tests: ``benchmarks/kernels.py`` loaded as a module (``kernels`` and ``device`` come
from tests/conftest.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bench():
    """``benchmarks/kernels.py`` as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"
    spec = importlib.util.spec_from_file_location("benchmark_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
