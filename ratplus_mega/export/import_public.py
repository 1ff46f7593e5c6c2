"""Public RAT+ checkpoints (``torch.save`` dicts of the reference code) → the reference model's state dict.

The public trainer saves ``{"task": state_dict, "config": ..., "step": ..., "optimizer": ..., ...}`` (spec §9).
The head shape comes from the config (its attention layer's section, ``model.backbone.seq_cell``: ``d_model``,
``d_head`` and ``num_head``), since the tensors show only the width; a config that disagrees with the tensors,
or none, is refused (``--head-dim`` gives it for a weights-only file). The state-dict names, with ``_orig_mod.``
inserted anywhere by ``torch.compile``::

    embedding.wte.weight                                   → model.embed_tokens.weight
    head.lm_head.weight (tied copy, optional)              → dropped (must equal the embedding)
    backbone.layers.{i}.seq_layer.input_norm.weight        → model.layers.{i}.input_norm.weight
    backbone.layers.{i}.seq_layer.in_proj.weight  [o|q|k|v|g] → model.layers.{i}.mixer.in_proj.weight
    backbone.layers.{i}.seq_layer.fgate_proj.weight (legacy)  → appended after the 4d in_proj rows
    backbone.layers.{i}.seq_layer.out_proj.weight          → model.layers.{i}.mixer.out_proj.weight
    backbone.layers.{i}.hidden_layer.{ln,fc1,fc2}.weight   → model.layers.{i}.{ffn_norm,ffn.fc1,ffn.fc2}.weight
    backbone.ln.weight                                     → model.norm.weight

Loading never unpickles arbitrary objects: ``torch.load(weights_only=True)`` with the project's one allow-list
(``ratplus_mega/checkpoint/trust.py``), which holds the config classes the public code stores (EasyDict,
OmegaConf containers), each admitted only if importable here. A file that names another class, that is not a
PyTorch checkpoint, or a damaged one, is refused in one line.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..checkpoint.trust import (ALLOWED_GLOBALS, FileRefused, UnreadableFile, allowed_objects, restricted_loads,
                               unlisted_globals)
from ..errors import RatplusError
from ..hf import RatPlusConfig

__all__ = [
    "ALLOWED_GLOBALS", "CONFIG_LAYER_SECTION", "convert_public_state_dict", "head_settings",
    "load_public_checkpoint", "public_to_hf", "read_pattern_file",
]

CONFIG_LAYER_SECTION = "model.backbone.seq_cell"
"""Where the public trainer's (resolved hydra) config keeps the attention layer's ``d_model``, ``d_head`` and
``num_head``; its layer config's default head dim is 64, the published models use 128."""

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6: a zip archive
_LEGACY_MAGIC = bytes.fromhex("6cfc9c46f9206aa85019")  # torch.save's magic number in its older pickle format

_LAYER = re.compile(r"backbone\.layers\.(\d+)\.(seq_layer|hidden_layer)\.(\w+)\.weight")
_LAYER_NAMES = {
    ("seq_layer", "input_norm"): "input_norm", ("seq_layer", "in_proj"): "mixer.in_proj",
    ("seq_layer", "out_proj"): "mixer.out_proj", ("seq_layer", "fgate_proj"): "fgate_proj",
    ("hidden_layer", "ln"): "ffn_norm", ("hidden_layer", "fc1"): "ffn.fc1", ("hidden_layer", "fc2"): "ffn.fc2",
}
_REQUIRED_LAYER_KEYS = ("input_norm", "mixer.in_proj", "mixer.out_proj", "ffn_norm", "ffn.fc1", "ffn.fc2")


def load_public_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``task`` state dict of a public checkpoint, loaded with ``weights_only=True``.

    Raises:
        ValueError: the file holds a class outside :data:`ALLOWED_GLOBALS` (named, with what to do), an allowed
            class that cannot be imported here, or no ``task`` state dict.
        RatplusError: the file is not a PyTorch checkpoint, or a truncated or damaged one.
    """
    return _load(Path(path))["task"]


def _load(path: Path) -> dict:
    """The whole checkpoint dict (``task`` checked to be a dict), loaded with ``weights_only=True``."""
    if not path.is_file():
        raise ValueError(f"checkpoint {path}: no such file")
    _check_is_torch_file(path)
    found = _allowed_globals(path)
    try:
        with restricted_loads(found):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Only the legacy format gets here with a class outside the list (zip files were checked above).
        name = re.search(r"GLOBAL (\S+)", str(e))
        if name:
            raise ValueError(_unlisted_message(path, [name.group(1)])) from None
        raise RatplusError(f"checkpoint {path}: cannot be read as a PyTorch checkpoint; it is truncated or "
                           "damaged") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile):
        raise RatplusError(f"checkpoint {path}: cannot be read as a PyTorch checkpoint; it is truncated or "
                           "damaged") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("task"), dict):
        return ckpt
    keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
    raise ValueError(f"checkpoint {path}: expected a dict with a 'task' state dict (public RAT+ format), got {keys}")


def _check_is_torch_file(path: Path) -> None:
    """Refuse, from its first bytes, a file that torch.save did not write."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise RatplusError(f"checkpoint {path}: a zip archive without its directory; the file is truncated or "
                               "damaged (copy it again)")
        return
    if head.startswith(b"\x80") and _LEGACY_MAGIC in head:
        return
    what = "an empty file" if not head else "neither torch.save's zip archive nor its older pickle format"
    raise RatplusError(f"checkpoint {path}: not a PyTorch checkpoint ({what}); expected the public RAT+ "
                       "trainer's .pth file")


def _allowed_globals(path: Path) -> list[str] | None:
    """The allow-listed classes this file holds (None for the legacy format, whose unpickler is given the whole
    list and refuses anything else it meets); raises naming any other class it holds."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        found, unlisted = unlisted_globals(path)
    except UnreadableFile:
        raise RatplusError(f"checkpoint {path}: a zip archive that PyTorch cannot read as a checkpoint; it is "
                           "truncated, damaged or not a torch.save file") from None
    except FileRefused as e:
        raise ValueError(_unlisted_message(path, e.names)) from None
    if unlisted:
        raise ValueError(_unlisted_message(path, unlisted))
    allowed_objects(found, path=path)  # says which package to install for an allow-listed class missing here
    return found


def _unlisted_message(path: Path, unlisted: list[str]) -> str:
    return (f"checkpoint {path} holds {', '.join(unlisted)}, which the importer does not unpickle (allowed: "
            "EasyDict and OmegaConf configs, plain containers: ALLOWED_GLOBALS in ratplus_mega/checkpoint/trust.py); "
            "nothing was loaded. Ask for a file of weights and config only, or re-save only its weights ('task') "
            "where the file was made")


def head_settings(config) -> dict[str, int]:
    """The ``d_model``, ``d_head`` and ``num_head`` integers the public config gives under
    :data:`CONFIG_LAYER_SECTION` (absent, unresolved or non-integer entries left out)."""
    section = config
    for key in CONFIG_LAYER_SECTION.split("."):
        section = _entry(section, key)
    found = {}
    for key in ("d_model", "d_head", "num_head"):
        value = _entry(section, key)
        if isinstance(value, int) and not isinstance(value, bool):
            found[key] = value
    return found


def _entry(mapping, key):
    """``mapping[key]``, or None where it is absent or cannot be read (e.g. an OmegaConf interpolation whose
    resolver is not registered here)."""
    if not isinstance(mapping, Mapping) and not hasattr(mapping, "get"):
        return None
    try:
        return mapping.get(key)
    except Exception:  # noqa: BLE001 - an unresolvable config entry counts as absent
        return None


def _head_shape(d: int, config, head_dim: int | None) -> tuple[int, int]:
    """(head_dim, heads) for hidden size ``d`` from the config and/or ``head_dim``; refuses disagreements."""
    where = f"the checkpoint's config ({CONFIG_LAYER_SECTION})"
    given = head_settings(config) if config is not None else {}
    if "d_model" in given and given["d_model"] != d:
        raise RatplusError(f"public checkpoint: {where} says d_model {given['d_model']}, but the tensors are {d} "
                           "wide (embedding.wte.weight); the config and the weights are of different models")
    from_config, heads = given.get("d_head"), given.get("num_head")
    if from_config is not None and heads is not None and from_config * heads != d:
        raise RatplusError(f"public checkpoint: {where} says num_head {heads} x d_head {from_config} = "
                           f"{heads * from_config}, but the tensors are {d} wide")
    if from_config is None and heads is not None:
        if heads <= 0 or d % heads:
            raise RatplusError(f"public checkpoint: {where} says num_head {heads}, which does not divide the "
                               f"tensors' width {d}")
        from_config = d // heads
    if head_dim is not None and from_config is not None and head_dim != from_config:
        raise RatplusError(f"public checkpoint: --head-dim {head_dim} disagrees with {where}, which gives head dim "
                           f"{from_config}")
    head_dim = head_dim if head_dim is not None else from_config
    if head_dim is None:
        raise RatplusError(f"public checkpoint: {where} gives no d_head or num_head; pass --head-dim (the "
                           "published RAT+ models use 128)")
    if head_dim <= 0 or d % head_dim:
        raise RatplusError(f"public checkpoint: hidden size {d} is not a multiple of the head dim {head_dim}")
    return head_dim, d // head_dim


def convert_public_state_dict(state: dict[str, torch.Tensor], config=None, *,
                              head_dim: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Map a public state dict to the reference model's names and infer its shape.

    Args:
        config: the checkpoint's ``config`` entry; its :data:`CONFIG_LAYER_SECTION` gives the head shape.
        head_dim: the head dimension, for a checkpoint whose config does not give it (it must agree if it does).
    Returns:
        (state_dict, shape) with shape keys ``vocab_size, hidden_size, num_hidden_layers,
        num_attention_heads, head_dim, intermediate_size, apply_recurrence``.
    Raises:
        ValueError: unknown or missing keys (named), duplicated names, or shapes that do not fit one model.
        RatplusError: no head shape, or a config that disagrees with the tensors.
    """
    state = _strip_compile_prefix(state)
    out, layers, unknown = {}, {}, []
    for key, tensor in state.items():
        m = _LAYER.fullmatch(key)
        if key == "embedding.wte.weight":
            out["model.embed_tokens.weight"] = tensor
        elif key == "backbone.ln.weight":
            out["model.norm.weight"] = tensor
        elif key == "head.lm_head.weight":
            out["lm_head.weight"] = tensor
        elif m and (m.group(2), m.group(3)) in _LAYER_NAMES:
            layers.setdefault(int(m.group(1)), {})[_LAYER_NAMES[m.group(2), m.group(3)]] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"public checkpoint: unknown keys {unknown}")
    missing = [k for k in ("model.embed_tokens.weight", "model.norm.weight") if k not in out]
    if not layers:
        missing.append("backbone.layers.*")
    if missing:
        raise ValueError(f"public checkpoint: missing {missing}")
    vocab, d = out["model.embed_tokens.weight"].shape
    head = out.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, out["model.embed_tokens.weight"]):
        raise ValueError("public checkpoint: head.lm_head.weight differs from embedding.wte.weight (untied head)")
    head_dim, heads = _head_shape(d, config, head_dim)
    recurrence = set()
    for i in range(max(layers) + 1):
        recurrence.add(_convert_layer(i, layers.get(i, {}), d, out))
    if len(recurrence) > 1:
        raise ValueError("public checkpoint: some layers have the forget gate (5d in_proj rows) and some do not")
    shape = dict(vocab_size=vocab, hidden_size=d, num_hidden_layers=len(layers), num_attention_heads=heads,
                 head_dim=head_dim, intermediate_size=out["model.layers.0.ffn.fc1.weight"].shape[0],
                 apply_recurrence=recurrence.pop())
    return out, shape


def _strip_compile_prefix(state: dict) -> dict:
    out = {}
    for key, tensor in state.items():
        clean = key.replace("_orig_mod.", "")
        if clean in out:
            raise ValueError(f"public checkpoint: {key!r} and another key both map to {clean!r}")
        out[clean] = tensor
    return out


def _convert_layer(i: int, parts: dict, d: int, out: dict) -> bool:
    """Store layer ``i`` under reference names; returns whether it has the recurrence's gate rows."""
    missing = [f"backbone.layers.{i}.{_public_name(k)}.weight" for k in _REQUIRED_LAYER_KEYS if k not in parts]
    if missing:
        raise ValueError(f"public checkpoint: missing {missing}")
    in_proj, fgate = parts["mixer.in_proj"], parts.get("fgate_proj")
    if fgate is not None:
        if in_proj.shape[0] != 4 * d or tuple(fgate.shape) != (d, d):
            raise ValueError(f"public checkpoint: layer {i} has fgate_proj {tuple(fgate.shape)} beside in_proj "
                             f"{tuple(in_proj.shape)}; expected ({d}, {d}) beside ({4 * d}, {d})")
        in_proj = torch.cat([in_proj, fgate], dim=0)  # legacy layout: gate rows go last (spec §1.2 step 2)
    if in_proj.shape[0] not in (4 * d, 5 * d) or in_proj.shape[1] != d:
        raise ValueError(f"public checkpoint: layer {i} in_proj has shape {tuple(in_proj.shape)}, expected "
                         f"({5 * d}, {d}) or ({4 * d}, {d})")
    prefix = f"model.layers.{i}."
    for name in _REQUIRED_LAYER_KEYS:
        out[prefix + name + ".weight"] = in_proj if name == "mixer.in_proj" else parts[name]
    return in_proj.shape[0] == 5 * d


def _public_name(name: str) -> str:
    return next(f"{section}.{public}" for (section, public), ours in _LAYER_NAMES.items() if ours == name)


def public_to_hf(path: str | Path, *, dilation=1, window=0, sinks=0,
                 head_dim: int | None = None, **topk) -> tuple[RatPlusConfig, dict]:
    """Load a public checkpoint and return the reference model's config (with the given sparse pattern, an
    int or one entry per layer; the head shape from the checkpoint's config, or ``head_dim``) and state dict.
    Shapes the config rejects raise ValueError."""
    ckpt = _load(Path(path))
    state, shape = convert_public_state_dict(ckpt["task"], ckpt.get("config"), head_dim=head_dim)
    config = RatPlusConfig(**shape, dilation=dilation, window=window, sinks=sinks, **topk)
    return config, state


def read_pattern_file(path: str | Path) -> dict:
    """``{dilation, window, sinks}`` from a YAML file such as ``{dilation: [1, 64, 1, 64], window: 0, sinks: 4}``
    (each an int or one int per layer; missing keys default to dense, no window, no sinks)."""
    import yaml

    from ..config.schema import PatternConfig

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"pattern file {path}: cannot read it ({e})") from None
    if not isinstance(data, dict) or set(data) - {"dilation", "window", "sinks"}:
        raise ValueError(f"pattern file {path}: expected a mapping with keys dilation, window, sinks; got {data!r}")
    for key, value in data.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(type(v) is int for v in values):
            raise ValueError(f"pattern file {path}: {key} must be an int or a list of ints, got {value!r}")
    try:
        PatternConfig(**data)
    except ValueError as e:
        raise ValueError(f"pattern file {path}: {e}") from None
    return data
