"""Joining the job's process group: from a launcher's environment (torchrun, the deepspeed launcher), from
srun's (one task per GPU, ranks from SLURM's variables), or alone (no launcher).

The device is decided here, once, before anything touches CUDA: ``parallel.device`` ``auto`` takes CUDA when
a GPU is visible and the CPU (gloo) otherwise, ``cuda`` stops a rank that sees no GPU instead of letting it
fall back to the CPU, ``cpu`` hides the GPUs.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

# The variables torchrun sets, and where srun keeps the same facts.
_FROM_SLURM = {"RANK": "SLURM_PROCID", "WORLD_SIZE": "SLURM_NTASKS", "LOCAL_RANK": "SLURM_LOCALID"}


def init_distributed(device: str = "auto") -> None:
    """Join the launcher's process group, or form a one-process group when run without a launcher.

    Without a launcher and without ``MASTER_PORT``, the group's store listens on a port the kernel picks (and
    ``MASTER_PORT`` is set to it), so that several runs on one host never contend for a fixed port; a
    ``MASTER_PORT`` the user sets is used as given."""
    if dist.is_initialized():
        return
    _select_device(device)
    _ranks_from_srun()
    prepare_deepspeed_for_cpu()
    store = None
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # no launcher (or a one-process one): fill in what is missing
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(key, value)
        if "MASTER_PORT" not in os.environ:
            store = _store_on_free_port(os.environ["MASTER_ADDR"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if store is None:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=store, rank=0, world_size=1)


def _select_device(device: str) -> None:
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA is initialised: torch and DeepSpeed see no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif device == "cuda" and not torch.cuda.is_available():
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        raise RuntimeError(f"parallel.device=cuda, but rank {rank} on {socket.gethostname()} sees no CUDA device "
                           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); request GPUs "
                           "from the scheduler, or set parallel.device=cpu to train on the CPU")


def _ranks_from_srun() -> None:
    """Under srun (one task per GPU, no torchrun) take the ranks from SLURM's variables."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_STEP_ID" not in os.environ:
        return
    for key, slurm_key in _FROM_SLURM.items():
        os.environ[key] = os.environ[slurm_key]
    tasks_here = os.environ.get("SLURM_STEP_TASKS_PER_NODE", os.environ.get("SLURM_TASKS_PER_NODE", "1"))
    os.environ["LOCAL_WORLD_SIZE"] = tasks_here.split("(")[0].split(",")[0]  # "8(x4)": 8 on each of 4 nodes
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("srun without MASTER_ADDR: export the first node's address (launch/train_slurm.sbatch "
                           "does) so that the ranks can meet")


def _store_on_free_port(host: str) -> dist.TCPStore:
    """A one-process TCPStore listening on a port the kernel assigns (bound once: no window in which another
    process could take it); ``MASTER_PORT`` is set to that port for anything that reads it later."""
    store = dist.TCPStore(host, 0, world_size=1, is_master=True)
    os.environ["MASTER_PORT"] = str(store.port)
    return store


def prepare_deepspeed_for_cpu() -> None:
    """On a machine without CUDA: skip a shared-memory op that DeepSpeed would otherwise compile for minutes."""
    if not torch.cuda.is_available():
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
