"""``gated_scan`` (spec §1.2 step 5) against a per-step fp64 loop: values, final state and gradients."""

from __future__ import annotations

import pytest
import torch

from ratplus_mega.hf import gated_scan
from ratplus_mega.kernels.testing import BF16_ATOL, BF16_VALUE_FACTOR, compare_to_baseline

pytestmark = pytest.mark.usefixtures("single_thread")

FP32_VALUES, FP32_GRADS = 1e-5, 1e-4  # docs/decisions.md "Tests", relative to the reference's scale


def make_inputs(shape, gate_shape, with_state: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    # Gates over the whole (0, 1) range, including long memories close to 1.
    gate = torch.sigmoid(3 * torch.randn(gate_shape, generator=g, dtype=torch.float64)).float()
    x = torch.randn(shape, generator=g)
    state = torch.randn(shape[:-2] + shape[-1:], generator=g) if with_state else None
    return gate, x, state


CASES = [
    # (x shape (..., T, C), gate shape)
    ((2, 3, 37, 5), (2, 3, 37, 5)),
    ((1, 1, 1, 4), (1, 1, 1, 4)),
    ((3, 64, 8), (3, 64, 8)),
    ((2, 2, 3, 19, 6), (2, 3, 19, 6)),  # one gate drives a leading pair (keys and values)
]


def case_id(case) -> str:
    shape, gate_shape = case
    bcast = "-gatebcast" if len(gate_shape) < len(shape) else ""
    return f"x{'x'.join(map(str, shape))}-T{shape[-2]}{bcast}"


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "init-state"])
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_values_and_gradients_match_loop(assert_close, loop_scan, case, with_state):
    shape, gate_shape = case
    gate, x, state = make_inputs(shape, gate_shape, with_state, seed=len(shape) * 100 + shape[-2])
    leaves = [t.clone().requires_grad_() for t in (gate, x) + ((state,) if with_state else ())]
    h, final = gated_scan(leaves[0], leaves[1], leaves[2] if with_state else None)
    assert h.dtype == torch.float32 and final.dtype == torch.float32

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_h, ref_final = loop_scan(ref_leaves[0], ref_leaves[1], ref_leaves[2] if with_state else None)
    assert_close("h", h, ref_h, FP32_VALUES)
    assert_close("final_state", final, ref_final, FP32_VALUES)

    g = torch.Generator().manual_seed(7)
    dh, dfinal = torch.randn(h.shape, generator=g), torch.randn(final.shape, generator=g)
    grads = torch.autograd.grad((h * dh).sum() + (final * dfinal).sum(), leaves)
    ref_grads = torch.autograd.grad((ref_h * dh.double()).sum() + (ref_final * dfinal.double()).sum(), ref_leaves)
    for name, got, ref in zip(("d_gate", "d_x", "d_initial_state"), grads, ref_grads):
        assert_close(name, got, ref, FP32_GRADS)


def test_bf16_input_gives_bf16_output_and_fp32_state(assert_close, loop_scan, plain_scan):
    gate, x, state = make_inputs((2, 2, 33, 8), (2, 2, 33, 8), True, seed=3)
    h, final = gated_scan(gate, x.bfloat16(), state)
    assert h.dtype == torch.bfloat16
    assert final.dtype == torch.float32
    ref_h, ref_final = loop_scan(gate, x.bfloat16(), state)
    # The scan itself is fp32 on the rounded inputs: only the output cast loses precision, the state does not.
    # h by the bf16 rule (ratplus_mega.kernels.testing): within a multiple of plain torch's bf16 error.
    base_h, _ = plain_scan(gate, x.bfloat16(), state)
    compare_to_baseline("h", h, base_h, ref_h, factor=BF16_VALUE_FACTOR, atol=BF16_ATOL)
    assert_close("final_state", final, ref_final, FP32_VALUES)


def test_state_continues_across_chunks(assert_close, loop_scan):
    """Scanning [0, T1) then [T1, T) from the first chunk's final state equals one scan of [0, T)."""
    gate, x, _ = make_inputs((2, 45, 4), (2, 45, 4), False, seed=11)
    ref_h, _ = loop_scan(gate, x, None)
    h1, s1 = gated_scan(gate[:, :20], x[:, :20])
    h2, s2 = gated_scan(gate[:, 20:], x[:, 20:], s1)
    assert_close("h", torch.cat([h1, h2], dim=1), ref_h, FP32_VALUES)
    assert_close("final_state", s2, ref_h[:, -1], FP32_VALUES)


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "init-state"])
def test_empty_sequence_passes_the_state_through(with_state):
    """T = 0: no outputs, the final state is the initial one (zeros without one) and takes its gradient."""
    gate, x, state = make_inputs((2, 2, 3, 0, 6), (2, 3, 0, 6), with_state, seed=5)
    state = state.requires_grad_() if with_state else None
    h, final = gated_scan(gate, x, state)
    assert h.shape == (2, 2, 3, 0, 6) and final.shape == (2, 2, 3, 6)
    assert torch.equal(final, state if with_state else torch.zeros(2, 2, 3, 6))
    if with_state:
        weight = torch.randn(final.shape)
        (grad,) = torch.autograd.grad((final * weight).sum(), state)
        assert torch.equal(grad, weight)
