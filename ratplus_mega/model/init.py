"""Layout-free initialisation: the same seed gives the same model for every (TP, PP, CP, DP) layout.

Each reference tensor is drawn whole from a generator seeded by (seed, reference name), N(0, init_std²)
for matrices and ones for norm gains (docs/spec.md §1.7), then cut to this rank's piece. The reference
model built with :func:`reference_init_state_dict` therefore starts from exactly the training model's weights.
"""

from __future__ import annotations

import hashlib

import torch

from ..config.schema import ModelConfig
from ..parallel.context import ParallelContext
from ..reference_layout import layout_of, reference_shapes, shard
from .lm import RatPlusLM
from .mapping import mark_tensor_parallel_attributes


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def draw_reference_tensor(name: str, shape: tuple[int, ...], *, seed: int, std: float) -> torch.Tensor:
    """The initial value of the reference tensor ``name`` (fp32, CPU)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    return torch.randn(shape, generator=_generator(seed, name)) * std


def reference_init_state_dict(m: ModelConfig, *, seed: int) -> dict[str, torch.Tensor]:
    """The whole initial model in the reference layout (with ``lm_head.weight`` tied)."""
    state = {name: draw_reference_tensor(name, shape, seed=seed, std=m.init_std)
             for name, shape in reference_shapes(m).items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def initialize_weights(model: RatPlusLM, *, seed: int) -> None:
    """Set every parameter of this stage and TP rank to its piece of the layout-free initial model."""
    shapes = reference_shapes(model.model_config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            layout = layout_of(name)
            full = draw_reference_tensor(layout.reference_name, shapes[layout.reference_name], seed=seed,
                                         std=model.model_config.init_std)
            param.copy_(shard(full, layout.kind, model.model_config, tp=model.ctx.tp, rank=model.ctx.tp_rank))


def build_model(m: ModelConfig, ctx: ParallelContext, *, seed: int, params_dtype: torch.dtype = torch.float32):
    """A stage of the training model with layout-free initial weights (same seed, same model, any layout)."""
    model = RatPlusLM(m, ctx, params_dtype=params_dtype)
    mark_tensor_parallel_attributes(model)
    initialize_weights(model, seed=seed)
    return model
