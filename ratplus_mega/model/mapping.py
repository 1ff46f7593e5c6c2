"""The training model's parameters ↔ the reference (HF) state dict, through the table of
``ratplus_mega/reference_layout.py``: this rank's pieces in, the whole model out (collective), and the
tensor-parallel tags megatron-core and DeepSpeed read."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from ..reference_layout import join, layout_of, shard
from .lm import RatPlusLM


def load_reference_state_dict(model: RatPlusLM, reference: dict[str, torch.Tensor]) -> None:
    """Copy this rank's pieces of a reference (HF) state dict into the training model."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            layout = layout_of(name)
            if layout.reference_name not in reference:
                raise KeyError(f"reference state dict has no {layout.reference_name!r} (for {name})")
            param.copy_(shard(reference[layout.reference_name], layout.kind, model.model_config, tp=model.ctx.tp,
                              rank=model.ctx.tp_rank))


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
        out[layout.reference_name] = join(pieces, layout.kind, model.model_config)
    stages = [None] * ctx.pp
    dist.all_gather_object(stages, out, group=ctx.pp_group)
    out = {k: v for stage in stages for k, v in stage.items()}
    out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def mark_tensor_parallel_attributes(model: RatPlusLM) -> None:
    """Tag every TP-sharded parameter the way megatron-core's own initialisation would.

    megatron sets ``tensor_model_parallel``/``partition_dim`` only when it initialises the weights itself; we
    initialise layout-free, so we tag them here. DeepSpeed reads the tag to count replicated parameters once
    in the gradient norm: untagged shards are taken for replicas and the norm comes out too small."""
    for name, param in model.named_parameters():
        kind = layout_of(name).kind
        if kind != "replicated":
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=1 if kind == "cols" else 0, stride=1)
