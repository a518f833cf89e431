"""GPU benchmark of the block-sparse attention op, with PyTorch FlexAttention and SDPA beside it.

    python bench/bench_gpu.py [--quick] [--no-torch] [--write]

bf16, batch 2, 8 heads, head_dim 64 and 128, T = 4096, 16384, 65536; patterns dense causal,
local (w=128), strided (l=128, in the reordered token order, so the reorder copy is not timed)
and fixed (l=128, c=32). Times are medians over several input sets rotated between calls (so
repeated calls do not run out of L2), after warm-up, of batches of graph-mode calls
(tf.function) with one synchronisation per batch, so that dispatch overlaps the kernels. Up to
T = 16384, where a call from Python can cost the host as long as the kernels take, the forward
+ backward is also timed as a model runs it: several calls on distinct inputs in one graph
function, per call. Useful TFLOP/s counts only the attended pairs: 4*d FLOPs per pair forward,
14*d forward+backward.

When torch imports, a subprocess (TensorFlow and PyTorch do not share one process here, each
wanting the GPU memory) times FlexAttention on the same token mask, and SDPA's flash and cuDNN
backends for dense causal. --write replaces the "GPU kernels" section of bench/RESULTS.md.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

import results  # bench/results.py: the stamp and section of RESULTS.md

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, HEADS = 2, 8
STRIDE, SUMMARY, WINDOW = 128, 32, 128
# Block sizes: fixed needs <= 32 to be exact at c = 32; strided needs (T / l) % bs == 0.
BLOCK = {"dense": 64, "local": 64, "strided": 32, "fixed": 32}
# Where one graph call from Python costs about as much host time as the kernels take, the
# forward + backward is also timed IN_GRAPH_CALLS times over distinct inputs in one graph, as a
# model's layers run it.
IN_GRAPH_CALLS, IN_GRAPH_MAX_LENGTH = 8, 16384


def configs(quick):
    lengths = [4096, 16384] if quick else [4096, 16384, 65536]
    for dim in (64, 128):
        for length in lengths:
            for pattern in ("dense", "local", "strided", "fixed"):
                yield dim, length, pattern


def token_mask_pairs(pattern, length):
    """Attended (query, key) pairs of one head."""
    sys.path.insert(0, ROOT)
    from tf_sparse_attn.layouts import attended_pairs  # pylint: disable=import-outside-toplevel
    return attended_pairs(build_layout(pattern, length))


def build_layout(pattern, length):
    sys.path.insert(0, ROOT)
    from tf_sparse_attn.layouts import BlockLayout  # pylint: disable=import-outside-toplevel
    bs = BLOCK[pattern]
    if pattern == "dense":
        return BlockLayout.dense(length, bs)
    if pattern == "local":
        return BlockLayout.local(length, bs, WINDOW)
    if pattern == "strided":
        return BlockLayout.strided(length, bs, STRIDE)
    return BlockLayout.fixed(length, bs, STRIDE, SUMMARY)


def median_ms(fn, sync, batches=5, batch_s=0.2):
    """Median over batches of back-to-back calls, one synchronisation per batch: per-call
    synchronisation would time the host round trip instead of the kernels. At least three
    calls and 0.2 s per batch: with two 10 ms calls per batch, the first call's host latency
    and the final copy added 1.3 ms per call to the dense fwd+bwd (10.3 against 9.0 ms)."""
    fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    once = time.perf_counter() - start
    calls = int(min(50, max(3, batch_s / max(once, 1e-6))))
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - start) / calls)
    return 1e3 * float(np.median(times))


# ------------------------------------------------------------------------------------- ours

def op_calls(lib, pattern, length, dim):
    """The op's forward and forward + backward as graph functions (tf.function) of (q, k, v)
    and (q, k, v, d_out), bf16 [BATCH, length, HEADS, dim], for the benchmark's layout of
    `pattern`, and the forward + backward of each of a list of such (q, k, v, d_out) in one
    graph function, as layers of a model run (returning their (dq, dk, dv)); call under
    tf.device("/GPU:0")."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    layout = build_layout(pattern, length)
    attrs = dict(block_size=layout.block_size, scale=dim ** -0.5, causal=True,
                 window=layout.window, min_distance=layout.min_distance)
    bias = tf.zeros([0], tf.float32)
    # Host-resident, as a graph keeps its int32 constants and as the op reads them (placing
    # them on the GPU measured no different).
    with tf.device("/CPU:0"):
        ro, ci, bf = (tf.constant(a) for a in (layout.row_offsets, layout.col_indices,
                                              layout.block_flags))
        co, ri, cf = (tf.constant(a) for a in (layout.col_offsets, layout.row_indices,
                                              layout.csc_flags))
    d_lse = tf.zeros([BATCH, HEADS, length], tf.float32)

    def attend_and_grad(q, k, v, d_out):
        out, lse = lib.block_sparse_attention(q, k, v, bias, ro, ci, bf, **attrs)
        return lib.block_sparse_attention_grad(q, k, v, bias, ro, ci, bf, out, lse, d_out,
                                               d_lse, co, ri, cf, **attrs)

    @tf.function
    def fwd(q, k, v):
        return lib.block_sparse_attention(q, k, v, bias, ro, ci, bf, **attrs)[0]

    @tf.function
    def fwd_bwd(q, k, v, d_out):
        return attend_and_grad(q, k, v, d_out)

    @tf.function
    def fwd_bwd_in_graph(sets):
        return [attend_and_grad(*inputs) for inputs in sets]

    return fwd, fwd_bwd, fwd_bwd_in_graph


def random_inputs(length, dim, sets):
    """`sets` lists of four bf16 [BATCH, length, HEADS, dim] tensors of random normals."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    shape = [BATCH, length, HEADS, dim]
    return [[tf.cast(tf.random.normal(shape), tf.bfloat16) for _ in range(4)]
            for _ in range(sets)]


def bench_ours(quick):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
    sys.path.insert(0, ROOT)
    from tf_sparse_attn._load import load_op_library  # pylint: disable=import-outside-toplevel
    lib = load_op_library()
    rows = []
    for dim, length, pattern in configs(quick):
        pairs = BATCH * HEADS * token_mask_pairs(pattern, length)
        row = dict(dim=dim, T=length, pattern=pattern, block=BLOCK[pattern], pairs=pairs)
        try:
            with tf.device("/GPU:0"):
                tf.config.experimental.reset_memory_stats("GPU:0")
                sets = 2 if length >= 65536 else 3
                inputs = random_inputs(length, dim, sets)
                fwd, fwd_bwd, fwd_bwd_in_graph = op_calls(lib, pattern, length, dim)
                state = {"i": 0, "last": None}

                def call(fn, n_args):
                    def run():
                        args = inputs[state["i"] % sets][:n_args]
                        state["i"] += 1
                        state["last"] = fn(*args)
                    return run

                def sync():
                    last = state["last"]
                    first = last[0] if isinstance(last, (list, tuple)) else last
                    first[0, 0, 0, 0].numpy()

                row["fwd_ms"] = median_ms(call(fwd, 3), sync)
                row["fwdbwd_ms"] = median_ms(call(fwd_bwd, 4), sync)
                row["peak_gib"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**30
                del inputs
                if length <= IN_GRAPH_MAX_LENGTH:
                    in_graph = random_inputs(length, dim, IN_GRAPH_CALLS)

                    def run_in_graph():
                        state["last"] = fwd_bwd_in_graph(in_graph)

                    def sync_in_graph():
                        state["last"][-1][0][0, 0, 0, 0].numpy()

                    row["fwdbwd_in_graph_ms"] = (median_ms(run_in_graph, sync_in_graph) /
                                                 IN_GRAPH_CALLS)
                    del in_graph
                # The last outputs go too, so that the next configuration's peak is its own.
                state["last"] = None
        except Exception as error:  # pylint: disable=broad-except
            row["error"] = f"{type(error).__name__}: {str(error)[:120]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------ torch

def torch_mask_mod(pattern):
    if pattern == "dense":
        return lambda b, h, q, k: q >= k
    if pattern == "local":
        return lambda b, h, q, k: (q >= k) & (q - k < WINDOW)
    if pattern == "strided":
        return lambda b, h, q, k: (q >= k) & ((q - k) % STRIDE == 0)
    return lambda b, h, q, k: (q >= k) & ((q // STRIDE == k // STRIDE) |
                                          (k % STRIDE >= STRIDE - SUMMARY))


def bench_torch(quick):
    import torch  # pylint: disable=import-outside-toplevel
    from torch.nn.attention import SDPBackend, sdpa_kernel  # pylint: disable=import-outside-toplevel
    from torch.nn.attention.flex_attention import (  # pylint: disable=import-outside-toplevel
        create_block_mask, flex_attention)
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    sync = torch.cuda.synchronize
    for dim, length, pattern in configs(quick):
        runs = []
        if pattern == "dense":
            runs += [("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                     ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)]
        # FlexAttention compiles per shape: timed at head_dim 64 and where the targets are.
        if dim == 64 and (length == 16384 or (length == 65536 and pattern in ("fixed", "strided"))):
            runs.append(("flex", None))
        for name, backend in runs:
            row = dict(dim=dim, T=length, pattern=pattern, impl=name)
            try:
                torch.cuda.reset_peak_memory_stats()
                shape = (BATCH, HEADS, length, dim)
                sets = [[torch.randn(shape, device="cuda", dtype=torch.bfloat16,
                                     requires_grad=True) for _ in range(3)] for _ in range(2)]
                d_out = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
                if backend is not None:
                    def attend(q, k, v, backend=backend):
                        with sdpa_kernel(backend):
                            return torch.nn.functional.scaled_dot_product_attention(
                                q, k, v, is_causal=True)
                else:
                    mask = create_block_mask(torch_mask_mod(pattern), None, None, length, length,
                                             device="cuda")

                    def attend(q, k, v, mask=mask):
                        return flex(q, k, v, block_mask=mask)
                state = {"i": 0}

                def fwd():
                    q, k, v = sets[state["i"] % 2]
                    state["i"] += 1
                    with torch.no_grad():
                        attend(q, k, v)

                def fwd_bwd():
                    q, k, v = sets[state["i"] % 2]
                    state["i"] += 1
                    attend(q, k, v).backward(d_out)

                row["fwd_ms"] = median_ms(fwd, sync)
                row["fwdbwd_ms"] = median_ms(fwd_bwd, sync)
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                del sets
            except Exception as error:  # pylint: disable=broad-except
                row["error"] = f"{type(error).__name__}: {str(error)[:120]}"
                if "out of memory" in str(error).lower():
                    row["error"] = "out of memory"
            torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


# ---------------------------------------------------------------------------------- report

def tflops(pairs, dim, ms, per_pair):
    return pairs * per_pair * dim / (ms * 1e-3) / 1e12


def table(ours, theirs):
    lines = ["| head_dim | T | pattern | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | "
             f"fwd+bwd TFLOP/s | peak GiB | fwd+bwd ms, {IN_GRAPH_CALLS} in one graph |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    pairs = {(r["dim"], r["T"], r["pattern"]): r["pairs"] for r in ours}
    for r in ours + theirs:
        key = (r["dim"], r["T"], r["pattern"])
        impl = r.get("impl", f"ours (block {r.get('block')})")
        if "error" in r:
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {impl} | {r['error']} ||||||")
            continue
        p = pairs[key]
        in_graph = r.get("fwdbwd_in_graph_ms")
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {impl} | {r['fwd_ms']:.3f} | "
            f"{tflops(p, key[0], r['fwd_ms'], 4):.0f} | {r['fwdbwd_ms']:.3f} | "
            f"{tflops(p, key[0], r['fwdbwd_ms'], 14):.0f} | {r['peak_gib']:.2f} | "
            f"{'' if in_graph is None else f'{in_graph:.3f}'} |")
    return "\n".join(lines)


def device_name():
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              check=False).stdout.strip()
    except OSError:
        return "unknown"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--torch-only", action="store_true")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.torch_only:
        rows = bench_torch(args.quick)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f)
        return
    ours = bench_ours(args.quick)
    theirs = []
    if not args.no_torch:
        out = os.path.join(os.environ.get("OUT", "/tmp"), "bench_torch.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--torch-only", "--json", out]
        if args.quick:
            cmd.append("--quick")
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the torch process needs none of TensorFlow's libraries
        proc = subprocess.run(cmd, env=env, check=False)
        if proc.returncode == 0 and os.path.exists(out):
            theirs = json.load(open(out))
        else:
            print(f"torch comparison failed or unavailable (rc {proc.returncode})")
    body = (f"bf16, batch {BATCH}, {HEADS} heads; medians of graph-mode calls; useful TFLOP/s "
            "(4*d FLOPs per attended pair fwd, 14*d fwd+bwd); strided timed in its reordered "
            f"token order; the last column: per call, {IN_GRAPH_CALLS} calls on distinct inputs "
            "in one graph function.\n\n" + table(ours, theirs))
    if args.write:
        print(results.write_section("GPU kernels", device_name(), body))
    else:
        print(body)


if __name__ == "__main__":
    main()
