"""The reference model against the fp64 oracle of docs/spec.md §1 (``oracle`` in conftest.py: per-step
recurrence loops and an explicit mask per head), and its compressed decode cache (§4.1–§4.3) against that oracle
at every position."""

from __future__ import annotations

import pytest
import torch

from ratplus_mega.hf import RatPlusForCausalLM

pytestmark = pytest.mark.usefixtures("single_thread")

FP32_VALUES = 1e-5  # docs/decisions.md "Tests", relative to the reference's scale

# ------------------------------------------------------------------------------------------------------------
# Model configurations under test
# ------------------------------------------------------------------------------------------------------------

CONFIGS = {
    "dense-D1": dict(dilation=1),
    "D4": dict(dilation=4),
    "D4-W3-P2": dict(dilation=4, window=3, sinks=2),
    "D3-W5-P4": dict(dilation=3, window=5, sinks=4),
    "D-1-W4-P3": dict(dilation=-1, window=4, sinks=3),
    "hybrid-D[1,4]": dict(dilation=[1, 4]),
    "hybrid-D[4,-1]-W[0,2]-P[3,1]": dict(dilation=[4, -1], window=[0, 2], sinks=[3, 1]),
    "norec-D4-W2-P1": dict(dilation=4, window=2, sinks=1, apply_recurrence=False),
}
MODES = {"sparse": "sparse", "dense-mode": "dense"}
SEQ = 29


def patterns_of(model, mode):
    return [(1, 0, 0)] * model.config.num_hidden_layers if mode == "dense" else model.config.layer_patterns()


def ids_for(model, batch=2, t=SEQ, seed=0):
    return torch.randint(0, model.config.vocab_size, (batch, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def models(tiny_model):
    return {name: tiny_model(seed=i, **kw) for i, (name, kw) in enumerate(CONFIGS.items())}


FORWARD_CASES = [(c, "sparse") for c in CONFIGS] + [("D4-W3-P2", "dense"), ("hybrid-D[1,4]", "dense")]


@pytest.mark.parametrize("config,mode", FORWARD_CASES, ids=[f"{c}-{m}" for c, m in FORWARD_CASES])
def test_forward_matches_handwritten_oracle(assert_close, oracle, models, config, mode):
    model = models[config]
    ids = ids_for(model)
    with torch.no_grad():
        logits = model(ids, attention_mode=mode).logits
    assert logits.dtype == torch.float32
    assert_close("logits", logits, oracle.logits(model, ids, patterns_of(model, mode)), FP32_VALUES)


def test_sparse_pattern_changes_the_logits(oracle, models):
    """Guards the oracle comparison above: a sparse config's logits differ from the dense oracle's."""
    model = models["D4-W3-P2"]
    ids = ids_for(model)
    with torch.no_grad():
        logits = model(ids).logits.double()
    dense = oracle.logits(model, ids, patterns_of(model, "dense"))
    assert (logits - dense).abs().max() > 1e-3


DECODE_CASES = [(c, "sparse", n) for c in CONFIGS for n in (1, 4, 17)] + [
    ("D3-W5-P4", "dense", 4), ("hybrid-D[1,4]", "dense", 17)]


@pytest.mark.parametrize("config,mode,prefill", DECODE_CASES,
                         ids=[f"{c}-{m}-prefill{n}" for c, m, n in DECODE_CASES])
def test_prefill_then_decode_matches_oracle_at_every_position(assert_close, oracle, models, config, mode,
                                                              prefill):
    """Prefill ``prefill`` tokens (4 < P + W for the windowed configs, 17 beyond it), then decode one token at a
    time and finally three at once; every position's logits equal the full-sequence oracle's."""
    model = models[config]
    ids = ids_for(model, seed=prefill)
    ref = oracle.logits(model, ids, patterns_of(model, mode))
    with torch.no_grad():
        out = model(ids[:, :prefill], use_cache=True, max_cache_len=SEQ, attention_mode=mode)
        cache = out.past_key_values
        assert_close("prefill logits", out.logits, ref[:, :prefill], FP32_VALUES)
        for t in range(prefill, SEQ - 3):
            step = model(ids[:, t:t + 1], past_key_values=cache, attention_mode=mode)
            assert_close(f"step logits at position {t}", step.logits[:, 0], ref[:, t], FP32_VALUES)
        last = model(ids[:, SEQ - 3:], past_key_values=cache, attention_mode=mode)
        assert_close("last three positions", last.logits, ref[:, SEQ - 3:], FP32_VALUES)
    assert cache.seen_tokens == SEQ


def test_decoding_past_the_cache_length_raises(models):
    model = models["D4-W3-P2"]
    ids = ids_for(model, t=10)
    with torch.no_grad():
        cache = model(ids[:, :8], use_cache=True, max_cache_len=9).past_key_values
        model(ids[:, 8:9], past_key_values=cache)
        with pytest.raises(ValueError, match="cache is full"):
            model(ids[:, 9:10], past_key_values=cache)


def test_cache_of_another_mode_raises(models):
    model = models["D4"]
    with pytest.raises(ValueError, match="attention_mode"):
        model(ids_for(model), past_key_values=model.new_cache(2, SEQ, "dense"), attention_mode="sparse")


# ------------------------------------------------------------------------------------------------------------
# generate()
# ------------------------------------------------------------------------------------------------------------


def greedy_chain(model, prompt, steps, mode, eos):
    """Greedy continuation by full forwards of the growing sequence (no cache); rows that emitted eos keep
    emitting eos, which is also generate()'s padding."""
    seq = prompt.clone()
    done = torch.zeros(prompt.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(seq, attention_mode=mode).logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            done |= nxt == eos
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            if done.all():
                break
    return seq


GEN_CASES = [("D4-W3-P2", "sparse", False), ("D4-W3-P2", "sparse", True), ("D3-W5-P4", "dense", True),
             ("hybrid-D[1,4]", "sparse", True), ("norec-D4-W2-P1", "sparse", True)]


@pytest.mark.parametrize("config,mode,own_cache", GEN_CASES,
                         ids=[f"{c}-{m}-{'passed-cache' if o else 'auto-cache'}" for c, m, o in GEN_CASES])
def test_greedy_generate_equals_argmax_chain(models, config, mode, own_cache):
    model = models[config]
    prompt = ids_for(model, batch=2, t=9, seed=3)
    steps = 14
    kwargs = dict(max_new_tokens=steps, do_sample=False, attention_mode=mode, pad_token_id=model.config.eos_token_id)
    if own_cache:
        kwargs["past_key_values"] = model.new_cache(2, 9 + steps, mode)
    with torch.no_grad():
        out = model.generate(prompt, **kwargs)
    expected = greedy_chain(model, prompt, steps, mode, model.config.eos_token_id)
    assert torch.equal(out, expected), f"generate {out.tolist()} != argmax chain {expected.tolist()}"


# ------------------------------------------------------------------------------------------------------------
# Cache size (spec §4.3)
# ------------------------------------------------------------------------------------------------------------


def allocated_bytes(cache) -> int:
    """Bytes of every distinct tensor the cache object holds, found by walking its attributes (and the lists
    and objects they hold) recursively."""
    seen, stack, total = set(), [cache], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            total += obj.untyped_storage().nbytes()
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return total


def spec_cache_bytes(patterns, seq_len, hidden, kv_bytes, recurrence=True) -> int:
    """Spec §4.3 per sequence: N = P + W + 1 + T // D slots (D = -1: P + W + 1; dense: T) of K and V,
    plus the fp32 recurrence state of k and v."""
    total = 0
    for d, w, p in patterns:
        slots = seq_len if d == 1 else p + w + 1 + (seq_len // d if d > 1 else 0)
        total += 2 * kv_bytes * hidden * slots + (2 * 4 * hidden if recurrence else 0)
    return total


SIZE_CASES = [("D4-W3-P2", "sparse", 29, 2), ("D3-W5-P4", "sparse", 64, 1), ("D-1-W4-P3", "sparse", 50, 3),
              ("hybrid-D[1,4]", "sparse", 40, 2), ("D4-W3-P2", "dense", 33, 2), ("norec-D4-W2-P1", "sparse", 30, 1)]


@pytest.mark.parametrize("config,mode,seq_len,batch", SIZE_CASES,
                         ids=[f"{c}-{m}-T{t}-B{b}" for c, m, t, b in SIZE_CASES])
def test_cache_nbytes_is_what_new_cache_allocates(models, config, mode, seq_len, batch):
    model = models[config]
    cfg = model.config
    cache = model.new_cache(batch, seq_len, mode)
    assert model.cache_nbytes(seq_len, batch, mode) == allocated_bytes(cache)
    patterns = patterns_of(model, mode)
    spec = batch * spec_cache_bytes(patterns, seq_len, cfg.hidden_size, 4, cfg.apply_recurrence)
    # No scratch slot for the current token: one slot (K and V, fp32 here) fewer per sparse layer.
    sparse_layers = sum(1 for d, _, _ in patterns if d != 1)
    assert spec - model.cache_nbytes(seq_len, batch, mode) == batch * sparse_layers * 2 * 4 * cfg.hidden_size


def test_cache_filled_by_generate_keeps_its_size(models):
    model = models["D3-W5-P4"]
    cache = model.new_cache(2, 30)
    with torch.no_grad():
        model.generate(ids_for(model, t=7), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                       past_key_values=cache, pad_token_id=2)
    assert cache.seen_tokens >= 26
    assert allocated_bytes(cache) == model.cache_nbytes(30, 2)


@pytest.mark.parametrize("dilation,window,sinks", [(64, 0, 0), (16, 256, 4), (-1, 64, 4), (1, 0, 0)],
                         ids=["D64", "D16-W256-P4", "D-1-W64-P4", "dense"])
def test_cache_nbytes_on_meta_device_bf16(tiny_config, dilation, window, sinks):
    """A 1.5B-shaped model on the meta device: sizes without allocating weights."""
    cfg = tiny_config(vocab_size=32000, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
                      head_dim=128, max_position_embeddings=4096, dilation=dilation, window=window, sinks=sinks)
    with torch.device("meta"):
        model = RatPlusForCausalLM(cfg).to(torch.bfloat16)
    got = model.cache_nbytes(4096, 2)
    assert got == allocated_bytes(model.new_cache(2, 4096))
    spec = 2 * spec_cache_bytes(cfg.layer_patterns(), 4096, 2048, 2)
    if dilation == 1:
        assert got == spec
    else:
        assert spec - got == 2 * 24 * 2 * 2 * 2048


# ------------------------------------------------------------------------------------------------------------
# Inputs the model refuses, and the loss
# ------------------------------------------------------------------------------------------------------------


def test_padded_attention_mask_raises(models):
    model = models["D4"]
    ids = ids_for(model, t=6)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        model(ids, attention_mask=mask)  # an all-ones mask is fine
        mask[0, :2] = 0
        with pytest.raises(ValueError, match="padded batches"):
            model(ids, attention_mask=mask)
        with pytest.raises(ValueError, match="padded batches"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_unknown_attention_mode_raises(models):
    with pytest.raises(ValueError, match="attention_mode"):
        models["D4"](ids_for(models["D4"]), attention_mode="flash")


def test_loss_is_shifted_cross_entropy_ignoring_minus_100(models):
    model = models["D4-W3-P2"]
    ids = ids_for(model, t=12)
    labels = ids.clone()
    labels[0, 3:6] = -100
    labels[1, -1] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    logp = torch.log_softmax(out.logits.double(), dim=-1)
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):  # position t predicts token t + 1
            if labels[b, t + 1] != -100:
                total -= logp[b, t, labels[b, t + 1]].item()
                count += 1
    assert count == 2 * 11 - 4
    assert abs(out.loss.item() - total / count) <= 1e-5 * abs(total / count)


def test_tied_head_is_the_embedding(models):
    model = models["D4"]
    assert model.lm_head.weight is model.model.embed_tokens.weight
