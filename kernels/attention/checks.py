"""The launchers' input checks and conversions (shapes, head dims, unit stride along D, flags)."""
from __future__ import annotations

import torch

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


def last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def check_common(q, k, v, bias):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, H, T, D]")
    B, Hq, Tq, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {D} not supported by the Triton kernels (one of {SUPPORTED_HEAD_DIMS})")
    Hkv = k.shape[1]
    if Hq % Hkv != 0:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    if bias is not None and bias.num_heads != Hq:
        raise ValueError(f"bias has {bias.num_heads} heads, q has {Hq}")
    return B, Hq, Hkv, Tq, k.shape[2], D


def flags_2d(row_flags, B, Hq, Tq):
    """row_flags [B, Hq, Tq] (bool or integer) -> int8 [B*Hq, Tq] contiguous (no copy if it is one)."""
    if tuple(row_flags.shape) != (B, Hq, Tq):
        raise ValueError(f"row_flags must be [B, Hq, Tq] = {(B, Hq, Tq)}, got {tuple(row_flags.shape)}")
    return row_flags.to(torch.int8).contiguous().view(B * Hq, Tq)
