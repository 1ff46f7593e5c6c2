"""How many keys and values one layer's compressed decode cache holds: pure arithmetic, no torch.

The one home of this fact. The reference model sizes its cache with it, and the training stack's accounting
(``ratplus info``) reads it from here without importing torch; the file ships in exported checkpoints beside
the model code and imports nothing.
"""

from __future__ import annotations

__all__ = ["cache_regions", "cache_slots", "dense_in_effect"]


def cache_regions(pattern: tuple[int, int, int], max_len: int) -> tuple[int, int, int]:
    """(sinks, window ring, grid store) slots of one layer's cache for sequences of up to ``max_len`` tokens.

    A dense layer (D = 1) keeps every position (in its grid store). Otherwise sinks hold positions p < P, the
    ring the last W positions and the grid store the positions p >= P with (p + 1) % D == 0 that left the ring
    (none for D = -1). Each part is capped at what ``max_len`` tokens can fill: a window or sink count beyond
    the sequence holds no more than the sequence, so no layer ever holds more than dense's ``max_len`` slots.
    The current token is attended to without being stored first: one slot fewer than the spec's count.
    """
    dilation, window, sinks = pattern
    if dilation == 1:
        return 0, 0, max_len
    sinks = min(sinks, max_len)
    window = min(window, max_len - sinks)
    # Grid positions lie in [P, max_len - 1 - W], one in every D.
    grid = min(max_len // dilation, max_len - sinks - window) if dilation > 1 else 0
    return sinks, window, grid


def cache_slots(pattern: tuple[int, int, int], max_len: int) -> int:
    """Key/value slots of one layer's cache for sequences of up to ``max_len`` tokens (at most ``max_len``)."""
    return sum(cache_regions(pattern, max_len))


def dense_in_effect(pattern: tuple[int, int, int], seq_len: int) -> bool:
    """Whether ``pattern`` lets every query of a ``seq_len``-token sequence see every earlier key, as dense
    attention does: D = 1, or the window and sinks together reach back over the whole sequence (W + P >=
    seq_len - 1), or the only keys they leave out of reach are grid keys."""
    dilation, window, sinks = pattern
    if dilation == 1 or window + sinks >= seq_len - 1:
        return True
    # The last query (the one that reaches back furthest) misses keys P .. seq_len - 2 - W unless each is a
    # grid key, which needs D = 1 or a single such key with (k + 1) % D == 0.
    first, last = sinks, seq_len - 2 - window
    return dilation > 1 and first == last and (first + 1) % dilation == 0
