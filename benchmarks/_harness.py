"""What the five benchmark suites share: the JSON header (device, versions, date), median timing,
peak memory, writing the JSON (written beside, then renamed) and printing ratios.

Each suite keeps its own measurements and its own JSON layout; this module only holds the code
they all repeated. Imported as `import _harness` (the suites' directory is on sys.path when a
suite runs as a script, and `memtrace bench` puts it there while it loads one).
"""
from __future__ import annotations

import datetime
import json
import os

import torch


def header(**extra) -> dict:
    """{"device", "torch", "triton", "cuda", "memtrace", "date", **extra} for a result file.
    device is "cpu" without CUDA; triton / memtrace are None where they do not import."""
    doc = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "triton": None, "cuda": torch.version.cuda, "memtrace": None,
           "date": datetime.datetime.now().isoformat(timespec="seconds")}
    try:
        import triton
        doc["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import memtrace
        doc["memtrace"] = memtrace.__version__
    except (ImportError, AttributeError):
        pass   # the header says None: a run from a tree without the package still records the rest
    doc.update(extra)
    return doc


def write_json(path, doc, indent=1) -> None:
    """Write `doc` to `path` whole or not at all: into a file beside it, then renamed over it (a run
    cut short by a time limit leaves the last complete file)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=indent)
    os.replace(tmp, path)


def median_ms(fn, *, warmup=25, rep=100, grad_to_none=None) -> float:
    """triton.testing.do_bench's median, in ms (L2 flushed before each call)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


class PeakMemory:
    """`with PeakMemory() as pm: ...` then pm.mib: the CUDA memory high-water mark inside the block,
    above what was allocated when it began (the caching allocator emptied first)."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        self.base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        self.mib = None
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return False


def print_ratios(ratios: dict, width=34, fmt="{:8.3f}", indent="  ") -> None:
    """One line per ratio: `indent`, the name padded to `width`, the value in `fmt`."""
    for name, value in ratios.items():
        print(f"{indent}{name:{width}s} {fmt.format(value)}")
