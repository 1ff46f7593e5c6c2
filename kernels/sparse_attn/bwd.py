"""Backward of the (D, W, P) sparse causal attention: FA2 recomputation from the saved LSE, no atomics.

The allowed pairs split into two disjoint kinds (docs/spec.md §1.3):

* window pairs, 0 <= q - k <= W;
* far pairs, q - k > W with k a sink (k < P) or a grid key ((k + 1) % D == 0, k >= P).

``far`` kernel: a program owns BLOCK_N far keys gathered by index (sinks first, then grid keys) and walks the
queries q >= k_min + W + 1, writing its dK, dV to an fp32 scratch indexed by far-key number. ``window`` kernel
(launched after it): a program owns a contiguous key tile, walks the queries within W of it, adds the tile's
far part from the scratch and writes dK, dV once. ``dq`` kernel: a program owns a query block and visits the
same key sets as the forward. Every output element is written by exactly one program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fwd import (
    INTERPRET,
    LOG2E,
    TUNING_KEY,
    allowed_mask,
    attention_configs,
    configs_for_precision,
    dot_precision,
    gathered_block_plan,
    index_args,
    load_rows,
    query_block_plan,
)


@triton.jit
def attn_bwd_preprocess_kernel(o, do, dlse, delta, Tq, HEAD_DIM, USE_DLSE: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_M: tl.constexpr):
    """delta = rowsum(dO · O) - dLSE: with an LSE gradient, dS = P ∘ (dP - delta) still holds."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(2).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
    o_i = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_i = o_i < Tq
    m = m_i[:, None] & (o_d[None, :] < HEAD_DIM)
    base = i_bh.to(tl.int64) * Tq * HEAD_DIM + o_i[:, None] * HEAD_DIM + o_d[None, :]
    b_o = tl.load(o + base, mask=m, other=0).to(tl.float32)
    b_do = tl.load(do + base, mask=m, other=0).to(tl.float32)
    b_delta = tl.sum(b_o * b_do, 1)
    if USE_DLSE:
        b_delta -= tl.load(dlse + i_bh.to(tl.int64) * Tq + o_i, mask=m_i, other=0)
    tl.store(delta + i_bh.to(tl.int64) * Tq + o_i, b_delta, mask=m_i)


@triton.jit
def _dkdv_step(b_k, b_v, b_dk, b_dv, o_kpos, m_k, i0, p_q, p_do, p_lse, p_delta, q_offset, Tq, W, qk_scale, o_d, m_d,
               HEAD_DIM, FAR: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """Adds the contributions of queries i0..i0+BLOCK_M-1 to the keys at positions ``o_kpos``: far pairs
    (q - k > W; the caller holds only sinks and grid keys) if FAR, else window pairs (0 <= q - k <= W).
    Works on transposed scores (keys × queries)."""
    o_i = i0 + tl.arange(0, BLOCK_M)
    m_i = o_i < Tq
    b_q = load_rows(p_q, o_i, m_i, o_d, m_d, HEAD_DIM, INTERPRET)
    b_do = load_rows(p_do, o_i, m_i, o_d, m_d, HEAD_DIM, INTERPRET)
    b_lse = tl.load(p_lse + o_i, mask=m_i, other=0) * 1.4426950408889634
    b_delta = tl.load(p_delta + o_i, mask=m_i, other=0)
    b_rel = (q_offset + o_i)[None, :] - o_kpos[:, None]
    if FAR:
        m_s = b_rel > W
    else:
        m_s = (b_rel >= 0) & (b_rel <= W)
    m_s = m_s & m_k[:, None] & m_i[None, :]
    return dkdv_update(b_k, b_v, b_q, b_do, b_lse, b_delta, m_s, b_dk, b_dv, qk_scale, PRECISION)


@triton.jit
def dkdv_update(b_k, b_v, b_q, b_do, b_lse, b_delta, m_st, b_dk, b_dv, qk_scale, PRECISION: tl.constexpr):
    """dK, dV of a key tile from one query tile, on transposed scores (keys × queries) under the mask ``m_st``;
    ``b_lse`` in log2 units."""
    b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION) * qk_scale
    b_pt = tl.where(m_st, tl.exp2(b_st - b_lse[None, :]), 0.0)
    b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)
    b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)
    b_dst = b_pt * (b_dpt - b_delta[None, :])
    b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PRECISION)
    return b_dk, b_dv


@triton.autotune(configs=attention_configs(bwd=True), key=TUNING_KEY,
                 prune_configs_by={"early_config_prune": configs_for_precision})
@triton.jit
def sparse_attn_bwd_far_kernel(
    q, k, v, do, lse, delta, dk_far, dv_far,
    kpos, far_index,
    Tq, H, q_offset, n_sink, n_far, g_first, D, W, sm_scale, qk_scale,
    stride_k_b, stride_k_h, stride_k_t, stride_v_b, stride_v_h, stride_v_t,
    HEAD_DIM,
    GATHERED: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_h, i_b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_bh = i_b * H + i_h
    o_j = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_k = o_j < n_far
    j0 = i_n * BLOCK_N
    if GATHERED:
        # Far key j is key far_index[j]; positions rise with j.
        o_k = tl.load(far_index + o_j, mask=m_k, other=0)
        o_kpos = tl.load(kpos + o_k, mask=m_k, other=0)
        k_min = tl.load(kpos + tl.load(far_index + j0))
    else:
        # Far key j: sink j for j < n_sink, else grid key g_first + (j - n_sink)·D. Positions rise with j.
        o_k = tl.where(o_j < n_sink, o_j, g_first + tl.maximum(o_j - n_sink, 0) * D)
        o_kpos = o_k
        k_min = tl.where(j0 < n_sink, j0, g_first + tl.maximum(j0 - n_sink, 0) * D)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    b_k = load_rows(k + i_b * stride_k_b + i_h * stride_k_h, o_k, m_k, o_d, m_d, stride_k_t, INTERPRET)
    b_v = load_rows(v + i_b * stride_v_b + i_h * stride_v_h, o_k, m_k, o_d, m_d, stride_v_t, INTERPRET)
    i_lo = tl.maximum(k_min + W + 1 - q_offset, 0)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    p_q = q + i_bh.to(tl.int64) * Tq * HEAD_DIM
    p_do = do + i_bh.to(tl.int64) * Tq * HEAD_DIM
    p_lse = lse + i_bh.to(tl.int64) * Tq
    p_delta = delta + i_bh.to(tl.int64) * Tq
    for i0 in range(i_lo, Tq, BLOCK_M):
        b_dk, b_dv = _dkdv_step(b_k, b_v, b_dk, b_dv, o_kpos, m_k, i0, p_q, p_do, p_lse, p_delta, q_offset, Tq, W,
                                qk_scale, o_d, m_d, HEAD_DIM, True, INTERPRET, PRECISION, BLOCK_M)
    p_out = i_bh.to(tl.int64) * n_far * HEAD_DIM + o_j[:, None] * HEAD_DIM + o_d[None, :]
    m_out = m_k[:, None] & m_d[None, :]
    tl.store(dk_far + p_out, b_dk * sm_scale, mask=m_out)
    tl.store(dv_far + p_out, b_dv, mask=m_out)


@triton.autotune(configs=attention_configs(bwd=True), key=TUNING_KEY + ["HAS_FAR"],
                 prune_configs_by={"early_config_prune": configs_for_precision})
@triton.jit
def sparse_attn_bwd_window_kernel(
    q, k, v, do, lse, delta, dk_far, dv_far, dk, dv,
    kpos, far_slot,
    Tq, Tk, H, q_offset, n_sink, n_far, g_first, D, W, sm_scale, qk_scale,
    stride_k_b, stride_k_h, stride_k_t, stride_v_b, stride_v_h, stride_v_t,
    HEAD_DIM,
    HAS_FAR: tl.constexpr, GATHERED: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_n = tl.program_id(0)
    i_h, i_b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_bh = i_b * H + i_h
    o_k = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_k = o_k < Tk
    if GATHERED:
        o_kpos = tl.load(kpos + o_k, mask=m_k, other=0)
        k_lo = tl.load(kpos + i_n * BLOCK_N)
        k_hi = tl.load(kpos + tl.minimum(i_n * BLOCK_N + BLOCK_N, Tk) - 1)
    else:
        o_kpos = o_k
        k_lo = i_n * BLOCK_N
        k_hi = i_n * BLOCK_N + BLOCK_N - 1
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    b_k = load_rows(k + i_b * stride_k_b + i_h * stride_k_h, o_k, m_k, o_d, m_d, stride_k_t, INTERPRET)
    b_v = load_rows(v + i_b * stride_v_b + i_h * stride_v_h, o_k, m_k, o_d, m_d, stride_v_t, INTERPRET)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Queries that hold one of these keys in their window: positions k_lo .. k_hi + W.
    i_lo = tl.maximum(k_lo - q_offset, 0)
    i_hi = tl.minimum(tl.maximum(k_hi + W + 1 - q_offset, 0), Tq)
    p_q = q + i_bh.to(tl.int64) * Tq * HEAD_DIM
    p_do = do + i_bh.to(tl.int64) * Tq * HEAD_DIM
    p_lse = lse + i_bh.to(tl.int64) * Tq
    p_delta = delta + i_bh.to(tl.int64) * Tq
    for i0 in range(i_lo, i_hi, BLOCK_M):
        b_dk, b_dv = _dkdv_step(b_k, b_v, b_dk, b_dv, o_kpos, m_k, i0, p_q, p_do, p_lse, p_delta, q_offset, Tq, W,
                                qk_scale, o_d, m_d, HEAD_DIM, False, INTERPRET, PRECISION, BLOCK_M)
    b_dk = b_dk * sm_scale
    if HAS_FAR:
        if GATHERED:
            o_j = tl.load(far_slot + o_k, mask=m_k, other=-1)
            m_far = o_j >= 0
        else:
            # This tile's far keys: j = k for sinks, n_sink + (k - g_first) / D for grid keys.
            b_rel = tl.maximum(o_k - g_first, 0)
            m_grid = (o_k >= g_first) & (b_rel % D == 0) & (n_sink + b_rel // D < n_far)
            m_far = m_k & ((o_k < n_sink) | m_grid)
            o_j = tl.where(o_k < n_sink, o_k, n_sink + b_rel // D)
        p_far = i_bh.to(tl.int64) * n_far * HEAD_DIM + o_j[:, None] * HEAD_DIM + o_d[None, :]
        m_load = m_far[:, None] & m_d[None, :]
        b_dk += tl.load(dk_far + p_far, mask=m_load, other=0)
        b_dv += tl.load(dv_far + p_far, mask=m_load, other=0)
    p_out = i_bh.to(tl.int64) * Tk * HEAD_DIM + o_k[:, None] * HEAD_DIM + o_d[None, :]
    m_out = m_k[:, None] & m_d[None, :]
    tl.store(dk + p_out, b_dk.to(dk.dtype.element_ty), mask=m_out)
    tl.store(dv + p_out, b_dv.to(dv.dtype.element_ty), mask=m_out)


@triton.jit
def _dq_step(b_q, b_do, b_lse, b_delta, b_dq, p_k, p_v, o_n, o_kpos, m_n, o_qpos, o_d, m_d, stride_kt, stride_vt,
             D, W, P, qk_scale, HAS_GRID: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    b_k = load_rows(p_k, o_n, m_n, o_d, m_d, stride_kt, INTERPRET)
    b_v = load_rows(p_v, o_n, m_n, o_d, m_d, stride_vt, INTERPRET)
    m_s = allowed_mask(o_qpos[:, None], o_kpos[None, :], D, W, P, HAS_GRID) & m_n[None, :]
    return dq_update(b_q, b_do, b_lse, b_delta, b_k, b_v, m_s, b_dq, qk_scale, PRECISION)


@triton.jit
def dq_update(b_q, b_do, b_lse, b_delta, b_k, b_v, m_s, b_dq, qk_scale, PRECISION: tl.constexpr):
    """dQ of a query tile from one key tile under the pair mask ``m_s``; ``b_lse`` in log2 units."""
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
    b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.0)
    b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
    b_ds = b_p * (b_dp - b_delta[:, None])
    return b_dq + tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)


@triton.autotune(configs=attention_configs(bwd=True), key=TUNING_KEY,
                 prune_configs_by={"early_config_prune": configs_for_precision})
@triton.jit
def sparse_attn_bwd_dq_kernel(
    q, k, v, do, lse, delta, dq,
    kpos, key_end, window_start, far_end, far_index,
    Tq, Tk, H, q_offset, D, W, P, sm_scale, qk_scale,
    stride_k_b, stride_k_h, stride_k_t, stride_v_b, stride_v_h, stride_v_t,
    HEAD_DIM,
    HAS_GRID: tl.constexpr, GATHERED: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)
    i_h, i_b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_bh = i_b * H + i_h
    o_i = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = o_i < Tq
    o_qpos = q_offset + o_i
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    b_q = load_rows(q + i_bh.to(tl.int64) * Tq * HEAD_DIM, o_i, m_i, o_d, m_d, HEAD_DIM, INTERPRET)
    b_do = load_rows(do + i_bh.to(tl.int64) * Tq * HEAD_DIM, o_i, m_i, o_d, m_d, HEAD_DIM, INTERPRET)
    b_lse = tl.load(lse + i_bh.to(tl.int64) * Tq + o_i, mask=m_i, other=0) * 1.4426950408889634
    b_delta = tl.load(delta + i_bh.to(tl.int64) * Tq + o_i, mask=m_i, other=0)
    p_k = k + i_b * stride_k_b + i_h * stride_k_h
    p_v = v + i_b * stride_v_b + i_h * stride_v_h
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if GATHERED:
        f_hi, w_lo, k_hi = gathered_block_plan(key_end, window_start, far_end, i_m * BLOCK_M,
                                               tl.minimum(i_m * BLOCK_M + BLOCK_M, Tq) - 1)
        for j0 in range(0, f_hi, BLOCK_N):
            o_j = j0 + tl.arange(0, BLOCK_N)
            m_j = o_j < f_hi
            o_n = tl.load(far_index + o_j, mask=m_j, other=0)
            b_dq = _dq_step(b_q, b_do, b_lse, b_delta, b_dq, p_k, p_v, o_n, tl.load(kpos + o_n, mask=m_j, other=0),
                            m_j, o_qpos, o_d, m_d, stride_k_t, stride_v_t, D, W, P, qk_scale, HAS_GRID, INTERPRET,
                            PRECISION)
        for n0 in range(w_lo, k_hi, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m_n = o_n < k_hi
            b_dq = _dq_step(b_q, b_do, b_lse, b_delta, b_dq, p_k, p_v, o_n, tl.load(kpos + o_n, mask=m_n, other=0),
                            m_n, o_qpos, o_d, m_d, stride_k_t, stride_v_t, D, W, P, qk_scale, HAS_GRID, INTERPRET,
                            PRECISION)
    else:
        q0 = q_offset + i_m * BLOCK_M
        q1 = q_offset + tl.minimum(i_m * BLOCK_M + BLOCK_M, Tq) - 1
        ts1, g_first, n_grid, tw0, tw1 = query_block_plan(q0, q1, Tk, D, W, P, HAS_GRID, BLOCK_N)
        for i_n in range(0, ts1):
            o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
            b_dq = _dq_step(b_q, b_do, b_lse, b_delta, b_dq, p_k, p_v, o_n, o_n, o_n < Tk, o_qpos, o_d, m_d,
                            stride_k_t, stride_v_t, D, W, P, qk_scale, HAS_GRID, INTERPRET, PRECISION)
        if HAS_GRID:
            for j0 in range(0, n_grid, BLOCK_N):
                o_j = j0 + tl.arange(0, BLOCK_N)
                o_n = g_first + o_j * D
                b_dq = _dq_step(b_q, b_do, b_lse, b_delta, b_dq, p_k, p_v, o_n, o_n, o_j < n_grid, o_qpos, o_d, m_d,
                                stride_k_t, stride_v_t, D, W, P, qk_scale, HAS_GRID, INTERPRET, PRECISION)
        for i_n in range(tw0, tw1 + 1):
            o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
            b_dq = _dq_step(b_q, b_do, b_lse, b_delta, b_dq, p_k, p_v, o_n, o_n, o_n < Tk, o_qpos, o_d, m_d,
                            stride_k_t, stride_v_t, D, W, P, qk_scale, HAS_GRID, INTERPRET, PRECISION)
    p_dq = dq + i_bh.to(tl.int64) * Tq * HEAD_DIM + o_i[:, None] * HEAD_DIM + o_d[None, :]
    tl.store(p_dq, (b_dq * sm_scale).to(p_dq.dtype.element_ty), mask=m_i[:, None] & m_d[None, :])


def far_keys(pattern, Tq: int, Tk: int) -> tuple[int, int, int]:
    """(n_sink, n_far, g_first): the sinks and grid keys some query sees beyond its window, in position order."""
    last_far = pattern.q_offset + Tq - 1 - pattern.window - 1  # the largest key any query sees as far
    n_sink = max(0, min(pattern.sinks, Tk, last_far + 1))
    if pattern.dilation < 1:
        return n_sink, n_sink, 0
    d = pattern.dilation
    g_first = pattern.sinks + (d - 1 - pattern.sinks) % d  # first grid key at or after the sinks
    n_grid = max(0, (min(last_far, Tk - 1) - g_first) // d + 1) if last_far >= g_first else 0
    return n_sink, n_sink + n_grid, g_first


def attention_bwd(q, k, v, out, lse, grad_out, grad_lse, pattern, gathered=None):
    """dq, dk, dv in the input dtype for the loss gradients ``grad_out`` (B, H, Tq, K) and, when the LSE was
    used, ``grad_lse`` (B, H, Tq); keys at positions 0 .. Tk - 1, or as planned by ``gathered``."""
    B, H, Tq, K = q.shape
    Tk = k.shape[2]
    q, grad_out = q.contiguous(), grad_out.contiguous()
    block_d = max(16, triton.next_power_of_2(K))
    precision = dot_precision(q.dtype)
    qk_scale = pattern.scale * LOG2E
    dilation = max(pattern.dilation, 1)
    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    attn_bwd_preprocess_kernel[(triton.cdiv(Tq, 16), H, B)](
        out, grad_out, grad_lse.contiguous() if grad_lse is not None else lse, delta, Tq, K,
        USE_DLSE=grad_lse is not None, BLOCK_D=block_d, BLOCK_M=16,
    )
    index = index_args(gathered, q.device)  # positions, key_end, window_start, far_end, far_index
    if gathered is None:
        n_sink, n_far, g_first = far_keys(pattern, Tq, Tk)
        far_slot = index[0]
    else:
        n_sink, n_far, g_first, far_slot = 0, gathered.n_far, 0, gathered.far_slot
    dk_far = torch.empty((B * H, max(n_far, 1), K), dtype=torch.float32, device=q.device)
    dv_far = torch.empty_like(dk_far)
    strides_kv = (*k.stride()[:3], *v.stride()[:3])
    if n_far > 0:
        grid = lambda meta: (triton.cdiv(n_far, meta["BLOCK_N"]), H, B)  # noqa: E731
        sparse_attn_bwd_far_kernel[grid](
            q, k, v, grad_out, lse, delta, dk_far, dv_far,
            index[0], index[4],
            Tq, H, pattern.q_offset, n_sink, n_far, g_first, dilation, pattern.window, pattern.scale, qk_scale,
            *strides_kv, K,
            GATHERED=gathered is not None, BLOCK_D=block_d, PRECISION=precision, INTERPRET=INTERPRET,
        )
    dk = torch.empty((B, H, Tk, K), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H, Tk, K), dtype=v.dtype, device=v.device)
    grid = lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), H, B)  # noqa: E731
    sparse_attn_bwd_window_kernel[grid](
        q, k, v, grad_out, lse, delta, dk_far, dv_far, dk, dv,
        index[0], far_slot,
        Tq, Tk, H, pattern.q_offset, n_sink, n_far, g_first, dilation, pattern.window, pattern.scale, qk_scale,
        *strides_kv, K,
        HAS_FAR=n_far > 0, GATHERED=gathered is not None, BLOCK_D=block_d, PRECISION=precision, INTERPRET=INTERPRET,
    )
    dq = torch.empty((B, H, Tq, K), dtype=q.dtype, device=q.device)
    grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), H, B)  # noqa: E731
    sparse_attn_bwd_dq_kernel[grid](
        q, k, v, grad_out, lse, delta, dq,
        *index,
        Tq, Tk, H, pattern.q_offset, pattern.dilation, pattern.window, pattern.sinks, pattern.scale, qk_scale,
        *strides_kv, K,
        HAS_GRID=pattern.dilation > 0, GATHERED=gathered is not None, BLOCK_D=block_d, PRECISION=precision,
        INTERPRET=INTERPRET,
    )
    return dq, dk, dv
