"""Generate from an HF folder of this model (or a training checkpoint, exported on the fly) with the compressed
(sparse) or full (dense) decode cache."""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..config.schema import pattern_fields, pattern_name


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    tokens_per_second: float
    cache_bytes: int
    pattern: str


def generate_text(model_dir: str | Path, prompt: str, *, max_new_tokens: int = 64,
                  pattern: tuple[int, int, int] | None = None, dense: bool = False,
                  tokenizer: str | Path | None = None) -> Generation:
    """Greedy continuation of ``prompt`` (encoded without BOS, as in training).

    ``model_dir`` is an HF folder or a training run (exported on the fly to a temporary folder). ``pattern``
    (D, W, P) overrides the folder's sparse pattern in every layer; ``dense`` decodes with dense attention and
    a full cache instead. ``tokenizer`` (a sentencepiece ``.model``) replaces the folder's or the run's own,
    and is needed where they have none. Loads offline and never asks a question: the folder's model code runs
    (trust_remote_code, as for every folder this package writes), a tokenizer is never loaded as code.
    Raises RatplusError (one line) for a folder without weights or tokenizer, or with damaged weights."""
    with hf_folder(model_dir, tokenizer=tokenizer) as folder:
        model, tokenizer = load_model(folder, pattern=pattern, tokenizer=tokenizer)
        return _generate(model, tokenizer, prompt, max_new_tokens, dense)


def _generate(model, tokenizer, prompt: str, max_new_tokens: int, dense: bool) -> Generation:
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ValueError("--prompt: the prompt encodes to no tokens")
    mode = "dense" if dense else "sparse"
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, attention_mode=mode, max_cache_len=ids.shape[1] + max_new_tokens,
                             return_dict_in_generate=True, pad_token_id=model.config.eos_token_id)
    seconds = time.perf_counter() - start
    new = out.sequences[0, ids.shape[1]:]
    layers = [tuple(p) for p in model.layer_patterns(mode)]
    return Generation(text=tokenizer.decode(new, skip_special_tokens=True), prompt_tokens=ids.shape[1],
                      new_tokens=len(new), tokens_per_second=len(new) / max(seconds, 1e-9),
                      cache_bytes=out.past_key_values.nbytes(), pattern=pattern_name(layers))


@contextlib.contextmanager
def hf_folder(path: str | Path, *, tokenizer: str | Path | None = None) -> Iterator[Path]:
    """``path`` itself when it is an HF folder (config.json), else the newest committed checkpoint of the
    training run or checkpoint ``path`` exported (fp32, with ``tokenizer`` or the run's own) to a temporary
    folder that lives as long as the context. Bad input is one RatplusError line naming the option."""
    from ..errors import RatplusError

    path = Path(path)
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise RatplusError(f"--tokenizer {tokenizer}: no such file")
    if (path / "config.json").is_file():
        yield path
        return
    from ..checkpoint import resolve_checkpoint, run_config
    from ..export.to_hf import export_hf

    try:
        checkpoint = resolve_checkpoint(path, key="--model")
    except ValueError:
        raise RatplusError(f"--model {path}: neither an HF folder (config.json) nor a training run or "
                           "checkpoint") from None
    tokenizer = tokenizer or run_config(checkpoint).data.tokenizer
    if not tokenizer:
        raise RatplusError(f"--model {path}: the run's config names no tokenizer (data.tokenizer); pass "
                           "--tokenizer PATH.model")
    if not Path(tokenizer).is_file():
        raise RatplusError(f"--model {path}: the run's tokenizer {tokenizer} is not there; pass "
                           "--tokenizer PATH.model")
    with tempfile.TemporaryDirectory() as tmp:
        yield export_hf(checkpoint, Path(tmp) / "hf", dtype=torch.float32, tokenizer=tokenizer)


def load_model(folder: str | Path, *, pattern: tuple | None = None, tokenizer: str | Path | None = None):
    """(model, tokenizer) of an HF folder, checked and loaded offline as :func:`generate_text` loads it."""
    folder = Path(folder)
    _check_weights(folder)
    return _load(folder, pattern, tokenizer)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def _check_weights(folder: Path) -> None:
    """Refuse, in one line and before transformers reads them, an HF folder whose safetensors are missing,
    truncated or damaged (their headers and sizes are checked; nothing is unpickled)."""
    from safetensors import SafetensorError, safe_open

    from ..errors import RatplusError

    index = folder / "model.safetensors.index.json"
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise RatplusError(f"--model {folder}: {index.name} cannot be read; export the folder again") from None
    names = names or ["model.safetensors"]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise RatplusError(f"--model {folder}: the HF folder has no {', '.join(missing)}; export it again "
                           "(ratplus export-hf, import-public)")
    for name in names:
        try:
            with safe_open(str(folder / name), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            reason = str(e).removeprefix("Error while deserializing header: ")
            raise RatplusError(f"--model {folder}: {name} is truncated or damaged ({reason}); export the folder "
                               "again") from None


def _load(folder: Path, pattern, tokenizer_model):
    """(model, tokenizer) of an HF folder; the tokenizer from ``tokenizer_model`` if given, else the folder's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..errors import RatplusError
    from ..export.hf_folder import sentencepiece_tokenizer

    overrides = pattern_fields(pattern) if pattern else {}
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, local_files_only=True,
                                                 **overrides).eval()
    if tokenizer_model is not None:
        return model, sentencepiece_tokenizer(Path(tokenizer_model))
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise RatplusError(f"--model {folder}: the folder has no tokenizer; pass --tokenizer PATH.model (the "
                           "sentencepiece model the run was trained with)")
    try:  # trust_remote_code=False: a tokenizer that would need code is refused, never asked about
        return model, AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RatplusError(f"--model {folder}: its tokenizer cannot be loaded ({first}); pass --tokenizer "
                           "PATH.model") from None
