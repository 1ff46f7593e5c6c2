"""Whole-model decode and prefill throughput of one model under dense attention and sparse patterns (the paper's
protocol, docs/spec.md §7.4), each row's ratio to dense measured in the same run.

    python benchmarks/decode.py --threads 1                      # CPU: a small model, few steps; the ratios count
    python benchmarks/decode.py --config configs/model/ratplus-1.5b.yaml --dtype bf16 \\
        --new-tokens 1024 --batch-step 16                           # a GPU, as the paper measures

Protocol. One model, random weights; every pattern runs the same weights (the reference model of
``ratplus_mega/hf``, its compressed decode cache and its decode step). For each context T (4096 and 16384) the
cache of every sequence of a batch is filled to position T - N - 1 with random keys and values, with the
bookkeeping of the cache's own prefill (the paper's "simulated prefill"), one step is decoded to warm up, then N
steps are timed (the paper: N = 1024; here by default 8 on CPU) and decode throughput is B·N / time. The batch
B is swept upward (doubling, or in steps of ``--batch-step`` as the paper does) until the caches would pass
``--memory-gb`` (CPU; default 2) or the device runs out of memory (GPU), and the best throughput is
reported with its batch; on CPU the sweep also stops after two steps in a row that gain under 5 %. Prefill time
is one forward pass over a T-token prompt at batch 1 that fills the cache (contexts up to ``--prefill-max``).
Cache bytes are per sequence at context T (``cache_nbytes``: each head's own slots, the fp32 state).

Patterns (``--patterns``): ``D,W,P`` (docs/spec.md §1.3), ``D,W,P,K,S`` for top-k block attention (§4.5) and
``A/B`` for per-head hybrids (§4.4: the first half of the heads A, the rest B), space-separated in one
argument.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ratplus_mega.provenance import git_commit

DEFAULT_PATTERNS = ["1,0,0", "16,0,0", "16,256,4", "64,0,0", "64,256,4", "-1,0,4,16,64", "64,0,4,8,64",
                    "1,0,0/64,0,0"]
CPU_MODEL = ["model.num_layers=4", "model.hidden_size=256", "model.num_heads=4", "model.head_dim=64",
             "model.vocab_size=32000"]


@dataclass
class Row:
    pattern: str
    context: int
    batch: int
    tokens_per_second: float
    step_ms: float
    cache_bytes: int
    prefill_seconds: float | None
    batches_tried: list[int]
    stopped: str  # why the sweep stopped: memory, saturated, max-batch, oom


def parse_pattern(text: str, num_heads: int) -> dict:
    """``D,W,P``, ``D,W,P,K,S`` or ``A/B`` (half the heads each) as RatPlusConfig pattern fields."""
    if "/" in text:
        a, b = (parse_pattern(part, num_heads) for part in text.split("/"))
        half = num_heads // 2
        out = {key: [[a[key]] * half + [b[key]] * (num_heads - half)]  # one layer's per-head list
               for key in ("dilation", "window", "sinks", "topk_blocks")}
        return out | {"block_size": a["block_size"] if a["topk_blocks"] else b["block_size"]}
    values = [int(x) for x in text.split(",")]
    if len(values) not in (3, 5):
        raise ValueError(f"pattern {text!r}: expected D,W,P or D,W,P,K,S")
    d, w, p, k, s = values + [0, 64][len(values) - 3:]
    return dict(dilation=d, window=w, sinks=p, topk_blocks=k, block_size=s)


def per_layer(fields: dict, num_layers: int) -> dict:
    """Fields whose per-head lists (one layer's) are repeated for every layer."""
    return {key: value * num_layers if isinstance(value, list) else value for key, value in fields.items()}


def build_model(base, fields: dict, dtype, device):
    """The reference model of config ``base`` with pattern ``fields``; weights from seed 0 (the same for every
    pattern: parameters do not depend on the pattern)."""
    from ratplus_mega.hf import RatPlusConfig, RatPlusForCausalLM

    config = RatPlusConfig(**{**base.to_dict(), **per_layer(fields, base.num_hidden_layers)})
    torch.manual_seed(0)
    with torch.device(device):
        model = RatPlusForCausalLM(config)
    return model.to(dtype).eval()


def fill_cache(model, batch: int, context: int, length: int):
    """A cache for ``batch`` sequences of up to ``context`` tokens that holds ``length`` positions: every buffer
    filled with random keys and values, and the bookkeeping the cache's own prefill of ``length`` tokens leaves
    (positions seen, grid-store fill; ``tests/benchmarks/test_decode.py`` holds it to a real prefill). Random
    values only where the cache keeps positions, so a D = 64 batch costs its own cache, not a dense one."""
    from ratplus_mega.hf.modeling_ratplus import _grid_positions

    p = model.lm_head.weight
    cache = model.new_cache(batch, context)
    g = torch.Generator(device=p.device).manual_seed(1)
    for layer in cache.layers:
        for group in layer.groups:
            for t in group.tensors():
                t.copy_(torch.randn(t.shape, generator=g, device=p.device, dtype=torch.float32))
            if not group.topk and group.dilation >= 1:
                group.grid_len = len(_grid_positions(group.dilation, group.sinks, length - group.window, "cpu"))
        if layer.state is not None:
            layer.state.normal_(generator=g)
        layer.length = length
    return cache


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_decode(model, batch: int, context: int, new_tokens: int) -> float:
    """Median seconds of one decode step of ``batch`` sequences at positions context - new_tokens .. context - 1."""
    device = model.lm_head.weight.device
    cache = fill_cache(model, batch, context, context - new_tokens - 1)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    steps = []
    with torch.no_grad():
        model(ids, past_key_values=cache)  # warm-up: position context - new_tokens - 1
        for _ in range(new_tokens):
            _sync(device)
            start = time.perf_counter()
            model(ids, past_key_values=cache)
            _sync(device)
            steps.append(time.perf_counter() - start)
    del cache
    return statistics.median(steps)


def time_prefill(model, context: int) -> float:
    device = model.lm_head.weight.device
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    with torch.no_grad():
        model(ids[:, :256], use_cache=True, max_cache_len=context)  # warm-up
        _sync(device)
        start = time.perf_counter()
        model(ids, use_cache=True, max_cache_len=context)
        _sync(device)
    return time.perf_counter() - start


def sweep(model, context: int, args, device) -> tuple[int, float, list[int], str]:
    """(best batch, its step seconds, batches tried, why the sweep stopped)."""
    per_seq = model.cache_nbytes(context)
    best, tried, batch, flat = (0, 0.0), [], args.batch_step or 1, 0
    stopped = "max-batch"
    while batch <= args.max_batch:
        if device.type == "cpu" and batch * per_seq > args.memory_gb * 2**30:
            stopped = "memory"
            break
        try:
            seconds = time_decode(model, batch, context, args.new_tokens)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            stopped = "oom"
            break
        tried.append(batch)
        rate = batch / seconds
        gain = rate / (best[0] / best[1]) if best[0] else float("inf")
        if rate > (best[0] / best[1] if best[0] else 0):
            best = (batch, seconds)
        flat = flat + 1 if gain < 1.05 else 0
        if device.type == "cpu" and flat == 2:  # two steps in a row without a 5 % gain (one may be noise)
            stopped = "saturated"
            break
        batch = batch + args.batch_step if args.batch_step else batch * 2
    return best[0], best[1], tried, stopped


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/model/tiny.yaml", help="model preset (default: tiny, resized "
                        "for CPU by the overrides below unless others are given)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--new-tokens", type=int, default=None, help="timed decode steps (GPU 1024, CPU 8)")
    parser.add_argument("--patterns", default=" ".join(DEFAULT_PATTERNS),
                        help="space-separated, in one argument (write --patterns='1,0,0 -1,0,4,16,64' for D = -1)")
    parser.add_argument("--batch-step", type=int, default=0, help="sweep in steps of this (0: doubling from 1)")
    parser.add_argument("--max-batch", type=int, default=4096)
    parser.add_argument("--memory-gb", type=float, default=2.0, help="CPU: largest total cache of a batch")
    parser.add_argument("--prefill-max", type=int, default=None, help="longest prefill timed (GPU all, CPU 4096)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on GPU, fp32 CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("overrides", nargs="*", help=f"model config overrides (default on CPU: {' '.join(CPU_MODEL)})")
    args = parser.parse_args(argv)

    from ratplus_mega.config import load_config
    from ratplus_mega.config.schema import pattern_name
    from ratplus_mega.reference_layout import reference_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = device.type == "cuda"
    args.new_tokens = args.new_tokens or (1024 if gpu else 8)
    args.prefill_max = args.prefill_max or (max(args.contexts) if gpu else 4096)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if gpu else "fp32")]
    overrides = args.overrides or ([] if gpu else CPU_MODEL)
    m = load_config(args.config, [*overrides, f"model.seq_len={max(args.contexts)}"]).model
    base = reference_config(m)
    commit = git_commit(*CODE_RUN)  # of the code that runs, read before it runs

    rows = []
    for text in args.patterns.split():
        fields = parse_pattern(text, m.num_heads)
        model = build_model(base, fields, dtype, device)
        name = pattern_name(model.config.layer_patterns()[:1])
        for context in args.contexts:
            batch, seconds, tried, stopped = sweep(model, context, args, device)
            prefill = time_prefill(model, context) if context <= args.prefill_max else None
            rows.append(Row(name, context, batch, batch / seconds if batch else 0.0, seconds * 1e3,
                            model.cache_nbytes(context), prefill, tried, stopped))
            print(f"  {name} T={context}: batch {batch} ({stopped}), {rows[-1].tokens_per_second:.0f} tokens/s",
                  flush=True)
        del model

    device_name = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} " \
                                                           "threads)"
    print(f"\n# decode {args.new_tokens} timed steps after a simulated prefill; {m.num_layers} layers x "
          f"{m.hidden_size} ({m.num_heads} heads of {m.head_dim}), vocab {m.vocab_size}, {args.dtype or dtype} | "
          f"{device_name} | torch {torch.__version__} | commit {commit}")
    print(f"{'pattern':<24}{'T':>7}{'batch':>7}{'tokens/s':>11}{'vs dense':>10}{'ms/step':>10}{'cache/seq':>12}"
          f"{'vs dense':>10}{'prefill s':>11}{'vs dense':>10}")
    for context in args.contexts:
        here = [r for r in rows if r.context == context]
        dense = next((r for r in here if r.pattern == "dense"), None)
        for r in here:
            def ratio(a, b):
                return f"{a / b:.2f}" if dense and a and b else "n/a"
            prefill = f"{r.prefill_seconds:.2f}" if r.prefill_seconds is not None else "n/a"
            prefill_ratio = ratio(dense.prefill_seconds, r.prefill_seconds) if dense else "n/a"
            print(f"{r.pattern:<24}{context:>7}{r.batch:>7}{r.tokens_per_second:>11.0f}"
                  f"{ratio(r.tokens_per_second, dense.tokens_per_second if dense else 0):>10}{r.step_ms:>10.1f}"
                  f"{r.cache_bytes:>12}{ratio(dense.cache_bytes if dense else 0, r.cache_bytes):>10}{prefill:>11}"
                  f"{prefill_ratio:>10}")
    print("(vs dense: throughput and prefill speed-up, cache reduction; each over the dense row of the same run)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return rows


CODE_RUN = ["benchmarks/decode.py", "ratplus_mega/hf", "ratplus_mega/config", "ratplus_mega/reference_layout.py"]


if __name__ == "__main__":
    main()
