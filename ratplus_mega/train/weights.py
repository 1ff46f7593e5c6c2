"""Weights only, for the adaptation phase: from an HF folder (any layout) or a committed training
checkpoint of the same layout. The optimizer starts fresh (docs/spec.md §3)."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import check_same_model_layout, load_module_weights, resolve_checkpoint
from ..model.mapping import load_reference_state_dict


def load_pretrained_weights(engine, source: str | None, *, tp: int, pp: int) -> None:
    if not source:
        raise ValueError("train.init_from: the adaptation phase needs a pretraining checkpoint or an HF folder")
    path = Path(source)
    if (path / "config.json").is_file():
        _load_hf_folder(engine.module, path)
        return
    try:
        checkpoint = resolve_checkpoint(path, key="train.init_from")
    except ValueError:
        raise ValueError(f"train.init_from: {source} is neither an HF folder nor holds a committed checkpoint") from None
    check_same_model_layout(checkpoint, tp=tp, pp=pp, key="train.init_from")
    load_module_weights(engine, checkpoint)


def _load_hf_folder(model, path: Path) -> None:
    from safetensors.torch import load_file

    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise ValueError(f"train.init_from: {path} has no model*.safetensors")
    state = {}
    for file in files:
        state.update(load_file(file))
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    load_reference_state_dict(model, {k: v.float() for k, v in state.items()})
