"""``ratplus train``: the pretraining and adaptation loop around the DeepSpeed engine.

Per global batch: the lr of spec §2.4 is set, one (or, joint, two) optimizer steps run, losses are checked
for finiteness, logged, validated every ``eval_interval`` steps and checkpointed every ``save_interval``
steps or when SIGTERM/SIGUSR1 arrived on any rank. Our step counter (not DeepSpeed's, which doubles in joint
training) numbers checkpoints, logs and the data position.
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import latest_checkpoint, restore_rng_state, resume_checkpoint, rng_state, save_checkpoint
from ..config.load import dump_config
from ..config.schema import RunConfig, pattern_name
from ..model import build_model
from ..parallel.context import ParallelContext
from .data import build_train_data, check_data, validation_batches
from .engine import build_engine, gradient_accumulation_steps, prepare_deepspeed_for_cpu
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


def init_distributed() -> None:
    """Join the launcher's process group, or form a one-process group when run without a launcher.

    Without a launcher and without ``MASTER_PORT``, the group's store listens on a port the kernel picks (and
    ``MASTER_PORT`` is set to it), so that several runs on one host never contend for a fixed port; a
    ``MASTER_PORT`` the user sets is used as given."""
    if dist.is_initialized():
        return
    prepare_deepspeed_for_cpu()
    store = None
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # no launcher (or a one-process one): fill in what is missing
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(key, value)
        if "MASTER_PORT" not in os.environ:
            store = _store_on_free_port(os.environ["MASTER_ADDR"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if store is None:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=store, rank=0, world_size=1)


def _store_on_free_port(host: str) -> dist.TCPStore:
    """A one-process TCPStore listening on a port the kernel assigns (bound once: no window in which another
    process could take it); ``MASTER_PORT`` is set to that port for anything that reads it later."""
    store = dist.TCPStore(host, 0, world_size=1, is_master=True)
    os.environ["MASTER_PORT"] = str(store.port)
    return store


def total_steps(cfg: RunConfig) -> int:
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_len
    steps = cfg.train.train_tokens // tokens_per_step
    if steps < 1:
        raise ValueError(f"train.train_tokens ({cfg.train.train_tokens}) is less than one global batch "
                         f"({tokens_per_step} tokens)")
    return steps


def run_training(cfg: RunConfig) -> int:
    """Train until the token budget is spent or a stop signal arrives; returns the process exit code."""
    init_distributed()
    ctx = ParallelContext.initialize(cfg.parallel)
    check_data(cfg)
    accum = gradient_accumulation_steps(cfg, ctx)
    steps, out = total_steps(cfg), Path(cfg.train.out_dir)
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_len
    torch.manual_seed(cfg.train.seed)
    runner = build_step_runner(ctx, seq_len=cfg.model.seq_len)
    engine = build_engine(cfg, ctx, build_model(cfg.model, ctx, seed=cfg.train.seed), runner)
    data = build_train_data(cfg, runner.feed, accum)
    val_batches = validation_batches(cfg, runner.feed)
    start = _resume(cfg, ctx, engine, data, out / "checkpoints")
    if start == 0 and cfg.train.phase == "adapt":
        load_pretrained_weights(engine, cfg.train.init_from, tp=ctx.tp, pp=ctx.pp)
    rank0 = dist.get_rank() == 0
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
    log = MetricsLog(out if rank0 else None, resume_step=start, total_steps=steps)
    meter = Throughput(tokens_per_step, training_flops_per_token(cfg.model, joint=cfg.train.joint),
                       dist.get_world_size(), device_peak_tflops(), steps, start_step=start)
    stop, warmup = StopFlag(), warmup_steps(steps, cfg.train.warmup_fraction)
    sparse_name = pattern_name(cfg.model.layer_patterns())
    for step in range(start, steps):
        lr = learning_rate(step, total_steps=steps, peak=cfg.train.lr, floor=cfg.train.min_lr, warmup=warmup)
        result = train_step(runner, engine, data.next_micro_batches(), lr=lr, joint=cfg.train.joint)
        _check_finite(result, step, out / "checkpoints")
        done = step + 1
        if done % cfg.train.log_interval == 0 or done == steps:
            log.write({"kind": "train", "step": done, "tokens": done * tokens_per_step, "train/lr": lr,
                       **_pass_values(result, sparse_name), **meter.measure(done)})
        if done % cfg.train.eval_interval == 0 or done == steps:
            _validate(cfg, runner, engine.module, val_batches, log, done, tokens_per_step)
        stopping = stop.any_rank(ctx)
        if done % cfg.train.save_interval == 0 or done == steps or stopping:
            save_checkpoint(engine, out / "checkpoints", step=done, run=cfg, layout=ctx.sizes(),
                            rank_state={"step": done, "data": data.state_dict(), "rng": rng_state()})
        meter.restart(done)  # validation and saving are not training time
        if stopping:
            if rank0:
                print(f"stop signal: saved step {done}, exiting", flush=True)
            break
    log.close()
    dist.barrier()
    return 0


def _resume(cfg, ctx, engine, data, root: Path) -> int:
    path = latest_checkpoint(root) if cfg.train.resume == "auto" else None
    if path is None:
        return 0
    state = resume_checkpoint(engine, path, run=cfg, layout=ctx.sizes())
    data.load_state_dict(state["data"])
    restore_rng_state(state["rng"])
    if dist.get_rank() == 0:
        print(f"resumed from {path} (step {state['step']})", flush=True)
    return state["step"]


def _check_finite(result, step: int, root: Path) -> None:
    losses = [result.sparse.loss] + ([result.dense.loss] if result.dense else [])
    if not all(math.isfinite(x) for x in losses):
        last = latest_checkpoint(root)
        raise RuntimeError(f"non-finite loss {losses} at step {step}; last good checkpoint: {last or 'none'}")


def _pass_values(result: StepResult, sparse_name: str) -> dict[str, float]:
    values = {f"train/loss_{sparse_name}": result.sparse.loss, f"train/grad_norm_{sparse_name}": result.sparse.grad_norm}
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
