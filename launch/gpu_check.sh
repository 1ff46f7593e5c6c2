#!/usr/bin/env bash
# The kernel checks that need a GPU: the kernel tests on CUDA (every CPU case plus the full-size ones at the
# 1.5B layer's shapes, bf16 and fp32) and the speed table of benchmarks/kernels.py.
#
#   bash launch/gpu_check.sh                 # tests, then the benchmark at 16k tokens per step
#   bash launch/gpu_check.sh tests           # only the tests
#   bash launch/gpu_check.sh bench [--full]  # only the benchmark (--full: every shape)
#
# Runs with the python3 that holds a CUDA build of torch and Triton (GPU images bring their own; the kernel
# checks need none of the training stack's packages); the package is put on its path, not installed. Most of
# the tests' time is Triton compiling: with pytest-xdist they run in GPU_CHECK_WORKERS processes (default 8),
# which compile in parallel and share Triton's cache with the benchmark.
# With OUT_DIR set, the outputs are also written to OUT_DIR/gpu_tests.txt and OUT_DIR/gpu_kernels.txt.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
part=all
case "${1:-}" in tests | bench | all) part=$1; shift ;; esac
quick=--quick
[ "${1:-}" = "--full" ] && quick=
out=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$out"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'launch/gpu_check.sh: no CUDA device visible')"
if ! python3 -c "import ratplus_mega.kernels" 2>/dev/null; then
    # The package as pyproject.toml lays it out (kernels/ is ratplus_mega.kernels), through links in a scratch
    # folder: nothing is installed into the image's environment.
    site=$(mktemp -d)
    mkdir "$site/ratplus_mega"
    ln -s "$repo"/ratplus_mega/* "$site/ratplus_mega/"
    ln -s "$repo/kernels" "$site/ratplus_mega/kernels"
    ln -s "$repo/data_prep" "$site/ratplus_mega/data_prep"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONSAFEPATH=1  # or `python -m` puts the checkout first, whose ratplus_mega has no kernels
fi
export PYTHONUNBUFFERED=1
status=0
if [ "$part" != bench ]; then
    workers=()
    python3 -c "import xdist" 2>/dev/null && workers=(-n "${GPU_CHECK_WORKERS:-8}")
    echo "==> kernel tests on $(python3 -c 'import torch; print(torch.cuda.get_device_name())')"
    python3 -m pytest tests/kernels tests/benchmarks -q -m "not slow" -p no:cacheprovider "${workers[@]}" 2>&1 \
        | tee "$out/gpu_tests.txt" || status=1
fi
if [ "$part" != tests ]; then
    echo "==> kernel benchmark"
    python3 benchmarks/kernels.py $quick 2>&1 | tee "$out/gpu_kernels.txt" || status=1
fi
exit $status
