"""HuggingFace configuration of the RAT+ reference model (self-contained: ships inside exported checkpoints)."""

from __future__ import annotations

from transformers import PretrainedConfig


_PER_HEAD_KEYS = ("dilation", "window", "sinks", "topk_blocks")


def _per_layer(name: str, value, num_layers: int, num_heads: int) -> list:
    """One entry per layer, each an int (every head) or a tuple of one int per head."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * num_layers
    if len(values) != num_layers:
        raise ValueError(f"RatPlusConfig.{name}: a per-layer list needs {num_layers} entries, got {len(values)}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, (list, tuple)):
            if len(v) != num_heads:
                raise ValueError(f"RatPlusConfig.{name}[{i}]: a per-head list needs {num_heads} entries, got {len(v)}")
            out.append(tuple(int(x) for x in v))
        else:
            out.append(int(v))
    return out


class RatPlusConfig(PretrainedConfig):
    """RAT+ decoder: attention over gated-recurrent keys and values (arXiv 2602.18196).

    The sparse pattern (``dilation`` D, ``window`` W, ``sinks`` P), each an int or one entry per layer, and
    each layer's entry an int or one entry per head: a query at q sees keys k <= q with q - k <= W, or
    k < P, or (k + 1) % D == 0. ``dilation=1`` is dense, ``dilation=-1`` keeps only the window and the sinks.
    ``topk_blocks`` K >= 2 (per layer and head like D; 0 = off) adds top-k block attention: keys in blocks of
    ``block_size`` S, each query also sees its own block, the first block and the K - 2 other earlier blocks
    whose ``block_score`` summary ("max" or "mean" pooling of the keys) has the highest dot product with it
    (docs/spec.md §4.5).
    """

    model_type = "ratplus"
    attribute_map = {"num_key_value_heads": "num_attention_heads", "n_layer": "num_hidden_layers",
                     "n_head": "num_attention_heads", "n_embd": "hidden_size"}

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        head_dim: int = 128,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 4096,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        apply_recurrence: bool = True,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        eos_token_id: int = 2,
        dilation=1,
        window=0,
        sinks=0,
        topk_blocks=0,
        block_size=64,
        block_score="max",
        **kwargs,
    ):
        if num_attention_heads * head_dim != hidden_size:
            raise ValueError(
                f"RatPlusConfig: num_attention_heads * head_dim must equal hidden_size, "
                f"got {num_attention_heads} * {head_dim} != {hidden_size}"
            )
        if not tie_word_embeddings:
            raise ValueError("RatPlusConfig: RAT+ ties the LM head to the embedding (tie_word_embeddings=True)")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.apply_recurrence = apply_recurrence
        self.initializer_range = initializer_range
        self.dilation, self.window, self.sinks = dilation, window, sinks
        self.topk_blocks, self.block_size, self.block_score = topk_blocks, block_size, block_score
        if block_score not in ("max", "mean"):
            raise ValueError(f"RatPlusConfig.block_score must be 'max' or 'mean', got {block_score!r}")
        if int(block_size) < 1:
            raise ValueError(f"RatPlusConfig.block_size must be >= 1, got {block_size}")
        for layer in self.layer_patterns():
            for head in (layer if isinstance(layer[0], tuple) else (layer,)):
                d, w, p = head[:3]
                if not (d >= 1 or d == -1) or w < 0 or p < 0:
                    raise ValueError(f"RatPlusConfig: bad sparse pattern D={d} W={w} P={p} "
                                     "(need D >= 1 or D == -1, W >= 0, P >= 0)")
                if len(head) > 3 and head[3] < 2:
                    raise ValueError(f"RatPlusConfig: topk_blocks must be 0 (off) or >= 2, got {head[3]}")
        kwargs.setdefault("bos_token_id", None)
        super().__init__(tie_word_embeddings=tie_word_embeddings, eos_token_id=eos_token_id, **kwargs)

    def layer_patterns(self) -> list[tuple]:
        """Each layer's pattern: ``(D, W, P)``, ``(D, W, P, K, S, score)`` with top-k, or, where the heads
        differ, a tuple of one such head pattern per head (``cache_layout.py``)."""
        n, h = self.num_hidden_layers, self.num_attention_heads
        columns = [_per_layer(name, getattr(self, name, 0), n, h) for name in _PER_HEAD_KEYS]
        return [_layer_pattern(entries, h, int(self.block_size), self.block_score) for entries in zip(*columns)]


def _layer_pattern(entries, num_heads: int, block_size: int, block_score: str) -> tuple:
    """The layer pattern of one layer's (D, W, P, K) entries, each an int or a tuple per head."""
    per_head = [e if isinstance(e, tuple) else (e,) * num_heads for e in entries]
    heads = []
    for d, w, p, k in zip(*per_head):
        heads.append((d, w, p, k, block_size, block_score) if k and d != 1 else (d, w, p))
    return heads[0] if len(set(heads)) == 1 else tuple(heads)
