"""Forward of the (D, W, P) sparse causal attention (docs/spec.md §1.3) as one flash-attention kernel.

``allowed(q, k) = k <= q & ((k + 1) % D == 0 | q - k <= W | k < P)`` (D = -1: no grid term; D = 1: dense).
A program owns BLOCK_M queries (positions q0..q1) and runs one online softmax over three disjoint sets of key
positions, so no key is counted twice and no mask is materialised:

1. sink tiles: contiguous key tiles [0, ts1) with ts1 = min(cdiv(P, BLOCK_N), tw0);
2. grid keys in [ts1·BLOCK_N, tw0·BLOCK_N), gathered by index (p = first + j·D) into tiles of BLOCK_N keys, so a
   tile holds BLOCK_N grid keys whatever D is (for D = 1 these are plain contiguous tiles);
3. window tiles tw0..tw1 covering [q0 - W, q1].

Every key tile visited can hold an allowed key; tiles that hold none are never loaded. The per-element rule
is applied in every set, so correctness does not depend on the partition beyond its disjointness.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634


# fp32 runs with IEEE products (below), which no tensor core offers: the dots fall back to FMA units whose operand
# layouts spill registers at head dim 128 for any larger tile on sm_90 (python -m
# ratplus_mega.kernels.compile_check). fp32 serves exactness checks, not training, so it gets this one tile.
IEEE_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=8, num_stages=1)


def attention_configs(*, bwd: bool = False) -> list[triton.Config]:
    """Tile choices for autotuning, all free of register spills at head dim 128 on sm_90 (compile_check);
    exactly one under the interpreter."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1)]
    shapes = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3)]
    if bwd:
        shapes = [(32, 32, 4, 2), (64, 32, 4, 2), (32, 64, 8, 2), (64, 64, 8, 2), (64, 64, 8, 3)]
    tiles = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]
    return tiles + [IEEE_CONFIG]


# Autotuning keys: the head dim, the precision, the key mode and the pattern (D, W), which decides how the work
# falls into tiles. Not the sequence length: inference would retune at every new prompt length.
TUNING_KEY = ["BLOCK_D", "D", "W", "GATHERED", "PRECISION"]


def configs_for_precision(configs, named_args, **kwargs) -> list[triton.Config]:
    """Autotuner pruning: the IEEE tile for fp32, the tensor-core tiles otherwise."""
    if kwargs["PRECISION"] == "ieee":
        return [IEEE_CONFIG]
    return [c for c in configs if c is not IEEE_CONFIG]


def dot_precision(dtype: torch.dtype) -> str | None:
    """fp32 inputs get IEEE products (Triton's fp32 default is tf32, 1e-3 off); bf16 keeps Triton's default."""
    return "ieee" if dtype == torch.float32 or INTERPRET else None


@triton.jit
def allowed_mask(o_q, o_k, D, W, P, HAS_GRID: tl.constexpr):
    """The §1.3 rule for query positions ``o_q`` (column vector) against key positions ``o_k`` (row)."""
    b_rel = o_q - o_k
    m = (b_rel <= W) | (o_k < P)
    if HAS_GRID:
        m = m | ((o_k + 1) % D == 0)
    return m & (b_rel >= 0)


@triton.jit
def query_block_plan(q0, q1, Tk, D, W, P, HAS_GRID: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key sets of the query positions q0..q1: sink tiles [0, ts1), ``n_grid`` grid keys from ``g_first``
    (step D) below tw0·BLOCK_N, window tiles tw0..tw1. All operands stay non-negative (floor == truncation)."""
    tw0 = tl.maximum(q0 - W, 0) // BLOCK_N
    tw1 = tl.minimum(q1, Tk - 1) // BLOCK_N
    ts1 = tl.minimum((P + BLOCK_N - 1) // BLOCK_N, tw0)
    g_first = ts1 * 0
    n_grid = ts1 * 0
    if HAS_GRID:
        # smallest p >= ts1·BLOCK_N with (p + 1) % D == 0
        g_first = ((ts1 * BLOCK_N + D) // D) * D - 1
        n_grid = tl.maximum(tw0 * BLOCK_N - g_first + D - 1, 0) // D
    return ts1, g_first, n_grid, tw0, tw1


@triton.jit
def load_rows(p_base, o_n, m_n, o_d, m_d, stride_t, INTERPRET: tl.constexpr):
    """A (len(o_n), BLOCK_D) tile of rows ``o_n``; upcast to fp32 only under the interpreter (its bf16
    arithmetic and bf16 dot are wrong), so that the GPU keeps bf16 tensor-core products."""
    b_x = tl.load(p_base + o_n[:, None].to(tl.int64) * stride_t + o_d[None, :], mask=m_n[:, None] & m_d[None, :],
                  other=0)
    if INTERPRET:
        b_x = b_x.to(tl.float32)
    return b_x


@triton.jit
def _attend(b_q, b_acc, b_m, b_l, p_k, p_v, o_n, o_kpos, m_n, o_qpos, o_d, m_d, stride_kt, stride_vt, D, W, P,
            qk_scale, HAS_GRID: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step over the key rows ``o_n`` at positions ``o_kpos`` (scores in log2 units)."""
    b_k = load_rows(p_k, o_n, m_n, o_d, m_d, stride_kt, INTERPRET)
    b_v = load_rows(p_v, o_n, m_n, o_d, m_d, stride_vt, INTERPRET)
    m_s = allowed_mask(o_qpos[:, None], o_kpos[None, :], D, W, P, HAS_GRID) & m_n[None, :]
    return softmax_step(b_q, b_k, b_v, m_s, b_acc, b_m, b_l, qk_scale, PRECISION)


@triton.jit
def softmax_step(b_q, b_k, b_v, m_s, b_acc, b_m, b_l, qk_scale, PRECISION: tl.constexpr):
    """The online-softmax update of one key tile under the pair mask ``m_s`` (scores in log2 units)."""
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
    b_s = tl.where(m_s, b_s, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    b_p = tl.exp2(b_s - b_m_new[:, None])
    b_alpha = tl.exp2(b_m - b_m_new)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
    return b_acc, b_m_new, b_l


@triton.jit
def gathered_block_plan(key_end, window_start, far_end, i_first, i_last):
    """Gathered keys of the query rows i_first..i_last: far entries [0, f_hi), window key indices [w_lo, k_hi)."""
    return tl.load(far_end + i_first), tl.load(window_start + i_first), tl.load(key_end + i_last)


@triton.autotune(configs=attention_configs(), key=TUNING_KEY,
                 prune_configs_by={"early_config_prune": configs_for_precision})
@triton.jit
def sparse_attn_fwd_kernel(
    q, k, v, o, lse,
    kpos, key_end, window_start, far_end, far_index,
    Tq, Tk, H, q_offset, D, W, P, qk_scale,
    stride_q_b, stride_q_h, stride_q_t, stride_k_b, stride_k_h, stride_k_t, stride_v_b, stride_v_h, stride_v_t,
    HEAD_DIM,
    HAS_GRID: tl.constexpr, GATHERED: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Query blocks run last-first: the late ones visit the most keys and should start early.
    i_m = tl.num_programs(0) - 1 - tl.program_id(0)
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

    # A finite floor keeps rows that have seen no allowed key yet free of (-inf) - (-inf).
    b_m = tl.full([BLOCK_M], -1e30, dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if GATHERED:
        f_hi, w_lo, k_hi = gathered_block_plan(key_end, window_start, far_end, i_m * BLOCK_M,
                                               tl.minimum(i_m * BLOCK_M + BLOCK_M, Tq) - 1)
        for j0 in range(0, f_hi, BLOCK_N):
            o_j = j0 + tl.arange(0, BLOCK_N)
            m_j = o_j < f_hi
            o_n = tl.load(far_index + o_j, mask=m_j, other=0)
            b_acc, b_m, b_l = _attend(b_q, b_acc, b_m, b_l, p_k, p_v, o_n, tl.load(kpos + o_n, mask=m_j, other=0),
                                      m_j, o_qpos, o_d, m_d, stride_k_t, stride_v_t, D, W, P, qk_scale, HAS_GRID,
                                      INTERPRET, PRECISION)
        for n0 in range(w_lo, k_hi, BLOCK_N):
            o_n = n0 + tl.arange(0, BLOCK_N)
            m_n = o_n < k_hi
            b_acc, b_m, b_l = _attend(b_q, b_acc, b_m, b_l, p_k, p_v, o_n, tl.load(kpos + o_n, mask=m_n, other=0),
                                      m_n, o_qpos, o_d, m_d, stride_k_t, stride_v_t, D, W, P, qk_scale, HAS_GRID,
                                      INTERPRET, PRECISION)
    else:
        q0 = q_offset + i_m * BLOCK_M
        q1 = q_offset + tl.minimum(i_m * BLOCK_M + BLOCK_M, Tq) - 1
        ts1, g_first, n_grid, tw0, tw1 = query_block_plan(q0, q1, Tk, D, W, P, HAS_GRID, BLOCK_N)
        for i_n in range(0, ts1):
            o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
            b_acc, b_m, b_l = _attend(b_q, b_acc, b_m, b_l, p_k, p_v, o_n, o_n, o_n < Tk, o_qpos, o_d, m_d,
                                      stride_k_t, stride_v_t, D, W, P, qk_scale, HAS_GRID, INTERPRET, PRECISION)
        if HAS_GRID:
            for j0 in range(0, n_grid, BLOCK_N):
                o_j = j0 + tl.arange(0, BLOCK_N)
                o_n = g_first + o_j * D
                b_acc, b_m, b_l = _attend(b_q, b_acc, b_m, b_l, p_k, p_v, o_n, o_n, o_j < n_grid, o_qpos, o_d, m_d,
                                          stride_k_t, stride_v_t, D, W, P, qk_scale, HAS_GRID, INTERPRET, PRECISION)
        for i_n in range(tw0, tw1 + 1):
            o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
            b_acc, b_m, b_l = _attend(b_q, b_acc, b_m, b_l, p_k, p_v, o_n, o_n, o_n < Tk, o_qpos, o_d, m_d,
                                      stride_k_t, stride_v_t, D, W, P, qk_scale, HAS_GRID, INTERPRET, PRECISION)

    # A row with no allowed key (only possible with gathered keys; padded rows are never stored) gets a zero
    # output and an LSE of -inf, so partial results over disjoint key sets merge exactly.
    m_any = b_l > 0
    b_o = b_acc / tl.where(m_any, b_l, 1.0)[:, None]
    p_o = o + i_bh.to(tl.int64) * Tq * HEAD_DIM + o_i[:, None] * HEAD_DIM + o_d[None, :]
    tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_i[:, None] & m_d[None, :])
    # Scores are in log2 units; the LSE is returned in natural log (· ln 2).
    b_lse = tl.where(m_any, (b_m + tl.log2(tl.where(m_any, b_l, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse + i_bh.to(tl.int64) * Tq + o_i, b_lse, mask=m_i)


def index_args(gathered, device) -> tuple[torch.Tensor, ...]:
    """The gathered-key plan's tensors as kernel arguments: positions, key_end, window_start, far_end,
    far_index; for keys at positions 0 .. Tk - 1 an unfilled placeholder (never read: no fill kernel per call)."""
    if gathered is None:
        return (torch.empty(1, dtype=torch.int32, device=device),) * 5
    return gathered.positions, gathered.key_end, gathered.window_start, gathered.far_end, gathered.far_index


def attention_fwd(q, k, v, pattern, gathered=None):
    """Output (B, H, Tq, K) in q's dtype and the natural-log LSE (B, H, Tq) fp32 of the scaled scores; keys at
    positions 0 .. Tk - 1, or as planned by ``gathered`` (a ``GatheredKeys``)."""
    B, H, Tq, K = q.shape
    Tk = k.shape[2]
    out = torch.empty((B, H, Tq, K), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), H, B)  # noqa: E731
    sparse_attn_fwd_kernel[grid](
        q, k, v, out, lse,
        *index_args(gathered, q.device),
        Tq, Tk, H, pattern.q_offset, pattern.dilation, pattern.window, pattern.sinks, pattern.scale * LOG2E,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        K,
        HAS_GRID=pattern.dilation > 0, GATHERED=gathered is not None, BLOCK_D=max(16, triton.next_power_of_2(K)),
        PRECISION=dot_precision(q.dtype), INTERPRET=INTERPRET,
    )
    return out, lse
