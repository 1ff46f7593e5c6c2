"""``benchmarks/loader_scale.py`` end to end at 1e7 tokens (never at 100B in CI): one row per world size with two
loader workers, the table printed and the JSON rows with their documented keys."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KEYS = {"tokens", "world", "workers", "construct_s", "first_batch_s", "tokens_per_s", "resume_s", "main_rss_mb",
        "worker_rss_mb", "tree_pss_mb"}


@pytest.mark.slow
def test_loader_scale_benchmark_at_ten_million_tokens(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, "benchmarks/loader_scale.py", "--tokens", "1e7", "--workers", "2",
                           "--seconds", "0.5", "--json", str(out), "--workdir", str(tmp_path / "data")],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tree PSS MB" in proc.stdout
    rows = json.loads(out.read_text())
    assert [(r["world"], r["workers"]) for r in rows] == [(1, 2), (256, 2), (1024, 2)]
    for row in rows:
        assert set(row) == KEYS
        assert 1e7 <= row["tokens"] < 1e7 + 4096
        assert row["main_rss_mb"] > 0 and row["tree_pss_mb"] > 0
        assert 0 <= row["construct_s"] and 0 <= row["first_batch_s"] and 0 <= row["resume_s"]
        assert len(row["worker_rss_mb"]) <= 2 and all(mb > 0 for mb in row["worker_rss_mb"])
        if row["tokens_per_s"] is not None:  # several batches: both workers were seen reading
            assert len(row["worker_rss_mb"]) == 2
    assert rows[0]["tokens_per_s"] > 0  # 1e7 tokens over 1024 ranks leave each one a single batch: no rate
    table = [line.split()[:3] for line in proc.stdout.splitlines() if re.match(r"^\s+1e\+07\s+\d+\s+\d+\s", line)]
    assert table == [["1e+07", "1", "2"], ["1e+07", "256", "2"], ["1e+07", "1024", "2"]]
