"""The pure arithmetic of ``benchmarks/kernels.py``: its allowed-pair count and its attention goal.

The benchmark itself needs a GPU; these are the numbers its goal column rests on, checked on any machine.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_kernels", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def explicit_mask(t: int, d: int, w: int, p: int) -> torch.Tensor:
    """RATPLUS_SPEC.md §1.3 as a boolean (query, key) matrix."""
    q, k = torch.arange(t)[:, None], torch.arange(t)[None, :]
    far = (k < p) | (((k + 1) % d == 0) if d > 0 else torch.zeros_like(k, dtype=torch.bool))
    return (k <= q) & ((q - k <= w) | far)


def test_allowed_pairs_counts_the_explicit_mask(bench):
    for t, d, w, p in itertools.product((1, 37, 128), (-1, 1, 2, 3, 16, 64), (0, 1, 5, 40), (0, 1, 4)):
        assert bench.allowed_pairs(t, d, w, p) == int(explicit_mask(t, d, w, p).sum()), (t, d, w, p)


def test_attention_goal_is_the_larger_of_scaled_dense_time_and_memory_floor(bench):
    copy_bw = 3e12  # bytes/s
    nbytes = 12 * 16 * 4096 * 128 * 2  # B1-H16-T4096-K128 bf16: 12 tensors
    floor_ms = nbytes / copy_bw * 1e3
    dense = bench.allowed_pairs(4096, 1, 0, 0)
    # D = 1: the dense pairs themselves, so the bound is SDPA's time / 0.6.
    assert bench.attention_goal_ms(2.0, dense, dense, nbytes, copy_bw) == pytest.approx(2.0 / 0.6)
    # D = 64 without a window: about 1/64 of the pairs; the memory floor decides.
    sparse = bench.allowed_pairs(4096, 64, 0, 4)
    assert sparse < dense / 32
    assert bench.attention_goal_ms(2.0, sparse, dense, nbytes, copy_bw) == pytest.approx(1.5 * floor_ms)
    assert "MISSED" in bench.attention_goal(1.6 * floor_ms, 2.0, 5.0, sparse, dense, nbytes, copy_bw)
    assert bench.attention_goal(1.4 * floor_ms, 2.0, 5.0, sparse, dense, nbytes, copy_bw).startswith("met")
    assert bench.attention_goal(1.4 * floor_ms, 2.0, 0.01, sparse, dense, nbytes, copy_bw).endswith("beats flex: NO")
    assert bench.attention_goal("OOM", 2.0, 5.0, sparse, dense, nbytes, copy_bw) == "n/a"


def test_table_prints_each_row_when_measured_then_all_aligned(bench, capsys):
    table = bench.Table()
    table.add(["scan B4-T4096", "triton gated_scan_kv", "0.250", "0.10", "0.50", "2500 GB/s = 80% of copy", "met"])
    assert "row: scan B4-T4096 | triton gated_scan_kv | 0.250" in capsys.readouterr().out
    table.add(["attn B1-T16384 D64-W256-P4", "flex two-call merge", "failed: RuntimeError", "n/a", "1.00", "", ""])
    table.show()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 2 + 2  # the second row as measured, then header, rule and both rows aligned
    assert len({len(line) for line in lines[1:]}) == 1 and lines[1].startswith("| case")
    assert "failed: RuntimeError" in lines[-1]
