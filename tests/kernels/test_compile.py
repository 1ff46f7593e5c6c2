"""Every kernel variant the ops launch compiles for sm_90 (H100/H200) with its largest autotune tile.

The interpreter accepts programs the GPU compiler rejects, so this runs ``ratplus_mega.kernels.compile_check``
without it, in a child process (the interpreter switch of this folder's conftest is inherited by imports).
No GPU is needed: Triton's bundled ptxas produces the cubins.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

KERNELS = [
    "gated_scan_fwd_kernel", "gated_scan_bwd_kernel", "segment_carry_kernel", "sparse_attn_fwd_kernel",
    "attn_bwd_preprocess_kernel", "sparse_attn_bwd_far_kernel", "sparse_attn_bwd_window_kernel",
    "sparse_attn_bwd_dq_kernel",
]


def compile_check(*args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "ratplus_mega.kernels.compile_check", *args],
                         env=env, capture_output=True, text=True, timeout=1200)
    return run.returncode, run.stdout + run.stderr


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm90():
    returncode, report = compile_check("--arch", "90")
    assert returncode == 0, report
    assert "# 0 failure(s)" in report, report
    lines = [line for line in report.splitlines() if line.split() and line.split()[0] in KERNELS]
    assert {line.split()[0] for line in lines} == set(KERNELS), report
    # Both dtypes, both key modes (all keys / gathered), with and without the dilated grid, were built.
    attention = [line for line in report.splitlines() if line.startswith("sparse_attn_fwd_kernel")]
    for needle in ("PRECISION=ieee", "PRECISION=None", "GATHERED=True", "GATHERED=False", "HAS_GRID=False"):
        assert any(needle in line for line in attention), f"no forward variant with {needle}:\n{report}"
    # The scan as one walk and split into segments (the summary pass), forward and backward.
    for kernel in ("gated_scan_fwd_kernel", "gated_scan_bwd_kernel"):
        for needle in ("SUMMARY=True", "SUMMARY=False"):
            assert any(line.startswith(kernel) and needle in line for line in lines), f"{kernel} {needle}:\n{report}"
    # Every row carries registers, stack and shared bytes read back from the compiled kernel.
    assert all(re.search(r" \d+ +\d+ +\d+  \d+\.\ds", line) for line in lines), report


def test_only_selects_kernels_by_name():
    returncode, report = compile_check("--arch", "90", "--only", "preprocess", "--jobs", "1")
    assert returncode == 0, report
    rows = [line.split()[0] for line in report.splitlines() if line.split() and line.split()[0].endswith("_kernel")]
    assert rows and set(rows) == {"attn_bwd_preprocess_kernel"}, report
    returncode, report = compile_check("--only", "no_such_kernel")
    assert returncode == 1 and "no kernel name contains 'no_such_kernel'" in report, report
