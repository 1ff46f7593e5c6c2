"""Weights only, for the adaptation phase: from an HF folder (any layout) or a committed training
checkpoint of the same layout. The optimizer starts fresh (RATPLUS_SPEC.md §3)."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import latest_checkpoint, read_marker
from ..checkpoint.store import MARKER
from ..model.mapping import load_reference_state_dict


def load_pretrained_weights(engine, source: str | None, layout: dict) -> None:
    if not source:
        raise ValueError("train.init_from: the adaptation phase needs a pretraining checkpoint or an HF folder")
    path = Path(source)
    if (path / "config.json").is_file():
        _load_hf_folder(engine.module, path)
        return
    checkpoint = path if (path / MARKER).is_file() else latest_checkpoint(path)
    if checkpoint is None:
        raise ValueError(f"train.init_from: {source} is neither an HF folder nor holds a committed checkpoint")
    saved = read_marker(checkpoint)["layout"]
    if saved["tp"] != layout["tp"] or saved["pp"] != layout["pp"]:
        raise ValueError(f"train.init_from: {checkpoint} has another tensor/pipeline layout than this run; export "
                         "it to an HF folder first (ratplus export-hf) and start from that")
    engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name, load_module_only=True,
                           load_optimizer_states=False, load_lr_scheduler_states=False)


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
