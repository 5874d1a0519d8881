"""Which backend runs a call: the registry, the "auto" order, the reasons a backend refuses a
call, and the memory of run-time failures.

"auto" takes MEMTRACE_BACKEND when it is set (memtrace.config), else the first backend of
`AUTO_PRIORITY` whose `not_supported_reasons(...)` is empty. An explicit backend that cannot take
the call raises a ValueError that lists its reasons and the backends that would take it. If a
backend fails at run time under "auto", the call falls back to the next one (one warning) and that
kind of call is not sent to it again in this process.
"""
from __future__ import annotations

import warnings

import torch

from .. import _validate as V
from .. import config
from .base import Backend, Call, min_bias_logit
from .cudnn import CudnnBackend
from .flash import FlashBackend
from .flash_attn import FlashAttnBackend
from .reference import ReferenceBackend
from .triton import TritonBackend

# Fastest first, measured on the H100 (B4 H16 T4096 D128 bf16, 2048 traces a head; BENCHMARKS.md):
# cuDNN + our correction, our fused Triton kernels, PyTorch's FlashAttention-2; then the flash-attn
# package (not measured: not installed there), the dense math.
AUTO_PRIORITY = ("cudnn", "triton", "flash", "flash_attn", "reference")

REGISTRY: dict[str, Backend] = {b.name: b for b in (TritonBackend(), CudnnBackend(), FlashBackend(),
                                                    FlashAttnBackend(), ReferenceBackend())}
BACKENDS = ("auto", *REGISTRY)
# kinds of call (see Call.kind) on which a backend failed at run time under "auto"
FAILED: dict = {}
_WARNED: set = set()
_RESOLVED: dict = {}


def get_backend(name: str) -> Backend:
    return REGISTRY[name]


def register_backend(backend: Backend, *, priority: int | None = None) -> None:
    """Add a backend (for experiments); `priority` inserts it into the auto order at that index."""
    global AUTO_PRIORITY, BACKENDS
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a memtrace.backends.Backend, got {type(backend).__name__}")
    REGISTRY[backend.name] = backend
    if backend.name not in BACKENDS:
        BACKENDS = (*BACKENDS, backend.name)
    if priority is not None and backend.name not in AUTO_PRIORITY:
        order = list(AUTO_PRIORITY)
        order.insert(priority, backend.name)
        AUTO_PRIORITY = tuple(order)
    _RESOLVED.clear()


def unregister_backend(name: str) -> None:
    """Remove a backend added with register_backend (the built-in ones stay)."""
    global AUTO_PRIORITY, BACKENDS
    if name in ("triton", "cudnn", "flash", "flash_attn", "reference"):
        raise ValueError(f"the built-in backend {name!r} cannot be unregistered")
    REGISTRY.pop(name, None)
    BACKENDS = tuple(n for n in BACKENDS if n != name)
    AUTO_PRIORITY = tuple(n for n in AUTO_PRIORITY if n != name)
    _RESOLVED.clear()


def reasons_for(name, call):
    reasons = list(REGISTRY[name].not_supported_reasons(call))
    failure = FAILED.get((name, call.kind()))
    if failure:
        reasons.append(f"failed earlier in this process on this kind of call ({failure})")
    return reasons


def backend_reasons(q, k, v, bias=None, *, causal=False, key_padding_mask=None) -> dict:
    """{backend name: [reasons it cannot take this call]} for every registered backend."""
    call = Call(q, k, v, bias, causal, key_padding_mask=key_padding_mask)
    return {name: reasons_for(name, call) for name in REGISTRY}


def available_backends(q, k, v, bias=None, *, causal=False, key_padding_mask=None) -> list:
    """The backends that can take this call, in auto order."""
    reasons = backend_reasons(q, k, v, bias, causal=causal, key_padding_mask=key_padding_mask)
    order = [n for n in AUTO_PRIORITY if n in reasons] + [n for n in reasons if n not in AUTO_PRIORITY]
    return [n for n in order if not reasons[n]]


def warn_once(key, message):
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def auto_choice(call, exclude=()):
    for name in AUTO_PRIORITY:
        if name in exclude or name not in REGISTRY:
            continue
        reasons = reasons_for(name, call)
        if not reasons:
            return name
        if any("signature" in r or "no usable aten" in r for r in reasons):
            warn_once(("schema", name), f"memtrace: backend {name!r} skipped: {reasons[0]}")
    return "reference"


def describe(call):
    return (f"{str(call.dtype).replace('torch.', '')} on {call.device}, B={call.batch}, Hq={call.q_heads}, "
            f"Hkv={call.kv_heads}, Tq={call.seq_len_q}, Tk={call.seq_len_k}, D={call.head_dim}, "
            f"causal={call.causal}, bias={'yes' if call.has_bias else 'no'}"
            + (", key_padding_mask" if call.has_key_padding_mask else "")
            + (", tensor alpha" if call.alpha_is_tensor else ""))


def forced_backend() -> str:
    """The backend MEMTRACE_BACKEND forces on "auto" calls, or "auto"."""
    return config.settings().backend


def select_backend(q, k, v, bias=None, *, causal=False, backend="auto", _min_bias_logit=None,
                   key_padding_mask=None, _alpha_is_tensor=False):
    """(name, auto) of the backend that runs this call; ValueError when an explicit or forced
    backend cannot take it."""
    V.check_choice("backend", backend, (*REGISTRY, "auto"))
    call = Call(q, k, v, bias, causal, _min_bias_logit, key_padding_mask, _alpha_is_tensor)
    source = "backend"
    if backend == "auto":
        forced = forced_backend()
        if forced == "auto":
            return auto_choice(call), True
        if forced not in REGISTRY:
            raise ValueError(f"environment variable MEMTRACE_BACKEND must name one of {tuple(REGISTRY)} or 'auto', "
                             f"got {forced!r}")
        backend, source = forced, "backend (forced by MEMTRACE_BACKEND)"
    reasons = reasons_for(backend, call)
    if reasons:
        takers = [n for n in AUTO_PRIORITY if n in REGISTRY and not reasons_for(n, call)]
        raise ValueError(
            f"{source}={backend!r} cannot run this call ({describe(call)}): " + "; ".join(reasons)
            + f". Backends that would take it: {', '.join(takers) if takers else 'none'}")
    return backend, False


def resolve(backend, q, k, v, bias, causal, alpha, key_padding_mask=None):
    """select_backend, memoised per kind of call (the answer depends only on metadata, the bias's
    lowest logit, the settings and the failures seen so far). A tensor alpha is never read: its
    calls are keyed as such (min_logit None) and treated as possibly cancelling."""
    min_logit = min_bias_logit(bias, alpha)
    alpha_is_tensor = isinstance(alpha, torch.Tensor)
    key = (backend, forced_backend(), config.triton_interpreter(), q.device, q.dtype, tuple(q.shape),
           tuple(k.shape), bool(causal), bias is not None and bias.nnz > 0, min_logit,
           all(t.stride(-1) == 1 for t in (q, k, v)), len(FAILED), torch.are_deterministic_algorithms_enabled(),
           key_padding_mask is not None, alpha_is_tensor)
    hit = _RESOLVED.get(key)
    if hit is None:
        hit = select_backend(q, k, v, bias, causal=causal, backend=backend, _min_bias_logit=min_logit,
                             key_padding_mask=key_padding_mask, _alpha_is_tensor=alpha_is_tensor)
        if len(_RESOLVED) > 1024:
            _RESOLVED.clear()
        _RESOLVED[key] = hit
    return hit


def fall_back(backend, auto, exc, q, k, v, bias, causal, alpha, key_padding_mask=None):
    """Under "auto", remember that `backend` failed on this kind of call and pick the next one;
    otherwise re-raise."""
    if not auto or backend == "reference":
        raise exc
    call = Call(q, k, v, bias, causal, min_bias_logit(bias, alpha), key_padding_mask,
                isinstance(alpha, torch.Tensor))
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    FAILED[(backend, call.kind())] = f"{type(exc).__name__}: {first_line[:200]}"
    nxt = auto_choice(call)
    warn_once(("runtime", backend, call.kind()),
              f"memtrace: backend {backend!r} failed on {describe(call)} ({first_line[:200]}); "
              f"falling back to {nxt!r} for this kind of call")
    return nxt


def reset() -> None:
    """Forget run-time failures, warnings and memoised choices (tests)."""
    FAILED.clear()
    _WARNED.clear()
    _RESOLVED.clear()
