"""Training-step throughput of a preset on whatever device is present: dense, sparse and joint steps.

    python benchmarks/train_step.py --config configs/model/tiny.yaml [--micro-batch 4] [--steps 5] [key=value ...]
    python benchmarks/train_step.py --config configs/model/ratplus-1.5b.yaml --micro-batch 1 \
        train.recompute=selective                                                    # on one GPU

One process, DeepSpeed ZeRO-1, bf16 on GPU (fp32 on CPU), random tokens. Prints tokens/s, step time, MFU
(docs/flops.md; GPU only) and peak memory, with each row's ratio to the dense step measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from ratplus_mega.provenance import git_commit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (after one warm-up step)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from ratplus_mega.accounting import DENSE, flops_per_token
    from ratplus_mega.config import load_config
    from ratplus_mega.model import build_model
    from ratplus_mega.parallel import ParallelContext
    from ratplus_mega.parallel.process_group import init_distributed
    from ratplus_mega.train.engine import build_engine
    from ratplus_mega.train.joint import train_step
    from ratplus_mega.train.metrics import device_peak_tflops
    from ratplus_mega.train.runner import build_step_runner

    gpu = torch.cuda.is_available()
    cfg = load_config(args.config, [f"train.micro_batch_size={args.micro_batch}",
                                    f"train.global_batch_size={args.micro_batch * args.accumulation}",
                                    f"train.precision={'bf16' if gpu else 'fp32'}", "parallel.zero_stage=1",
                                    *args.overrides])
    init_distributed()
    ctx = ParallelContext.initialize(cfg.parallel)
    runner = build_step_runner(ctx, seq_len=cfg.model.seq_len, precision=cfg.train.precision)
    engine = build_engine(cfg, ctx, build_model(cfg.model, ctx, seed=0).to(ctx.device), runner)
    m, seq = cfg.model, cfg.model.seq_len
    tokens = args.micro_batch * args.accumulation * seq
    sparse_flops = 3 * flops_per_token(m, m.layer_patterns())
    dense_flops = 3 * flops_per_token(m, [DENSE] * m.num_layers)
    peak = device_peak_tflops()

    def batches():
        t = torch.randint(0, m.vocab_size, (args.accumulation, args.micro_batch, seq + 1), device=ctx.device)
        return [{"input_ids": x[:, :-1], "labels": x[:, 1:]} for x in t]

    rows = []
    for name, mode, joint, flops in (("dense", "dense", False, dense_flops), ("sparse", "sparse", False, sparse_flops),
                                     ("joint (sparse + dense)", "sparse", True, sparse_flops + dense_flops)):
        if mode == "dense":
            for block in engine.module.layers.values():  # a dense step: the model's sparse mode at D = 1
                block.mixer.pattern = DENSE
        else:
            for key, block in engine.module.layers.items():
                block.mixer.pattern = m.layer_patterns()[int(key)]
        seconds = _time_steps(lambda: train_step(runner, engine, batches(), lr=1e-4, joint=joint),
                              args.steps, gpu)
        rows.append((name, seconds, tokens / seconds, flops))

    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"# {args.config} {' '.join(args.overrides)} | micro-batch {args.micro_batch} x {args.accumulation} x seq "
          f"{seq} | {device} | torch {torch.__version__} | commit {git_commit()}")
    print(f"{'step':<24}{'s/step':>10}{'tokens/s':>12}{'vs dense':>10}{'MFU':>8}{'peak GiB':>10}")
    base = rows[0][2]
    for name, seconds, rate, flops in rows:
        mfu = f"{rate * flops / (peak * 1e12):.1%}" if peak else "n/a"
        mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if gpu else "n/a"
        print(f"{name:<24}{seconds:>10.3f}{rate:>12.0f}{rate / base:>10.2f}{mfu:>8}{mem:>10}")


def _time_steps(step, n: int, gpu: bool) -> float:
    step()  # warm-up
    if gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    if gpu:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


if __name__ == "__main__":
    main()
