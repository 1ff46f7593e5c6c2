"""Forward of the gated linear recurrence h_t = f_t·h_{t-1} + (1 - f_t)·x_t (RATPLUS_SPEC.md §1.2 step 5).

One program per (batch·head, channel block) walks time sequentially with the fp32 carry in registers: no
prefix products, so no exp/log and no overflow for gates arbitrarily close to 0 or 1. Every ``BT`` steps the
carry is written to a small checkpoint buffer (1/BT of the fp32 states) from which backward recomputes the
states chunk by chunk (kernels/scan/README.md). With ``NUM_X = 2`` one gate load drives two sequences (the
layer's keys and values). With ``GATE_LOGITS`` the gate input is the pre-activation g and f = sigmoid(g) is
taken in fp32 on load, so the layer never materialises the fp32 gate.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Time steps between two saved fp32 carries: backward recomputes one chunk at a time from them, so this sets
# the checkpoint memory (T / CHUNK fp32 states) and the workspace (CHUNK fp32 states per channel). Short under
# the interpreter so that small test sequences cross several chunk boundaries.
CHUNK = 16 if INTERPRET else 64


def scan_configs() -> list[triton.Config]:
    """Channel-block and warp choices; a single config under the interpreter (autotuning there is useless)."""
    if INTERPRET:
        return [triton.Config({"BC": 16}, num_warps=1)]
    return [triton.Config({"BC": bc}, num_warps=w) for bc in (32, 64, 128) for w in (1, 2, 4) if bc >= 32 * w]


@triton.jit
def load_gate(p_g, mask, GATE_LOGITS: tl.constexpr):
    """f in fp32: the stored gate, or the sigmoid of the stored pre-activation."""
    b_g = tl.load(p_g, mask=mask, other=0).to(tl.float32)
    if GATE_LOGITS:
        b_g = tl.sigmoid(b_g)
    return b_g


@triton.autotune(configs=scan_configs(), key=["C", "NUM_X", "GATE_LOGITS"])
@triton.jit
def gated_scan_fwd_kernel(
    g, x, v, h0, o, ov, ht, hc,
    T, H, C, NT,
    stride_g_b, stride_g_h, stride_g_t,
    stride_x_b, stride_x_h, stride_x_t,
    stride_v_b, stride_v_h, stride_v_t,
    NUM_X: tl.constexpr, USE_H0: tl.constexpr, GATE_LOGITS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    n_bh = tl.num_programs(1).to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    # Inputs are read through their strides (views of the projection output need no copy); pointers advance
    # step by step so that no 32-bit product of time and stride can overflow.
    p_g = g + i_b * stride_g_b + i_h * stride_g_h + o_c
    p_x = x + i_b * stride_x_b + i_h * stride_x_h + o_c
    p_v = v + i_b * stride_v_b + i_h * stride_v_h + o_c
    p_o = o + i_bh.to(tl.int64) * T * C + o_c
    p_ov = ov + i_bh.to(tl.int64) * T * C + o_c
    p_hc = hc + i_bh.to(tl.int64) * NT * C + o_c
    p_hcv = hc + (n_bh + i_bh) * NT * C + o_c
    if USE_H0:
        b_h = tl.load(h0 + i_bh * C + o_c, mask=m_c, other=0).to(tl.float32)
        if NUM_X == 2:
            b_hv = tl.load(h0 + (n_bh + i_bh) * C + o_c, mask=m_c, other=0).to(tl.float32)
        else:
            b_hv = tl.zeros([BC], dtype=tl.float32)
    else:
        b_h = tl.zeros([BC], dtype=tl.float32)
        b_hv = tl.zeros([BC], dtype=tl.float32)
    for i_t in range(0, NT):
        tl.store(p_hc + i_t * C, b_h, mask=m_c)
        if NUM_X == 2:
            tl.store(p_hcv + i_t * C, b_hv, mask=m_c)
        for i_s in range(0, BT):
            # Steps past T see f = 1, x = 0: the carry passes through unchanged and nothing is stored. (f = 1
            # is set after the load: the interpreter keeps bf16 as raw 16-bit words, so other=1 is a denormal.)
            m_t = m_c & (i_t * BT + i_s < T)
            b_g = tl.where(m_t, load_gate(p_g, m_t, GATE_LOGITS), 1.0)
            b_x = tl.load(p_x, mask=m_t, other=0).to(tl.float32)
            b_h = b_g * b_h + (1 - b_g) * b_x
            tl.store(p_o, b_h.to(p_o.dtype.element_ty), mask=m_t)
            if NUM_X == 2:
                b_v = tl.load(p_v, mask=m_t, other=0).to(tl.float32)
                b_hv = b_g * b_hv + (1 - b_g) * b_v
                tl.store(p_ov, b_hv.to(p_ov.dtype.element_ty), mask=m_t)
            p_g += stride_g_t
            p_x += stride_x_t
            p_v += stride_v_t
            p_o += C
            p_ov += C
    tl.store(ht + i_bh * C + o_c, b_h, mask=m_c)
    if NUM_X == 2:
        tl.store(ht + (n_bh + i_bh) * C + o_c, b_hv, mask=m_c)


def scan_fwd(gate: torch.Tensor, xs: list[torch.Tensor], initial_state: torch.Tensor | None, gate_logits: bool):
    """Run the forward kernel for one or two sequences ``xs`` (each (B, H, T, C)) sharing ``gate`` (f itself,
    or its pre-activation with ``gate_logits``).

    Returns the outputs (input dtype, contiguous), the final state (len(xs), B, H, C) fp32 and the fp32
    checkpoints (len(xs), B·H, NT, C) that backward recomputes from.
    """
    B, H, T, C = xs[0].shape
    nx = len(xs)
    nt = triton.cdiv(T, CHUNK)
    outs = [torch.empty((B, H, T, C), dtype=x.dtype, device=x.device) for x in xs]
    final = torch.empty((nx, B, H, C), dtype=torch.float32, device=gate.device)
    checkpoints = torch.empty((nx, B * H, nt, C), dtype=torch.float32, device=gate.device)
    x2, out2 = (xs[1], outs[1]) if nx == 2 else (xs[0], outs[0])
    h0 = initial_state if initial_state is not None else final
    grid = lambda meta: (triton.cdiv(C, meta["BC"]), B * H)  # noqa: E731
    gated_scan_fwd_kernel[grid](
        gate, xs[0], x2, h0, outs[0], out2, final, checkpoints,
        T, H, C, nt,
        *gate.stride()[:3], *xs[0].stride()[:3], *x2.stride()[:3],
        NUM_X=nx, USE_H0=initial_state is not None, GATE_LOGITS=gate_logits, BT=CHUNK,
    )
    return outs, final, checkpoints
