"""Multi-rank parity checks of the training model against the reference model, one layout per launch.

    torchrun --nproc-per-node N tests/distributed/parity_worker.py LAYOUT

Every rank builds the full reference model (pure torch, one process's view) from the same layout-free
initial weights and compares logits, losses, gradients and optimizer steps with the parallel run. Any
mismatch raises, so the launch exits non-zero; the pytest wrapper only checks the exit code.

Layouts in ``BF16_CHECKS`` then train 3 clipped steps in bf16 through the step runner and engine set-up a run
uses, held to the fp32 reference within a tolerance derived from torch's own bf16 error on the same steps.
"""

from __future__ import annotations

import copy
import os
import sys

os.environ.setdefault("RATPLUS_DISABLE_KERNELS", "1")

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ratplus_mega.config import load_config
from ratplus_mega.hf import RatPlusForCausalLM
from ratplus_mega.kernels.testing import compare, compare_to_baseline, measure
from ratplus_mega.model import build_model
from ratplus_mega.model.init import reference_init_state_dict
from ratplus_mega.model.mapping import to_reference_state_dict
from ratplus_mega.reference_layout import reference_config
from ratplus_mega.parallel import ParallelContext
from ratplus_mega.parallel.broadcast import broadcast_batch
from ratplus_mega.train.engine import apply_recompute, build_engine
from ratplus_mega.train.joint import train_step
from ratplus_mega.train.runner import build_step_runner

SEED = 7
PATTERN = ["model.pattern.dilation=4", "model.pattern.window=3", "model.pattern.sinks=2"]
LAYOUTS = {
    "tp2": ["parallel.tensor_parallel=2"],
    "tp2-sp": ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
    # Per-head patterns (docs/spec.md §4.4): the two ranks' heads differ from each other, and within a rank;
    # rank 1's heads of layer 1 run top-k block attention (§4.5).
    "tp2-heads": ["parallel.tensor_parallel=2", "model.pattern.dilation=[[1,4,4,-1],[4,4,2,2]]",
                  "model.pattern.window=[[0,3,0,2],3]", "model.pattern.sinks=[[0,2,2,1],2]",
                  "model.pattern.topk_blocks=[0,[0,0,3,3]]", "model.pattern.block_size=8"],
    "dp2-zero2": ["parallel.zero_stage=2"],
    "tp2-pp2-zero1": ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2", "parallel.zero_stage=1"],
    "cp2": ["parallel.context_parallel=2"],
    "cp4": ["parallel.context_parallel=4"],
    "cp2-tp2": ["parallel.context_parallel=2", "parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
    "cp2-dp2": ["parallel.context_parallel=2"],
    "cp2-pp2": ["parallel.context_parallel=2", "parallel.pipeline_parallel=2", "parallel.zero_stage=1"],
}
# Context parallel: every pattern at a sequence of 48 tokens, cut into chunks of 6 (CP = 4, zigzag) to 24
# (CP = 2, contiguous); windows cross chunk boundaries, D = 5 divides no chunk length.
CP_SEQ = 48
CP_PATTERNS = {
    "dense": ["model.pattern.dilation=1"],
    "D4-W0-P0": ["model.pattern.dilation=4", "model.pattern.window=0", "model.pattern.sinks=0"],
    "D4-W5-P2": ["model.pattern.dilation=4", "model.pattern.window=5", "model.pattern.sinks=2"],
    "D5-W3-P1": ["model.pattern.dilation=5", "model.pattern.window=3", "model.pattern.sinks=1"],
    "D-1-W7-P3": ["model.pattern.dilation=-1", "model.pattern.window=7", "model.pattern.sinks=3"],
    "hybrid": ["model.pattern.dilation=[1,[4,4,8,-1]]", "model.pattern.window=[0,[0,5,2,9]]",
               "model.pattern.sinks=[0,[0,2,1,4]]"],
}
# ZeRO stages trained in bf16 after a layout's fp32 checks (in the same launch).
BF16_CHECKS = {"dp2-zero2": (1, 2), "tp2": (1,), "tp2-sp": (1,), "tp2-pp2-zero1": (1,), "cp2-dp2": (2,)}
# ZeRO stages of the fp32 training check under context parallel.
CP_TRAINING = {"cp2-tp2": (1,), "cp2-dp2": (0, 1, 2), "cp2-pp2": (1,)}


def check_close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """The project's error metric (``ratplus_mega.kernels.testing.compare``), the message naming the rank."""
    compare(f"rank {dist.get_rank()}: {name}", got, ref, tol)


def make_batch(ctx: ParallelContext, batch_size: int, seq_len: int, vocab: int) -> dict[str, torch.Tensor]:
    """Random tokens made on the first rank of each TP group and broadcast to its peers."""
    src = dist.get_rank() - ctx.tp_rank
    batch = None
    if ctx.tp_rank == 0:
        g = torch.Generator().manual_seed(SEED + ctx.dp_rank)
        tokens = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g)
        labels = tokens[:, 1:].clone()
        labels[0, :3] = -100
        batch = {"input_ids": tokens[:, :-1], "labels": labels}
    batch = broadcast_batch(batch, src=src, group=ctx.tp_group)
    gathered = [torch.empty_like(batch["input_ids"]) for _ in range(ctx.tp)]
    dist.all_gather(gathered, batch["input_ids"], group=ctx.tp_group)
    if not all(torch.equal(g, batch["input_ids"]) for g in gathered):
        raise AssertionError(f"rank {dist.get_rank()}: tensor-parallel peers received different batches")
    return batch


def reference_model(cfg) -> RatPlusForCausalLM:
    ref = RatPlusForCausalLM(reference_config(cfg.model)).float()
    ref.load_state_dict(reference_init_state_dict(cfg.model, seed=SEED))
    return ref


def run_tensor_parallel(cfg, ctx: ParallelContext) -> None:
    model = build_model(cfg.model, ctx, seed=SEED)
    ref = reference_model(cfg)
    for name, tensor in to_reference_state_dict(model).items():  # layout-free init: bitwise equal
        if not torch.equal(tensor, ref.state_dict()[name]):
            raise AssertionError(f"rank {dist.get_rank()}: initial {name} differs from the reference")
    batch = make_batch(ctx, 2, 32, cfg.model.vocab_size)
    for mode in ("sparse", "dense"):
        check_logits(model, ref, batch, ctx, mode, mode)
        check_loss_and_grads(model, ref, batch, ctx, mode, mode)
    check_speed_settings(model, ref, batch, ctx)


def check_logits(model, ref, batch, ctx: ParallelContext, mode: str, what: str, order: str = "zigzag") -> None:
    """The model's logits, gathered over TP (and over CP, chunks in ``order``), equal the reference's."""
    logits = model(batch["input_ids"], attention_mode=mode).detach()
    pieces = [torch.empty_like(logits) for _ in range(ctx.tp)]
    dist.all_gather(pieces, logits.contiguous(), group=ctx.tp_group)
    logits = torch.cat(pieces, -1)
    if ctx.cp > 1:
        logits = gather_sequence(logits, ctx, order)
    check_close(f"{what} logits", logits, ref(batch["input_ids"], attention_mode=mode).logits, 1e-5)


def check_loss_and_grads(model, ref, batch, ctx: ParallelContext, mode: str, what: str) -> None:
    """The loss and every gradient (summed over the CP ranks, as DeepSpeed reduces them) equal the reference's."""
    model.zero_grad()
    ref.zero_grad()
    loss = model(batch["input_ids"], batch["labels"], attention_mode=mode)
    loss.backward()
    ref_loss = F.cross_entropy(ref(batch["input_ids"], attention_mode=mode).logits.flatten(0, 1),
                               batch["labels"].flatten(), ignore_index=-100)
    ref_loss.backward()
    check_close(f"{what} loss", loss.detach(), ref_loss.detach(), 1e-5)
    if ctx.cp > 1:
        for param in model.parameters():
            dist.all_reduce(param.grad, group=ctx.cp_group)
    grads = to_reference_state_dict(model, grads=True)
    for name, param in ref.named_parameters():
        check_close(f"{what} grad {name}", grads[name], param.grad, 1e-4)


def check_speed_settings(model, ref, batch, ctx: ParallelContext) -> None:
    """Selective recompute and the loss over chunks of 5 positions (under SP, each chunk gathered from every TP
    rank) give the reference's loss and gradients."""
    apply_recompute(model, "selective")
    model.loss_chunk_tokens = 5
    check_loss_and_grads(model, ref, batch, ctx, "sparse", "recompute + chunked loss:")
    apply_recompute(model, "none")
    model.loss_chunk_tokens = 0


def gather_sequence(local: torch.Tensor, ctx: ParallelContext, order: str) -> torch.Tensor:
    """The whole-sequence tensor (time along dim 1) from every CP rank's chunks."""
    from ratplus_mega.model.context_parallel import SequenceChunks

    pieces = [torch.empty_like(local) for _ in range(ctx.cp)]
    dist.all_gather(pieces, local.contiguous(), group=ctx.cp_group)
    full = local.new_empty((local.shape[0], local.shape[1] * ctx.cp, *local.shape[2:]))
    for rank, piece in enumerate(pieces):
        full[:, SequenceChunks(full.shape[1], ctx.cp, rank, order).positions()] = piece
    return full


def run_context_parallel(layout: str, ctx: ParallelContext) -> None:
    """Every pattern of ``CP_PATTERNS``, zigzag and contiguous, sparse and dense: logits, loss and every
    gradient (summed over the CP ranks, as DeepSpeed reduces them) equal the one-process reference model's."""
    import dataclasses

    for name, pattern in CP_PATTERNS.items():
        cfg = load_config("configs/model/tiny.yaml", LAYOUTS[layout] + pattern + [f"model.seq_len={CP_SEQ}"])
        ref = reference_model(cfg)
        batch = make_batch(ctx, 2, CP_SEQ, cfg.model.vocab_size)
        for order in ("zigzag", "contiguous"):
            ctx = dataclasses.replace(ctx, cp_order=order)
            model = build_model(cfg.model, ctx, seed=SEED)
            for mode in ("sparse", "dense"):
                what = f"{name} {order} {mode}"
                check_logits(model, ref, batch, ctx, mode, what, order)
                check_loss_and_grads(model, ref, batch, ctx, mode, what)
            if name == "D4-W5-P2":  # the recomputed core re-enters the CP collectives in backward
                check_speed_settings(model, ref, batch, ctx)


def run_context_parallel_training(layout: str, ctx: ParallelContext, zero_stage: int) -> None:
    """3 clipped fp32 AdamW steps through ``build_step_runner``/``build_engine``/``train_step`` (the run's own
    path; DeepSpeed sums gradients over CP and averages over DP): losses and gradient norms equal one process
    stepping on the whole batch."""
    cfg = load_config("configs/model/tiny.yaml", PATTERN + LAYOUTS[layout] + [
        f"parallel.zero_stage={zero_stage}", "train.precision=fp32", f"model.seq_len={BF16_SEQ}",
        f"train.micro_batch_size={BF16_BATCH}",
        f"train.global_batch_size={BF16_BATCH * BF16_MICRO * ctx.dp}", f"train.lr={BF16_LR}", "train.adam_eps=1e-6",
        f"train.grad_clip={BF16_CLIP}", "train.weight_decay=0.1"])
    runner = build_step_runner(ctx, seq_len=BF16_SEQ)
    engine = build_engine(cfg, ctx, build_model(cfg.model, ctx, seed=SEED), runner)
    steps, losses, norms = [], [], []
    for step in range(BF16_STEPS):
        ranks = bf16_batches(cfg, ctx.dp, step)
        result = train_step(runner, engine, ranks[ctx.dp_rank], lr=BF16_LR, joint=False)
        losses.append(result.sparse.loss)
        norms.append(result.sparse.grad_norm)
        steps.append([b for micro in ranks for b in micro])
    want_losses, want_norms = reference_training(cfg, steps, torch.float32)
    check_close(f"CP ZeRO-{zero_stage} losses of {BF16_STEPS} steps", torch.tensor(losses, dtype=torch.float64),
                want_losses, 1e-5)
    if zero_stage > 0:  # DeepSpeed's ZeRO-0 clips without reporting the norm; the losses above carry the clipping
        check_close(f"CP ZeRO-{zero_stage} gradient norms of {BF16_STEPS} steps",
                    torch.tensor(norms, dtype=torch.float64), want_norms, 1e-5)


def run_data_parallel_zero(cfg, ctx: ParallelContext) -> None:
    """DeepSpeed ZeRO over 2 DP ranks equals one process stepping on the global batch (3 AdamW steps)."""
    import deepspeed

    from ratplus_mega.parallel.deepspeed_mpu import DeepSpeedMpu

    opt = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)
    ds_config = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2 * ctx.dp,
        "gradient_clipping": 1.0, "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "optimizer": {"type": "AdamW", "params": {**opt, "betas": list(opt["betas"]), "torch_adam": True}},
    }
    model = build_model(cfg.model, ctx, seed=SEED)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                      mpu=DeepSpeedMpu(ctx))
    ref = reference_model(cfg)
    ref_opt = torch.optim.AdamW(ref.parameters(), **opt)
    for step in range(3):
        batch = make_batch(ctx, 2, 32, cfg.model.vocab_size)
        everyone = [None] * ctx.dp
        dist.all_gather_object(everyone, batch, group=ctx.dp_group)
        loss = engine(batch["input_ids"], batch["labels"])
        engine.backward(loss)
        engine.step()
        ref_opt.zero_grad()
        ref_loss = sum(F.cross_entropy(ref(b["input_ids"]).logits.flatten(0, 1), b["labels"].flatten(),
                                       ignore_index=-100) for b in everyone) / ctx.dp
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        check_close(f"step {step} gradient norm", torch.as_tensor(engine.get_global_grad_norm()), ref_norm, 1e-5)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss, group=ctx.dp_group)
        check_close(f"step {step} loss", mean_loss / ctx.dp, ref_loss.detach(), 1e-5)
    params = to_reference_state_dict(engine.module)
    for name, param in ref.named_parameters():
        check_close(f"weights after 3 steps: {name}", params[name], param.detach(), 1e-4)


def run_pipeline_zero(cfg, ctx: ParallelContext) -> None:
    """TP x PP under DeepSpeed ZeRO-1, megatron-core's 1F1B schedule owning backward: gradients before the
    step, and three optimizer steps, equal one process accumulating the same micro-batches."""
    import deepspeed

    from ratplus_mega.parallel.deepspeed_mpu import DeepSpeedMpu
    from ratplus_mega.parallel.pipeline import finalize_tied_embedding, forward_backward, mark_tied_copy

    num_micro, micro_bs, seq_len = 2, 2, 32
    opt = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)
    ds_config = {
        "train_micro_batch_size_per_gpu": micro_bs, "gradient_accumulation_steps": num_micro,
        "train_batch_size": micro_bs * num_micro * ctx.dp, "gradient_clipping": 1.0,
        "managed_gradient_accumulation": False, "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "optimizer": {"type": "AdamW", "params": {**opt, "betas": list(opt["betas"]), "torch_adam": True}},
    }
    model = build_model(cfg.model, ctx, seed=SEED)
    mark_tied_copy(model)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config,
                                      mpu=DeepSpeedMpu(ctx))
    ref = reference_model(cfg)
    ref_opt = torch.optim.AdamW(ref.parameters(), **opt)
    for step in range(3):
        g = torch.Generator().manual_seed(SEED + 100 * step + ctx.dp_rank)
        batches = []
        for _ in range(num_micro):
            tokens = torch.randint(0, cfg.model.vocab_size, (micro_bs, seq_len + 1), generator=g)
            batches.append({"input_ids": tokens[:, :-1], "labels": tokens[:, 1:].clone()})
        losses = forward_backward(engine.module, batches, num_microbatches=num_micro, seq_len=seq_len,
                                  micro_batch_size=micro_bs)
        finalize_tied_embedding(engine.module)
        ref_opt.zero_grad()
        ref_losses = []
        for b in batches:
            loss = F.cross_entropy(ref(b["input_ids"]).logits.flatten(0, 1), b["labels"].flatten()) / num_micro
            loss.backward()
            ref_losses.append(loss.detach() * num_micro)
        if step == 0:
            grads = to_reference_state_dict(engine.module, grads=True)
            for name, param in ref.named_parameters():
                check_close(f"grad {name}", grads[name], param.grad, 1e-4)
        for got, want in zip(losses, ref_losses):
            check_close(f"step {step} micro-batch loss", got, want, 1e-5)
        engine.step()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        check_close(f"step {step} gradient norm", torch.as_tensor(engine.get_global_grad_norm()), ref_norm, 1e-5)
        check_tied_copies_equal(engine.module)
    params = to_reference_state_dict(engine.module)
    for name, param in ref.named_parameters():
        check_close(f"weights after 3 steps: {name}", params[name], param.detach(), 1e-4)


# bf16 parity: 3 steps of 2 micro-batches of (2, 32) per data-parallel rank, clipped at 0.5 (the tiny model's
# gradient norm is above 1 here, so every step is clipped and the norm enters the update).
BF16_STEPS, BF16_MICRO, BF16_BATCH, BF16_SEQ, BF16_CLIP, BF16_LR = 3, 2, 2, 32, 0.5, 1e-3
# The bf16 run may be off the fp32 reference by BF16_FACTOR times torch's own bf16 error on the same steps
# (the reference model cast to bf16, fp32 master weights and accumulation: reference_training) plus
# BF16_ATOL, both relative to the reference's scale. Measured with these shapes: the losses 0.9x (DP) to 2.1x
# (TP=2 x PP=2) of torch's error, the gradient norms 0.5x-0.7x (docs/decisions.md, "bf16"); a wrong or missing
# reduction puts the norm off by 1e-1 or more.
BF16_FACTOR, BF16_ATOL = 4.0, 1e-5


def bf16_batches(cfg, dp: int, step: int) -> list[list[dict[str, torch.Tensor]]]:
    """Every data-parallel rank's micro-batches of ``step``, made alike on every rank (no broadcast needed)."""
    g = torch.Generator().manual_seed(SEED + 1000 + step)
    ranks = []
    for _ in range(dp):
        micro = []
        for _ in range(BF16_MICRO):
            tokens = torch.randint(0, cfg.model.vocab_size, (BF16_BATCH, BF16_SEQ + 1), generator=g)
            labels = tokens[:, 1:].clone()
            labels[0, :3] = -100
            micro.append({"input_ids": tokens[:, :-1], "labels": labels})
        ranks.append(micro)
    return ranks


def reference_training(cfg, steps: list[list[dict]], compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One process, the whole batch of each step: the mean micro-batch loss and the gradient norm of every step
    of clipped AdamW. fp32 master weights, optimizer state and gradient accumulation; forward and backward of
    the reference model cast to ``compute_dtype`` (bf16: torch's own bf16, the baseline of the tolerance)."""
    master = reference_model(cfg)
    model = master if compute_dtype == torch.float32 else copy.deepcopy(master).to(compute_dtype)
    opt = torch.optim.AdamW(master.parameters(), lr=BF16_LR, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)
    losses, norms = [], []
    for micro_batches in steps:
        if model is not master:
            model.load_state_dict(master.state_dict())
        grads = [torch.zeros_like(p) for p in master.parameters()]
        total = 0.0
        for b in micro_batches:
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(b["input_ids"]).logits.float().flatten(0, 1), b["labels"].flatten(),
                                   ignore_index=-100)
            (loss / len(micro_batches)).backward()
            for grad, p in zip(grads, model.parameters()):
                grad += p.grad.float()
            total += loss.item() / len(micro_batches)
        for grad, p in zip(grads, master.parameters()):
            p.grad = grad
        norms.append(torch.nn.utils.clip_grad_norm_(master.parameters(), BF16_CLIP).item())
        opt.step()
        losses.append(total)
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(norms, dtype=torch.float64)


def run_bf16_training(layout: str, ctx: ParallelContext, zero_stage: int) -> None:
    """3 clipped bf16 steps through ``build_step_runner``/``build_engine``/``train_step`` (the run's own path):
    losses and gradient norms against the fp32 reference within the bf16 tolerance; under pipeline parallel
    the tied embedding copies stay bitwise equal after every step."""
    cfg = load_config("configs/model/tiny.yaml", PATTERN + LAYOUTS[layout] + [
        f"parallel.zero_stage={zero_stage}", "train.precision=bf16", f"train.micro_batch_size={BF16_BATCH}",
        f"train.global_batch_size={BF16_BATCH * BF16_MICRO * ctx.dp}", f"train.lr={BF16_LR}", "train.adam_eps=1e-6",
        f"train.grad_clip={BF16_CLIP}", "train.weight_decay=0.1"])
    runner = build_step_runner(ctx, seq_len=BF16_SEQ, precision="bf16")
    engine = build_engine(cfg, ctx, build_model(cfg.model, ctx, seed=SEED), runner)
    if ctx.pp > 1:
        check_no_bf16_accumulation(engine)
    steps, losses, norms = [], [], []
    for step in range(BF16_STEPS):
        ranks = bf16_batches(cfg, ctx.dp, step)
        result = train_step(runner, engine, ranks[ctx.dp_rank], lr=BF16_LR, joint=False)
        losses.append(result.sparse.loss)
        norms.append(result.sparse.grad_norm)
        left = [name for name, p in engine.module.named_parameters() if p.grad is not None]
        if left:
            raise AssertionError(f"rank {dist.get_rank()}: step {step} left bf16 gradients for the next step: {left}")
        if ctx.pp > 1:
            check_tied_copies_equal(engine.module)
        steps.append([b for micro in ranks for b in micro])
    oracle = reference_training(cfg, steps, torch.float32)
    baseline = reference_training(cfg, steps, torch.bfloat16)
    got = (torch.tensor(losses, dtype=torch.float64), torch.tensor(norms, dtype=torch.float64))
    for i, what in enumerate(("losses", "gradient norms")):
        name = f"rank {dist.get_rank()}: bf16 ZeRO-{zero_stage} {what} of {BF16_STEPS} steps"
        if os.environ.get("RATPLUS_PARITY_REPORT") and dist.get_rank() == 0:
            print(f"{measure(name, got[i], oracle[i])}; torch bf16: {measure('', baseline[i], oracle[i]).rel:.3e}",
                  flush=True)
        compare_to_baseline(name, got[i], baseline[i], oracle[i], factor=BF16_FACTOR, atol=BF16_ATOL)


def check_no_bf16_accumulation(engine) -> None:
    """Under pipeline parallel, each micro-batch's bf16 gradient must reach the fp32 buffers as it arrives: a
    bf16 ``.grad`` still held at the step was summed over micro-batches in bf16."""
    step = engine.step

    def checked_step(*args, **kwargs):
        held = [name for name, p in engine.module.named_parameters() if p.grad is not None]
        if held:
            raise AssertionError(f"rank {dist.get_rank()}: bf16 gradients accumulated over the micro-batches in "
                                 f".grad at the step: {held}")
        return step(*args, **kwargs)

    engine.step = checked_step


def check_tied_copies_equal(model) -> None:
    if not (model.pre_process or model.post_process):
        return
    mine = (model.embedding.weight if model.pre_process else model.output_weight).detach()
    both = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(both, mine.contiguous(), group=model.ctx.embedding_group)
    if not torch.equal(both[0], both[1]):
        raise AssertionError(f"rank {dist.get_rank()}: the tied embedding copies differ")


def main(layout: str) -> None:
    if "zero" in layout or layout in BF16_CHECKS or layout in CP_TRAINING:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # avoids a 2-3 minute op build on CPU
    dist.init_process_group("gloo")
    torch.manual_seed(SEED)
    cfg = load_config("configs/model/tiny.yaml", PATTERN + LAYOUTS[layout])
    ctx = ParallelContext.initialize(cfg.parallel)
    if layout.startswith("cp"):
        if layout in ("cp2", "cp4", "cp2-tp2"):
            run_context_parallel(layout, ctx)
        for zero_stage in CP_TRAINING.get(layout, ()):
            run_context_parallel_training(layout, ctx, zero_stage)
    elif layout.startswith("dp"):
        run_data_parallel_zero(cfg, ctx)
    elif "pp" in layout:
        run_pipeline_zero(cfg, ctx)
    else:
        run_tensor_parallel(cfg, ctx)
    for zero_stage in BF16_CHECKS.get(layout, ()):
        run_bf16_training(layout, ctx, zero_stage)
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"{layout}: parity checks passed on {dist.get_world_size()} ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
