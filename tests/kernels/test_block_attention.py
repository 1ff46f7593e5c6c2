"""Fused selected-blocks attention (kernels/sparse_attn/blocks.py) against float64 attention under an explicit
boolean mask built here position by position: query q sees key k iff k <= q, k's block (k // S) is among the
blocks q lists, and the (D, W, P) rule does not give q the key. Output, LSE and the gradients of q, k and v.

Under the interpreter the tiles are 16 x 16: S = 16 is one key tile per block, S = 5 puts several blocks in a
query tile's reach with partial key tiles, S = 40 spans three key sub-tiles, S = 1 is one key per block.
"""

from __future__ import annotations

import pytest
import torch

from ratplus_mega.kernels.testing import BF16_ATOL, BF16_GRAD_FACTOR, BF16_VALUE_FACTOR, compare, compare_to_baseline

pytestmark = pytest.mark.usefixtures("single_thread")

CASES = {
    # name: (Tq, Tk, q_offset, S, (D, W, P), ids per query, dtype)
    "S16-pure": (37, 37, 0, 16, (-1, 0, 0), 3, torch.float32),
    "S5-W3-P2": (40, 40, 0, 5, (-1, 3, 2), 4, torch.float32),
    "S5-dilated-D4": (40, 40, 0, 5, (4, 0, 0), 3, torch.float32),
    "S40-spans-sub-tiles": (90, 90, 0, 40, (-1, 2, 0), 2, torch.float32),
    "S1": (20, 20, 0, 1, (3, 1, 1), 5, torch.float32),
    "chunked-prefill": (30, 70, 25, 8, (16, 5, 1), 4, torch.float32),
    "later-blocks-listed": (40, 40, 0, 5, (-1, 1, 0), 4, torch.float32),
    "S8-bf16": (40, 40, 0, 8, (-1, 2, 1), 4, torch.bfloat16),
    "S64-bf16-several-gpu-tiles": (150, 150, 0, 64, (-1, 0, 4), 3, torch.bfloat16),
}


def random_ids(tq: int, q_offset: int, block_size: int, per_query: int, shape, seed: int,
               n_blocks: int | None = None) -> torch.Tensor:
    """Each query lists blocks at or before its own, with repeats (any of the ``n_blocks`` blocks, later ones
    included, when given); in most cases some queries list only keys the (D, W, P) rule already covers, so rows
    with no key occur too."""
    g = torch.Generator().manual_seed(seed)
    own = (torch.arange(q_offset, q_offset + tq) // block_size)[:, None]
    top = own + 1 if n_blocks is None else torch.full_like(own, n_blocks)
    draws = torch.rand((*shape, tq, per_query), generator=g)
    return (draws * top).long().clamp(max=top - 1)


def explicit_mask(ids, tq: int, tk: int, q_offset: int, block_size: int, pattern) -> torch.Tensor:
    """(B, H, Tq, Tk) bool, one position pair at a time."""
    d, w, p = pattern
    mask = torch.zeros((*ids.shape[:2], tq, tk), dtype=torch.bool)
    for b in range(ids.shape[0]):
        for h in range(ids.shape[1]):
            for i in range(tq):
                qpos, listed = q_offset + i, set(ids[b, h, i].tolist())
                for j in range(min(qpos + 1, tk)):
                    fixed = qpos - j <= w or j < p or (d != -1 and (j + 1) % d == 0)
                    mask[b, h, i, j] = j // block_size in listed and not fixed
    return mask


def masked_attention(q, k, v, mask):
    """Attention under ``mask``; rows with no key give a zero output and an LSE of -inf (and no NaN in backward:
    their scores are left finite and their weights zeroed)."""
    empty = ~mask.any(-1, keepdim=True)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask & ~empty, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1).masked_fill(empty[..., 0], float("-inf"))
    return torch.softmax(scores, dim=-1).masked_fill(~mask, 0) @ v, lse


def loss_and_grads(out, lse, weights, inputs):
    loss = (out.double() * weights[0]).sum() + (torch.where(lse.isfinite(), lse, 0).double() * weights[1]).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("name", list(CASES))
def test_block_attention_matches_explicit_mask(kernels, nan_poison, device, name):
    tq, tk, off, size, pattern, per_query, dtype = CASES[name]
    b, h, kd = 2, 2, 16
    g = torch.Generator().manual_seed(tq * 100 + size)
    q = torch.randn((b, h, tq, kd), generator=g).to(device, dtype).requires_grad_()
    k, v = (torch.randn((b, h, tk, kd), generator=g).to(device, dtype).requires_grad_() for _ in range(2))
    weights = [torch.randn((b, h, tq, kd), generator=g, dtype=torch.float64).to(device),
               torch.randn((b, h, tq), generator=g, dtype=torch.float64).to(device)]
    ids = random_ids(tq, off, size, per_query, (b, h), seed=size,
                     n_blocks=-(-tk // size) if name == "later-blocks-listed" else None)
    mask = explicit_mask(ids, tq, tk, off, size, pattern).to(device)
    with nan_poison():
        out, lse = kernels.block_attention(q, k, v, ids.to(device), size, *pattern, q_offset=off, return_lse=True)
        grads = loss_and_grads(out, lse, weights, (q, k, v))
    empty = ~mask.any(-1)
    assert not empty.all(), "the case must hold rows with keys"
    assert torch.equal(lse.isneginf(), empty), "rows without a key must have an LSE of -inf"
    assert not out[empty].any(), "rows without a key must have a zero output"

    oracle = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = masked_attention(*oracle, mask)
    ref_grads = loss_and_grads(ref_out, ref_lse, weights, oracle)
    names = ("dq", "dk", "dv")
    compare("lse", lse.masked_fill(empty, 0), ref_lse.masked_fill(empty, 0), 1e-5)
    if dtype == torch.float32:
        compare("out", out, ref_out, 1e-5)
        for name_, got, ref in zip(names, grads, ref_grads):
            compare(name_, got, ref, 1e-4)
        return
    base = [x.detach().requires_grad_() for x in (q, k, v)]
    base_out, base_lse = masked_attention(*base, mask)
    base_grads = loss_and_grads(base_out, base_lse, weights, base)
    compare_to_baseline("out", out, base_out, ref_out, factor=BF16_VALUE_FACTOR, atol=BF16_ATOL)
    for name_, got, baseline, ref in zip(names, grads, base_grads, ref_grads):
        compare_to_baseline(name_, got, baseline, ref, factor=BF16_GRAD_FACTOR, atol=BF16_ATOL)


def test_block_attention_rejects_bad_ids(kernels, device):
    q = torch.randn((1, 1, 8, 16), device=device)
    with pytest.raises(ValueError, match=r"block ids must lie in 0 \.\. 1"):
        kernels.block_attention(q, q, q, torch.full((1, 1, 8, 2), 2, device=device), 4, -1, 0, 0)
    with pytest.raises(ValueError, match="block_ids must be"):
        kernels.block_attention(q, q, q, torch.zeros((1, 1, 7, 2), dtype=torch.long, device=device), 4, -1, 0, 0)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        kernels.block_attention(q, q, q, torch.zeros((1, 1, 8, 2), dtype=torch.long, device=device), 0, -1, 0, 0)
