"""Fixtures every test module may use (helpers to import live in tests/_helpers.py)."""
import contextlib

import pytest

from memtrace import config


@pytest.fixture
def memtrace_settings():
    """`memtrace_settings(capture_emit=0, attn_bwd_split="1", ...)`: memtrace.config.override for
    the rest of the test (several calls stack); the previous settings come back after it."""
    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(config.override(**changes))


class _Env:
    """Environment variables for one test, parsed by memtrace.config as they are set."""

    def __init__(self, monkeypatch):
        self._mp = monkeypatch

    def set(self, name, value):
        self._mp.setenv(name, value)
        config.reload()

    def unset(self, name):
        self._mp.delenv(name, raising=False)
        config.reload()


@pytest.fixture
def memtrace_env(monkeypatch):
    """`memtrace_env.set("MEMTRACE_CAPTURE_FUSED", "1")`: set a variable and re-read the
    environment (memtrace reads it once, at first use); everything is restored after the test."""
    yield _Env(monkeypatch)
    monkeypatch.undo()
    config.reload()
