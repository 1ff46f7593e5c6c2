#!/usr/bin/env bash
# Runs the import-layering contracts (pyproject.toml [tool.importlinter]) and then the whole test suite (slow
# tests included) in the project's environment.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -m "not slow"` or `-k config`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
lint-imports --no-cache
python -m pytest "$@"
