"""Write a self-contained HuggingFace folder of the reference model (docs/checkpoints.md, "Export: the HF folder").

The folder holds ``config.json`` (with ``auto_map`` to the copied model code), ``configuration_ratplus.py``,
``modeling_ratplus.py`` and ``cache_layout.py`` verbatim, the weights as safetensors (tied embedding stored
once, sharded above a size limit with ``model.safetensors.index.json``), ``generation_config.json`` (eos 2,
pad = eos) and, given a sentencepiece model, tokenizer files with ``add_bos_token=false`` that are checked to
give sentencepiece's ids. Everything is written into a temporary sibling folder that is renamed at the end,
so a crash never leaves a partial folder under the final name.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from ..hf import RatPlusConfig, RatPlusForCausalLM

__all__ = ["AUTO_MAP", "DEFAULT_MAX_SHARD_BYTES", "sentencepiece_tokenizer", "write_hf_folder"]

AUTO_MAP = {
    "AutoConfig": "configuration_ratplus.RatPlusConfig",
    "AutoModelForCausalLM": "modeling_ratplus.RatPlusForCausalLM",
}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
_CODE_DIR = Path(__file__).resolve().parents[1] / "hf"
_CODE_FILES = ("cache_layout.py", "configuration_ratplus.py", "modeling_ratplus.py")
_TIED = "lm_head.weight"
_EMBEDDING = "model.embed_tokens.weight"
# Texts the written tokenizer must encode exactly as sentencepiece does: leading, repeated and trailing
# whitespace, newlines and tabs, digits, non-Latin scripts and bytes that only byte fallback can encode.
_PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.", "  two  spaces and   three", " leading", "trailing ",
    "line one\nline two\n\n\tindented", "1234567890 3.14159", "über naïve façade 日本語 ☃ 🙂", "",
)


def write_hf_folder(
    out_dir: str | Path,
    config: RatPlusConfig,
    state_dict: Mapping[str, torch.Tensor],
    tokenizer_model: Path | None = None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write the HF folder ``out_dir`` for ``config`` with the reference model's ``state_dict``.

    Args:
        state_dict: the reference model's tensors by name (``RatPlusForCausalLM.state_dict()`` names);
            ``lm_head.weight`` may be present (it must then equal the embedding) or absent.
        tokenizer_model: a sentencepiece ``.model``; None writes no tokenizer.
        dtype: dtype of the floating-point weights on disk (``config.json``'s ``torch_dtype``).
        max_shard_bytes: safetensors files stay below this size (one tensor larger than it gets a file alone).
        overwrite: replace an existing ``out_dir`` (only once the new folder is complete).
    Returns:
        ``out_dir`` as a Path.
    Raises:
        ValueError: missing, unknown or mis-shaped tensors (named), an untied head, an existing ``out_dir``
            without ``overwrite``, or a tokenizer whose HF form encodes differently from sentencepiece.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir} already exists; choose another folder or pass overwrite=True")
    tensors = _checked_tensors(config, state_dict, dtype)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _write_config(tmp, config, dtype)
        for name in _CODE_FILES:
            shutil.copyfile(_CODE_DIR / name, tmp / name)
        _write_weights(tmp, tensors, max_shard_bytes)
        if tokenizer_model is not None:
            _write_tokenizer(tmp, Path(tokenizer_model))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _checked_tensors(config: RatPlusConfig, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype):
    """The tensors to save, in the model's order, without the tied head; checks names and shapes."""
    with torch.device("meta"):
        expected = RatPlusForCausalLM(config).state_dict()
    expected.pop(_TIED)
    given = dict(state_dict)
    head = given.pop(_TIED, None)
    missing = [k for k in expected if k not in given]
    unknown = [k for k in given if k not in expected]
    if missing or unknown:
        raise ValueError(f"state dict does not match the RAT+ config: missing {missing or 'none'}, "
                         f"unknown {unknown or 'none'}")
    for name, ref in expected.items():
        if tuple(given[name].shape) != tuple(ref.shape):
            raise ValueError(f"{name}: shape {tuple(given[name].shape)}, the config needs {tuple(ref.shape)}")
    if head is not None and not torch.equal(head.to(given[_EMBEDDING].dtype), given[_EMBEDDING]):
        raise ValueError(f"{_TIED} differs from {_EMBEDDING}: RAT+ ties the LM head to the embedding")
    return {name: _disk_tensor(given[name], dtype) for name in expected}


def _disk_tensor(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.detach().to("cpu")
    return (t.to(dtype) if t.is_floating_point() else t).contiguous()


def _write_config(folder: Path, config: RatPlusConfig, dtype: torch.dtype) -> None:
    from transformers import GenerationConfig

    config = copy.deepcopy(config)  # the caller's config stays untouched
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["RatPlusForCausalLM"]
    config.dtype = dtype  # written as "dtype" (transformers >= 4.56 reads it; older ones ignore it)
    config.save_pretrained(folder)
    eos = config.eos_token_id
    GenerationConfig(eos_token_id=eos, pad_token_id=eos, bos_token_id=None).save_pretrained(folder)


def _write_weights(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def sentencepiece_tokenizer(model_file: Path):
    """The fast LLaMA tokenizer of a sentencepiece model, as the folder stores it; no BOS is added (spec §5.1)."""
    from transformers import LlamaTokenizerFast

    if not Path(model_file).is_file():
        raise ValueError(f"tokenizer {model_file}: no such file")
    # legacy=True with add_prefix_space=True is the conversion that keeps sentencepiece's dummy prefix and
    # whitespace handling (the non-legacy one drops the prefix of a leading space).
    return LlamaTokenizerFast(vocab_file=str(model_file), add_bos_token=False, add_eos_token=False, legacy=True,
                              add_prefix_space=True, from_slow=True)


def _write_tokenizer(folder: Path, model_file: Path) -> None:
    """Slow and fast LLaMA tokenizer files for a sentencepiece model, checked against sentencepiece."""
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizer

    sentencepiece_tokenizer(model_file).save_pretrained(folder)
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    for cls in (AutoTokenizer, LlamaTokenizer):
        tok = cls.from_pretrained(folder)
        for text in _PROBE_TEXTS:
            got, ref = tok(text)["input_ids"], sp.encode(text)
            if got != ref:
                raise ValueError(
                    f"tokenizer {model_file}: the written {type(tok).__name__} encodes {text!r} as {got}, "
                    f"sentencepiece as {ref}. Fast tokenizers reproduce sentencepiece only for models trained with "
                    "normalization_rule_name=identity and remove_extra_whitespaces=False.")


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old)
