"""Forward of the gated linear recurrence h_t = f_t·h_{t-1} + (1 - f_t)·x_t (docs/spec.md §1.2 step 5).

One program per (batch·head, channel block) walks time in chunks of ``BT`` steps. A chunk is loaded as one
(BT, BC) tile, so all of its loads are in flight together, and scanned in registers with
``tl.associative_scan`` over the affine maps y ↦ f·y + (1 - f)·x: the inclusive scan gives, for every step, the
product of the chunk's gates so far (A) and the state reached from zero (B), and h = A·carry + B. Only
products of gates in (0, 1) appear, no exp/log, so gates arbitrarily close to 0 or 1 cannot overflow. The
carry entering each chunk is written to a small fp32 checkpoint buffer (1/BT of the states) from which the
backward recomputes the states (kernels/scan/README.md). With ``NUM_X = 2`` one gate tile drives two
sequences (the layer's keys and values). With ``GATE_LOGITS`` the gate input is the pre-activation g and
f = sigmoid(g) is taken in fp32 on load, so the layer never materialises the fp32 gate. Shapes with too few
(batch·head, channel block) programs for the GPU also split time into segments (segments.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import segments

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Time steps per chunk: the tile height of both kernels and the spacing of the saved fp32 carries, so it sets
# the checkpoint memory (T / CHUNK fp32 states). Short under the interpreter so that small test sequences
# cross several chunk boundaries (and its per-element scan stays affordable).
CHUNK = 16 if INTERPRET else 64


def scan_configs(*, bwd: bool = False) -> list[triton.Config]:
    """Channel-block and warp choices; a single config under the interpreter (autotuning there is useless).
    The backward of keys and values spills registers at 64 channels on sm_90 (compile_check), so it stops at 32."""
    if INTERPRET:
        return [triton.Config({"BC": 16}, num_warps=1)]
    shapes = [(16, 2), (16, 4), (32, 4), (32, 8)] + ([] if bwd else [(64, 8)])
    return [triton.Config({"BC": bc}, num_warps=w) for bc, w in shapes]


@triton.jit
def affine_combine(a1, b1, a2, b2):
    """Composition of y ↦ a1·y + b1 (earlier) and y ↦ a2·y + b2 (later)."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def affine_combine_pair(a1, b1, c1, a2, b2, c2):
    """``affine_combine`` for two sequences sharing the multiplier (the layer's keys and values)."""
    return a1 * a2, b1 * a2 + b2, c1 * a2 + c2


@triton.jit
def load_gate(p_g, mask, GATE_LOGITS: tl.constexpr):
    """f in fp32: the stored gate, or the sigmoid of the stored pre-activation; 1 where masked (the identity
    step). (The value is set after the load: the interpreter keeps bf16 as raw 16-bit words, so other=1 would
    be a denormal.)"""
    b_g = tl.load(p_g, mask=mask, other=0).to(tl.float32)
    if GATE_LOGITS:
        b_g = tl.sigmoid(b_g)
    return tl.where(mask, b_g, 1.0)


@triton.jit
def load_f32(p, mask):
    return tl.load(p, mask=mask, other=0).to(tl.float32)


@triton.jit
def row(b_x, o_r, r):
    """Row ``r`` of a (BT, BC) tile, as a (BC,) vector."""
    return tl.sum(tl.where(o_r[:, None] == r, b_x, 0.0), 0)


@triton.autotune(configs=scan_configs(), key=["BH", "C", "NSEG", "NUM_X", "GATE_LOGITS", "SUMMARY"])
@triton.jit
def gated_scan_fwd_kernel(
    g, x, v, h0, o, ov, ht, hc, sa, sb,
    T, H, BH, C, NT, NSEG, SEG,
    stride_g_b, stride_g_h, stride_g_t,
    stride_x_b, stride_x_h, stride_x_t,
    stride_v_b, stride_v_h, stride_v_t,
    NUM_X: tl.constexpr, USE_H0: tl.constexpr, GATE_LOGITS: tl.constexpr, SUMMARY: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr,
):
    """A program scans chunks i_s·SEG .. of one (batch·head, channel block) from the carry h0[x, bh, i_s]
    (NSEG = 1: the whole sequence from the initial state). With SUMMARY it starts from zero, stores nothing
    but the segment's map (gate product into ``sa``, end state into ``sb``); see segments.py."""
    i_bh, i_c, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    i_bh64 = i_bh.to(tl.int64)
    # BH = B·H: the second sequence's state rows follow the first's. BH and NSEG are autotune keys: the best
    # channel block depends on how many programs the grid has.
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    o_r = tl.arange(0, BT)
    c_first = i_s * SEG
    n_chunks = tl.minimum(SEG, NT - c_first)
    t_first = (c_first * BT).to(tl.int64)
    # Inputs are read through their strides (views of the projection output need no copy). Chunk base
    # pointers advance chunk by chunk, so no 32-bit product of time and stride can overflow.
    p_g = g + i_b * stride_g_b + i_h * stride_g_h + t_first * stride_g_t
    p_x = x + i_b * stride_x_b + i_h * stride_x_h + t_first * stride_x_t
    p_v = v + i_b * stride_v_b + i_h * stride_v_h + t_first * stride_v_t
    p_o = o + (i_bh64 * T + t_first) * C
    p_ov = ov + (i_bh64 * T + t_first) * C
    off_g = o_r[:, None] * stride_g_t + o_c[None, :]
    off_x = o_r[:, None] * stride_x_t + o_c[None, :]
    off_v = o_r[:, None] * stride_v_t + o_c[None, :]
    off_o = o_r[:, None] * C + o_c[None, :]
    if USE_H0:
        b_h = tl.load(h0 + (i_bh64 * NSEG + i_s) * C + o_c, mask=m_c, other=0).to(tl.float32)
        if NUM_X == 2:
            b_hv = tl.load(h0 + ((BH + i_bh64) * NSEG + i_s) * C + o_c, mask=m_c, other=0).to(tl.float32)
        else:
            b_hv = tl.zeros([BC], dtype=tl.float32)
    else:
        b_h = tl.zeros([BC], dtype=tl.float32)
        b_hv = tl.zeros([BC], dtype=tl.float32)
    b_aprod = tl.full([BC], 1.0, dtype=tl.float32)
    for j in range(0, n_chunks):
        i_t = c_first + j
        if not SUMMARY:
            tl.store(hc + (i_bh64 * NT + i_t) * C + o_c, b_h, mask=m_c)
            if NUM_X == 2:
                tl.store(hc + ((BH + i_bh64) * NT + i_t) * C + o_c, b_hv, mask=m_c)
        # Steps past T are identity maps (f = 1, x = 0): the carry passes through and nothing is stored.
        m = ((i_t * BT + o_r) < T)[:, None] & m_c[None, :]
        b_f = load_gate(p_g + off_g, m, GATE_LOGITS)
        b_x = load_f32(p_x + off_x, m)
        if NUM_X == 2:
            b_v = load_f32(p_v + off_v, m)
            b_a, b_bx, b_bv = tl.associative_scan((b_f, (1 - b_f) * b_x, (1 - b_f) * b_v), 0, affine_combine_pair)
            b_sv = b_a * b_hv[None, :] + b_bv
            if not SUMMARY:
                tl.store(p_ov + off_o, b_sv.to(ov.dtype.element_ty), mask=m)
            b_hv = row(b_sv, o_r, BT - 1)
        else:
            b_a, b_bx = tl.associative_scan((b_f, (1 - b_f) * b_x), 0, affine_combine)
        b_s = b_a * b_h[None, :] + b_bx
        if SUMMARY:
            b_aprod = b_aprod * row(b_a, o_r, BT - 1)
        else:
            tl.store(p_o + off_o, b_s.to(o.dtype.element_ty), mask=m)
        b_h = row(b_s, o_r, BT - 1)
        p_g += BT * stride_g_t
        p_x += BT * stride_x_t
        p_v += BT * stride_v_t
        p_o += BT * C
        p_ov += BT * C
    if SUMMARY:
        tl.store(sa + (i_bh64 * NSEG + i_s) * C + o_c, b_aprod, mask=m_c)
        tl.store(sb + (i_bh64 * NSEG + i_s) * C + o_c, b_h, mask=m_c)
        if NUM_X == 2:
            tl.store(sb + ((BH + i_bh64) * NSEG + i_s) * C + o_c, b_hv, mask=m_c)
    elif i_s == NSEG - 1:
        tl.store(ht + i_bh64 * C + o_c, b_h, mask=m_c)
        if NUM_X == 2:
            tl.store(ht + (BH + i_bh64) * C + o_c, b_hv, mask=m_c)


def scan_fwd(gate: torch.Tensor, xs: list[torch.Tensor], initial_state: torch.Tensor | None, gate_logits: bool):
    """Run the forward kernel for one or two sequences ``xs`` (each (B, H, T, C)) sharing ``gate`` (f itself,
    or its pre-activation with ``gate_logits``); time split into parallel segments as ``segments.run_scan`` plans.

    Returns the outputs (input dtype, contiguous), the final state (len(xs), B, H, C) fp32 and the fp32
    checkpoints (len(xs), B·H, NT, C): the carry entering each chunk, which backward recomputes from.
    """
    B, H, T, C = xs[0].shape
    nx = len(xs)
    nt = triton.cdiv(T, CHUNK)
    outs = [torch.empty((B, H, T, C), dtype=x.dtype, device=x.device) for x in xs]
    final = torch.empty((nx, B, H, C), dtype=torch.float32, device=gate.device)
    checkpoints = torch.empty((nx, B * H, nt, C), dtype=torch.float32, device=gate.device)
    x2, out2 = (xs[1], outs[1]) if nx == 2 else (xs[0], outs[0])

    def launch(h0, summary_a, summary_b, summary: bool, nseg: int, seg: int):
        grid = lambda meta: (B * H, triton.cdiv(C, meta["BC"]), nseg)  # noqa: E731
        gated_scan_fwd_kernel[grid](
            gate, xs[0], x2, h0 if h0 is not None else final, outs[0], out2, final, checkpoints,
            summary_a if summary else final, summary_b if summary else final,
            T, H, B * H, C, nt, nseg, seg,
            *gate.stride()[:3], *xs[0].stride()[:3], *x2.stride()[:3],
            NUM_X=nx, USE_H0=h0 is not None, GATE_LOGITS=gate_logits, SUMMARY=summary, BT=CHUNK,
        )

    segments.run_scan(launch, initial_state, nx, B * H, C, nt, gate.device, reverse=False)
    return outs, final, checkpoints
