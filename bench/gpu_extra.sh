#!/usr/bin/env bash
# Layer- and model-level GPU benchmarks, run from the repository root on a machine where
# TensorFlow sees a GPU and the op library is built. Tables go to $OUT (when set) and stdout.
# Wall time on an H100 (2026-11): profiles about 2 min; layers (op path, three lengths) 3-6 min;
# each model case 2.5-3.2 min (±20 s between runs), most of it TensorFlow's start and the
# 30-layer step's trace, XLA compilation and warm-up (MultiHeadAttention's too: 155 s).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# Without an install, tf_sparse_attn.models is reached through a link to models/.
made_link=0
if [ ! -e tf_sparse_attn/models ]; then ln -s ../models tf_sparse_attn/models && made_link=1; fi
status=0
for layer in fixed strided; do
  timeout 60 python bench/profile_layer.py --layer "$layer" --length 12288 || status=1
done
# Where a model step's time goes besides attention (2 layers keep the trace short).
timeout 120 python bench/profile_layer.py --model enwik8 --num-layers 2 --attention fixed \
  || status=1
timeout ${LAYERS_TIMEOUT:-360} python bench/bench_layers.py --device gpu --dtype bfloat16 \
  --lengths 4096,12288,16384 --implementations ${LAYER_IMPLEMENTATIONS:-op} || status=1
# MODEL_CASES: a comma-separated list of bench_model.py case names (substrings) to run.
only=()
IFS=, read -ra cases <<< "${MODEL_CASES:-enwik8 dense,enwik8 fixed,enwik8 strided,MultiHeadAttention}"
for case in "${cases[@]}"; do only+=(--only "$case"); done
timeout ${MODEL_TIMEOUT:-1200} python bench/bench_model.py --device gpu --quick \
  --budget ${MODEL_BUDGET:-1180} --time-limit 260 "${only[@]}" || status=1
[ "$made_link" = 1 ] && rm -f tf_sparse_attn/models
exit $status
