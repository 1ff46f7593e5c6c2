#!/usr/bin/env bash
# Runs the whole test suite (slow tests included) in the project's environment.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -m "not slow"` or `-k config`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest "$@"
