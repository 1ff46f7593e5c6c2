"""``ratplus train``: the pretraining and adaptation loop around the DeepSpeed engine.

Per global batch: the lr of spec §2.4 is set, one (or, joint, two) optimizer steps run, losses are checked
for finiteness, logged, validated every ``eval_interval`` steps and checkpointed every ``save_interval``
steps or when SIGTERM/SIGUSR1 arrived on any rank. Our step counter (not DeepSpeed's, which doubles in joint
training) numbers checkpoints, logs and the data position.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import latest_checkpoint, load_rank_state, read_marker, restore_rng_state, rng_state, save_checkpoint
from ..config.load import dump_config
from ..config.schema import RunConfig
from ..model import build_model
from ..parallel.context import ParallelContext
from .engine import build_engine, gradient_accumulation_steps, prepare_deepspeed_for_cpu
from .evaluate import evaluate, pattern_name
from .joint import train_step
from .metrics import Logger, Throughput, device_peak_tflops, format_eta, training_flops_per_token
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
    """Join the launcher's process group, or form a one-process group when run without a launcher."""
    if dist.is_initialized():
        return
    prepare_deepspeed_for_cpu()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # no launcher (or a one-process one): fill in what is missing
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": "29500"}.items():
            os.environ.setdefault(key, value)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def total_steps(cfg: RunConfig) -> int:
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_len
    steps = cfg.train.train_tokens // tokens_per_step
    if steps < 1:
        raise ValueError(f"train.train_tokens ({cfg.train.train_tokens}) is less than one global batch "
                         f"({tokens_per_step} tokens)")
    return steps


def run_training(cfg: RunConfig) -> int:
    """Train until the token budget is spent or a stop signal arrives; returns the process exit code."""
    from .data import build_train_data, check_data, validation_batches

    init_distributed()
    ctx = ParallelContext.initialize(cfg.parallel)
    check_data(cfg)
    accum = gradient_accumulation_steps(cfg, ctx)
    steps, out = total_steps(cfg), Path(cfg.train.out_dir)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, ctx, seed=cfg.train.seed)
    engine = build_engine(cfg, ctx, model)
    data = build_train_data(cfg, ctx, accum)
    val_batches = validation_batches(cfg, ctx)
    start = _resume(cfg, ctx, engine, data, out / "checkpoints")
    if start == 0 and cfg.train.phase == "adapt":
        load_pretrained_weights(engine, cfg.train.init_from, _layout(ctx))
    rank0 = dist.get_rank() == 0
    logger = Logger(str(out / "tensorboard") if rank0 else None)
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
    meter = Throughput(cfg.train.global_batch_size * cfg.model.seq_len,
                       training_flops_per_token(cfg.model, joint=cfg.train.joint), dist.get_world_size(),
                       device_peak_tflops(), steps)
    stop, warmup = StopFlag(), warmup_steps(steps, cfg.train.warmup_fraction)
    for step in range(start, steps):
        lr = learning_rate(step, total_steps=steps, peak=cfg.train.lr, floor=cfg.train.min_lr, warmup=warmup)
        result = train_step(engine, data.next_micro_batches(), lr=lr, joint=cfg.train.joint, ctx=ctx,
                            seq_len=cfg.model.seq_len)
        _check_finite(result, step, out / "checkpoints")
        done = step + 1
        if done % cfg.train.log_interval == 0 or done == steps:
            _log(logger, meter, step, lr, result, cfg, rank0)
        if done % cfg.train.eval_interval == 0 or done == steps:
            _validate(cfg, ctx, engine.module, val_batches, logger, done, rank0)
        stopping = stop.any_rank(ctx)
        if done % cfg.train.save_interval == 0 or done == steps or stopping:
            _save(cfg, ctx, engine, data, out / "checkpoints", done)
        if stopping:
            if rank0:
                print(f"stop signal: saved step {done}, exiting", flush=True)
            break
    logger.close()
    dist.barrier()
    return 0


def _resume(cfg, ctx, engine, data, root: Path) -> int:
    path = latest_checkpoint(root) if cfg.train.resume == "auto" else None
    if path is None:
        return 0
    marker = read_marker(path)
    layout = _layout(ctx)
    if marker["layout"] != layout:
        raise ValueError(f"{path} was written with layout {marker['layout']}, this run is {layout}: resume with "
                           "the same tensor/pipeline/data parallel sizes")
    differing = sorted(k for k, v in model_fingerprint(cfg).items() if marker["model"].get(k) != v)
    if differing:
        raise ValueError(f"{path} holds another model than this config: model.{', model.'.join(differing)} differ")
    engine.load_checkpoint(str(root), tag=path.name, load_lr_scheduler_states=False)
    state = load_rank_state(path)
    data.load_state_dict(state["data"])
    restore_rng_state(state["rng"])
    if dist.get_rank() == 0:
        print(f"resumed from {path} (step {state['step']})", flush=True)
    return state["step"]


def _save(cfg, ctx, engine, data, root: Path, step: int) -> None:
    marker = {"layout": _layout(ctx), "model": model_fingerprint(cfg)}
    save_checkpoint(engine, root, step=step, rank_state={"step": step, "data": data.state_dict(), "rng": rng_state()},
                    marker=marker, config_yaml=dump_config(cfg), keep_last=cfg.train.keep_last)


def model_fingerprint(cfg: RunConfig) -> dict:
    """The model fields a checkpoint must agree with (JSON-safe)."""
    fields = dataclasses.asdict(cfg.model)
    fields.pop("preset")
    return json.loads(json.dumps(fields))


def _layout(ctx: ParallelContext) -> dict:
    return {"tp": ctx.tp, "pp": ctx.pp, "cp": ctx.cp, "dp": ctx.dp}


def _check_finite(result, step: int, root: Path) -> None:
    losses = [result.sparse.loss] + ([result.dense.loss] if result.dense else [])
    if not all(math.isfinite(x) for x in losses):
        last = latest_checkpoint(root)
        raise RuntimeError(f"non-finite loss {losses} at step {step}; last good checkpoint: {last or 'none'}")


def _log(logger, meter, step, lr, result, cfg, rank0) -> None:
    stats = meter.step_done(step)
    values = {"train/lr": lr, f"train/loss_{pattern_name(cfg.model.layer_patterns())}": result.sparse.loss,
              "train/grad_norm": result.sparse.grad_norm, **{f"perf/{k}": v for k, v in stats.items()}}
    if result.dense:
        values["train/loss_dense"] = result.dense.loss
        values["train/grad_norm_dense"] = result.dense.grad_norm
    logger.scalars(step + 1, values)
    if rank0:
        dense = f" dense {result.dense.loss:.4f}" if result.dense else ""
        mfu = f" mfu {stats['mfu']:.1%}" if "mfu" in stats else ""
        print(f"step {step + 1}/{meter.total_steps} loss {result.sparse.loss:.4f}{dense} lr {lr:.3e} "
              f"gnorm {result.sparse.grad_norm:.3f} {stats['tokens_per_s']:.0f} tok/s{mfu} "
              f"eta {format_eta(stats['eta_s'])}", flush=True)


def _validate(cfg, ctx, model, batches_fn, logger, step, rank0) -> None:
    if batches_fn is None:
        return
    n = cfg.model.num_layers
    runs = [[(1, 0, 0)] * n, cfg.model.layer_patterns()] + [p.per_layer(n) for p in cfg.train.eval_patterns]
    seen = set()
    for patterns in runs:
        name = pattern_name(patterns)
        if name in seen:
            continue
        seen.add(name)
        result = evaluate(model, batches_fn(), patterns, ctx, seq_len=cfg.model.seq_len)
        logger.scalars(step, {f"val/loss_{name}": result["loss"], f"val/ppl_{name}": result["perplexity"]})
        if rank0:
            print(f"validation step {step} [{name}] loss {result['loss']:.4f} ppl {result['perplexity']:.2f} "
                  f"({result['tokens']} tokens)", flush=True)
