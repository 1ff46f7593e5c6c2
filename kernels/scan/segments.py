"""Time split into segments run in parallel, for shapes whose batch·heads·channels alone give too few programs.

With S segments a scan runs in three launches: each segment's summary (the product of its gates and its end
state from zero, the affine map it applies to the carry), ``segment_carry_kernel``'s short sequential pass that
turns the summaries into the carry entering every segment, and the segments again from those carries. The
inputs are read twice, so segments are used only when they buy parallelism (``plan_segments``). Backward runs
the same three steps in reverse time, for Λ.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl

# One walk over all chunks per (batch·head, channel block of 32) while that gives at least this many programs
# per SM; below it, time is split so that there are about TARGET_PROGRAMS_PER_SM. Estimates for H100-class
# chips (kernels/scan/README.md), to be tuned from benchmarks/kernels.py.
MIN_PROGRAMS_PER_SM = 1
TARGET_PROGRAMS_PER_SM = 4


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_segments(bh: int, channels: int, chunks: int, device: torch.device) -> int:
    """How many time segments to scan in parallel (1: one walk over all ``chunks``); one on CPU tensors."""
    if device.type != "cuda":
        return 1
    programs = bh * triton.cdiv(channels, 32)
    sms = _sm_count(device)
    if programs >= MIN_PROGRAMS_PER_SM * sms:
        return 1
    return min(chunks, triton.cdiv(TARGET_PROGRAMS_PER_SM * sms, programs))


def segment_layout(chunks: int, segments: int) -> tuple[int, int]:
    """(segments, chunks per segment) with no empty segment; an empty sequence is one segment of no chunks (the
    kernels then pass the initial state, or its gradient, straight through)."""
    if chunks == 0:
        return 1, 0
    per_segment = triton.cdiv(chunks, max(1, min(segments, chunks)))
    return triton.cdiv(chunks, per_segment), per_segment


@triton.jit
def segment_carry_kernel(sa, sb, init, carries, BH, C, NSEG, NUM_X: tl.constexpr, USE_INIT: tl.constexpr,
                         REVERSE: tl.constexpr, BC: tl.constexpr):
    """carries[x, bh, s] = the carry entering segment s (in scan order: from the left, or from the right with
    REVERSE), from the segment maps y ↦ sa[bh, s]·y + sb[x, bh, s] and the initial carry ``init[x, bh]``."""
    i_bh, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    for i_x in tl.static_range(NUM_X):
        if USE_INIT:
            b_carry = tl.load(init + (i_x * BH + i_bh) * C + o_c, mask=m_c, other=0).to(tl.float32)
        else:
            b_carry = tl.zeros([BC], dtype=tl.float32)
        for j in range(0, NSEG):
            if REVERSE:
                i_s = NSEG - 1 - j
            else:
                i_s = j
            tl.store(carries + ((i_x * BH + i_bh) * NSEG + i_s) * C + o_c, b_carry, mask=m_c)
            b_a = tl.load(sa + (i_bh * NSEG + i_s) * C + o_c, mask=m_c, other=0)
            b_b = tl.load(sb + ((i_x * BH + i_bh) * NSEG + i_s) * C + o_c, mask=m_c, other=0)
            b_carry = b_a * b_carry + b_b


def segment_carries(summary_a: torch.Tensor, summary_b: torch.Tensor, init: torch.Tensor | None,
                    reverse: bool) -> torch.Tensor:
    """The carries (NUM_X, BH, S, C) fp32 entering each segment, from the summaries (BH, S, C) and
    (NUM_X, BH, S, C) and the initial carry (NUM_X, BH, C) or None for zeros."""
    nx, bh, nseg, c = summary_b.shape
    carries = torch.empty_like(summary_b)
    block = min(128, max(16, triton.next_power_of_2(c)))
    segment_carry_kernel[(bh, triton.cdiv(c, block))](
        summary_a, summary_b, init if init is not None else summary_b, carries, bh, c, nseg,
        NUM_X=nx, USE_INIT=init is not None, REVERSE=reverse, BC=block,
    )
    return carries


def run_scan(launch: Callable, init: torch.Tensor | None, nx: int, bh: int, channels: int, chunks: int,
             device: torch.device, *, reverse: bool) -> None:
    """Runs a scan kernel as planned: one walk from ``init``, or the summary pass, the carry pass and the rescan.

    ``launch(carries, summary_a, summary_b, summary, nseg, seg)`` launches the kernel over ``nseg`` segments of
    ``seg`` chunks: from ``carries`` ((nx, bh, nseg, C), None for zeros), or, with ``summary``, from zero writing the
    segment maps into ``summary_a`` (bh, nseg, C) and ``summary_b`` (nx, bh, nseg, C) (None when not summarising).
    """
    nseg, seg = segment_layout(chunks, plan_segments(bh, channels, chunks, device))
    if nseg == 1:
        launch(init, None, None, False, nseg, seg)
        return
    summary_a = torch.empty((bh, nseg, channels), dtype=torch.float32, device=device)
    summary_b = torch.empty((nx, bh, nseg, channels), dtype=torch.float32, device=device)
    launch(None, summary_a, summary_b, True, nseg, seg)
    launch(segment_carries(summary_a, summary_b, init, reverse=reverse), None, None, False, nseg, seg)
