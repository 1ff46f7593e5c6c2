"""The one place the training model picks its compute kernels.

The reference model's dispatching functions, shared so that there is one rule: fused Triton kernels
(``ratplus_mega.kernels``, imported on first use with a CUDA tensor) when they provide the op, otherwise the
reference's pure-torch functions, so the CPU path runs exactly the code the parity tests hold as truth.
``RATPLUS_DISABLE_KERNELS=1`` selects the torch functions on CUDA too.
"""

from __future__ import annotations

from ..hf.modeling_ratplus import DENSE, apply_rotary, attention, recurrence

__all__ = ["DENSE", "apply_rotary", "attention", "recurrence"]
