"""Index plan for keys given as a gathered set at global positions (context parallelism, chunked prefill).

With the keys sorted by position, the plain mode's three key sets become index ranges and an index list:

* ``far_index``: the keys some query sees beyond its window (sinks and grid keys at positions < q_last - W),
  in position order, so the far keys of a query block are the first ``far_end[q0]`` entries;
* the window of a query block is the contiguous index range ``window_start[q0] .. key_end[q1]``;
* ``far_slot`` maps a key index to its far-list entry (or -1), for the backward's far scratch.

``far_end[q]`` counts the far entries below ``window_start[q]``, so the two sets are disjoint by index. The
per-element rule is still applied in both, as in the plain mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GatheredKeys:
    """Device tensors (int32) describing keys at ``positions`` for queries at ``q_offset .. q_offset + Tq - 1``."""

    positions: torch.Tensor  # (Tk,) sorted ascending
    key_end: torch.Tensor  # (Tq,) number of keys at positions <= q
    window_start: torch.Tensor  # (Tq,) first key index at position >= q - W
    far_end: torch.Tensor  # (Tq,) number of far entries with key index < window_start[q]
    far_index: torch.Tensor  # (n_far,) key indices of the far keys, ascending (at least one element)
    far_slot: torch.Tensor  # (Tk,) far entry of each key, -1 for none
    n_far: int


def plan_gathered_keys(k_positions: torch.Tensor, q_offset: int, tq: int, tk: int, dilation: int, window: int,
                       sinks: int, device: torch.device) -> GatheredKeys:
    """Checks ``k_positions`` ((Tk,) integers, ascending, >= 0) and builds the index plan (two host syncs: the
    check and the far-key count, which sizes the backward's grid)."""
    if k_positions.dim() != 1 or k_positions.shape[0] != tk:
        raise ValueError(f"sparse_attention: k_positions must have shape ({tk},) (one per key), got "
                         f"{tuple(k_positions.shape)}")
    if k_positions.is_floating_point() or k_positions.is_complex() or k_positions.dtype == torch.bool:
        raise ValueError(f"sparse_attention: k_positions must hold integers, got {k_positions.dtype}")
    positions = k_positions.to(device=device, dtype=torch.int64)
    unsorted = (positions[1:] < positions[:-1]).any()
    if tk > 0 and bool(unsorted | (positions[0] < 0) | (positions[-1] >= 2**31 - 1 - window)):
        raise ValueError("sparse_attention: k_positions must be non-negative and sorted ascending "
                         "(and below 2**31 - W)")
    q_positions = torch.arange(q_offset, q_offset + tq, device=device)
    key_end = torch.searchsorted(positions, q_positions, right=True)
    window_start = torch.searchsorted(positions, q_positions - window)
    far_kind = positions < sinks
    if dilation > 0:
        far_kind |= (positions + 1) % dilation == 0
    far_index = torch.nonzero(far_kind & (positions < q_offset + tq - 1 - window)).flatten()
    far_end = torch.searchsorted(far_index, window_start)
    far_slot = torch.full((tk,), -1, dtype=torch.int32, device=device)
    far_slot[far_index] = torch.arange(far_index.numel(), dtype=torch.int32, device=device)
    n_far = far_index.numel()
    if n_far == 0:  # kernels take a pointer; nothing reads it
        far_index = torch.zeros(1, dtype=torch.int64, device=device)
    return GatheredKeys(*(t.to(torch.int32) for t in (positions, key_end, window_start, far_end, far_index)),
                        far_slot, n_far)
