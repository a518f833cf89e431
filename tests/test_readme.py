"""The README's quickstart code runs as written."""

import os
import re

import numpy as np
import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def quickstart_blocks():
    text = open(README).read()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_starts_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", open(README).read(), re.S).group(1)
    commands = [line for line in first_block.splitlines() if line.strip()]
    assert len(commands) == 2
    assert "tf_sparse_attn.models.train" in commands[0] and "pytest" in commands[1]
    ci = open(os.path.join(os.path.dirname(README), ".ci", "run")).read()
    for command in commands:
        assert command in ci, f"CI does not run the README's command: {command}"


@pytest.mark.parametrize("index", range(2))
def test_quickstart_block_runs(index):
    blocks = quickstart_blocks()
    assert len(blocks) == 2
    namespace = {}
    exec(compile(blocks[index], f"README quickstart block {index}", "exec"), namespace)  # noqa: S102
    if index == 0:
        assert namespace["model"].output_shape == (None, 4096, 256)
    else:
        out, lse = namespace["out"], namespace["lse"]
        assert out.shape == (2, 1000, 8, 64) and lse.shape == (2, 8, 1000)
        assert np.isfinite(out.numpy()).all()
