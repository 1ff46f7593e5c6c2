"""HuggingFace configuration of the RAT+ reference model (self-contained: ships inside exported checkpoints)."""

from __future__ import annotations

from transformers import PretrainedConfig


def _per_layer(name: str, value, num_layers: int) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * num_layers
    if len(values) != num_layers:
        raise ValueError(f"RatPlusConfig.{name}: a per-layer list needs {num_layers} entries, got {len(values)}")
    return [int(v) for v in values]


class RatPlusConfig(PretrainedConfig):
    """RAT+ decoder: attention over gated-recurrent keys and values (arXiv 2602.18196).

    The sparse pattern (``dilation`` D, ``window`` W, ``sinks`` P), each an int or one entry per layer: a
    query at q sees keys k <= q with q - k <= W, or k < P, or (k + 1) % D == 0. ``dilation=1`` is dense,
    ``dilation=-1`` keeps only the window and the sinks.
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
        for d, w, p in self.layer_patterns():
            if not (d >= 1 or d == -1) or w < 0 or p < 0:
                raise ValueError(f"RatPlusConfig: bad sparse pattern D={d} W={w} P={p} "
                                 "(need D >= 1 or D == -1, W >= 0, P >= 0)")
        kwargs.setdefault("bos_token_id", None)
        super().__init__(tie_word_embeddings=tie_word_embeddings, eos_token_id=eos_token_id, **kwargs)

    def layer_patterns(self) -> list[tuple[int, int, int]]:
        """``(D, W, P)`` of each layer."""
        n = self.num_hidden_layers
        return list(zip(_per_layer("dilation", self.dilation, n), _per_layer("window", self.window, n),
                        _per_layer("sinks", self.sinks, n)))
