"""The one path for errors: a RatplusError (or ValueError) becomes ``ratplus <command>: error: ...`` and exit
status 2; ``--debug`` anywhere on the line, or RATPLUS_DEBUG=1, prints the traceback before that line."""

from __future__ import annotations

import pytest


def test_error_is_one_line_with_exit_status_2(ratplus, one_line_error, tmp_path):
    proc = ratplus("info", "--config", tmp_path / "missing.yaml")
    one_line_error(proc, "info", "missing.yaml")


@pytest.mark.parametrize("how", ["flag-first", "flag-last", "env"])
def test_debug_shows_the_traceback(ratplus, tmp_path, how):
    args = ["info", "--config", tmp_path / "missing.yaml"]
    if how == "flag-first":
        proc = ratplus("--debug", *args)
    elif how == "flag-last":
        proc = ratplus(*args, "--debug")
    else:
        proc = ratplus(*args, env={"RATPLUS_DEBUG": "1"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[0].startswith("Traceback"), proc.stderr
    assert lines[-1].startswith("ratplus info: error: ") and "missing.yaml" in lines[-1]


def test_a_subcommand_of_prep_is_named_in_full(tmp_path, capsys):
    from ratplus_mega.cli import main

    assert main(["prep", "tokenizer", "--input", str(tmp_path / "none.jsonl"), "--vocab-size", "300",
                 "--out", str(tmp_path / "t.model")]) == 2
    assert capsys.readouterr().err.startswith("ratplus prep tokenizer: error: ")
