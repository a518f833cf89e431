"""Sample from a trained Sparse Transformer: images as a PNG grid, audio as WAV, bytes as text.

    python -m tf_sparse_attn.models.sample runs/default
    python -m tf_sparse_attn.models.sample runs/default --num 4 --temperature 0.8 \\
        --prompt "def main(" --output /tmp/samples

The run directory is one written by `tf_sparse_attn.models.train` (config.json and
model.weights.h5, or --weights for a checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from tf_sparse_attn.models import config as config_lib  # noqa: E402


def load_run(run_dir: str, weights: str | None = None, implementation: str | None = None):
    """(config, model) of a training run directory, with its final (or given) weights."""
    from tf_sparse_attn.models.train import create_model  # pylint: disable=import-outside-toplevel

    config_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(config_path):
        raise config_lib.ConfigError(f"{run_dir} holds no config.json: not a training run "
                                     "directory")
    with open(config_path) as f:
        config = config_lib.Config.from_json(f.read())
    if implementation:
        config = config_lib.apply_overrides(config, {"model.implementation": implementation})
    weights = weights or os.path.join(run_dir, "model.weights.h5")
    if not os.path.exists(weights):
        raise config_lib.ConfigError(f"no weights at {weights}; pass --weights with a "
                                     "checkpoint (checkpoints/epoch-NNN.weights.h5)")
    model = create_model(config, compiled=False)
    model.load_weights(weights)
    return config, model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tf_sparse_attn.models.sample",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", default=os.path.join("runs", "default"),
                        help="training output directory (default: %(default)s)")
    parser.add_argument("--weights", help="weights file (default: RUN_DIR/model.weights.h5)")
    parser.add_argument("--num", type=int, default=4, help="samples to draw")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="softmax temperature; 0 is greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt", help="text whose bytes start every sample (byte tasks)")
    parser.add_argument("--output", help="output file stem (default: RUN_DIR/samples)")
    parser.add_argument("--implementation", choices=("op", "portable", "reference"))
    args = parser.parse_args(argv)
    try:
        from tf_sparse_attn.models import sampling  # pylint: disable=import-outside-toplevel

        config, model = load_run(args.run_dir, args.weights, args.implementation)
        if args.num < 1:
            raise config_lib.ConfigError("--num must be at least 1")
        prompt = None
        if args.prompt:
            data = np.frombuffer(args.prompt.encode("utf-8"), np.uint8)
            if data.size > config.model.seq_len:
                raise config_lib.ConfigError(f"the prompt has {data.size} bytes; the model "
                                             f"takes {config.model.seq_len}")
            prompt = np.tile(data[None], [args.num, 1])
        tokens = sampling.Sampler(model, batch_size=args.num).sample(
            temperature=args.temperature, seed=args.seed, prompt=prompt)
        paths = sampling.write_samples(
            tokens, config.data.task, args.output or os.path.join(args.run_dir, "samples"),
            image_shape=config.model.position_shape, encoding=config.data.encoding,
            sample_rate=config.data.sample_rate)
    except (config_lib.ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
