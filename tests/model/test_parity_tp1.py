"""The training model at TP = PP = 1 equals the reference model on the same weights (one process, gloo)."""


import pytest
import torch
import torch.nn.functional as F

from ratplus_mega.config import load_config
from ratplus_mega.hf import RatPlusForCausalLM
from ratplus_mega.kernels.testing import compare
from ratplus_mega.model import build_model
from ratplus_mega.model.init import reference_init_state_dict
from ratplus_mega.model.mapping import load_reference_state_dict, to_reference_state_dict
from ratplus_mega.reference_layout import reference_config
from ratplus_mega.parallel import ParallelContext


def _models(overrides, seed=3):
    cfg = load_config("configs/model/tiny.yaml", overrides)
    ctx = ParallelContext.initialize(cfg.parallel)
    model = build_model(cfg.model, ctx, seed=seed)
    ref = RatPlusForCausalLM(reference_config(cfg.model)).float()
    ref.load_state_dict(reference_init_state_dict(cfg.model, seed=seed))
    return cfg, model, ref


CASES = {
    "D4-W3-P2": ["model.pattern.dilation=4", "model.pattern.window=3", "model.pattern.sinks=2"],
    "D8": ["model.pattern.dilation=8"],
    "Dm1-W5-P1": ["model.pattern.dilation=-1", "model.pattern.window=5", "model.pattern.sinks=1"],
    "per-layer": ["model.pattern.dilation=[1,4]", "model.pattern.window=[0,2]"],
    "no-recurrence": ["model.apply_recurrence=false", "model.pattern.dilation=4"],
    "per-head": ["model.pattern.dilation=[[1,4,-1,4],8]", "model.pattern.window=[[0,2,3,2],1]"],
    "top-k": ["model.pattern.dilation=[-1,[8,1,-1,-1]]", "model.pattern.sinks=1", "model.pattern.topk_blocks=3",
              "model.pattern.block_size=8"],
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_logits_loss_and_gradients_match_reference(single_rank, case, mode):
    cfg, model, ref = _models(CASES[case])
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 38), generator=g)
    inputs, labels = tokens[:, :-1], tokens[:, 1:].clone()
    labels[1, 5:9] = -100
    ref_logits = ref(inputs, attention_mode=mode).logits
    compare("logits", model(inputs, attention_mode=mode), ref_logits, 1e-5)
    loss = model(inputs, labels, attention_mode=mode)
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    compare("loss", loss, ref_loss, 1e-5)
    loss.backward()
    ref_loss.backward()
    grads = to_reference_state_dict(model, grads=True)
    for name, param in ref.named_parameters():
        compare(f"grad {name}", grads[name], param.grad, 1e-4)


def test_state_dict_mapping_round_trip(single_rank):
    cfg, model, ref = _models(CASES["D4-W3-P2"])
    other = {k: torch.randn_like(v) for k, v in ref.state_dict().items()}
    other["lm_head.weight"] = other["model.embed_tokens.weight"]
    load_reference_state_dict(model, other)
    back = to_reference_state_dict(model)
    assert back.keys() == other.keys()
    for name, tensor in other.items():
        assert torch.equal(back[name], tensor), name


def test_layout_free_init_depends_on_seed_only(single_rank):
    _, a, _ = _models([], seed=11)
    _, b, _ = _models([], seed=11)
    _, c, _ = _models([], seed=12)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name
    std = a.layers["0"].mixer.in_proj.weight.std().item()
    assert abs(std - 0.02) < 0.002  # N(0, 0.02^2), spec §1.7
