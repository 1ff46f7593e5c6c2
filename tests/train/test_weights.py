"""Adaptation weights from an HF folder land in the training model exactly (any layout: through the mapping)."""


import pytest
import torch

from ratplus_mega.config import load_config
from ratplus_mega.export.hf_folder import write_hf_folder
from ratplus_mega.model import build_model
from ratplus_mega.model.init import reference_init_state_dict
from ratplus_mega.model.mapping import to_reference_state_dict
from ratplus_mega.reference_layout import reference_config
from ratplus_mega.parallel import ParallelContext
from ratplus_mega.train.weights import load_pretrained_weights


class _Engine:  # what load_pretrained_weights needs of a DeepSpeed engine on this path
    def __init__(self, module):
        self.module = module


def test_hf_folder_weights_load_into_the_training_model(single_rank, tmp_path):
    cfg = load_config("configs/model/tiny.yaml")
    ctx = ParallelContext.initialize(cfg.parallel)
    weights = reference_init_state_dict(cfg.model, seed=42)
    folder = write_hf_folder(tmp_path / "hf", reference_config(cfg.model), weights, dtype=torch.float32)
    model = build_model(cfg.model, ctx, seed=1)
    load_pretrained_weights(_Engine(model), str(folder), tp=1, pp=1)
    loaded = to_reference_state_dict(model)
    for name, tensor in weights.items():
        assert torch.equal(loaded[name], tensor), name


def test_missing_source_is_a_clear_error(single_rank, tmp_path):
    with pytest.raises(ValueError, match="neither an HF folder nor holds a committed checkpoint"):
        load_pretrained_weights(_Engine(None), str(tmp_path), tp=1, pp=1)
    with pytest.raises(ValueError, match="needs a pretraining checkpoint"):
        load_pretrained_weights(_Engine(None), None, tp=1, pp=1)
