"""One rank of the commit-protocol test: a 2-rank DeepSpeed ZeRO-1 save with every ``os.fsync`` logged.

    torchrun --nproc-per-node 2 tests/checkpoint/commit_worker.py OUT

Each fsync appends ``rank<TAB>path`` to OUT/fsync.log (O_APPEND: whole lines from both ranks). When rank 0
writes the marker it copies that log as it stands to OUT/at_marker.log. Each rank writes OUT/rank<r>.json: the
checkpoint files it wrote. The pytest side makes the assertions.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("RATPLUS_DISABLE_KERNELS", "1")

import torch.distributed as dist

from ratplus_mega.checkpoint import MARKER, save_checkpoint, store
from ratplus_mega.checkpoint.integrity import install_recording_engine
from ratplus_mega.config import load_config
from ratplus_mega.model import build_model
from ratplus_mega.parallel import ParallelContext
from ratplus_mega.parallel.process_group import init_distributed
from ratplus_mega.train.engine import build_engine
from ratplus_mega.train.runner import build_step_runner


def main(out: Path) -> None:
    init_distributed("cpu")
    rank = dist.get_rank()
    cfg = load_config("configs/model/tiny.yaml", ["parallel.zero_stage=1", "train.micro_batch_size=1",
                                                  "train.global_batch_size=2", "train.precision=fp32"])
    ctx = ParallelContext.initialize(cfg.parallel)
    engine = build_engine(cfg, ctx, build_model(cfg.model, ctx, seed=1), build_step_runner(ctx, seq_len=16))
    log = os.open(out / "fsync.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    real_fsync, real_durable = os.fsync, store.write_text_durably

    def logged_fsync(fd):
        real_fsync(fd)
        os.write(log, f"{rank}\t{os.readlink(f'/proc/self/fd/{fd}')}\n".encode())

    def marker_snapshot(path, text):
        if Path(path).name == MARKER:
            (out / "at_marker.log").write_bytes((out / "fsync.log").read_bytes())
        real_durable(path, text)

    os.fsync, store.write_text_durably = logged_fsync, marker_snapshot
    saved = save_checkpoint(engine, out / "checkpoints", step=1, rank_state={"step": 1}, run=cfg,
                            layout=ctx.sizes(), run_id="test-run")
    os.fsync, store.write_text_durably = real_fsync, real_durable
    written = [Path(p).name for p in install_recording_engine(engine).written] + [f"ratplus_rank{rank:05d}.pt"]
    (out / f"rank{rank}.json").write_text(json.dumps({"written": written, "checkpoint": str(saved)}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
