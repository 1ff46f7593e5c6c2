"""Which code produced a number: the git commit that benchmarks print beside their tables."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit(*paths: str) -> str:
    """The checkout's short commit, with "+dirty" when the files under ``paths`` (relative to the repository
    root; every tracked file if none) differ from it; "unknown" outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return "unknown"
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *paths], cwd=REPO,
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
