"""The quickstart pipeline end to end at a reduced size: every stage runs and the comparison has its shape
(the goal's numbers need the full size and are not asserted here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.multiproc
def test_quickstart_compares_ratplus_and_attention(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "ratplus_mega.cli", "quickstart", "--out", str(tmp_path / "qs"),
                           "--documents", "300", "--pretrain-steps", "4", "--adapt-steps", "2", "--batch-size", "8"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = tmp_path / "qs"
    for artefact in ("tokenizer.model", "shards/manifest.json", "recall.png", "loss_curves.png",
                     "ratplus/hf/model.safetensors", "ratplus/hf-pretrained/config.json", "attention/hf/config.json",
                     "attention/adapt/metrics.jsonl"):
        assert (out / artefact).exists(), artefact

    rows = json.loads((out / "results.json").read_text())
    assert [(r["model"], r["phase"], r["pattern"]) for r in rows] == [
        (m, p, pattern) for p in ("pretrained", "adapted") for m in ("ratplus", "attention")
        for pattern in ("dense", "D8-W16-P4", "D-1-W0-P0-top4x8")]
    for r in rows:
        assert set(r) == {"model", "phase", "pattern", "val_loss", "recall"}
        assert r["val_loss"] > 0 and 0.0 <= r["recall"] <= 1.0
    attention = json.loads((out / "attention" / "hf" / "config.json").read_text())
    assert attention["apply_recurrence"] is False
    table = proc.stdout[proc.stdout.index("model      phase"):]
    assert len([line for line in table.splitlines() if line.startswith(("ratplus ", "attention "))]) == 12
    assert "Top-k block attention D-1-W0-P0-top4x8 at inference" in table
    assert "sample from" in proc.stdout and "compressed sparse cache" in proc.stdout
