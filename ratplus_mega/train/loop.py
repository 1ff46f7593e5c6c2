"""``ratplus train``: the pretraining and adaptation loop around the DeepSpeed engine.

Per global batch: the lr of spec §2.4 is set, one (or, joint, two) optimizer steps run, losses are checked
for finiteness, logged, validated every ``eval_interval`` steps and checkpointed every ``save_interval``
steps or when SIGTERM/SIGUSR1 arrived on any rank (each save's seconds and bytes logged). Our step counter
(not DeepSpeed's, which doubles in joint training) numbers checkpoints, logs and the data position.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import (checkpoint_bytes, latest_checkpoint, new_run_id, read_marker, restore_rng_state,
                          resume_checkpoint, rng_state, save_checkpoint, select_resume_checkpoint, set_aside, step_of)
from ..config.load import dump_config
from ..config.schema import RunConfig, pattern_name
from ..model import build_model
from ..parallel.context import ParallelContext
from ..parallel.process_group import init_distributed
from .data import build_train_data, check_data, validation_batches
from .engine import build_engine, gradient_accumulation_steps
from .evaluate import evaluate
from .joint import StepResult, train_step
from .metrics import MetricsLog, Throughput, device_peak_tflops, training_flops_per_token
from .runner import build_step_runner
from .schedule import learning_rate, warmup_steps
from .weights import load_pretrained_weights


class StopFlag:
    """Set by SIGTERM/SIGUSR1; acted on collectively at the end of a step (handlers only set the flag)."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.raised = True

    def any_rank(self, ctx: ParallelContext) -> bool:
        flag = torch.tensor([1.0 if self.raised else 0.0], device=ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def total_steps(cfg: RunConfig) -> int:
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_len
    steps = cfg.train.train_tokens // tokens_per_step
    if steps < 1:
        raise ValueError(f"train.train_tokens ({cfg.train.train_tokens}) is less than one global batch "
                         f"({tokens_per_step} tokens)")
    return steps


def run_training(cfg: RunConfig) -> int:
    """Train until the token budget is spent or a stop signal arrives; returns the process exit code."""
    stop = StopFlag()  # before anything slow: a signal during set-up is acted on after the first step
    init_distributed(cfg.parallel.device)
    ctx = ParallelContext.initialize(cfg.parallel)
    check_data(cfg)
    accum = gradient_accumulation_steps(cfg, ctx)
    steps, out = total_steps(cfg), Path(cfg.train.out_dir)
    _claim_out_dir(cfg, out)
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_len
    torch.manual_seed(cfg.train.seed)
    runner = build_step_runner(ctx, seq_len=cfg.model.seq_len, precision=cfg.train.precision)
    engine = build_engine(cfg, ctx, build_model(cfg.model, ctx, seed=cfg.train.seed), runner)
    data = build_train_data(cfg, runner.feed, accum)
    val_batches = validation_batches(cfg, runner.feed)
    start, run_id = _resume(cfg, ctx, engine, data, out / "checkpoints")
    if start == 0 and cfg.train.phase == "adapt":
        load_pretrained_weights(engine, cfg.train.init_from, tp=ctx.tp, pp=ctx.pp)
    rank0 = dist.get_rank() == 0
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
    log = MetricsLog(out if rank0 else None, resume_step=start, total_steps=steps)
    meter = Throughput(tokens_per_step, training_flops_per_token(cfg.model, joint=cfg.train.joint),
                       dist.get_world_size(), device_peak_tflops(), steps, start_step=start)
    warmup = warmup_steps(steps, cfg.train.warmup_fraction)
    sparse_name = pattern_name(cfg.model.layer_patterns())
    for step in range(start, steps):
        lr = learning_rate(step, total_steps=steps, peak=cfg.train.lr, floor=cfg.train.min_lr, warmup=warmup)
        result = train_step(runner, engine, data.next_micro_batches(), lr=lr, joint=cfg.train.joint)
        _check_finite(result, step, out / "checkpoints", engine)
        done = step + 1
        if done % cfg.train.log_interval == 0 or done == steps:
            log.write({"kind": "train", "step": done, "tokens": done * tokens_per_step, "train/lr": lr,
                       **_pass_values(result, sparse_name), **meter.measure(done)})
        if done % cfg.train.eval_interval == 0 or done == steps:
            _validate(cfg, runner, engine.module, val_batches, log, done, tokens_per_step)
        stopping = stop.any_rank(ctx)
        if done % cfg.train.save_interval == 0 or done == steps or stopping:
            began = time.perf_counter()
            saved = save_checkpoint(engine, out / "checkpoints", step=done, run=cfg, layout=ctx.sizes(),
                                    run_id=run_id, rank_state={"step": done, "data": data.state_dict(),
                                                               "rng": rng_state()})
            if rank0:  # the save is collective: rank 0's clock spans every rank's writes and the commit
                log.write({"kind": "checkpoint", "step": done, "tokens": done * tokens_per_step,
                           "ckpt/save_s": time.perf_counter() - began, "ckpt/bytes": checkpoint_bytes(saved)})
        meter.restart(done)  # validation and saving are not training time
        if stopping:
            if rank0:
                print(f"stop signal: saved step {done}, exiting", flush=True)
            break
    log.close()
    dist.barrier()
    return 0


def _claim_out_dir(cfg: RunConfig, out: Path) -> None:
    """Collective, before a run writes to ``out``: a run that starts afresh (``train.resume=never``) never writes
    over committed checkpoints. Refused, naming the newest; with ``train.overwrite=true`` the checkpoints folder,
    with the old run's config, metrics and TensorBoard logs, moves aside to ``checkpoints.replaced-<time>``."""
    from ..errors import RatplusError

    root = out / "checkpoints"
    newest = latest_checkpoint(root) if cfg.train.resume == "never" else None
    if newest is None:
        return
    if not cfg.train.overwrite:
        raise RatplusError(f"train.out_dir {out} already holds checkpoints (the newest: step {step_of(newest)}, "
                           f"{newest}) and train.resume=never would write over them: choose a new train.out_dir, "
                           "continue them with train.resume=auto, or set train.overwrite=true to move them aside "
                           f"(to {root}.replaced-<time>) and start afresh")
    dist.barrier()
    if dist.get_rank() == 0:
        aside = set_aside(root, "replaced")
        for name in ("config.yaml", "metrics.jsonl", "tensorboard"):
            if (out / name).exists():
                os.replace(out / name, aside / name)
        print(f"train.overwrite: moved the checkpoints in {out} (the newest: step {step_of(newest)}) and their "
              f"run's config, metrics and TensorBoard logs to {aside}", flush=True)
    dist.barrier()


def _resume(cfg, ctx, engine, data, root: Path) -> tuple[int, str]:
    """(step to start from, run id): the newest checkpoint that verifies, or step 0 and a new run id."""
    path = select_resume_checkpoint(root) if cfg.train.resume == "auto" else None
    if path is None:
        return 0, new_run_id()
    state = resume_checkpoint(engine, path, run=cfg, layout=ctx.sizes())
    data.load_state_dict(state["data"])
    restore_rng_state(state["rng"])
    if dist.get_rank() == 0:
        print(f"resumed from {path} (step {state['step']})", flush=True)
    return state["step"], read_marker(path).run_id or new_run_id()


def _check_finite(result, step: int, root: Path, engine) -> None:
    """Stop a diverging run before it logs or saves the step: a pass's loss, or its gradient norm where the
    engine measures one (ZeRO-0 without clipping does not), went non-finite. Steps are numbered as the log
    numbers them; the checkpoints already committed stay as they are."""
    from ..errors import RatplusError

    measured = engine.get_global_grad_norm() is not None
    passes = [("sparse pass ", result.sparse), ("dense pass ", result.dense)] if result.dense else [("", result.sparse)]
    bad = [f"{name}{what} {value}" for name, p in passes
           for what, value in (("loss", p.loss), ("grad norm", p.grad_norm))
           if (what == "loss" or measured) and not math.isfinite(value)]
    if bad:
        last = latest_checkpoint(root)
        kept = (f"the last good checkpoint, {last}, is kept: resume from it with a lower train.lr" if last else
                "no checkpoint was saved before it")
        raise RatplusError(f"training diverged at step {step + 1}: {', '.join(bad)}; {kept}")


def _pass_values(result: StepResult, sparse_name: str) -> dict[str, float]:
    values = {f"train/loss_{sparse_name}": result.sparse.loss,
              f"train/grad_norm_{sparse_name}": result.sparse.grad_norm}
    if result.dense:
        values.update({"train/loss_dense": result.dense.loss, "train/grad_norm_dense": result.dense.grad_norm})
    return values


def _validate(cfg: RunConfig, runner, model, batches_fn, log: MetricsLog, step: int, tokens_per_step: int) -> None:
    if batches_fn is None:
        return
    n = cfg.model.num_layers
    runs = [[(1, 0, 0)] * n, cfg.model.layer_patterns()] + [p.per_layer(n) for p in cfg.train.eval_patterns]
    record = {"kind": "val", "step": step, "tokens": step * tokens_per_step}
    for patterns in runs:
        name = pattern_name(patterns)
        if f"val/loss_{name}" in record:
            continue
        result = evaluate(runner, model, batches_fn(), patterns)
        record.update({f"val/loss_{name}": result["loss"], f"val/ppl_{name}": result["perplexity"],
                       f"val/tokens_{name}": result["tokens"]})
    log.write(record)
