"""Fixtures of the manager tests."""
import pytest


@pytest.fixture
def reference_attention(memtrace_settings):
    """Run the attention on the reference backend: for tests of the manager's own logic (calibration,
    accumulation, resume), which other tests already run through the Triton kernels; it keeps the
    interpreter-bound CI run short."""
    memtrace_settings(backend="reference")
