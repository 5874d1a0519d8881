"""The implementations of biased attention, one per file, and the registry that picks one.

    triton      our flash kernels with the sparse correction fused in (memtrace.kernels.attention)
    cudnn       PyTorch's cuDNN attention op + the standalone sparse correction
    flash       PyTorch's FlashAttention-2 op + the same correction
    flash_attn  the flash-attn package (optional) + the same correction
    reference   dense PyTorch math (allocates Tq x Tk; the fallback on CPU)
"""
from .base import Backend, Call, CorrectedDenseBackend
from .registry import (
    available_backends,
    backend_reasons,
    get_backend,
    register_backend,
    select_backend,
    unregister_backend,
)

__all__ = ["Backend", "Call", "CorrectedDenseBackend", "available_backends", "backend_reasons", "get_backend",
           "register_backend", "select_backend", "unregister_backend"]
