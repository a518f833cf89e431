"""Benchmark of the attention layers against keras.layers.MultiHeadAttention (causal mask):
forward + backward time (inputs and all weights) and peak memory of one layer call.

CPU (the default): each case runs in a fresh process, so its peak RSS growth is its own;
the table goes to bench/RESULTS.md, section "Layers, CPU".

    python bench/bench_layers.py                          # T = 1024 ... 8192, float32
    python bench/bench_layers.py --lengths 1024 --repeats 2

GPU: peak GPU memory from tf.config.experimental.get_memory_info after reset_memory_stats;
the table goes to $OUT when it is set (an output folder), else to bench/RESULTS.md, section
"Layers, GPU".

    python bench/bench_layers.py --device gpu --dtype bfloat16 --lengths 4096,12288,16384

Layers: local(w=256), StridedAttention(l=128, merged), FixedAttention(l=128, c=32), 8 heads of
64 (model width 512), batch 1, each on the custom op and on the portable path.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

HEADS, HEAD_DIM = 8, 64
LAYERS = {
    "local": "LocalAttention(w=256)",
    "strided": "StridedAttention(l=128, merged)",
    "fixed": "FixedAttention(l=128, c=32)",
}


def make_layer(kind, implementation, dtype, length):
    import keras

    import tf_sparse_attn as tsa

    common = dict(num_heads=HEADS, key_dim=HEAD_DIM, dtype=dtype)
    if kind == "mha":
        return keras.layers.MultiHeadAttention(**common)
    common.update(implementation=implementation)
    if kind == "local":
        return tsa.LocalAttention(window=256, block_size=64, **common)
    if kind == "strided":
        # The strided factor needs T to be a multiple of stride * block_size.
        block = max(b for b in (64, 32, 16, 8) if length % (128 * b) == 0 or b == 8)
        return tsa.StridedAttention(stride=128, block_size=block, **common)
    if kind == "fixed":
        return tsa.FixedAttention(stride=128, summary=32, block_size=32, **common)
    raise ValueError(kind)


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def make_step(kind, implementation, length, batch, dtype, xla=False):
    """The layer, its input and a tf.function of one forward + backward of the layer with
    respect to its input and weights (returning one scalar that depends on every gradient, so
    that nothing is pruned). Call under the device scope the step should run on."""
    import numpy as np
    import tensorflow as tf

    layer = make_layer(kind, implementation, dtype, length)
    rng = np.random.default_rng(0)
    x = tf.cast(tf.constant(rng.standard_normal((batch, length, HEADS * HEAD_DIM)),
                            tf.float32), dtype)
    if kind == "mha":
        layer(x[:, :8], x[:, :8], use_causal_mask=True)
    else:
        layer(x[:, :8])
    variables = layer.trainable_variables

    @tf.function(jit_compile=xla and implementation != "op")
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, x, use_causal_mask=True) if kind == "mha" else layer(x)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 2)
        grads = tape.gradient(loss, [x] + variables)
        return loss + tf.add_n([tf.reduce_sum(tf.cast(g, tf.float32)) for g in grads])

    return step, x


# GPU steps per timed batch: the steps of a batch are dispatched back to back and synchronised
# once, as in training, so that the host's per-call round trip is not timed as layer time.
GPU_STEPS_PER_TIMING = 5


def measure(kind, implementation, length, batch, dtype, device, repeats, xla):
    """Times one layer's forward + backward; returns (median ms, peak MiB)."""
    import tensorflow as tf

    gpu = device == "gpu"
    if gpu and not tf.config.list_physical_devices("GPU"):
        raise SystemExit("--device gpu: TensorFlow sees no GPU")
    with tf.device("/GPU:0" if gpu else "/CPU:0"):
        step, x = make_step(kind, implementation, length, batch, dtype, xla)
        calls = GPU_STEPS_PER_TIMING if gpu else 1

        def sync():
            if gpu:
                tf.test.experimental.sync_devices()

        # The peak is taken from before the first call: memory that the allocator keeps after
        # it would hide the next calls' use from an RSS high-water mark.
        sync()
        if gpu:
            tf.config.experimental.reset_memory_stats("GPU:0")
        else:
            with open("/proc/self/clear_refs", "w") as f:  # resets the peak RSS (VmHWM)
                f.write("5")
            base = _rss_kib("VmRSS")
        step(x).numpy()  # trace and warm up
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                result = step(x)
            result.numpy()
            sync()
            times.append((time.perf_counter() - start) * 1e3 / calls)
        if gpu:
            peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2 ** 20
        else:
            peak = (_rss_kib("VmHWM") - base) / 1024
    return statistics.median(times), peak


def portable_estimate_gib(kind, length, batch, dtype):
    """Rough peak of the portable path: the gathered keys and values (and their gradients)
    and the float32 scores, per layout pass."""
    from tf_sparse_attn.portable import _row_groups  # pylint: disable=import-outside-toplevel

    layer = make_layer(kind, "portable", "float32", length)
    size = 4 if dtype == "float32" else 2
    total = 0
    for layout in layer.layouts_for(length):
        for first, end, cols, _, _ in _row_groups(layout):
            blocks = cols.shape[-1]  # key blocks gathered per query block of the range
            rows = batch * HEADS * (end - first) * layout.block_size
            total += rows * blocks * (4 * HEAD_DIM * size + 3 * 4 * layout.block_size)
    return total / 2 ** 30


def run_case(args, kind, implementation, length):
    """A fresh process per case on the CPU (peak RSS is per process)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, implementation or "-",
           str(length), "--batch", str(args.batch), "--dtype", args.dtype, "--repeats",
           str(args.repeats)] + (["--xla"] if args.xla else [])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["failed"]
        return None, tail[0][:80]
    ms, peak = json.loads(result.stdout.strip().splitlines()[-1])
    return ms, peak


def run_length_on_gpu(args, cases, length):
    """All cases of one length in one process (the GPU allocator's statistics reset between
    cases), ours first and MultiHeadAttention last: at B*H*T*T >= 2**31 score elements some
    TensorFlow GPU kernels fail hard, and a crash then loses only the cases not yet printed."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child-gpu", str(length),
           ",".join(f"{k}:{i or '-'}" for k, i in cases), "--batch", str(args.batch),
           "--dtype", args.dtype, "--repeats", str(args.repeats)] + (
               ["--xla"] if args.xla else [])
    result = subprocess.run(cmd, capture_output=True, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    found = {}
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            found[(record["kind"], record["impl"])] = (record["ms"], record["peak"])
    why = ("process crashed" if result.returncode < 0 else "failed") + f" ({result.returncode})"
    return {case: found.get((case[0], case[1] or "-"), (None, why)) for case in cases}


def child_gpu(args):
    length = int(args.child_gpu[0])
    for case in args.child_gpu[1].split(","):
        kind, implementation = case.split(":")
        try:
            ms, peak = measure(kind, None if implementation == "-" else implementation, length,
                               args.batch, args.dtype, "gpu", args.repeats, args.xla)
        except Exception as error:  # reported per case, the others still run
            ms, peak = None, type(error).__name__[:80]
        print(json.dumps({"kind": kind, "impl": implementation, "ms": ms, "peak": peak}),
              flush=True)


def write_table(args, header, rows, final):
    """The table so far into RESULTS.md (or $OUT/RESULTS.md): rewritten after every length,
    so a run cut short by a time limit keeps the lengths it finished."""
    from bench import results  # pylint: disable=import-outside-toplevel

    note = (f"{args.dtype}, batch {args.batch}, {HEADS} heads of {HEAD_DIM}; forward + backward "
            f"of one layer (projections included) with respect to its input and weights; "
            f"median of {args.repeats}"
            + (f" timings of {GPU_STEPS_PER_TIMING} steps dispatched back to back"
               if args.device == "gpu" else "") + "; peak memory is "
            + ("the GPU allocator's peak" if args.device == "gpu"
               else "the growth of the process's peak RSS from before the first call (tracing "
                  "included)")
            + (" ; XLA on for the portable path and MultiHeadAttention" if args.xla else ""))
    table = note + "\n\n" + results.markdown_table(header, rows)
    if final:
        print("\n" + table)
    if args.no_write:
        return
    if args.device == "gpu":
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        details = tf.config.experimental.get_device_details(
            tf.config.list_physical_devices("GPU")[0])
        device = details.get("device_name", "GPU")
        out = os.environ.get("OUT")
        path = os.path.join(out, "RESULTS.md") if out else results.RESULTS
        results.write_section("Layers, GPU", device, table, path=path)
    else:
        results.write_section("Layers, CPU", results.cpu_device(), table)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--layers", default=",".join(LAYERS))
    parser.add_argument("--implementations", default="op,portable")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per case (median); default 3 on CPU, 10 on GPU")
    parser.add_argument("--xla", action="store_true",
                        help="compile the portable path and MultiHeadAttention with XLA")
    parser.add_argument("--max-gib", type=float, default=None,
                        help="skip portable cases whose estimated peak exceeds this "
                             "(default 8 on the CPU, 40 on the GPU)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--child-gpu", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 10 if args.device == "gpu" else 3
    if args.max_gib is None:
        args.max_gib = 40.0 if args.device == "gpu" else 8.0

    if args.child:
        kind, implementation, length = args.child
        ms, peak = measure(kind, None if implementation == "-" else implementation,
                           int(length), args.batch, args.dtype, "cpu", args.repeats, args.xla)
        print(json.dumps([ms, peak]))
        return

    if args.child_gpu:
        child_gpu(args)
        return

    lengths = [int(t) for t in args.lengths.split(",")]
    kinds = [k for k in args.layers.split(",") if k]
    implementations = [i for i in args.implementations.split(",") if i]
    header = ["T", "layer", "implementation", "fwd+bwd ms", "peak MiB", "speed-up vs MHA",
              "memory vs MHA"]
    rows = []
    for length in lengths:
        cases = [(k, i) for k in kinds for i in implementations]
        skipped = {}
        for kind, implementation in cases:
            estimate = (portable_estimate_gib(kind, length, args.batch, args.dtype)
                        if implementation == "portable" else 0)
            if estimate > args.max_gib:
                skipped[(kind, implementation)] = (
                    None, f"skipped: needs about {estimate:.0f} GiB (> --max-gib)")
        to_run = [c for c in cases if c not in skipped] + [("mha", None)]
        if args.device == "gpu":
            measured = run_length_on_gpu(args, to_run, length)
        else:
            measured = {c: run_case(args, c[0], c[1], length) for c in to_run}
        measured.update(skipped)
        base_ms, base_peak = measured[("mha", None)]
        for kind, implementation in [("mha", None)] + cases:
            ms, peak = measured[(kind, implementation)]
            name = "MultiHeadAttention (causal mask)" if kind == "mha" else LAYERS[kind]
            if ms is None:
                row = [length, name, implementation or "keras",
                       "skipped" if str(peak).startswith("skipped") else "failed", peak, "", ""]
            else:
                speed = f"{base_ms / ms:.1f}x" if base_ms else ""
                memory = f"{peak / base_peak:.3f}x" if base_ms and base_peak > 0 else ""
                row = [length, name, implementation or "keras", f"{ms:.1f}", f"{peak:.0f}",
                       speed, memory]
            rows.append(row)
            print(" | ".join(str(c) for c in row), flush=True)
        if length != lengths[-1]:
            write_table(args, header, rows, final=False)

    write_table(args, header, rows, final=True)


if __name__ == "__main__":
    main()
