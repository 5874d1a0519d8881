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


def key_mask_2d(key_padding_mask, B, Tk, device):
    """The key padding mask (bool or integer [B, Tk], nonzero = attend) as the kernels read it: an
    int8 [B, Tk] contiguous tensor (a free view of a contiguous bool mask), or None."""
    if key_padding_mask is None:
        return None
    m = key_padding_mask
    if tuple(m.shape) != (B, Tk):
        raise ValueError(f"key_padding_mask must be [B, Tk] = {(B, Tk)}, got {tuple(m.shape)}")
    if m.device != device:
        raise ValueError(f"key_padding_mask is on {m.device}, q on {device}")
    m = m.contiguous()
    if m.dtype in (torch.bool, torch.uint8):
        return m.view(torch.int8)
    return m if m.dtype == torch.int8 else m.ne(0).view(torch.int8)
