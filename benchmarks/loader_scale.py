"""The training loader at 1B, 10B and 100B tokens: construction, first batch, throughput, mid-epoch resume and
peak memory, through the project's own ``build_train_loader`` and ``TrainLoader`` (no model).

    python benchmarks/loader_scale.py                                  # the whole grid (minutes)
    python benchmarks/loader_scale.py --tokens 1e11 --world 1024 --workers 4 --json row.json

The datasets are built in seconds from one real shard: an uncompressed MDS shard of ``--shard-samples``
random (seq_len + 1)-token windows, written once by streaming's ``MDSWriter``, then symlinked N times into a
folder whose ``index.json`` lists N shards (100B tokens at seq 4096 and 8192 windows a shard: 24.4M windows in
2,981 shards). Every read hits the page cache of that one file, so the rows measure the loader and streaming,
not the disk; ``prep shards`` writes zstd shards, which streaming decompresses once per shard into the same
folder before reading them the same way.

Each row runs in a fresh process that poses as rank 0 of ``world`` ranks (RANK=0, WORLD_SIZE=world, over a
one-process gloo group), so that streaming partitions the epoch for the whole world and this process (or its
worker 0) computes the epoch order as a node's leader does. It poses as a node of one rank
(LOCAL_WORLD_SIZE=1): with more, streaming's per-node barrier would wait for the workers of local ranks that
do not exist. Measured per row:

- ``construct_s``: ``build_train_loader`` (index, shard readers, shared memory);
- ``first_batch_s``: from ``iter()`` to the first batch (workers start, the leader computes the epoch order);
- ``tokens_per_s``: batches x batch size x seq_len per second over ``--seconds``, within the rank's epoch
  (null when the rank's epoch holds a single batch);
- ``resume_s``: a second loader given a state at the middle of the epoch, from ``load_state_dict`` to its
  first batch (its construction is not counted);
- ``main_rss_mb``: the process's peak RSS (VmHWM); ``worker_rss_mb``: each loader worker's peak RSS
  (VmHWM), by worker index over both loaders, read every ``--sample-interval``; ``tree_pss_mb``: the peak of
  the summed PSS of the process and its workers (PSS counts shared memory once, split among the processes
  that map it).

Times are wall-clock: the table's last column is the host's one-minute load average after each row, so that
rows measured on a busy shared machine can be told apart.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

KEYS = ("tokens", "world", "workers", "construct_s", "first_batch_s", "tokens_per_s", "resume_s", "main_rss_mb",
        "worker_rss_mb", "tree_pss_mb")
GRID = {"tokens": (1e9, 1e10, 1e11), "world": (1, 256, 1024), "workers": (0, 2, 4)}


# ---- datasets ----------------------------------------------------------------------------------------------

def write_real_shard(folder: str, *, samples: int, seq_len: int, vocab_size: int = 32000) -> dict:
    """One uncompressed MDS shard of ``samples`` random windows; returns its ``index.json`` shard entry."""
    import numpy as np
    from streaming import MDSWriter

    rng = np.random.default_rng(0)
    with MDSWriter(out=folder, columns={"tokens": f"ndarray:uint16:{seq_len + 1}"}, compression=None,
                   size_limit=(1 << 32) - 1) as writer:
        for _ in range(samples):
            writer.write({"tokens": rng.integers(0, vocab_size, seq_len + 1, dtype=np.uint16)})
    with open(os.path.join(folder, "index.json")) as f:
        shards = json.load(f)["shards"]
    assert len(shards) == 1, shards
    return shards[0]


def symlinked_dataset(real: str, entry: dict, folder: str, *, tokens: float, seq_len: int) -> int:
    """``folder`` with ceil(tokens / (seq_len x shard samples)) symlinks to the real shard and an
    ``index.json`` listing them; returns the number of windows."""
    per_shard = entry["samples"]
    count = max(1, -(-int(tokens) // (seq_len * per_shard)))
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(real, entry["raw_data"]["basename"])
    shards = []
    for i in range(count):
        name = f"shard.{i:06}.mds"
        os.symlink(target, os.path.join(folder, name))
        shards.append({**entry, "raw_data": {**entry["raw_data"], "basename": name}})
    with open(os.path.join(folder, "index.json"), "w") as f:
        json.dump({"version": 2, "shards": shards}, f)
    return count * per_shard


# ---- memory -------------------------------------------------------------------------------------------------

def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _workers(pid: int) -> list[int]:
    """Child processes running this same program (forked loader workers; not multiprocessing's helpers)."""
    def cmdline(p):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                return f.read()
        except OSError:
            return None

    mine, kids = cmdline(pid), []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(k) for k in f.read().split()]
        except OSError:
            pass
    return sorted(k for k in kids if cmdline(k) == mine)


class MemoryPeaks(threading.Thread):
    """Samples this process and its loader workers: peak RSS per worker index, peak summed PSS."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval, self.worker_kb, self.tree_pss_kb = interval, {}, 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        me = os.getpid()
        total = _pss_kb(me)
        for index, pid in enumerate(_workers(me)):
            self.worker_kb[index] = max(self.worker_kb.get(index, 0), _status_kb(pid, "VmHWM"))
            total += _pss_kb(pid)
        self.tree_pss_kb = max(self.tree_pss_kb, total)

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


# ---- one row (in its own process) ---------------------------------------------------------------------------

def measure_row(folder: str, *, tokens: int, world: int, workers: int, seq_len: int, batch_size: int,
                seconds: float, sample_interval: float) -> dict:
    os.environ.update({"RANK": "0", "WORLD_SIZE": str(world), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    import torch.distributed as dist

    from ratplus_mega.config.schema import DataConfig
    from ratplus_mega.data.loader import build_train_loader
    from ratplus_mega.data.streaming import DataLayout

    store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)  # streaming's barriers: this one process
    peaks = MemoryPeaks(sample_interval)
    peaks.start()
    cfg = DataConfig(train=[folder], num_workers=workers)
    layout = DataLayout(dp_rank=0, dp_size=world)

    def build():
        return build_train_loader(cfg, seq_len=seq_len, vocab_size=32000, eos_id=2, layout=layout,
                                  micro_batch_size=batch_size, check_manifests=False)

    start = time.perf_counter()
    loader = build()
    construct_s = time.perf_counter() - start
    batches_per_epoch = len(loader.dataset) // batch_size
    it = iter(loader)
    start = time.perf_counter()
    next(it)
    first_batch_s = time.perf_counter() - start
    # Every worker is alive now (started by iter(), none done yet); a short epoch may end one before the
    # sampling thread's next look.
    peaks.sample()
    count, start = 0, time.perf_counter()
    while count < batches_per_epoch - 1 and (time.perf_counter() - start < seconds or count < 10):
        next(it)
        count += 1
    tokens_per_s = count * batch_size * seq_len / (time.perf_counter() - start) if count else None
    peaks.sample()  # the workers are alive until the iterator goes: their peaks so far
    state = loader.state_dict()
    epoch_size = loader.dataset.epoch_size
    del it, loader
    gc.collect()

    loader = build()
    step = batch_size * world
    state.update(epoch=0, sample_in_epoch=(epoch_size // 2) // step * step)
    start = time.perf_counter()
    loader.load_state_dict(state)
    it = iter(loader)
    next(it)
    resume_s = time.perf_counter() - start
    peaks.sample()
    del it, loader
    gc.collect()
    peaks.stop()
    return {"tokens": tokens, "world": world, "workers": workers, "construct_s": construct_s,
            "first_batch_s": first_batch_s, "tokens_per_s": tokens_per_s, "resume_s": resume_s,
            "main_rss_mb": _status_kb(os.getpid(), "VmHWM") / 1024,
            "worker_rss_mb": [peaks.worker_kb[i] / 1024 for i in sorted(peaks.worker_kb)],
            "tree_pss_mb": peaks.tree_pss_kb / 1024}


# ---- the table ----------------------------------------------------------------------------------------------

def _run_row(folder: str, tokens: int, world: int, workers: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--row", folder, "--row-tokens", str(tokens), "--world",
           str(world), "--workers", str(workers), "--seq-len", str(args.seq_len), "--batch-size",
           str(args.batch_size), "--seconds", str(args.seconds), "--sample-interval", str(args.sample_interval)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"row tokens={tokens} world={world} workers={workers} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _workers_text(mb: list[float]) -> str:
    if not mb:
        return "-"
    if len(mb) == 1:
        return f"{mb[0]:.0f}"
    return f"{mb[0]:.0f} / {min(mb[1:]):.0f}-{max(mb[1:]):.0f}"


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def print_header() -> None:
    print(f"{'tokens':>9}{'world':>7}{'workers':>8}{'construct s':>13}{'1st batch s':>13}{'tokens/s':>11}"
          f"{'resume s':>10}{'main RSS MB':>13}{'worker RSS MB (0 / others)':>28}{'tree PSS MB':>13}{'load':>6}",
          flush=True)


def print_row(r: dict, load: float) -> None:
    print(f"{r['tokens']:>9.3g}{r['world']:>7}{r['workers']:>8}{r['construct_s']:>13.2f}{r['first_batch_s']:>13.2f}"
          f"{_g(r['tokens_per_s']):>11}{r['resume_s']:>10.2f}{r['main_rss_mb']:>13.0f}"
          f"{_workers_text(r['worker_rss_mb']):>28}{r['tree_pss_mb']:>13.0f}{load:>6.1f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=float, help="one dataset size (default: 1e9, 1e10 and 1e11)")
    parser.add_argument("--world", type=int, help="one world size (default: 1, 256 and 1024)")
    parser.add_argument("--workers", type=int, help="one loader worker count (default: 0, 2 and 4)")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=2, help="micro-batch per rank (the 1.5B config's)")
    parser.add_argument("--shard-samples", type=int, default=8192, help="windows in the real shard")
    parser.add_argument("--seconds", type=float, default=3.0, help="time over which tokens/s is measured")
    parser.add_argument("--sample-interval", type=float, default=0.5,
                        help="seconds between memory samples (reading PSS walks the page tables: not too often)")
    parser.add_argument("--workdir", help="where the shard and datasets go (default: a temporary folder)")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--row-tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.row:  # one row, in this fresh process
        row = measure_row(args.row, tokens=args.row_tokens, world=args.world, workers=args.workers,
                          seq_len=args.seq_len, batch_size=args.batch_size, seconds=args.seconds,
                          sample_interval=args.sample_interval)
        print(json.dumps(row))
        return 0

    workdir = args.workdir or tempfile.mkdtemp(prefix="loader-scale-")
    if not args.workdir:
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    sizes = [args.tokens] if args.tokens else list(GRID["tokens"])
    worlds = [args.world] if args.world else list(GRID["world"])
    workers = [args.workers] if args.workers is not None else list(GRID["workers"])
    real = os.path.join(workdir, "real")
    per_shard = min(args.shard_samples, -(-int(max(sizes)) // args.seq_len))
    start = time.perf_counter()
    entry = write_real_shard(real, samples=per_shard, seq_len=args.seq_len)
    print(f"real shard: {per_shard} windows of {args.seq_len} + 1 tokens, "
          f"{entry['raw_data']['bytes'] / 2**20:.0f} MiB, written in {time.perf_counter() - start:.1f} s; "
          f"batch {args.batch_size} per rank; {os.cpu_count()} CPUs", flush=True)
    folders = {}
    for size in sizes:
        folder = os.path.join(workdir, f"{size:.0e}")
        start = time.perf_counter()
        windows = symlinked_dataset(real, entry, folder, tokens=size, seq_len=args.seq_len)
        folders[size] = (folder, windows * args.seq_len)
        print(f"{size:.0e} tokens: {windows} windows in {-(-windows // per_shard)} symlinked shards "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    print_header()
    rows = []
    for size in sizes:
        folder, tokens = folders[size]
        for world in worlds:
            for n in workers:
                rows.append(_run_row(folder, tokens, world, n, args))
                print_row(rows[-1], os.getloadavg()[0])
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: r[k] for k in KEYS} for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
