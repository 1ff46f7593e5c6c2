"""Hand one reader's batch to its model-parallel peers (device-agnostic).

megatron-core's ``tensor_parallel.broadcast_data`` hard-codes CUDA; this sends the batch's shapes and
dtypes first, then the tensors, over any backend (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def broadcast_batch(batch: dict[str, torch.Tensor] | None, *, src: int, group, device: torch.device | str = "cpu"
                    ) -> dict[str, torch.Tensor]:
    """Return ``batch`` as held by global rank ``src`` on every rank of ``group``.

    The source passes its batch; the others pass None. Tensors arrive contiguous on ``device``."""
    is_src = dist.get_rank() == src
    if is_src and batch is None:
        raise ValueError(f"broadcast_batch: the source rank {src} has no batch to send")
    header = [[(k, tuple(v.shape), v.dtype) for k, v in batch.items()] if is_src else None]
    dist.broadcast_object_list(header, src=src, group=group)
    out = {}
    for key, shape, dtype in header[0]:
        tensor = batch[key].to(device).contiguous() if is_src else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(tensor, src=src, group=group)
        out[key] = tensor
    return out
