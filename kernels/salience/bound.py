"""The salience capture's segment bound, which flash_bwd's dQ kernel fills (its format).

Word [h, n, i] of the bound covers the keys [n * CAPTURE_SEG, (n + 1) * CAPTURE_SEG) of query row
i of head h; see kernels/attention/bwd.py (flash_bwd's capture_bound) for what its fields hold.
"""
from __future__ import annotations

import torch

from .._common import INTERPRET

# The salience capture's segment width: keys per word of flash_bwd's capture bound, which is the
# dq kernel's key block while capturing (configs with another BLOCK_N are pruned then).
CAPTURE_SEG = 16 if INTERPRET else 64
# Each bound word packs 32 / bits integer fields (one per CAPTURE_SEG * bits / 32 keys); a field's
# largest value, and the fewest levels per threshold that keep the bound tight (below 8 the
# ceilings loosen it a lot: docs/perf-log.md, session 9).
CAPTURE_FIELD_MAX = {8: 255, 16: 65535, 32: 2**31 - 1}
CAPTURE_MIN_LEVELS = 8


def capture_bound_format(batch: int) -> tuple[int, int]:
    """(bits, levels) of the capture bound's fields for a batch of `batch`: the narrowest field
    (8, 16 or 32 bits: 4, 2 or 1 fields per word, so narrower fields bound shorter key ranges)
    whose levels K = field_max // batch^2 are at least CAPTURE_MIN_LEVELS. Each batch element adds
    at most K * batch to a field, so a field never carries into the next."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    for bits in (8, 16, 32):
        levels = CAPTURE_FIELD_MAX[bits] // (batch * batch)
        if levels >= CAPTURE_MIN_LEVELS:
            return bits, min(levels, 2**20)
    raise ValueError(f"batch {batch} is too large for the capture bound's fields")


def capture_bound_fields(words, batch: int):
    """The fields of flash_bwd's capture bound words, int64 [..., 32 / bits] (for tests and
    benchmarks; the kernels decode them in place)."""
    bits, _ = capture_bound_format(batch)
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, bits, device=words.device)
    return (w[..., None] >> shifts) & ((1 << bits) - 1)


def capture_bound_passing(words, batch: int):
    """bool: the bound words with a field at the limit (the rows the capture rescores)."""
    _, levels = capture_bound_format(batch)
    return (capture_bound_fields(words, batch) >= levels * batch).any(-1)


class CaptureBound:
    """flash_bwd's salience-capture bound (memtrace.capture builds it): `words`, a zeroed int32
    [Hq, cdiv(Tk, CAPTURE_SEG), Tq] tensor, the `threshold` it is filled against, and `after_dq`,
    None or a callable that flash_bwd runs with the filled words between the dQ kernel and the
    dK/dV kernels, after dropping its own references (`words` becomes None): the capture rescores
    its segments there, so the bound's memory is free again before dK and dV are allocated and
    the capture adds nothing to the backward's peak. `scored` is for the callable to set."""

    def __init__(self, words, threshold, after_dq=None):
        self.words, self.threshold, self.after_dq = words, threshold, after_dq
        self.scored = False


def capture_all_pass_word(batch: int) -> int:
    """The bound word whose every field passes (the int32 value, for the rows the bound cannot
    see): each field at the limit levels * batch."""
    bits, levels = capture_bound_format(batch)
    word = 0
    for f in range(32 // bits):
        word |= (levels * batch) << (f * bits)
    return word - 2**32 if word >= 2**31 else word
