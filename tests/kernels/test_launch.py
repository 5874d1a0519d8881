"""kernels/launch.py: the argument-kind key must be at least as fine as Triton's specialisation
(two argument lists with one key must compile to one kernel), and under the interpreter
FastLaunch is a plain launch."""
import itertools
import random

import pytest
import torch
from _helpers import launch_probe, launch_probe_py
from memtrace.kernels.launch import FastLaunch, kind_key

INTERPRET = __import__("os").environ.get("TRITON_INTERPRET", "0") == "1"


def _binder():
    """Triton's own argument binder for a compiled (not interpreted) launch_probe, for sm_90."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit as rt_jit
    fn = rt_jit.JITFunction(launch_probe_py)
    backend = make_backend(GPUTarget("cuda", 90, 32))
    return rt_jit.create_function_from_signature(fn.signature, fn.params, backend)


def test_kind_key_is_at_least_as_fine_as_triton():
    binder = _binder()
    rng = random.Random(0)
    base = {dt: torch.zeros(64, dtype=dt) for dt in (torch.float32, torch.float16, torch.int32, torch.int64)}
    tensors = [t[o:] for t in base.values() for o in (0, 1, 2, 4, 8)]
    ints = [0, 1, 2, 15, 16, 17, 32, -1, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**40, -(2**31) - 1]
    seen = {}
    for _ in range(3000):
        args = (rng.choice(tensors), rng.choice(tensors), rng.choice(ints), rng.choice(ints),
                rng.choice([0.5, 1.0, 2.0]), rng.choice([True, False]), None)
        kwargs = {"BLOCK": rng.choice([16, 32]), "num_warps": rng.choice([2, 4])}
        key = kind_key(args, kwargs)
        assert key is not None
        _, spec, options = binder(*args, **kwargs)
        triton_key = (tuple(map(tuple, spec)), str(options))
        assert seen.setdefault(key, triton_key) == triton_key, (args, kwargs)
    assert len(seen) > 50      # the draws reached many kinds


def test_kind_key_declines_unknown_types():
    assert kind_key((object(),), {}) is None
    assert kind_key((1,), {"X": object()}) is None
    assert kind_key((True,), {}) != kind_key((1,), {})


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")
def test_fast_launch_under_the_interpreter_is_a_plain_launch():
    launch = FastLaunch(launch_probe)
    for n, m, f in itertools.product((5, 16), (0, 3), (0.5, 2.0)):
        x = torch.arange(16, dtype=torch.float32)
        y = torch.full((16,), -7.0)
        launch[(1,)](x, y, n, m, f, 7, None, BLOCK=16, num_warps=4)   # (the interpreter takes no bool)
        want = torch.where(torch.arange(16) < n, x * f + m, torch.tensor(-7.0))
        assert torch.equal(y, want)
