"""Generate from an HF folder of this model (or a training checkpoint, exported on the fly) with the compressed
(sparse) or full (dense) decode cache."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

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
                  pattern: tuple[int, int, int] | None = None, dense: bool = False) -> Generation:
    """Greedy continuation of ``prompt`` (encoded without BOS, as in training).

    ``pattern`` (D, W, P) overrides the folder's sparse pattern in every layer; ``dense`` decodes with dense
    attention and a full cache instead. Loads offline; the folder's own model code runs (trust_remote_code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        from ..checkpoint import resolve_checkpoint
        from ..export.to_hf import export_hf

        try:
            checkpoint = resolve_checkpoint(model_dir, key="--model")
        except ValueError:
            raise ValueError(f"--model {model_dir}: neither an HF folder (config.json) nor a training run or "
                             "checkpoint") from None
        with tempfile.TemporaryDirectory() as tmp:
            folder = export_hf(checkpoint, Path(tmp) / "hf", dtype=torch.float32)
            return generate_text(folder, prompt, max_new_tokens=max_new_tokens, pattern=pattern, dense=dense)
    overrides = pattern_fields(pattern) if pattern else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, local_files_only=True,
                                                 **overrides).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {model_dir}: no tokenizer in the folder ({e})") from None
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
