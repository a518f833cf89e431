"""CPU benchmark of the fused op against dense masked attention written in plain TF ops.

Each (implementation, length) runs in a fresh process so that its peak RSS is its own.
Prints a table and writes it to bench/RESULTS.md ("Op on the CPU").

    python bench/bench_op_cpu.py                 # T = 2048, 4096, 8192
    python bench/bench_op_cpu.py --lengths 1024 --repeats 2
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

HEADS, HEAD_DIM, BATCH = 8, 64, 1
STRIDE, SUMMARY, WINDOW = 128, 32, 128
IMPLEMENTATIONS = ["dense masked (TF ops)", "dense", "local", "strided", "fixed"]


def build_layout(name, length):
    from tf_sparse_attn.layouts import BlockLayout
    if name == "dense":
        return BlockLayout.dense(length, 32)
    if name == "local":
        return BlockLayout.local(length, 32, WINDOW)
    if name == "strided":
        block = max(b for b in (16, 32) if length % (STRIDE * b) == 0)
        return BlockLayout.strided(length, block, STRIDE)
    return BlockLayout.fixed(length, 32, STRIDE, SUMMARY)


def measure(name, length, repeats):
    """Runs in the child process: returns times (ms), peak RSS growth (MiB) and pairs."""
    import numpy as np
    import tensorflow as tf

    from tf_sparse_attn import sparse_attention
    from tf_sparse_attn.layouts import attended_pairs

    rng = np.random.default_rng(0)
    q, k, v = (tf.constant(rng.standard_normal((BATCH, length, HEADS, HEAD_DIM)), tf.float32)
               for _ in range(3))
    scale = HEAD_DIM ** -0.5
    if name.startswith("dense masked"):
        causal = np.tril(np.ones((length, length), bool))
        bias = tf.constant(np.where(causal, 0.0, -np.inf).astype(np.float32))
        pairs = HEADS * length * (length + 1) // 2

        def attend(q, k, v):
            scores = tf.einsum("bihd,bjhd->bhij", q, k) * scale + bias
            return tf.einsum("bhij,bjhd->bihd", tf.nn.softmax(scores, axis=-1), v)
    else:
        layout = build_layout(name, length)
        pairs = attended_pairs(layout) * (HEADS if layout.num_heads == 1 else 1)

        def attend(q, k, v):
            return sparse_attention(q, k, v, layout)

    forward = tf.function(attend)

    @tf.function
    def forward_backward(q, k, v):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            loss = tf.reduce_sum(attend(q, k, v))
        return tape.gradient(loss, [q, k, v])

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"pairs": int(pairs)}
    for label, fn in (("fwd", forward), ("fwd_bwd", forward_backward)):
        tf.nest.map_structure(lambda t: t.numpy(), fn(q, k, v))  # warm-up: tracing, allocation
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy(), fn(q, k, v))
            times.append((time.perf_counter() - start) * 1e3)
        result[label] = float(np.median(times))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["peak_mib"] = max(peak - base_rss, 0) / 1024
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,4096,8192")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if args.child:
        name, length = args.child.rsplit(":", 1)
        print(json.dumps(measure(name, int(length), args.repeats)))
        return

    from bench.results import cpu_device, markdown_table, write_section

    rows, by_key = [], {}
    lengths = [int(x) for x in args.lengths.split(",")]
    for length in lengths:
        for name in IMPLEMENTATIONS:
            print(f"T={length:6d} {name:24s}", end=" ", flush=True)
            proc = subprocess.run(
                [sys.executable, __file__, "--child", f"{name}:{length}", "--repeats",
                 str(args.repeats)], capture_output=True, text=True,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
            if proc.returncode != 0:
                print("failed:", proc.stderr.strip().splitlines()[-1:])
                by_key[(length, name)] = None
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            by_key[(length, name)] = r
            print(f"fwd {r['fwd']:9.1f} ms  fwd+bwd {r['fwd_bwd']:9.1f} ms  "
                  f"peak +{r['peak_mib']:8.0f} MiB", flush=True)
    for length in lengths:
        baseline = by_key.get((length, IMPLEMENTATIONS[0]))
        for name in IMPLEMENTATIONS:
            r = by_key.get((length, name))
            if r is None:
                rows.append([length, name, "failed", "", "", "", "", ""])
                continue
            speedup = (f"{baseline['fwd_bwd'] / r['fwd_bwd']:.1f}x" if baseline else "n/a")
            gflops = 14 * HEAD_DIM * r["pairs"] / (r["fwd_bwd"] * 1e-3) / 1e9
            rows.append([length, name, f"{r['fwd']:.1f}", f"{r['fwd_bwd']:.1f}", speedup,
                         f"{gflops:.1f}", f"{r['pairs'] / (HEADS * length):.0f}",
                         f"{r['peak_mib']:.0f}"])
    table = markdown_table(["T", "implementation", "fwd ms", "fwd+bwd ms",
                            "fwd+bwd speed-up vs dense masked", "useful GFLOP/s (fwd+bwd)",
                            "keys per query", "peak RSS growth MiB"], rows)
    body = (f"{HEADS} heads of {HEAD_DIM}, batch {BATCH}, float32; patterns local(w={WINDOW}), "
            f"strided(l={STRIDE}), fixed(l={STRIDE}, c={SUMMARY}), block 32 (strided: 16 where "
            f"T is not a multiple of l*32). Dense masked = einsum + additive causal mask + "
            f"softmax + einsum in TF ops. Median of {args.repeats} after a warm-up; every "
            "configuration in its own process.\n\n" + table)
    print("\n" + body)
    if not args.no_write:
        write_section("Op on the CPU", cpu_device(), body)


if __name__ == "__main__":
    main()
