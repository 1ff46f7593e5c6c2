"""Bytes each rank sends per layer and training step (forward + backward, one sequence) under context
parallelism, for the recurrence carry, the pattern-aware K/V gather of this stack, a ring over K/V and a
head-scatter all-to-all, at a model's shape (docs/parallelism.md, "Context parallel").

    python benchmarks/context_parallel.py                                   # 1.5B preset, T = 32k and 128k
    python benchmarks/context_parallel.py --contexts 32768 --cp 2 4 8 16 --pattern 16,256,4

Computed from the shapes, counting what a ring algorithm sends per rank: an all-gather or reduce-scatter of a
buffer of S bytes over N ranks sends (N - 1)/N · S from each rank.

- carry: the chunk summaries (gate product, key and value states; fp32), gathered forward, reduce-scattered
  backward: 2 · (N - 1)/N · N·c·3·H·K·4 bytes, c chunks per rank (2 zigzag) — independent of T;
- gather: each chunk's shared keys and values (sinks, grid keys, the last W; all of them for the dense pass),
  padded to the widest chunk w: 2 · (N - 1)/N · N·c·2·H·w·K·b bytes (b bytes per activation);
- ring: the dense pass's K/V passed around the ring (forward K, V; backward K, V and their gradients):
  3 · (N - 1) · 2·(T/N)·H·K·b;
- all-to-all: q, k, v and the gate to head-sharded and the output back, forward and backward:
  2 · 5 · (N - 1)/N · (T/N)·H·K·b.

``--measure`` also runs one mixer layer forward and backward on 2 gloo ranks at a small shape and compares the
bytes this stack's collectives move (buffer sizes, recorded by wrapping ``torch.distributed``) with the
formulas' buffers.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def chunk_count(cp: int, order: str) -> int:
    return cp * (2 if order == "zigzag" else 1)


def shared_width(seq_len: int, chunks: int, dilation: int, window: int, sinks: int) -> int:
    """The most keys a chunk shares with later chunks: p < P, or p >= end - W, or (p + 1) % D == 0."""
    length, widest = seq_len // chunks, 0
    for c in range(chunks):
        start, stop = c * length, (c + 1) * length
        halo = set(range(max(start, stop - window), stop))
        sink = set(range(start, min(stop, sinks)))
        grid = set() if dilation == -1 else set(range(start + (dilation - 1 - start) % dilation, stop, dilation))
        widest = max(widest, len(halo | sink | grid))
    return widest


def traffic(seq_len: int, cp: int, heads: int, head_dim: int, pattern: tuple[int, int, int], *,
            order: str = "zigzag", act_bytes: int = 2) -> dict[str, float]:
    """Bytes sent per rank per layer and step, forward + backward, for one sequence."""
    n, c = cp, chunk_count(cp, order) // cp
    ring_part = (n - 1) / n
    carry_buffer = n * c * 3 * heads * head_dim * 4

    def gather(width: int) -> float:
        return 2 * ring_part * n * c * 2 * heads * width * head_dim * act_bytes

    local = seq_len // n * heads * head_dim * act_bytes
    return {
        "carry": 2 * ring_part * carry_buffer,
        "gather sparse": gather(shared_width(seq_len, chunk_count(cp, order), *pattern)),
        "gather dense": gather(seq_len // chunk_count(cp, order)),
        "ring dense": 3 * (n - 1) * 2 * local,
        "all-to-all": 2 * 5 * ring_part * local,
    }


def _mb(x: float) -> str:
    return f"{x / 2**20:10.2f}"


def print_table(args) -> None:
    from ratplus_mega.config import load_config

    m = load_config(args.config).model
    pattern = tuple(int(x) for x in args.pattern.split(","))
    print(f"# {args.config}: H = {m.num_heads}, K = {m.head_dim}, {m.num_layers} layers; sparse pattern "
          f"D,W,P = {args.pattern}; {args.order} chunks; MiB sent per rank per layer and step (fwd + bwd), one "
          f"sequence, bf16 activations")
    print(f"{'T':>7} {'CP':>3} {'carry':>10} {'gather sparse':>14} {'gather dense':>13} {'ring dense':>11} "
          f"{'all-to-all':>11} {'x layers: sparse':>17}")
    for t in args.contexts:
        for cp in args.cp:
            if t % chunk_count(cp, args.order):
                continue
            row = traffic(t, cp, m.num_heads, m.head_dim, pattern, order=args.order)
            total = (row["carry"] + row["gather sparse"]) * m.num_layers
            print(f"{t:>7} {cp:>3} {_mb(row['carry'])} {_mb(row['gather sparse']):>14} {_mb(row['gather dense']):>13} "
                  f"{_mb(row['ring dense']):>11} {_mb(row['all-to-all']):>11} {_mb(total):>17}")


# ----------------------------------------------------------------------------------------------------------------
# Measured on gloo: the buffers this stack's collectives move
# ----------------------------------------------------------------------------------------------------------------

SMALL = dict(seq_len=96, heads=4, head_dim=8, pattern=(4, 5, 2))


def _measure_rank(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    from ratplus_mega.config import load_config
    from ratplus_mega.model import build_model
    from ratplus_mega.parallel import ParallelContext

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RATPLUS_DISABLE_KERNELS="1")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    d, w, p = SMALL["pattern"]
    cfg = load_config("configs/model/tiny.yaml", [
        "parallel.context_parallel=2", f"model.seq_len={SMALL['seq_len']}", "model.num_layers=1",
        f"model.num_heads={SMALL['heads']}", f"model.head_dim={SMALL['head_dim']}",
        f"model.hidden_size={SMALL['heads'] * SMALL['head_dim']}", f"model.pattern.dilation={d}",
        f"model.pattern.window={w}", f"model.pattern.sinks={p}"])
    ctx = ParallelContext.initialize(cfg.parallel)
    model = build_model(cfg.model, ctx, seed=0)
    moved = {"all_gather": 0, "backward": 0}
    gather, reduce = dist.all_gather, dist.all_reduce

    def counting_gather(out, x, group=None, **kw):
        moved["all_gather"] += sum(t.numel() * t.element_size() for t in out)
        return gather(out, x, group=group, **kw)

    def counting_reduce(x, *a, group=None, **kw):
        if group is ctx.cp_group and x.dim() > 1:  # the gathers' backward (the loss's scalar reductions aside)
            moved["backward"] += x.numel() * x.element_size()
        return reduce(x, *a, group=group, **kw)

    dist.all_gather, dist.all_reduce = counting_gather, counting_reduce
    for mode in ("sparse", "dense"):
        moved.update(all_gather=0, backward=0)
        tokens = torch.randint(0, cfg.model.vocab_size, (1, SMALL["seq_len"]))
        model(tokens, tokens, attention_mode=mode).backward()
        if rank == 0:
            queue.put((mode, dict(moved)))
    dist.all_gather, dist.all_reduce = gather, reduce
    dist.destroy_process_group()


def measure() -> None:
    """Buffers moved by one layer forward + backward at CP = 2 (fp32 on CPU) against the formulas' buffers."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_measure_rank, args=(port, queue), nprocs=2)
    n, c, h, k, t = 2, 2, SMALL["heads"], SMALL["head_dim"], SMALL["seq_len"]
    print(f"\n# measured on gloo: one layer, CP = 2 zigzag, T = {t}, H = {h}, K = {k}, D,W,P = "
          f"{','.join(map(str, SMALL['pattern']))}, fp32; bytes of the collectives' buffers (forward gathers, "
          "backward reductions)")
    print(f"{'pass':<7} {'measured fwd':>13} {'formula fwd':>12} {'measured bwd':>13} {'formula bwd':>12}")
    for _ in range(2):
        mode, moved = queue.get()
        width = shared_width(t, n * c, *SMALL["pattern"]) if mode == "sparse" else t // (n * c)
        formula = n * c * 3 * h * k * 4 + n * c * 2 * h * width * k * 4
        print(f"{mode:<7} {moved['all_gather']:>13} {formula:>12} {moved['backward']:>13} {formula:>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/model/ratplus-1.5b.yaml")
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--pattern", default="16,256,4", help="the sparse pass's D,W,P")
    parser.add_argument("--order", default="zigzag", choices=["zigzag", "contiguous"])
    parser.add_argument("--measure", action="store_true", help="also measure the buffers on 2 gloo ranks")
    args = parser.parse_args()
    print_table(args)
    if args.measure:
        measure()


if __name__ == "__main__":
    main()
