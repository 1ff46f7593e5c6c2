"""Parameter, FLOP and decode-cache arithmetic of a model config (docs/spec.md §4.3, §6.2).

Pure arithmetic: no torch. ``docs/flops.md`` explains the FLOP convention used for MFU.
"""

from __future__ import annotations

from .config.schema import ModelConfig
from .hf.cache_layout import (  # noqa: F401  the reference model's cache and patterns (torch-free)
    cache_slots, dense_in_effect, head_patterns, layer_cache_slots, topk_of,
)

Pattern = tuple  # a layer pattern: (D, W, P), (D, W, P, K, S, score), or one of those per head
DENSE: Pattern = (1, 0, 0)


def parameter_count(m: ModelConfig) -> int:
    """Trainable parameters with the tied embedding counted once (spec §6.2)."""
    d = m.hidden_size
    in_proj = m.fused_slices * d * d
    block = in_proj + d * d + 2 * d * m.ffn_hidden_size + 2 * d  # mixer, out_proj, FFN, two norm gains
    return m.num_layers * block + m.vocab_size * d + d


def attended_keys(seq_len: int, pattern: Pattern) -> int:
    """Number of (query, key) score entries of a causal window of ``seq_len`` under a head pattern (spec §1.3).

    Top-k block attention (§4.5) is counted at its most: the (D, W, P) keys plus every key of the K blocks (the
    first, the own and K - 2 others; fewer where fewer precede), capped at the keys before the query, plus one
    block score per earlier complete block counted as half a key (a dot product, no value product)."""
    topk = topk_of(pattern)
    if topk and pattern[0] != 1:
        blocks, size, _ = topk
        total = 0
        for q in range(seq_len):
            own = q // size
            chosen = (q % size + 1) + min(blocks - 1, own) * size
            total += min(q + 1, chosen + attended_keys_at(q, pattern[:3])) + max(own - 1, 0) / 2
        return int(total)
    dilation, window, sinks = pattern[:3]
    if dilation == 1:
        return seq_len * (seq_len + 1) // 2
    total = 0
    for q in range(seq_len):
        local = min(q, window) + 1  # keys q - W .. q
        outside = q - window  # keys 0 .. outside - 1 lie before the window
        if outside > 0:
            total += min(sinks, outside)
            if dilation > 1 and outside > sinks:
                # grid keys p in [P, outside - 1] with (p + 1) % D == 0
                total += outside // dilation - sinks // dilation
        total += local
    return total


def attended_keys_at(q: int, pattern: Pattern) -> int:
    """Keys the query at position q sees under a (D, W, P) head pattern."""
    dilation, window, sinks = pattern[:3]
    if dilation == 1:
        return q + 1
    keys = min(q, window) + 1
    outside = q - window
    if outside > 0:
        keys += min(sinks, outside)
        if dilation > 1 and outside > sinks:
            keys += outside // dilation - sinks // dilation
    return keys


def layer_attended_keys(seq_len: int, pattern: Pattern, num_heads: int) -> float:
    """``attended_keys`` averaged over the heads of a layer pattern (one per head, §4.4)."""
    heads = head_patterns(pattern, num_heads)
    counts = {p: attended_keys(seq_len, p) for p in set(heads)}
    return sum(counts[p] for p in heads) / num_heads


def flops_per_token(m: ModelConfig, patterns: list[Pattern] | None = None, *, seq_len: int | None = None) -> int:
    """Forward FLOPs per token (2 per multiply-add) at ``seq_len``; training is 3x this.

    ``patterns`` gives each layer's (D, W, P); None means dense attention in every layer. Matmuls count
    the projections, FFN and LM head; attention counts QK^T and PV over the allowed keys only. The gate,
    scan, RoPE and norms are elementwise and left out, as in the usual MFU convention.
    """
    seq_len = seq_len or m.seq_len
    patterns = patterns or [DENSE] * m.num_layers
    d = m.hidden_size
    matmul = m.num_layers * (m.fused_slices * d * d + d * d + 2 * d * m.ffn_hidden_size)
    matmul += m.vocab_size * d
    attention = sum(4 * d * layer_attended_keys(seq_len, p, m.num_heads) for p in patterns) / seq_len
    return int(2 * matmul + attention)


def cache_bytes(
    m: ModelConfig,
    seq_len: int | None = None,
    *,
    batch_size: int = 1,
    patterns: list[Pattern] | None = None,
    kv_bytes: int = 2,
) -> int:
    """Bytes of the compressed decode cache: each head's keys and values in its own pattern's slots
    (``kv_bytes`` each), top-k heads' pooled block keys, plus the fp32 recurrence state of k and v in every
    layer."""
    seq_len = seq_len or m.seq_len
    patterns = patterns or m.layer_patterns()
    state = 2 * 4 * m.hidden_size if m.apply_recurrence else 0
    per_seq = 0
    for p in patterns:
        slots, summaries = layer_cache_slots(p, m.num_heads, seq_len)
        per_seq += kv_bytes * m.head_dim * (2 * slots + summaries) + state
    return batch_size * per_seq
