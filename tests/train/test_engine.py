"""Engine configuration rules, activation checkpointing and the non-finite loss guard."""


import pytest
import torch

from ratplus_mega.config import load_config
from ratplus_mega.model import build_model
from ratplus_mega.model.mapping import to_reference_state_dict
from ratplus_mega.parallel import ParallelContext
from ratplus_mega.train.engine import (apply_compile_glue, apply_recompute, deepspeed_config,
                                       gradient_accumulation_steps)
from ratplus_mega.train.runner import EngineRunner, PipelineRunner
from ratplus_mega.train.joint import PassResult, StepResult
from ratplus_mega.train.loop import _check_finite


def _ctx(**sizes):
    return ParallelContext(tp=sizes.get("tp", 1), pp=sizes.get("pp", 1), cp=1, dp=sizes.get("dp", 1), tp_rank=0,
                           pp_rank=0, cp_rank=0, dp_rank=0, sequence_parallel=False)


def test_deepspeed_config_follows_the_recipe():
    cfg = load_config("configs/train/pretrain-1.5b-100bt.yaml")
    conf = deepspeed_config(cfg, _ctx(dp=64), EngineRunner(_ctx(dp=64)))
    assert conf["gradient_accumulation_steps"] == 4  # spec §2.5: 512 = 2 x 64 GPUs x 4
    assert conf["train_batch_size"] == 512 and conf["gradient_clipping"] == 1.0
    assert conf["bf16"] == {"enabled": True} and conf["data_types"] == {"grad_accum_dtype": "fp32"}
    assert conf["communication_data_type"] == "fp32"  # DeepSpeed's default would reduce in bf16
    assert conf["optimizer"]["params"]["betas"] == [0.9, 0.95] and conf["optimizer"]["params"]["weight_decay"] == 0.1
    assert "managed_gradient_accumulation" not in conf
    assert conf["zero_optimization"] == {"stage": 1, "overlap_comm": True, "contiguous_gradients": True,
                                         "reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000}
    piped = load_config("configs/train/pretrain-1.5b-100bt.yaml", ["parallel.pipeline_parallel=2"])
    runner = PipelineRunner.__new__(PipelineRunner)  # its data feed needs process groups; the config does not
    runner.bf16 = True
    conf = deepspeed_config(piped, _ctx(pp=2, dp=32), runner)
    assert conf["managed_gradient_accumulation"] is False
    assert conf["zero_optimization"]["overlap_comm"] is False  # DeepSpeed refuses it here without ZeRO-2
    assert conf["zero_optimization"]["stage"] == 1
    # megatron-core's schedule never calls engine.backward: the hooks move each micro-batch's bf16 gradient
    # into the fp32 buffers (tests/distributed holds the result to the fp32 reference)
    assert conf["bf16"] == {"enabled": True, "immediate_grad_update": True}
    with pytest.raises(ValueError, match="parallel.zero_stage.*pipeline parallel runs with ZeRO-1"):
        load_config("configs/train/pretrain-1.5b-100bt.yaml", ["parallel.pipeline_parallel=2", "parallel.zero_stage=0"])


def test_bf16_settings_deepspeed_gets_wrong_are_refused():
    """DeepSpeed has no bf16 ZeRO-0 path with fp32 gradient accumulation (it stops in set-up); bf16 reduction
    or residual stream in an fp32 run means nothing."""
    with pytest.raises(ValueError, match="'parallel.zero_stage'.*train.precision=bf16 needs ZeRO stage 1, 2 or 3"):
        load_config("configs/train/pretrain-1.5b-100bt.yaml", ["parallel.zero_stage=0"])
    load_config("configs/train/pretrain-1.5b-100bt.yaml", ["parallel.zero_stage=0", "train.precision=fp32"])
    for key in ("grad_reduce_dtype", "residual_dtype"):
        with pytest.raises(ValueError, match=f"'train.{key}'.*bf16 applies to train.precision=bf16 runs only"):
            load_config("configs/train/tiny-cpu.yaml", [f"train.{key}=bf16"])
    conf = deepspeed_config(load_config("configs/train/pretrain-1.5b-100bt.yaml", ["train.grad_reduce_dtype=bf16"]),
                            _ctx(dp=64), EngineRunner(_ctx(dp=64)))
    assert conf["communication_data_type"] == "bf16"


def test_batch_sizes_that_do_not_divide_over_ranks_are_refused():
    cfg = load_config("configs/train/pretrain-1.5b-100bt.yaml")
    with pytest.raises(ValueError, match="multiple of train.micro_batch_size .2. x data-parallel ranks .3."):
        gradient_accumulation_steps(cfg, _ctx(dp=3))


def _loss_and_grads(model, tokens):
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.detach(), to_reference_state_dict(model, grads=True)


def test_recompute_modes_give_the_same_loss_and_gradients(single_rank):
    cfg = load_config("configs/model/tiny.yaml", ["model.pattern.window=2"])
    ctx = ParallelContext.initialize(cfg.parallel)
    tokens = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    results = {}
    for mode in ("none", "selective", "full"):
        model = build_model(cfg.model, ctx, seed=3)
        apply_recompute(model, mode)
        results[mode] = _loss_and_grads(model, tokens)
    for mode in ("selective", "full"):
        assert torch.equal(results[mode][0], results["none"][0]), mode
        for name, grad in results["none"][1].items():
            assert torch.equal(results[mode][1][name], grad), (mode, name)


def test_loss_over_chunks_equals_the_whole(single_rank):
    """Chunks of 5 of 32 positions (the last one short), ignored labels among them: the same loss and
    gradients, in training and in evaluation."""
    cfg = load_config("configs/model/tiny.yaml")
    ctx = ParallelContext.initialize(cfg.parallel)
    tokens = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(1))
    tokens[0, 1:6] = -100  # labels only: inputs are tokens[:, :-1]
    inputs = tokens.clamp(min=0)
    results = []
    for chunk in (0, 5):
        model = build_model(cfg.model, ctx, seed=3)
        model.loss_chunk_tokens = chunk
        loss = model(inputs[:, :-1], tokens[:, 1:])
        loss.backward()
        with torch.no_grad():
            evaluated = model(inputs[:, :-1], tokens[:, 1:])
        results.append((loss.detach(), evaluated, to_reference_state_dict(model, grads=True)))
    (whole, whole_eval, whole_grads), (chunked, chunked_eval, chunked_grads) = results
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0)
    torch.testing.assert_close(chunked_eval, whole_eval, rtol=1e-6, atol=0)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


class _NormingEngine:  # what the check asks of a DeepSpeed engine: does it measure a gradient norm
    def get_global_grad_norm(self):
        return 1.0


def test_non_finite_loss_stops_naming_the_step_and_checkpoint(tmp_path):
    ok = PassResult(loss=2.0, grad_norm=1.0)
    _check_finite(StepResult(ok, ok), 3, tmp_path, _NormingEngine())
    with pytest.raises(ValueError, match=r"training diverged at step 8: dense pass loss nan; no checkpoint was saved"):
        _check_finite(StepResult(ok, PassResult(loss=float("nan"), grad_norm=1.0)), 7, tmp_path, _NormingEngine())
    with pytest.raises(ValueError, match=r"at step 8: sparse pass grad norm inf"):
        _check_finite(StepResult(PassResult(loss=2.0, grad_norm=float("inf")), ok), 7, tmp_path, _NormingEngine())


def test_compiled_glue_gives_the_same_loss_and_gradients(single_rank):
    """RMSNorm, RoPE and the output gate through torch.compile (inductor on CPU) against the plain functions."""
    cfg = load_config("configs/model/tiny.yaml", ["model.pattern.window=2"])
    ctx = ParallelContext.initialize(cfg.parallel)
    tokens = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    plain = build_model(cfg.model, ctx, seed=3)
    compiled = build_model(cfg.model, ctx, seed=3)
    apply_compile_glue(compiled)
    assert compiled.layers["0"].mixer.rotate is not plain.layers["0"].mixer.rotate
    (loss, grads), (compiled_loss, compiled_grads) = _loss_and_grads(plain, tokens), _loss_and_grads(compiled, tokens)
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
