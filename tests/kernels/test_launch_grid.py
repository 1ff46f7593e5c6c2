"""Launch grids against CUDA's limits: a grid's first axis may hold 2**31 - 1 programs, its second and third 65535
each. Batch·heads passes 65535 in large-batch inference (4375 sequences × 16 heads); every grid must still fit.
The kernels are not run: their launches are recorded (``compile_check.record_launches``) and each grid is
evaluated under every autotune config the launch would try."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA programming guide, compute capability 5.0 and later
B, H = 4375, 16


def launch_grids(launches) -> list[tuple[str, tuple[int, ...]]]:
    grids = []
    for name, kernel, args, kwargs, grid in launches:
        configs = getattr(kernel, "configs", [None])
        for config in configs:
            meta = {**dict(zip(kernel.arg_names, args)), **kwargs, **(config.all_kwargs() if config else {})}
            grids.append((name, tuple(grid(meta) if callable(grid) else grid)))
    return grids


def expanded(shape, dtype=torch.bfloat16):
    """A (B, H, ...) input without B·H copies: the kernels read through strides."""
    return torch.zeros(1, 1, *shape[2:], dtype=dtype).expand(*shape)


def drive(monkeypatch):
    check = importlib.import_module("ratplus_mega.kernels.compile_check")
    attn_fwd = importlib.import_module("ratplus_mega.kernels.sparse_attn.fwd")
    attn_bwd = importlib.import_module("ratplus_mega.kernels.sparse_attn.bwd")
    op = importlib.import_module("ratplus_mega.kernels.sparse_attn.op")
    gathered = importlib.import_module("ratplus_mega.kernels.sparse_attn.gathered")
    scan_fwd = importlib.import_module("ratplus_mega.kernels.scan.fwd")
    scan_bwd = importlib.import_module("ratplus_mega.kernels.scan.bwd")
    segments = importlib.import_module("ratplus_mega.kernels.scan.segments")
    T, K = 20, 16

    def attention():
        q, k, v = (expanded((B, H, T, K)) for _ in range(3))
        pattern = op.Pattern(4, 2, 1, K**-0.5, 0)
        out, lse = attn_fwd.attention_fwd(q, k, v, pattern)
        attn_bwd.attention_bwd(q, k, v, out, lse, expanded(out.shape), None, pattern)
        plan = gathered.plan_gathered_keys(torch.arange(0, 2 * T, 2), T, T, T, 4, 2, 1, q.device)
        shifted = op.Pattern(4, 2, 1, K**-0.5, T)
        out, lse = attn_fwd.attention_fwd(q, k, v, shifted, plan)
        attn_bwd.attention_bwd(q, k, v, out, lse, expanded(out.shape), None, shifted, plan)

    def scan():
        T_scan = 2 * scan_fwd.CHUNK
        gate, x, v = (expanded((B, H, T_scan, K)) for _ in range(3))
        outs, final, checkpoints = scan_fwd.scan_fwd(gate, [x, v], None, False)
        scan_bwd.scan_bwd(gate, [x, v], checkpoints, [expanded(o.shape) for o in outs], None, True, False)

    launches = check.record_launches(attention)
    for n in (1, 2):  # one walk over time, and time split into segments (summary, carry pass, rescan)
        monkeypatch.setattr(segments, "plan_segments", lambda *args, _n=n: _n)
        launches += check.record_launches(scan)
    return launches


def test_launch_grids_fit_cuda_limits_past_65535_batch_heads(kernels, monkeypatch):
    grids = launch_grids(drive(monkeypatch))
    assert {name for name, _ in grids} == {
        "sparse_attn_fwd_kernel", "attn_bwd_preprocess_kernel", "sparse_attn_bwd_far_kernel",
        "sparse_attn_bwd_window_kernel", "sparse_attn_bwd_dq_kernel", "gated_scan_fwd_kernel",
        "gated_scan_bwd_kernel", "segment_carry_kernel",
    }
    for name, grid in grids:
        assert all(0 < n <= limit for n, limit in zip(grid, CUDA_GRID_LIMITS)), f"{name}: grid {grid}"
        assert math.prod(grid) >= B * H, f"{name}: grid {grid} has fewer programs than batch·heads"


def test_attention_rejects_more_sequences_than_a_grid_axis_holds(kernels):
    x = expanded((65536, 1, 4, 16), torch.float32)
    with pytest.raises(ValueError, match="sparse_attention: at most 65535 sequences"):
        kernels.sparse_attention(x, x, x, 4, 2, 1)
