"""Builds tf_sparse_attn and its op library.

The op library (tf_sparse_attn/_sparse_attention_ops.so) is compiled against the TensorFlow
installed in the build environment, with the flags it reports, so install with
`pip install --no-build-isolation` into an environment that already has the pinned TensorFlow.

The CUDA kernels (cc/kernels/*.cu.cc) are compiled with nvcc when it is found (NVCC or
CUDA_HOME or PATH) and TF_SPARSE_ATTN_CUDA is not "0"; otherwise the library is CPU-only.
"""

import concurrent.futures
import glob
import os
import shutil
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
LIBRARY = "tf_sparse_attn._sparse_attention_ops"
# SASS for Ampere and Hopper plus PTX, so newer GPUs can still JIT the kernels. Hopper's SASS is
# built for sm_90a, whose warpgroup products (wgmma) the forward, dq and dk/dv kernels use;
# TSA_WITH_SM90A tells the host code that those kernels exist.
CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=compute_90",
    "-DTSA_WITH_SM90A=1",
]


def _find_nvcc():
    if os.environ.get("TF_SPARSE_ATTN_CUDA", "1") == "0":
        return None
    candidates = [os.environ.get("NVCC")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for path in candidates:
        if path and os.path.exists(path):
            return os.path.realpath(path)
    return None


def _cudart_dir(cuda_home):
    """The folder holding libcudart_static.a: nvcc may be a wrapper script outside the toolkit,
    and toolkits put the library in lib64, lib or targets/<arch>/lib."""
    homes = [cuda_home, os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    for home in filter(None, homes):
        for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
            if os.path.exists(os.path.join(home, sub, "libcudart_static.a")):
                return os.path.join(home, sub)
    return os.path.join(cuda_home, "lib64")


def _run(cmd):
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}):\n{' '.join(cmd)}\n{proc.stdout}")
    return proc.stdout


class BuildOpLibrary(build_ext):
    """Compiles cc/ with TensorFlow's flags, the .cu.cc files with nvcc, in parallel."""

    def build_extension(self, ext):
        import tensorflow as tf  # pylint: disable=import-outside-toplevel

        compile_flags = tf.sysconfig.get_compile_flags()
        link_flags = tf.sysconfig.get_link_flags()
        cutlass = os.path.join(tf.sysconfig.get_include(), "external", "cutlass_archive", "include")
        sources = sorted(
            s for s in glob.glob(os.path.join(ROOT, "cc", "**", "*.cc"), recursive=True)
            if not s.endswith(".cu.cc"))
        cuda_sources = sorted(glob.glob(os.path.join(ROOT, "cc", "**", "*.cu.cc"), recursive=True))
        nvcc = _find_nvcc() if cuda_sources else None

        build_dir = os.path.join(self.build_temp, "op_library")
        os.makedirs(build_dir, exist_ok=True)
        includes = [f"-I{ROOT}"]
        defines = ["-DGOOGLE_CUDA=1"] if nvcc else []
        cxx = os.environ.get("CXX", "g++")
        jobs = []
        for src in sources:
            obj = os.path.join(build_dir, os.path.relpath(src, ROOT).replace(os.sep, "_") + ".o")
            jobs.append(([cxx, "-c", src, "-o", obj, "-O3", "-fPIC", "-Wno-sign-compare",
                          "-fvisibility-inlines-hidden", *includes, *defines, *compile_flags], obj))
        if nvcc:
            cuda_home = os.path.dirname(os.path.dirname(nvcc))
            nvcc_flags = [f for f in compile_flags if f.startswith(("-I", "-D"))]
            for src in cuda_sources:
                obj = os.path.join(build_dir, os.path.relpath(src, ROOT).replace(os.sep, "_") + ".o")
                jobs.append(([nvcc, "-x", "cu", "-c", src, "-o", obj, "-O3", "-std=c++17",
                              "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-lineinfo",
                              "-DNDEBUG", *CUDA_ARCH_FLAGS, *includes, f"-I{cutlass}", *defines,
                              *nvcc_flags], obj))
        print(f"tf_sparse_attn: compiling {len(sources)} C++ and "
              f"{len(cuda_sources) if nvcc else 0} CUDA files "
              f"({'CUDA ' + nvcc if nvcc else 'CPU only: no nvcc or no CUDA sources'})",
              flush=True)
        workers = max(1, int(os.environ.get("TF_SPARSE_ATTN_BUILD_JOBS", os.cpu_count() or 1)))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = {pool.submit(_run, cmd): obj for cmd, obj in jobs}
            for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
                future.result()
                print(f"  [{done}/{len(jobs)}] {os.path.basename(futures[future])}", flush=True)

        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        link = [cxx, "-shared", "-o", target, *[obj for _, obj in jobs], *link_flags]
        if nvcc:
            link += [f"-L{_cudart_dir(cuda_home)}", "-lcudart_static", "-ldl", "-lrt",
                     "-lpthread"]
        _run(link)
        print(f"tf_sparse_attn: built {target}", flush=True)

    def get_ext_filename(self, fullname):
        # Loaded with tf.load_op_library, not imported: a plain .so name, no ABI tag.
        return os.path.join(*fullname.split(".")) + ".so"


setup(
    ext_modules=[Extension(LIBRARY, sources=[])],
    cmdclass={"build_ext": BuildOpLibrary},
)
