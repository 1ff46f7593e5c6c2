"""What a pickled file may hold, and loading it so that nothing else is ever built: no file is unpickled as code.

Every ``torch.save`` file this package reads (DeepSpeed's model and optimizer states, our per-rank state, a
public RAT+ checkpoint) is read by torch's weights-only unpickler, which builds tensors, plain containers and
the classes named in :data:`ALLOWED_GLOBALS`, and nothing else. This list is the only one: while this package
loads, the classes other libraries mark safe process-wide (megatron-core marks a dozen on import) are set aside.

Before a file is loaded its pickle is scanned (:func:`unlisted_globals`: the pickle only, not the tensor data)
and a file naming any other class or function is refused by name, so the refusal is one line and happens
before DeepSpeed opens anything. DeepSpeed's own loaders ask torch for ``weights_only=False``;
:func:`restricted_loads` overrides that for the duration of a call (torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from ..errors import RatplusError

__all__ = ["ALLOWED_GLOBALS", "FileRefused", "UnreadableFile", "allowed_objects", "restricted_loads", "safe_load",
           "unlisted_globals"]

ALLOWED_GLOBALS: tuple[str, ...] = (
    # DeepSpeed's ZeRO optimizer files (zero_pp_rank_N_mp_rank_XX_optim_states.pt); the model-states files and
    # our per-rank files (ratplus_rankNNNNN.pt) hold tensors and plain containers only.
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    # The public RAT+ trainer's checkpoints (ratplus import-public): its config and plain containers.
    "easydict.EasyDict",
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata", "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode",
    "omegaconf.nodes.IntegerNode", "omegaconf.nodes.FloatNode", "omegaconf.nodes.BooleanNode",
    "typing.Any", "collections.defaultdict",
    "builtins.dict", "builtins.list", "builtins.tuple", "builtins.set", "builtins.int", "builtins.float",
    "builtins.str", "builtins.bool",
)
"""The classes, besides torch's tensors and plain containers, that a file this package loads may hold."""

_STAND_INS = {"easydict.EasyDict": OrderedDict}
"""Classes read as another one. The weights-only unpickler fills only dict, OrderedDict and Counter, so the
public trainer's EasyDict config (a dict subclass with mirrored attributes) comes back as an OrderedDict, which
is all the importer reads of it; the easydict package is not needed."""

_READ_ERRORS = (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile)


class UnreadableFile(RatplusError):
    """A file that is not a whole ``torch.save`` archive (missing, truncated, damaged or of another format)."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


class FileRefused(RatplusError):
    """A file whose pickle names a class or function outside :data:`ALLOWED_GLOBALS`; nothing was loaded."""

    def __init__(self, path: Path, names: list[str]):
        self.path, self.names = Path(path), names
        super().__init__(f"{path} holds {', '.join(names)}, which no file loaded here may hold; it was not loaded "
                         "(only tensors, plain containers and the classes of ALLOWED_GLOBALS in "
                         "ratplus_mega/checkpoint/trust.py are ever unpickled)")


def unlisted_globals(path: str | Path) -> tuple[list[str], list[str]]:
    """``(found, unlisted)``: the classes and functions the pickle of ``torch.save`` file ``path`` names beyond
    torch's tensors and containers, and those of them outside :data:`ALLOWED_GLOBALS`. Reads the pickle only.

    Raises:
        UnreadableFile: the file is not a whole zip-format ``torch.save`` archive.
        FileRefused: the pickle uses opcodes ``torch.save`` never writes (so it cannot be scanned).
    """
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise UnreadableFile(path, "not a whole torch.save archive (no zip directory at its end: truncated, "
                                   "damaged or of another format)")
    try:
        with _only_listed_safe_globals([]):  # so that classes other libraries marked safe are reported too
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except pickle.UnpicklingError as e:  # e.g. "Unsupported operand 147": a hand-made pickle
        raise FileRefused(path, [f"a pickle torch.save does not write ({e})"]) from None
    except _READ_ERRORS as e:
        raise UnreadableFile(path, f"cannot be read as a torch.save archive ({_first_line(e)})") from None
    found = sorted(found)
    return found, [name for name in found if name not in ALLOWED_GLOBALS]


def allowed_objects(names: Iterable[str], *, path: Path | None = None) -> list:
    """The objects the weights-only unpickler needs for allow-listed ``names`` (stand-ins where listed).

    Raises ValueError when one cannot be imported here, saying which package provides it."""
    objects = []
    for name in names:
        if name not in ALLOWED_GLOBALS:
            raise ValueError(f"{name} is not in ALLOWED_GLOBALS")
        if name in _STAND_INS:
            objects.append((_STAND_INS[name], name))
            continue
        module, _, attr = name.rpartition(".")
        try:
            objects.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            where = f"checkpoint {path} holds {name}" if path else f"{name} is needed"
            raise ValueError(f"{where}; install the package that provides it (pip install "
                             f"{module.split('.')[0]}) to load it") from None
    return objects


@contextlib.contextmanager
def restricted_loads(names: Iterable[str] | None = None) -> Iterator[None]:
    """Within the block every ``torch.load`` is weights-only, also where the caller (DeepSpeed's loaders, its
    ``zero_to_fp32``) asks for ``weights_only=False``, and admits only torch's tensors and containers and the
    allow-listed ``names`` (as :func:`unlisted_globals` found them), or, by default, every allow-listed class
    that can be imported here."""
    if names is None:
        objects = []
        for name in ALLOWED_GLOBALS:
            with contextlib.suppress(ValueError):
                objects += allowed_objects([name])
    else:
        objects = allowed_objects(sorted(set(names)))
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with _only_listed_safe_globals(objects):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def safe_load(path: str | Path, map_location="cpu", *, mmap: bool = False):
    """``torch.load`` of ``path`` after :func:`unlisted_globals` admitted it; weights-only, allow-list only;
    ``mmap``: tensors stay in the file until read.

    Raises UnreadableFile or FileRefused (one line, naming the file) instead of torch's or zipfile's text."""
    path = Path(path)
    found, unlisted = unlisted_globals(path)
    if unlisted:
        raise FileRefused(path, unlisted)
    try:
        with restricted_loads(found):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise FileRefused(path, [_first_line(e)]) from None
    except _READ_ERRORS as e:
        raise UnreadableFile(path, f"cannot be read as a torch.save archive ({_first_line(e)})") from None


@contextlib.contextmanager
def _only_listed_safe_globals(objects: list) -> Iterator[None]:
    """Torch's process-wide list of extra safe globals holds exactly ``objects`` within the block."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(objects)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
