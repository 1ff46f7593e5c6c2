#!/usr/bin/env bash
# The kernel checks that need a GPU, in one run: the kernel tests on CUDA (every CPU case plus the full-size
# ones at the 1.5B layer's shapes) and then the speed table of benchmarks/kernels.py.
#
#   bash launch/gpu_check.sh             # tests, then the benchmark at 16k tokens per step
#   bash launch/gpu_check.sh --full      # tests, then every benchmark shape
#
# Runs with the python3 that holds a CUDA build of torch and Triton (GPU images bring their own; the kernel
# checks need none of the training stack's packages); the package is put on its path, not installed.
# With OUT_DIR set, the outputs are also written to OUT_DIR/gpu_tests.txt and OUT_DIR/gpu_kernels.txt.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
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
quick=--quick
[ "${1:-}" = "--full" ] && quick=
status=0
echo "==> kernel tests on $(python3 -c 'import torch; print(torch.cuda.get_device_name())')"
python3 -m pytest tests/kernels -q -m "not slow" -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.txt" || status=1
echo "==> kernel benchmark"
python3 benchmarks/kernels.py $quick 2>&1 | tee "$out/gpu_kernels.txt" || status=1
exit $status
