"""Fused sparse attention (kernels/sparse_attn) against the reference ``sparse_attention``: output, LSE and the
gradients of q, k and v (the loss also uses the LSE, so its gradient path is checked too).

Under the interpreter the tiles are 16 × 16: T = 37 and 70 leave partial tiles, W = 17 spans two tiles,
D = 16 puts one grid key per tile (gathered), D = 3 and 4 several, and q_offset > 0 starts queries inside a
tile with keys beyond the last query.
"""

from __future__ import annotations

import pytest
import torch

from ratplus_mega.hf.modeling_ratplus import sparse_attention as reference_attention
from ratplus_mega.kernels.testing import (BF16_ATOL, BF16_GRAD_FACTOR, BF16_VALUE_FACTOR, compare,
                                          compare_to_baseline)

pytestmark = pytest.mark.usefixtures("single_thread")

# fp32: (values, gradients) against the reference, relative to its scale (docs/decisions.md, "Tests"). bf16: the
# rule of ratplus_mega.kernels.testing, against the float64 oracle (see check).
TOL = {torch.float32: (1e-5, 1e-4)}
DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16"}

CASES = [
    # B, H, Tq, Tk, K, D, W, P, q_offset, dtype
    (1, 2, 37, 37, 16, 4, 5, 1, 0, torch.float32),
    (1, 1, 70, 70, 16, 1, 0, 0, 0, torch.float32),
    (1, 1, 70, 70, 16, 3, 5, 1, 0, torch.float32),
    (1, 1, 70, 70, 16, 4, 0, 0, 0, torch.float32),
    (1, 1, 70, 70, 16, 16, 17, 4, 0, torch.float32),
    (1, 1, 70, 70, 16, 16, 0, 0, 0, torch.float32),
    (1, 1, 70, 70, 16, -1, 5, 4, 0, torch.float32),
    (1, 1, 70, 70, 16, -1, 0, 0, 0, torch.float32),
    (1, 1, 70, 70, 16, -1, 0, 70, 0, torch.float32),  # dense written as sinks
    (2, 1, 37, 37, 24, 3, 17, 4, 0, torch.float32),  # head dim below its power-of-two tile
    (1, 2, 30, 70, 16, 4, 5, 4, 20, torch.float32),  # chunked prefill: keys after the last query
    (1, 1, 21, 37, 16, 16, 5, 1, 16, torch.float32),
    (1, 2, 37, 37, 16, 4, 5, 1, 0, torch.bfloat16),
    (1, 1, 70, 70, 16, 16, 17, 4, 0, torch.bfloat16),
]


def case_id(case) -> str:
    b, h, tq, tk, kd, d, w, p, off, dtype = case
    t = f"T{tq}" if tq == tk and off == 0 else f"Tq{tq}-Tk{tk}-off{off}"
    return f"B{b}-H{h}-{t}-K{kd}-D{d}-W{w}-P{p}-{DTYPE_NAME[dtype]}"


def run_and_grad(fn, q, k, v, pattern, q_offset, weights):
    out, lse = fn(q, k, v, *pattern, q_offset=q_offset, return_lse=True)
    loss = (out.float() * weights[0]).sum() + (lse * weights[1]).sum()
    return out.detach(), lse.detach(), torch.autograd.grad(loss, (q, k, v))


def check(out, grads, ref_out, ref_grads, dtype, masked_attention, q, k, v, pattern, q_offset, weights,
          k_positions=None):
    """Output and gradients of q, k, v of a kernel call. fp32: against the reference's at TOL. bf16:
    ``masked_attention`` (explicit-mask attention in plain torch) on float64 copies of the inputs is the oracle
    and on the inputs as given torch's own bf16 baseline; the output must be within BF16_VALUE_FACTOR, each
    gradient within BF16_GRAD_FACTOR times the baseline's error of the oracle (same loss: the output and the
    finite LSEs, weighted)."""
    names = ["dq", "dk", "dv"]
    if dtype == torch.float32:
        tol_v, tol_g = TOL[dtype]
        compare("out", out, ref_out, tol_v)
        for name, got, ref in zip(names, grads, ref_grads):
            compare(name, got, ref, tol_g)
        return

    def run(q_, k_, v_):
        o, lse = masked_attention(q_, k_, v_, *pattern, q_offset=q_offset, k_positions=k_positions)
        wide = torch.promote_types(o.dtype, torch.float32)
        loss = (o.to(wide) * weights[0]).sum() + (torch.where(lse.isfinite(), lse, 0).to(wide) * weights[1]).sum()
        return o.detach(), torch.autograd.grad(loss, (q_, k_, v_))

    base_out, base_grads = run(q, k, v)
    oracle_out, oracle_grads = run(*(x.detach().double().requires_grad_() for x in (q, k, v)))
    compare_to_baseline("out", out, base_out, oracle_out, factor=BF16_VALUE_FACTOR, atol=BF16_ATOL)
    for name, got, base, oracle in zip(names, grads, base_grads, oracle_grads):
        compare_to_baseline(name, got, base, oracle, factor=BF16_GRAD_FACTOR, atol=BF16_ATOL)


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_sparse_attention_matches_reference(kernels, masked_attention, nan_poison, device, case):
    b, h, tq, tk, kd, d, w, p, off, dtype = case
    g = torch.Generator().manual_seed(tq * 1000 + tk + d * 7 + w * 3 + p)
    q = torch.randn((b, h, tq, kd), generator=g).to(device, dtype).requires_grad_()
    k, v = (torch.randn((b, h, tk, kd), generator=g).to(device, dtype).requires_grad_() for _ in range(2))
    weights = [torch.randn((b, h, tq, kd), generator=g).to(device), torch.randn((b, h, tq), generator=g).to(device)]
    with nan_poison():
        out, lse, grads = run_and_grad(kernels.sparse_attention, q, k, v, (d, w, p), off, weights)
    ref_out, ref_lse, ref_grads = run_and_grad(reference_attention, q, k, v, (d, w, p), off, weights)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert all(got.dtype == dtype for got in grads)
    compare("lse", lse, ref_lse, 1e-5)  # fp32 in both dtypes, from the same (rounded) inputs
    check(out, grads, ref_out, ref_grads, dtype, masked_attention, q, k, v, (d, w, p), off, weights)


def context_parallel_keys(q_offset: int, dilation: int, window: int, sinks: int, tq: int) -> torch.Tensor:
    """The key positions a context-parallel rank holding queries ``q_offset ..`` gathers: the sinks and grid keys
    of earlier ranks, the previous rank's last W keys, then its own chunk."""
    far = [p for p in range(q_offset - window) if p < sinks or (dilation > 0 and (p + 1) % dilation == 0)]
    return torch.tensor(far + list(range(max(q_offset - window, 0), q_offset + tq)))


def random_keys(n: int, span: int, seed: int) -> torch.Tensor:
    return torch.randperm(span, generator=torch.Generator().manual_seed(seed))[:n].sort().values


GATHERED_CASES = {
    # name: (Tq, q_offset, key positions, (D, W, P), dtype)
    # (Tq chosen so that the last far key any query sees, q_last - W - 1, is a grid key)
    "cp-D4-W5-P2": (38, 48, context_parallel_keys(48, 4, 5, 2, 38), (4, 5, 2), torch.float32),
    "cp-D16-W17-P4": (44, 70, context_parallel_keys(70, 16, 17, 4, 44), (16, 17, 4), torch.float32),
    "cp-D-1-W20-P3": (30, 50, context_parallel_keys(50, -1, 20, 3, 30), (-1, 20, 3), torch.float32),
    "cp-D4-W5-P2-bf16": (38, 48, context_parallel_keys(48, 4, 5, 2, 38), (4, 5, 2), torch.bfloat16),
    # arbitrary sorted sets: keys after the last query, far keys inside window tiles, rows with no key
    "random-D3-W2-P1": (40, 60, random_keys(53, 120, 3), (3, 2, 1), torch.float32),
    "random-D16-W17-P4": (40, 60, random_keys(53, 120, 4), (16, 17, 4), torch.float32),
    "random-D-1-W0-P0-empty-rows": (40, 60, random_keys(53, 120, 5), (-1, 0, 0), torch.float32),
    "sparse-D5-W20-P2": (70, 100, random_keys(40, 200, 6), (5, 20, 2), torch.float32),  # gaps wider than a tile
    "three-keys": (21, 5, torch.tensor([0, 7, 19]), (4, 1, 1), torch.float32),
    "no-keys": (5, 3, torch.zeros(0, dtype=torch.long), (4, 1, 1), torch.float32),
}


def run_and_grad_gathered(fn, q, k, v, pattern, q_offset, k_positions, weights):
    """As ``run_and_grad``; the loss takes only finite LSEs (a row with no allowed key has -inf)."""
    out, lse = fn(q, k, v, *pattern, q_offset=q_offset, k_positions=k_positions, return_lse=True)
    loss = (out.float() * weights[0]).sum() + (torch.where(lse.isfinite(), lse, 0) * weights[1]).sum()
    return out.detach(), lse.detach(), torch.autograd.grad(loss, (q, k, v))


@pytest.mark.parametrize("name", list(GATHERED_CASES))
def test_sparse_attention_gathered_keys_match_reference(kernels, masked_attention, nan_poison, device, name):
    """Keys at arbitrary sorted global positions against the reference's explicit per-position mask."""
    tq, off, positions, pattern, dtype = GATHERED_CASES[name]
    tk, b, h, kd = len(positions), 1, 2, 16
    g = torch.Generator().manual_seed(tq * 1000 + tk)
    q = torch.randn((b, h, tq, kd), generator=g).to(device, dtype).requires_grad_()
    k, v = (torch.randn((b, h, tk, kd), generator=g).to(device, dtype).requires_grad_() for _ in range(2))
    weights = [torch.randn((b, h, tq, kd), generator=g).to(device), torch.randn((b, h, tq), generator=g).to(device)]
    with nan_poison():
        out, lse, grads = run_and_grad_gathered(kernels.sparse_attention, q, k, v, pattern, off, positions.to(device),
                                                weights)
    ref_out, ref_lse, ref_grads = run_and_grad_gathered(reference_attention, q, k, v, pattern, off, positions,
                                                        weights)
    empty = ref_lse.isneginf()
    assert torch.equal(lse.isneginf().cpu(), empty.cpu()), "rows without an allowed key differ"
    compare("lse", lse.masked_fill(empty, 0), ref_lse.masked_fill(empty, 0), 1e-5)
    check(out, grads, ref_out, ref_grads, dtype, masked_attention, q, k, v, pattern, off, weights,
          k_positions=positions)
    if name.endswith("empty-rows"):
        assert empty.any() and not empty.all(), "the case must hold rows with and without keys"


def test_gathered_partials_merge_into_full_attention(kernels, device):
    """Context parallelism's use: attention over two disjoint key sets, merged by their LSEs, is the attention
    over all keys (the plain reference, keys at 0 .. Tk - 1), values and the gradient of q."""
    tq, off, pattern = 37, 33, (4, 5, 2)
    g = torch.Generator().manual_seed(7)
    q = torch.randn((1, 2, tq, 16), generator=g).to(device).requires_grad_()
    k, v = (torch.randn((1, 2, off + tq, 16), generator=g).to(device) for _ in range(2))
    weight = torch.randn((1, 2, tq, 16), generator=g).to(device)
    mine = torch.rand(off + tq, generator=g) < 0.5
    parts = []
    for keep in (mine, ~mine):
        index = torch.nonzero(keep).flatten()
        parts.append(kernels.sparse_attention(q, k[:, :, index.to(device)], v[:, :, index.to(device)], *pattern,
                                              q_offset=off, k_positions=index.to(device), return_lse=True))
    (out_a, lse_a), (out_b, lse_b) = parts
    lse = torch.logaddexp(lse_a, lse_b)
    merged = out_a * (lse_a - lse).exp()[..., None] + out_b * (lse_b - lse).exp()[..., None]
    ref = reference_attention(q, k, v, *pattern, q_offset=off)
    compare("out", merged, ref, 1e-5)
    grad, = torch.autograd.grad((merged * weight).sum(), q)
    ref_grad, = torch.autograd.grad((ref * weight).sum(), q)
    compare("dq", grad, ref_grad, 1e-4)


def test_sparse_attention_default_call(kernels, device):
    """The call the model makes: no LSE, default scale, keys read through strides (a transposed view)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn((1, 24, 2, 16), generator=g).to(device).transpose(1, 2).requires_grad_()
    k, v = (torch.randn((1, 24, 2, 16), generator=g).to(device).transpose(1, 2).requires_grad_() for _ in range(2))
    weight = torch.randn((1, 2, 24, 16), generator=g).to(device)
    got = kernels.sparse_attention(q, k, v, 4, 3, 2)
    grads = torch.autograd.grad((got * weight).sum(), (q, k, v))
    ref = reference_attention(q, k, v, 4, 3, 2)
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    compare("out", got, ref, 1e-5)
    for name, a, r in zip(["dq", "dk", "dv"], grads, ref_grads):
        compare(name, a, r, 1e-4)


def test_sparse_attention_empty_queries_or_keys(kernels, nan_poison, device):
    """Grids with no tile: no queries (a chunk of nothing), and a gathered key set with no keys (a rank before
    which nothing is kept). Keys seen by no query get zero gradients; queries that see no key get a zero output,
    an LSE of -inf and a zero gradient."""
    q = torch.zeros((2, 3, 0, 16), device=device, requires_grad=True)
    k, v = (torch.randn((2, 3, 9, 16), device=device, requires_grad=True) for _ in range(2))
    with nan_poison():
        out, lse = kernels.sparse_attention(q, k, v, 4, 2, 1, q_offset=9, return_lse=True)
        out.sum().backward()
    assert out.shape == (2, 3, 0, 16) and lse.shape == (2, 3, 0)
    assert q.grad.shape == q.shape and not k.grad.any() and not v.grad.any()

    q = torch.randn((2, 3, 5, 16), device=device, requires_grad=True)
    k = torch.zeros((2, 3, 0, 16), device=device, requires_grad=True)
    with nan_poison():
        out, lse = kernels.sparse_attention(q, k, k, 4, 2, 1, q_offset=7, return_lse=True,
                                            k_positions=torch.zeros(0, dtype=torch.long, device=device))
        (out.sum() + lse.clamp(min=0).sum()).backward()  # an LSE gradient too: backward's dLSE path
    assert not out.any() and bool((lse == float("-inf")).all())
    assert not q.grad.any()


def test_sparse_attention_rejects_bad_inputs(kernels, device):
    q = torch.randn(1, 1, 8, 16, device=device)
    with pytest.raises(ValueError, match="pattern"):
        kernels.sparse_attention(q, q, q, 0, 0, 0)
    with pytest.raises(ValueError, match="keys"):
        kernels.sparse_attention(q, q, q, 4, 0, 0, q_offset=1)
    with pytest.raises(ValueError, match="dtype"):
        kernels.sparse_attention(q, q.bfloat16(), q, 4, 0, 0)
    for positions, match in [(torch.tensor([0, 1, 2, 3, 5, 4, 6, 7]), "sorted"), (torch.arange(7), "shape"),
                             (torch.arange(8.0), "integers"), (torch.arange(8) - 1, "non-negative")]:
        with pytest.raises(ValueError, match=match):
            kernels.sparse_attention(q, q, q, 4, 0, 0, k_positions=positions.to(device))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("pattern", [(1, 0, 0), (16, 256, 4), (64, 0, 0), (-1, 256, 4)],
                         ids=["D1-W0-P0", "D16-W256-P4", "D64-W0-P0", "D-1-W256-P4"])
def test_sparse_attention_full_size(kernels, masked_attention, pattern, dtype):
    """B1-H16-T4096-K128 (the 1.5B layer's attention) against the reference on the GPU: bf16 as trained (by the
    small cases' rule, against the float64 oracle), fp32 with IEEE products at fp32 tolerances."""
    b, h, t, kd = 1, 16, 4096, 128
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn((b, h, t, kd), generator=g).cuda().to(dtype).requires_grad_() for _ in range(3))
    weights = [torch.randn((b, h, t, kd), generator=g).cuda(), torch.randn((b, h, t), generator=g).cuda()]
    out, lse, grads = run_and_grad(kernels.sparse_attention, q, k, v, pattern, 0, weights)
    ref_out, ref_lse, ref_grads = run_and_grad(reference_attention, q, k, v, pattern, 0, weights)
    compare("lse", lse, ref_lse, 1e-4 if dtype == torch.bfloat16 else 1e-5)
    check(out, grads, ref_out, ref_grads, dtype, masked_attention, q, k, v, pattern, 0, weights)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pattern", [(1, 0, 0), (16, 256, 4), (-1, 256, 4)],
                         ids=["D1-W0-P0", "D16-W256-P4", "D-1-W256-P4"])
def test_sparse_attention_gathered_full_size(kernels, masked_attention, pattern):
    """Context parallelism at the 1.5B layer's shape: the second of two ranks (queries 2048..4095, bf16) against
    the keys it gathers, beside the reference's explicit per-position mask (its LSE), and by the bf16 rule against
    the float64 oracle."""
    b, h, tq, off, kd = 1, 16, 2048, 2048, 128
    positions = context_parallel_keys(off, *pattern, tq)
    g = torch.Generator().manual_seed(1)
    q = torch.randn((b, h, tq, kd), generator=g).cuda().bfloat16().requires_grad_()
    k, v = (torch.randn((b, h, len(positions), kd), generator=g).cuda().bfloat16().requires_grad_() for _ in range(2))
    weights = [torch.randn((b, h, tq, kd), generator=g).cuda(), torch.randn((b, h, tq), generator=g).cuda()]
    out, lse, grads = run_and_grad_gathered(kernels.sparse_attention, q, k, v, pattern, off, positions.cuda(), weights)
    ref_out, ref_lse, ref_grads = run_and_grad_gathered(reference_attention, q, k, v, pattern, off, positions.cuda(),
                                                        weights)
    compare("lse", lse, ref_lse, 1e-4)
    check(out, grads, ref_out, ref_grads, torch.bfloat16, masked_attention, q, k, v, pattern, off, weights,
          k_positions=positions.cuda())
