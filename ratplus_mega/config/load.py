"""YAML → typed :class:`RunConfig`, with model presets and ``key.sub=value`` command-line overrides.

A run file is a partial ``RunConfig`` mapping. ``model.preset: NAME`` pulls in the ``model`` section of
``configs/model/NAME.yaml`` underneath the run file's own model fields. Every value remembers where it came
from (file and line, or the override), and a bad value stops the load with that place in the message.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .schema import ConfigError, RunConfig

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"
"""The repository's ``configs/`` folder (model presets are looked up in ``CONFIG_ROOT/model``)."""


class ConfigLoadError(ValueError):
    """A config could not be loaded; the message names the key, the rule and where the value came from."""


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Load a run config (or a model preset file) and apply ``key.sub=value`` overrides, then validate."""
    raw: dict = {}
    where: dict[str, str] = {}
    base_dir = Path.cwd()
    if path is not None:
        path = Path(path)
        raw, where = _read_yaml(path)
        base_dir = path.resolve().parent
    for item in overrides:
        _apply_override(raw, where, item)
    model = raw.get("model")
    if isinstance(model, dict) and model.get("preset"):
        raw["model"] = _resolve_preset(model, where, base_dir, seen=())
    try:
        cfg = _build(RunConfig, raw, "")
        return cfg.validate()
    except ConfigError as e:
        raise ConfigLoadError(f"invalid config value {e.key!r}{_place(where, e.key)}: {e.message}") from None


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML, for logs and checkpoints.

    Every field is written out, so the dump loads back on any machine without its preset file; the preset's
    name is kept in a comment (and ``model.preset`` is empty in the reloaded config).
    """
    data = dataclasses.asdict(cfg)
    preset = data["model"].pop("preset")
    header = f"# model preset: {preset}\n" if preset else ""
    return header + yaml.safe_dump(data, sort_keys=False)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'a.b=3'`` → ``(['a', 'b'], 3)``; the value is parsed as YAML (numbers, booleans, lists)."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigLoadError(f"override {item!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigLoadError(f"override {item!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def _apply_override(raw: dict, where: dict[str, str], item: str) -> None:
    keys, value = parse_override(item)
    node = raw
    for i, k in enumerate(keys[:-1]):
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigLoadError(f"override {item!r}: {'.'.join(keys[: i + 1])} is not a section")
    node[keys[-1]] = value
    place = f" (from the override {item!r})"
    where[".".join(keys)] = place
    for i in range(1, len(keys)):  # an error on a section the override created (an unknown one) names it too
        where.setdefault(".".join(keys[:i]), place)


def _read_yaml(path: Path) -> tuple[dict, dict[str, str]]:
    """Parse YAML keeping the line of every key, so errors can point at ``file:line``."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigLoadError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigLoadError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigLoadError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    where: dict[str, str] = {}
    _record_lines(node, "", path, where)
    return data, where


def _record_lines(node: yaml.Node, prefix: str, path: Path, where: dict[str, str]) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        key = f"{prefix}{key_node.value}"
        where[key] = f" ({path}:{key_node.start_mark.line + 1})"
        _record_lines(value_node, key + ".", path, where)


def _resolve_preset(model: dict, where: dict[str, str], base_dir: Path, seen: tuple) -> dict:
    name = model["preset"]
    if not isinstance(name, str):
        raise ConfigLoadError(f"model.preset{_place(where, 'model.preset')}: expected a name or path, got {name!r}")
    candidates = [base_dir / name] if name.endswith((".yaml", ".yml")) or "/" in name else [
        base_dir.parent / "model" / f"{name}.yaml",
        base_dir / f"{name}.yaml",
        CONFIG_ROOT / "model" / f"{name}.yaml",
    ]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        tried = ", ".join(dict.fromkeys(str(c.resolve()) for c in candidates))
        raise ConfigLoadError(f"model.preset{_place(where, 'model.preset')}: no preset {name!r} (looked for {tried})")
    if path.resolve() in seen:
        raise ConfigLoadError(f"model.preset: presets include each other in a cycle at {path}")
    preset_raw, preset_where = _read_yaml(path)
    base = preset_raw.get("model", {})
    if set(preset_raw) - {"model"} or not isinstance(base, dict):
        raise ConfigLoadError(f"{path}: a model preset holds only a 'model' section")
    for key, place in preset_where.items():
        where.setdefault(key, place)
    if base.get("preset"):
        base = _resolve_preset(base, where, path.parent, seen + (path.resolve(),))
    merged = _deep_merge(base, {k: v for k, v in model.items() if k != "preset"})
    merged["preset"] = name
    return merged


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _place(where: dict[str, str], key: str) -> str:
    key = key.split("[")[0]
    while key:
        if key in where:
            return where[key]
        key = key.rpartition(".")[0]
    return ""


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, checking every key and type."""
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip(".") or "<root>", f"expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown key (known keys: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e.key}", e.message) from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1 or any(dataclasses.is_dataclass(a) for a in args):
            raise errors[0]
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-6" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    return getattr(tp, "__name__", str(tp))
