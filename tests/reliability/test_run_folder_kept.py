"""Never lose a run: ``train.resume=never`` into a folder that holds checkpoints is refused, ``train.overwrite=true``
moves the old checkpoints aside (never deletes them), and ``train.keep_last`` prunes only checkpoints of the run
that prunes, whose id survives a resume.

Was: a 40-step run (saves at 10, 20, 30, 40) followed by a 20-step ``resume=never`` run with another seed into
the same ``out_dir`` overwrote the old step 20 and deleted step 10; ``latest`` then named the new step 20 while
resume continued the old run's step 40, and ``export-hf`` could write the old run's weights."""

from __future__ import annotations

from ratplus_mega.checkpoint import committed_checkpoints, read_marker

from .checkpoint_files import checkpoint, copy_run, set_run_id
from .conftest import train_args


def test_resume_never_into_a_folder_with_checkpoints_is_refused(ratplus, one_line_error, digest, tiny_run,
                                                                tiny_shards, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    before = digest(run)
    proc = ratplus(*train_args(tiny_shards, run, "train.resume=never", "train.seed=7"))
    one_line_error(proc, "train", f"train.out_dir {run} already holds checkpoints (the newest: step 2, "
                   f"{checkpoint(run, 2)})", "choose a new train.out_dir", "train.resume=auto",
                   "train.overwrite=true to move them aside")
    assert digest(run) == before


def test_overwrite_moves_the_old_run_aside_and_starts_afresh(ratplus, digest, tiny_run, tiny_shards, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    old = {name: digest(run / name) for name in ("checkpoints", "config.yaml", "metrics.jsonl", "tensorboard")}
    old_id = read_marker(checkpoint(run, 2)).run_id
    proc = ratplus(*train_args(tiny_shards, run, "train.resume=never", "train.overwrite=true", "train.seed=7",
                               "train.train_tokens=1024"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    [aside] = run.glob("checkpoints.replaced-*")
    assert f"to {aside}" in proc.stdout
    assert digest(aside / "config.yaml") == old["config.yaml"]
    assert digest(aside / "metrics.jsonl") == old["metrics.jsonl"]
    assert digest(aside / "tensorboard") == old["tensorboard"]
    moved = digest(aside)
    assert {k: moved[k] for k in old["checkpoints"]} == old["checkpoints"]  # every old file, unchanged
    # The new run owns checkpoints/ alone: its step 1 under its own id, and `latest` names it.
    [new] = committed_checkpoints(run / "checkpoints")
    assert new.name == "step000000001" and read_marker(new).run_id not in (None, old_id)
    assert (run / "checkpoints" / "latest").read_text() == "step000000001"


def test_keep_last_prunes_only_checkpoints_of_its_own_run(ratplus, digest, tiny_run, tiny_shards, tmp_path):
    """Step 1 is marked as another run's; the run resumed from step 2 carries step 2's id on, and with
    keep_last=1 prunes its own steps 2 and 3 but never step 1."""
    run = copy_run(tiny_run, tmp_path)
    set_run_id(checkpoint(run, 1), "another-run")
    foreign = digest(checkpoint(run, 1))
    own_id = read_marker(checkpoint(run, 2)).run_id
    proc = ratplus(*train_args(tiny_shards, run, "train.train_tokens=4096", "train.keep_last=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {checkpoint(run, 2)} (step 2)" in proc.stdout
    assert [c.name for c in committed_checkpoints(run / "checkpoints")] == ["step000000001", "step000000004"]
    assert digest(checkpoint(run, 1)) == foreign
    assert read_marker(checkpoint(run, 4)).run_id == own_id
