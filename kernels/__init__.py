"""memtrace.kernels: the Triton kernels (no autograd here; memtrace/ wraps them)."""
