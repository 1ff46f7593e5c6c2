"""Error metric shared by the kernel tests and benchmarks: named tensors, error relative to the reference's scale."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Comparison:
    """``max_abs``: max |got - ref|; ``scale``: max |ref| (floored at 1e-6); ``rel = max_abs / scale``."""

    name: str
    max_abs: float
    scale: float
    rel: float

    def __str__(self) -> str:
        return f"{self.name}: max abs err {self.max_abs:.3e}, scale {self.scale:.3e}, relative {self.rel:.3e}"


def compare(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float | None = None) -> Comparison:
    """Compare ``got`` to ``ref`` in float64: max absolute error and that error relative to the reference's
    scale (max |ref|). With ``tol``, raise AssertionError (naming the tensor) unless ``rel <= tol``, the
    shapes agree and ``got`` is finite.
    """
    if got.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if got.numel() == 0:
        return Comparison(name, 0.0, 1e-6, 0.0)
    if tol is not None and not torch.isfinite(got).all():
        bad = (~torch.isfinite(got)).sum().item()
        raise AssertionError(f"{name}: {bad} non-finite values")
    max_abs = (got - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-6)
    result = Comparison(name, max_abs, scale, max_abs / scale)
    if tol is not None and not result.rel <= tol:
        raise AssertionError(f"{result} > {tol:.1e}")
    return result
