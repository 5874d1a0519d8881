"""memtrace.nn: drop-in modules for hand-written models (SPEC 9)."""
from .attention import TraceAttention
from .cms import CMSMemory, CMSState
from .router import StatefulRouter

__all__ = ["TraceAttention", "CMSMemory", "CMSState", "StatefulRouter"]
