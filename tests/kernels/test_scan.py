"""Fused gated scan (kernels/scan) against the reference ``gated_scan``: values, final state and every gradient.

Under the interpreter the checkpoint chunk is 16 steps, so T = 37 and 70 cross several chunk boundaries with a
partial last chunk; C = 20 leaves a partial channel block.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from ratplus_mega.hf.modeling_ratplus import gated_scan as reference_scan
from ratplus_mega.kernels.testing import (BF16_ATOL, BF16_GRAD_FACTOR, BF16_VALUE_FACTOR, compare,
                                          compare_to_baseline)

pytestmark = pytest.mark.usefixtures("single_thread")

# fp32: (values, gradients) against the reference, relative to its scale (docs/decisions.md, "Tests"). bf16: the
# rule of ratplus_mega.kernels.testing, against the float64 oracle (see check_bf16).
TOL = {torch.float32: (1e-5, 1e-4)}
DTYPE_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def make_gate(shape, generator) -> torch.Tensor:
    # Gates over the whole of (0, 1), long memories close to 1 included.
    return torch.sigmoid(3 * torch.randn(shape, generator=generator, dtype=torch.float64)).float()


def run_and_grad(fn, inputs, weights):
    """Call ``fn(*inputs)``, back-propagate sum(output · weight) over every output, return outputs and grads."""
    outs = fn(*inputs)
    loss = sum((o.to(torch.promote_types(o.dtype, torch.float32)) * w).sum()
               for o, w in zip(outs, weights) if w is not None)
    leaves = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outs], list(grads)


def check(names, got, ref, n_out, dtype, torch_fn, inputs, weights):
    """Outputs (the first ``n_out`` of ``got``) and gradients of a kernel call. fp32: against the reference's
    ``ref`` at TOL. bf16: see ``check_bf16``."""
    for name, g, r in zip(names[n_out:], got[n_out:], ref[n_out:]):
        assert g.dtype == r.dtype, name  # each gradient in its input's dtype
    if dtype == torch.bfloat16:
        return check_bf16(names, got, n_out, torch_fn, inputs, weights)
    tol_v, tol_g = TOL[dtype]
    for i, (name, g, r) in enumerate(zip(names, got, ref)):
        compare(name, g, r, tol_v if i < n_out else tol_g)


def check_bf16(names, got, n_out, torch_fn, inputs, weights):
    """The bf16 rule: ``torch_fn`` (the recurrence in plain torch, ``plain_scan``) run on float64 copies of the
    inputs is the oracle, and on the inputs as given torch's own bf16 baseline; every bf16 tensor and every
    gradient must be within BF16_VALUE_FACTOR (outputs) or BF16_GRAD_FACTOR (gradients) times the baseline's
    error of the oracle. The fp32 outputs (the final state: fp32 arithmetic on the rounded inputs) are held to
    the fp32 value tolerance against the oracle."""
    base_outs, base_grads = run_and_grad(torch_fn, inputs, weights)
    exact = [None if x is None else x.detach().double().requires_grad_() for x in inputs]
    oracle_outs, oracle_grads = run_and_grad(torch_fn, exact, weights)
    for i, (name, g, b, o) in enumerate(zip(names, got, base_outs + base_grads, oracle_outs + oracle_grads)):
        if i < n_out and g.dtype == torch.float32:
            compare(name, g, o, TOL[torch.float32][0])
        else:
            compare_to_baseline(name, g, b, o, factor=BF16_VALUE_FACTOR if i < n_out else BF16_GRAD_FACTOR,
                                atol=BF16_ATOL)


def plain_kv(plain_scan, gate_logits=False):
    """``gated_scan_kv``'s function in plain torch: the gate (sigmoid of ``g`` in fp32 with ``gate_logits``, as
    the layer's torch path takes it; float64 for the oracle) drives the scan of [k | v]."""
    def fn(g, k, v, initial_state):
        gate = torch.sigmoid(g.double() if g.dtype == torch.float64 else g.float()) if gate_logits else g
        h, state = plain_scan(gate, torch.stack([k, v]), initial_state)
        return h[0], h[1], state
    return fn


SCAN_CASES = [
    # B, H, T, C, dtype, with initial state
    (1, 2, 37, 20, torch.float32, True),
    (2, 1, 70, 16, torch.float32, False),
    (1, 1, 1, 5, torch.float32, True),
    (1, 2, 37, 20, torch.bfloat16, True),
]


def scan_id(case) -> str:
    b, h, t, c, dtype, h0 = case
    return f"B{b}-H{h}-T{t}-C{c}-{DTYPE_NAME[dtype]}" + ("-h0" if h0 else "")


@pytest.mark.parametrize("case", SCAN_CASES, ids=[scan_id(c) for c in SCAN_CASES])
def test_gated_scan_matches_reference(kernels, plain_scan, nan_poison, device, case):
    b, h, t, c, dtype, with_h0 = case
    g = torch.Generator().manual_seed(t * 100 + c)
    gate = make_gate((b, h, t, c), g).to(device, dtype).requires_grad_()  # bf16 case: bf16 gate and input
    x = torch.randn((b, h, t, c), generator=g).to(device, dtype).requires_grad_()
    h0 = torch.randn((b, h, c), generator=g).to(device).requires_grad_() if with_h0 else None
    weights = [torch.randn((b, h, t, c), generator=g).to(device), torch.randn((b, h, c), generator=g).to(device)]
    with nan_poison():
        (out, final), grads = run_and_grad(kernels.gated_scan, (gate, x, h0), weights)
    (ref_out, ref_final), ref_grads = run_and_grad(reference_scan, (gate, x, h0), weights)
    assert out.dtype == dtype and final.dtype == torch.float32 and final.shape == (b, h, c)
    check(["h", "final_state", "d_gate", "d_x", "d_initial_state"], [out, final, *grads],
          [ref_out, ref_final, *ref_grads], 2, dtype, plain_scan, (gate, x, h0), weights)


def reference_kv(gate, k, v, initial_state):
    out, state = reference_scan(gate, torch.stack([k, v]), initial_state)
    return out[0], out[1], state


KV_CASES = [
    # B, H, T, K, k/v dtype (the gate is fp32, as the layer makes it), with initial state, read k and v as
    # strided views of one fused projection
    (1, 2, 37, 16, torch.float32, True, True),
    (2, 1, 70, 16, torch.bfloat16, False, False),
]


def kv_id(case) -> str:
    b, h, t, k, dtype, h0, strided = case
    return f"B{b}-H{h}-T{t}-K{k}-{DTYPE_NAME[dtype]}" + ("-h0" if h0 else "") + ("-strided" if strided else "")


@pytest.mark.parametrize("case", KV_CASES, ids=[kv_id(c) for c in KV_CASES])
def test_gated_scan_kv_matches_reference(kernels, plain_scan, nan_poison, device, case):
    b, h, t, kd, dtype, with_h0, strided = case
    g = torch.Generator().manual_seed(t * 10 + kd)
    gate = make_gate((b, h, t, kd), g).to(device).requires_grad_()
    if strided:  # (B, T, [k|v], H, K) as a projection writes it; the kernel reads k and v through strides
        kv = torch.randn((b, t, 2, h, kd), generator=g).to(device, dtype).requires_grad_()
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        assert not k.is_contiguous()
    else:
        k = torch.randn((b, h, t, kd), generator=g).to(device, dtype).requires_grad_()
        v = torch.randn((b, h, t, kd), generator=g).to(device, dtype).requires_grad_()
    h0 = torch.randn((2, b, h, kd), generator=g).to(device).requires_grad_() if with_h0 else None
    weights = [torch.randn((b, h, t, kd), generator=g).to(device) for _ in range(2)]
    weights.append(torch.randn((2, b, h, kd), generator=g).to(device))
    with nan_poison():
        outs, grads = run_and_grad(kernels.gated_scan_kv, (gate, k, v, h0), weights)
    ref_outs, ref_grads = run_and_grad(reference_kv, (gate, k, v, h0), weights)
    assert outs[2].dtype == torch.float32 and outs[2].shape == (2, b, h, kd)
    check(["k_tilde", "v_tilde", "final_state", "d_gate", "d_k", "d_v", "d_initial_state"], outs + grads,
          ref_outs + ref_grads, 3, dtype, plain_kv(plain_scan), (gate, k, v, h0), weights)


def loop_kv_from_logits(g, k, v, initial_state):
    """Oracle of the fused-gate layer scan: f = sigmoid(g), one step at a time, in float64."""
    f = torch.sigmoid(g.double())
    hk, hv = (initial_state.double().unbind(0) if initial_state is not None
              else (torch.zeros_like(f[:, :, 0]), torch.zeros_like(f[:, :, 0])))
    ks, vs = [], []
    for t in range(f.shape[2]):
        hk = f[:, :, t] * hk + (1 - f[:, :, t]) * k[:, :, t].double()
        hv = f[:, :, t] * hv + (1 - f[:, :, t]) * v[:, :, t].double()
        ks.append(hk)
        vs.append(hv)
    return torch.stack(ks, 2).to(k.dtype), torch.stack(vs, 2).to(v.dtype), torch.stack([hk, hv]).float()


LOGIT_CASES = [(1, 2, 37, 20, torch.float32, True), (2, 1, 23, 16, torch.bfloat16, False)]


@pytest.mark.parametrize("case", LOGIT_CASES, ids=[scan_id(c) for c in LOGIT_CASES])
def test_gated_scan_kv_from_logits_matches_step_loop(kernels, plain_scan, nan_poison, device, case):
    """The layer's call: g, k and v are strided views of one fused projection; sigmoid inside the kernel,
    gradients with respect to g. Pre-activations of ±30 (f within 1e-13 of 0 or 1) must stay finite."""
    b, h, t, kd, dtype, with_h0 = case
    gen = torch.Generator().manual_seed(t * 7 + kd)
    logits = 3 * torch.randn((t, b, h, kd), generator=gen)
    logits.view(-1)[::11] = 30.0
    logits.view(-1)[5::11] = -30.0
    z = torch.randn((t, b, 3, h, kd), generator=gen)
    z[:, :, 2] = logits
    z = z.to(device, dtype).requires_grad_()
    k, v, g = (z[:, :, i].permute(1, 2, 0, 3) for i in range(3))  # [T, B, H, K] -> (B, H, T, K) views
    assert not g.is_contiguous()
    h0 = torch.randn((2, b, h, kd), generator=gen).to(device).requires_grad_() if with_h0 else None
    weights = [torch.randn((b, h, t, kd), generator=gen).to(device) for _ in range(2)]
    weights.append(torch.randn((2, b, h, kd), generator=gen).to(device))
    fused = lambda g_, k_, v_, h0_: kernels.gated_scan_kv(g_, k_, v_, h0_, gate_logits=True)  # noqa: E731
    with nan_poison():
        outs, grads = run_and_grad(fused, (g, k, v, h0), weights)
    ref_outs, ref_grads = run_and_grad(loop_kv_from_logits, (g, k, v, h0), weights)
    check(["k_tilde", "v_tilde", "final_state", "d_g", "d_k", "d_v", "d_initial_state"], outs + grads,
          ref_outs + ref_grads, 3, dtype, plain_kv(plain_scan, gate_logits=True), (g, k, v, h0), weights)


def test_gated_scan_kv_with_unused_outputs(kernels, device):
    """Only k̃ reaches the loss: the missing gradients of ṽ and of the final state count as zeros."""
    g = torch.Generator().manual_seed(3)
    gate = make_gate((1, 1, 20, 16), g).to(device).requires_grad_()
    k, v = (torch.randn((1, 1, 20, 16), generator=g).to(device).requires_grad_() for _ in range(2))
    weights = [torch.randn((1, 1, 20, 16), generator=g).to(device), None, None]
    _, grads = run_and_grad(kernels.gated_scan_kv, (gate, k, v, None), weights)
    _, ref_grads = run_and_grad(reference_kv, (gate, k, v, None), weights)
    for name, got, ref in zip(["d_gate", "d_k", "d_v"], grads, ref_grads):
        compare(name, got, ref, 1e-4)
    assert not grads[2].any()


def test_gated_scan_rejects_bad_inputs(kernels, device):
    x = torch.randn(1, 1, 8, 4, device=device)
    with pytest.raises(ValueError, match="gate"):
        kernels.gated_scan(torch.rand(1, 1, 8, 5, device=device), x)
    with pytest.raises(ValueError, match="dtype"):
        kernels.gated_scan(torch.rand(1, 1, 8, 4, device=device), x.double())


@pytest.mark.parametrize("with_h0", [False, True], ids=["zero-state", "h0"])
def test_empty_sequence_passes_the_state_through(kernels, device, with_h0):
    """T = 0 (an empty prefill chunk): no outputs, the final state is the initial one and its gradient flows
    back unchanged; the gate and inputs get empty gradients."""
    g = torch.Generator().manual_seed(5)
    gate = torch.rand((2, 3, 0, 20), generator=g).to(device).requires_grad_()
    k, v = (torch.randn((2, 3, 0, 20), generator=g).to(device).requires_grad_() for _ in range(2))
    h0 = torch.randn((2, 2, 3, 20), generator=g).to(device).requires_grad_() if with_h0 else None
    weight = torch.randn((2, 2, 3, 20), generator=g).to(device)
    k_out, v_out, final = kernels.gated_scan_kv(gate, k, v, h0)
    assert k_out.shape == v_out.shape == (2, 3, 0, 20)
    assert torch.equal(final, h0 if with_h0 else torch.zeros_like(weight))
    h, final_one = kernels.gated_scan(gate, k, h0[0] if with_h0 else None)
    assert h.shape == (2, 3, 0, 20) and torch.equal(final_one, final[0])
    if with_h0:
        grad_gate, grad_k, grad_h0 = torch.autograd.grad((final * weight).sum(), (gate, k, h0))
        assert grad_gate.shape == grad_k.shape == (2, 3, 0, 20)
        assert torch.equal(grad_h0, weight)


@pytest.mark.parametrize("segments", [1, 2, 5], ids=["one-walk", "2-segments", "5-segments"])
def test_time_segments_match_the_references(kernels, plain_scan, nan_poison, device, monkeypatch, segments):
    """Time split into segments scanned in parallel (forced here; the plan splits only shapes with few programs,
    on a GPU): segment summaries, the carry pass and the rescan reproduce the values and gradients, forward and
    backward. 4 chunks + 6 steps is 5 chunks (segments of 3 + 2, or 1 each), 2 chunks + 5 steps is 3 (T = 70 and
    37 under the interpreter). One walk is forced too, since on a GPU the small cases would otherwise split."""
    module = importlib.import_module("ratplus_mega.kernels.scan.segments")
    chunk = importlib.import_module("ratplus_mega.kernels.scan.fwd").CHUNK
    monkeypatch.setattr(module, "plan_segments", lambda *args: segments)
    carry_passes = []
    carries = module.segment_carries
    monkeypatch.setattr(module, "segment_carries", lambda *a, **kw: carry_passes.append(kw) or carries(*a, **kw))
    long, short = 4 * chunk + 6, 2 * chunk + 5
    test_gated_scan_matches_reference(kernels, plain_scan, nan_poison, device, (1, 2, long, 20, torch.float32, True))
    test_gated_scan_matches_reference(kernels, plain_scan, nan_poison, device,
                                      (2, 1, short, 16, torch.bfloat16, False))
    test_gated_scan_kv_from_logits_matches_step_loop(kernels, plain_scan, nan_poison, device,
                                                     (1, 2, long, 16, torch.float32, True))
    assert [kw["reverse"] for kw in carry_passes] == ([False, True] * 3 if segments > 1 else [])


def test_segment_plan(kernels, monkeypatch):
    """One walk while batch·heads × 32-channel blocks give an H100's 132 SMs a program each; else enough
    segments for about 4 programs per SM, never empty ones; never on CPU."""
    module = importlib.import_module("ratplus_mega.kernels.scan.segments")
    monkeypatch.setattr(module, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    assert module.plan_segments(64, 128, 64, cuda) == 1  # B4-H16-T4096: 256 programs
    assert module.plan_segments(16, 128, 256, cuda) == 9  # B1-H16-T16384: 64 programs -> 528 / 64
    assert module.plan_segments(1, 16, 3, cuda) == 3  # never more segments than chunks
    assert module.plan_segments(1, 16, 3, torch.device("cpu")) == 1
    assert module.segment_layout(5, 2) == (2, 3)
    assert module.segment_layout(256, 9) == (9, 29)
    assert module.segment_layout(3, 7) == (3, 1)
    assert module.segment_layout(7, 4) == (4, 2)  # 2 + 2 + 2 + 1
    assert module.segment_layout(0, module.plan_segments(16, 128, 0, cuda)) == (1, 0)  # T = 0: one empty walk


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("one_walk", [False, True], ids=["planned", "one-walk"])
@pytest.mark.parametrize("with_h0", [False, True], ids=["zero-state", "h0"])
@pytest.mark.parametrize("gate_logits", [False, True], ids=["gate", "logits"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gated_scan_kv_full_size(kernels, plain_scan, monkeypatch, with_h0, gate_logits, dtype, one_walk):
    """The 1.5B layer's shape: B2-H16-T4096-K128, keys and values in bf16 (as trained) or fp32 (at fp32
    tolerances; bf16 by the same rule as the small cases, against the float64 oracle), an fp32 gate or the
    pre-activation in the keys' dtype; time split as planned for this GPU (128 programs: split on a 132-SM H100)
    or forced into one walk."""
    if one_walk:
        monkeypatch.setattr(importlib.import_module("ratplus_mega.kernels.scan.segments"), "plan_segments",
                            lambda *args: 1)
    b, h, t, kd = 2, 16, 4096, 128
    g = torch.Generator().manual_seed(0)
    gate = make_gate((b, h, t, kd), g).cuda()
    if gate_logits:
        gate = torch.logit(gate, eps=1e-6).to(dtype)
    gate.requires_grad_()
    k, v = (torch.randn((b, h, t, kd), generator=g).cuda().to(dtype).requires_grad_() for _ in range(2))
    h0 = torch.randn((2, b, h, kd), generator=g).cuda().requires_grad_() if with_h0 else None
    weights = [torch.randn((b, h, t, kd), generator=g).cuda() for _ in range(2)]
    weights.append(torch.randn((2, b, h, kd), generator=g).cuda())
    outs, grads = run_and_grad(lambda *a: kernels.gated_scan_kv(*a, gate_logits=gate_logits), (gate, k, v, h0),
                               weights)
    reference = (lambda g_, *a: reference_kv(torch.sigmoid(g_.float()), *a)) if gate_logits else reference_kv
    ref_outs, ref_grads = run_and_grad(reference, (gate, k, v, h0), weights)
    check(["k_tilde", "v_tilde", "final_state", "d_gate", "d_k", "d_v", "d_initial_state"], outs + grads,
          ref_outs + ref_grads, 3, dtype, plain_kv(plain_scan, gate_logits), (gate, k, v, h0), weights)
