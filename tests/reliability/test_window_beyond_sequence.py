"""A window or sink count beyond the sequence costs what dense costs, no more: ``ratplus info``'s table, its
``--check`` and the decode cache cap W and P at the sequence (at decode: the prompt plus the new tokens), and
``info`` names a pattern that is dense in effect. Before: ``--pattern 8,100000,4`` on the tiny preset reported
51,211,264 cache bytes per sequence, 769.4x dense, and ``--check`` allocated that."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
DENSE_TINY_CACHE = 66560  # the tiny preset (2 layers x 64, seq 128): bf16 keys/values + fp32 recurrence state


def ratplus(*args):
    return subprocess.run([sys.executable, "-m", "ratplus_mega.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def table(stdout: str) -> list[tuple[str, float, int, float]]:
    """(pattern name, FLOPs ratio, cache bytes, cache ratio) of each row of ``ratplus info``'s table, in order."""
    rows = []
    for line in stdout.splitlines():
        m = re.fullmatch(r"(.+?)\s+(\d+)\s+([\d.]+)\s+(\d+)\s+([\d.]+)", line.strip())
        if m:
            rows.append((m.group(1), float(m.group(3)), int(m.group(4)), float(m.group(5))))
    return rows


def test_info_caps_window_and_sinks_at_the_sequence_and_says_dense_in_effect():
    res = ratplus("info", "--config", "configs/model/tiny.yaml", "--pattern", "8,100000,4", "--pattern", "4,3,200",
                  "--pattern=-1,500,0", "--pattern", "8,16,4")
    assert res.returncode == 0, res.stderr
    # rows: dense, the preset's own D=8 pattern, then the four asked for
    dense, _, *beyond, sparse = table(res.stdout)
    assert dense[1:] == (1.0, DENSE_TINY_CACHE, 1.0)
    for name, *cost in beyond:
        assert cost == [1.0, DENSE_TINY_CACHE, 1.0], (name, res.stdout)
        assert f"{name} is dense in effect at seq 128: every query sees every earlier key" in res.stdout
    name, flops, cache, _ = sparse  # a real sparse pattern keeps its smaller cost and is not named
    assert flops < 1 and cache == 19456 and f"{name} is dense" not in res.stdout


def test_info_names_the_layers_that_are_dense_in_effect():
    res = ratplus("info", "--config", "configs/model/tiny.yaml", "model.pattern.dilation=[4,4]",
                  "model.pattern.window=[0,127]")
    assert res.returncode == 0, res.stderr
    assert re.search(r"is dense in effect in layer 1 at seq 128", res.stdout), res.stdout


def test_check_allocates_no_more_than_dense():
    res = ratplus("info", "--config", "configs/model/tiny.yaml", "model.pattern.window=100000", "--check")
    assert res.returncode == 0, res.stderr
    fp32_dense = 2 * (2 * 4 * 64 * 128 + 2 * 4 * 64)  # layers x (fp32 keys+values x 128 slots + fp32 state)
    assert f"with a {fp32_dense}-byte compressed cache" in res.stdout, res.stdout


BEYOND = {"window": (4, 10**6, 2), "sinks": (4, 0, 10**6), "no-grid-window": (-1, 10**6, 0),
          "window-plus-sinks": (3, 15, 6)}


@pytest.mark.parametrize("case", list(BEYOND), ids=list(BEYOND))
def test_decode_cache_is_capped_at_prompt_plus_new_tokens_and_decodes_as_dense(tiny_model, assert_close, case):
    """max_cache_len = prompt + new tokens = 20: the cache holds 20 slots per layer, as dense does, and every
    decoded position's logits equal the dense forward pass (the pattern is dense in effect there)."""
    dilation, window, sinks = BEYOND[case]
    model = tiny_model(dilation=dilation, window=window, sinks=sinks)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    assert model.new_cache(2, 20).nbytes() == model.new_cache(2, 20, "dense").nbytes() == model.cache_nbytes(20, 2)
    with torch.no_grad():
        dense = model(ids, attention_mode="dense").logits
        out = model(ids[:, :5], use_cache=True, max_cache_len=20)
        steps = [model(ids[:, t:t + 1], past_key_values=out.past_key_values).logits for t in range(5, 20)]
    assert_close("decoded logits", torch.cat([out.logits, *steps], dim=1), dense, 1e-5)


def test_a_partly_capped_cache_still_decodes_its_pattern(tiny_model, assert_close):
    """W + P beyond max_len - 1 only in the early part: the ring wraps and grid keys move out, as uncapped."""
    model = tiny_model(dilation=4, window=12, sinks=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :2], use_cache=True, max_cache_len=40)
        steps = [model(ids[:, t:t + 1], past_key_values=out.past_key_values).logits for t in range(2, 40)]
    assert_close("decoded logits", torch.cat([out.logits, *steps], dim=1), full, 1e-5)
    assert model.new_cache(1, 10).nbytes() == model.new_cache(1, 10, "dense").nbytes()


def test_cache_slots_has_one_home_and_info_stays_light():
    """The reference model's torch-free ``cache_layout`` is the only definition; accounting re-exports it, and
    ``ratplus info`` reads it without importing torch or transformers."""
    from ratplus_mega import accounting
    from ratplus_mega.hf import cache_layout, modeling_ratplus

    assert accounting.cache_slots is cache_layout.cache_slots is modeling_ratplus.cache_slots
    code = ("import sys; from ratplus_mega.cli import main; "
            "main(['info', '--config', 'configs/model/tiny.yaml', '--pattern', '8,100000,4']); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("[]"), res.stdout + res.stderr


def test_dense_in_effect_agrees_with_counting_the_attended_keys():
    from ratplus_mega.accounting import DENSE, attended_keys, cache_slots, dense_in_effect

    for seq in range(1, 13):
        for dilation in (-1, 2, 3, 4):
            for window in range(0, 14):
                for sinks in range(0, 14):
                    p = (dilation, window, sinks)
                    assert dense_in_effect(p, seq) == (attended_keys(seq, p) == attended_keys(seq, DENSE)), (p, seq)
                    assert cache_slots(p, seq) <= seq
