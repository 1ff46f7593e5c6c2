"""Kernel tests run under the Triton interpreter on CPU (TRITON_INTERPRET=1) and natively on a GPU.

Triton decides between interpreter and compiler when a kernel is decorated, i.e. when the kernel modules are
imported: the variable is set here (and in tests/conftest.py), first, and tests reach the kernels only through
the ``kernels`` fixture of tests/conftest.py, which re-imports them if another test file imported them earlier
without the interpreter.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from contextlib import contextmanager  # noqa: E402

import pytest  # noqa: E402


@contextmanager
def _nan_poisoned_empty():
    """``torch.empty``/``empty_like`` fill floating tensors with NaN: every output or scratch element a kernel
    fails to write (or reads before writing) shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **kw: poison(empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poison(empty_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


@pytest.fixture
def nan_poison():
    """Context manager: run kernel calls (forward and backward) inside it to NaN-poison their buffers."""
    return _nan_poisoned_empty
