"""Parameter, FLOP and decode-cache arithmetic of a model config (docs/spec.md §4.3, §6.2).

Pure arithmetic: no torch. ``docs/flops.md`` explains the FLOP convention used for MFU.
"""

from __future__ import annotations

from .config.schema import ModelConfig
from .hf.cache_layout import cache_slots, dense_in_effect  # noqa: F401  the reference model's cache (torch-free)

Pattern = tuple[int, int, int]
DENSE: Pattern = (1, 0, 0)


def parameter_count(m: ModelConfig) -> int:
    """Trainable parameters with the tied embedding counted once (spec §6.2)."""
    d = m.hidden_size
    in_proj = m.fused_slices * d * d
    block = in_proj + d * d + 2 * d * m.ffn_hidden_size + 2 * d  # mixer, out_proj, FFN, two norm gains
    return m.num_layers * block + m.vocab_size * d + d


def attended_keys(seq_len: int, pattern: Pattern) -> int:
    """Number of (query, key) score entries of a causal window of ``seq_len`` under ``pattern`` (spec §1.3)."""
    dilation, window, sinks = pattern
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
    attention = sum(4 * d * attended_keys(seq_len, p) for p in patterns) / seq_len
    return int(2 * matmul + attention)


def cache_bytes(
    m: ModelConfig,
    seq_len: int | None = None,
    *,
    batch_size: int = 1,
    patterns: list[Pattern] | None = None,
    kv_bytes: int = 2,
) -> int:
    """Bytes of the compressed decode cache: keys and values (``kv_bytes`` each) plus the fp32 recurrence
    state of k and v in every layer."""
    seq_len = seq_len or m.seq_len
    patterns = patterns or m.layer_patterns()
    d = m.hidden_size
    state = 2 * 4 * d if m.apply_recurrence else 0
    per_seq = sum(2 * kv_bytes * d * cache_slots(p, seq_len) + state for p in patterns)
    return batch_size * per_seq
