"""Where the GPU time of a training step goes: one layer's step (that of bench_layers.py), a
whole model's (model.fit's step function, as bench_model.py times it) or the op's forward and
backward (bench_gpu.py's graph call) run under TensorFlow's profiler, its GPU kernels summed
per step, beside the step's wall time.

    python bench/profile_layer.py --layer fixed --length 12288
    python bench/profile_layer.py --layer strided --length 12288 --implementation portable
    python bench/profile_layer.py --model enwik8 --num-layers 2 --attention fixed
    python bench/profile_layer.py --op dense --length 16384

Prints a table: kernel (name shortened), launches per step, ms per step, share of the GPU's
busy time; then wall ms per step, GPU busy ms per step (the union of kernel intervals) and the
gap between them (host work and launch latency that the GPU waited for). With no GPU it
summarises the host's TensorFlow op events instead, so the script can be tried anywhere.
"""

import argparse
import collections
import glob
import itertools
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def short_name(name, width=90):
    """Kernel names without return types, namespaces and template arguments' namespaces."""
    name = re.sub(r"^void ", "", name)
    if name.endswith(")"):  # drop the parameter list: the last parenthesised group
        depth = 0
        for at in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[at], 0)
            if depth == 0:
                name = name[:at] if at > 0 else name
                break
    name = re.sub(r"\b[A-Za-z_][A-Za-z0-9_]*::", "", name)
    return name if len(name) <= width else name[: width - 3] + "..."


def union_length(intervals):
    """Total length covered by (start, end) intervals."""
    total, end = 0, None
    for lo, hi in sorted(intervals):
        if end is None or lo > end:
            total += hi - lo
            end = hi
        elif hi > end:
            total += hi - end
            end = hi
    return total


def summarize(logdir, steps):
    """(rows, busy_ms_per_step, source) from the profile under logdir."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=import-outside-toplevel

    paths = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise SystemExit(f"no profile written under {logdir}")
    space = xplane_pb2.XSpace()
    with open(paths[0], "rb") as f:
        space.ParseFromString(f.read())
    gpu_planes = [p for p in space.planes if p.name.startswith("/device:GPU:")]
    planes = gpu_planes or [p for p in space.planes if p.name == "/host:CPU"]
    totals, counts, intervals = collections.Counter(), collections.Counter(), []
    for plane in planes:
        for line in plane.lines:
            # GPU: kernels and copies are on the stream lines; host: TensorFlow's executor
            # threads.
            if gpu_planes and not line.name.startswith("Stream"):
                continue
            if not gpu_planes and not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                if event.duration_ps == 0:
                    continue
                name = plane.event_metadata[event.metadata_id].name
                # Host events of ops are "name:OpType"; "Class::Method" ones are bookkeeping.
                if not gpu_planes and (":" not in name or "::" in name):
                    continue
                totals[name] += event.duration_ps
                counts[name] += 1
                start = line.timestamp_ns * 1000 + event.offset_ps
                intervals.append((start, start + event.duration_ps))
    busy = union_length(intervals) / 1e9 / steps
    rows = [(short_name(name), counts[name] / steps, ps / 1e9 / steps)
            for name, ps in totals.most_common()]
    return rows, busy, "GPU kernels" if gpu_planes else "host TensorFlow events (no GPU)"


def layer_step(args):
    """A zero-argument callable running one forward + backward of the layer."""
    from bench_layers import make_step  # pylint: disable=import-outside-toplevel

    step, x = make_step(args.layer, None if args.layer == "mha" else args.implementation,
                        args.length, args.batch, args.dtype)
    return lambda: step(x), (f"{args.layer} ({args.implementation}), T={args.length}, "
                             f"batch {args.batch}, {args.dtype}")


def op_step(args):
    """A zero-argument callable running the op's forward and backward as one graph call, on
    bench_gpu.py's layout of the pattern (batch 2, 8 heads), input sets rotated as there."""
    import bench_gpu  # pylint: disable=import-outside-toplevel
    from tf_sparse_attn._load import load_op_library  # pylint: disable=import-outside-toplevel

    _, fwd_bwd, _ = bench_gpu.op_calls(load_op_library(), args.op, args.length, args.head_dim)
    inputs = bench_gpu.random_inputs(args.length, args.head_dim, 3)
    calls = itertools.count()
    return (lambda: fwd_bwd(*inputs[next(calls) % len(inputs)])[0],
            f"op {args.op}, T={args.length}, head_dim {args.head_dim}, batch "
            f"{bench_gpu.BATCH}, {bench_gpu.HEADS} heads, bfloat16, forward and backward")


def model_step(args):
    """A zero-argument callable running one training step of the model, built and warmed up
    through model.fit as bench_model.py does."""
    import bench_model  # pylint: disable=import-outside-toplevel

    bench_model._import_models()  # pylint: disable=protected-access
    overrides = {}
    if args.num_layers:
        overrides["model.num_layers"] = args.num_layers
    if args.attention:
        overrides["model.attention"] = args.attention
    _, config, train_step = bench_model.warmed_up_model(args.model, overrides, args.batch, 1)
    return (lambda: train_step()["loss"],
            f"model {args.model} ({config.model.num_layers} layers, {config.model.attention}), "
            f"T={config.model.seq_len}, batch {args.batch}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", default="fixed", help="local, strided, fixed or mha")
    parser.add_argument("--implementation", default="op")
    parser.add_argument("--length", type=int, default=12288)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--model", help="profile a training step of this model configuration "
                        "(models/config.py) instead of a layer")
    parser.add_argument("--op", choices=("dense", "local", "strided", "fixed"),
                        help="profile the op's forward and backward (bench_gpu.py's graph call) "
                        "on this pattern instead of a layer")
    parser.add_argument("--head-dim", type=int, default=64, help="with --op")
    parser.add_argument("--num-layers", type=int, help="with --model: override the depth")
    parser.add_argument("--attention", help="with --model: override the attention kinds")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()

    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    gpu = bool(tf.config.list_physical_devices("GPU"))
    with tf.device("/GPU:0" if gpu else "/CPU:0"):
        if args.op:
            run, what = op_step(args)
        else:
            run, what = model_step(args) if args.model else layer_step(args)
        for _ in range(3):
            np.asarray(run())
        start = time.perf_counter()
        for _ in range(args.steps):
            result = run()
        np.asarray(result)
        wall = (time.perf_counter() - start) * 1e3 / args.steps
        logdir = tempfile.mkdtemp(prefix="profile_step_")
        tf.profiler.experimental.start(logdir)
        for _ in range(args.steps):
            result = run()
        np.asarray(result)
        tf.profiler.experimental.stop()
    rows, busy, source = summarize(logdir, args.steps)
    print(f"{what}: {source} per step")
    print(f"| {'kernel':<90} | per step | ms / step | share |")
    print(f"|{'-' * 92}|---|---|---|")
    for name, count, ms in rows[: args.top]:
        share = f"{ms / busy:.0%}" if busy else "-"
        print(f"| {name:<90} | {count:.1f} | {ms:.3f} | {share} |")
    print(f"\nwall {wall:.3f} ms / step (unprofiled, {args.steps} steps back to back); "
          f"busy {busy:.3f} ms / step; gap {wall - busy:.3f} ms")


if __name__ == "__main__":
    main()
