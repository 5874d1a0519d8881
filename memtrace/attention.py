"""Biased attention (SPEC 2): the public op, its custom-op registration and its one autograd
definition.

    logits = scale * q k^T + alpha * M        M = the TraceBias value at (h, i, j), 0 elsewhere
    out    = softmax(logits) v                (causal: key j masked when j > i + Tk - Tq)

How a call runs
---------------
`biased_attention` validates its input (memtrace/_validate.py), then applies `_BiasedAttention`,
the one autograd definition. Its forward and backward run a backend (memtrace/backends/: the
registry picks one, `run_forward` / `run_backward` below fall back under "auto") directly in
eager mode; under torch.compile / export (or on fake tensors) they call the custom ops
`memtrace::biased_attention_fwd` / `_bwd` instead, whose fake implementations let
`torch.compile(fullgraph=True)` trace a model that calls `biased_attention` without a graph
break. The ops carry the same autograd (`torch.library.register_autograd` with the same
setup_context and backward), so calling `torch.ops.memtrace.biased_attention_fwd` directly
differentiates too.

The TraceBias crosses the op boundary as its index tensors plus `entry_values =
bias.entry_values()` (computed outside, so the gradient the backward returns for `entry_values`
reaches `bias.value` through the `index_add` that merges duplicates).

Capture: with `capture=` (a BackwardObserver, e.g. memtrace.SalienceCapture; eager only: under
torch.compile a capturing call is refused) the backward, after computing the gradients, calls
`capture.fill(...)` with the biased `out` and `lse` of the forward. A FusedBoundObserver also gets
a bound for the Triton backward to fill on the way (`fused_bound`), whose segments it rescores
between the dQ and dK/dV kernels (`score_segments`), so that the fill rescores only the key blocks
that can hold edges over the threshold; "auto" therefore runs such capturing calls on the Triton
backend (`_prefers_triton`).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from . import _validate as V
from .backends import registry
from .backends.base import Call, like, lse_to_bht
from .bias import TraceBias

# (BACKENDS and AUTO_PRIORITY are read from the registry on access: see __getattr__)
__all__ = [
    "BackwardObserver",
    "FusedBoundObserver",
    "available_backends",
    "backend_reasons",
    "biased_attention",
    "get_backend",
    "select_backend",
]

available_backends = registry.available_backends
backend_reasons = registry.backend_reasons
get_backend = registry.get_backend
select_backend = registry.select_backend


def __getattr__(name):
    # the registry rebinds these when a backend is registered: read them there
    if name in ("BACKENDS", "AUTO_PRIORITY"):
        return getattr(registry, name)
    raise AttributeError(f"module 'memtrace.attention' has no attribute {name!r}")


# ================================================================================================
# What the backward tells a capture
# ================================================================================================

@runtime_checkable
class BackwardObserver(Protocol):
    """Anything biased_attention's backward can report to (memtrace.SalienceCapture is one)."""

    def fill(self, q, k, v, out, lse, dout, bias, entry_values, *, causal, scale, alpha, bound=None) -> None:
        """Called once per backward with the biased forward's `out` and natural-log `lse`; alpha may
        be a 0-d tensor. A masked call also passes key_padding_mask=<bool [B, Tk]> (only then)."""


@runtime_checkable
class FusedBoundObserver(BackwardObserver, Protocol):
    """An observer that also takes a bound filled by the Triton backward (see memtrace.capture)."""

    def fused_bound_applies(self, q, k) -> bool:
        """Whether `fused_bound(q, k)` would return a bound (decides "auto"'s backend)."""

    def fused_bound(self, q, k):
        """A kernels CaptureBound for this call, or None."""

    def score_segments(self, q, k, v, lse, dout, bias, words, *, causal, scale, bound) -> None:
        """Run between the dQ and dK/dV kernels, with the filled bound words (a masked call also
        passes key_padding_mask=)."""


# ================================================================================================
# Running a backend (with the run-time fallback of "auto") and fixing output layouts
# ================================================================================================

def _match_layout(ref, value):
    if value.stride() == torch.empty_like(ref, device="meta").stride():
        return value
    return like(ref, value)


def _mask_kw(key_padding_mask):
    """The backends' key_padding_mask keyword, only for masked calls (a backend registered without
    the keyword still serves unmasked ones)."""
    return {} if key_padding_mask is None else {"key_padding_mask": key_padding_mask}


def run_forward(backend, auto, q, k, v, bias, entry_values, causal, scale, alpha, key_padding_mask=None):
    """(out laid out like q, lse float32 [B, Hq, Tq]) from `backend` (or the next one under auto).
    alpha: a float or a 0-d tensor; key_padding_mask: None or bool [B, Tk]."""
    if bias is not None and bias.nnz == 0:
        bias, entry_values = None, None
    while True:
        try:
            out, lse = registry.REGISTRY[backend].forward(q, k, v, bias, entry_values, causal=causal, scale=scale,
                                                          alpha=alpha, **_mask_kw(key_padding_mask))
            break
        except (RuntimeError, NotImplementedError) as exc:
            backend = registry.fall_back(backend, auto, exc, q, k, v, bias, causal, alpha, key_padding_mask)
    out = _match_layout(q, out if out.dtype == q.dtype else out.to(q.dtype))
    B, H, Tq = q.shape[:3]
    if lse.shape != (B, H, Tq) or lse.dtype != torch.float32 or not lse.is_contiguous():
        lse = lse_to_bht(lse, (B, H, Tq))
    return out, lse


def run_backward(backend, auto, q, k, v, out, lse, dout, bias, entry_values, causal, scale, alpha,
                 need_dvalues, capture_bound=None, key_padding_mask=None):
    """(dq, dk, dv, dvalues, the backend that ran). capture_bound reaches the Triton backend only
    (the caller's capture may use it only when that backend ran)."""
    full_entries = entry_values
    if bias is not None and bias.nnz == 0:
        bias, entry_values = None, None
    while True:
        extra = {"capture_bound": capture_bound} if backend == "triton" and capture_bound is not None else {}
        try:
            dq, dk, dv, dvalues = registry.REGISTRY[backend].backward(
                q, k, v, out, lse, dout, bias, entry_values, causal=causal, scale=scale, alpha=alpha,
                need_dvalues=need_dvalues and entry_values is not None, **extra, **_mask_kw(key_padding_mask))
            break
        except (RuntimeError, NotImplementedError) as exc:
            backend = registry.fall_back(backend, auto, exc, q, k, v, bias, causal, alpha, key_padding_mask)
    if need_dvalues and full_entries is not None and dvalues is None:
        dvalues = torch.zeros_like(full_entries)
    return _match_layout(q, dq), _match_layout(k, dk), _match_layout(v, dv), dvalues, backend


def _prefers_triton(q, k, v, bias, causal, capture, key_padding_mask=None) -> bool:
    """Whether "auto" should run a capturing call on the Triton backend: its backward bounds the
    salience on the way, so the capture rescores a few segments instead of recomputing every
    tile (B2 H16 T4096 D128 on the H100: ~0.4 ms instead of ~2.8 ms; docs/perf-log.md), which
    outweighs the faster dense kernels of the other backends. Not when MEMTRACE_BACKEND forces
    one or the fused fill does not apply."""
    if not isinstance(capture, FusedBoundObserver) or registry.forced_backend() != "auto":
        return False
    if registry.reasons_for("triton", Call(q, k, v, bias, causal, None, key_padding_mask)):
        return False
    return capture.fused_bound_applies(q, k)


def _choose(backend, q, k, v, bias, causal, alpha, capture, key_padding_mask=None):
    """(backend name, auto) for this call; forward and backward ask alike (memoised)."""
    name, auto = registry.resolve(backend, q, k, v, bias, causal, alpha, key_padding_mask)
    if capture is not None and auto and name != "triton" and _prefers_triton(q, k, v, bias, causal, capture,
                                                                              key_padding_mask):
        name = "triton"
    return name, auto


# ================================================================================================
# The forward and backward, and the custom ops that wrap them for torch.compile
# ================================================================================================

def _bias_tensors(bias):
    """The TraceBias as a list of tensors for the op boundary (its user COO and its index)."""
    if bias is None:
        return []
    return [bias.head, bias.q_idx, bias.k_idx, bias.value, bias.entry_pos, bias.src_entry, bias.k_order,
            bias.q_offsets, bias.k_offsets]


def _bias_from_tensors(tensors, shape):
    if not tensors:
        return None
    head, q_idx, k_idx, value, *index = tensors
    index_rows = shape[3] if len(shape) > 3 else shape[1]     # [H, Tq, Tk] or [H, Tq, Tk, index rows]
    return TraceBias(head, q_idx, k_idx, value, num_heads=shape[0], seq_len_q=shape[1], seq_len_k=shape[2],
                     _index=tuple(index), _index_rows=index_rows)


def _forward(q, k, v, bias_tensors, entry_values, bias_shape, causal, scale, alpha, backend, key_padding_mask=None,
             alpha_tensor=None, capture=None, bias=None):
    """(out, lse) of biased attention. `backend` is what the user asked for ("auto" or a name),
    resolved here; `bias` is the TraceBias that `bias_tensors` describe (rebuilt when not given).
    alpha_tensor: a 0-d tensor alpha (then the float `alpha` is unused)."""
    if bias is None:
        bias = _bias_from_tensors(bias_tensors, bias_shape)
    alpha = alpha if alpha_tensor is None else alpha_tensor
    name, auto = _choose(backend, q, k, v, bias, causal, alpha, capture, key_padding_mask)
    return run_forward(name, auto, q, k, v, bias, entry_values, causal, scale, alpha, key_padding_mask)


def _backward(q, k, v, out, lse, dout, bias, entry_values, causal, scale, alpha, backend, need_dvalues,
              capture=None, key_padding_mask=None):
    """(dq, dk, dv, dvalues or None, the backend that ran); fills `capture` on the way. alpha: a
    float or a 0-d tensor."""
    name, auto = _choose(backend, q, k, v, bias, causal, alpha, capture, key_padding_mask)
    mask_kw = {} if key_padding_mask is None else {"key_padding_mask": key_padding_mask}
    dout = dout.contiguous() if dout.stride(-1) != 1 else dout
    bound = None
    if name == "triton" and isinstance(capture, FusedBoundObserver):
        bound = capture.fused_bound(q, k)
        if bound is not None:
            # rescored between the dQ and dK/dV kernels, so that the bound is gone before dK/dV exist
            bound.after_dq = functools.partial(capture.score_segments, q, k, v, lse, dout, bias, causal=causal,
                                               scale=scale, bound=bound, **mask_kw)
    dq, dk, dv, dvalues, ran = run_backward(name, auto, q, k, v, out, lse, dout, bias, entry_values, causal, scale,
                                            alpha, need_dvalues, capture_bound=bound, key_padding_mask=key_padding_mask)
    if capture is not None:
        if bound is not None:
            bound.after_dq = None       # the partial refers to the bound: no reference cycle left
        capture.fill(q, k, v, out, lse, dout, bias, entry_values, causal=causal, scale=scale, alpha=alpha,
                     bound=bound if ran == "triton" else None, **mask_kw)
    return dq, dk, dv, dvalues, ran


@torch.library.custom_op("memtrace::biased_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_tensors: Sequence[torch.Tensor],
            entry_values: torch.Tensor | None, bias_shape: Sequence[int], causal: bool, scale: float,
            alpha: float, backend: str, key_padding_mask: torch.Tensor | None = None,
            alpha_tensor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Tq, D] laid out like q, lse [B, Hq, Tq] float32) of biased attention.
    key_padding_mask: bool [B, Tk] or None; alpha_tensor: a 0-d alpha that replaces `alpha`."""
    return _forward(q, k, v, bias_tensors, entry_values, bias_shape, causal, scale, alpha, backend, key_padding_mask,
                    alpha_tensor)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, bias_tensors, entry_values, bias_shape, causal, scale, alpha, backend, key_padding_mask=None,
              alpha_tensor=None):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("memtrace::biased_attention_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, bias_tensors: Sequence[torch.Tensor], entry_values: torch.Tensor | None,
            bias_shape: Sequence[int], causal: bool, scale: float, alpha: float, backend: str,
            need_dvalues: bool, key_padding_mask: torch.Tensor | None = None,
            alpha_tensor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv laid out like q, k, v; d entry_values [E] float32, or [0] when not needed)."""
    bias = _bias_from_tensors(bias_tensors, bias_shape)
    dq, dk, dv, dvalues, _ = _backward(q, k, v, out, lse, dout, bias, entry_values, causal, scale,
                                       alpha if alpha_tensor is None else alpha_tensor, backend, need_dvalues,
                                       key_padding_mask=key_padding_mask)
    if dvalues is None:
        dvalues = q.new_zeros(0, dtype=torch.float32)
    return dq, dk, dv, dvalues.float().contiguous()


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, out, lse, bias_tensors, entry_values, bias_shape, causal, scale, alpha, backend,
              need_dvalues, key_padding_mask=None, alpha_tensor=None):
    if need_dvalues and entry_values is not None:
        dvalues = entry_values.new_empty(entry_values.shape, dtype=torch.float32)
    else:
        dvalues = q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dvalues


# ================================================================================================
# The one autograd definition (the eager autograd.Function and the custom op share it)
# ================================================================================================

# The op's inputs: q, k, v, bias_tensors, entry_values, bias_shape, causal, scale, alpha, backend,
# key_padding_mask, alpha_tensor; the eager autograd.Function adds capture, bias.
_OP_INPUTS = 12


def _setup_context(ctx, inputs, output):
    q, k, v, bias_tensors, entry_values, bias_shape, causal, scale, alpha, backend = inputs[:10]
    is_function = len(inputs) > _OP_INPUTS
    key_padding_mask, alpha_tensor = (tuple(inputs[10:_OP_INPUTS]) + (None, None))[:2]
    capture, bias = (tuple(inputs[_OP_INPUTS:_OP_INPUTS + 2]) + (None, None))[:2]
    out, lse = output
    ctx.n_inputs = len(inputs)
    ctx.is_function = is_function
    ctx.n_bias = len(bias_tensors)
    ctx.has_values = entry_values is not None
    ctx.has_mask = key_padding_mask is not None
    ctx.has_alpha_tensor = alpha_tensor is not None
    saved = [q, k, v, out, lse, *bias_tensors]
    for t in (entry_values, key_padding_mask, alpha_tensor):
        if t is not None:
            saved.append(t)
    ctx.save_for_backward(*saved)
    ctx.args = (list(bias_shape), causal, scale, alpha, backend)
    ctx.capture, ctx.bias = capture, bias
    # lse is returned (return_lse=True) as a constant, as FlashAttention returns it: no gradient
    # flows back through it, so none can be silently dropped
    ctx.mark_non_differentiable(lse)


def _autograd_backward(ctx, dout, _dlse):
    saved = ctx.saved_tensors
    q, k, v, out, lse = saved[:5]
    bias_tensors = list(saved[5:5 + ctx.n_bias])
    rest = iter(saved[5 + ctx.n_bias:])
    entry_values = next(rest) if ctx.has_values else None
    key_padding_mask = next(rest) if ctx.has_mask else None
    alpha_tensor = next(rest) if ctx.has_alpha_tensor else None
    bias_shape, causal, scale, alpha, backend = ctx.args
    need_dvalues = bool(ctx.has_values and ctx.needs_input_grad[4])
    if not ctx.is_function:
        # from the custom op (torch.compile, export, or a direct torch.ops call): stay an op
        dq, dk, dv, dvalues = _bwd_op(dout, q, k, v, out, lse, bias_tensors, entry_values, bias_shape, causal,
                                      scale, alpha, backend, need_dvalues, key_padding_mask, alpha_tensor)
    else:
        bias = ctx.bias if ctx.bias is not None else _bias_from_tensors(bias_tensors, bias_shape)
        dq, dk, dv, dvalues, ran = _backward(q, k, v, out, lse, dout, bias, entry_values, causal, scale,
                                             alpha if alpha_tensor is None else alpha_tensor, backend, need_dvalues,
                                             ctx.capture, key_padding_mask)
        if ran != "reference" and torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (dout, q, k, v, entry_values)):
            dq, dk, dv, dvalues = _refuse_double_backward(ran, (dq, dk, dv, dvalues if need_dvalues else None))
    # as many as the inputs autograd saw: the op's trailing arguments left at their defaults are
    # not among them (needs_input_grad has the inputs' structure on both paths)
    nones = [None] * (len(ctx.needs_input_grad) - 5)
    # the op wants a gradient per tensor of its bias list; the autograd.Function None for the list
    bias_grads = None if ctx.is_function else [None] * ctx.n_bias
    return (dq, dk, dv, bias_grads, dvalues if need_dvalues else None, *nones)


torch.library.register_autograd("memtrace::biased_attention_fwd", _autograd_backward,
                                setup_context=_setup_context)


class _BiasedAttention(torch.autograd.Function):
    """The eager entry: the op's forward without its dispatch (~25 us a call), plus a capture and
    the caller's TraceBias object; setup_context and backward are the op's."""

    @staticmethod
    def forward(*inputs):
        return _forward(*inputs)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_autograd_backward)


def _refuse_double_backward(backend, grads):
    """Under create_graph, the gradients of a kernel backend (no graph of their own) made to raise
    when differentiated (as torch.autograd.function.once_differentiable does), instead of acting
    as constants and silently dropping the second-order terms. The reference backend's backward
    is plain torch math and differentiates exactly."""
    present = [g for g in grads if g is not None]
    err = torch._C._functions.DelayedError(
        f"memtrace.biased_attention: double backward (create_graph=True, then differentiating the "
        f"gradients) is only supported by backend='reference', not {backend!r}".encode(), len(present))
    wrapped = iter(err(*[g.detach().requires_grad_(True) for g in present]))
    return tuple(None if g is None else next(wrapped) for g in grads)


# ================================================================================================
# The public function
# ================================================================================================

def biased_attention(q, k, v, bias=None, *, causal=False, scale=None, alpha=1.0, capture=None, backend="auto",
                     key_padding_mask=None, return_lse=False):
    """Attention with a sparse additive bias: softmax(scale * q k^T + alpha * M) v (SPEC 2).

    q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D] with Hq % Hkv == 0; float16 / bfloat16 / float32
    (float64 on the reference backend); D in 16, 32, 64, 128 (256 where a backend takes it).
    bias: a TraceBias built for Hq heads and at least (Tq, Tk); entries beyond the call's lengths
    are ignored, duplicates add; gradients reach `bias.value` when it requires grad.
    causal: bottom-right aligned (key j masked when j > i + Tk - Tq).
    scale: defaults to 1/sqrt(D).
    alpha: multiplies the bias; a Python float, or a 0-d floating tensor on q's device (e.g.
    beta / max(M) computed on the device), which is never read on the host (no sync). A tensor
    alpha is a constant: it gets no gradient (one that requires grad is refused), the overflow
    check of |alpha * bias| is not made for it, and since whether alpha * bias can make the
    sparse correction cancel is unknown, "auto" runs biased tensor-alpha calls on the triton
    backend (which recomputes cancelling rows) or the reference one.
    capture: a BackwardObserver (e.g. memtrace.SalienceCapture) filled by the backward (eager only).
    backend: "auto", "triton", "cudnn", "flash", "flash_attn" or "reference" (memtrace.backends).
    key_padding_mask: None, or a bool tensor [B, Tk] on q's device, True = attend (transformers'
    2-D attention_mask after .bool(); FlashAttention's varlen convention). False keys get no
    attention mass in any row (bias entries on them add nothing and get zero gradient); a row with
    no key left (with causal too) gives out = 0 and zero gradients, never NaN. Integer / float
    masks are refused (as SDPA, which reads a float mask as additive): pass mask.bool(). Taken by
    the triton and reference backends; "auto" routes masked calls there.
    return_lse: also return the log-sum-exp of each row's biased logits (natural log, float32
    [B, Hq, Tq]; -inf on rows with no key), as FlashAttention's and FlexAttention's option. It
    is a constant: it does not require grad, and no gradient flows back through it.
    Returns out [B, Hq, Tq, D] in q's dtype, laid out like q; (out, lse) with return_lse.
    """
    V.check_attention_inputs(q, k, v, scale=scale, alpha=alpha)
    causal = V.check_bool("causal", causal)
    V.check_attention_bias(bias, q, k)
    if key_padding_mask is not None:
        V.check_key_padding_mask(key_padding_mask, q, k)
    return_lse = V.check_bool("return_lse", return_lse)
    if capture is not None and not isinstance(capture, BackwardObserver):
        raise TypeError(f"capture must be a memtrace.SalienceCapture (a BackwardObserver) or None, "
                        f"got {type(capture).__name__}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    alpha_tensor = alpha if isinstance(alpha, torch.Tensor) else None
    alpha = 1.0 if alpha_tensor is not None else float(alpha)
    V.check_choice("backend", backend, registry.BACKENDS)
    entry_values = bias.entry_values() if bias is not None else None
    bias_shape = ([bias.num_heads, bias.seq_len_q, bias.seq_len_k, bias.index_rows] if bias is not None
                  else [0, 0, 0, 0])
    args = (q, k, v, _bias_tensors(bias), entry_values, bias_shape, causal, scale, alpha, backend,
            key_padding_mask, alpha_tensor)
    if capture is None and _tracing(q):
        out, lse = _fwd_op(*args)
    else:   # eager (a capture is eager only: under torch.compile this is a graph break)
        out, lse = _BiasedAttention.apply(*args, capture, bias)
    return (out, lse) if return_lse else out


def _tracing(q) -> bool:
    """Under torch.compile / export, or on fake or meta tensors: go through the custom op, whose
    fake kernels describe the outputs without running a backend."""
    if torch.compiler.is_compiling() or q.device.type == "meta":
        return True
    try:
        from torch._subclasses.fake_tensor import FakeTensor
        return isinstance(q, FakeTensor)
    except ImportError:  # pragma: no cover
        return False

