"""What several kernel families share: the interpreter flag, log2(e), the dot precision, strides.

INTERPRET is the only read of TRITON_INTERPRET in kernels/: under the Triton interpreter the
launchers pick small tiles and single configs, and skip what it cannot run (TMA, register caps).
"""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """input_precision for tl.dot: fp32 inputs use IEEE unless the caller allowed TF32."""
    return "tf32" if (dtype == torch.float32 and allow_tf32) else "ieee"


def padded_strides(t, ndim):
    """t's strides padded with zeros to ndim entries (launch arguments of a fixed count)."""
    s = list(t.stride())
    return s + [0] * (ndim - len(s))
