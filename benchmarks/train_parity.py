"""Does bf16 training with the fused kernels follow the fp32 run? A few joint steps of a small model, the same
seed and batches, run three ways in separate processes:

    oracle    fp32 on the CPU (the torch reference path)
    baseline  bf16 on the accelerator with the kernels off (torch's own bf16 error)
    kernels   bf16 on the accelerator with the fused kernels

and the kernels' losses and gradient norms must lie within ``--factor`` times the baseline's error of the
oracle (plus a small absolute floor): the bf16 rule of ``ratplus_mega.kernels.testing``.

    python benchmarks/train_parity.py                     # on a GPU machine (launch/gpu_check.sh train)
    python benchmarks/train_parity.py --device cpu        # the same machinery on the CPU: baseline bf16 on CPU,
                                                           # no kernels row

Prints one table; exits non-zero when the kernels row breaks the rule.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ratplus_mega.provenance import git_commit

REPO = Path(__file__).resolve().parents[1]
MODEL = ["model.num_layers=4", "model.hidden_size=256", "model.num_heads=4", "model.head_dim=64",
         "model.ffn_hidden_size=1024", "model.vocab_size=2048", "model.seq_len=512",
         "model.pattern.dilation=16", "model.pattern.window=32", "model.pattern.sinks=4"]


def run_steps(device: str, precision: str, steps: int, batch: int) -> dict:
    """Joint steps of the small model on ``device``: losses and gradient norms of both passes, per step."""
    from ratplus_mega.config import load_config
    from ratplus_mega.model import build_model
    from ratplus_mega.parallel import ParallelContext
    from ratplus_mega.parallel.process_group import init_distributed
    from ratplus_mega.train.engine import build_engine
    from ratplus_mega.train.joint import train_step
    from ratplus_mega.train.runner import build_step_runner

    cfg = load_config("configs/model/tiny.yaml", MODEL + [
        f"parallel.device={device}", f"train.precision={precision}", "parallel.zero_stage=1", "train.joint=true",
        f"train.micro_batch_size={batch}", f"train.global_batch_size={batch}", "train.lr=1e-3", "train.grad_clip=1.0"])
    init_distributed(device)
    ctx = ParallelContext.initialize(cfg.parallel)
    runner = build_step_runner(ctx, seq_len=cfg.model.seq_len, precision=precision)
    engine = build_engine(cfg, ctx, build_model(cfg.model, ctx, seed=0).to(ctx.device), runner)
    g = torch.Generator().manual_seed(1)
    out = {"loss_sparse": [], "loss_dense": [], "norm_sparse": [], "norm_dense": []}
    for _ in range(steps):
        tokens = torch.randint(0, cfg.model.vocab_size, (batch, cfg.model.seq_len + 1), generator=g)
        result = train_step(runner, engine, [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}], lr=1e-3,
                            joint=True)
        for name, part in (("sparse", result.sparse), ("dense", result.dense)):
            out[f"loss_{name}"].append(part.loss)
            out[f"norm_{name}"].append(part.grad_norm)
    return out


def _child(device: str, precision: str, kernels: bool, args) -> dict:
    env = {**os.environ, "RATPLUS_DISABLE_KERNELS": "0" if kernels else "1", "OMP_NUM_THREADS": "4",
           "PYTHONWARNINGS": "ignore", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    cmd = [sys.executable, __file__, "--child", device, precision, "--steps", str(args.steps), "--batch",
           str(args.batch)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"train_parity: the {device} {precision} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where the bf16 rows run")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--atol", type=float, default=1e-3, help="relative to the oracle's scale")
    parser.add_argument("--child", nargs=2, metavar=("DEVICE", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_steps(*args.child, args.steps, args.batch)))
        return

    rows = {"oracle": _child("cpu", "fp32", False, args), "baseline": _child(args.device, "bf16", False, args)}
    if args.device == "cuda":
        rows["kernels"] = _child("cuda", "bf16", True, args)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"# {args.steps} joint steps, batch {args.batch} x 512, 4 layers d=256, D16 W32 P4 | bf16 on {device} | "
          f"torch {torch.__version__} | commit {git_commit()}")
    print(f"{'quantity':<14}{'oracle (fp32)':>15}{'baseline err':>14}{'kernels err':>13}{'allowed':>10}  ok")
    failed = False
    for key in rows["oracle"]:
        oracle = torch.tensor(rows["oracle"][key], dtype=torch.float64)
        scale = oracle.abs().max().item()
        base = (torch.tensor(rows["baseline"][key], dtype=torch.float64) - oracle).abs().max().item() / scale
        allowed = args.factor * base + args.atol
        if "kernels" in rows:
            err = (torch.tensor(rows["kernels"][key], dtype=torch.float64) - oracle).abs().max().item() / scale
            ok = err <= allowed
            failed |= not ok
            shown = f"{err:>13.2e}{allowed:>10.2e}  {'yes' if ok else 'NO'}"
        else:
            shown = f"{'-':>13}{allowed:>10.2e}  -"
        print(f"{key:<14}{oracle[-1].item():>15.4f}{base:>14.2e}{shown}")
    print("errors: the largest over the steps, relative to the oracle's largest value; allowed = factor x baseline "
          "+ atol")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
