#!/usr/bin/env bash
# The README's main job. Sets up the environment on first use, then shows what the presets cost and runs a
# tiny RAT+ model end to end on this machine (forward in dense and sparse attention, cached decoding checked
# against the full forward pass).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
echo "==> RAT+ 1.5B preset: parameters, FLOPs per token and decode cache (sparse pattern of joint pretraining"
echo "    and the D=16 W=256 P=4 inference pattern)"
ratplus info --config configs/model/ratplus-1.5b.yaml --pattern 16,256,4
echo
echo "==> tiny preset: build it, run it, decode with the compressed cache"
ratplus info --config configs/model/tiny.yaml --check "$@"
