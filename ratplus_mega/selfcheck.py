"""Build a config's reference model with random weights and check it end to end on this machine.

Runs a forward pass in dense and sparse attention, then prefills half a sequence and decodes the rest with the
compressed cache, and checks the decoded logits against the full forward (the cache's bookkeeping must
reproduce the training mask at every position). Used by ``ratplus info --check``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .config.schema import ModelConfig

MAX_CHECK_PARAMETERS = 300_000_000


@dataclass
class CheckReport:
    seq_len: int
    forward_seconds: dict[str, float]
    decode_tokens_per_second: float
    decode_max_error: float
    cache_bytes: int


def check_model(m: ModelConfig, *, seq_len: int | None = None, seed: int = 0) -> CheckReport:
    """Random-weight reference model of ``m`` (fp32, CPU or the current CUDA device)."""
    from .accounting import parameter_count
    from .hf.modeling_ratplus import RatPlusForCausalLM
    from .reference_layout import reference_config

    if parameter_count(m) > MAX_CHECK_PARAMETERS:
        raise ValueError(f"--check builds the model in fp32 on this machine; {parameter_count(m)} parameters is "
                         f"over the {MAX_CHECK_PARAMETERS} limit (try configs/model/tiny.yaml)")
    seq_len = min(seq_len or m.seq_len, m.seq_len)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = RatPlusForCausalLM(reference_config(m)).float().to(device).eval()
    tokens = torch.randint(0, m.vocab_size, (1, seq_len), device=device)
    timings, logits = {}, {}
    with torch.no_grad():
        for mode in ("dense", "sparse"):
            start = time.perf_counter()
            logits[mode] = model(tokens, attention_mode=mode).logits
            timings[mode] = time.perf_counter() - start
        prefix = seq_len // 2
        out = model(tokens[:, :prefix], use_cache=True, max_cache_len=seq_len)
        start = time.perf_counter()
        steps = [model(tokens[:, t:t + 1], past_key_values=out.past_key_values).logits for t in range(prefix, seq_len)]
        decode_seconds = time.perf_counter() - start
    decoded = torch.cat([out.logits, *steps], dim=1)
    error = ((decoded - logits["sparse"]).abs().max() / logits["sparse"].abs().max()).item()
    return CheckReport(seq_len=seq_len, forward_seconds=timings,
                       decode_tokens_per_second=(seq_len - prefix) / max(decode_seconds, 1e-9),
                       decode_max_error=error, cache_bytes=out.past_key_values.nbytes())
