"""Resume on another layout: a committed ZeRO-1/2 checkpoint's fp32 master weights and both Adam moments,
read one parameter at a time in the reference layout and cut for this run's TP rank into a fresh engine.

DeepSpeed's ZeRO-1/2 optimizer (and its ``BF16_Optimizer``) saves, per tensor x pipeline rank and partition, a
flat fp32 master partition, Adam's ``exp_avg``/``exp_avg_sq`` over the same flat range, and
``param_slice_mappings``: where each parameter's fragment lies in that range. A parameter is its fragments in
partition order; its TP pieces are joined through ``reference_layout.py`` (the table the model is sharded by,
also for the fused rank-major projection). The receiving engine's own fragment map (``_hp_mapping``, the one
DeepSpeed's universal checkpoint loads through) says which part of each tensor this rank keeps. Files are
memory-mapped: a rank holds one parameter's tensors at a time, and ranks on one node share the page cache.
Context-parallel ranks hold the same weights and ZeRO partitions over DP x CP, so a CP checkpoint's partitions
read like a DP one's and a CP run's engine places its fragments like any other.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config.schema import ModelConfig
from ..reference_layout import join, layout_of, shard
from .trust import safe_load

STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")
RELAYOUT_ZERO_STAGES = (1, 2)
_OPTIM = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")


def relayout_refusal(checkpoint: Path, *, saved: dict[str, int], saved_zero: int, layout: dict[str, int],
                     zero: int) -> str | None:
    """Why a run of ``layout`` at ZeRO-``zero`` cannot continue ``checkpoint`` (``saved`` at ZeRO-``saved_zero``),
    in one line; None when it can."""
    why = None
    if saved_zero not in RELAYOUT_ZERO_STAGES or zero not in RELAYOUT_ZERO_STAGES:
        why = "changing the layout needs ZeRO-1 or ZeRO-2 on both sides"
    if why is None:
        return None
    return (f"{checkpoint} was written with layout {saved} at ZeRO-{saved_zero}, this run is {layout} at "
            f"ZeRO-{zero}: {why}; resume with the checkpoint's layout and ZeRO stage, or start from its weights "
            "alone (train.init_from with the same tp and pp, or an HF folder from ratplus export-hf)")


class SavedTrainingState:
    """The fp32 weights and Adam moments of a committed ZeRO-1/2 checkpoint written with ``tp`` x ``pp``
    model-parallel ranks, as reference-layout tensors (:meth:`reference`)."""

    def __init__(self, checkpoint: Path, model: ModelConfig, *, tp: int):
        self.model = model
        files: dict[int, list[tuple[int, Path]]] = {}  # model-parallel rank -> (partition, file)
        for file in checkpoint.iterdir():
            if match := _OPTIM.fullmatch(file.name):
                files.setdefault(int(match.group(2)), []).append((int(match.group(1)), file))
        if not files:
            raise ValueError(f"{checkpoint} holds no ZeRO optimizer partitions (written at ZeRO-0 or ZeRO-3?)")
        self._partitions = {mp: [safe_load(f, mmap=True)["optimizer_state_dict"] for _, f in sorted(found)]
                            for mp, found in files.items()}
        self._where: dict[str, dict[int, tuple[int, str, torch.Size]]] = {}  # reference -> tp rank -> place
        for mp_rank in sorted(files, reverse=True):  # model-parallel rank 0 last: its counters are kept
            states = safe_load(checkpoint / f"mp_rank_{mp_rank:02d}_model_states.pt", mmap=True)
            self.engine_counters = {key: states[key] for key in ("global_steps", "global_samples", "skipped_steps")}
            """DeepSpeed's step and sample counters, which its own load restores."""
            for name, shape in (item for group in states["param_shapes"] for item in group.items()):
                if name != "output_weight":  # the last stage's copy of the tied embedding: the same state
                    # megatron orders a model-parallel group tensor-parallel first
                    self._where.setdefault(layout_of(name).reference_name, {})[mp_rank % tp] = (mp_rank, name, shape)
        first = self._partitions[min(files)][0]["base_optimizer_state"]["state"][0]
        self.step = first["step"].clone()
        """Adam's step count (its bias correction), the same in every group and partition."""

    def reference(self, reference_name: str, key: str) -> torch.Tensor:
        """The whole reference tensor ``reference_name`` of ``key`` (one of :data:`STATE_KEYS`), fp32."""
        places = self._where[reference_name]
        pieces = [self._piece(*places[r], key) for r in sorted(places)]
        return join(pieces, layout_of(places[0][1]).kind, self.model)

    def _piece(self, mp_rank: int, name: str, shape: torch.Size, key: str) -> torch.Tensor:
        fragments = []
        for partition in self._partitions[mp_rank]:  # in partition order: a parameter's fragments are consecutive
            for group, slices in enumerate(partition["param_slice_mappings"]):
                if name in slices:
                    flat = (partition["single_partition_of_fp32_groups"][group] if key == "fp32"
                            else partition["base_optimizer_state"]["state"][group][key])
                    fragments.append(flat.narrow(0, slices[name].start, slices[name].numel))
        return torch.cat(fragments).view(shape).float()


def place_training_state(engine, saved: SavedTrainingState) -> None:
    """Set ``engine``'s module weights, fp32 master partition and Adam state (moments and step) to ``saved``,
    each parameter cut for this rank's tensor-parallel rank. ``engine`` is fresh: DeepSpeed's ZeRO-1/2 optimizer
    or its ``BF16_Optimizer``, which create Adam's state only at their first step."""
    model, optimizer = engine.module, engine.optimizer
    lp_groups = getattr(optimizer, "bit16_groups", None) or optimizer.bf16_groups
    names = {param: name for name, param in model.named_parameters()}
    with torch.no_grad():
        for group, hp in enumerate(g["params"][0] for g in optimizer.optimizer.param_groups):
            moments = {key: torch.zeros_like(hp) for key in STATE_KEYS[1:]}
            for lp in lp_groups[group]:
                layout = layout_of(names[lp])
                values = {key: shard(saved.reference(layout.reference_name, key), layout.kind, saved.model,
                                     tp=model.ctx.tp, rank=model.ctx.tp_rank).reshape(-1) for key in STATE_KEYS}
                lp.copy_(values["fp32"].view_as(lp))  # every ZeRO-1/2 rank holds the whole module weight
                mapping = lp._hp_mapping
                if mapping is None:  # no fragment of it in this rank's partition
                    continue
                mine = mapping.lp_fragment_address
                mapping.hp_fragment.copy_(values["fp32"].narrow(0, mine.start, mine.numel))
                at = mapping.hp_fragment_address
                for key, buffer in moments.items():
                    buffer.narrow(0, at.start, at.numel).copy_(values[key].narrow(0, mine.start, mine.numel))
            optimizer.optimizer.state[hp] = {"step": saved.step.clone(), **moments}
    for key, value in saved.engine_counters.items():
        setattr(engine, key, value)
    if hasattr(optimizer, "_hp_optimizer_states_linked"):
        optimizer._hp_optimizer_states_linked = False  # re-link the fragments' views to the new state
