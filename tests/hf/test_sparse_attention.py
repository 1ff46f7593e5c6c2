"""``sparse_attention`` (spec §1.3) against dense softmax under the explicit single boolean mask."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ratplus_mega.hf import sparse_attention
from ratplus_mega.kernels.testing import BF16_ATOL, BF16_VALUE_FACTOR, compare_to_baseline

pytestmark = pytest.mark.usefixtures("single_thread")

FP32_VALUES, FP32_GRADS = 1e-5, 1e-4  # docs/decisions.md "Tests", relative to the reference's scale


def allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, dilation: int, window: int, sinks: int) -> torch.Tensor:
    """Spec §1.3: k <= q and ((k + 1) % D == 0 or q - k <= W or k < P); D = -1 has no grid term."""
    q, k = q_pos[:, None], k_pos[None, :]
    visible = (q - k <= window) | (k < sinks)
    if dilation != -1:
        visible |= (k + 1) % dilation == 0
    return (k <= q) & visible


def masked_dense(q, k, v, dilation, window, sinks, q_offset=0):
    """Dense fp64 attention of queries at q_offset.. over all keys, then the mask; returns (out, lse)."""
    q_pos = torch.arange(q_offset, q_offset + q.shape[-2])
    mask = allowed(q_pos, torch.arange(k.shape[-2]), dilation, window, sinks)
    scores = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v.double(), torch.logsumexp(scores, dim=-1)


def qkv(batch, heads, tq, tk, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, tq, dim, generator=g), torch.randn(batch, heads, tk, dim, generator=g),
            torch.randn(batch, heads, tk, dim, generator=g))


# (T, D, W, P): T not a multiple of D, P not a multiple of D, W = 0, D = 1, D = -1, P > T.
PATTERNS = [
    (37, 4, 3, 2), (37, 3, 5, 4), (40, 4, 0, 0), (33, 8, 0, 5), (29, 5, 1, 7), (31, 1, 0, 0), (26, 1, 3, 2),
    (35, -1, 4, 3), (35, -1, 0, 1), (23, 2, 7, 0), (19, 16, 2, 3), (12, 4, 2, 20), (50, 7, 11, 6),
]


def pattern_id(t, d, w, p) -> str:
    return f"T{t}-D{d}-W{w}-P{p}"


@pytest.mark.parametrize("block_size", [128, 8], ids=["one-block", "block8"])
@pytest.mark.parametrize("t,d,w,p", PATTERNS, ids=[pattern_id(*c) for c in PATTERNS])
def test_forward_and_lse_match_masked_dense(assert_close, t, d, w, p, block_size):
    q, k, v = qkv(2, 3, t, t, 8, seed=t * 31 + d)
    out, lse = sparse_attention(q, k, v, d, w, p, return_lse=True, block_size=block_size)
    ref_out, ref_lse = masked_dense(q, k, v, d, w, p)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert_close("out", out, ref_out, FP32_VALUES)
    assert_close("lse", lse, ref_lse, FP32_VALUES)
    plain = sparse_attention(q, k, v, d, w, p, block_size=block_size)
    assert_close("out without lse", plain, ref_out, FP32_VALUES)


@pytest.mark.parametrize("t,d,w,p", PATTERNS[::2], ids=[pattern_id(*c) for c in PATTERNS[::2]])
def test_gradients_match_masked_dense(assert_close, t, d, w, p):
    q, k, v = (x.requires_grad_() for x in qkv(1, 2, t, t, 8, seed=t + d))
    out = sparse_attention(q, k, v, d, w, p, block_size=8)
    ref_q, ref_k, ref_v = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref_out, _ = masked_dense(ref_q, ref_k, ref_v, d, w, p)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref_out * dout.double()).sum(), (ref_q, ref_k, ref_v))
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, got, ref, FP32_GRADS)


OFFSET_CASES = [(41, 4, 3, 2, 17, 24), (41, 3, 0, 4, 40, 1), (30, -1, 5, 2, 9, 13), (30, 1, 0, 0, 12, 18),
                (45, 8, 2, 0, 3, 30)]


@pytest.mark.parametrize("t,d,w,p,offset,tq", OFFSET_CASES,
                         ids=[f"{pattern_id(t, d, w, p)}-off{o}-Tq{n}" for t, d, w, p, o, n in OFFSET_CASES])
def test_q_offset_queries_a_later_chunk_against_the_key_prefix(assert_close, t, d, w, p, offset, tq):
    q, k, v = qkv(2, 2, tq, t, 8, seed=offset)
    out, lse = sparse_attention(q, k, v, d, w, p, q_offset=offset, return_lse=True, block_size=8)
    ref_out, ref_lse = masked_dense(q, k, v, d, w, p, q_offset=offset)
    assert_close("out", out, ref_out, FP32_VALUES)
    assert_close("lse", lse, ref_lse, FP32_VALUES)


def test_keys_not_covering_the_queries_raise():
    q, k, v = qkv(1, 1, 4, 10, 8, seed=0)
    with pytest.raises(ValueError, match="cannot cover"):
        sparse_attention(q, k, v, 2, 0, 0, q_offset=7)


@pytest.mark.parametrize("d,w,p", [(0, 0, 0), (-2, 1, 0), (2, -1, 0), (2, 0, -1)],
                         ids=["D0", "D-2", "W-1", "P-1"])
def test_bad_pattern_raises(d, w, p):
    q, k, v = qkv(1, 1, 4, 4, 8, seed=0)
    with pytest.raises(ValueError, match="bad pattern"):
        sparse_attention(q, k, v, d, w, p)


@pytest.mark.parametrize("t,w,p", [(33, 0, 0), (33, 4, 3)], ids=["T33-W0-P0", "T33-W4-P3"])
def test_dilation_one_is_sdpa_causal(assert_close, t, w, p):
    """D = 1 makes every key a grid key, whatever W and P."""
    q, k, v = qkv(2, 2, t, t, 16, seed=1)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for block_size in (128, 5):
        out, _ = sparse_attention(q, k, v, 1, w, p, return_lse=True, block_size=block_size)
        assert_close(f"out block {block_size}", out, ref, FP32_VALUES)


def test_bf16_inputs_give_bf16_output(masked_attention):
    """By the bf16 rule (ratplus_mega.kernels.testing): off the float64 result by at most a multiple of what
    plain torch attention in bf16 loses on the same inputs."""
    q, k, v = (x.bfloat16() for x in qkv(1, 2, 21, 21, 16, seed=2))
    out = sparse_attention(q, k, v, 4, 2, 1)
    assert out.dtype == torch.bfloat16
    ref, _ = masked_dense(q, k, v, 4, 2, 1)
    base, _ = masked_attention(q, k, v, 4, 2, 1)
    compare_to_baseline("out", out, base, ref, factor=BF16_VALUE_FACTOR, atol=BF16_ATOL)


# ------------------------------------------------------------------------------------------------------------
# The vectorised mask above against the index rule spelled out one (query, key) pair at a time.
# ------------------------------------------------------------------------------------------------------------

def visible_by_rule(q: int, k: int, dilation: int, window: int, sinks: int) -> bool:
    """docs/spec.md §1.3, clause by clause."""
    if k > q:
        return False  # causal
    if q - k <= window:
        return True  # the query itself and the W keys before it
    if k < sinks:
        return True  # the first P positions
    return dilation != -1 and (k + 1) % dilation == 0  # the grid: every D-th position, none for D = -1


def test_mask_rule_matches_the_rule_pair_by_pair():
    for t, d, w, p in itertools.product((64, 97), (-1, 1, 2, 3, 4, 8, 16), (0, 1, 5, 16), (0, 1, 4, 7)):
        pos = torch.arange(t)
        ours = allowed(pos, pos, d, w, p).numpy()
        rule = np.array([[visible_by_rule(q, k, d, w, p) for k in range(t)] for q in range(t)])
        assert np.array_equal(ours, rule), (t, d, w, p)


def test_mask_rule_examples():
    """Spec §1.3 worked examples, so the mask above is pinned even without the shared oracle."""
    pos = torch.arange(20)
    m = allowed(pos, pos, 4, 0, 0)
    assert torch.nonzero(m[13]).flatten().tolist() == [3, 7, 11, 13]
    m = allowed(pos, pos, 4, 0, 4)  # P = 4: position 3 is a sink, first grid key is 7
    assert torch.nonzero(m[13]).flatten().tolist() == [0, 1, 2, 3, 7, 11, 13]
    m = allowed(pos, pos, -1, 2, 1)
    assert torch.nonzero(m[13]).flatten().tolist() == [0, 11, 12, 13]


GATHER_CASES = [(48, 4, 3, 2, 24), (40, 8, 0, 0, 16), (45, -1, 6, 3, 30), (36, 3, 5, 4, 12)]


@pytest.mark.parametrize("t,d,w,p,offset", GATHER_CASES,
                         ids=[f"{pattern_id(t, d, w, p)}-off{o}" for t, d, w, p, o in GATHER_CASES])
def test_gathered_keys_at_global_positions(assert_close, t, d, w, p, offset):
    """A context-parallel chunk: queries offset.. see only the sinks, the earlier grid keys, a W-token halo and
    their own chunk; that gathered set gives the full-prefix result, and two disjoint key sets merged by
    log-sum-exp give it too."""
    q_all, k, v = qkv(1, 2, t, t, 8, seed=t + offset)
    q = q_all[..., offset:, :]
    positions = torch.arange(t)
    grid = ((positions + 1) % d == 0) if d != -1 else torch.zeros(t, dtype=torch.bool)
    keep = (positions < p) | grid | (positions >= offset - w)
    chosen = positions[keep]
    out, lse = sparse_attention(q, k[..., chosen, :], v[..., chosen, :], d, w, p, q_offset=offset,
                                k_positions=chosen, return_lse=True, block_size=8)
    ref_out, ref_lse = masked_dense(q, k, v, d, w, p, q_offset=offset)
    assert_close("out", out, ref_out, FP32_VALUES)
    assert_close("lse", lse, ref_lse, FP32_VALUES)

    early, late = positions[positions < offset], positions[positions >= offset]
    o1, l1 = sparse_attention(q, k[..., early, :], v[..., early, :], d, w, p, q_offset=offset, k_positions=early,
                              return_lse=True)
    o2, l2 = sparse_attention(q, k[..., late, :], v[..., late, :], d, w, p, q_offset=offset, k_positions=late,
                              return_lse=True)
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    merged = (w1[..., None] * o1 + w2[..., None] * o2) / (w1 + w2)[..., None]
    assert_close("merged out", merged, ref_out, FP32_VALUES)


def test_dense_attention_over_the_whole_sequence_runs_sdpa_not_the_fused_kernel(monkeypatch, assert_close):
    """Where a fused kernel is present (CUDA), a dense pattern over the whole sequence goes to torch's SDPA
    (flash attention); a sparse pattern, or keys at given positions, still go to the kernel."""
    from ratplus_mega.hf import modeling_ratplus

    calls = []

    def fake_kernel(q, k, v, dilation, window, sinks, scale, **kw):
        calls.append((dilation, window, sinks))
        return sparse_attention(q, k, v, dilation, window, sinks, scale, **kw)

    monkeypatch.setattr(modeling_ratplus, "_fused", lambda name, tensor: fake_kernel)
    q, k, v = qkv(1, 2, 24, 24, 16, seed=2)
    for pattern in [(1, 0, 0), (1, 4, 2)]:
        out = modeling_ratplus.attention(q, k, v, pattern)
        assert_close(f"dense {pattern}", out, masked_dense(q, k, v, *pattern)[0], FP32_VALUES)
    assert calls == []
    modeling_ratplus.attention(q, k, v, (4, 2, 1))
    modeling_ratplus.attention(q[..., 8:, :], k, v, (1, 0, 0), q_offset=8)
    assert calls == [(4, 2, 1), (1, 0, 0)]
