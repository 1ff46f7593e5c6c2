#!/usr/bin/env bash
# The README's main job. Sets up the environment on first use, then runs the whole pipeline on a synthetic
# corpus: tokenizer and shards -> joint pretraining on 2 ranks -> adaptation to a dilated pattern ->
# validation table, recall accuracy and a loss plot -> HF export -> a sample decoded with the sparse cache.
# Options go to `ratplus quickstart` (see --help): --input FILES for your own text, --preset for a bigger model.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
ratplus info --config configs/model/ratplus-1.5b.yaml --pattern 16,256,4
echo
exec ratplus quickstart "$@"
