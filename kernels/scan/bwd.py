"""Backward of the gated linear recurrence (RATPLUS_SPEC.md §1.2 step 5).

With Γ_t = ∂ℒ/∂h_t (plus ∂ℒ/∂h_{T-1} from the final state), the reverse recurrence
Λ_t = Γ_t + f_{t+1}·Λ_{t+1} gives ∂x_t = (1 - f_t)·Λ_t, ∂f_t = (h_{t-1} - x_t)·Λ_t and ∂h_{-1} = f_0·Λ_0.
One program per (batch·head, channel block) walks the chunks from last to first: it recomputes the chunk's
fp32 states forward from the saved checkpoint into a per-program workspace (storing h_{t-1} - x_t), then walks
the chunk backward with Λ in registers. See kernels/scan/README.md for why states are recomputed. With the
gate given as its pre-activation g, ∂g_t = ∂f_t·f_t·(1 - f_t), f recomputed from g.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fwd import CHUNK, load_gate, scan_configs


@triton.jit
def _recompute_chunk(p_g, p_x, p_w, b_h, t0, T, C, m_c, stride_g_t, stride_x_t, GATE_LOGITS: tl.constexpr,
                     BT: tl.constexpr):
    """Writes h_{t-1} - x_t (fp32) for the chunk's steps into the workspace rows starting at ``p_w``."""
    for i_s in range(0, BT):
        m_t = m_c & (t0 + i_s < T)
        b_g = tl.where(m_t, load_gate(p_g, m_t, GATE_LOGITS), 1.0)
        b_x = tl.load(p_x, mask=m_t, other=0).to(tl.float32)
        tl.store(p_w, b_h - b_x, mask=m_t)
        b_h = b_g * b_h + (1 - b_g) * b_x
        p_g += stride_g_t
        p_x += stride_x_t
        p_w += C


@triton.autotune(configs=scan_configs(), key=["C", "NUM_X", "GATE_LOGITS"])
@triton.jit
def gated_scan_bwd_kernel(
    g, x, v, hc, do, dov, dht, dg, dx, dv, dh0, ws,
    T, H, C, NT,
    stride_g_b, stride_g_h, stride_g_t,
    stride_x_b, stride_x_h, stride_x_t,
    stride_v_b, stride_v_h, stride_v_t,
    NUM_X: tl.constexpr, USE_DHT: tl.constexpr, USE_DH0: tl.constexpr, GATE_LOGITS: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr,
):
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    n_bh = tl.num_programs(1).to(tl.int64)
    i_bh64 = i_bh.to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    p_g0 = g + i_b * stride_g_b + i_h * stride_g_h + o_c
    p_x0 = x + i_b * stride_x_b + i_h * stride_x_h + o_c
    p_v0 = v + i_b * stride_v_b + i_h * stride_v_h + o_c
    # Workspace rows (B·H, NUM_X, BT, C): each program owns its channel columns whatever the block size.
    p_w0 = ws + i_bh64 * NUM_X * BT * C + o_c
    p_wv0 = p_w0 + BT * C
    if USE_DHT:
        b_lam = tl.load(dht + i_bh * C + o_c, mask=m_c, other=0).to(tl.float32)
        b_lamv = tl.zeros([BC], dtype=tl.float32)
        if NUM_X == 2:
            b_lamv = tl.load(dht + (n_bh + i_bh) * C + o_c, mask=m_c, other=0).to(tl.float32)
    else:
        b_lam = tl.zeros([BC], dtype=tl.float32)
        b_lamv = tl.zeros([BC], dtype=tl.float32)
    # f_{t+1}; 1 before the last step so that the final-state gradient enters Λ_{T-1} unscaled.
    b_gn = tl.full([BC], 1.0, dtype=tl.float32)
    for i_r in range(0, NT):
        i_t = NT - 1 - i_r
        t0 = i_t * BT
        t064 = t0.to(tl.int64)
        b_h = tl.load(hc + (i_bh64 * NT + i_t) * C + o_c, mask=m_c, other=0)
        _recompute_chunk(p_g0 + t064 * stride_g_t, p_x0 + t064 * stride_x_t, p_w0, b_h, t0, T, C, m_c,
                         stride_g_t, stride_x_t, GATE_LOGITS, BT)
        if NUM_X == 2:
            b_hv = tl.load(hc + ((n_bh + i_bh64) * NT + i_t) * C + o_c, mask=m_c, other=0)
            _recompute_chunk(p_g0 + t064 * stride_g_t, p_v0 + t064 * stride_v_t, p_wv0, b_hv, t0, T, C, m_c,
                             stride_g_t, stride_v_t, GATE_LOGITS, BT)
        # The workspace is read back by the same threads, but a barrier makes that independent of the layout.
        tl.debug_barrier()
        t_last = t0 + BT - 1
        p_g = p_g0 + t_last.to(tl.int64) * stride_g_t
        p_do = do + (i_bh64 * T + t_last) * C + o_c
        p_dov = dov + (i_bh64 * T + t_last) * C + o_c
        p_dg = dg + (i_bh64 * T + t_last) * C + o_c
        p_dx = dx + (i_bh64 * T + t_last) * C + o_c
        p_dv = dv + (i_bh64 * T + t_last) * C + o_c
        p_w = p_w0 + (BT - 1) * C
        p_wv = p_wv0 + (BT - 1) * C
        for i_s in range(0, BT):
            # Steps past T read f = 1 and Γ = 0: Λ passes through unchanged and nothing is stored.
            m_t = m_c & (t_last - i_s < T)
            b_g = tl.where(m_t, load_gate(p_g, m_t, GATE_LOGITS), 1.0)
            b_lam = tl.load(p_do, mask=m_t, other=0).to(tl.float32) + b_gn * b_lam
            b_dg = tl.load(p_w, mask=m_t, other=0) * b_lam
            tl.store(p_dx, ((1 - b_g) * b_lam).to(p_dx.dtype.element_ty), mask=m_t)
            if NUM_X == 2:
                b_lamv = tl.load(p_dov, mask=m_t, other=0).to(tl.float32) + b_gn * b_lamv
                b_dg += tl.load(p_wv, mask=m_t, other=0) * b_lamv
                tl.store(p_dv, ((1 - b_g) * b_lamv).to(p_dv.dtype.element_ty), mask=m_t)
            if GATE_LOGITS:
                b_dg = b_dg * b_g * (1 - b_g)
            tl.store(p_dg, b_dg.to(p_dg.dtype.element_ty), mask=m_t)
            b_gn = b_g
            p_g -= stride_g_t
            p_dg -= C
            p_do -= C
            p_dov -= C
            p_dx -= C
            p_dv -= C
            p_w -= C
            p_wv -= C
        # The next chunk's recomputation overwrites the workspace rows just read.
        tl.debug_barrier()
    if USE_DH0:
        tl.store(dh0 + i_bh * C + o_c, b_gn * b_lam, mask=m_c)
        if NUM_X == 2:
            tl.store(dh0 + (n_bh + i_bh) * C + o_c, b_gn * b_lamv, mask=m_c)


def scan_bwd(gate, xs, checkpoints, grad_outs, grad_final, need_initial_grad: bool, gate_logits: bool):
    """Gradients of gate (its dtype, contiguous; of the pre-activation with ``gate_logits``), of each x (its
    dtype) and, when asked, of the initial state ((len(xs), B, H, C) fp32)."""
    B, H, T, C = xs[0].shape
    nx = len(xs)
    nt = checkpoints.shape[2]
    grad_outs = [gy.contiguous() for gy in grad_outs]
    dgate = torch.empty((B, H, T, C), dtype=gate.dtype, device=gate.device)
    dxs = [torch.empty((B, H, T, C), dtype=x.dtype, device=x.device) for x in xs]
    dh0 = torch.empty((nx, B, H, C), dtype=torch.float32, device=gate.device) if need_initial_grad else None
    workspace = torch.empty((B * H, nx, CHUNK, C), dtype=torch.float32, device=gate.device)
    x2, gy2, dx2 = (xs[1], grad_outs[1], dxs[1]) if nx == 2 else (xs[0], grad_outs[0], dxs[0])
    dht = grad_final.contiguous() if grad_final is not None else checkpoints
    grid = lambda meta: (triton.cdiv(C, meta["BC"]), B * H)  # noqa: E731
    gated_scan_bwd_kernel[grid](
        gate, xs[0], x2, checkpoints, grad_outs[0], gy2, dht, dgate, dxs[0], dx2,
        dh0 if dh0 is not None else checkpoints, workspace,
        T, H, C, nt,
        *gate.stride()[:3], *xs[0].stride()[:3], *x2.stride()[:3],
        NUM_X=nx, USE_DHT=grad_final is not None, USE_DH0=need_initial_grad, GATE_LOGITS=gate_logits, BT=CHUNK,
    )
    return dgate, dxs, dh0
