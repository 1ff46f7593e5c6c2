"""Compile every kernel variant for an NVIDIA architecture, on a machine with or without a GPU.

The ops' host functions run on small CPU tensors with the kernel launches intercepted, so each kernel sees
exactly the arguments, strides and constexpr flags the ops produce. Each distinct launch is then compiled
through Triton's own argument specialisation to PTX and a cubin (Triton's bundled ptxas) for its autotune
configs, and ptxas's verbose log gives its registers and spills. This catches what the
interpreter cannot: lowering errors, register spills, and tiles that need more shared memory than the
architecture has (the autotuner skips those at run time; a variant none of whose configs fits is an error).
The PTX also shows whether the dots became tensor-core instructions and whether tiles are read in 16-byte
vectors (columns ``mma``, ``ld16``, ``ld<4``; tests/kernels/test_compile.py holds the kernels to that).

    python -m ratplus_mega.kernels.compile_check --arch 90                # the largest config of each variant
    python -m ratplus_mega.kernels.compile_check --arch 90 --all-configs  # every autotune config
    python -m ratplus_mega.kernels.compile_check --only scan              # kernels whose name has "scan"

Exit status 1 when a variant fails to compile or (with ``--all-configs``) has no config that fits.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from importlib import import_module
from multiprocessing import get_context

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import create_function_from_signature

from .scan import bwd as scan_bwd_module
from .scan import fwd as scan_fwd_module
from .scan import segments as scan_segments_module
from .sparse_attn import blocks as attn_blocks_module
from .sparse_attn import bwd as attn_bwd_module
from .sparse_attn import fwd as attn_fwd_module
from .sparse_attn.gathered import plan_gathered_keys
from .sparse_attn.op import Pattern

# Largest dynamic shared memory one block may use, per compute capability (CUDA programming guide).
SHARED_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 120: 101376}
KERNEL_MODULES = (scan_fwd_module, scan_bwd_module, scan_segments_module, attn_fwd_module, attn_bwd_module,
                  attn_blocks_module)


@dataclass(frozen=True)
class CompileJob:
    """One kernel variant under one config, in a form a worker process can rebuild (everything picklable)."""

    module: str
    kernel: str
    variant: str
    config: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    arch: int


@dataclass
class CompileResult:
    job: CompileJob
    seconds: float
    error: str | None = None
    usage: dict = field(default_factory=dict)  # REG, STACK, SPILL_* from ptxas; MMA, LD* from the PTX; SHARED


def kernel_objects() -> dict[str, object]:
    """Every kernel of the package by name: ``Autotuner`` or ``JITFunction`` objects of the kernel modules."""
    found = {}
    for module in KERNEL_MODULES:
        for name, value in vars(module).items():
            if name.endswith("_kernel") and hasattr(value, "run"):
                found[name] = value
    return found


def record_launches(drive) -> list[tuple[str, object, tuple, dict, object]]:
    """Run ``drive()`` with every kernel's ``run`` replaced by a recorder: (name, kernel, args, kwargs, grid)."""
    launches = []
    kernels = kernel_objects()
    for name, kernel in kernels.items():
        kernel.run = lambda *args, _name=name, _kernel=kernel, grid, warmup, **kwargs: launches.append(
            (_name, _kernel, args, kwargs, grid))
    try:
        drive()
    finally:
        for kernel in kernels.values():
            del kernel.run  # back to the class's method
    return launches


def drive_scan() -> None:
    """The scan ops' launch variants: one sequence (fp32, bf16 with an initial state) and the layer's k/v pair
    (bf16 with an fp32 gate, and with a bf16 gate pre-activation read through projection strides), each as one
    walk over time and split into segments (summary, carry pass, rescan)."""
    plan = scan_segments_module.plan_segments
    try:
        for segments in (1, 2):
            scan_segments_module.plan_segments = lambda *args, _n=segments: _n
            _drive_scan_variants()
    finally:
        scan_segments_module.plan_segments = plan


def _drive_scan_variants() -> None:
    B, H, T, C = 2, 4, 256, 128
    fwd, bwd = scan_fwd_module.scan_fwd, scan_bwd_module.scan_bwd
    for dtype, gate_dtype, nx, logits, strided, h0 in [
        (torch.float32, torch.float32, 1, False, False, False),
        (torch.bfloat16, torch.bfloat16, 1, False, False, True),
        (torch.bfloat16, torch.float32, 2, False, False, True),
        (torch.bfloat16, torch.bfloat16, 2, True, True, False),
    ]:
        if strided:  # (B, T, 3·H·C) projection output: gate, k, v as (B, H, T, C) views
            proj = torch.zeros(B, T, 3, H, C, dtype=dtype)
            gate, *xs = (proj[:, :, i].transpose(1, 2) for i in range(3))
        else:
            gate = torch.zeros(B, H, T, C, dtype=gate_dtype)
            xs = [torch.zeros(B, H, T, C, dtype=dtype) for _ in range(nx)]
        xs = xs[:nx]
        initial = torch.zeros(nx, B, H, C) if h0 else None
        outs, final, checkpoints = fwd(gate, xs, initial, logits)
        bwd(gate, xs, checkpoints, outs, final if h0 else None, h0, logits)


def drive_attention() -> None:
    """The sparse-attention launch variants: dense, dilated + window + sinks, window + sinks only and a window
    wider than the sequence (no far keys), each in fp32 and bf16, over all keys and over gathered keys."""
    B, H, T, K = 1, 2, 256, 128
    patterns = [(1, 0, 0), (16, 64, 4), (-1, 64, 4), (-1, 512, 0)]
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.zeros(B, H, T, K, dtype=dtype) for _ in range(3))
        for dilation, window, sinks in patterns:
            pattern = Pattern(dilation, window, sinks, K**-0.5, 0)
            out, lse = attn_fwd_module.attention_fwd(q, k, v, pattern)
            attn_bwd_module.attention_bwd(q, k, v, out, lse, out, None, pattern)
            # Context parallelism: the next T queries against a gathered subset of the earlier keys, with the
            # LSE's gradient (partials are merged by LSE).
            positions = torch.arange(0, T, 2)
            gathered = plan_gathered_keys(positions, T, T, len(positions), dilation, window, sinks, q.device)
            cp = Pattern(dilation, window, sinks, K**-0.5, T)
            kg, vg = k[:, :, : len(positions)], v[:, :, : len(positions)]
            out, lse = attn_fwd_module.attention_fwd(q, kg, vg, cp, gathered)
            attn_bwd_module.attention_bwd(q, kg, vg, out, lse, out, lse, cp, gathered)


def drive_block_attention() -> None:
    """The selected-blocks kernels of top-k attention: fp32 and bf16, with the dilated grid and without, blocks
    of 64 (the paper's) and of 8 (a narrower key tile), with the LSE's gradient (the route merges by LSE)."""
    B, H, T, K = 1, 2, 256, 128
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.zeros(B, H, T, K, dtype=dtype) for _ in range(3))
        ids = torch.zeros(B, H, T, 4, dtype=torch.int32)
        for size, dilation in ((64, 64), (64, -1), (8, -1)):
            plan = attn_blocks_module.plan_blocks(ids, T // size, attn_blocks_module.tile_shape(dtype, size)[0])
            pattern = Pattern(dilation, 0, 4, K**-0.5, 0)
            out, lse = attn_blocks_module.block_attention_fwd(q, k, v, ids, size, plan, pattern)
            attn_blocks_module.block_attention_bwd(q, k, v, out, lse, out, lse, ids, size, plan, pattern)


def _describe(value) -> str:
    return value if isinstance(value, str) else repr(value)


def build_jobs(arch: int, all_configs: bool, only: str = "") -> list[CompileJob]:
    """Distinct (kernel, specialisation) launches of both ops, each with its configs (or its largest one);
    with ``only``, of the kernels whose name contains it."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    jobs, seen = [], set()
    launches = record_launches(drive_scan) + record_launches(drive_attention) + record_launches(drive_block_attention)
    for name, kernel, args, kwargs, _ in launches:
        if only not in name:
            continue
        fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
        configs = [None]
        if isinstance(kernel, Autotuner):  # the configs this launch would autotune over
            configs = kernel.configs
            if kernel.early_config_prune is not None:
                configs = kernel.early_config_prune(configs, dict(zip(kernel.arg_names, args)), **kwargs)
        if not all_configs and len(configs) > 1:
            configs = [max(configs, key=_config_size)]
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        for config in configs:
            call = {**kwargs, **(config.all_kwargs() if config is not None else {})}
            bound, specialization, options = binder(*args, **call)
            options, signature, constexprs, attrs = fn._pack_args(backend, call, bound, specialization, options)
            # Alignment attributes differ with the sample shapes; dtypes, constexprs and options make the variant.
            key = (name, repr(signature), repr(constexprs), repr(options))
            if key in seen:
                continue
            seen.add(key)
            # The variant: dtypes, constexpr flags, and integers Triton specialises (a stride or D equal to 1).
            hidden = {"INTERPRET", "BT", *(config.kwargs if config is not None else ())}
            flags = [f"{n}={_describe(v)}" for n, v in bound.items() if signature[n] == "constexpr" and n not in hidden]
            dtypes = sorted({t[1:] for t in signature.values() if t.startswith("*")} - {"i32"})
            variant = " ".join([",".join(dtypes)] + flags)
            jobs.append(CompileJob(fn.__module__, name, variant, _format_config(config), signature, constexprs,
                                   attrs, options.__dict__, arch))
    return jobs


def _config_size(config) -> tuple:
    """Order configs by how much they ask of the chip: tile elements, then pipeline stages, then warps."""
    return math.prod(v for v in config.kwargs.values() if isinstance(v, int)), config.num_stages, config.num_warps


def _format_config(config) -> str:
    if config is None:
        return "-"
    tiles = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{tiles} w{config.num_warps} s{config.num_stages}"


def compile_job(job: CompileJob) -> CompileResult:
    """Compile one job to a cubin and read ptxas's account of it (runs in a worker process)."""
    start = time.perf_counter()
    kernel = getattr(import_module(job.module), job.kernel)
    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    # Triton runs ptxas with -v and prints its log when asked; a cached kernel would skip ptxas.
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, job.signature, job.constexprs, job.attrs),
                                      target=GPUTarget("cuda", job.arch, 32), options=job.options)
    except Exception as error:  # a lowering failure is the finding: report it and go on
        return CompileResult(job, time.perf_counter() - start, error=f"{type(error).__name__}: {error}")
    usage = ptxas_usage(log.getvalue())
    usage.update(ptx_instructions(compiled.asm["ptx"]))
    usage["SHARED"] = compiled.metadata.shared
    return CompileResult(job, time.perf_counter() - start, usage=usage)


def ptxas_usage(log: str) -> dict:
    """Registers, stack frame and spill bytes from ptxas's verbose log."""
    patterns = {"REG": r"Used (\d+) registers", "STACK": r"(\d+) bytes stack frame",
                "SPILL_STORES": r"(\d+) bytes spill stores", "SPILL_LOADS": r"(\d+) bytes spill loads"}
    usage = {}
    for key, pattern in patterns.items():
        found = re.search(pattern, log)
        if found is None:
            raise RuntimeError(f"compile_check: no '{pattern}' in the ptxas log:\n{log}")
        usage[key] = int(found.group(1))
    return usage


def ptx_instructions(ptx: str) -> dict:
    """What the PTX says about speed: the tensor-core instruction its dots became (``wgmma`` on sm_90, ``mma``
    before, ``-`` when none: an fp32 ``ieee`` dot runs on the FMA units), and its reads of global memory
    (``ld.global``, or ``cp.async`` into shared memory): how many move 16 bytes per thread (vectorised tiles)
    and how many under 4 bytes (a bf16 tile read element by element, e.g. after a stride lost its
    divisibility by 16)."""
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else "-"
    width = []
    for op in re.findall(r"\bld\.global\S*", ptx):  # e.g. ld.global.L1::evict_last.v4.b32
        vec, bits = re.search(r"\.v(\d)\.", op), re.search(r"\.[bfsu](\d+)$", op)
        width.append(int(vec.group(1) if vec else 1) * int(bits.group(1)) // 8)
    # cp.async.cg.shared.global [dst], [src], 0x10, ...: the third operand is the byte count.
    width += [int(size, 0) for size in re.findall(r"\bcp\.async\.c[ag]\.shared\.global[^,]*,[^,]*, (\w+)", ptx)]
    return {"MMA": mma, "LD16": sum(w == 16 for w in width), "LD_NARROW": sum(w < 4 for w in width)}


def report(results: list[CompileResult], arch: int, all_configs: bool) -> int:
    """Print the table; return the number of failures."""
    limit = SHARED_LIMIT.get(arch)
    wk = max([len(r.job.kernel) for r in results] + [6])
    wv = max([len(r.job.variant) for r in results] + [7])
    wc = max([len(r.job.config) for r in results] + [6])
    header = (f"{'kernel':<{wk}}  {'variant':<{wv}}  {'config':<{wc}}  {'regs':>4} {'stack':>5} {'shared':>7}  "
              f"{'mma':<5} {'ld16':>4} {'ld<4':>4}  note")
    print(header)
    print("-" * len(header))
    fits: dict[tuple[str, str], bool] = {}
    failures = 0
    for r in results:
        j = r.job
        row = f"{j.kernel:<{wk}}  {j.variant:<{wv}}  {j.config:<{wc}}"
        if r.error is not None:
            failures += 1
            print(f"{row}  {'':>4} {'':>5} {'':>7}  {'':<5} {'':>4} {'':>4}  FAILED {r.error}")
            continue
        u = r.usage
        too_big = limit is not None and u["SHARED"] > limit
        fits[(j.kernel, j.variant)] = fits.get((j.kernel, j.variant), False) or not too_big
        notes = [f"{r.seconds:.1f}s"]
        if u["SPILL_STORES"] or u["SPILL_LOADS"]:
            notes.append(f"spills {u['SPILL_STORES']} B")
        if too_big:
            notes.append(f"shared > {limit} (skipped at run time)")
        print(f"{row}  {u['REG']:>4} {u['STACK']:>5} {u['SHARED']:>7}  {u['MMA']:<5} {u['LD16']:>4} "
              f"{u['LD_NARROW']:>4}  {' '.join(notes)}")
    if all_configs:
        for (kernel, variant), ok in fits.items():
            if not ok:
                failures += 1
                print(f"FAILED {kernel} [{variant}]: no config fits sm_{arch}'s shared memory")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (80, 90, ...)")
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not only the largest")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    parser.add_argument("--only", default="", help="compile only the kernels whose name contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET (the kernels are decorated for the interpreter under it)",
              file=sys.stderr)
        return 1
    jobs = build_jobs(args.arch, args.all_configs, args.only)
    if not jobs:
        print(f"compile_check: no kernel name contains {args.only!r}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(compile_job, jobs))
    print(f"# sm_{args.arch}, triton {triton.__version__}, {len(jobs)} compilations in "
          f"{time.perf_counter() - start:.0f} s ({args.jobs} processes)")
    failures = report(results, args.arch, args.all_configs)
    print(f"# {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
