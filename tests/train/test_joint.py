"""Joint training (sparse step, then dense step on the same micro-batches; one lr per batch) under DeepSpeed
equals a hand-written loop of docs/spec.md §2.2 on the reference model."""


import pytest
import torch
import torch.nn.functional as F

from ratplus_mega.config import load_config
from ratplus_mega.hf import RatPlusForCausalLM
from ratplus_mega.model import build_model
from ratplus_mega.model.init import reference_init_state_dict
from ratplus_mega.model.mapping import to_reference_state_dict
from ratplus_mega.reference_layout import reference_config
from ratplus_mega.parallel import ParallelContext
from ratplus_mega.train.engine import build_engine
from ratplus_mega.train.runner import build_step_runner
from ratplus_mega.train.joint import train_step

SEED = 5


def _hand_written_joint_step(ref, opt, micro_batches, lr, joint):
    """Spec §2.2 verbatim: per pass, sum of micro-batch token means / N_acc, clip 1.0, AdamW step."""
    for group in opt.param_groups:
        group["lr"] = lr
    losses = []
    for mode in ("sparse", "dense") if joint else ("sparse",):
        opt.zero_grad()
        total = 0.0
        for mb in micro_batches:
            logits = ref(mb["input_ids"], attention_mode=mode).logits
            loss = F.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), ignore_index=-100)
            (loss / len(micro_batches)).backward()
            total += loss.item() / len(micro_batches)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        losses.append(total)
    return losses


@pytest.mark.parametrize("zero_stage", [0, 2])
@pytest.mark.parametrize("joint", [True, False], ids=["joint", "sparse-only"])
def test_joint_step_matches_hand_written_loop(single_rank, zero_stage, joint):
    cfg = load_config("configs/model/tiny.yaml", [
        "model.pattern.dilation=4", "model.pattern.window=2", f"parallel.zero_stage={zero_stage}",
        "train.micro_batch_size=2", "train.global_batch_size=6", "train.precision=fp32", "train.adam_eps=1e-6",
        f"train.joint={str(joint).lower()}", "train.lr=2e-3"])
    ctx = ParallelContext.initialize(cfg.parallel)
    runner = build_step_runner(ctx, seq_len=32)
    engine = build_engine(cfg, ctx, build_model(cfg.model, ctx, seed=SEED), runner)
    ref = RatPlusForCausalLM(reference_config(cfg.model)).float()
    ref.load_state_dict(reference_init_state_dict(cfg.model, seed=SEED))
    opt = torch.optim.AdamW(ref.parameters(), lr=2e-3, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for step, lr in enumerate([1e-3, 2e-3, 1.5e-3]):
        tokens = torch.randint(0, cfg.model.vocab_size, (3, 2, 33), generator=g)
        micro = [{"input_ids": t[:, :-1], "labels": t[:, 1:].clone()} for t in tokens]
        micro[0]["labels"][0, :5] = -100
        got = train_step(runner, engine, micro, lr=lr, joint=joint)
        want = _hand_written_joint_step(ref, opt, micro, lr, joint)
        assert got.sparse.loss == pytest.approx(want[0], rel=1e-5), step
        if joint:
            assert got.dense.loss == pytest.approx(want[1], rel=1e-5), step
        else:
            assert got.dense is None
    weights = to_reference_state_dict(engine.module)
    for name, param in ref.named_parameters():
        err = (weights[name] - param.detach()).abs().max() / param.detach().abs().max()
        assert err < 1e-4, name
