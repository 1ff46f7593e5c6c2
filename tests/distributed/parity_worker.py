"""Multi-rank parity checks of the training model against the reference model, one layout per launch.

    torchrun --nproc-per-node N tests/distributed/parity_worker.py LAYOUT

Every rank builds the full reference model (pure torch, one process's view) from the same layout-free
initial weights and compares logits, losses, gradients and optimizer steps with the parallel run. Any
mismatch raises, so the launch exits non-zero; the pytest wrapper only checks the exit code.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("RATPLUS_DISABLE_KERNELS", "1")

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ratplus_mega.config import load_config
from ratplus_mega.hf import RatPlusForCausalLM
from ratplus_mega.kernels.testing import compare
from ratplus_mega.model import build_model
from ratplus_mega.model.init import reference_init_state_dict
from ratplus_mega.model.mapping import to_reference_state_dict
from ratplus_mega.reference_layout import reference_config
from ratplus_mega.parallel import ParallelContext
from ratplus_mega.parallel.broadcast import broadcast_batch

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
}


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
        logits = model(batch["input_ids"], attention_mode=mode).detach()
        pieces = [torch.empty_like(logits) for _ in range(ctx.tp)]
        dist.all_gather(pieces, logits.contiguous(), group=ctx.tp_group)
        ref_logits = ref(batch["input_ids"], attention_mode=mode).logits
        check_close(f"{mode} logits", torch.cat(pieces, -1), ref_logits, 1e-5)

        model.zero_grad()
        ref.zero_grad()
        loss = model(batch["input_ids"], batch["labels"], attention_mode=mode)
        loss.backward()
        ref_loss = F.cross_entropy(ref(batch["input_ids"], attention_mode=mode).logits.flatten(0, 1),
                                   batch["labels"].flatten(), ignore_index=-100)
        ref_loss.backward()
        check_close(f"{mode} loss", loss.detach(), ref_loss.detach(), 1e-5)
        grads = to_reference_state_dict(model, grads=True)
        for name, param in ref.named_parameters():
            check_close(f"{mode} grad {name}", grads[name], param.grad, 1e-4)


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


def check_tied_copies_equal(model) -> None:
    if not (model.pre_process or model.post_process):
        return
    mine = (model.embedding.weight if model.pre_process else model.output_weight).detach()
    both = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(both, mine.contiguous(), group=model.ctx.embedding_group)
    if not torch.equal(both[0], both[1]):
        raise AssertionError(f"rank {dist.get_rank()}: the tied embedding copies differ")


def main(layout: str) -> None:
    if "zero" in layout:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # avoids a 2-3 minute op build on CPU
    dist.init_process_group("gloo")
    torch.manual_seed(SEED)
    cfg = load_config("configs/model/tiny.yaml", PATTERN + LAYOUTS[layout])
    ctx = ParallelContext.initialize(cfg.parallel)
    if layout.startswith("dp"):
        run_data_parallel_zero(cfg, ctx)
    elif "pp" in layout:
        run_pipeline_zero(cfg, ctx)
    else:
        run_tensor_parallel(cfg, ctx)
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"{layout}: parity checks passed on {dist.get_world_size()} ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
