"""The arithmetic of ``accounting.py`` (parameters, cache bytes, attended keys) against spec §1.3, §4.3 and §6.2
and against the reference model and the mask written out."""

from __future__ import annotations

import pytest
import torch

from ratplus_mega.accounting import attended_keys, cache_bytes, parameter_count
from ratplus_mega.config import CONFIG_ROOT, ModelConfig, load_config

pytestmark = pytest.mark.usefixtures("single_thread")

PRESETS = {name: CONFIG_ROOT / "model" / f"{name}.yaml" for name in ("tiny", "ratplus-1.5b", "ratplus-2.6b")}


@pytest.mark.parametrize("name,expected", [("ratplus-1.5b", 1_474_922_496), ("ratplus-2.6b", 2_651_077_120)],
                         ids=["1.5b", "2.6b"])
def test_parameter_count_matches_spec(name, expected):
    m = load_config(PRESETS[name]).model
    d, layers, vocab = m.hidden_size, m.num_layers, m.vocab_size
    assert parameter_count(m) == layers * (14 * d * d + 2 * d) + vocab * d + d == expected
    # The gated-attention baseline drops the d x d gate rows of every layer (spec §6.2: 13 d^2 + 2 d).
    baseline = load_config(PRESETS[name], ["model.apply_recurrence=false"]).model
    assert parameter_count(baseline) == layers * (13 * d * d + 2 * d) + vocab * d + d


def reference_config(m: ModelConfig):
    """The HF reference model's config for a ModelConfig, field by field."""
    from ratplus_mega.hf import RatPlusConfig

    return RatPlusConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                         num_attention_heads=m.num_heads, head_dim=m.head_dim, intermediate_size=m.ffn_hidden_size,
                         apply_recurrence=m.apply_recurrence)


@pytest.mark.parametrize("name,overrides", [
    ("tiny", []), ("tiny", ["model.apply_recurrence=false", "model.ffn_hidden_size=100"]),
    ("ratplus-1.5b", []), ("ratplus-2.6b", []),
], ids=["tiny", "tiny-norec-ffn100", "1.5b", "2.6b"])
def test_parameter_count_equals_reference_model_numel(name, overrides):
    from ratplus_mega.hf import RatPlusForCausalLM

    m = load_config(PRESETS[name], overrides).model
    with torch.device("meta"):
        model = RatPlusForCausalLM(reference_config(m))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert parameter_count(m) == sum(p.numel() for p in model.parameters())  # parameters() yields a tie once


CACHE_CASES = [(4, 3, 2, 64), (64, 0, 0, 4096), (16, 256, 4, 4096), (3, 5, 4, 97), (-1, 64, 4, 4096), (7, 0, 9, 100),
               (2, 1, 0, 1)]


@pytest.mark.parametrize("d,w,p,t", CACHE_CASES, ids=[f"D{d}-W{w}-P{p}-T{t}" for d, w, p, t in CACHE_CASES])
def test_cache_bytes_is_spec_minus_one_slot_per_layer(d, w, p, t):
    m = load_config(PRESETS["ratplus-1.5b"], [f"model.pattern.dilation={d}", f"model.pattern.window={w}",
                                               f"model.pattern.sinks={p}"]).model
    hidden, layers = m.hidden_size, m.num_layers
    slots = p + w + 1 + (t // d if d > 1 else 0)  # spec §4.3 N, with its scratch slot
    spec = layers * (4 * hidden * slots + 2 * 4 * hidden)  # bf16 K and V, fp32 state of k and v
    assert cache_bytes(m, t) == spec - layers * 4 * hidden
    assert cache_bytes(m, t, batch_size=3) == 3 * cache_bytes(m, t)


def test_cache_bytes_spec_table_rows():
    """Spec §4.3 table, 1B at T = 4096: dense 768 MiB of K/V; D=16, P=4: 262 slot-equivalents (49 MiB), which our
    layout also reaches, dropping the scratch slot but keeping the state in fp32 (two bf16 slots' worth)."""
    m = load_config(PRESETS["ratplus-1.5b"]).model
    dense = cache_bytes(m, 4096, patterns=[(1, 0, 0)] * 24)
    assert dense - 24 * 8 * 2048 == 768 * 2**20
    d16 = cache_bytes(m, 4096, patterns=[(16, 0, 4)] * 24)
    assert d16 == 24 * 4 * 2048 * 262 and round(d16 / 2**20) == 49


def mask_count(t, d, w, p) -> int:
    q, k = torch.arange(t)[:, None], torch.arange(t)[None, :]
    visible = (q - k <= w) | (k < p)
    if d != -1:
        visible |= (k + 1) % d == 0
    return int(((k <= q) & visible).sum())


KEY_CASES = [(37, 4, 3, 2), (64, 1, 0, 0), (64, 1, 5, 3), (97, 16, 0, 4), (50, -1, 4, 3), (50, 3, 0, 0),
             (20, 4, 2, 30), (33, 8, 40, 0), (128, 64, 0, 0), (45, -1, 0, 1)]


@pytest.mark.parametrize("t,d,w,p", KEY_CASES, ids=[f"T{t}-D{d}-W{w}-P{p}" for t, d, w, p in KEY_CASES])
def test_attended_keys_counts_the_mask(t, d, w, p):
    assert attended_keys(t, (d, w, p)) == mask_count(t, d, w, p)


def test_per_head_and_top_k_cache_bytes_equal_the_reference_models():
    """docs/spec.md §4.4, §4.5: each head's own cache geometry, top-k heads' pooled block keys included."""
    from ratplus_mega.hf import RatPlusForCausalLM
    from ratplus_mega.reference_layout import reference_config

    m = load_config(CONFIG_ROOT / "model" / "tiny.yaml", [
        "model.pattern.dilation=[[1,1,16,-1],[-1,-1,8,8]]", "model.pattern.window=[[0,0,0,8],2]",
        "model.pattern.sinks=4", "model.pattern.topk_blocks=[0,[4,0,0,3]]", "model.pattern.block_size=16"]).model
    with torch.device("meta"):
        ref = RatPlusForCausalLM(reference_config(m)).to(torch.bfloat16)
    for seq in (128, 100, 7):
        assert cache_bytes(m, seq) == ref.cache_nbytes(seq)
    # Layer 1, head 0: top-k over D = -1 keeps every position plus one pooled key per complete block.
    per_head = [2 * 128, 2 * 128, 2 * (4 + 128 // 16), 2 * (4 + 8)] + [2 * 128 + 8, 2 * (4 + 2), 2 * (4 + 2 + 16),
                                                                        2 * 128 + 8]
    assert cache_bytes(m, 128) == 2 * 16 * sum(per_head) + 2 * (2 * 4 * 64)


def test_per_head_flops_average_the_heads():
    from ratplus_mega.accounting import flops_per_token

    m = load_config(CONFIG_ROOT / "model" / "tiny.yaml", ["model.pattern.dilation=[[1,1,8,8],[1,1,8,8]]"]).model
    dense, sparse = flops_per_token(m, [(1, 0, 0)] * 2), flops_per_token(m, [(8, 0, 0)] * 2)
    assert flops_per_token(m, m.layer_patterns()) == pytest.approx((dense + sparse) / 2, abs=1)
