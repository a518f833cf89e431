#!/usr/bin/env bash
# Layer- and model-level GPU benchmarks, run from the repository root on a machine where
# TensorFlow sees a GPU and the op library is built. Tables go to $OUT (when set) and stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# Without an install, tf_sparse_attn.models is reached through a link to models/.
made_link=0
if [ ! -e tf_sparse_attn/models ]; then ln -s ../models tf_sparse_attn/models && made_link=1; fi
status=0
if [ -f bench/bench_layers.py ]; then
  timeout ${LAYERS_TIMEOUT:-90} python bench/bench_layers.py --device gpu --dtype bfloat16 --lengths 4096,12288,16384 --repeats 10 || status=1
fi
if [ -f bench/bench_model.py ]; then
  timeout ${MODEL_TIMEOUT:-145} python bench/bench_model.py --device gpu --quick --budget ${MODEL_BUDGET:-135} --time-limit 75 || status=1
fi
[ "$made_link" = 1 ] && rm -f tf_sparse_attn/models
exit $status
