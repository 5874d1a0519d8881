"""The knobs the kernels obey, as data.

Nothing in kernels/ reads the environment for these: memtrace/config.py parses MEMTRACE_* once
and calls `configure(...)`; the launchers read `current().<field>` at call time (never at import),
so a `configure` or an `override` block takes effect on the next launch. The autotune config
lists stay whole in the decorators; the knobs that narrow them (attn_tune, attn_config_slice,
attn_tma) act in the early-prune functions, per call.

Fields (defaults = no environment variable set):
    attn_tune           autotune over every config that fits; False: the first that fits (tests,
                        quick runs)
    attn_config_slice   (k, n): autotune only every n-th config that fits, from the k-th. For
                        compiling ahead: n processes side by side each compile and time their slice
                        and fill Triton's cache, so the real run's autotune compiles nothing
    attn_ws             the warp-specialized dense forward on sm_90: "auto" or "0" (never)
    attn_tma            TMA descriptors for the dense loops' tiles: "auto" (the autotuner picks
                        TMA or pointer loads), "0" (pointer loads everywhere), "1" (TMA wherever the
                        tensors allow it)
    attn_bwd_entries    the backward's entry epilogues: "auto" (by density), "onehot" or "rows"
    attn_bwd_split      the backward's split form (dense backward + correct_bwd): "auto" (by
                        density), "0" (always fused), "1" (always split, where allowed)
    attn_fwd_split      the forward alike (unbiased pass + correct_fwd)
    attn_bwd_overlap    the split backward's key-side correction beside the dense dQ kernel:
                        "auto" (on for CUDA tensors), "0" (one stream, same order), "1"
    attn_bwd_chunk      entries per chunk of the backward's entry epilogues (16 measured no better
                        than 32)
    capture_segment_config  the salience segment kernel's (ROWS_BLOCK, num_warps, num_stages[,
                        maxnreg]) on the GPU; () keeps salience.segments.SEGMENT_CONFIG (for probes)
    router_config       the router's route kernel (BLOCK_M, BLOCK_D, num_warps, num_stages) on the
                        GPU; () keeps router.ROUTE_CONFIG (for probes)
    bias_index_method   build_index's default path: "fast" (the chunk-sort path where it applies)
                        or "sort" (the path measured on the H100)
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["KernelSettings", "configure", "current", "override"]


@dataclass(frozen=True)
class KernelSettings:
    attn_tune: bool = True
    attn_config_slice: tuple[int, int] | None = None
    attn_ws: str = "auto"
    attn_tma: str = "auto"
    attn_bwd_entries: str = "auto"
    attn_bwd_split: str = "auto"
    attn_fwd_split: str = "auto"
    attn_bwd_overlap: str = "auto"
    attn_bwd_chunk: int = 32
    capture_segment_config: tuple[int, ...] = ()
    router_config: tuple[int, ...] = ()
    bias_index_method: str = "fast"


_CHOICES = {
    "attn_ws": ("auto", "0"),
    "attn_tma": ("auto", "0", "1"),
    "attn_bwd_entries": ("auto", "onehot", "rows"),
    "attn_bwd_split": ("auto", "0", "1"),
    "attn_fwd_split": ("auto", "0", "1"),
    "attn_bwd_overlap": ("auto", "0", "1"),
    "bias_index_method": ("fast", "sort"),
}


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def validate(s: KernelSettings) -> None:
    """ValueError naming the first bad field and its allowed values."""
    if not isinstance(s, KernelSettings):
        raise TypeError(f"expected a KernelSettings, got {type(s).__name__}")
    if type(s.attn_tune) is not bool:
        raise ValueError(f"attn_tune must be True or False, got {s.attn_tune!r}")
    for name, allowed in _CHOICES.items():
        value = getattr(s, name)
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    sl = s.attn_config_slice
    if sl is not None and not (isinstance(sl, tuple) and len(sl) == 2 and all(_is_int(x) for x in sl)
                               and 0 <= sl[0] < sl[1]):
        raise ValueError(f"attn_config_slice must be None or (k, n) with 0 <= k < n, got {sl!r}")
    c = s.attn_bwd_chunk
    if not (_is_int(c) and c >= 1 and c & (c - 1) == 0):
        raise ValueError(f"attn_bwd_chunk must be a power of two >= 1, got {c!r}")
    seg = s.capture_segment_config
    if not (isinstance(seg, tuple) and all(_is_int(x) for x in seg)
            and (len(seg) == 0 or (len(seg) in (3, 4) and min(seg[:3]) >= 1 and min(seg[3:], default=0) >= 0))):
        raise ValueError("capture_segment_config must be () or (ROWS_BLOCK, num_warps, num_stages[, maxnreg]) "
                         f"with positive ints (maxnreg >= 0), got {seg!r}")
    rc = s.router_config
    if not (isinstance(rc, tuple) and all(_is_int(x) for x in rc)
            and (len(rc) == 0 or (len(rc) == 4 and min(rc) >= 1 and rc[0] >= 16 and rc[1] >= 16
                                  and all(x & (x - 1) == 0 for x in rc[:3])))):
        raise ValueError("router_config must be () or (BLOCK_M, BLOCK_D, num_warps, num_stages): BLOCK_M, BLOCK_D "
                         f"powers of two >= 16, num_warps a power of two, num_stages >= 1; got {rc!r}")


_CURRENT = [KernelSettings()]


def current() -> KernelSettings:
    """The settings in force (read by the launchers on every call)."""
    return _CURRENT[0]


def configure(settings: KernelSettings) -> None:
    """Install `settings` after validating every field (ValueError naming the field otherwise)."""
    validate(settings)
    _CURRENT[0] = settings


@contextmanager
def override(**changes):
    """Replace fields of the current settings inside a `with` block (validated); the previous
    settings come back on exit. For tests and probes."""
    before = current()
    configure(dataclasses.replace(before, **changes))
    try:
        yield current()
    finally:
        _CURRENT[0] = before
