#!/usr/bin/env bash
# The GPU check in one command: benchmarks/gpu_check.sh [--out DIR] [--data DIR] [--dry-run] [--budget S] [--rounds N]
# Writes gpu_check.json and gpu_check.md to --out (default $OUT); see benchmarks/gpu_check.py and docs/gpu.md.
# Runs from a clone without installing it: the project's packages come from the tree.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
export PYTHONPATH="$repo/system:$repo/dataset:$repo/stylegan:$repo/stable-diffusion:$repo/system/flower${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
exec "${PYTHON:-python}" "$here/gpu_check.py" "$@"
