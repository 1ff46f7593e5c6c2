"""Attention over per-query lists of key blocks: the selected part of top-k block attention (docs/spec.md §4.5).

Keys fall into blocks of S positions (block n holds keys n·S .. n·S + S - 1). Each query lists the blocks it
selected; it sees the keys of those blocks that precede it (k <= q) and that its (D, W, P) rule does *not*
already give it, so this part and the (D, W, P) attention of ``fwd.py`` cover disjoint key sets and merge
exactly by their LSEs. A row that sees no key here gets a zero output and an LSE of -inf.

Work is planned per tile of BLOCK_M queries (``plan_blocks``): one byte per (query tile, key block), set when
some query of the tile lists the block. The forward and the dq kernel walk the blocks up to their tile's last
query and load those set for the tile; the dk/dv kernel owns BLOCK_N keys of one block and walks the query
tiles from the block's first key on, taking those set for the block, so every output element is written by one
program (no atomics). Inside a tile, each query's own list decides, element by element.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .bwd import attn_bwd_preprocess_kernel, dkdv_update, dq_update
from .fwd import INTERPRET, LOG2E, allowed_mask, dot_precision, load_rows, softmax_step

# Queries × ids per chunk of the plan's scatter, which needs int64 indices: bounds that copy to 128 MiB.
PLAN_CHUNK = 1 << 24


@dataclass(frozen=True)
class BlockPlan:
    """Which key blocks each tile of ``block_m`` queries visits: ``tiles`` (B, H, n_tiles, n_blocks) int8."""

    block_m: int
    n_blocks: int
    tiles: torch.Tensor


def plan_blocks(block_ids: torch.Tensor, n_blocks: int, block_m: int) -> BlockPlan:
    """The plan for ``block_ids`` (B, H, Tq, n) int, every entry in 0 .. n_blocks - 1 (no host sync)."""
    B, H, Tq, n = block_ids.shape
    n_tiles = triton.cdiv(Tq, block_m)
    # Rows past Tq list the extra column n_blocks, which is dropped.
    ids = F.pad(block_ids, (0, 0, 0, n_tiles * block_m - Tq), value=n_blocks).reshape(B, H, n_tiles, block_m * n)
    tiles = torch.zeros((B, H, n_tiles, n_blocks + 1), dtype=torch.int8, device=block_ids.device)
    step = max(1, PLAN_CHUNK // max(1, B * H * block_m * n))
    for t0 in range(0, n_tiles, step):
        tiles[:, :, t0:t0 + step].scatter_(-1, ids[:, :, t0:t0 + step].long(), 1)
    return BlockPlan(block_m, n_blocks, tiles[..., :n_blocks].contiguous())


def tile_shape(dtype: torch.dtype, block_size: int, *, bwd: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages). BLOCK_M is fixed per dtype (the plan is built for it on the host, so
    there is no autotuning); BLOCK_N follows S up to the dtype's tile, so small blocks do not pay for wide key
    tiles. fp32 (IEEE products) takes the widths of ``fwd.IEEE_CONFIG``; bf16 a FlashAttention-2 tile, 8 warps in
    backward (4 spill there). Chosen by compile_check's registers and spills for sm_90, not yet timed on a GPU."""
    if INTERPRET:
        return 16, 16, 1, 1
    widest = 32 if dtype == torch.float32 else 64
    block_n = min(max(16, triton.next_power_of_2(block_size)), widest)
    if dtype == torch.float32:
        return 16, block_n, 8, 1
    return 64, block_n, (8 if bwd else 4), 2


@triton.jit
def _lists_block(b_sel, n):
    """(BLOCK_M,) bool: which query rows list block n (``b_sel``: (BLOCK_M, BLOCK_SEL) ids, -1 padding)."""
    return tl.max((b_sel == n).to(tl.int32), 1) > 0


@triton.jit
def _selected_pairs(b_qpos, b_kpos, D, W, P, HAS_GRID: tl.constexpr):
    """Causal pairs the (D, W, P) rule leaves out, for query and key positions broadcast against each other."""
    return (b_qpos >= b_kpos) & ~allowed_mask(b_qpos, b_kpos, D, W, P, HAS_GRID)


@triton.jit
def _load_lists(block_ids, i_bh, o_i, m_i, Tq, N_SEL, BLOCK_SEL: tl.constexpr):
    o_s = tl.arange(0, BLOCK_SEL)
    p = block_ids + i_bh * Tq * N_SEL + o_i[:, None].to(tl.int64) * N_SEL + o_s[None, :]
    return tl.load(p, mask=m_i[:, None] & (o_s < N_SEL)[None, :], other=-1)


@triton.jit
def _last_block(i_m, Tq, Tk, q_offset, S, BLOCK_M: tl.constexpr):
    """The block of the last key a query of tile i_m can see (its last query's position, within the keys)."""
    return tl.minimum(q_offset + tl.minimum(i_m * BLOCK_M + BLOCK_M, Tq) - 1, Tk - 1) // S


@triton.jit
def block_attn_fwd_kernel(
    q, k, v, o, lse, block_ids, plan,
    Tq, Tk, H, n_tiles, n_blocks, N_SEL, q_offset, S, D, W, P, qk_scale,
    stride_q_b, stride_q_h, stride_q_t, stride_k_b, stride_k_h, stride_k_t, stride_v_b, stride_v_h, stride_v_t,
    HEAD_DIM,
    HAS_GRID: tl.constexpr, BLOCK_SEL: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_h, i_b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_bh = i_b * H + i_h
    o_i = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = o_i < Tq
    o_qpos = q_offset + o_i
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    p_k = k + i_b * stride_k_b + i_h * stride_k_h
    p_v = v + i_b * stride_v_b + i_h * stride_v_h
    b_q = load_rows(q + i_b * stride_q_b + i_h * stride_q_h, o_i, m_i, o_d, m_d, stride_q_t, INTERPRET)
    b_sel = _load_lists(block_ids, i_bh, o_i, m_i, Tq, N_SEL, BLOCK_SEL)

    b_m = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    p_plan = plan + (i_bh * n_tiles + i_m) * n_blocks
    for n in range(0, _last_block(i_m, Tq, Tk, q_offset, S, BLOCK_M) + 1):
        if tl.load(p_plan + n) != 0:
            m_rows = _lists_block(b_sel, n) & m_i
            k_end = tl.minimum(n * S + S, Tk)
            for n0 in range(n * S, k_end, BLOCK_N):
                o_n = n0 + tl.arange(0, BLOCK_N)
                m_n = o_n < k_end
                b_k = load_rows(p_k, o_n, m_n, o_d, m_d, stride_k_t, INTERPRET)
                b_v = load_rows(p_v, o_n, m_n, o_d, m_d, stride_v_t, INTERPRET)
                m_s = _selected_pairs(o_qpos[:, None], o_n[None, :], D, W, P, HAS_GRID) & m_rows[:, None] \
                    & m_n[None, :]
                b_acc, b_m, b_l = softmax_step(b_q, b_k, b_v, m_s, b_acc, b_m, b_l, qk_scale, PRECISION)

    m_any = b_l > 0
    b_o = b_acc / tl.where(m_any, b_l, 1.0)[:, None]
    p_o = o + i_bh * Tq * HEAD_DIM + o_i[:, None] * HEAD_DIM + o_d[None, :]
    tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_i[:, None] & m_d[None, :])
    b_lse = tl.where(m_any, (b_m + tl.log2(tl.where(m_any, b_l, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse + i_bh * Tq + o_i, b_lse, mask=m_i)


@triton.jit
def block_attn_bwd_dq_kernel(
    q, k, v, do, lse, delta, dq, block_ids, plan,
    Tq, Tk, H, n_tiles, n_blocks, N_SEL, q_offset, S, D, W, P, sm_scale, qk_scale,
    stride_k_b, stride_k_h, stride_k_t, stride_v_b, stride_v_h, stride_v_t,
    HEAD_DIM,
    HAS_GRID: tl.constexpr, BLOCK_SEL: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_h, i_b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_bh = i_b * H + i_h
    o_i = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = o_i < Tq
    o_qpos = q_offset + o_i
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    b_q = load_rows(q + i_bh * Tq * HEAD_DIM, o_i, m_i, o_d, m_d, HEAD_DIM, INTERPRET)
    b_do = load_rows(do + i_bh * Tq * HEAD_DIM, o_i, m_i, o_d, m_d, HEAD_DIM, INTERPRET)
    b_lse = tl.load(lse + i_bh * Tq + o_i, mask=m_i, other=0) * 1.4426950408889634
    b_delta = tl.load(delta + i_bh * Tq + o_i, mask=m_i, other=0)
    b_sel = _load_lists(block_ids, i_bh, o_i, m_i, Tq, N_SEL, BLOCK_SEL)
    p_k = k + i_b * stride_k_b + i_h * stride_k_h
    p_v = v + i_b * stride_v_b + i_h * stride_v_h
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    p_plan = plan + (i_bh * n_tiles + i_m) * n_blocks
    for n in range(0, _last_block(i_m, Tq, Tk, q_offset, S, BLOCK_M) + 1):
        if tl.load(p_plan + n) != 0:
            m_rows = _lists_block(b_sel, n) & m_i
            k_end = tl.minimum(n * S + S, Tk)
            for n0 in range(n * S, k_end, BLOCK_N):
                o_n = n0 + tl.arange(0, BLOCK_N)
                m_n = o_n < k_end
                b_k = load_rows(p_k, o_n, m_n, o_d, m_d, stride_k_t, INTERPRET)
                b_v = load_rows(p_v, o_n, m_n, o_d, m_d, stride_v_t, INTERPRET)
                m_s = _selected_pairs(o_qpos[:, None], o_n[None, :], D, W, P, HAS_GRID) & m_rows[:, None] \
                    & m_n[None, :]
                b_dq = dq_update(b_q, b_do, b_lse, b_delta, b_k, b_v, m_s, b_dq, qk_scale, PRECISION)
    p_dq = dq + i_bh * Tq * HEAD_DIM + o_i[:, None] * HEAD_DIM + o_d[None, :]
    tl.store(p_dq, (b_dq * sm_scale).to(p_dq.dtype.element_ty), mask=m_i[:, None] & m_d[None, :])


@triton.jit
def block_attn_bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dk, dv, block_ids, plan,
    Tq, Tk, H, n_tiles, n_blocks, n_sub, N_SEL, q_offset, S, D, W, P, sm_scale, qk_scale,
    stride_k_b, stride_k_h, stride_k_t, stride_v_b, stride_v_h, stride_v_t,
    HEAD_DIM,
    HAS_GRID: tl.constexpr, BLOCK_SEL: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # A program owns keys n·S + j·BLOCK_N .. of block n (sub-tile j of n_sub), so each key has one owner.
    n = tl.program_id(0) // n_sub
    j = tl.program_id(0) % n_sub
    i_h, i_b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    i_bh = i_b * H + i_h
    o_r = j * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = n * S + o_r
    m_k = (o_r < S) & (o_k < Tk)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    b_k = load_rows(k + i_b * stride_k_b + i_h * stride_k_h, o_k, m_k, o_d, m_d, stride_k_t, INTERPRET)
    b_v = load_rows(v + i_b * stride_v_b + i_h * stride_v_h, o_k, m_k, o_d, m_d, stride_v_t, INTERPRET)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    p_q = q + i_bh * Tq * HEAD_DIM
    p_do = do + i_bh * Tq * HEAD_DIM
    p_plan = plan + i_bh * n_tiles * n_blocks + n
    # Queries before the first of these keys cannot see them.
    for t in range(tl.maximum(n * S + j * BLOCK_N - q_offset, 0) // BLOCK_M, n_tiles):
        if tl.load(p_plan + t * n_blocks) != 0:
            o_i = t * BLOCK_M + tl.arange(0, BLOCK_M)
            m_i = o_i < Tq
            b_q = load_rows(p_q, o_i, m_i, o_d, m_d, HEAD_DIM, INTERPRET)
            b_do = load_rows(p_do, o_i, m_i, o_d, m_d, HEAD_DIM, INTERPRET)
            b_lse = tl.load(lse + i_bh * Tq + o_i, mask=m_i, other=0) * 1.4426950408889634
            b_delta = tl.load(delta + i_bh * Tq + o_i, mask=m_i, other=0)
            m_rows = _lists_block(_load_lists(block_ids, i_bh, o_i, m_i, Tq, N_SEL, BLOCK_SEL), n) & m_i
            # Transposed scores: keys × queries.
            m_st = _selected_pairs((q_offset + o_i)[None, :], o_k[:, None], D, W, P, HAS_GRID) & m_k[:, None] \
                & m_rows[None, :]
            b_dk, b_dv = dkdv_update(b_k, b_v, b_q, b_do, b_lse, b_delta, m_st, b_dk, b_dv, qk_scale, PRECISION)
    p_out = i_bh * Tk * HEAD_DIM + o_k[:, None] * HEAD_DIM + o_d[None, :]
    m_out = m_k[:, None] & m_d[None, :]
    tl.store(dk + p_out, (b_dk * sm_scale).to(dk.dtype.element_ty), mask=m_out)
    tl.store(dv + p_out, b_dv.to(dv.dtype.element_ty), mask=m_out)


def _common_args(q, k, block_ids, block_size: int, plan: BlockPlan, pattern, *, bwd: bool) -> dict:
    """The arguments every launch shares, by name: sizes, the pattern, tiles and flags."""
    B, H, Tq, K = q.shape
    block_m, block_n, warps, stages = tile_shape(q.dtype, block_size, bwd=bwd)
    if plan.block_m != block_m:
        raise ValueError(f"block_attention: the plan is for tiles of {plan.block_m} queries, the kernel's are "
                         f"{block_m}")
    return dict(
        Tq=Tq, Tk=k.shape[2], H=H, n_tiles=plan.tiles.shape[2], n_blocks=plan.n_blocks, N_SEL=block_ids.shape[-1],
        q_offset=pattern.q_offset, S=block_size, D=max(pattern.dilation, 1), W=pattern.window, P=pattern.sinks,
        qk_scale=pattern.scale * LOG2E, HEAD_DIM=K, HAS_GRID=pattern.dilation > 0,
        BLOCK_SEL=max(2, triton.next_power_of_2(block_ids.shape[-1])), BLOCK_D=max(16, triton.next_power_of_2(K)),
        PRECISION=dot_precision(q.dtype), INTERPRET=INTERPRET, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        num_stages=stages)


def _kv_strides(k, v) -> dict:
    return dict(zip(("stride_k_b", "stride_k_h", "stride_k_t", "stride_v_b", "stride_v_h", "stride_v_t"),
                    (*k.stride()[:3], *v.stride()[:3])))


def block_attention_fwd(q, k, v, block_ids, block_size: int, plan: BlockPlan, pattern):
    """Output (B, H, Tq, K) in q's dtype and the natural-log LSE (B, H, Tq) fp32 (-inf for rows with no key)."""
    B, H, Tq, K = q.shape
    out = torch.empty((B, H, Tq, K), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    args = _common_args(q, k, block_ids, block_size, plan, pattern, bwd=False)
    block_attn_fwd_kernel[(args["n_tiles"], H, B)](
        q, k, v, out, lse, block_ids, plan.tiles, **args, **_kv_strides(k, v),
        stride_q_b=q.stride(0), stride_q_h=q.stride(1), stride_q_t=q.stride(2),
    )
    return out, lse


def block_attention_bwd(q, k, v, out, lse, grad_out, grad_lse, block_ids, block_size: int, plan: BlockPlan,
                        pattern):
    """dq, dk, dv in the input dtype (FA2 recomputation from the saved LSE)."""
    B, H, Tq, K = q.shape
    Tk = k.shape[2]
    q, grad_out = q.contiguous(), grad_out.contiguous()
    args = _common_args(q, k, block_ids, block_size, plan, pattern, bwd=True)
    delta = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    attn_bwd_preprocess_kernel[(triton.cdiv(Tq, 16), H, B)](
        out, grad_out, grad_lse.contiguous() if grad_lse is not None else lse, delta, Tq, K,
        USE_DLSE=grad_lse is not None, BLOCK_D=args["BLOCK_D"], BLOCK_M=16,
    )
    shared = dict(**args, **_kv_strides(k, v), sm_scale=pattern.scale)
    dq = torch.empty((B, H, Tq, K), dtype=q.dtype, device=q.device)
    block_attn_bwd_dq_kernel[(args["n_tiles"], H, B)](q, k, v, grad_out, lse, delta, dq, block_ids, plan.tiles,
                                                      **shared)
    dk = torch.empty((B, H, Tk, K), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, H, Tk, K), dtype=v.dtype, device=v.device)
    n_sub = triton.cdiv(block_size, args["BLOCK_N"])
    block_attn_bwd_dkdv_kernel[(plan.n_blocks * n_sub, H, B)](q, k, v, grad_out, lse, delta, dk, dv, block_ids,
                                                              plan.tiles, n_sub=n_sub, **shared)
    return dq, dk, dv
