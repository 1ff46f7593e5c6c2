"""One line of ours, exit status 2 and nothing changed on disk, for inputs that once ended in a library's
traceback or paragraph (issue-tracker item "one clear line for every bad input"). Each test names the
message it replaced."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import zipfile

import pytest
import torch

from .conftest import train_args


# ------------------------------------------------------------------------------------------------------------
# Data preparation
# ------------------------------------------------------------------------------------------------------------


def test_prep_shards_into_a_path_under_a_file(ratplus, one_line_error, digest, tiny_shards, tmp_path):
    """Was: a NotADirectoryError traceback from os.makedirs."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "a few words of text"}\n')
    before = digest(tmp_path)
    proc = ratplus("prep", "shards", "--input", corpus, "--tokenizer", tiny_shards.parent / "tok.model",
                   "--out", corpus / "shards", "--seq-len", 128)
    one_line_error(proc, "prep shards", f"--out {corpus / 'shards'}: cannot write there (Not a directory",
                   "choose a folder you can write to")
    assert digest(tmp_path) == before


def test_prep_shards_into_a_read_only_folder(ratplus, one_line_error, digest, tiny_shards, tmp_path, monkeypatch,
                                             capsys):
    """Was: a PermissionError traceback. Root writes anywhere, so there the refusal is simulated in-process."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "a few words of text"}\n')
    locked = tmp_path / "locked"
    locked.mkdir()
    args = ["prep", "shards", "--input", corpus, "--tokenizer", tiny_shards.parent / "tok.model",
            "--out", locked / "shards", "--seq-len", 128]
    before = digest(tmp_path)
    if os.geteuid() != 0:
        locked.chmod(0o555)
        try:
            proc = ratplus(*args)
        finally:
            locked.chmod(0o755)
        one_line_error(proc, "prep shards", f"--out {locked / 'shards'}: cannot write there (Permission denied")
    else:
        from ratplus_mega.cli import main

        def refuse(path, *a, **k):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(os, "makedirs", refuse)
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"ratplus prep shards: error: --out {locked / 'shards'}: cannot write there (Permission "
                       f"denied: {locked / 'shards' / '.progress'}); choose a folder you can write to"), err
    assert digest(tmp_path) == before


@pytest.mark.parametrize("content", ["", '{"title": "no text field"}\n', '{"text": ""}\n'],
                         ids=["empty-file", "no-text-field", "empty-texts"])
def test_prep_tokenizer_without_text(ratplus, one_line_error, digest, tmp_path, content):
    """Was: "sentencepiece training for ... failed: INTERNAL: src/trainer_interface.cc(467)
    [!sentences_.empty()]", after creating the output folder."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(content)
    before = digest(tmp_path)
    proc = ratplus("prep", "tokenizer", "--input", corpus, "--vocab-size", 300, "--out", tmp_path / "new" / "t.model")
    err = one_line_error(proc, "prep tokenizer", f"--input {corpus}: no text to train a tokenizer on")
    assert "trainer_interface" not in err and "INTERNAL" not in err
    assert digest(tmp_path) == before


# ------------------------------------------------------------------------------------------------------------
# Importing a public checkpoint
# ------------------------------------------------------------------------------------------------------------


def _not_checkpoints(folder):
    text = folder / "notes.pth"
    text.write_text("hello\n")
    empty = folder / "empty.pth"
    empty.write_bytes(b"")
    plain = folder / "plain-pickle.pth"
    plain.write_bytes(pickle.dumps({"task": {"w": [1.0, 2.0]}}))
    archive = folder / "archive.pth"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("readme.txt", "not a checkpoint")
    truncated = folder / "truncated.pth"
    torch.save({"task": {"embedding.wte.weight": torch.ones(64, 8)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    return {"text": (text, "not a PyTorch checkpoint"), "empty": (empty, "not a PyTorch checkpoint (an empty file)"),
            "plain-pickle": (plain, "not a PyTorch checkpoint"),
            "zip-archive": (archive, "cannot read as a checkpoint"), "truncated": (truncated, "truncated or damaged")}


def test_import_public_of_a_file_that_is_not_a_checkpoint(ratplus, one_line_error, digest, tmp_path, capsys):
    """Was: torch's four-line weights-only text (which suggests weights_only=False) or a KeyError traceback.
    The file is only read with the weights-only loader, and the message never suggests unpickling. The first
    case runs the command; the others call its entry point in this process (the same path, without paying
    for a fresh interpreter each)."""
    from ratplus_mega.cli import main

    cases = _not_checkpoints(tmp_path)
    before = digest(tmp_path)
    for i, (case, (path, message)) in enumerate(cases.items()):
        args = ["import-public", "--checkpoint", str(path), "--out", str(tmp_path / "hf")]
        if i == 0:
            proc = ratplus(*args)
        else:
            code = main(args)
            proc = subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)
        err = one_line_error(proc, "import-public", f"checkpoint {path}: ", message)
        assert "weights_only" not in err and "unpickl" not in err.lower(), (case, err)
    assert digest(tmp_path) == before


# ------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------


def test_training_on_shards_without_samples(ratplus, one_line_error, digest, tiny_shards, tmp_path):
    """Was: streaming's "RuntimeError: Stream contains no samples" traceback from every rank."""
    from ratplus_mega.data_prep.to_mds import PrepOptions, prep_shards

    corpus = tmp_path / "short.jsonl"
    corpus.write_text('{"text": "far shorter than one window"}\n')
    manifest = prep_shards(PrepOptions(inputs=[str(corpus)], tokenizer=str(tiny_shards.parent / "tok.model"),
                                       out=str(tmp_path / "shards"), seq_len=128, val_fraction=0.0, progress=False))
    assert manifest["splits"]["train"]["windows"] == 0
    before = digest(tmp_path)
    proc = ratplus("train", "--config", "configs/train/tiny-cpu.yaml", f"data.train=[{tmp_path}/shards/train]",
                   "data.val=null", f"train.out_dir={tmp_path}/run", "data.num_workers=0")
    one_line_error(proc, "train", f"data.train[0]: {tmp_path}/shards/train holds no samples",
                   "model.seq_len + 1 = 129 tokens")
    assert digest(tmp_path) == before


def test_a_diverging_run_names_the_step_and_keeps_the_last_good_checkpoint(ratplus, one_line_error, digest,
                                                                           tiny_shards, tiny_run, tmp_path):
    """Was: "RuntimeError: non-finite loss [6.23, nan] at step 0" as a traceback (steps counted from 0, the
    log from 1). Resumed at step 2 with lr 1e9, step 3's sparse update sends the dense pass's loss or
    gradient norm to nan or inf: the run stops there, before it logs or saves step 3, and exits 2; the
    committed checkpoints are as they were."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = digest(run / "checkpoints")
    proc = ratplus(*train_args(tiny_shards, run, "train.train_tokens=4096", "train.lr=1e9",
                               "train.warmup_fraction=0"))
    err = one_line_error(proc, "train", "training diverged at step 3: dense pass ",
                         f"the last good checkpoint, {run / 'checkpoints' / 'step000000002'}, is kept")
    assert " nan" in err or " inf" in err, err
    assert digest(run / "checkpoints") == before


# ------------------------------------------------------------------------------------------------------------
# An HF folder whose weights are missing or truncated
# ------------------------------------------------------------------------------------------------------------


def _damaged(tiny_hf, tmp_path, damage):
    folder = tmp_path / f"hf-{damage}"
    shutil.copytree(tiny_hf, folder)
    weights = folder / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        os.truncate(weights, weights.stat().st_size // 2)
    return folder


MESSAGES = {"missing": "has no model.safetensors; export it again",
            "truncated": "model.safetensors is truncated or damaged"}


@pytest.mark.parametrize("damage", list(MESSAGES))
def test_generate_from_an_hf_folder_with_damaged_weights(ratplus, one_line_error, digest, tiny_hf, tmp_path, damage):
    """Was: transformers' OSError paragraph ("Error no file named pytorch_model.bin, model.safetensors, ...")
    or safetensors' "SafetensorError: Error while deserializing header" traceback."""
    folder = _damaged(tiny_hf, tmp_path, damage)
    before = digest(tmp_path)
    proc = ratplus("generate", "--model", folder, "--prompt", "Document 3", "--max-new-tokens", 2)
    one_line_error(proc, "generate", f"--model {folder}: ", MESSAGES[damage])
    assert digest(tmp_path) == before


@pytest.mark.parametrize("damage", list(MESSAGES))
def test_adaptation_from_an_hf_folder_with_damaged_weights(ratplus, one_line_error, digest, tiny_shards, tiny_hf,
                                                           tmp_path, damage):
    """Was: "has no model*.safetensors" (a missing file) or safetensors' traceback from every rank (a
    truncated one)."""
    folder = _damaged(tiny_hf, tmp_path, damage)
    before = digest(tmp_path)
    proc = ratplus(*train_args(tiny_shards, tmp_path / "adapt", "train.phase=adapt", "train.joint=false",
                               f"train.init_from={folder}", "train.warmup_fraction=0"))
    one_line_error(proc, "train", "train.init_from: ", MESSAGES[damage])
    assert digest(tmp_path) == before
