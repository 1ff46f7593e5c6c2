"""Backward of the gated linear recurrence (docs/spec.md §1.2 step 5).

With Γ_t = ∂ℒ/∂h_t, the reverse recurrence Λ_t = Γ_t + f_{t+1}·Λ_{t+1} (Λ_T = ∂ℒ/∂h_{T-1} from the final
state, f_T = 1) gives ∂x_t = (1 - f_t)·Λ_t, ∂f_t = (h_{t-1} - x_t)·Λ_t and ∂h_{-1} = f_0·Λ_0. One program per
(batch·head, channel block) walks the chunks from last to first, each as (BT, BC) tiles scanned in registers:

* h_{t-1}: a forward scan of the tiles loaded one step back (row 0 the identity), from the chunk's saved
  carry; these are the exact fp32 states of the forward (kernels/scan/README.md: recompute, not save);
* Λ_t: a reverse scan of the maps y ↦ f_{t+1}·y + Γ_t (the gate tile loaded one step ahead), from Λ of the
  chunk after it.

The shifted tiles overlap the chunk's own, so their second reads come from cache. With the gate given as its
pre-activation g, ∂g_t = ∂f_t·f_t·(1 - f_t), f recomputed from g.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import segments
from .fwd import CHUNK, affine_combine, affine_combine_pair, load_f32, load_gate, row, scan_configs


@triton.autotune(configs=scan_configs(bwd=True), key=["BH", "C", "NSEG", "NUM_X", "GATE_LOGITS", "SUMMARY"])
@triton.jit
def gated_scan_bwd_kernel(
    g, x, v, hc, do, dov, dht, dg, dx, dv, dh0, sa, sb,
    T, H, BH, C, NT, NSEG, SEG,
    stride_g_b, stride_g_h, stride_g_t,
    stride_x_b, stride_x_h, stride_x_t,
    stride_v_b, stride_v_h, stride_v_t,
    NUM_X: tl.constexpr, USE_DHT: tl.constexpr, USE_DH0: tl.constexpr, GATE_LOGITS: tl.constexpr,
    SUMMARY: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    """A program walks chunks i_s·SEG .. backward from Λ = dht[x, bh, i_s] (NSEG = 1: the final-state gradient).
    With SUMMARY it starts from zero, computes Λ only and stores the segment's map (product of f_{t+1} into
    ``sa``, Λ at its first step into ``sb``); see segments.py."""
    i_bh, i_c, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    i_bh64 = i_bh.to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    o_r = tl.arange(0, BT)
    c_first = i_s * SEG
    n_chunks = tl.minimum(SEG, NT - c_first)
    p_g0 = g + i_b * stride_g_b + i_h * stride_g_h
    p_x0 = x + i_b * stride_x_b + i_h * stride_x_h
    p_v0 = v + i_b * stride_v_b + i_h * stride_v_h
    off_g = o_r[:, None] * stride_g_t + o_c[None, :]
    off_x = o_r[:, None] * stride_x_t + o_c[None, :]
    off_v = o_r[:, None] * stride_v_t + o_c[None, :]
    off_o = o_r[:, None] * C + o_c[None, :]
    if USE_DHT:
        b_lam = tl.load(dht + (i_bh64 * NSEG + i_s) * C + o_c, mask=m_c, other=0).to(tl.float32)
        b_lamv = tl.zeros([BC], dtype=tl.float32)
        if NUM_X == 2:
            b_lamv = tl.load(dht + ((BH + i_bh64) * NSEG + i_s) * C + o_c, mask=m_c, other=0).to(tl.float32)
    else:
        b_lam = tl.zeros([BC], dtype=tl.float32)
        b_lamv = tl.zeros([BC], dtype=tl.float32)
    b_aprod = tl.full([BC], 1.0, dtype=tl.float32)
    for i_r in range(0, n_chunks):
        i_t = c_first + n_chunks - 1 - i_r
        t0 = i_t * BT
        o_t = t0 + o_r
        m = (o_t < T)[:, None] & m_c[None, :]
        m_next = (o_t + 1 < T)[:, None] & m_c[None, :]  # f_{t+1} exists (else 1)
        p_g = p_g0 + t0.to(tl.int64) * stride_g_t
        o_y = (i_bh64 * T + t0) * C  # the chunk in the contiguous (B·H, T, C) gradients
        # Λ_t from Λ of the next chunk's first step: a reverse scan of y ↦ f_{t+1}·y + Γ_t.
        b_fn = load_gate(p_g + off_g + stride_g_t, m_next, GATE_LOGITS)
        b_gam = load_f32(do + o_y + off_o, m)
        if NUM_X == 2:
            b_gamv = load_f32(dov + o_y + off_o, m)
            b_al, b_lx, b_lv = tl.associative_scan((b_fn, b_gam, b_gamv), 0, affine_combine_pair, reverse=True)
            b_lv = b_al * b_lamv[None, :] + b_lv
        else:
            b_al, b_lx = tl.associative_scan((b_fn, b_gam), 0, affine_combine, reverse=True)
        b_lx = b_al * b_lam[None, :] + b_lx
        if SUMMARY:
            b_aprod = b_aprod * row(b_al, o_r, 0)
        else:
            # h_{t-1}: a forward scan of the tiles one step back (row 0 the identity) from the chunk's carry;
            # then ∂f_t = (h_{t-1} - x_t)·Λ_t, ∂x_t = (1 - f_t)·Λ_t.
            m_prev = ((o_r >= 1) & (o_t - 1 < T))[:, None] & m_c[None, :]
            p_x = p_x0 + t0.to(tl.int64) * stride_x_t
            b_f = load_gate(p_g + off_g, m, GATE_LOGITS)
            b_fp = load_gate(p_g + off_g - stride_g_t, m_prev, GATE_LOGITS)
            b_x = load_f32(p_x + off_x, m)
            b_xp = load_f32(p_x + off_x - stride_x_t, m_prev)
            b_hc = tl.load(hc + (i_bh64 * NT + i_t) * C + o_c, mask=m_c, other=0)
            if NUM_X == 2:
                p_v = p_v0 + t0.to(tl.int64) * stride_v_t
                b_v = load_f32(p_v + off_v, m)
                b_vp = load_f32(p_v + off_v - stride_v_t, m_prev)
                b_ap, b_hx, b_hv = tl.associative_scan((b_fp, (1 - b_fp) * b_xp, (1 - b_fp) * b_vp), 0,
                                                       affine_combine_pair)
                b_hcv = tl.load(hc + ((BH + i_bh64) * NT + i_t) * C + o_c, mask=m_c, other=0)
                b_dfv = (b_ap * b_hcv[None, :] + b_hv - b_v) * b_lv
                tl.store(dv + o_y + off_o, ((1 - b_f) * b_lv).to(dv.dtype.element_ty), mask=m)
            else:
                b_ap, b_hx = tl.associative_scan((b_fp, (1 - b_fp) * b_xp), 0, affine_combine)
            b_df = (b_ap * b_hc[None, :] + b_hx - b_x) * b_lx
            if NUM_X == 2:
                b_df += b_dfv
            tl.store(dx + o_y + off_o, ((1 - b_f) * b_lx).to(dx.dtype.element_ty), mask=m)
            if GATE_LOGITS:
                b_df = b_df * b_f * (1 - b_f)
            tl.store(dg + o_y + off_o, b_df.to(dg.dtype.element_ty), mask=m)
        b_lam = row(b_lx, o_r, 0)
        if NUM_X == 2:
            b_lamv = row(b_lv, o_r, 0)
    if SUMMARY:
        tl.store(sa + (i_bh64 * NSEG + i_s) * C + o_c, b_aprod, mask=m_c)
        tl.store(sb + (i_bh64 * NSEG + i_s) * C + o_c, b_lam, mask=m_c)
        if NUM_X == 2:
            tl.store(sb + ((BH + i_bh64) * NSEG + i_s) * C + o_c, b_lamv, mask=m_c)
    elif USE_DH0:
        if i_s == 0:
            b_f0 = load_gate(p_g0 + o_c, m_c & (T > 0), GATE_LOGITS)  # T = 0: dh0 is dht itself
            tl.store(dh0 + i_bh64 * C + o_c, b_f0 * b_lam, mask=m_c)
            if NUM_X == 2:
                tl.store(dh0 + (BH + i_bh64) * C + o_c, b_f0 * b_lamv, mask=m_c)


def scan_bwd(gate, xs, checkpoints, grad_outs, grad_final, need_initial_grad: bool, gate_logits: bool):
    """Gradients of gate (its dtype, contiguous; of the pre-activation with ``gate_logits``), of each x (its
    dtype) and, when asked, of the initial state ((len(xs), B, H, C) fp32); time split into parallel segments
    as ``segments.run_scan`` plans."""
    B, H, T, C = xs[0].shape
    nx = len(xs)
    nt = checkpoints.shape[2]
    grad_outs = [gy.contiguous() for gy in grad_outs]
    dgate = torch.empty((B, H, T, C), dtype=gate.dtype, device=gate.device)
    dxs = [torch.empty((B, H, T, C), dtype=x.dtype, device=x.device) for x in xs]
    dh0 = torch.empty((nx, B, H, C), dtype=torch.float32, device=gate.device) if need_initial_grad else None
    x2, gy2, dx2 = (xs[1], grad_outs[1], dxs[1]) if nx == 2 else (xs[0], grad_outs[0], dxs[0])
    grad_final = grad_final.contiguous() if grad_final is not None else None

    def launch(dht, summary_a, summary_b, summary: bool, nseg: int, seg: int):
        grid = lambda meta: (B * H, triton.cdiv(C, meta["BC"]), nseg)  # noqa: E731
        gated_scan_bwd_kernel[grid](
            gate, xs[0], x2, checkpoints, grad_outs[0], gy2, dht if dht is not None else checkpoints,
            dgate, dxs[0], dx2, dh0 if dh0 is not None else checkpoints,
            summary_a if summary else checkpoints, summary_b if summary else checkpoints,
            T, H, B * H, C, nt, nseg, seg,
            *gate.stride()[:3], *xs[0].stride()[:3], *x2.stride()[:3],
            NUM_X=nx, USE_DHT=dht is not None, USE_DH0=need_initial_grad and not summary, GATE_LOGITS=gate_logits,
            SUMMARY=summary, BT=CHUNK,
        )

    segments.run_scan(launch, grad_final, nx, B * H, C, nt, gate.device, reverse=True)
    return dgate, dxs, dh0
