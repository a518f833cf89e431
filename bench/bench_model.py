"""Benchmarks of the whole Sparse Transformer: training steps with model.fit's step function.

    python bench/bench_model.py --device cpu           # tokens/s of the built-in default
    python bench/bench_model.py --device gpu [--quick] # the enwik8 and 1M-sample audio steps

GPU: the enwik8 configuration (30 layers, d=512, 8 heads, T=12,288, bf16, recomputed blocks)
for one training step with dense causal, fixed and strided attention, and with
keras.layers.MultiHeadAttention; then the paper's 1,048,576-sample audio configuration. Each
configuration runs in its own process (a fresh GPU memory pool, so peak memory is its own,
and an out-of-memory or a hang cannot take the others down) under a time limit; out of
memory is reported as such. Time is the median of timed steps after warm-up, synchronised by
reading the loss back; peak memory is TensorFlow's allocator peak for the process.

The table goes to $OUT/bench_model.md when $OUT is set, else into bench/RESULTS.md, with
device, commit and date.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# (name, config, overrides, batch): the rows of the GPU table, most important first.
GPU_CASES = [
    ("enwik8 dense", "enwik8", {"model.attention": "dense"}, 1),
    ("enwik8 fixed", "enwik8", {"model.attention": "fixed"}, 1),
    ("enwik8 strided", "enwik8", {"model.attention": "local,strided"}, 1),
    ("audio 1M strided", "audio_1m", {}, 1),
    ("enwik8 MultiHeadAttention", "enwik8", {"model.attention": "mha"}, 1),
    ("enwik8 strided merged", "enwik8", {"model.attention": "strided_merged"}, 1),
    ("enwik8 fixed, no recompute", "enwik8",
     {"model.attention": "fixed", "model.recompute": False}, 1),
]

# Cases that need longer than --time-limit: MultiHeadAttention's step takes seconds, and its
# trace and warm-up ran past 160 s on an H100.
CASE_SECONDS = {"enwik8 MultiHeadAttention": 420}


def selected_cases(only=None):
    """The GPU cases that --only selects: each entry picks the case of that name, or where no
    case has it, every case whose name contains it ("enwik8 fixed" is one case, "fixed" two)."""
    names = {case[0] for case in GPU_CASES}
    return [case for case in GPU_CASES if not only or any(
        entry == case[0] or (entry not in names and entry in case[0]) for entry in only)]


def _import_models():
    import importlib.util  # pylint: disable=import-outside-toplevel
    if importlib.util.find_spec("tf_sparse_attn") is None:  # run from a source checkout
        sys.path.insert(0, ROOT)
    import tf_sparse_attn  # pylint: disable=import-outside-toplevel
    try:
        import tf_sparse_attn.models  # noqa: F401  pylint: disable=import-outside-toplevel
    except ImportError:  # a source checkout: models/ maps to tf_sparse_attn.models on install
        tf_sparse_attn.__path__.append(ROOT)


def _is_oom(error) -> bool:
    text = str(error).lower()
    return type(error).__name__ == "ResourceExhaustedError" or "out of memory" in text or \
        "oom when allocating" in text


_STARTED = time.perf_counter()


def _progress(stage):
    """One line per stage on stderr: the parent reports the last one when a case times out."""
    print(f"PROGRESS {time.perf_counter() - _STARTED:.1f}s {stage}", file=sys.stderr, flush=True)


def warmed_up_model(config_name, overrides, batch, warmup):
    """(model, config, step): the configuration's model trained for `warmup` steps through
    model.fit on fixed random tokens, and a callable running one more training step (model.fit's
    own step function) that returns its logs."""
    import keras  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    from tf_sparse_attn.models import get_config, validate  # pylint: disable=import-outside-toplevel
    from tf_sparse_attn.models.train import create_model  # pylint: disable=import-outside-toplevel

    overrides = dict(overrides, **{"train.batch_size": batch, "train.jit_compile": False})
    config = validate(get_config(config_name, overrides))
    keras.utils.set_random_seed(0)
    model = create_model(config)
    _progress("model built")
    tokens = tf.random.uniform([batch, config.model.seq_len], 0, config.model.vocab_size,
                               tf.int32, seed=1)
    dataset = tf.data.Dataset.from_tensors((tokens, tokens)).repeat()
    # model.fit builds the optimizer and metrics before it traces, so the step is traced once
    # (a bare call of the step function would trace it twice: once to create variables); the
    # warm-up steps run through fit itself.
    model.fit(dataset, epochs=1, steps_per_epoch=max(1, warmup), verbose=0)
    _progress("traced, warm-up done")
    iterator = iter(dataset)
    return model, config, lambda: model.train_function(iterator)


def time_training_steps(config_name, overrides, batch, warmup, steps, device):
    """One case in this process: median step seconds, peak memory, parameter count."""
    _import_models()
    _progress("imported")
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    from tf_sparse_attn.models.model import count_parameters  # pylint: disable=import-outside-toplevel

    model, config, train_step = warmed_up_model(config_name, overrides, batch, warmup)
    gpu = device == "gpu"
    if gpu:
        tf.config.experimental.reset_memory_stats("GPU:0")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logs = train_step()
        loss = float(np.asarray(logs["loss"]))  # reading it back waits for the step
        times.append(time.perf_counter() - start)
        _progress(f"step {len(times)}: {times[-1]:.3f} s")
    result = {"seconds": float(np.median(times)), "loss": loss,
              "parameters": count_parameters(model),
              "tokens_per_second": batch * config.model.seq_len / float(np.median(times)),
              "implementation": model.blocks[0].attention.implementation
              if hasattr(model.blocks[0].attention, "implementation") else "keras"}
    if gpu:
        result["peak_bytes"] = tf.config.experimental.get_memory_info("GPU:0")["peak"]
    return result


def run_case(name, config_name, overrides, batch, args, time_limit=None):
    """Runs one case in a child process under the time limit; returns its result dict."""
    time_limit = int(time_limit or args.time_limit)
    payload = json.dumps({"config": config_name, "overrides": overrides, "batch": batch,
                          "warmup": args.warmup, "steps": args.steps, "device": args.device})
    command = [sys.executable, os.path.abspath(__file__), "--child", payload]
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=time_limit,
                              cwd=ROOT)
    except subprocess.TimeoutExpired as error:
        stderr = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) \
            else (error.stderr or "")
        stages = [l.split(" ", 2)[2] for l in stderr.splitlines() if l.startswith("PROGRESS ")]
        where = f" after '{stages[-1]}'" if stages else " before the model was built"
        return {"name": name, "status": f"timed out (> {time_limit} s{where})"}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if lines:
        result = json.loads(lines[-1][len("RESULT "):])
    else:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        # TensorFlow's own words for an allocation failure (a crash in the allocator leaves
        # no RESULT line behind).
        oom = any(s in (proc.stderr or "").lower() for s in (
            "oom when allocating", "resourceexhaustederror:", "cuda_error_out_of_memory"))
        result = {"status": "out of memory" if oom else
                  f"failed (exit {proc.returncode}): " + " | ".join(tail)[-400:]}
    result["name"] = name
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    return result


def child(payload):
    case = json.loads(payload)
    try:
        result = time_training_steps(case["config"], case["overrides"], case["batch"],
                                     case["warmup"], case["steps"], case["device"])
        result["status"] = "ok"
    except Exception as error:  # pylint: disable=broad-except
        result = {"status": "out of memory" if _is_oom(error) else
                  f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------- reporting

def _gib(value):
    return f"{value / 2 ** 30:.2f}" if value is not None else "-"


def gpu_table(results) -> str:
    from results import markdown_table  # pylint: disable=import-outside-toplevel

    by_name = {r["name"]: r for r in results}
    dense = by_name.get("enwik8 dense", {}).get("seconds")
    rows = []
    for r in results:
        ok = r.get("status") == "ok"
        ratio = f"{r['seconds'] / dense:.3f}" if ok and dense and r["name"].startswith(
            "enwik8") else "-"
        rows.append([r["name"], f"{r['seconds'] * 1000:.0f}" if ok else r.get("status"),
                     ratio, _gib(r.get("peak_bytes")) if ok else "-",
                     f"{r['parameters'] / 1e6:.1f}M" if ok else "-",
                     r.get("implementation", "-")])
    table = markdown_table(["model (one training step, bf16, batch 1)", "ms / step",
                            "vs dense", "peak GiB", "params", "attention"], rows)
    notes = ["enwik8: 30 layers, d=512, 8 heads, T=12,288, fixed l=128 c=32, strided "
             "l=128 (local and strided layers interleaved; 'merged': both in every head), "
             "blocks recomputed in backward unless noted, their arithmetic around attention "
             "in XLA programs shared by all layers (ModelConfig.xla_blocks, 'auto': on the "
             "GPU). Audio: T=1,048,576, 14 layers, d=128, 2 heads, strided l=1024. Paper "
             "(V100, s/iteration): dense 1.31, fixed 0.55, strided 0.35; targets here: "
             "fixed/dense <= 0.35, strided/dense <= 0.25, MultiHeadAttention >= 10x "
             "dense-sparse or out of memory."]
    mha = by_name.get("enwik8 MultiHeadAttention", {})
    fixed = by_name.get("enwik8 fixed", {})
    if mha.get("status") == "ok" and fixed.get("status") == "ok":
        notes.append(f"MultiHeadAttention / fixed: {mha['seconds'] / fixed['seconds']:.1f}x.")
    return table.rstrip("\n") + "\n\n" + " ".join(n for n in notes if n)


def write_report(title, device_name, body, quiet=False):
    from results import commit  # pylint: disable=import-outside-toplevel
    import datetime  # pylint: disable=import-outside-toplevel

    section = (f"## {title}\n\ndevice: {device_name}; commit: {commit()}; date: "
               f"{datetime.date.today().isoformat()}\n\n{body.strip()}\n")
    out = os.environ.get("OUT")
    if out:
        path = os.path.join(out, "bench_model.md")
        with open(path, "w") as f:
            f.write(section)
    else:
        from results import write_section  # pylint: disable=import-outside-toplevel
        write_section(title, device_name, body)
        path = os.path.join(ROOT, "bench", "RESULTS.md")
    if not quiet:
        print(section)
        print(f"written to {path}")


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,"
                              "noheader"], capture_output=True, text=True, timeout=30).stdout
        return out.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown GPU"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer steps, shorter limits")
    parser.add_argument("--steps", type=int, help="timed steps per case")
    parser.add_argument("--warmup", type=int, help="untimed steps per case")
    parser.add_argument("--time-limit", type=int, help="seconds per case")
    parser.add_argument("--budget", type=int, help="seconds for all cases together; the table "
                        "is rewritten after every case, so a run cut short keeps its rows")
    parser.add_argument("--only", action="append", help="run only the case of this name, or "
                        "where no case has it, the cases whose name contains it (repeatable)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    if args.device == "gpu":
        args.steps = args.steps or (2 if args.quick else 3)
        args.warmup = args.warmup or (1 if args.quick else 2)
        args.time_limit = args.time_limit or (120 if args.quick else 150)
        args.budget = args.budget or (420 if args.quick else 540)
        deadline = time.perf_counter() + args.budget
        results, device_name = [], gpu_name()
        for name, config_name, overrides, batch in selected_cases(args.only):
            left = deadline - time.perf_counter()
            if left < 30:
                result = {"name": name, "status": "skipped (time budget)"}
            else:
                result = run_case(name, config_name, overrides, batch, args, time_limit=min(
                    max(args.time_limit, CASE_SECONDS.get(name, 0)), left))
            results.append(result)
            print(json.dumps(result), flush=True)
            write_report("Sparse Transformer training step (models/)", device_name,
                         gpu_table(results), quiet=True)
        write_report("Sparse Transformer training step (models/)", device_name,
                     gpu_table(results))
        return 0

    # CPU: tokens per second of the built-in default's training step, per implementation.
    from results import cpu_device, markdown_table  # pylint: disable=import-outside-toplevel

    args.steps = args.steps or (3 if args.quick else 10)
    args.warmup = args.warmup or (1 if args.quick else 2)
    args.time_limit = args.time_limit or (300 if args.quick else 600)
    rows = []
    for implementation in ("op", "portable"):
        if args.only and not any(o in implementation for o in args.only):
            continue
        result = run_case(f"default, {implementation}", "default",
                          {"model.implementation": implementation}, 16, args)
        print(json.dumps(result), flush=True)
        ok = result.get("status") == "ok"
        rows.append([result["name"], f"{result['tokens_per_second']:.0f}" if ok else
                     result.get("status"), f"{result['seconds'] * 1000:.0f}" if ok else "-"])
    body = markdown_table(["built-in default (4 layers, d=128, T=256, batch 16, fixed)",
                           "tokens/s", "ms / step"], rows)
    write_report("Sparse Transformer built-in default on CPU (models/)", cpu_device(), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
