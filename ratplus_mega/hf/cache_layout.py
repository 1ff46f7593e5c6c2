"""How many keys and values one layer's compressed decode cache holds: pure arithmetic, no torch.

The one home of this fact. The reference model sizes its cache with it, and the training stack's accounting
(``ratplus info``) reads it from here without importing torch; the file ships in exported checkpoints beside
the model code and imports nothing.

Patterns (docs/spec.md §1.3, §4.4, §4.5). A *head pattern* is a tuple ``(D, W, P)``, or ``(D, W, P, K, S,
score)`` for top-k block attention over the (D, W, P) keys plus K blocks of S keys. A *layer pattern* is one
head pattern (every head the same) or a tuple of head patterns, one per head.
"""

from __future__ import annotations

__all__ = ["cache_regions", "cache_slots", "dense_in_effect", "head_groups", "head_patterns", "is_per_head",
           "layer_cache_slots", "summary_slots", "topk_of"]


def is_per_head(pattern: tuple) -> bool:
    """Whether a layer pattern gives each head its own head pattern."""
    return len(pattern) > 0 and isinstance(pattern[0], tuple)


def head_patterns(pattern: tuple, num_heads: int) -> tuple:
    """The head pattern of each of ``num_heads`` heads."""
    if not is_per_head(pattern):
        return (tuple(pattern),) * num_heads
    if len(pattern) != num_heads:
        raise ValueError(f"a per-head pattern needs {num_heads} entries, got {len(pattern)}")
    return tuple(tuple(p) for p in pattern)


def head_groups(pattern: tuple, num_heads: int) -> list[tuple[tuple, list[int]]]:
    """``[(head pattern, [heads])]``: heads sharing a pattern, in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for h, p in enumerate(head_patterns(pattern, num_heads)):
        groups.setdefault(p, []).append(h)
    return list(groups.items())


def topk_of(head: tuple) -> tuple[int, int, str] | None:
    """``(K, S, score)`` of a top-k head pattern, or None."""
    return tuple(head[3:6]) if len(head) > 3 and head[3] else None


def cache_regions(pattern: tuple, max_len: int) -> tuple[int, int, int]:
    """(sinks, window ring, grid store) slots of one head pattern's cache for sequences of up to ``max_len``
    tokens (per head: a uniform layer's heads all hold this).

    A dense layer (D = 1) keeps every position (in its grid store), and so does a top-k head (any block may be
    chosen; its block summaries are counted by ``summary_slots``). Otherwise sinks hold positions p < P, the
    ring the last W positions and the grid store the positions p >= P with (p + 1) % D == 0 that left the ring
    (none for D = -1). Each part is capped at what ``max_len`` tokens can fill: a window or sink count beyond
    the sequence holds no more than the sequence, so no layer ever holds more than dense's ``max_len`` slots.
    The current token is attended to without being stored first: one slot fewer than the spec's count.
    """
    dilation, window, sinks = pattern[:3]
    if dilation == 1 or topk_of(pattern):
        return 0, 0, max_len
    sinks = min(sinks, max_len)
    window = min(window, max_len - sinks)
    # Grid positions lie in [P, max_len - 1 - W], one in every D.
    grid = min(max_len // dilation, max_len - sinks - window) if dilation > 1 else 0
    return sinks, window, grid


def cache_slots(pattern: tuple, max_len: int) -> int:
    """Key/value slots of one head pattern's cache for sequences of up to ``max_len`` tokens (at most
    ``max_len``)."""
    return sum(cache_regions(pattern, max_len))


def summary_slots(pattern: tuple, max_len: int) -> int:
    """Block summaries (one key vector each, no value) of a top-k head pattern: one per complete block."""
    topk = topk_of(pattern)
    return max_len // topk[1] if topk and pattern[0] != 1 else 0


def layer_cache_slots(pattern: tuple, num_heads: int, max_len: int) -> tuple[int, int]:
    """(key/value slots, key-only summary slots) of a layer's cache summed over its heads: multiply by the
    head dim and the bytes of an element (twice for key and value slots) for the layer's bytes."""
    heads = head_patterns(pattern, num_heads)
    return sum(cache_slots(p, max_len) for p in heads), sum(summary_slots(p, max_len) for p in heads)


def dense_in_effect(pattern: tuple, seq_len: int) -> bool:
    """Whether ``pattern`` (a head or layer pattern; for a layer, every head) lets every query of a
    ``seq_len``-token sequence see every earlier key, as dense attention does: D = 1, or the window and sinks
    together reach back over the whole sequence (W + P >= seq_len - 1), or the only keys they leave out of
    reach are grid keys, or top-k selects every block."""
    if is_per_head(pattern):
        return all(dense_in_effect(p, seq_len) for p in pattern)
    dilation, window, sinks = pattern[:3]
    topk = topk_of(pattern)
    if topk and topk[0] * topk[1] >= seq_len:
        return True
    if dilation == 1 or window + sinks >= seq_len - 1:
        return True
    # The last query (the one that reaches back furthest) misses keys P .. seq_len - 2 - W unless each is a
    # grid key, which needs D = 1 or a single such key with (k + 1) % D == 0.
    first, last = sinks, seq_len - 2 - window
    return dilation > 1 and first == last and (first + 1) % dilation == 0
