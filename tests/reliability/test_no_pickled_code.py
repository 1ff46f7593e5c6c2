"""No file is ever unpickled as code. A payload (an object whose unpickling runs code: here it writes a marker
file) planted in each kind of file is refused by every command that reads that kind, in one line naming the file
and the global, and the payload never runs: model states, optimizer states and our rank-state file (train
resume, adaptation's init_from, export-hf, generate on a run), an HF folder's weights (generate, init_from) and a
public checkpoint (import-public).

Was: ``export-hf`` and ``generate --model RUN`` loaded DeepSpeed's files with ``weights_only=False`` (in
``consolidate`` and inside ``zero_to_fp32``), and a payload planted in the newest ``mp_rank_00_model_states.pt``
ran in both; train resume unpickled every DeepSpeed file in full."""

from __future__ import annotations

import argparse
import pickle

import pytest
import torch

from ratplus_mega.checkpoint.trust import ALLOWED_GLOBALS, FileRefused, restricted_loads, safe_load, unlisted_globals

from .checkpoint_files import (FILE_KINDS, MODEL_STATES, OPTIMIZER_STATES, RANK_STATE, Payload, checkpoint, copy_run,
                               plant)
from .conftest import train_args

DEEPSPEED_OPTIMIZER_CLASSES = ["deepspeed.runtime.fp16.loss_scaler.LossScaler",
                               "deepspeed.runtime.zero.config.ZeroStageEnum",
                               "deepspeed.utils.tensor_fragment.fragment_address"]


def test_the_payload_runs_when_unpickled_in_full(tiny_run, tmp_path):
    """The control: what every test below plants is live code for a full unpickler."""
    run, marker = copy_run(tiny_run, tmp_path), tmp_path / "payload-ran"
    plant(checkpoint(run, 2) / MODEL_STATES, marker)
    torch.load(checkpoint(run, 2) / MODEL_STATES, weights_only=False)
    assert marker.read_text() == "the payload ran"


def test_checkpoint_files_hold_only_the_allow_listed_classes(tiny_run):
    """Measured: model states and our rank state hold tensors and containers only, the ZeRO optimizer states
    three DeepSpeed classes; all of them are on the one list, and they load weights-only."""
    step = checkpoint(tiny_run, 2)
    assert unlisted_globals(step / MODEL_STATES) == ([], [])
    assert unlisted_globals(step / RANK_STATE) == ([], [])
    assert unlisted_globals(step / OPTIMIZER_STATES) == (DEEPSPEED_OPTIMIZER_CLASSES, [])
    assert set(DEEPSPEED_OPTIMIZER_CLASSES) <= set(ALLOWED_GLOBALS)
    assert type(safe_load(step / OPTIMIZER_STATES)["optimizer_state_dict"]["loss_scaler"]).__name__ == "LossScaler"


def test_the_allow_list_is_the_only_one(tmp_path):
    """Classes another library marked safe process-wide (megatron-core marks argparse.Namespace, BytesIO, ...)
    are still refused: only ALLOWED_GLOBALS counts."""
    path = tmp_path / "state.pt"
    torch.save({"args": argparse.Namespace(lr=1.0)}, path)
    saved = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        assert unlisted_globals(path) == (["argparse.Namespace"], ["argparse.Namespace"])
        with pytest.raises(FileRefused, match=r"state.pt holds argparse.Namespace, which no file loaded here may "
                                              r"hold; it was not loaded"):
            safe_load(path)
        assert set(torch.serialization.get_safe_globals()) == {*saved, argparse.Namespace}  # restored after
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


def test_restricted_loads_make_weights_only_false_weights_only(tiny_run, tmp_path):
    """DeepSpeed's loaders (and zero_to_fp32) pass weights_only=False; within restricted_loads torch refuses
    the payload anyway, so a file that escaped the scan still cannot run code."""
    run, marker = copy_run(tiny_run, tmp_path), tmp_path / "payload-ran"
    plant(checkpoint(run, 2) / OPTIMIZER_STATES, marker)
    with restricted_loads(), pytest.raises(pickle.UnpicklingError, match="GLOBAL exec was not an allowed global"):
        torch.load(checkpoint(run, 2) / OPTIMIZER_STATES, weights_only=False)
    assert not marker.exists()
    assert safe_load(checkpoint(run, 1) / OPTIMIZER_STATES)["optimizer_state_dict"]["zero_stage"] == 2


@pytest.mark.parametrize("kind", list(FILE_KINDS))
def test_a_payload_in_a_training_checkpoint_is_refused_everywhere(ratplus, one_line_error, digest, tiny_run,
                                                                  tiny_shards, tmp_path, kind):
    """Train resume, export-hf and generate on the run each refuse the newest checkpoint in one line naming
    the file and the global, before DeepSpeed opens a file; the payload never runs and nothing changes."""
    run, marker = copy_run(tiny_run, tmp_path), tmp_path / "payload-ran"
    planted = checkpoint(run, 2) / FILE_KINDS[kind]
    plant(planted, marker)
    before = digest(tmp_path)
    expected = f"checkpoint file {planted} holds builtins.exec, outside the allow-list"

    resume = ratplus(*train_args(tiny_shards, run, "train.train_tokens=3072"))
    one_line_error(resume, "train", expected, "nothing was loaded")
    export = ratplus("export-hf", "--checkpoint", run, "--out", tmp_path / "hf")
    one_line_error(export, "export-hf", expected)
    generate = ratplus("generate", "--model", run, "--tokenizer", tiny_shards.parent / "tok.model", "--prompt",
                       "Document 3", "--max-new-tokens", 2)
    one_line_error(generate, "generate", expected)
    assert not marker.exists()
    assert digest(tmp_path) == before


def test_a_payload_in_the_checkpoint_adaptation_starts_from_is_refused(ratplus, one_line_error, digest, tiny_run,
                                                                       tiny_shards, tmp_path):
    run, marker = copy_run(tiny_run, tmp_path), tmp_path / "payload-ran"
    planted = checkpoint(run, 2) / MODEL_STATES
    plant(planted, marker)
    before = digest(tmp_path)
    proc = ratplus(*train_args(tiny_shards, tmp_path / "adapt", "train.phase=adapt", "train.joint=false",
                               f"train.init_from={run}", "train.warmup_fraction=0"))
    one_line_error(proc, "train", f"train.init_from: checkpoint file {planted} holds builtins.exec")
    assert not marker.exists()
    assert digest(tmp_path) == before


HF_PLANTS = {
    # a pickle where the safetensors file belongs: safetensors parses only its JSON header and refuses
    "pickle-as-safetensors": ("model.safetensors", "model.safetensors is truncated or damaged"),
    # pickle weights beside no safetensors: never handed to transformers' .bin loader
    "pickle-weights-only": ("pytorch_model.bin", "has no model.safetensors"),
}


@pytest.mark.parametrize("case", list(HF_PLANTS))
def test_a_payload_in_an_hf_folders_weights_is_refused(ratplus, one_line_error, digest, tiny_hf, tiny_shards,
                                                      tmp_path, case):
    import shutil

    name, message = HF_PLANTS[case]
    folder, marker = tmp_path / "hf", tmp_path / "payload-ran"
    shutil.copytree(tiny_hf, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(512, 64), "payload": Payload(marker)}, folder / name)
    before = digest(tmp_path)
    generate = ratplus("generate", "--model", folder, "--prompt", "Document 3", "--max-new-tokens", 2)
    one_line_error(generate, "generate", f"--model {folder}: ", message)
    adapt = ratplus(*train_args(tiny_shards, tmp_path / "adapt", "train.phase=adapt", "train.joint=false",
                                f"train.init_from={folder}", "train.warmup_fraction=0"))
    one_line_error(adapt, "train", "train.init_from: ", message)
    assert not marker.exists()
    assert digest(tmp_path) == before


@pytest.mark.parametrize("archive", [True, False], ids=["zip", "legacy-format"])
def test_a_payload_in_a_public_checkpoint_is_refused(ratplus, one_line_error, digest, tmp_path, archive):
    checkpoint_file, marker = tmp_path / "public.pth", tmp_path / "payload-ran"
    torch.save({"task": {"embedding.wte.weight": torch.zeros(8, 4)}, "config": {}, "args": Payload(marker)},
               checkpoint_file, _use_new_zipfile_serialization=archive)
    before = digest(tmp_path)
    proc = ratplus("import-public", "--checkpoint", checkpoint_file, "--out", tmp_path / "hf")
    # the zip archive's pickle is scanned (builtins.exec); the legacy format's unpickler names it itself (exec)
    err = one_line_error(proc, "import-public", f"checkpoint {checkpoint_file} holds ", "exec, which the importer "
                         "does not unpickle", "nothing was loaded")
    assert "weights_only" not in err  # never suggests unpickling
    assert not marker.exists()
    assert digest(tmp_path) == before
