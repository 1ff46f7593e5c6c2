"""``benchmarks/kernels.py`` end to end at a tiny shape, each timing replaced by one forward + backward call:
every row a GPU run prints is built here, so device time is not lost to an error in the script itself."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_benchmark_builds_every_row(bench, kernels, device, monkeypatch):
    def run_once(step, leaves):
        for leaf in leaves:
            leaf.grad = None
        step()
        for leaf in leaves:  # every implementation's backward reaches every input
            assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
        return 1.0

    monkeypatch.setattr(bench, "DEVICE", device)
    monkeypatch.setattr(bench, "HEADS", 2)
    monkeypatch.setattr(bench, "HEAD_DIM", 16)
    monkeypatch.setattr(bench, "compiled", lambda fn: fn)  # eager: torch.compile on CPU needs a C++ toolchain
    monkeypatch.setattr(bench, "time_ms", run_once)
    # associative_scan compiles itself even when called eagerly: after test_kernels.py has run it at another shape,
    # dynamo would recompile with dynamic shapes, under which its backward fails ("gradients for lifted
    # parameters"). Start from empty compile caches, as the benchmark script does.
    torch._dynamo.reset()
    table = bench.Table()
    shapes = [(1, 140)]  # long enough for a D = 64 grid key (positions 63 and 127)
    bench.scan_rows(shapes, 1e12, table)
    bench.attention_rows(shapes, 1e12, table)

    assert len(table.rows) == 4 + 1 + 2 * len(bench.PATTERNS)
    assert all(len(row) == len(bench.Table.HEADER) for row in table.rows)
    # torch has no flex_attention backward on CPU (its forward is checked in tests/benchmarks/test_kernels.py).
    flex_time = "failed: NotImplementedError" if device == "cpu" else "1.000"
    assert all(row[2] == (flex_time if row[1].startswith("flex") else "1.000") for row in table.rows)
    triton_rows = [row for row in table.rows if row[1].startswith("triton")]
    assert len(triton_rows) == 2 + len(bench.PATTERNS)
    assert all(row[-1].startswith(("met", "MISSED")) for row in triton_rows)
    topk_table = bench.Table()
    bench.topk_rows(shapes, topk_table)  # three blocks of 64: selection among the complete ones
    assert len(topk_table.rows) == 2 * len(bench.TOPK_PATTERNS)
    assert all(len(row) == len(bench.Table.HEADER) and row[2] == "1.000" for row in topk_table.rows)
