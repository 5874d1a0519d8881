"""TraceAttention: one layer's attention through a memtrace.Memtrace manager (SPEC 9)."""
from __future__ import annotations

from torch import nn

from .. import _validate as V

__all__ = ["TraceAttention"]


class TraceAttention(nn.Module):
    """`TraceAttention(mgr, layer)(q, k, v, *, causal=True, key_padding_mask=None, scale=None)`:
    `mgr.attention(layer, ...)` as a module ([B, H, T, D] in and out). The manager is not a
    submodule (it holds no parameters and is shared by every layer)."""

    def __init__(self, mgr, layer: int):
        super().__init__()
        from ..training.manager import Memtrace
        if not isinstance(mgr, Memtrace):
            raise TypeError(f"mgr must be a memtrace.Memtrace, got {type(mgr).__name__}")
        self.layer = V.check_int("layer", layer, low=0, high=mgr.num_layers - 1)
        object.__setattr__(self, "mgr", mgr)      # not registered as a child module

    def forward(self, q, k, v, *, causal=True, key_padding_mask=None, scale=None):
        return self.mgr.attention(self.layer, q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)

    def extra_repr(self) -> str:
        return f"layer={self.layer}"
