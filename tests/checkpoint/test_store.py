"""Committed checkpoints: partial saves are never taken for whole ones, old ones are pruned, and a resumed
engine continues exactly (one rank, DeepSpeed ZeRO-2, fp32)."""


import torch

from ratplus_mega.checkpoint import (committed_checkpoints, latest_checkpoint, read_marker, resume_checkpoint,
                                     restore_rng_state, rng_state, save_checkpoint)
from ratplus_mega.config import load_config
from ratplus_mega.model import build_model
from ratplus_mega.parallel import ParallelContext
from ratplus_mega.train.engine import build_engine
from ratplus_mega.train.joint import train_step
from ratplus_mega.train.runner import build_step_runner


def _engine():
    cfg = load_config("configs/model/tiny.yaml", ["parallel.zero_stage=2", "train.micro_batch_size=2",
                                                  "train.global_batch_size=2", "train.precision=fp32",
                                                  "train.keep_last=2"])
    ctx = ParallelContext.initialize(cfg.parallel)
    runner = build_step_runner(ctx, seq_len=16)
    return build_engine(cfg, ctx, build_model(cfg.model, ctx, seed=1), runner), runner, cfg, ctx


def _batch(seed):
    t = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": t[:, :-1], "labels": t[:, 1:]}]


def _save(engine, cfg, ctx, root, step):
    return save_checkpoint(engine, root, step=step, rank_state={"step": step, "rng": rng_state(), "data": {"n": step}},
                           run=cfg, layout=ctx.sizes(), run_id="test-run")


def test_commit_protocol_prune_and_exact_resume(single_rank, tmp_path):
    engine, runner, cfg, ctx = _engine()
    train_step(runner, engine, _batch(0), lr=1e-3, joint=False)
    first = _save(engine, cfg, ctx, tmp_path, 1)
    marker = read_marker(first)
    assert first.name == "step000000001" and marker.step == 1
    assert marker.layout == {"tp": 1, "pp": 1, "cp": 1, "dp": 1} and marker.model["hidden_size"] == 64
    assert (tmp_path / "latest").read_text() == "step000000001"

    # A save killed half-way leaves only a temporary folder: never resumed from, removed by the next save.
    partial = tmp_path / ".tmp-step000000002"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    assert latest_checkpoint(tmp_path) == first

    for step in (2, 3):
        train_step(runner, engine, _batch(step), lr=1e-3, joint=False)
        _save(engine, cfg, ctx, tmp_path, step)
    assert not partial.exists()
    assert [p.name for p in committed_checkpoints(tmp_path)] == ["step000000002", "step000000003"]

    torch.manual_seed(1234)
    _save(engine, cfg, ctx, tmp_path, 4)
    expected_rand = torch.rand(3)
    expected = [train_step(runner, engine, _batch(b), lr=1e-3, joint=False).sparse.loss
                for b in (9, 10)]

    resumed, runner, cfg, ctx = _engine()
    state = resume_checkpoint(resumed, latest_checkpoint(tmp_path), run=cfg, layout=ctx.sizes())
    assert state["step"] == 4 and state["data"] == {"n": 4}
    restore_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), expected_rand)
    got = [train_step(runner, resumed, _batch(b), lr=1e-3, joint=False).sparse.loss for b in (9, 10)]
    assert got == expected  # weights (first loss) and Adam moments (second loss) restored bitwise
