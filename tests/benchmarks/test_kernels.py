"""What ``benchmarks/kernels.py`` rests on, checked on any machine: its allowed-pair count, its goal arithmetic
and its baselines (each computes the function the fused kernel computes, or the timings compare nothing).

The timings themselves need a GPU; test_kernels_rows.py runs the script's rows end to end.
"""

from __future__ import annotations

import itertools

import pytest
import torch


def explicit_mask(t: int, d: int, w: int, p: int) -> torch.Tensor:
    """docs/spec.md §1.3 as a boolean (query, key) matrix."""
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


def test_official_scan_baseline_computes_the_recurrence(bench, loop_scan):
    """The compiled-scan baseline (run eagerly here) is the recurrence over [k | v], against a step loop."""
    torch.manual_seed(0)
    gate = torch.rand(1, 2, 37, 8, dtype=torch.float64).float()
    k, v = torch.randn(2, 1, 2, 37, 8)
    expected, _ = loop_scan(torch.cat([gate, gate], -1), torch.cat([k, v], -1), None)
    torch.testing.assert_close(bench.official_scan(gate, k, v), expected.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("pattern", [(1, 0, 4), (3, 5, 4), (16, 0, 4), (16, 20, 4), (4, 0, 0), (64, 10, 4)])
def test_flex_two_call_baseline_computes_the_pattern(bench, monkeypatch, pattern):
    """The flex baseline (run eagerly here) is attention under the spec's mask: timing it against the fused
    kernel compares the same function. T = 70 leaves the grid's length off flex's block size, and the first
    rows have no grid key (the grid call's LSE is -inf there)."""
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "compiled", lambda fn: fn)
    torch.manual_seed(0)
    t, dim = 70, 16
    q, k, v = torch.randn(3, 1, 2, t, dim)
    scores = (q @ k.transpose(-1, -2)) * dim**-0.5
    expected = scores.masked_fill(~explicit_mask(t, *pattern), float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(bench.flex_merge_fn(t, pattern)(q, k, v), expected, atol=1e-5, rtol=1e-5)
