"""Build memtrace and its extension memtrace._C.

The extension is built from csrc/: as a CUDA extension where torch has CUDA and nvcc is found,
otherwise from the C++ sources alone (CPU-only), so `pip install -e .` works on either machine.
The Triton kernels live in kernels/ and are installed as the subpackage memtrace.kernels.
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _packages():
    """{package: folder} for memtrace/ and its subpackages, and kernels/ installed as memtrace.kernels."""
    found = {}
    for prefix, root in (("memtrace", "memtrace"), ("memtrace.kernels", "kernels")):
        for sub in [""] + find_packages(root):
            found[prefix + ("." + sub if sub else "")] = os.path.join(root, *sub.split(".")) if sub else root
    return found


PACKAGES = _packages()


def _extension():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    force_cpu = os.environ.get("MEMTRACE_CPU_ONLY", "0") == "1"
    with_cuda = bool(cu) and torch.version.cuda is not None and CUDA_HOME is not None and not force_cpu
    cxx = ["-O3", "-std=c++17"]
    if with_cuda:
        return CUDAExtension(
            "memtrace._C",
            cpp + cu,
            define_macros=[("MEMTRACE_WITH_CUDA", "1")],
            # MEMTRACE_CUDA_ARCHS (e.g. "90") trims the build to the GPU at hand: each arch costs a full nvcc pass.
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"] + [
                f"-gencode=arch=compute_{a},code=sm_{a}"
                for a in os.environ.get("MEMTRACE_CUDA_ARCHS", "90,80").replace(";", ",").split(",") if a.strip()]},
        )
    return CppExtension("memtrace._C", cpp, extra_compile_args={"cxx": cxx})


setup(
    name="memtrace",
    version="0.1.0",
    description="Persistent attention traces and routing-path crystallization as GPU kernels for PyTorch",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system=='Linux'",
        "numpy",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "hf": ["transformers>=5.17", "accelerate>=1.1"],
        "lancedb": ["lancedb==0.40.0", "pyarrow==26.0.1"],
        "qdrant": ["qdrant-client==1.20.0"],
        "viz": ["matplotlib==3.11.2", "plotly==7.1.0"],
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff", "transformers==5.17.0", "accelerate>=1.1",
                "lancedb==0.40.0", "pyarrow==26.0.1", "qdrant-client==1.20.0", "matplotlib==3.11.2", "plotly==7.1.0",
                # the viz test drives the system's chromium (.ci/run installs Debian's), no bundled browser
                "playwright==1.65.3"],
    },
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},  # ninja (parallel compiles) where installed
    entry_points={"console_scripts": ["memtrace=memtrace.cli:main"]},
)
