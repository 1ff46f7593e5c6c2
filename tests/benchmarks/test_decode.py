"""``benchmarks/decode.py`` measures what it claims: every pattern of the same model, rows for each context with
ratios to the dense row of the same run, cache bytes as the model allocates them, decoding through the
model's compressed cache from a cache filled by its own prefill."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.head_dim=8", "model.vocab_size=97"]


@pytest.fixture(scope="module")
def decode():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "decode.py"
    spec = importlib.util.spec_from_file_location("benchmark_decode", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_patterns_parse_to_the_layer_patterns_they_name(decode):
    from ratplus_mega.config import load_config
    from ratplus_mega.reference_layout import reference_config

    base = reference_config(load_config("configs/model/tiny.yaml", TINY).model)
    cases = {"16,256,4": (16, 256, 4), "-1,0,4,16,64": (-1, 0, 4, 16, 64, "max"),
             "1,0,0/64,0,0": ((1, 0, 0), (1, 0, 0), (64, 0, 0), (64, 0, 0)),
             "64,0,0/-1,0,4,3,8": ((64, 0, 0), (64, 0, 0), (-1, 0, 4, 3, 8, "max"), (-1, 0, 4, 3, 8, "max"))}
    for text, pattern in cases.items():
        model = decode.build_model(base, decode.parse_pattern(text, 4), torch.float32, "cpu")
        assert model.config.layer_patterns() == [pattern] * 2, text


def test_rows_cover_every_pattern_and_context_with_ratios_to_dense(decode, capsys):
    rows = decode.main(["--contexts", "48", "64", "--new-tokens", "2", "--max-batch", "2", "--prefill-max", "48",
                        "--patterns=1,0,0 8,4,2 -1,0,2,3,8 1,0,0/16,0,0", *TINY])
    out = capsys.readouterr().out
    assert [(r.pattern, r.context) for r in rows] == [
        (name, t) for name in ("dense", "D8-W4-P2", "D-1-W0-P2-top3x8", "heads:2xdense+2xD16-W0-P0") for t in (48, 64)]
    assert all(r.batch >= 1 and r.tokens_per_second > 0 for r in rows)
    assert [r.prefill_seconds is not None for r in rows] == [True, False] * 4
    dense = {r.context: r for r in rows if r.pattern == "dense"}
    for r in rows:  # the printed cache ratio is the dense row's bytes over this row's
        line = next(x for x in out.splitlines() if x.startswith(r.pattern) and f" {r.context} " in x)
        assert f"{dense[r.context].cache_bytes / r.cache_bytes:.2f}" in line.split()
    assert "commit" in out and "vs dense" in out


@pytest.mark.parametrize("pattern", ["1,0,0", "8,3,2", "4,0,5", "-1,2,1", "-1,2,1,3,4", "1,0,0/6,2,1"])
@pytest.mark.parametrize("length", [3, 30])
def test_simulated_prefill_leaves_what_a_real_prefill_leaves(decode, pattern, length):
    """The simulated prefill's bookkeeping (positions seen, grid-store fill, slots in use) equals a real prefill's
    of as many tokens, and the model then decodes the next position from it."""
    from ratplus_mega.config import load_config
    from ratplus_mega.reference_layout import reference_config

    base = reference_config(load_config("configs/model/tiny.yaml", [*TINY, "model.seq_len=40"]).model)
    model = decode.build_model(base, decode.parse_pattern(pattern, 4), torch.float32, "cpu")
    simulated = decode.fill_cache(model, 3, 40, length)
    with torch.no_grad():
        real = model(torch.zeros(3, length, dtype=torch.long), use_cache=True, max_cache_len=40).past_key_values
    for a, b in zip(simulated.layers, real.layers):
        assert a.length == b.length == length
        assert [(g.grid_len, g.filled(length)) for g in a.groups] == [(g.grid_len, g.filled(length)) for g in b.groups]
    assert simulated.nbytes() == model.cache_nbytes(40, 3)
    with torch.no_grad():
        out = model(torch.zeros(3, 1, dtype=torch.long), past_key_values=simulated)
    assert out.logits.shape == (3, 1, 97) and torch.isfinite(out.logits).all() and simulated.seen_tokens == length + 1
