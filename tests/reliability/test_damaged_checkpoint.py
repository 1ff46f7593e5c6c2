"""A damaged checkpoint is detected and passed over. The marker records each file's size and SHA-256, computed
while the file was written; resume verifies the newest checkpoint and, when a file is missing, truncated or
altered, warns naming the file, sets that checkpoint aside and continues from the newest one that verifies (one
line when none does); ``export-hf`` and ``generate`` stop in one line naming the file; ``ratplus verify`` lists
each checkpoint, its step, its layout and whether it verifies.

Was: with the newest checkpoint's ``mp_rank_00_model_states.pt`` truncated to half its size, resume died inside
torch's zip reader with a traceback ("PytorchStreamReader failed reading zip archive: failed finding central
directory") and never tried the previous committed step; ``export-hf`` likewise."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from ratplus_mega.checkpoint import committed_checkpoints, read_marker
from ratplus_mega.cli import main
from tests.e2e.runs import free_port

from .checkpoint_files import (MODEL_STATES, OPTIMIZER_STATES, RANK_STATE, alter, checkpoint, copy_run, plant,
                               truncate)
from .conftest import _LAUNCHER_VARS, REPO, train_args


def test_the_marker_records_every_file_as_written(tiny_run):
    """The digests were taken from the bytes on their way to disk; they equal the files' own."""
    for step in (1, 2):
        folder = checkpoint(tiny_run, step)
        files = read_marker(folder).files
        assert sorted(files) == sorted(p.name for p in folder.iterdir() if p.name != "COMMITTED.json")
        assert sorted(files) == sorted(["config.yaml", MODEL_STATES, OPTIMIZER_STATES, RANK_STATE])
        for name, record in files.items():
            data = (folder / name).read_bytes()
            assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


DAMAGES = {  # what happens to which file of the newest checkpoint, and how the warning names it
    "truncated-model-states": (MODEL_STATES, truncate, "is truncated ("),
    "missing-optimizer-states": (OPTIMIZER_STATES, lambda path: path.unlink(), "is missing"),
    "altered-rank-state": (RANK_STATE, alter, "was altered (its SHA-256 differs"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_passes_over_a_damaged_checkpoint(ratplus, digest, tiny_run, tiny_shards, tmp_path, damage):
    name, harm, reason = DAMAGES[damage]
    run = copy_run(tiny_run, tmp_path)
    harm(checkpoint(run, 2) / name)
    damaged, older = digest(checkpoint(run, 2)), digest(checkpoint(run, 1))
    proc = ratplus(*train_args(tiny_shards, run, "train.train_tokens=3072"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"warning: checkpoint {checkpoint(run, 2)} does not verify: {checkpoint(run, 2) / name} {reason}"
            in proc.stderr), proc.stderr[-3000:]
    assert f"resumed from {checkpoint(run, 1)} (step 1)" in proc.stdout
    [aside] = (run / "checkpoints").glob("step000000002.damaged-*")  # kept as it was, out of the way
    assert digest(aside) == damaged and digest(checkpoint(run, 1)) == older
    assert [c.name for c in committed_checkpoints(run / "checkpoints")] == [
        "step000000001", "step000000002", "step000000003"]
    assert read_marker(checkpoint(run, 3)).run_id == read_marker(checkpoint(run, 1)).run_id


def test_resume_stops_in_one_line_when_no_checkpoint_verifies(ratplus, one_line_error, digest, tiny_run, tiny_shards,
                                                              tmp_path):
    run = copy_run(tiny_run, tmp_path)
    truncate(checkpoint(run, 2) / MODEL_STATES)
    alter(checkpoint(run, 1) / OPTIMIZER_STATES)
    before = digest(tmp_path)
    proc = ratplus(*train_args(tiny_shards, run, "train.train_tokens=3072"))
    one_line_error(proc, "train", f"no checkpoint under {run / 'checkpoints'} verifies (step000000002: "
                   f"{checkpoint(run, 2) / MODEL_STATES} is truncated (",
                   f"step000000001: {checkpoint(run, 1) / OPTIMIZER_STATES} was altered",
                   "restore the files from a copy, or start afresh with a new train.out_dir")
    assert digest(tmp_path) == before


def test_export_and_generate_of_a_damaged_checkpoint_name_the_file(ratplus, one_line_error, digest, tiny_run,
                                                                    tiny_shards, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    truncate(checkpoint(run, 2) / MODEL_STATES)
    before = digest(tmp_path)
    expected = (f"checkpoint {checkpoint(run, 2)} is damaged: {MODEL_STATES} is truncated (", "`ratplus verify "
                f"{run / 'checkpoints'}` lists the checkpoints that verify")
    export = ratplus("export-hf", "--checkpoint", run, "--out", tmp_path / "hf")
    one_line_error(export, "export-hf", *expected)
    generate = ratplus("generate", "--model", run, "--tokenizer", tiny_shards.parent / "tok.model", "--prompt",
                       "Document 3", "--max-new-tokens", 2)
    one_line_error(generate, "generate", *expected)
    assert digest(tmp_path) == before  # no HF folder, not even a temporary one left behind


def test_verify_lists_each_checkpoint_and_whether_it_verifies(tiny_run, tmp_path, digest, capsys):
    run = copy_run(tiny_run, tmp_path)
    assert main(["verify", str(run)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == f"{run / 'checkpoints'}: 2 committed checkpoints, oldest first"
    run_id = read_marker(checkpoint(run, 1)).run_id
    for row, step in zip(rows[2:], (1, 2)):
        assert row.split() == [f"step{step:09d}", str(step), "tp1", "pp1", "cp1", "dp1", run_id, "yes", "(4",
                               "files,", "sizes", "and", "SHA-256", "checked)"]

    truncate(checkpoint(run, 2) / MODEL_STATES)
    plant(checkpoint(run, 1) / RANK_STATE, tmp_path / "payload-ran")
    before = digest(tmp_path)
    assert main(["verify", str(run / "checkpoints")]) == 1
    rows = capsys.readouterr().out.splitlines()
    assert rows[2].endswith(f"REFUSED: {RANK_STATE} holds builtins.exec") and rows[2].startswith("step000000001")
    assert rows[3].endswith(f"no: {MODEL_STATES} is truncated ({(checkpoint(run, 2) / MODEL_STATES).stat().st_size} "
                            f"of {read_marker(checkpoint(run, 2)).files[MODEL_STATES]['size']} bytes)")
    assert digest(tmp_path) == before and not (tmp_path / "payload-ran").exists()


def test_verify_imports_neither_megatron_nor_deepspeed(tiny_run, cli_imports):
    code, loaded, err = cli_imports(["verify", tiny_run], block=("megatron", "deepspeed"))
    assert code == 0 and loaded == [], err[-2000:]


def test_verify_of_a_folder_without_checkpoints(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert f"ratplus verify: error: {tmp_path}: no committed checkpoint there" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_ranks_record_and_verify_each_others_files(tiny_shards, tmp_path):
    """Two data-parallel ranks: the marker lists both ranks' files, and a file of rank 1 altered in the newest
    checkpoint is found by the rank that checks it, passed over on both, and the run resumes from step 1."""
    out = tmp_path / "run"
    first = _two_ranks(train_args(tiny_shards, out))
    assert first.returncode == 0, first.stderr[-3000:]
    files = read_marker(checkpoint(out, 2)).files
    assert {RANK_STATE, "ratplus_rank00001.pt", OPTIMIZER_STATES, "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            MODEL_STATES, "config.yaml"} == set(files)
    alter(checkpoint(out, 2) / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    resumed = _two_ranks(train_args(tiny_shards, out, "train.train_tokens=3072"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{checkpoint(out, 2) / 'zero_pp_rank_1_mp_rank_00_optim_states.pt'} was altered" in resumed.stderr
    assert f"resumed from {checkpoint(out, 1)} (step 1)" in resumed.stdout


def _two_ranks(args: list[str]) -> subprocess.CompletedProcess:
    """``ratplus ARGS`` under torchrun on two local ranks."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS="1", RATPLUS_DISABLE_KERNELS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "ratplus_mega.cli", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
