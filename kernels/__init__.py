"""memtrace.kernels: the Triton kernels only (no autograd: memtrace/ wraps them; no MEMTRACE_* reads: settings.py)."""
