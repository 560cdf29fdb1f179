#!/usr/bin/env bash
# The prepared GPU check: bash bench/gpu_check.sh OUT_DIR   (under 8 minutes on an H100/H200)
set -euo pipefail
OUT="${1:?usage: bench/gpu_check.sh OUT_DIR [--dry-run]}"
shift
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
timeout 480 python bench/gpu_check.py "$OUT" "$@"
