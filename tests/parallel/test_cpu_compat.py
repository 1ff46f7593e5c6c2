"""Guards for the megatron-core internals the CPU patches and the stage config rely on (pinned 0.16.x)."""

import dataclasses
import importlib
import re
from pathlib import Path

import megatron.core
import pytest
import torch

from ratplus_mega.parallel.cpu_compat import PATCHED_NAMES, apply_cpu_patches
from ratplus_mega.parallel.megatron_config import StageConfig


def test_megatron_core_version_is_the_pinned_line():
    assert megatron.core.__version__.startswith("0.16."), megatron.core.__version__


@pytest.mark.parametrize("dotted", PATCHED_NAMES)
def test_patched_names_exist(dotted):
    module, _, attr = dotted.rpartition(".")
    assert hasattr(importlib.import_module(module), attr), f"{dotted} moved: revisit parallel/cpu_compat.py"


def test_schedules_allocate_on_cuda_only_through_torch_factories():
    """The schedules patch redirects ``torch.zeros(..., device="cuda")``; any other CUDA use must be absent."""
    from megatron.core.pipeline_parallel import schedules

    source = Path(schedules.__file__).read_text()
    for line in source.splitlines():
        if 'device="cuda"' in line:
            assert re.search(r"torch\.(zeros|empty|ones|tensor)\(", line), line


def test_stage_config_defines_every_field_the_schedules_read():
    from megatron.core.pipeline_parallel import p2p_communication, schedules

    source = Path(schedules.__file__).read_text() + Path(p2p_communication.__file__).read_text()
    fields = {f.name for f in dataclasses.fields(StageConfig)}
    missing = sorted(set(re.findall(r"config\.(\w+)", source)) - fields)
    assert not missing, f"megatron-core's schedules read config fields StageConfig lacks: {missing}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the patches apply only without CUDA")
def test_patches_redirect_cuda_to_cpu():
    assert apply_cpu_patches()
    assert torch.cuda.current_device() == "cpu"
    from megatron.core.pipeline_parallel import schedules

    assert schedules.torch.zeros([], device="cuda").device.type == "cpu"
    from megatron.core.tensor_parallel import random as mc_random

    state = mc_random._get_cuda_rng_state()
    a = torch.rand(3)
    mc_random._set_cuda_rng_state(state)
    assert torch.equal(torch.rand(3), a)
