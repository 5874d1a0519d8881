"""memtrace.nn: drop-in modules for hand-written models (SPEC 9)."""
from .attention import TraceAttention

__all__ = ["TraceAttention"]
