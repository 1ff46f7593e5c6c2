"""The error metric of the project's numerical tests and benchmarks (one home; imports nothing of the project).

Every comparison is of named tensors in float64: the max absolute error relative to the reference's scale,
``max|got - ref| / max(max|ref|, 1e-6)``. ``compare`` holds it to a tolerance the caller must give;
``compare_to_baseline`` derives that tolerance from the error of torch's own low-precision computation of the
same function on the same inputs (the flash-attention convention for bf16 kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The bf16 rule of the kernel and reference tests (flash-attention's convention): a bf16 result may be off the
# float64 oracle by at most a small multiple of what plain torch loses computing the same function in bf16 on
# the same inputs, plus BF16_ATOL (relative to the oracle's scale) for a baseline that is exact by chance.
# Measured under the Triton interpreter (the bf16 cases of tests/kernels, 3 seeds each): the kernels' values
# are at most 1.4x and their gradients at most 1.7x torch's own bf16 error (the reference, computed in fp32 and
# rounded once: its values 0.3-0.6x). 2 for values is flash-attention's factor; 2 would leave gradients a 15% margin,
# too little for shapes and seeds not measured (the GPU runs at T = 4096), hence 3.
BF16_VALUE_FACTOR = 2.0
BF16_GRAD_FACTOR = 3.0
BF16_ATOL = 1e-5


@dataclass(frozen=True)
class Comparison:
    """``max_abs``: max |got - ref|; ``scale``: max |ref| (floored at 1e-6); ``rel = max_abs / scale``."""

    name: str
    max_abs: float
    scale: float
    rel: float

    def __str__(self) -> str:
        return f"{self.name}: max abs err {self.max_abs:.3e}, scale {self.scale:.3e}, relative {self.rel:.3e}"


def measure(name: str, got: torch.Tensor, ref: torch.Tensor) -> Comparison:
    """The error of ``got`` against ``ref``, checking nothing but the shapes (a measurement, not a test: use
    ``compare`` to test). A non-finite ``got`` gives a non-finite ``rel``."""
    if got.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if got.numel() == 0:
        return Comparison(name, 0.0, 1e-6, 0.0)
    max_abs = (got - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-6)
    return Comparison(name, max_abs, scale, max_abs / scale)


def compare(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float, *, why: str = "") -> Comparison:
    """Raise AssertionError (naming the tensor) unless the shapes agree, ``got`` is finite and
    ``rel <= tol``; return the measurement. ``why`` (how ``tol`` was derived) goes into the message."""
    if not isinstance(tol, (int, float)) or isinstance(tol, bool):
        raise TypeError(f"{name}: compare needs a numeric tolerance, got {tol!r}")
    result = measure(name, got, ref)
    bad = (~torch.isfinite(got.detach())).sum().item() if got.numel() else 0
    if bad:
        raise AssertionError(f"{name}: {bad} non-finite values")
    if not result.rel <= tol:
        raise AssertionError(f"{result} > {tol:.3e}" + (f" ({why})" if why else ""))
    return result


def compare_to_baseline(name: str, got: torch.Tensor, baseline: torch.Tensor, oracle: torch.Tensor, *,
                        factor: float, atol: float) -> Comparison:
    """Hold ``got`` to ``factor`` times the error of ``baseline`` plus ``atol``, both against ``oracle``:
    ``rel(got) <= factor * rel(baseline) + atol``.

    ``oracle`` is the function computed exactly (float64) and ``baseline`` torch's own computation of it in the
    low precision, both from the same (already rounded) inputs as ``got``; ``atol`` is relative to the oracle's
    scale like every tolerance here and only keeps a baseline that happens to be exact from demanding exactness.
    """
    base = measure(f"{name} (torch baseline)", baseline, oracle)
    if not torch.isfinite(torch.tensor(base.rel)):
        raise AssertionError(f"{base}: the torch baseline is not finite")
    return compare(name, got, oracle, factor * base.rel + atol,
                   why=f"{factor:g} x torch's own {base.rel:.3e} + {atol:.0e}")
