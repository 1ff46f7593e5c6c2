"""``ratplus train`` resumed on another layout (docs/checkpoints.md, "Resume on another layout"): a 6-step run
on one process, saved every 2 steps, is continued from its step-2 checkpoint on 2 ranks (DP, TP or PP), and
that run's step-4 checkpoint back on one. Every resumed step's losses equal the uninterrupted run's within fp32
tolerance, and the loader's position at each checkpoint equals the uninterrupted run's: no sample repeated or
skipped. The corpus is one long document, so that every micro-batch predicts the same number of tokens and
the recipe's mean of micro-batch means does not depend on how the global batch is split over ranks."""

import shutil
from pathlib import Path

import pytest

from ratplus_mega.checkpoint import read_marker
from ratplus_mega.checkpoint.trust import safe_load
from ratplus_mega.train.metrics import read_metrics
from tests.e2e.runs import error_lines, free_port, ratplus, run, torchrun, train_args

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

# The fp32 tolerance (relative). Measured: DP=2 continuing a DP=1 run 5e-7 off (abs, losses near 5: the global
# batch is summed in another order), TP=2 and the runs back on one rank equal bitwise.
LOSS_TOLERANCE = 1e-5


def _train(shards: Path, out: Path, *extra: str, nproc: int = 1):
    args = train_args(shards, out, "train.train_tokens=6144", *extra)
    cmd = torchrun(args, port=free_port(), nproc=nproc) if nproc > 1 else ratplus(args)
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(out: Path) -> dict[int, list[float]]:
    return {r["step"]: [v for k, v in sorted(r.items()) if k.startswith("train/loss_")]
            for r in read_metrics(out, "train")}


def _data_state(out: Path, step: int) -> dict:
    return safe_load(out / "checkpoints" / f"step{step:09d}" / "ratplus_rank00000.pt")["data"]


def _continue(source: Path, step: int, out: Path) -> None:
    """``out`` holds only ``source``'s checkpoint of ``step``: a run there resumes from it."""
    name = f"step{step:09d}"
    shutil.copytree(source / "checkpoints" / name, out / "checkpoints" / name)


def _assert_continues(reference: Path, resumed: Path, proc, first_step: int, **layout: int) -> None:
    assert "re-cut for this layout" in proc.stdout, proc.stdout[-2000:]
    written = read_marker(resumed / "checkpoints" / "step000000006").layout
    assert {k: written[k] for k in layout} == layout, written
    expected, got = _losses(reference), _losses(resumed)
    assert sorted(got) == list(range(first_step, 7))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=LOSS_TOLERANCE), step
    for step in range(first_step + 1, 7, 2):  # the checkpoints the resumed run wrote
        assert _data_state(resumed, step) == _data_state(reference, step), step


@pytest.fixture(scope="module")
def uninterrupted(single_document_shards, tmp_path_factory):
    """``uninterrupted(zero_stage)``: the run folder of 6 uninterrupted steps on one process (checkpoints at 2, 4
    and 6), run once per ZeRO stage."""
    runs: dict[int, Path] = {}

    def get(zero: int) -> Path:
        if zero not in runs:
            runs[zero] = tmp_path_factory.mktemp(f"uninterrupted-zero{zero}")
            _train(single_document_shards, runs[zero], f"parallel.zero_stage={zero}")
        return runs[zero]
    return get


@pytest.mark.parametrize("zero", [1, 2], ids=["zero1", "zero2"])
def test_data_parallel_1_to_2_to_1(uninterrupted, single_document_shards, tmp_path, zero):
    reference = uninterrupted(zero)
    _continue(reference, 2, tmp_path / "dp2")
    proc = _train(single_document_shards, tmp_path / "dp2", f"parallel.zero_stage={zero}", nproc=2)
    _assert_continues(reference, tmp_path / "dp2", proc, 3, dp=2)
    _continue(tmp_path / "dp2", 4, tmp_path / "dp1")
    proc = _train(single_document_shards, tmp_path / "dp1", f"parallel.zero_stage={zero}")
    _assert_continues(reference, tmp_path / "dp1", proc, 5, dp=1)


@pytest.mark.parametrize("parallel", ["tensor", "pipeline"])
def test_model_parallel_1_to_2_to_1(uninterrupted, single_document_shards, tmp_path, parallel):
    """TP=2 cuts the fused projection rank-major; under PP=2 one reader per replica feeds both stages and the
    last stage's copy of the tied embedding takes the embedding's state. ZeRO-1 (pipeline parallel runs only
    there; the TP cut does not depend on how ZeRO partitions)."""
    reference, key = uninterrupted(1), parallel[0] + "p"
    _continue(reference, 2, tmp_path / "two")
    proc = _train(single_document_shards, tmp_path / "two", "parallel.zero_stage=1",
                  f"parallel.{parallel}_parallel=2", nproc=2)
    _assert_continues(reference, tmp_path / "two", proc, 3, **{key: 2, "dp": 1})
    _continue(tmp_path / "two", 4, tmp_path / "one")
    proc = _train(single_document_shards, tmp_path / "one", "parallel.zero_stage=1")
    _assert_continues(reference, tmp_path / "one", proc, 5, **{key: 1})


def test_a_layout_it_cannot_serve_stops_in_one_line(uninterrupted, single_document_shards, tmp_path):
    """ZeRO-0 keeps its optimizer state elsewhere: continuing a ZeRO-1 checkpoint on 2 ranks there is refused,
    naming the checkpoint and both layouts, before any step."""
    _continue(uninterrupted(1), 2, tmp_path)
    proc = run(torchrun(train_args(single_document_shards, tmp_path, "train.train_tokens=6144",
                                   "parallel.zero_stage=0"), port=free_port(), nproc=2))
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert lines and all(line == lines[0] for line in lines), proc.stderr[-3000:]
    assert ("step000000002 was written with layout {'tp': 1, 'pp': 1, 'cp': 1, 'dp': 1} at ZeRO-1, this run is "
            "{'tp': 1, 'pp': 1, 'cp': 1, 'dp': 2} at ZeRO-0: changing the layout needs ZeRO-1 or ZeRO-2 on both "
            "sides") in lines[0]
    assert not read_metrics(tmp_path, "train")
