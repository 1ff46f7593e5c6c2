"""The reference (HF) model's tensors and how each is cut over tensor-parallel ranks in the training model.

Every training parameter maps to one reference tensor and a way of cutting it over TP ranks:

| kind         | training parameters                         | TP rank r holds                                   |
|--------------|---------------------------------------------|---------------------------------------------------|
| replicated   | norm gains                                  | the whole tensor                                  |
| rows         | ffn.fc1                                     | rows r·n/tp .. (r+1)·n/tp                         |
| cols         | mixer.out_proj, ffn.fc2                     | columns r·n/tp .. (r+1)·n/tp                      |
| fused_rows   | mixer.in_proj                               | [o_r | q_r | k_r | v_r | g_r]: rank-major slices   |
| vocab        | embedding, the last stage's tied copy       | rows of the vocabulary padded to a multiple of tp |

The table is pure data over torch tensors: it needs neither megatron-core nor a process group, so the
initialisation, the parity tests, checkpoint consolidation and the export share it without pulling in the
training stack.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from .config.schema import ModelConfig

Kind = Literal["replicated", "rows", "cols", "fused_rows", "vocab"]

_RULES: list[tuple[str, str, Kind]] = [
    (r"embedding\.weight", "model.embed_tokens.weight", "vocab"),
    (r"output_weight", "model.embed_tokens.weight", "vocab"),
    (r"final_norm\.weight", "model.norm.weight", "replicated"),
    (r"layers\.(\d+)\.input_norm\.weight", r"model.layers.\1.input_norm.weight", "replicated"),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.ffn_norm.weight", "replicated"),
    (r"layers\.(\d+)\.mixer\.in_proj\.weight", r"model.layers.\1.mixer.in_proj.weight", "fused_rows"),
    (r"layers\.(\d+)\.mixer\.out_proj\.weight", r"model.layers.\1.mixer.out_proj.weight", "cols"),
    (r"layers\.(\d+)\.ffn\.fc1\.weight", r"model.layers.\1.ffn.fc1.weight", "rows"),
    (r"layers\.(\d+)\.ffn\.fc2\.weight", r"model.layers.\1.ffn.fc2.weight", "cols"),
]


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The embedding rows allocated: the vocabulary rounded up to a multiple of the TP size."""
    return -(-vocab_size // tp) * tp


@dataclass(frozen=True)
class Layout:
    reference_name: str
    kind: Kind


def layout_of(name: str) -> Layout:
    """The reference tensor and TP cut of the training parameter ``name``."""
    for pattern, reference, kind in _RULES:
        if re.fullmatch(pattern, name):
            return Layout(re.sub(pattern, reference, name), kind)
    raise KeyError(f"no reference mapping for training parameter {name!r}")


def shard(full: torch.Tensor, kind: Kind, m: ModelConfig, *, tp: int, rank: int) -> torch.Tensor:
    """TP rank ``rank``'s piece of the reference tensor ``full``."""
    if kind == "replicated":
        return full
    if kind == "rows":
        return full.chunk(tp, 0)[rank]
    if kind == "cols":
        return full.chunk(tp, 1)[rank]
    if kind == "fused_rows":
        d = full.shape[1]
        return full.view(m.fused_slices, tp, -1, d)[:, rank].reshape(-1, d)
    padded = torch.zeros(padded_vocab_size(m.vocab_size, tp), full.shape[1], dtype=full.dtype, device=full.device)
    padded[: full.shape[0]] = full
    return padded.chunk(tp, 0)[rank]


def join(pieces: list[torch.Tensor], kind: Kind, m: ModelConfig) -> torch.Tensor:
    """The reference tensor from the pieces of every TP rank (in rank order): the inverse of :func:`shard`."""
    if kind == "replicated":
        return pieces[0]
    if kind == "rows":
        return torch.cat(pieces, 0)
    if kind == "cols":
        return torch.cat(pieces, 1)
    if kind == "fused_rows":
        d = pieces[0].shape[1]
        return torch.stack([p.reshape(m.fused_slices, -1, d) for p in pieces], dim=1).reshape(-1, d)
    return torch.cat(pieces, 0)[: m.vocab_size]


def reference_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the reference model's parameters (the tied head is the embedding)."""
    d, f = m.hidden_size, m.ffn_hidden_size
    shapes = {"model.embed_tokens.weight": (m.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(m.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_norm.weight": (d,), p + "mixer.in_proj.weight": (m.fused_slices * d, d),
                       p + "mixer.out_proj.weight": (d, d), p + "ffn_norm.weight": (d,),
                       p + "ffn.fc1.weight": (f, d), p + "ffn.fc2.weight": (d, f)})
    return shapes


def unshard_pieces(m: ModelConfig, tp: int, pieces: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The reference state dict (``lm_head.weight`` tied) from every training parameter's TP pieces in rank
    order, e.g. read from checkpoint files of all tensor x pipeline ranks (the last stage's ``output_weight``
    left out). Raises KeyError naming a parameter it cannot place and ValueError on missing tensors."""
    out = {}
    for name, parts in pieces.items():
        layout = layout_of(name)
        if layout.kind != "replicated" and len(parts) != tp:
            raise ValueError(f"{name}: expected {tp} tensor-parallel pieces, got {len(parts)}")
        out[layout.reference_name] = join(parts, layout.kind, m)
    missing = sorted(set(reference_shapes(m)) - set(out))
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensors of the model, e.g. {missing[0]}")
    out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def local_pattern(pattern: tuple, num_heads: int, tp: int, rank: int) -> tuple:
    """The layer pattern of TP rank ``rank``'s heads (``rank·H/tp .. (rank+1)·H/tp - 1``, as ``fused_rows``
    cuts them): a uniform pattern stays as it is, a per-head one keeps this rank's entries, collapsed to one
    head pattern where they agree (docs/spec.md §4.4)."""
    if not (pattern and isinstance(pattern[0], tuple)):
        return pattern
    if len(pattern) != num_heads or num_heads % tp:
        raise ValueError(f"a per-head pattern of {len(pattern)} heads does not split over TP={tp} ({num_heads} heads)")
    per_rank = num_heads // tp
    mine = tuple(pattern[rank * per_rank:(rank + 1) * per_rank])
    return mine[0] if len(set(mine)) == 1 else mine


def reference_config(m: ModelConfig, **overrides):
    """The reference model's ``RatPlusConfig`` for a training ``ModelConfig``."""
    from .hf.configuration_ratplus import RatPlusConfig

    p = m.pattern
    fields = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                  num_attention_heads=m.num_heads, head_dim=m.head_dim, intermediate_size=m.ffn_hidden_size,
                  max_position_embeddings=m.seq_len, rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps,
                  apply_recurrence=m.apply_recurrence, initializer_range=m.init_std, eos_token_id=m.eos_token_id,
                  dilation=p.dilation, window=p.window, sinks=p.sinks, topk_blocks=p.topk_blocks,
                  block_size=p.block_size, block_score=p.block_score)
    fields.update(overrides)
    return RatPlusConfig(**fields)
