"""Top-k block attention (docs/spec.md §4.5): attention, the model's forward and decoding with the block-summary
cache, against an fp64 oracle that makes the same selection itself, block by block, and applies it as an
explicit boolean mask (tests/hf/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from ratplus_mega.hf.modeling_ratplus import attention, topk_attention, topk_attention_fused

pytestmark = pytest.mark.usefixtures("single_thread")

FP32_VALUES, FP32_GRADS = 1e-5, 1e-4  # docs/decisions.md "Tests"
# The oracle's weakest taken block must beat the strongest left out by this much (see Selection): the model's
# fp32 block scores are about 1e-6 off the oracle's fp64 ones at these sizes.
DECISIVE = 1e-5
SEQ = 29

# (T, head pattern): pure top-k (D = -1, no window), with sinks and window, the "dilated" variant (grid keys
# of the blocks not selected), mean pooling, K = 2 (first and own block only), blocks of 1, T a multiple of S.
ATTENTION_CASES = {
    "K3-S4": (37, (-1, 0, 0, 3, 4, "max")),
    "K4-S4-W2-P1": (37, (-1, 2, 1, 4, 4, "max")),
    "K3-S5-D4-dilated": (41, (4, 0, 0, 3, 5, "max")),
    "K4-S3-mean": (30, (-1, 1, 0, 4, 3, "mean")),
    "K2-S6": (31, (-1, 0, 2, 2, 6, "max")),
    "K5-S1": (17, (-1, 0, 0, 5, 1, "max")),
    "K3-S8-T32": (32, (-1, 0, 0, 3, 8, "mean")),
}


def qkv(t, seed, heads=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, heads, t, 8, generator=g) for _ in range(3)]


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_topk_attention_matches_oracle_selection_and_mask(assert_close, oracle, case):
    t, pattern = ATTENTION_CASES[case]
    q, k, v = (x.requires_grad_() for x in qkv(t, seed=t))
    ref_q, ref_k, ref_v = (x.detach().double().requires_grad_() for x in (q, k, v))
    selection = oracle.Selection()
    ref = oracle.attention(ref_q, ref_k, ref_v, pattern, selection=selection)
    assert selection.min_gap > DECISIVE, f"seed gives a near-tie ({selection.min_gap}); pick another"
    for block_queries in (128, 5):
        out = topk_attention(q, k, v, pattern, block_queries=block_queries)
        assert_close(f"out (query blocks of {block_queries})", out, ref, FP32_VALUES)
    assert_close("out through attention()", attention(q, k, v, pattern), ref, FP32_VALUES)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * dout).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * dout.double()).sum(), (ref_q, ref_k, ref_v))
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, got, want, FP32_GRADS)


@pytest.fixture
def fused_on_cpu(kernels, monkeypatch):
    """``attention()`` takes its CUDA route on CPU tensors: the fused kernels under the Triton interpreter."""
    import ratplus_mega.hf.modeling_ratplus as modeling

    monkeypatch.setattr(modeling, "_fused", lambda name, tensor: getattr(kernels, name))
    return kernels


def assert_matches(assert_close, out, ref, inputs, ref_inputs):
    """Values and the gradients of q, k, v of ``out`` against the fp64 ``ref``."""
    assert_close("out", out.cpu(), ref, FP32_VALUES)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * dout.to(out.device)).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * dout.double()).sum(), ref_inputs)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, got.cpu(), want, FP32_GRADS)


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_fused_topk_attention_matches_oracle(assert_close, oracle, fused_on_cpu, device, case):
    """``attention()``'s fused route (the (D, W, P) kernel plus the selected-blocks kernel, merged by LSE)
    against the same oracle."""
    t, pattern = ATTENTION_CASES[case]
    q, k, v = (x.to(device).requires_grad_() for x in qkv(t, seed=t))
    ref_inputs = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    assert_matches(assert_close, attention(q, k, v, pattern), oracle.attention(*ref_inputs, pattern), (q, k, v),
                   ref_inputs)


def test_fused_topk_attention_of_a_later_chunk(assert_close, oracle, kernels, device):
    """Queries after a prefix (chunked prefill), the selection in chunks of 3 queries; the LSE is returned."""
    _, pattern = ATTENTION_CASES["K4-S4-W2-P1"]
    g = torch.Generator().manual_seed(9)
    q, k, v = torch.randn(1, 2, 7, 8, generator=g), torch.randn(1, 2, 33, 8, generator=g), torch.randn(1, 2, 33, 8,
                                                                                                   generator=g)
    inputs = [x.to(device).requires_grad_() for x in (q, k, v)]
    ref_inputs = [x.double().requires_grad_() for x in (q, k, v)]
    out, lse = topk_attention_fused(*inputs, pattern, q_offset=26, return_lse=True, select_queries=3,
                                    kernels=(kernels.sparse_attention, kernels.block_attention))
    _, ref_lse = topk_attention(q, k, v, pattern, q_offset=26, return_lse=True)
    assert_close("lse", lse.detach().cpu(), ref_lse, FP32_VALUES)
    assert_matches(assert_close, out, oracle.attention(*ref_inputs, pattern, q_offset=26), inputs, ref_inputs)


def test_selection_matters(oracle):
    """Guards the comparisons: the oracle's top-k mask differs from (D, W, P) alone and from every block."""
    t, pattern = ATTENTION_CASES["K3-S4"]
    q, k, _ = (x.double() for x in qkv(t, seed=t))
    mask = oracle.mask(q[0, 0], k[0, 0], pattern)
    base = oracle.mask(q[0, 0], k[0, 0], pattern[:3])
    causal = torch.ones(t, t).tril().bool()
    assert (mask & ~base).any() and (causal & ~mask).any()


def test_q_offset_queries_a_later_chunk(assert_close, oracle):
    _, pattern = ATTENTION_CASES["K4-S4-W2-P1"]
    g = torch.Generator().manual_seed(9)
    q, k, v = torch.randn(1, 2, 7, 8, generator=g), torch.randn(1, 2, 33, 8, generator=g), torch.randn(1, 2, 33, 8,
                                                                                                   generator=g)
    out = topk_attention(q, k, v, pattern, q_offset=26)
    assert_close("out", out, oracle.attention(q, k, v, pattern, q_offset=26), FP32_VALUES)


HEADS4 = dict(hidden_size=32, num_attention_heads=4, head_dim=8)
CONFIGS = {
    "topk-K3-S4": dict(dilation=-1, sinks=1, topk_blocks=3, block_size=4),
    "topk-dilated-mean": dict(dilation=[4, 8], window=1, topk_blocks=4, block_size=3, block_score="mean"),
    "heads-topk": dict(dilation=[[-1, 4, -1, 1], [-1, -1, 2, 2]], window=[[0, 2, 1, 0], 1],
                       topk_blocks=[[3, 0, 4, 0], [3, 3, 0, 0]], block_size=5, **HEADS4),
    "topk-norec": dict(dilation=-1, window=2, topk_blocks=3, block_size=4, apply_recurrence=False),
}


@pytest.fixture(scope="module")
def models(tiny_model):
    return {name: tiny_model(seed=20 + i, **kw) for i, (name, kw) in enumerate(CONFIGS.items())}


def ids_for(model, batch=2, t=SEQ, seed=0):
    return torch.randint(0, model.config.vocab_size, (batch, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("config", CONFIGS)
def test_forward_matches_oracle(assert_close, oracle, models, config):
    model = models[config]
    ids = ids_for(model)
    selection = oracle.Selection()
    ref = oracle.logits(model, ids, model.config.layer_patterns(), selection)
    assert selection.min_gap > DECISIVE, f"seed gives a near-tie ({selection.min_gap}); pick another"
    with torch.no_grad():
        assert_close("logits", model(ids).logits, ref, FP32_VALUES)


DECODE_CASES = [(c, n) for c in CONFIGS for n in (1, 6, 17)]


@pytest.mark.parametrize("config,prefill", DECODE_CASES, ids=[f"{c}-prefill{n}" for c, n in DECODE_CASES])
def test_prefill_then_decode_matches_oracle_at_every_position(assert_close, oracle, models, config, prefill):
    """Prefill, then one token at a time (block summaries completed during decoding), then three at once."""
    model = models[config]
    ids = ids_for(model, seed=prefill)
    selection = oracle.Selection()
    ref = oracle.logits(model, ids, model.config.layer_patterns(), selection)
    assert selection.min_gap > DECISIVE, f"seed gives a near-tie ({selection.min_gap}); pick another"
    with torch.no_grad():
        out = model(ids[:, :prefill], use_cache=True, max_cache_len=SEQ)
        cache = out.past_key_values
        assert_close("prefill logits", out.logits, ref[:, :prefill], FP32_VALUES)
        for t in range(prefill, SEQ - 3):
            step = model(ids[:, t:t + 1], past_key_values=cache)
            assert_close(f"step logits at position {t}", step.logits[:, 0], ref[:, t], FP32_VALUES)
        last = model(ids[:, SEQ - 3:], past_key_values=cache)
        assert_close("last three positions", last.logits, ref[:, SEQ - 3:], FP32_VALUES)


@pytest.mark.parametrize("config", CONFIGS)
def test_cache_holds_every_key_and_one_pooled_key_per_block(models, config):
    model = models[config]
    cfg = model.config
    cache = model.new_cache(2, SEQ)
    allocated = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.tensors())
    assert model.cache_nbytes(SEQ, 2) == allocated == cache.nbytes()
    for layer, pattern in zip(cache.layers, cfg.layer_patterns()):
        for g in layer.groups:
            if len(g.pattern) > 3:
                assert g.kv.shape[-2] == SEQ and g.summary.shape[-2] == SEQ // g.pattern[4]
            else:
                assert g.summary is None


def test_generate_equals_argmax_chain(models):
    model = models["heads-topk"]
    prompt = ids_for(model, batch=2, t=9, seed=3)
    seq = prompt.clone()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=14, min_new_tokens=14, do_sample=False,
                             pad_token_id=model.config.eos_token_id)
        for _ in range(14):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1)[:, None]], dim=1)
    assert torch.equal(out, seq)


def test_topk_with_gathered_keys_is_refused():
    q, k, v = qkv(8, seed=0)
    with pytest.raises(ValueError, match="top-k"):
        attention(q, k, v, (-1, 0, 0, 3, 4, "max"), k_positions=torch.arange(8))


@pytest.mark.parametrize("overrides,match", [
    (dict(topk_blocks=1), "topk_blocks must be 0"),
    (dict(block_score="sum"), "block_score"),
    (dict(block_size=0), "block_size"),
])
def test_hf_config_refuses_bad_topk(tiny_config, overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(dilation=-1, **overrides)
