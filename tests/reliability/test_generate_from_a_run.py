"""``ratplus generate --model RUN`` on a training run: it never asks a question (it once stopped at "Do you
wish to run the custom code? [y/N]" and then failed with "no tokenizer in the folder (...contains custom
code...)"), asks for ``--tokenizer`` in one line when the run has none, and decodes with it."""

from __future__ import annotations

import pytest

PROMPT = "Document 3. The river"


@pytest.fixture(scope="module")
def exported_text(ratplus, tiny_hf):
    """What ``generate`` prints first (prompt + 6 greedy tokens) from the run's exported folder."""
    proc = ratplus("generate", "--model", tiny_hf, "--prompt", PROMPT, "--max-new-tokens", 6)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()[0]


def test_a_run_without_a_tokenizer_asks_for_one_in_one_line(ratplus, one_line_error, digest, tiny_run):
    before = digest(tiny_run)
    proc = ratplus("generate", "--model", tiny_run, "--prompt", "Document 3", "--max-new-tokens", 2)
    err = one_line_error(proc, "generate", f"--model {tiny_run}: the run's config names no tokenizer "
                         "(data.tokenizer); pass --tokenizer PATH.model")
    assert "[y/N]" not in proc.stdout + err
    assert digest(tiny_run) == before


def test_a_run_with_tokenizer_given_equals_its_export(ratplus, digest, tiny_run, tiny_shards, exported_text):
    """The run (exported on the fly, its code trusted as ours) decodes what its exported folder decodes."""
    before = digest(tiny_run)
    direct = ratplus("generate", "--model", tiny_run, "--tokenizer", tiny_shards.parent / "tok.model",
                     "--prompt", PROMPT, "--max-new-tokens", 6)
    assert direct.returncode == 0, direct.stderr[-3000:]
    assert "[y/N]" not in direct.stdout + direct.stderr
    assert "6 new tokens" in direct.stdout and direct.stdout.splitlines()[0] == exported_text
    assert digest(tiny_run) == before


def test_an_hf_folder_without_a_tokenizer_asks_for_one(ratplus, one_line_error, tiny_hf, tiny_shards, tmp_path,
                                                       exported_text):
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(tiny_hf, folder)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    proc = ratplus("generate", "--model", folder, "--prompt", "Document 3", "--max-new-tokens", 2)
    one_line_error(proc, "generate", f"--model {folder}: the folder has no tokenizer; pass --tokenizer PATH.model")
    given = ratplus("generate", "--model", folder, "--tokenizer", tiny_shards.parent / "tok.model", "--prompt",
                    PROMPT, "--max-new-tokens", 6)
    assert given.returncode == 0, given.stderr[-3000:]
    assert given.stdout.splitlines()[0] == exported_text
