"""Fused Triton kernels against their baselines on one GPU, forward + backward, at the 1.5B layer's shapes.

    python benchmarks/kernels.py                 # every shape below
    python benchmarks/kernels.py --quick         # B·T = 16k only

Scan (16 heads × 128, k and v in bf16; fp32 gate, and the layer's bf16 pre-activation): ``gated_scan_kv``
beside the torch fallback (the reference model's Hillis–Steele scan over stacked k, v) and a
``torch.compile``d ``associative_scan`` over the official code's layout (gate duplicated over [k | v], fp32).
Bandwidth is the minimal traffic of fwd + bwd (forward reads gate, k, v and writes k̃, ṽ; backward reads gate,
k, v, dk̃, dṽ and writes dgate, dk, dv) over the time, as a share of a device-to-device copy measured in the
same run.

Sparse attention (bf16, P = 4, D ∈ {1, 16, 64}, W ∈ {0, 256}) beside SDPA dense causal and flex_attention's
two-call LSE merge (grid keys gathered + local/sink mask, as the official code runs it). TFLOP/s count the
allowed (q, k) pairs: 4·K flops per pair forward, 2.5× that backward.

The last column checks the goals: the scan at >= 70 % of copy bandwidth; sparse attention within
max(SDPA time × allowed pairs / dense pairs ÷ 0.6, 1.5 × its memory floor), the floor being one read or write of
q, k, v, out and their gradients (12 bf16 tensors) at copy bandwidth, and faster than the flex two-call merge.

Top-k block attention (bf16, the paper's K = 16 blocks of 64, and D = 64 with K = 8): the fused route (the
(D, W, P) kernel and the selected-blocks kernel merged by LSE, selection in torch) beside the reference's masked
torch path and SDPA dense causal. Its pairs depend on the selection, so it has no throughput or goal column.

Every ratio is to a baseline timed in the same run. Prints one table plus device, versions and git commit.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ratplus_mega.provenance import git_commit

DEVICE = "cuda"
HEADS, HEAD_DIM = 16, 128
SCAN_GOAL = 0.70  # share of copy bandwidth
ATTENTION_EFFICIENCY = 0.6  # of dense SDPA's time per allowed pair
FLOOR_SLACK = 1.5  # × the memory floor
SHAPES = [(4, 4096), (16, 4096), (1, 16384), (4, 16384)]  # (batch, time): 16k-64k tokens per step
PATTERNS = [(d, w, 4) for d in (1, 16, 64) for w in (0, 256)]
# Top-k block attention (D, W, P, K, S, score): the paper's attention-baseline setting (K = 16 blocks of 64) and
# its dilated variant (D = 64 grid keys plus K = 8 blocks).
TOPK_PATTERNS = [(-1, 0, 4, 16, 64, "max"), (64, 0, 4, 8, 64, "max")]


def compiled(fn):
    """The baselines run through torch.compile, as the public code runs them."""
    return torch.compile(fn)


def time_ms(fn, grad_to_none) -> float | str:
    """Median ms of ``fn`` (forward + backward), or a short reason when it cannot run."""
    import triton.testing

    try:
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"
    except Exception as exc:  # a baseline that does not compile or run here is reported, not fatal
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        torch.cuda.empty_cache()
        return f"failed: {type(exc).__name__}"


def fwd_bwd(fn, inputs, grads):
    def step():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        torch.autograd.backward([o for o in outs[:len(grads)]], grads)

    return step


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    import triton.testing

    src = torch.empty(1 << 28, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def scan_traffic(n: int, gate_bytes: int) -> int:
    """Minimal bytes of fwd (gate, k, v -> k̃, ṽ) + bwd (gate, k, v, dk̃, dṽ -> dgate, dk, dv), bf16 k and v."""
    return n * (gate_bytes + 2 * 2 + 2 * 2) + n * (gate_bytes + 2 * 2 + 2 * 2 + gate_bytes + 2 * 2)


def _affine_combine(left, right):
    return right[0] * left[0], right[0] * left[1] + right[1]


def official_scan(gate, k, v):
    """The public code's scan: a generic associative scan in fp32 over [k | v] with the gate duplicated;
    returns the scanned [k̃ | ṽ] in the input dtype. Timed compiled, as the public code runs it."""
    from torch._higher_order_ops.associative_scan import associative_scan

    f = torch.cat([gate, gate], dim=-1)
    kv = torch.cat([k, v], dim=-1).float()
    return associative_scan(_affine_combine, (f, (1 - f) * kv), dim=2)[1].to(k.dtype)


def scan_rows(shapes, copy_bw, table) -> None:
    from ratplus_mega.hf.modeling_ratplus import gated_scan
    from ratplus_mega.kernels import gated_scan_kv

    official = compiled(official_scan)

    def fallback(gate, k, v):
        h, _ = gated_scan(gate, torch.stack([k, v]))
        return h[0], h[1]

    for batch, time in shapes:
        shape = (batch, HEADS, time, HEAD_DIM)
        gate = torch.sigmoid(torch.randn(shape, device=DEVICE)).requires_grad_()
        k, v = (torch.randn(shape, device=DEVICE, dtype=torch.bfloat16).requires_grad_() for _ in range(2))
        dk, dv = (torch.randn(shape, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
        leaves = [gate, k, v]
        fused = time_ms(fwd_bwd(lambda g, a, b: gated_scan_kv(g, a, b)[:2], leaves, [dk, dv]), leaves)
        # The layer's call: bf16 pre-activation, sigmoid in the kernel.
        logits = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16).requires_grad_()
        logit_leaves = [logits, k, v]
        fused_logits = time_ms(fwd_bwd(lambda g, a, b: gated_scan_kv(g, a, b, gate_logits=True)[:2], logit_leaves,
                                       [dk, dv]), logit_leaves)
        ref = time_ms(fwd_bwd(fallback, leaves, [dk, dv]), leaves)
        comp = time_ms(fwd_bwd(official, leaves, [torch.cat([dk, dv], -1)]), leaves)
        n = gate.numel()
        case = f"scan B{batch}-T{time}"
        for name, ms, nbytes in [("triton gated_scan_kv", fused, scan_traffic(n, 4)),
                                 ("triton gated_scan_kv, bf16 logits", fused_logits, scan_traffic(n, 2)),
                                 ("torch fallback", ref, 0), ("compiled assoc. scan", comp, 0)]:
            triton_row = name.startswith("triton")
            table.add([case, name, _fmt(ms), _ratio(ms, ref), _ratio(ms, comp),
                       _fmt_bw(nbytes, ms, copy_bw) if triton_row else "",
                       scan_goal(nbytes, ms, copy_bw) if triton_row else ""])
        del gate, logits, k, v, dk, dv, leaves, logit_leaves
        torch.cuda.empty_cache()


def allowed_pairs(time: int, dilation: int, window: int, sinks: int) -> int:
    """Number of (q, k) pairs the pattern allows for q, k in 0..time-1 (docs/spec.md §1.3)."""
    q = torch.arange(time, dtype=torch.float64)
    local = torch.minimum(q, torch.tensor(float(window))) + 1
    far_sinks = torch.clamp(torch.minimum(q - window, torch.tensor(float(sinks))), min=0)
    far_grid = torch.zeros_like(q)
    if dilation >= 1:
        start = sinks + (dilation - 1 - sinks) % dilation
        far_grid = torch.clamp(torch.floor((q - window - 1 - start) / dilation) + 1, min=0)
    return int((local + far_sinks + far_grid).sum().item())


def scan_goal(nbytes: int, ms, copy_bw: float) -> str:
    if not isinstance(ms, float):
        return "n/a"
    return f"{'met' if _bandwidth(nbytes, ms) / copy_bw >= SCAN_GOAL else 'MISSED'} (>= {SCAN_GOAL:.0%} of copy)"


def attention_goal_ms(sdpa_ms: float, pairs: int, dense_pairs: int, nbytes: int, copy_bw: float) -> float:
    """The time sparse attention must beat: dense time scaled by the share of allowed pairs at 60 % of SDPA's
    efficiency, or 1.5 × the memory floor (``nbytes`` at copy bandwidth), whichever is larger."""
    floor_ms = nbytes / copy_bw * 1e3
    return max(sdpa_ms * pairs / dense_pairs / ATTENTION_EFFICIENCY, FLOOR_SLACK * floor_ms)


def attention_goal(fused, sdpa, flex, pairs: int, dense_pairs: int, nbytes: int, copy_bw: float) -> str:
    if not (isinstance(fused, float) and isinstance(sdpa, float)):
        return "n/a"
    bound = attention_goal_ms(sdpa, pairs, dense_pairs, nbytes, copy_bw)
    beats_flex = "n/a" if not isinstance(flex, float) else ("yes" if fused < flex else "NO")
    return f"{'met' if fused <= bound else 'MISSED'} (<= {bound:.3f} ms), beats flex: {beats_flex}"


def flex_merge_fn(time: int, pattern):
    """The official two-call evaluation: grid keys (gathered) and local/sink keys, merged by their LSEs."""
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    dilation, window, sinks = pattern
    start = sinks + (dilation - 1 - sinks) % dilation
    n_grid = len(range(start, time, dilation))

    def grid_mask(b, h, qi, kj):
        return (qi - window) // dilation > kj + sinks // dilation

    def local_mask(b, h, qi, ki):
        return (ki <= qi) & ((qi - ki <= window) | (ki < sinks))

    grid_bm = create_block_mask(grid_mask, None, None, time, n_grid, device=DEVICE)
    local_bm = create_block_mask(local_mask, None, None, time, time, device=DEVICE)
    flex = compiled(flex_attention)
    with_lse = AuxRequest(lse=True)

    def run(q, k, v):
        o1, aux1 = flex(q, k[:, :, start::dilation], v[:, :, start::dilation], block_mask=grid_bm,
                        return_aux=with_lse)
        o2, aux2 = flex(q, k, v, block_mask=local_bm, return_aux=with_lse)
        l1, l2 = aux1.lse, aux2.lse
        m = torch.maximum(l1, l2)
        w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
        total = w1 + w2
        return (o1 * (w1 / total)[..., None] + o2 * (w2 / total)[..., None]).to(q.dtype)

    return run


def attention_inputs(batch: int, time: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """[q, k, v] (B, H, T, K) bf16 leaves that require grad, and an output gradient of the same shape."""
    shape = (batch, HEADS, time, HEAD_DIM)
    leaves = [torch.randn(shape, device=DEVICE, dtype=torch.bfloat16).requires_grad_() for _ in range(3)]
    return leaves, torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)


def sdpa_ms(leaves, do):
    """Dense causal SDPA, forward + backward: the attention baseline."""
    import torch.nn.functional as F

    return time_ms(fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), leaves, [do]),
                   leaves)


def attention_rows(shapes, copy_bw, table) -> None:
    from ratplus_mega.kernels import sparse_attention

    for batch, time in shapes:
        leaves, do = attention_inputs(batch, time)
        sdpa = sdpa_ms(leaves, do)
        dense_pairs = allowed_pairs(time, 1, 0, 0)
        dense_flops = 3.5 * 4 * HEAD_DIM * batch * HEADS * dense_pairs
        table.add([f"attn B{batch}-T{time} dense", "SDPA causal", _fmt(sdpa), "1.00", "",
                   _fmt_tflops(dense_flops, sdpa), ""])
        nbytes = 12 * do.numel() * do.element_size()  # q, k, v, out and their gradients, each once
        for pattern in PATTERNS:
            pairs = allowed_pairs(time, *pattern)
            flops = 3.5 * 4 * HEAD_DIM * batch * HEADS * pairs
            case = f"attn B{batch}-T{time} D{pattern[0]}-W{pattern[1]}-P{pattern[2]}"
            fused = time_ms(fwd_bwd(lambda a, b, c: sparse_attention(a, b, c, *pattern), leaves, [do]), leaves)
            try:
                flex = time_ms(fwd_bwd(flex_merge_fn(time, pattern), leaves, [do]), leaves)
            except Exception as exc:  # block-mask construction itself may fail on an older torch
                flex = f"failed: {type(exc).__name__}"
            table.add([case, "triton sparse_attention", _fmt(fused), _ratio(fused, sdpa), _ratio(fused, flex),
                       _fmt_tflops(flops, fused), attention_goal(fused, sdpa, flex, pairs, dense_pairs, nbytes,
                                                                 copy_bw)])
            table.add([case, "flex two-call merge", _fmt(flex), _ratio(flex, sdpa), "1.00",
                       _fmt_tflops(flops, flex), ""])
        del do, leaves
        torch.cuda.empty_cache()


def topk_rows(shapes, table) -> None:
    from ratplus_mega import kernels
    from ratplus_mega.hf.modeling_ratplus import topk_attention, topk_attention_fused

    fused_kernels = (kernels.sparse_attention, kernels.block_attention)
    for batch, time in shapes:
        leaves, do = attention_inputs(batch, time)
        sdpa = sdpa_ms(leaves, do)
        for pattern in TOPK_PATTERNS:
            d, w, p, blocks, size, _ = pattern
            case = f"top-k B{batch}-T{time} D{d}-W{w}-P{p}-K{blocks}-S{size}"
            fused = time_ms(fwd_bwd(lambda a, b, c: topk_attention_fused(a, b, c, pattern, kernels=fused_kernels),
                                    leaves, [do]), leaves)
            masked = time_ms(fwd_bwd(lambda a, b, c: topk_attention(a, b, c, pattern), leaves, [do]), leaves)
            table.add([case, "triton top-k (two kernels, LSE merge)", _fmt(fused), _ratio(fused, sdpa),
                       _ratio(fused, masked), "", ""])
            table.add([case, "torch masked top-k (reference)", _fmt(masked), _ratio(masked, sdpa), "1.00", "", ""])
        del do, leaves
        torch.cuda.empty_cache()


def _fmt(ms) -> str:
    return f"{ms:.3f}" if isinstance(ms, float) else ms


def _ratio(ms, base) -> str:
    return f"{ms / base:.2f}" if isinstance(ms, float) and isinstance(base, float) else "n/a"


def _bandwidth(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3)


def _fmt_bw(nbytes: int, ms, copy_bw: float) -> str:
    if not isinstance(ms, float):
        return ""
    bw = _bandwidth(nbytes, ms)
    return f"{bw / 1e9:.0f} GB/s = {100 * bw / copy_bw:.0f}% of copy"


def _fmt_tflops(flops: float, ms) -> str:
    return f"{flops / (ms * 1e-3) / 1e12:.0f} TFLOP/s" if isinstance(ms, float) else ""


class Table:
    """Rows are printed as they are measured, so a run cut short still reports them; ``show`` prints them all
    again, aligned."""

    HEADER = ["case", "implementation", "fwd+bwd ms", "× torch fallback / SDPA", "× compiled scan / flex / masked",
              "throughput", "goal"]

    def __init__(self) -> None:
        self.rows: list[list[str]] = []

    def add(self, row: list[str]) -> None:
        self.rows.append(row)
        print("row: " + " | ".join(str(c) for c in row), flush=True)

    def show(self) -> None:
        widths = [max(len(str(r[i])) for r in self.rows + [self.HEADER]) for i in range(len(self.HEADER))]
        line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        print(line(self.HEADER))
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for r in self.rows:
            print(line(r))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the 16k-token shapes")
    parser.add_argument("--skip-scan", action="store_true")
    parser.add_argument("--skip-attention", action="store_true")
    parser.add_argument("--skip-topk", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py times Triton kernels and needs a CUDA GPU; none is visible here. "
                 "The kernels' correctness tests run on CPU: TRITON_INTERPRET=1 python -m pytest tests/kernels")
    import triton

    shapes = [s for s in SHAPES if s[0] * s[1] == 16384] if args.quick else SHAPES
    copy_bw = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
          f"triton {triton.__version__}, CUDA {torch.version.cuda}, commit {git_commit()}")
    print(f"measured device-to-device copy bandwidth: {copy_bw / 1e9:.0f} GB/s")
    table = Table()
    if not args.skip_scan:
        scan_rows(shapes, copy_bw, table)
    if not args.skip_attention:
        attention_rows(shapes, copy_bw, table)
    if not args.skip_topk:
        topk_rows(shapes, table)
    table.show()


if __name__ == "__main__":
    main()
