#!/usr/bin/env bash
# Fetch, on a machine with registry access, the wheels the GPU check's training part needs and a GPU image
# lacks (it brings Python 3.12, torch and Triton, and reaches no registry): DeepSpeed, megatron-core,
# streaming, transformers and their small pure dependencies, at the versions this checkout's venv pins.
#
#   bash launch/gpu_wheels.sh            # writes .gpu-wheels/ (ignored by git; carry it to the GPU machine)
#
# launch/gpu_check.sh train installs from that folder, offline and without dependencies, only the packages
# the image cannot import, into a scratch folder on PYTHONPATH: nothing goes into the image's environment.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
source launch/env.sh >/dev/null
out=.gpu-wheels
mkdir -p "$out"
# distribution=import name; gpu_check.sh reads the same list from .gpu-wheels/packages.txt
packages="megatron-core=megatron.core mosaicml-streaming=streaming transformers=transformers tokenizers=tokenizers
huggingface-hub=huggingface_hub safetensors=safetensors hjson=hjson pydantic=pydantic pydantic-core=pydantic_core
annotated-types=annotated_types typing-inspection=typing_inspection py-cpuinfo=cpuinfo msgpack=msgpack
einops=einops ninja=ninja zstd=zstd python-snappy=snappy cramjam=cramjam brotli=brotli catalogue=catalogue
regex=regex sentencepiece=sentencepiece pyyaml=yaml xxhash=xxhash tqdm=tqdm filelock=filelock packaging=packaging
psutil=psutil"
download() {
    python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$out" "$1"
}
for entry in $packages; do
    dist=${entry%%=*}
    pin="$dist==$(python -c "import importlib.metadata as m; print(m.version('$dist'))")"
    # a pin with no cp312 wheel (zstd): the newest that has one
    download "$pin" 2>/dev/null || { echo "no cp312 wheel for $pin: taking the newest $dist"; download "$dist"; }
done
# DeepSpeed is an sdist on PyPI: build its (pure Python) wheel here.
python -m pip wheel --quiet --no-deps --no-build-isolation -w "$out" \
    "deepspeed==$(python -c "import importlib.metadata as m; print(m.version('deepspeed'))")"
printf '%s\n' $packages deepspeed=deepspeed > "$out/packages.txt"
echo "$(ls "$out"/*.whl | wc -l) wheels, $(du -sh "$out" | cut -f1), in $out"
