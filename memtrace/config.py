"""The one place memtrace reads its environment (docs/ENV.md lists every variable).

The variables are read at first use, never at import: `settings()` parses them once and keeps the
result; `reload()` parses them again (after a change of os.environ); `override(...)` replaces
fields for the length of a `with` block (tests, benchmarks). The Triton kernels take their knobs
from `memtrace.kernels.settings`, which this module fills from the same parse, so the kernels
themselves never look at the environment.

    MEMTRACE_BACKEND                 biased_attention's backend under "auto" (auto, triton, cudnn, ...)
    MEMTRACE_UPDATE_BACKEND          TraceMemory's update backend (auto, triton, torch)
    MEMTRACE_CAPTURE_FUSED           the capture bound filled by the Triton backward (auto, 0, 1)
    MEMTRACE_CAPTURE_EMIT            streamed capture tiles: per-candidate atomics up to N candidates
    MEMTRACE_CAPTURE_SEGMENT_EMIT    the same for the fused fill's segment kernel
    MEMTRACE_CAPTURE_GRAPH           the capture's glue as a CUDA graph (1) or eager ops (0)
    MEMTRACE_BENCHMARKS_DIR          where `memtrace bench` finds the benchmark scripts
    MEMTRACE_ATTN_TUNE               autotune the attention kernels (1) or take the first config (0)
    MEMTRACE_ATTN_CONFIG_SLICE       "k/n": autotune every n-th config from the k-th (compile-ahead)
    MEMTRACE_ATTN_BWD_ENTRIES        backward entry form (auto, onehot, rows)
    MEMTRACE_ATTN_FWD_SPLIT          forward correction as a separate pass (auto, 0, 1)
    MEMTRACE_ATTN_BWD_SPLIT          backward correction as separate launches (auto, 0, 1)
    MEMTRACE_ATTN_BWD_OVERLAP        the split backward's key side beside the dQ kernel (auto, 0, 1)
    MEMTRACE_ATTN_TMA                TMA descriptors in the dense kernels (auto, 0, 1)
    MEMTRACE_ATTN_WS                 the warp-specialized dense forward (auto, 0)
    MEMTRACE_BIAS_INDEX              CUDA bias index builder (fast, sort)
    MEMTRACE_ROUTER_CONFIG           StatefulRouter's route kernel: BLOCK_M,BLOCK_D,warps,stages
"""
from __future__ import annotations

import dataclasses
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

from .kernels import settings as _kernel_settings

__all__ = ["Settings", "override", "reload", "settings"]

ATTENTION_BACKENDS = ("auto", "triton", "cudnn", "flash", "flash_attn", "reference")
UPDATE_BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class Settings:
    """What the environment asks of memtrace (defaults: nothing set)."""

    backend: str = "auto"
    update_backend: str | None = None          # None: each TraceMemory's own `backend`
    capture_fused: str = "auto"
    capture_emit: int = 512
    capture_segment_emit: int = 512
    capture_graph: bool = True
    benchmarks_dir: str | None = None
    kernels: _kernel_settings.KernelSettings = field(default_factory=_kernel_settings.KernelSettings)


_LOCK = threading.Lock()
_CURRENT: list = []          # [Settings] once parsed


def _choice(env, name, allowed, default):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    value = raw.lower() if raw.lower() in allowed else raw
    if value not in allowed:
        raise ValueError(f"environment variable {name} must be one of {', '.join(allowed)}; got {raw!r}")
    return value


def _int(env, name, default, low=0):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None
    if value < low:
        raise ValueError(f"environment variable {name} must be >= {low}, got {value}")
    return value


def _config_slice(env):
    raw = env.get("MEMTRACE_ATTN_CONFIG_SLICE", "").strip()
    if not raw:
        return None
    try:
        k, n = (int(x) for x in raw.split("/"))
    except ValueError:
        k, n = -1, 0
    if not 0 <= k < n:
        raise ValueError(f"environment variable MEMTRACE_ATTN_CONFIG_SLICE must be 'k/n' with 0 <= k < n, "
                         f"got {raw!r}")
    return (k, n)


def _int_tuple(env, name):
    raw = env.get(name, "").strip()
    if not raw:
        return ()
    try:
        return tuple(int(x) for x in raw.split(","))
    except ValueError:
        raise ValueError(f"environment variable {name} must be comma-separated integers, got {raw!r}") from None


def parse(env=None) -> Settings:
    """Settings from a mapping of environment variables (default: os.environ); ValueError naming
    the variable on a bad value."""
    env = os.environ if env is None else env
    update = _choice(env, "MEMTRACE_UPDATE_BACKEND", UPDATE_BACKENDS, None)
    kernels = _kernel_settings.KernelSettings(
        attn_tune=env.get("MEMTRACE_ATTN_TUNE", "1").strip() != "0",
        attn_config_slice=_config_slice(env),
        attn_ws=_choice(env, "MEMTRACE_ATTN_WS", ("auto", "0"), "auto"),
        attn_tma=_choice(env, "MEMTRACE_ATTN_TMA", ("auto", "0", "1"), "auto"),
        attn_bwd_entries=_choice(env, "MEMTRACE_ATTN_BWD_ENTRIES", ("auto", "onehot", "rows"), "auto"),
        attn_bwd_split=_choice(env, "MEMTRACE_ATTN_BWD_SPLIT", ("auto", "0", "1"), "auto"),
        attn_fwd_split=_choice(env, "MEMTRACE_ATTN_FWD_SPLIT", ("auto", "0", "1"), "auto"),
        attn_bwd_overlap=_choice(env, "MEMTRACE_ATTN_BWD_OVERLAP", ("auto", "0", "1"), "auto"),
        attn_bwd_chunk=_int(env, "MEMTRACE_ATTN_BWD_CHUNK", 32, low=1),
        capture_segment_config=_int_tuple(env, "MEMTRACE_CAPTURE_SEGMENT_CONFIG"),
        router_config=_int_tuple(env, "MEMTRACE_ROUTER_CONFIG"),
        bias_index_method=_choice(env, "MEMTRACE_BIAS_INDEX", ("fast", "sort"), "fast"),
    )
    return Settings(
        backend=_choice(env, "MEMTRACE_BACKEND", ATTENTION_BACKENDS, "auto"),
        update_backend=update,
        capture_fused=_choice(env, "MEMTRACE_CAPTURE_FUSED", ("auto", "0", "1"), "auto"),
        capture_emit=_int(env, "MEMTRACE_CAPTURE_EMIT", 512),
        capture_segment_emit=_int(env, "MEMTRACE_CAPTURE_SEGMENT_EMIT", 512),
        capture_graph=env.get("MEMTRACE_CAPTURE_GRAPH", "1").strip() != "0",
        benchmarks_dir=env.get("MEMTRACE_BENCHMARKS_DIR") or None,
        kernels=kernels,
    )


def _install(new: Settings) -> Settings:
    _kernel_settings.configure(new.kernels)
    _CURRENT[:] = [new]
    return new


def settings() -> Settings:
    """The current settings (the environment, parsed at the first call)."""
    if _CURRENT:
        return _CURRENT[0]
    with _LOCK:
        if not _CURRENT:
            _install(parse())
        return _CURRENT[0]


def reload() -> Settings:
    """Parse the environment again (after os.environ changed)."""
    with _LOCK:
        return _install(parse())


@contextmanager
def override(**changes):
    """Replace settings fields (and, through `kernels=` or kernel field names, kernel knobs) inside
    a `with` block; the previous settings come back on exit.

        with memtrace.config.override(backend="reference", attn_bwd_split="1"): ...
    """
    before = settings()
    kernel_fields = {f.name for f in dataclasses.fields(_kernel_settings.KernelSettings)}
    kernel_changes = {k: changes.pop(k) for k in list(changes) if k in kernel_fields}
    unknown = set(changes) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise TypeError(f"override() got unknown settings {sorted(unknown)}")
    if "backend" in changes and changes["backend"] not in ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {ATTENTION_BACKENDS}, got {changes['backend']!r}")
    if changes.get("update_backend") not in (None,) + UPDATE_BACKENDS:
        raise ValueError(f"update_backend must be None or one of {UPDATE_BACKENDS}, got {changes['update_backend']!r}")
    kernels = changes.pop("kernels", before.kernels)
    if kernel_changes:
        kernels = dataclasses.replace(kernels, **kernel_changes)
    with _LOCK:
        _install(dataclasses.replace(before, kernels=kernels, **changes))
    try:
        yield settings()
    finally:
        with _LOCK:
            _install(before)


def triton_interpreter() -> bool:
    """Whether Triton runs its CPU interpreter (TRITON_INTERPRET=1; Triton's variable, read per call
    since tests switch it)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
