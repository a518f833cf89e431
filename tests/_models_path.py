"""Makes tf_sparse_attn.models importable from a source checkout that is not pip-installed:
the package maps models/ to tf_sparse_attn.models through package_dir, which only an install
applies."""

import os

import tf_sparse_attn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    import tf_sparse_attn.models  # noqa: F401
except ImportError:
    tf_sparse_attn.__path__.append(ROOT)
    import tf_sparse_attn.models  # noqa: F401

# For subprocesses: run a module of tf_sparse_attn.models with the same mapping.
RUN_MODULE = ("import runpy, sys, tf_sparse_attn\n"
              "try:\n    import tf_sparse_attn.models\n"
              "except ImportError:\n    tf_sparse_attn.__path__.append({root!r})\n"
              "sys.argv[0] = {module!r}\n"
              "runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")


def module_command(module: str) -> list:
    """argv prefix that runs `python -m module` whether or not the package is installed."""
    import sys  # pylint: disable=import-outside-toplevel
    return [sys.executable, "-c", RUN_MODULE.format(root=ROOT, module=module)]
