"""Every kernel variant the ops launch compiles for sm_90 (H100/H200) with its largest autotune tile, and its
PTX uses the tensor cores and vectorised reads.

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
    "sparse_attn_bwd_dq_kernel", "block_attn_fwd_kernel", "block_attn_bwd_dq_kernel", "block_attn_bwd_dkdv_kernel",
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
    # The selected-blocks kernels: both block sizes (key tiles of 64 and 16).
    for needle in ("BLOCK_N=64", "BLOCK_N=16"):
        assert any(line.startswith("block_attn_bwd_dkdv") and needle in line for line in lines), report
    # Every row carries registers, stack and shared bytes read back from the compiled kernel, and what its PTX
    # does: bf16 dots on sm_90's tensor cores (wgmma), tiles read 16 bytes per thread, nothing read under
    # 4 bytes (a bf16 tile read element by element).
    for line in lines:
        found = re.search(r" \d+ +\d+ +\d+  (\S+) +(\d+) +(\d+)  \d+\.\ds", line)
        assert found, f"no usage columns in: {line}"
        mma, ld16, narrow = found.group(1), int(found.group(2)), int(found.group(3))
        blocks = line.startswith("block_attn")
        # The selected-blocks kernels read one byte of their plan per block or tile visited (a scalar flag).
        assert narrow == (1 if blocks else 0), f"reads under 4 bytes: {line}"
        if line.split()[0] != "segment_carry_kernel":  # a carry pass over one state row per segment
            assert ld16 > 0, f"no 16-byte reads: {line}"
        tensor_core_dots = line.startswith(("sparse_attn_fwd", "sparse_attn_bwd", "block_attn")) \
            and "PRECISION=None" in line
        # wgmma needs 64 rows per warp group: a dK/dV tile of 16 keys (blocks of 8) runs Ampere's mma.sync.
        narrow_rows = line.startswith("block_attn_bwd_dkdv") and "BLOCK_N=16" in line
        expected = ("mma" if narrow_rows else "wgmma") if tensor_core_dots else "-"
        assert mma == expected, f"tensor-core instruction {mma!r}, expected {expected!r}: {line}"


def test_ptx_instructions_reads_tensor_cores_and_load_widths():
    from ratplus_mega.kernels.compile_check import ptx_instructions

    ptx = """
        wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};
        @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
        ld.global.L1::evict_last.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd2 + 0 ];
        cp.async.cg.shared.global [ %r9 + 0 ], [ %rd3 + 0 ], 0x10, %r10;
        @%p2 cp.async.ca.shared.global [ %r9 + 0 ], [ %rd4 + 0 ], 0x4, %r10;
        ld.global.b32 { %r11 }, [ %rd5 + 0 ];
        @%p3 ld.global.b16 { %rs1 }, [ %rd6 + 0 ];
        cp.async.ca.shared.global [ %r12 + 0 ], [ %rd7 + 0 ], 0x2, %r13;
    """
    assert ptx_instructions(ptx) == {"MMA": "wgmma", "LD16": 3, "LD_NARROW": 2}
    assert ptx_instructions("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...};")["MMA"] == "mma"
    assert ptx_instructions("fma.rn.f32 %f1, %f2, %f3, %f4;") == {"MMA": "-", "LD16": 0, "LD_NARROW": 0}


def test_only_selects_kernels_by_name():
    returncode, report = compile_check("--arch", "90", "--only", "preprocess", "--jobs", "1")
    assert returncode == 0, report
    rows = [line.split()[0] for line in report.splitlines() if line.split() and line.split()[0].endswith("_kernel")]
    assert rows and set(rows) == {"attn_bwd_preprocess_kernel"}, report
    returncode, report = compile_check("--only", "no_such_kernel")
    assert returncode == 1 and "no kernel name contains 'no_such_kernel'" in report, report
