"""Training model ↔ reference model state dicts, for any tensor/pipeline layout.

Every training parameter maps to one reference tensor and a way of cutting it over TP ranks:

| kind         | training parameters                         | TP rank r holds                                   |
|--------------|---------------------------------------------|---------------------------------------------------|
| replicated   | norm gains                                  | the whole tensor                                  |
| rows         | ffn.fc1                                     | rows r·n/tp .. (r+1)·n/tp                         |
| cols         | mixer.out_proj, ffn.fc2                     | columns r·n/tp .. (r+1)·n/tp                      |
| fused_rows   | mixer.in_proj                               | [o_r | q_r | k_r | v_r | g_r]: rank-major slices   |
| vocab        | embedding, the last stage's tied copy       | rows of the vocabulary padded to a multiple of tp |

Used by the initialisation, the parity tests and the export, so the three cannot disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from .lm import RatPlusLM
from ..config.schema import ModelConfig
from .mixer import fused_slices

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


def shard(full: torch.Tensor, kind: Kind, model: RatPlusLM) -> torch.Tensor:
    """This TP rank's piece of the reference tensor ``full``."""
    tp, r = model.ctx.tp, model.ctx.tp_rank
    if kind == "replicated":
        return full
    if kind == "rows":
        return full.chunk(tp, 0)[r]
    if kind == "cols":
        return full.chunk(tp, 1)[r]
    if kind == "fused_rows":
        slices, d = fused_slices(model.model_config), full.shape[1]
        return full.view(slices, tp, -1, d)[:, r].reshape(-1, d)
    padded = torch.zeros(model.padded_vocab, full.shape[1], dtype=full.dtype, device=full.device)
    padded[: full.shape[0]] = full
    return padded.chunk(tp, 0)[r]


def unshard(pieces: list[torch.Tensor], kind: Kind, model: RatPlusLM) -> torch.Tensor:
    """The reference tensor from the pieces of every TP rank (in rank order)."""
    return _join(pieces, kind, slices=fused_slices(model.model_config), vocab_size=model.vocab_size)


def _join(pieces: list[torch.Tensor], kind: Kind, *, slices: int, vocab_size: int) -> torch.Tensor:
    if kind == "replicated":
        return pieces[0]
    if kind == "rows":
        return torch.cat(pieces, 0)
    if kind == "cols":
        return torch.cat(pieces, 1)
    if kind == "fused_rows":
        d = pieces[0].shape[1]
        return torch.stack([p.reshape(slices, -1, d) for p in pieces], dim=1).reshape(-1, d)
    return torch.cat(pieces, 0)[:vocab_size]


def unshard_pieces(m: ModelConfig, tp: int, pieces: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The reference state dict (``lm_head.weight`` tied) from every training parameter's TP pieces in rank
    order, e.g. read from checkpoint files of all tensor x pipeline ranks (the last stage's ``output_weight``
    left out). Raises KeyError naming a parameter it cannot place and ValueError on missing tensors."""
    out = {}
    for name, parts in pieces.items():
        layout = layout_of(name)
        if len(parts) != (1 if layout.kind == "replicated" else tp) and layout.kind != "replicated":
            raise ValueError(f"{name}: expected {tp} tensor-parallel pieces, got {len(parts)}")
        out[layout.reference_name] = _join(parts, layout.kind, slices=fused_slices(m), vocab_size=m.vocab_size)
    from .init import reference_shapes

    missing = sorted(set(reference_shapes(m)) - set(out))
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensors of the model, e.g. {missing[0]}")
    out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def load_reference_state_dict(model: RatPlusLM, reference: dict[str, torch.Tensor]) -> None:
    """Copy this rank's pieces of a reference (HF) state dict into the training model."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            layout = layout_of(name)
            if layout.reference_name not in reference:
                raise KeyError(f"reference state dict has no {layout.reference_name!r} (for {name})")
            param.copy_(shard(reference[layout.reference_name], layout.kind, model))


def to_reference_state_dict(model: RatPlusLM, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """The full reference state dict (or its gradients) assembled from every TP rank and pipeline stage.

    Collective over the model-parallel group; every rank gets the whole dict. Meant for tests and small
    models: export consolidates from checkpoint files instead. The tied ``lm_head.weight`` is included.
    """
    ctx, out = model.ctx, {}
    for name, param in model.named_parameters():
        if name == "output_weight":
            continue  # the first stage's embedding is the canonical copy
        layout = layout_of(name)
        local = (param.grad if grads else param.detach()).contiguous()
        pieces = [local]
        if ctx.tp > 1 and layout.kind != "replicated":
            pieces = [torch.empty_like(local) for _ in range(ctx.tp)]
            dist.all_gather(pieces, local, group=ctx.tp_group)
        out[layout.reference_name] = unshard(pieces, layout.kind, model)
    if ctx.pp > 1:
        stages = [None] * ctx.pp
        dist.all_gather_object(stages, out, group=ctx.pp_group)
        out = {k: v for stage in stages for k, v in stage.items()}
    out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def reference_config(m: ModelConfig, **overrides):
    """The reference model's ``RatPlusConfig`` for a training ``ModelConfig``."""
    from ..hf.configuration_ratplus import RatPlusConfig

    p = m.pattern
    fields = dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                  num_attention_heads=m.num_heads, head_dim=m.head_dim, intermediate_size=m.ffn_hidden_size,
                  max_position_embeddings=m.seq_len, rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps,
                  apply_recurrence=m.apply_recurrence, initializer_range=m.init_std, eos_token_id=m.eos_token_id,
                  dilation=p.dilation, window=p.window, sinks=p.sinks)
    fields.update(overrides)
    return RatPlusConfig(**fields)


def mark_tensor_parallel_attributes(model: RatPlusLM) -> None:
    """Tag every TP-sharded parameter the way megatron-core's own initialisation would.

    megatron sets ``tensor_model_parallel``/``partition_dim`` only when it initialises the weights itself; we
    initialise layout-free, so we tag them here. DeepSpeed reads the tag to count replicated parameters once
    in the gradient norm: untagged shards are taken for replicas and the norm comes out too small."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for name, param in model.named_parameters():
        kind = layout_of(name).kind
        if kind != "replicated":
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=1 if kind == "cols" else 0, stride=1)
