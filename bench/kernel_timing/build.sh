#!/bin/bash
# Builds the kernel timing tool against the kernels of a source tree, for sm_90a only (a minute
# on two cores):   bash bench/kernel_timing/build.sh [SOURCE_ROOT] [OUTPUT_BINARY]
# Building two trees' kernels side by side and running both binaries in one device call
# compares them on identical inputs (see run.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "${1:-$here/../..}" && pwd)
out=${2:-$here/kernel_timing}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
flags=(-O3 -std=c++17 --expt-relaxed-constexpr -DGOOGLE_CUDA=1 -DNDEBUG
       -gencode=arch=compute_90a,code=sm_90a -DTSA_WITH_SM90A=1 -I"$src")
objects=()
for f in "$here/kernel_timing.cu" "$src"/cc/kernels/sparse_attention_gpu*.cu.cc \
         "$src/cc/kernels/sparse_attention_work_lists.cc"; do
  o="$tmp/$(basename "$f").o"
  objects+=("$o")
  nvcc -x cu -c "$f" -o "$o" "${flags[@]}" &
  while [ "$(jobs -r | wc -l)" -ge "$(nproc)" ]; do sleep 0.2; done
done
wait
nvcc "${flags[@]}" "${objects[@]}" -o "$out"
echo "built $out"
