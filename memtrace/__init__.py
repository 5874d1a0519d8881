"""memtrace: persistent attention traces and routing-path crystallization as GPU kernels.

The SPEC 1 names. Submodules load on first use, so `import memtrace` stays cheap (Triton and the
C++ extension are imported only by the objects that need them).
"""
from importlib import import_module

import torch  # noqa: F401  (loads libtorch before the extension memtrace._C can be imported)

__version__ = "0.1.0"

_EXPORTS = {
    "biased_attention": "memtrace.attention",
    "TraceBias": "memtrace.bias",
    "SalienceCapture": "memtrace.capture",
    "TraceMemory": "memtrace.memory",
    "RoutingTree": "memtrace.routing",
    "Motif": "memtrace.crystallize",
    "MotifRegistry": "memtrace.crystallize",
    "CompositeExpert": "memtrace.crystallize",
    "Memtrace": "memtrace.training.manager",
    "MemtraceConfig": "memtrace.training.config",
}
_SUBMODULES = ("attention", "backends", "bias", "capture", "config", "crystallize", "experiment", "integrations",
               "kernels", "memory", "nn", "reference", "routing", "stores", "viz")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = import_module(f"memtrace.{name}")
    else:
        raise AttributeError(f"module 'memtrace' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__
