"""One rank of the multi-rank loader tests (run as a subprocess with RANK/WORLD_SIZE/MASTER_* set).

argv: folder out_dir replication plan, plan a JSON list of phases {"take": n, "load": path|null,
"save": path|null}; each phase builds a fresh loader, optionally loads a state, takes n batches and
optionally saves its state. Writes out_dir/rank<r>.json: per phase the window ids of each batch row,
whether labels are masked exactly where inputs are EOS, and the state."""

from __future__ import annotations

import gc
import json
import os
import sys

import torch.distributed as dist


def main() -> None:
    folder, out_dir, replication, plan = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from tests.data.data_helpers import EOS, T, window_id

    from ratplus_mega.config.schema import DataConfig
    from ratplus_mega.data.loader import build_train_loader
    from ratplus_mega.data.streaming import DataLayout

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    layout = DataLayout(dp_rank=rank // replication, dp_size=world // replication, replication=replication)
    cfg = DataConfig(train=[folder], num_workers=0, shuffle_seed=17)
    phases = []
    for phase in plan:
        loader = build_train_loader(cfg, seq_len=T, vocab_size=1000, eos_id=EOS, layout=layout, micro_batch_size=4)
        if phase.get("load"):
            with open(phase["load"]) as f:
                loader.load_state_dict(json.load(f))
        it, batches, masked_ok = iter(loader), [], True
        for _ in range(phase["take"]):
            inputs, labels = next(it)
            batches.append([window_id(row) for row in inputs.tolist()])
            masked_ok &= bool(((labels == -100) == (inputs == EOS)).all())
        state = loader.state_dict()
        if phase.get("save") and rank == 0:
            with open(phase["save"], "w") as f:
                json.dump(state, f)
        phases.append({"batches": batches, "masked_ok": masked_ok, "state": state, "epoch": loader.epoch})
        del it, loader
        gc.collect()
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(phases, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
