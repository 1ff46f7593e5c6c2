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
        raise ValueError(f"train.init_from: {source} is neither an HF folder nor holds a committed "
                         "checkpoint") from None
    check_same_model_layout(checkpoint, tp=tp, pp=pp, key="train.init_from")
    load_module_weights(engine, checkpoint)


def _load_hf_folder(model, path: Path) -> None:
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..errors import RatplusError

    index = path / "model.safetensors.index.json"
    try:  # the shards the index names, else the files there are
        files = ([path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
                 if index.is_file() else sorted(path.glob("model*.safetensors")) or [path / "model.safetensors"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise RatplusError(f"train.init_from: {index} cannot be read; export the folder again") from None
    missing = [file.name for file in files if not file.is_file()]
    if missing:
        raise RatplusError(f"train.init_from: the HF folder {path} has no {', '.join(missing)}; export it again "
                           "(ratplus export-hf, import-public) or point at the folder that holds the weights")
    state = {}
    for file in files:
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError) as e:
            reason = str(e).removeprefix("Error while deserializing header: ")
            raise RatplusError(f"train.init_from: {file} is truncated or damaged ({reason}); export the folder "
                               "again") from None
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    load_reference_state_dict(model, {k: v.float() for k, v in state.items()})
