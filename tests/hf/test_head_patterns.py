"""Per-head patterns (docs/spec.md §4.4): attention, the model's forward, decoding with per-head cache
geometry, cache bytes, generate() and the config, each against an fp64 oracle with an explicit per-head
boolean mask (tests/hf/conftest.py)."""

from __future__ import annotations

import json

import pytest
import torch

from ratplus_mega.hf import RatPlusConfig, RatPlusForCausalLM
from ratplus_mega.hf.cache_layout import cache_slots, head_groups
from ratplus_mega.hf.modeling_ratplus import attention

pytestmark = pytest.mark.usefixtures("single_thread")

FP32_VALUES, FP32_GRADS = 1e-5, 1e-4  # docs/decisions.md "Tests"
SEQ = 29
HEADS4 = dict(hidden_size=32, num_attention_heads=4, head_dim=8)

# Layer 1's groups are contiguous; layer 2's are not ({D4: heads 0, 3}, {D1: 1}, {D-1: 2}), so the cache and the
# attention must put heads back in order.
CONFIGS = {
    "heads": dict(dilation=[[1, 4, 4, -1], [4, 1, -1, 4]], window=[[0, 0, 3, 2], [2, 0, 3, 2]],
                  sinks=[[0, 2, 2, 1], 1], **HEADS4),
    "layer-and-heads": dict(dilation=[3, [1, 1, 8, 8]], window=[2, [0, 0, 1, 1]], sinks=[1, 2], **HEADS4),
    "heads-norec": dict(dilation=[[2, 5, 5, 2], 4], window=1, sinks=[[0, 0, 3, 3], 0], apply_recurrence=False,
                        **HEADS4),
}


@pytest.fixture(scope="module")
def models(tiny_model):
    return {name: tiny_model(seed=10 + i, **kw) for i, (name, kw) in enumerate(CONFIGS.items())}


def ids_for(model, batch=2, t=SEQ, seed=0):
    return torch.randint(0, model.config.vocab_size, (batch, t), generator=torch.Generator().manual_seed(seed))


def patterns_of(model, mode):
    return [(1, 0, 0)] * model.config.num_hidden_layers if mode == "dense" else model.config.layer_patterns()


ATTENTION_CASES = {
    "two-groups": ((1, 0, 0), (1, 0, 0), (4, 3, 2), (4, 3, 2)),
    "interleaved": ((4, 2, 1), (-1, 3, 0), (4, 2, 1), (3, 0, 5)),
    "all-differ": ((2, 0, 0), (5, 1, 3), (-1, 6, 2), (1, 0, 0)),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_per_head_attention_matches_explicit_per_head_mask(assert_close, oracle, case):
    pattern = ATTENTION_CASES[case]
    g = torch.Generator().manual_seed(len(case))
    q, k, v = (torch.randn(2, 4, 23, 8, generator=g).requires_grad_() for _ in range(3))
    out = attention(q, k, v, pattern)
    ref_q, ref_k, ref_v = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = oracle.attention(ref_q, ref_k, ref_v, pattern)
    assert_close("out", out, ref, FP32_VALUES)
    dout = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * dout.double()).sum(), (ref_q, ref_k, ref_v))
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, got, want, FP32_GRADS)


def test_per_head_attention_with_q_offset(assert_close, oracle):
    pattern = ((4, 2, 1), (-1, 3, 0), (4, 2, 1), (1, 0, 0))
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 4, 9, 8, generator=g), torch.randn(1, 4, 30, 8, generator=g), torch.randn(1, 4, 30, 8,
                                                                                                   generator=g)
    out = attention(q, k, v, pattern, q_offset=21)
    assert_close("out", out, oracle.attention(q, k, v, pattern, q_offset=21), FP32_VALUES)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_forward_matches_oracle(assert_close, oracle, models, config, mode):
    model = models[config]
    ids = ids_for(model)
    with torch.no_grad():
        logits = model(ids, attention_mode=mode).logits
    assert_close("logits", logits, oracle.logits(model, ids, patterns_of(model, mode)), FP32_VALUES)


def test_per_head_pattern_changes_the_logits(oracle, models):
    """Guards the comparisons: giving every head layer 0's first head pattern changes the logits."""
    model = models["heads"]
    ids = ids_for(model)
    with torch.no_grad():
        logits = model(ids).logits.double()
    uniform = [(p[0] if isinstance(p[0], tuple) else p) for p in model.config.layer_patterns()]
    assert (logits - oracle.logits(model, ids, uniform)).abs().max() > 1e-3


DECODE_CASES = [(c, n) for c in CONFIGS for n in (1, 6, 17)]


@pytest.mark.parametrize("config,prefill", DECODE_CASES, ids=[f"{c}-prefill{n}" for c, n in DECODE_CASES])
def test_prefill_then_decode_matches_oracle_at_every_position(assert_close, oracle, models, config, prefill):
    model = models[config]
    ids = ids_for(model, seed=prefill)
    ref = oracle.logits(model, ids, patterns_of(model, "sparse"))
    with torch.no_grad():
        out = model(ids[:, :prefill], use_cache=True, max_cache_len=SEQ)
        cache = out.past_key_values
        assert_close("prefill logits", out.logits, ref[:, :prefill], FP32_VALUES)
        for t in range(prefill, SEQ - 3):
            step = model(ids[:, t:t + 1], past_key_values=cache)
            assert_close(f"step logits at position {t}", step.logits[:, 0], ref[:, t], FP32_VALUES)
        last = model(ids[:, SEQ - 3:], past_key_values=cache)
        assert_close("last three positions", last.logits, ref[:, SEQ - 3:], FP32_VALUES)


def test_heads_with_different_patterns_keep_caches_of_different_lengths(models):
    """Layer 0 of "heads": D1 (dense, every position), D4-W0-P2, D4-W3-P2, D-1-W2-P1 (window and sinks); layer
    1 groups heads 0 and 3."""
    model = models["heads"]
    layers = model.new_cache(3, SEQ).layers
    lengths = {g.pattern: (g.heads, tuple(g.kv.shape)) for g in layers[0].groups}
    assert lengths == {
        (1, 0, 0): ([0], (2, 3, 1, SEQ, 8)),
        (4, 0, 2): ([1], (2, 3, 1, 2 + SEQ // 4, 8)),
        (4, 3, 2): ([2], (2, 3, 1, 2 + 3 + SEQ // 4, 8)),
        (-1, 2, 1): ([3], (2, 3, 1, 1 + 2, 8)),
    }
    assert [(g.heads, g.kv.shape[-2]) for g in layers[1].groups] == [([0, 3], 1 + 2 + 7), ([1], SEQ), ([2], 1 + 3)]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("seq_len,batch", [(29, 2), (64, 1)])
def test_cache_nbytes_is_each_heads_own_geometry(models, config, seq_len, batch):
    """cache_nbytes equals what new_cache allocates and the sum over heads of each head's own slots (spec
    §4.3 per head: P + W + T // D; dense T; D = -1 P + W) plus the fp32 state."""
    model = models[config]
    cfg = model.config
    cache = model.new_cache(batch, seq_len)
    allocated = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.tensors())
    assert model.cache_nbytes(seq_len, batch) == allocated == cache.nbytes()
    expected = 0
    for pattern in cfg.layer_patterns():
        heads = pattern if isinstance(pattern[0], tuple) else [pattern] * cfg.num_attention_heads
        for d, w, p in heads:
            slots = seq_len if d == 1 else min(p, seq_len) + min(w, seq_len) + (seq_len // d if d > 1 else 0)
            expected += 2 * 4 * cfg.head_dim * min(slots, seq_len)
        expected += 2 * 4 * cfg.hidden_size if cfg.apply_recurrence else 0
    assert model.cache_nbytes(seq_len, batch) == batch * expected


def test_generate_equals_argmax_chain(models):
    model = models["heads"]
    prompt = ids_for(model, batch=2, t=9, seed=3)
    seq = prompt.clone()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             pad_token_id=model.config.eos_token_id)
        for _ in range(12):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1)[:, None]], dim=1)
    assert torch.equal(out, seq)


def test_config_round_trips_through_json_and_groups_heads(models):
    cfg = models["heads"].config
    again = RatPlusConfig(**json.loads(cfg.to_json_string()))
    assert again.layer_patterns() == cfg.layer_patterns()
    assert head_groups(cfg.layer_patterns()[1], 4) == [((4, 2, 1), [0, 3]), ((1, 0, 1), [1]), ((-1, 3, 1), [2])]
    assert cache_slots((4, 2, 1), 29) == 1 + 2 + 7


@pytest.mark.parametrize("overrides,match", [
    (dict(dilation=[[1, 4, 4], 1]), r"dilation\[0\]: a per-head list needs 4 entries, got 3"),
    (dict(window=[[0, 0, 0, 0, 1], 0]), r"window\[0\]: a per-head list needs 4 entries, got 5"),
    (dict(dilation=[[1, 4, 0, 4], 1]), "bad sparse pattern D=0"),
])
def test_hf_config_refuses_bad_per_head_lists(tiny_config, overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**HEADS4, **overrides)


def test_meta_device_cache_nbytes_for_a_1p5b_shaped_per_head_model(tiny_config):
    """Half the heads dense, half D = 64 in every layer: bf16, T = 4096."""
    heads = [1] * 8 + [64] * 8
    cfg = tiny_config(vocab_size=32000, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                      head_dim=128, max_position_embeddings=4096, dilation=[heads] * 24)
    with torch.device("meta"):
        model = RatPlusForCausalLM(cfg).to(torch.bfloat16)
    per_layer = 2 * 2 * 128 * (8 * 4096 + 8 * 64) + 2 * 4 * 2048
    assert model.cache_nbytes(4096, 2) == 2 * 24 * per_layer
