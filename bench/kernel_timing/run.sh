#!/bin/bash
# Runs kernel timing binaries side by side on every layout in a folder, head_dim 64 (and 128
# for the 16384-token dense and fixed layouts):
#   bash bench/kernel_timing/run.sh LAYOUT_DIR BINARY [BINARY ...]
set -u
dir=$1
shift
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
for layout in "$dir"/*.bin; do
  name=$(basename "$layout" .bin)
  dims=64
  case $name in dense_16384|fixed_16384) dims="64 128" ;; esac
  for d in $dims; do
    for binary in "$@"; do "$binary" "$layout" "$d" "$(basename "$binary") $name"; done
  done
done
