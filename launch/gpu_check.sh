#!/usr/bin/env bash
# The checks that need a GPU: the kernel tests on CUDA (every CPU case plus the full-size ones at the 1.5B
# layer's shapes, bf16 and fp32), the speed table of benchmarks/kernels.py, and training: a small model's bf16
# joint steps with the kernels against the fp32 CPU run of the same seed (benchmarks/train_parity.py), then
# dense, sparse and joint steps of the 1.5B preset at 4,096 tokens (benchmarks/train_step.py: tokens/s, MFU,
# peak memory).
#
#   bash launch/gpu_check.sh                 # tests, the benchmark at 16k tokens per step, training
#   bash launch/gpu_check.sh tests           # only the tests
#   bash launch/gpu_check.sh bench [--full]  # only the benchmark (--full: every shape)
#   bash launch/gpu_check.sh train           # only training (needs .gpu-wheels/: bash launch/gpu_wheels.sh)
#   bash launch/gpu_check.sh decode          # whole-model decode and prefill of the 1.5B preset, dense vs
#                                            # D = 16/64 (± W, P), top-k and a per-head hybrid (not in "all":
#                                            # 256 timed steps per batch, doubling batches)
#
# Runs with the python3 that holds a CUDA build of torch and Triton (GPU images bring their own; the kernel
# checks need none of the training stack's packages); the package is put on its path, not installed. Most of
# the tests' time is Triton compiling: with pytest-xdist they run in GPU_CHECK_WORKERS processes (default 8),
# which compile in parallel and share Triton's cache with the benchmark.
# Training needs DeepSpeed, megatron-core and streaming, which GPU images lack: launch/gpu_wheels.sh fetches
# their wheels into .gpu-wheels/ wherever a registry is reachable, and this script installs, offline, those the
# image cannot import into the same scratch folder.
# With OUT_DIR set, the outputs are also written to OUT_DIR/gpu_tests.txt, gpu_kernels.txt, gpu_train.txt and
# gpu_decode.txt.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
part=all
case "${1:-}" in tests | bench | train | decode | all) part=$1; shift ;; esac
quick=--quick
[ "${1:-}" = "--full" ] && quick=
out=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$out"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'launch/gpu_check.sh: no CUDA device visible')"
site=$(mktemp -d)
if ! python3 -c "import ratplus_mega.kernels" 2>/dev/null; then
    # The package as pyproject.toml lays it out (kernels/ is ratplus_mega.kernels), through links in a scratch
    # folder: nothing is installed into the image's environment.
    mkdir "$site/ratplus_mega"
    ln -s "$repo"/ratplus_mega/* "$site/ratplus_mega/"
    ln -s "$repo/kernels" "$site/ratplus_mega/kernels"
    ln -s "$repo/data_prep" "$site/ratplus_mega/data_prep"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONSAFEPATH=1  # or `python -m` puts the checkout first, whose ratplus_mega has no kernels
fi
export PYTHONUNBUFFERED=1
# What the image cannot import (the tests and benchmarks need transformers; training also DeepSpeed and
# megatron-core) is installed offline from .gpu-wheels/ into a scratch folder.
missing=()
while IFS== read -r dist module; do
    python3 -c "import $module" 2>/dev/null || missing+=("$dist")
done < <([ -f .gpu-wheels/packages.txt ] && cat .gpu-wheels/packages.txt \
    || python3 -c "print('transformers=transformers\ndeepspeed=deepspeed')")
if [ ${#missing[@]} -gt 0 ]; then
    [ -d .gpu-wheels ] || { echo "launch/gpu_check.sh: ${missing[*]} missing and no .gpu-wheels/ (run" \
        "launch/gpu_wheels.sh where a registry is reachable, and bring the folder)" >&2; exit 1; }
    echo "==> installing ${missing[*]} from .gpu-wheels/ into $site/deps"
    python3 -m pip install --quiet --no-index --no-deps --find-links .gpu-wheels --target "$site/deps" \
        "${missing[@]}"
    export PYTHONPATH="$site/deps:${PYTHONPATH:-}"
fi
status=0
if [ "$part" = tests ] || [ "$part" = all ]; then
    workers=()
    python3 -c "import xdist" 2>/dev/null && workers=(-n "${GPU_CHECK_WORKERS:-8}")
    # The fused top-k route against its fp64 oracle (the rest of tests/hf runs on CPU in CI).
    fused_topk=(tests/hf/test_topk.py::test_fused_topk_attention_matches_oracle
                tests/hf/test_topk.py::test_fused_topk_attention_of_a_later_chunk)
    echo "==> kernel tests on $(python3 -c 'import torch; print(torch.cuda.get_device_name())')"
    python3 -m pytest tests/kernels tests/benchmarks "${fused_topk[@]}" -q -m "not slow" -p no:cacheprovider \
        "${workers[@]}" 2>&1 | tee "$out/gpu_tests.txt" || status=1
fi
if [ "$part" = bench ] || [ "$part" = all ]; then
    echo "==> kernel benchmark"
    python3 benchmarks/kernels.py $quick 2>&1 | tee "$out/gpu_kernels.txt" || status=1
fi
if [ "$part" = train ] || [ "$part" = all ]; then
    echo "==> bf16 joint steps with the kernels against the fp32 CPU run" | tee "$out/gpu_train.txt"
    python3 benchmarks/train_parity.py 2>&1 | tee -a "$out/gpu_train.txt" || status=1
    echo "==> training steps of the 1.5B preset at 4,096 tokens" | tee -a "$out/gpu_train.txt"
    python3 benchmarks/train_step.py --config configs/model/ratplus-1.5b.yaml --micro-batch 1 --steps 5 \
        train.loss_chunk_tokens=1024 2>&1 | tee -a "$out/gpu_train.txt" || status=1
fi
if [ "$part" = decode ]; then
    echo "==> decode and prefill of the 1.5B preset, bf16" | tee "$out/gpu_decode.txt"
    # Batches double (the paper steps by 16: hundreds of sweeps at D = 64); 256 timed steps instead of 1024.
    python3 benchmarks/decode.py --config configs/model/ratplus-1.5b.yaml --dtype bf16 --new-tokens 256 2>&1 \
        | tee -a "$out/gpu_decode.txt" || status=1
fi
exit $status
