"""The commit marker of a checkpoint: what was saved (step, layout, model) and whether a run may continue it.

The marker (``COMMITTED.json``) is written last, so a folder that holds one is a whole checkpoint; its
fields are the only thing resume, adaptation and export read to decide what a checkpoint is, and the size and
digest of each file it lists are what a checkpoint is verified against.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..config.load import load_config
from ..config.schema import ModelConfig, RunConfig

MARKER = "COMMITTED.json"
CONFIG = "config.yaml"


@dataclass(frozen=True)
class Marker:
    step: int
    """Our optimizer-step counter (DeepSpeed's doubles in joint training)."""
    layout: dict[str, int]
    """The parallel sizes that wrote it: ``tp``, ``pp``, ``cp``, ``dp``."""
    model: dict
    """:func:`model_fingerprint` of the model config."""
    time: float
    run_id: str | None = None
    """The run that wrote it: drawn when a run starts afresh, carried on by every run that resumes one of its
    checkpoints. ``train.keep_last`` prunes only checkpoints of its own run. None: written before run ids."""
    files: dict[str, dict] | None = None
    """Every other file of the checkpoint (path relative to its folder) -> ``{"size": bytes, "sha256": hex}``,
    computed while the file was written (``integrity.py``). None: written before checksums were recorded."""


def model_fingerprint(m: ModelConfig) -> dict:
    """The model fields a checkpoint must agree with (JSON-safe; the preset name is only where they came from)."""
    fields = dataclasses.asdict(m)
    fields.pop("preset")
    return json.loads(json.dumps(fields))


def read_marker(checkpoint: Path) -> Marker:
    raw = json.loads((Path(checkpoint) / MARKER).read_text())
    return Marker(**{f.name: raw[f.name] if f.default is dataclasses.MISSING else raw.get(f.name, f.default)
                     for f in dataclasses.fields(Marker)})


def marker_json(marker: Marker) -> str:
    return json.dumps(dataclasses.asdict(marker), indent=2)


def run_config(checkpoint: Path) -> RunConfig:
    """The resolved run config stored with ``checkpoint``."""
    return load_config(Path(checkpoint) / CONFIG)


def check_resumable(checkpoint: Path, *, model: ModelConfig) -> Marker:
    """The marker of ``checkpoint`` if it holds ``model``; else ValueError naming the fields that differ. Whether
    the run's layout can continue it is ``relayout.py``'s question."""
    marker = read_marker(checkpoint)
    differing = sorted(k for k, v in model_fingerprint(model).items() if marker.model.get(k) != v)
    if differing:
        raise ValueError(f"{checkpoint} holds another model than this config: model.{', model.'.join(differing)} "
                         "differ")
    return marker


def check_same_model_layout(checkpoint: Path, *, tp: int, pp: int, key: str) -> None:
    """Raise ValueError (naming the config ``key``) unless ``checkpoint``'s weights are cut like this run's."""
    saved = read_marker(checkpoint).layout
    if (saved["tp"], saved["pp"]) != (tp, pp):
        raise ValueError(f"{key}: {checkpoint} has another tensor/pipeline layout than this run (tp={saved['tp']}, "
                         f"pp={saved['pp']}); export it to an HF folder first (ratplus export-hf) and start from that")
