"""Repeat launches of a @triton.jit kernel without Triton's per-call dispatch.

`kernel[grid](...)` binds and specialises every argument, builds a cache key and looks the
compiled kernel up on every call: about 50 us of host time per launch on the H100 machine's host
for the trace update's 22-argument kernels (docs/perf-log.md), and an eager
update waits on that host time before its first kernel starts. `FastLaunch(kernel)[grid](...)`
sends the first launch of each argument kind through Triton (which compiles and caches) and keeps
the CompiledKernel; later launches of the same kind call its launcher directly, with every tensor
passed as its address (for a tensor the launcher calls data_ptr() and asks the driver about the
pointer, argument by argument: host time too).

The kind of an argument list is at least as fine as Triton's own specialisation (see
tests/kernels/test_launch.py, which checks it against Triton's binder): per tensor its dtype, whether
its address is 16-byte aligned and whether it is on CUDA (a CPU tensor takes Triton's path and
its error), per int whether it is 1, divisible by 16 and its integer width,
per bool / float / None its type, and every keyword (constexprs and launch options) by value.
Arguments of any other type (tensor descriptors, ...) always take Triton's path; so do launches
under the interpreter and those whose first argument is not a CUDA tensor. Not re-checked on the
fast path: module globals a kernel body reads (Triton's run raises when one changed since the
compile); kernels launched this way must take every such value as an argument.
"""
from __future__ import annotations

import torch
from triton import knobs

from ._common import INTERPRET

_INT32 = (-(2**31), 2**31)
_INT64 = (-(2**63), 2**63)
_TENSOR = torch.Tensor


def _scalar_kind(a):
    """_kinds' entry for an argument that is not an exact torch.Tensor (KeyError: a type this
    module does not classify)."""
    if isinstance(a, bool):
        return bool
    if isinstance(a, int):
        width = 32 if _INT32[0] <= a < _INT32[1] else 64 if _INT64[0] <= a < _INT64[1] else 65
        return (width, a == 1, a % 16 == 0)
    if isinstance(a, float):
        return float
    if a is None:
        return None
    if isinstance(a, torch.Tensor):     # a subclass: passed on as it is
        return (a.dtype, a.data_ptr() % 16 == 0, a.is_cuda)
    raise KeyError(type(a))


def _kinds(args, kwargs):
    """(key, values): the argument-kind key (None for a type this module does not classify) and
    the arguments with every exact tensor replaced by its address. The launcher takes an int
    address as it is; for a tensor it calls data_ptr() and asks the driver about the pointer
    (cuPointerGetAttribute), per argument and launch. A CPU tensor has its own kind, which goes
    through Triton's path and its error."""
    key, values = [], []
    for a in args:
        if type(a) is _TENSOR:
            ptr = a.data_ptr()
            key.append((a.dtype, ptr % 16 == 0, a.is_cuda))
            values.append(ptr)
        else:
            try:
                key.append(_scalar_kind(a))
            except KeyError:
                return None, None
            values.append(a)
    for name in sorted(kwargs):
        value = kwargs[name]
        if not isinstance(value, (bool, int, float, str, type(None))):
            return None, None
        key.append((name, type(value), value))
    return tuple(key), values


def kind_key(args, kwargs):
    """A hashable key of the arguments' specialisation, or None when an argument has a type
    this module does not classify."""
    return _kinds(args, kwargs)[0]


class FastLaunch:
    """Wraps a @triton.jit function: `FastLaunch(fn)[grid](*args, **kwargs)` launches like
    `fn[grid](*args, **kwargs)` (grid a tuple; positional arguments first, then keywords)."""

    def __init__(self, fn):
        self.fn = fn
        self._compiled = {}
        if not INTERPRET:   # (the interpreter's function objects carry no params)
            self._names = list(fn.arg_names)
            self._defaults = {p.name: p.default for p in fn.params}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(tuple(grid), args, kwargs)

    def _launch(self, grid, args, kwargs):
        first = args[0] if args else None
        if INTERPRET or not (isinstance(first, torch.Tensor) and first.is_cuda):
            return self.fn[grid](*args, **kwargs)
        device = torch._C._cuda_getDevice()    # where Triton launches, as in JITFunction.run
        key, values = _kinds(args, kwargs)
        entry = None if key is None else self._compiled.get((device, key))
        if entry is None:
            kernel = self.fn[grid](*args, **kwargs)
            if key is not None:   # the compiled kernel and the parameters past the positional ones
                tail = [kwargs[n] if n in kwargs else self._defaults[n] for n in self._names[len(args):]]
                self._compiled[(device, key)] = (kernel, tail)
            return kernel
        kernel, tail = entry
        params = values + tail
        grid = grid + (1,) * (3 - len(grid))
        stream = torch._C._cuda_getCurrentRawStream(device)
        enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        meta = kernel.launch_metadata(grid, stream, *args, *tail) if enter is not None else None
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, meta, enter, leave,
                   *params)
        return kernel
