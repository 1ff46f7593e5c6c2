"""Resume on another layout, in one process: the re-cut state continues a run exactly, and the layouts it cannot
serve are refused in one line naming the checkpoint and both layouts. (Other DP and TP sizes: tests/e2e/
test_resume_layouts.py.)"""

import pytest
import torch

from ratplus_mega.checkpoint import save_checkpoint
from ratplus_mega.checkpoint.relayout import SavedTrainingState, place_training_state, relayout_refusal
from ratplus_mega.config import load_config
from ratplus_mega.model import build_model
from ratplus_mega.parallel import ParallelContext
from ratplus_mega.train.engine import build_engine
from ratplus_mega.train.joint import train_step
from ratplus_mega.train.runner import build_step_runner


def _engine(zero_stage: int, seed: int, precision: str):
    cfg = load_config("configs/model/tiny.yaml", [f"parallel.zero_stage={zero_stage}", "train.micro_batch_size=2",
                                                  "train.global_batch_size=2", f"train.precision={precision}",
                                                  "train.adam_eps=1e-6"])
    ctx = ParallelContext.initialize(cfg.parallel)
    runner = build_step_runner(ctx, seq_len=16, precision=precision)
    return build_engine(cfg, ctx, build_model(cfg.model, ctx, seed=seed), runner), runner, cfg, ctx


def _steps(runner, engine, seeds):
    losses = []
    for seed in seeds:
        t = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(seed))
        losses.append(train_step(runner, engine, [{"input_ids": t[:, :-1], "labels": t[:, 1:]}], lr=1e-3,
                                 joint=False).sparse.loss)
    return losses


@pytest.mark.parametrize("saved_zero, zero, precision", [(2, 1, "fp32"), (1, 1, "bf16")],
                         ids=["zero2-to-zero1-fp32", "zero1-bf16"])
def test_recut_state_continues_the_run_exactly(single_rank, tmp_path, saved_zero, zero, precision):
    """A fresh engine (other initial weights) given the re-cut module weights, fp32 master weights, both moments
    and Adam's step of a checkpoint continues the run bitwise: the first loss depends on the weights, the next
    on the moments and step. fp32 from ZeRO-2 to ZeRO-1 (DeepSpeed's ZeRO optimizer, one file format); bf16 at
    ZeRO-1 runs DeepSpeed's BF16_Optimizer, with its own groups; in bf16 ZeRO-2 is another optimizer whose steps
    round differently (measured: the second step after the switch 2e-6 off), so bf16 is compared on one stage."""
    engine, runner, cfg, ctx = _engine(saved_zero, seed=1, precision=precision)
    _steps(runner, engine, [0, 1])
    saved = save_checkpoint(engine, tmp_path, step=2, rank_state={"step": 2}, run=cfg, layout=ctx.sizes(),
                            run_id="test-run")
    expected = _steps(runner, engine, [2, 3, 4])

    # Other initial weights: everything must come from the file.
    fresh, runner, cfg, ctx = _engine(zero, seed=2, precision=precision)
    place_training_state(fresh, SavedTrainingState(saved, cfg.model, tp=1))
    assert fresh.global_steps == 2
    assert _steps(runner, fresh, [2, 3, 4]) == expected


def test_layouts_it_cannot_serve_are_refused_in_one_line(tmp_path):
    saved, now = {"tp": 1, "pp": 1, "cp": 1, "dp": 2}, {"tp": 1, "pp": 1, "cp": 1, "dp": 1}
    assert relayout_refusal(tmp_path, saved=saved, saved_zero=2, layout=now, zero=1) is None
    assert relayout_refusal(tmp_path, saved=saved, saved_zero=2, layout={**now, "cp": 2}, zero=1) is None
    for saved_zero, zero, layout in ((0, 1, now), (2, 3, now), (1, 0, {**now, "cp": 2})):
        line = relayout_refusal(tmp_path, saved=saved, saved_zero=saved_zero, layout=layout, zero=zero)
        assert "\n" not in line and str(tmp_path) in line and str(saved) in line and str(layout) in line, line
