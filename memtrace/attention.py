"""Biased attention (SPEC 2): the public op, its autograd, the torch.library op and the backends.

    logits = scale * q k^T + alpha * M        M = the TraceBias value at (h, i, j), 0 elsewhere
    out    = softmax(logits) v                (causal: key j masked when j > i + Tk - Tq)

How a call runs
---------------
`biased_attention` validates its input (memtrace/_validate.py) and resolves the backend (below).
Under torch.compile / export (or on fake tensors) it calls the custom op
`memtrace::biased_attention_fwd`, whose backward is the op `memtrace::biased_attention_bwd`, wired
with `torch.library.register_autograd`; both ops have fake implementations, so
`torch.compile(fullgraph=True)` traces through a model that calls `biased_attention` without a
graph break. In eager mode the same forward/backward run through a plain autograd.Function,
which skips the op dispatch (about 25 us a call). The TraceBias is passed to the ops as its index tensors
plus `entry_values = bias.entry_values()` (computed outside the op, so the gradient the backward
returns for `entry_values` reaches `bias.value` through the `index_add` that merges duplicates).

Every backend computes the biased output `O'` and log-sum-exp `LSE'` in its forward, and in its
backward the gradients of q, k, v (and of the entry values) from `O'`, `LSE'` and `dO`:

    "triton"      our flash kernels with the sparse correction fused in their epilogues
                  (kernels/attention.py); CUDA, or CPU under TRITON_INTERPRET=1
    "cudnn"       aten._scaled_dot_product_cudnn_attention(+_backward), then the standalone sparse
                  correction (kernels/correction.py): O' = (O + sum w v) / (1 + sum w)
    "flash"       aten._scaled_dot_product_flash_attention(+_backward) plus the same correction
    "flash_attn"  the flash-attn package (optional) plus the same correction
    "reference"   dense PyTorch math (allocates Tq x Tk; the fallback on CPU)

`bias=None` (or a bias with no entries) runs the dense kernel alone: no correction launch.

Backend choice: `backend=` names one; "auto" takes the environment variable MEMTRACE_BACKEND when
it is set, else the first backend of `AUTO_PRIORITY` (fastest first, measured on the H100) whose
`not_supported_reasons(...)` is empty. An explicit backend that cannot take the call raises a
ValueError that lists its reasons and the backends that would take it. PyTorch's private attention
ops are guarded: if their schema differs from the one written here, the backend reports it, and
"auto" skips it with one warning; if one fails at run time under "auto", the call falls back to the
next backend (one warning) and that kind of call is not sent to it again in this process.

Capture: with `capture=` (a memtrace.capture.SalienceCapture) the call always runs through the
plain autograd.Function (so under torch.compile it is a graph break: capture is eager only),
whose backward, after computing the gradients, calls
`capture._fill(q, k, v, out, lse, dout, bias, entry_values, causal=, scale=, alpha=)` with the
biased `out` and `lse` of the forward. On the Triton backend the backward also fills the capture's
salience bound (`capture._fused_bound`, a kernels.attention.CaptureBound whose `after_dq` runs
`capture._score_segments` between the dQ and dK/dV kernels; `bound=` to `_fill`), so the fill
rescores only the key blocks that can hold edges over the threshold; "auto" therefore runs
capturing calls on the Triton backend when that applies (see memtrace.capture and
`_fused_capture_fits`).
"""
from __future__ import annotations

import functools
import math
import os
import warnings
import weakref
from collections.abc import Sequence

import torch

from . import _validate as V
from .bias import TraceBias

__all__ = [
    "AUTO_PRIORITY",
    "BACKENDS",
    "available_backends",
    "backend_reasons",
    "biased_attention",
    "get_backend",
    "select_backend",
]

BACKENDS = ("auto", "triton", "cudnn", "flash", "flash_attn", "reference")
# Fastest first, measured on the H100 (benchmarks/results/attention_h100_quick.md; B4 H16 T4096
# D128 bf16, TFLOP/s fwd / fwd+bwd): cuDNN + our correction 575/520 with 2048 traces a head
# (661/566 without bias), our fused Triton kernels 488/405 (497/455), PyTorch's FlashAttention-2
# 304/288 (347/301); then the flash-attn package (not measured: not installed), the dense math.
AUTO_PRIORITY = ("cudnn", "triton", "flash", "flash_attn", "reference")
ENV_VAR = "MEMTRACE_BACKEND"


# ================================================================================================
# What a backend is asked
# ================================================================================================

class _Call:
    """The facts about a call that decide which backends can take it (metadata only: works on
    fake tensors)."""

    __slots__ = ("device", "dtype", "batch", "q_heads", "kv_heads", "seq_len_q", "seq_len_k",
                 "head_dim", "causal", "has_bias", "last_dim_contiguous", "min_bias_logit")

    def __init__(self, q, k, v, bias, causal, min_bias_logit=None):
        self.device = q.device
        self.dtype = q.dtype
        self.batch, self.q_heads, self.seq_len_q, self.head_dim = q.shape
        self.kv_heads, self.seq_len_k = k.shape[1], k.shape[2]
        self.causal = bool(causal)
        self.has_bias = bias is not None and bias.nnz > 0
        self.last_dim_contiguous = all(t.stride(-1) == 1 for t in (q, k, v))
        # alpha * (lowest merged entry value), when known: below ln(CANCEL_THRESHOLD) the
        # correction identity O' = (O + sum w v) / (1 + sum w) can cancel (see kernels/correction.py)
        self.min_bias_logit = min_bias_logit if self.has_bias else None

    def kind(self):
        """A key for 'this kind of call' (used to remember run-time failures of a backend)."""
        return (self.device.type, self.dtype, self.head_dim, self.q_heads != self.kv_heads, self.causal,
                self.seq_len_q == self.seq_len_k)


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - very old torch
        return False


def _cuda_capability(device):
    try:
        return torch.cuda.get_device_capability(device)
    except Exception:  # pragma: no cover - no driver
        return (0, 0)


# ================================================================================================
# Backends
# ================================================================================================

class Backend:
    """One implementation of biased attention. Subclasses set `name` and implement the three
    methods; `forward` returns (out [B, Hq, Tq, D] in q's dtype, lse [B, Hq, Tq] float32, -inf on
    fully masked rows), `backward` returns (dq, dk, dv, dvalues or None)."""

    name = "?"

    def not_supported_reasons(self, call: _Call) -> list:
        raise NotImplementedError

    def forward(self, q, k, v, bias, entry_values, *, causal, scale, alpha):
        raise NotImplementedError

    def backward(self, q, k, v, out, lse, dout, bias, entry_values, *, causal, scale, alpha, need_dvalues):
        raise NotImplementedError


def _import_kernels(module):
    """memtrace.kernels.<module>, or the reason it cannot be imported (cached either way)."""
    key = "kernels." + module
    if key not in _IMPORTS:
        try:
            import importlib
            _IMPORTS[key] = (importlib.import_module("memtrace.kernels." + module), None)
        except Exception as exc:  # an auto-selected backend falls back quietly on import errors
            _IMPORTS[key] = (None, f"memtrace.kernels.{module} cannot be imported ({type(exc).__name__}: {exc})")
    return _IMPORTS[key]


_IMPORTS: dict = {}


class TritonBackend(Backend):
    """Our flash forward/backward with the sparse correction fused into the epilogues."""

    name = "triton"
    DEFAULT_HEAD_DIMS = (16, 32, 64, 128)

    def not_supported_reasons(self, call):
        reasons = []
        module, err = _import_kernels("attention")
        if err:
            return [err]
        if call.device.type == "cpu":
            if not _interpreting():
                reasons.append("CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)")
            elif call.dtype == torch.bfloat16:
                reasons.append("the Triton interpreter cannot do a bfloat16 tl.dot (use float16 or float32)")
        elif call.device.type != "cuda":
            reasons.append(f"needs a CUDA device, got {call.device.type}")
        if call.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            reasons.append(f"dtype {_dtype_name(call.dtype)} (float16, bfloat16, float32 only)")
        head_dims = getattr(module, "HEAD_DIMS", None) or getattr(module, "SUPPORTED_HEAD_DIMS", None)
        if head_dims is None:
            correction = _import_kernels("correction")[0]
            head_dims = getattr(correction, "SUPPORTED_HEAD_DIMS", None) or self.DEFAULT_HEAD_DIMS
        head_dims = tuple(head_dims)
        if call.head_dim not in head_dims:
            reasons.append(f"head dim {call.head_dim} (supports {head_dims})")
        return reasons

    def forward(self, q, k, v, bias, entry_values, *, causal, scale, alpha):
        module = _import_kernels("attention")[0]
        return module.flash_fwd(q, k, v, bias, entry_values, causal=causal, scale=scale, alpha=alpha,
                                may_cancel=_may_cancel(bias, alpha))

    def backward(self, q, k, v, out, lse, dout, bias, entry_values, *, causal, scale, alpha, need_dvalues,
                 capture_bound=None):
        module = _import_kernels("attention")[0]
        return module.flash_bwd(q, k, v, out, lse, dout, bias, entry_values, causal=causal, scale=scale,
                                alpha=alpha, need_dvalues=need_dvalues, may_cancel=_may_cancel(bias, alpha),
                                capture_bound=capture_bound)


class _CorrectedDenseBackend(Backend):
    """A dense attention kernel that returns its LSE, plus the standalone sparse correction.

    forward:  O, LSE = dense(q, k, v);  O', LSE' = correct_fwd(O, LSE, entries)
    backward: dq, dk, dv = dense_backward(dO, q, k, v, O', LSE');  then correct_bwd adds the terms
              of the biased edges (and returns d entry_values).
    """

    dtypes = (torch.float16, torch.bfloat16)
    max_head_dim = 128
    supports_causal_unequal = False   # bottom-right causal with Tq != Tk
    supports_gqa = True

    def _dense_reasons(self, call):
        raise NotImplementedError

    @staticmethod
    def correction_reasons(call):
        """Why the standalone correction cannot serve this call: not importable, or biases so
        negative that 1 + sum w can cancel (1 + sum w >= exp(min alpha * b), so a lowest logit
        above ln(CANCEL_THRESHOLD) can never cancel)."""
        if not call.has_bias:
            return []
        err = _import_kernels("correction")[1]
        if err:
            return [err]
        floor = _cancel_floor()
        if call.min_bias_logit is not None and call.min_bias_logit < floor:
            return [f"alpha * bias reaches {call.min_bias_logit:.3g} < ln({math.exp(floor):.3g}): the dense backward "
                    "fed O', LSE' would amplify its rounding by up to exp(-alpha * bias) on such entries, and the "
                    "forward identity can cancel (the triton backend recomputes such rows)"]
        return []

    def not_supported_reasons(self, call):
        reasons = []
        if call.device.type != "cuda":
            reasons.append(f"needs a CUDA device, got {call.device.type}")
        if call.dtype not in self.dtypes:
            names = ", ".join(_dtype_name(d) for d in self.dtypes)
            reasons.append(f"dtype {_dtype_name(call.dtype)} ({names} only)")
        if call.head_dim > self.max_head_dim:
            reasons.append(f"head dim {call.head_dim} (at most {self.max_head_dim})")
        if call.causal and call.seq_len_q != call.seq_len_k and not self.supports_causal_unequal:
            reasons.append(f"causal with seq_len_q != seq_len_k ({call.seq_len_q} vs {call.seq_len_k}): "
                           "its causal mask is not bottom-right aligned")
        if call.q_heads != call.kv_heads and not self.supports_gqa:
            reasons.append("grouped-query attention (Hq != Hkv)")
        reasons.extend(self.correction_reasons(call))
        if call.device.type == "cuda" and not reasons:
            reasons.extend(self._dense_reasons(call))
        return reasons

    # dense part, implemented per backend: (out, lse [B, Hq, Tq] float32) and (dq, dk, dv)
    def dense_forward(self, q, k, v, *, causal, scale):
        raise NotImplementedError

    def dense_backward(self, q, k, v, out, lse, dout, *, causal, scale):
        raise NotImplementedError

    def forward(self, q, k, v, bias, entry_values, *, causal, scale, alpha):
        out, lse = self.dense_forward(q, k, v, causal=causal, scale=scale)
        if bias is None or bias.nnz == 0:
            return out, lse
        correction = _import_kernels("correction")[0]
        return correction.correct_fwd(q, k, v, out, lse, bias, entry_values, causal=causal, scale=scale,
                                      alpha=alpha, may_cancel=_may_cancel(bias, alpha))

    def backward(self, q, k, v, out, lse, dout, bias, entry_values, *, causal, scale, alpha, need_dvalues):
        dq, dk, dv = self.dense_backward(q, k, v, out, lse, dout, causal=causal, scale=scale)
        if bias is None or bias.nnz == 0:
            dvalues = entry_values.new_zeros(entry_values.shape) if need_dvalues and entry_values is not None else None
            return dq, dk, dv, dvalues
        correction = _import_kernels("correction")[0]
        return correction.correct_bwd(q, k, v, out, lse, dout, bias, entry_values, dq, dk, dv, causal=causal,
                                      scale=scale, alpha=alpha, need_dvalues=need_dvalues)


# -- PyTorch's private attention ops, guarded by their schemas ------------------------------------

# (argument name, type) of every positional and keyword argument, and the number of returns, as
# memtrace calls them (torch 2.4 .. 2.13 have these).
_TORCH_OP_SCHEMAS = {
    "_scaled_dot_product_cudnn_attention": (
        [("query", "Tensor"), ("key", "Tensor"), ("value", "Tensor"), ("attn_bias", "Optional[Tensor]"),
         ("compute_log_sumexp", "bool"), ("dropout_p", "float"), ("is_causal", "bool"),
         ("return_debug_mask", "bool"), ("scale", "Optional[float]")], 9),
    "_scaled_dot_product_cudnn_attention_backward": (
        [("grad_out", "Tensor"), ("query", "Tensor"), ("key", "Tensor"), ("value", "Tensor"), ("out", "Tensor"),
         ("logsumexp", "Tensor"), ("philox_seed", "Tensor"), ("philox_offset", "Tensor"),
         ("attn_bias", "Tensor"), ("cum_seq_q", "Tensor"), ("cum_seq_k", "Tensor"), ("max_q", "SymInt"),
         ("max_k", "SymInt"), ("dropout_p", "float"), ("is_causal", "bool"), ("scale", "Optional[float]")], 3),
    "_scaled_dot_product_flash_attention": (
        [("query", "Tensor"), ("key", "Tensor"), ("value", "Tensor"), ("dropout_p", "float"),
         ("is_causal", "bool"), ("return_debug_mask", "bool"), ("scale", "Optional[float]")], 9),
    "_scaled_dot_product_flash_attention_backward": (
        [("grad_out", "Tensor"), ("query", "Tensor"), ("key", "Tensor"), ("value", "Tensor"), ("out", "Tensor"),
         ("logsumexp", "Tensor"), ("cum_seq_q", "Tensor"), ("cum_seq_k", "Tensor"), ("max_q", "SymInt"),
         ("max_k", "SymInt"), ("dropout_p", "float"), ("is_causal", "bool"), ("philox_seed", "Tensor"),
         ("philox_offset", "Tensor"), ("scale", "Optional[float]")], 3),
}
_SCHEMA_CHECKS: dict = {}


def _torch_op_mismatch(name):
    """None when aten.<name>.default has the schema memtrace was written for, else a reason."""
    if name not in _SCHEMA_CHECKS:
        expected_args, expected_returns = _TORCH_OP_SCHEMAS[name]
        reason = None
        try:
            schema = getattr(torch.ops.aten, name).default._schema
            got = [(a.name, str(a.type)) for a in schema.arguments]
            # SymInt prints as "int" on some versions
            norm = [(n, t.replace("SymInt", "int")) for n, t in got]
            want = [(n, t.replace("SymInt", "int")) for n, t in expected_args]
            if norm != want or len(schema.returns) != expected_returns:
                reason = (f"torch {torch.__version__}: aten.{name} has the signature {schema}, "
                          "which memtrace does not know")
        except Exception as exc:
            reason = f"torch {torch.__version__} has no usable aten.{name} ({type(exc).__name__}: {exc})"
        _SCHEMA_CHECKS[name] = reason
    return _SCHEMA_CHECKS[name]


def _lse_to_bht(lse, shape_bht):
    """A dense op's logsumexp ([B, H, T], [B, H, T, 1] or row-padded) as float32 [B, H, T]."""
    B, H, T = shape_bht
    if lse.dim() == 4:
        lse = lse[..., 0]
    if lse.shape[-1] != T:
        lse = lse[..., :T]
    return lse.float().contiguous()


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


class CudnnBackend(_CorrectedDenseBackend):
    name = "cudnn"
    _lse_rank = {}   # what the forward op returned (3 or 4 dims), so the backward can feed it back

    def _dense_reasons(self, call):
        reasons = []
        for op in ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward"):
            bad = _torch_op_mismatch(op)
            if bad:
                return [bad]
        if not torch.backends.cudnn.is_available():
            reasons.append("cuDNN is not available in this torch build")
        elif torch.backends.cudnn.version() is not None and torch.backends.cudnn.version() < 90000:
            reasons.append(f"cuDNN {torch.backends.cudnn.version()} is older than 9.0")
        if _cuda_capability(call.device) < (8, 0):
            reasons.append("cuDNN attention needs compute capability 8.0 or newer")
        if call.seq_len_k == 1:
            reasons.append("cuDNN attention does not take seq_len_k == 1")
        if torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled():
            reasons.append("cuDNN attention is not deterministic (torch.use_deterministic_algorithms is on)")
        return reasons

    def dense_forward(self, q, k, v, *, causal, scale):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                  scale=scale)
        out, lse = res[0], res[1]
        CudnnBackend._lse_rank[q.device.index] = lse.dim()
        return out, _lse_to_bht(lse, q.shape[:3])

    def dense_backward(self, q, k, v, out, lse, dout, *, causal, scale):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        B, H, Tq, _ = q.shape
        if CudnnBackend._lse_rank.get(q.device.index, 4) == 4:
            lse = lse.reshape(B, H, Tq, 1)
        # cuDNN's backward wants dO in O's layout
        out = out if out.stride() == q.stride() else _like(q, out)
        dout = dout if dout.stride() == out.stride() else _like(out, dout)
        # no dropout: the seed/offset are never read (the forward returns 0-d int64 tensors); None
        # passes an undefined tensor for attn_bias and cum_seq_q/k (a defined one means "nested")
        seed = torch.empty((), dtype=torch.int64, device=q.device)
        offset = torch.empty((), dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse, seed, offset, None, None, None, Tq, k.shape[2], 0.0, causal, scale=scale)
        return dq, dk, dv


class FlashBackend(_CorrectedDenseBackend):
    name = "flash"
    max_head_dim = 256

    def _dense_reasons(self, call):
        for op in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"):
            bad = _torch_op_mismatch(op)
            if bad:
                return [bad]
        reasons = []
        if not torch.backends.cuda.is_flash_attention_available():
            reasons.append("this torch build has no FlashAttention kernels")
        cap = _cuda_capability(call.device)
        if cap < (8, 0):
            reasons.append("FlashAttention needs compute capability 8.0 or newer")
        return reasons

    def dense_forward(self, q, k, v, *, causal, scale):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return res[0], _lse_to_bht(res[1], q.shape[:3])

    def dense_backward(self, q, k, v, out, lse, dout, *, causal, scale):
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        # no dropout: rng state unused (shaped as the forward returns it); None = undefined
        # cum_seq_q/k (a defined one selects the varlen kernel)
        seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
        offset = torch.zeros((), dtype=torch.uint64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            _last_dim_contiguous(dout), q, k, v, _last_dim_contiguous(out), lse, None, None, q.shape[2],
            k.shape[2], 0.0, causal, seed, offset, scale=scale)
        return dq, dk, dv


class FlashAttnBackend(_CorrectedDenseBackend):
    """The flash-attn package (optional). Layout [B, T, H, D]; bottom-right causal; GQA."""

    name = "flash_attn"
    max_head_dim = 256
    supports_causal_unequal = True
    _api = None

    @classmethod
    def _load(cls):
        if cls._api is None:
            try:
                import inspect

                from flash_attn import flash_attn_interface as fai
                fwd, bwd = fai._flash_attn_forward, fai._flash_attn_backward
                fwd_params = set(inspect.signature(fwd).parameters)
                bwd_params = set(inspect.signature(bwd).parameters)
                need_fwd = {"q", "k", "v", "dropout_p", "softmax_scale", "causal"}
                need_bwd = {"dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p",
                            "softmax_scale", "causal"}
                if not need_fwd <= fwd_params or not need_bwd <= bwd_params:
                    cls._api = (None, "flash-attn's _flash_attn_forward/_backward have a signature memtrace does not know")
                else:
                    cls._api = ((fwd, fwd_params, bwd, bwd_params), None)
            except Exception as exc:
                cls._api = (None, f"the flash-attn package is not importable ({type(exc).__name__}: {exc})")
        return cls._api

    def _dense_reasons(self, call):
        err = self._load()[1]
        if err:
            return [err]
        if _cuda_capability(call.device) < (8, 0):
            return ["flash-attn needs compute capability 8.0 or newer"]
        return []

    @staticmethod
    def _window_kwargs(params):
        if "window_size_left" in params:
            return {"window_size_left": -1, "window_size_right": -1}
        if "window_size" in params:
            return {"window_size": (-1, -1)}
        return {}

    def dense_forward(self, q, k, v, *, causal, scale):
        fwd, params = self._load()[0][:2]
        kwargs = self._window_kwargs(params)
        for name, value in (("softcap", 0.0), ("alibi_slopes", None), ("return_softmax", False)):
            if name in params:
                kwargs[name] = value
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        qt, kt, vt = (t if t.stride(-1) == 1 else t.contiguous() for t in (qt, kt, vt))
        res = fwd(qt, kt, vt, dropout_p=0.0, softmax_scale=scale, causal=causal, **kwargs)
        # 2.7+: (out, lse, S_dmask, rng_state); 2.4-2.6: (out, q, k, v, out_padded, lse, S_dmask, rng_state)
        out, lse = (res[0], res[1]) if len(res) == 4 else (res[0], res[5])
        return out.transpose(1, 2), _lse_to_bht(lse, q.shape[:3])

    def dense_backward(self, q, k, v, out, lse, dout, *, causal, scale):
        bwd, params = self._load()[0][2:]
        kwargs = self._window_kwargs(params)
        for name, value in (("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("rng_state", None)):
            if name in params:
                kwargs[name] = value
        qt, kt, vt, ot, dot = (t.transpose(1, 2) for t in (q, k, v, out, dout))
        qt, kt, vt, ot, dot = (t.contiguous() for t in (qt, kt, vt, ot, dot))
        dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
        bwd(dot, qt, kt, vt, ot, lse.contiguous(), dq, dk, dv, dropout_p=0.0, softmax_scale=scale, causal=causal,
            **kwargs)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


class ReferenceBackend(Backend):
    """Dense PyTorch math in float32 (float64 for float64 inputs); allocates Tq x Tk."""

    name = "reference"

    def not_supported_reasons(self, call):
        return []

    @staticmethod
    def _compute_dtype(dtype):
        return torch.float64 if dtype == torch.float64 else torch.float32

    @staticmethod
    def _dense(bias, entry_values, Tq, Tk, dtype):
        """[H, Tq, Tk] of the entries inside (Tq, Tk) (duplicates add)."""
        h, i, j, keep = ReferenceBackend._coords(bias, Tq, Tk)
        flat = torch.where(keep, (h * Tq + i) * Tk + j, torch.zeros_like(h))
        values = torch.where(keep, entry_values.to(dtype), torch.zeros((), dtype=dtype, device=h.device))
        dense = torch.zeros(bias.num_heads * Tq * Tk, dtype=dtype, device=h.device)
        return dense.index_add(0, flat, values).view(bias.num_heads, Tq, Tk)

    @staticmethod
    def _coords(bias, Tq, Tk):
        h, i, j = bias.entry_coords()
        return h, i, j, (i < Tq) & (j < Tk)

    def _probs(self, q, k, bias, entry_values, causal, scale, alpha):
        """(P [B, Hq, Tq, Tk], lse [B, Hq, Tq]) in the compute dtype; P = 0 on masked edges."""
        from .reference.attention import logits_of
        dtype = self._compute_dtype(q.dtype)
        dense = None
        if bias is not None and bias.nnz > 0:
            dense = self._dense(bias, entry_values, q.shape[2], k.shape[2], dtype)
        logits = logits_of(q.to(dtype), k.to(dtype), dense, causal=causal, scale=scale, alpha=alpha)
        lse = torch.logsumexp(logits, dim=-1)
        finite = torch.isfinite(lse)
        probs = torch.exp(logits - torch.where(finite, lse, torch.zeros_like(lse))[..., None])
        return torch.where(finite[..., None], probs, torch.zeros_like(probs)), lse

    @staticmethod
    def _group_sum(t, kv_heads):
        """[B, Hq, ...] -> [B, Hkv, ...]: sum over the query heads that share a kv head."""
        B, Hq = t.shape[:2]
        return t.reshape(B, kv_heads, Hq // kv_heads, *t.shape[2:]).sum(dim=2)

    def forward(self, q, k, v, bias, entry_values, *, causal, scale, alpha):
        from .reference.attention import _expand_kv
        probs, lse = self._probs(q, k, bias, entry_values, causal, scale, alpha)
        out = torch.matmul(probs, _expand_kv(v.to(probs.dtype), q.shape[1]))
        return out.to(q.dtype), lse.float()

    def backward(self, q, k, v, out, lse, dout, bias, entry_values, *, causal, scale, alpha, need_dvalues):
        # Written out (not autograd): the custom op runs below the autograd dispatch key.
        #   dP = dO V^T, D = rowsum(dO * O), dS = P (dP - D); dQ = scale dS K, dK = scale dS^T Q,
        #   dV = P^T dO, d value_e = alpha * sum_b dS[b, h_e, i_e, j_e]
        from .reference.attention import _expand_kv
        dtype = self._compute_dtype(q.dtype)
        Hq, Hkv = q.shape[1], k.shape[1]
        probs, _ = self._probs(q, k, bias, entry_values, causal, scale, alpha)
        qc, kc, vc, do = q.to(dtype), _expand_kv(k.to(dtype), Hq), _expand_kv(v.to(dtype), Hq), dout.to(dtype)
        out_c = torch.matmul(probs, vc)
        dprobs = torch.matmul(do, vc.transpose(-1, -2))
        delta = (do * out_c).sum(dim=-1, keepdim=True)
        dlogits = probs * (dprobs - delta)
        dq = scale * torch.matmul(dlogits, kc)
        dk = self._group_sum(scale * torch.matmul(dlogits.transpose(-1, -2), qc), Hkv)
        dv = self._group_sum(torch.matmul(probs.transpose(-1, -2), do), Hkv)
        dvalues = None
        if need_dvalues and entry_values is not None:
            Tq, Tk = q.shape[2], k.shape[2]
            h, i, j, keep = self._coords(bias, Tq, Tk)
            dbias = alpha * dlogits.sum(dim=0).reshape(-1)
            flat = torch.where(keep, (h * Tq + i) * Tk + j, torch.zeros_like(h))
            dvalues = torch.where(keep, dbias[flat], torch.zeros((), dtype=dtype, device=h.device))
            dvalues = dvalues.to(entry_values.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dvalues


_REGISTRY = {b.name: b for b in (TritonBackend(), CudnnBackend(), FlashBackend(), FlashAttnBackend(),
                                 ReferenceBackend())}
# kinds of call (see _Call.kind) on which a backend failed at run time under "auto"
_FAILED: dict = {}
_WARNED: set = set()


def get_backend(name: str) -> Backend:
    return _REGISTRY[name]


def register_backend(backend: Backend, *, priority: int | None = None) -> None:
    """Add a backend (for experiments); `priority` inserts it into the auto order at that index."""
    global AUTO_PRIORITY, BACKENDS
    _REGISTRY[backend.name] = backend
    if backend.name not in BACKENDS:
        BACKENDS = BACKENDS + (backend.name,)
    if priority is not None and backend.name not in AUTO_PRIORITY:
        order = list(AUTO_PRIORITY)
        order.insert(priority, backend.name)
        AUTO_PRIORITY = tuple(order)


def _reasons(name, call):
    reasons = list(_REGISTRY[name].not_supported_reasons(call))
    failure = _FAILED.get((name, call.kind()))
    if failure:
        reasons.append(f"failed earlier in this process on this kind of call ({failure})")
    return reasons


def backend_reasons(q, k, v, bias=None, *, causal=False) -> dict:
    """{backend name: [reasons it cannot take this call]} for every registered backend."""
    call = _Call(q, k, v, bias, causal)
    return {name: _reasons(name, call) for name in _REGISTRY}


def available_backends(q, k, v, bias=None, *, causal=False) -> list:
    """The backends that can take this call, in auto order."""
    reasons = backend_reasons(q, k, v, bias, causal=causal)
    order = [n for n in AUTO_PRIORITY if n in reasons] + [n for n in reasons if n not in AUTO_PRIORITY]
    return [n for n in order if not reasons[n]]


def _warn_once(key, message):
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _auto_choice(call, exclude=()):
    for name in AUTO_PRIORITY:
        if name in exclude or name not in _REGISTRY:
            continue
        reasons = _reasons(name, call)
        if not reasons:
            return name
        if any("signature" in r or "no usable aten" in r for r in reasons):
            _warn_once(("schema", name), f"memtrace: backend {name!r} skipped: {reasons[0]}")
    return "reference"


def select_backend(q, k, v, bias=None, *, causal=False, backend="auto", _min_bias_logit=None):
    """(name, auto) of the backend that runs this call; ValueError when an explicit or forced
    backend cannot take it."""
    V.check_choice("backend", backend, tuple(_REGISTRY) + ("auto",))
    call = _Call(q, k, v, bias, causal, _min_bias_logit)
    source = "backend"
    if backend == "auto":
        forced = os.environ.get(ENV_VAR, "").strip()
        if forced and forced != "auto":
            if forced not in _REGISTRY:
                raise ValueError(f"environment variable {ENV_VAR} must name one of {tuple(_REGISTRY)} or 'auto', "
                                 f"got {forced!r}")
            backend, source = forced, f"backend (forced by {ENV_VAR})"
        else:
            return _auto_choice(call), True
    reasons = _reasons(backend, call)
    if reasons:
        takers = [n for n in AUTO_PRIORITY if n in _REGISTRY and not _reasons(n, call)]
        raise ValueError(
            f"{source}={backend!r} cannot run this call ({_describe(call)}): " + "; ".join(reasons)
            + f". Backends that would take it: {', '.join(takers) if takers else 'none'}")
    return backend, False


_RESOLVED: dict = {}
# |alpha * bias| above this is refused: the kernels add it to scale * q.k and multiply by log2(e) in
# float32, which overflows to Inf (then NaN) near float32's max (3.4e38); softmax saturates long before.
MAX_BIAS_LOGIT = torch.finfo(torch.float32).max / 16


def _resolve(backend, q, k, v, bias, causal, alpha):
    """select_backend, memoised per kind of call (the answer depends only on metadata, the bias's
    lowest logit, the environment variables and the failures seen so far)."""
    min_logit = None
    if bias is not None and bias.nnz > 0:
        low, high = _bias_range(bias)
        min_logit = min(alpha * low, alpha * high)
        if abs(alpha) * max(abs(low), abs(high)) > MAX_BIAS_LOGIT:
            raise ValueError(f"alpha * bias reaches {max(abs(alpha * low), abs(alpha * high)):.3g} (alpha={alpha:.3g}, "
                             f"bias values in [{low:.3g}, {high:.3g}]): over {MAX_BIAS_LOGIT:.3g}, the float32 "
                             "logits overflow to Inf")
    key = (backend, os.environ.get(ENV_VAR, ""), os.environ.get("TRITON_INTERPRET", ""), q.device, q.dtype,
           tuple(q.shape), tuple(k.shape), bool(causal), bias is not None and bias.nnz > 0, min_logit,
           all(t.stride(-1) == 1 for t in (q, k, v)), len(_FAILED), torch.are_deterministic_algorithms_enabled())
    hit = _RESOLVED.get(key)
    if hit is None:
        hit = select_backend(q, k, v, bias, causal=causal, backend=backend, _min_bias_logit=min_logit)
        if len(_RESOLVED) > 1024:
            _RESOLVED.clear()
        _RESOLVED[key] = hit
    return hit


# id(value tensor) -> (weak reference, version, lowest and highest merged entry value). A value that
# was seen and not modified since (no optimizer step, no in-place write) is not read again, so
# steady-state calls do no device sync for it.
_BIAS_RANGES: dict = {}


def _bias_range(bias):
    """(min, max) of the merged entry values (one device sync per new or modified value tensor);
    ValueError when a value is NaN or Inf (SPEC 6)."""
    value = bias.value
    version = getattr(value, "_version", None)
    seen = _BIAS_RANGES.get(id(value))
    if seen is not None and seen[0]() is value and seen[1] == version:
        return seen[2]
    merged = bias.entry_values().detach()
    low, high = torch.stack([merged.min(), merged.max()]).tolist()
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("bias values contain NaN or Inf")
    if version is not None:
        key = id(value)
        if len(_BIAS_RANGES) > 4096:
            _BIAS_RANGES.clear()
        _BIAS_RANGES[key] = (weakref.ref(value, lambda _ref, key=key: _BIAS_RANGES.pop(key, None)), version,
                             (low, high))
    return low, high


def _may_cancel(bias, alpha):
    """Whether a row's corrected normaliser 1 + sum w can fall under CANCEL_THRESHOLD: only when
    alpha * some value < ln(CANCEL_THRESHOLD), since 1 + sum w >= exp(min alpha b). When it
    cannot (the usual case; auto only picks the dense backends then) the forwards skip the launch
    that recomputes cancelled rows (~13 us at B4 H16 T4096 on the H100). Cached per value tensor."""
    if bias is None or bias.nnz == 0:
        return False
    low, high = _bias_range(bias)
    return min(alpha * low, alpha * high) < _cancel_floor()


def _cancel_floor():
    """ln(CANCEL_THRESHOLD): the lowest alpha * bias value with which no row can cancel."""
    return math.log(getattr(_import_kernels("correction")[0], "CANCEL_THRESHOLD", 0.25))


def _describe(call):
    return (f"{_dtype_name(call.dtype)} on {call.device}, B={call.batch}, Hq={call.q_heads}, Hkv={call.kv_heads}, "
            f"Tq={call.seq_len_q}, Tk={call.seq_len_k}, D={call.head_dim}, causal={call.causal}, "
            f"bias={'yes' if call.has_bias else 'no'}")


# ================================================================================================
# Running a backend (with the run-time fallback of "auto") and fixing output layouts
# ================================================================================================

def _like(ref, value):
    """`value` copied into a tensor with torch.empty_like(ref)'s layout (what the fake kernels say)."""
    target = torch.empty_like(ref)
    target.copy_(value)
    return target


def _match_layout(ref, value):
    if value.stride() == torch.empty_like(ref, device="meta").stride():
        return value
    return _like(ref, value)


def _run_forward(backend, auto, q, k, v, bias, entry_values, causal, scale, alpha):
    if bias is not None and bias.nnz == 0:
        bias, entry_values = None, None
    while True:
        try:
            out, lse = _REGISTRY[backend].forward(q, k, v, bias, entry_values, causal=causal, scale=scale,
                                                  alpha=alpha)
            break
        except (RuntimeError, NotImplementedError) as exc:
            backend = _fall_back(backend, auto, exc, q, k, v, bias, causal, alpha)
    out = _match_layout(q, out if out.dtype == q.dtype else out.to(q.dtype))
    B, H, Tq = q.shape[:3]
    if lse.shape != (B, H, Tq) or lse.dtype != torch.float32 or not lse.is_contiguous():
        lse = _lse_to_bht(lse, (B, H, Tq))
    return out, lse


def _run_backward(backend, auto, q, k, v, out, lse, dout, bias, entry_values, causal, scale, alpha,
                  need_dvalues, capture_bound=None):
    """(dq, dk, dv, dvalues, the backend that ran). capture_bound reaches the Triton backend only
    (the caller's capture may use it only when that backend ran)."""
    full_entries = entry_values
    if bias is not None and bias.nnz == 0:
        bias, entry_values = None, None
    while True:
        extra = {"capture_bound": capture_bound} if backend == "triton" and capture_bound is not None else {}
        try:
            dq, dk, dv, dvalues = _REGISTRY[backend].backward(
                q, k, v, out, lse, dout, bias, entry_values, causal=causal, scale=scale, alpha=alpha,
                need_dvalues=need_dvalues and entry_values is not None, **extra)
            break
        except (RuntimeError, NotImplementedError) as exc:
            backend = _fall_back(backend, auto, exc, q, k, v, bias, causal, alpha)
    if need_dvalues and full_entries is not None and dvalues is None:
        dvalues = torch.zeros_like(full_entries)
    return _match_layout(q, dq), _match_layout(k, dk), _match_layout(v, dv), dvalues, backend


def _fall_back(backend, auto, exc, q, k, v, bias, causal, alpha):
    """Under "auto", remember that `backend` failed on this kind of call and pick the next one;
    otherwise re-raise."""
    if not auto or backend == "reference":
        raise exc
    min_logit = None
    if bias is not None and bias.nnz > 0:
        low, high = _bias_range(bias)
        min_logit = min(alpha * low, alpha * high)
    call = _Call(q, k, v, bias, causal, min_logit)
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    _FAILED[(backend, call.kind())] = f"{type(exc).__name__}: {first_line[:200]}"
    nxt = _auto_choice(call)
    _warn_once(("runtime", backend, call.kind()),
               f"memtrace: backend {backend!r} failed on {_describe(call)} ({first_line[:200]}); "
               f"falling back to {nxt!r} for this kind of call")
    return nxt


# ================================================================================================
# The torch.library ops
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
    return TraceBias(head, q_idx, k_idx, value, num_heads=shape[0], seq_len_q=shape[1], seq_len_k=shape[2],
                     _index=tuple(index))


@torch.library.custom_op("memtrace::biased_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_tensors: Sequence[torch.Tensor],
            entry_values: torch.Tensor | None, bias_shape: Sequence[int], causal: bool, scale: float,
            alpha: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Tq, D] laid out like q, lse [B, Hq, Tq] float32) of biased attention.
    `backend` is what the user asked for ("auto" or a name); it is resolved here, at run time."""
    bias = _bias_from_tensors(bias_tensors, bias_shape)
    name, auto = _resolve(backend, q, k, v, bias, causal, alpha)
    return _run_forward(name, auto, q, k, v, bias, entry_values, causal, scale, alpha)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, bias_tensors, entry_values, bias_shape, causal, scale, alpha, backend):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("memtrace::biased_attention_bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, bias_tensors: Sequence[torch.Tensor], entry_values: torch.Tensor | None,
            bias_shape: Sequence[int], causal: bool, scale: float, alpha: float, backend: str,
            need_dvalues: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv laid out like q, k, v; d entry_values [E] float32, or [0] when not needed)."""
    bias = _bias_from_tensors(bias_tensors, bias_shape)
    name, auto = _resolve(backend, q, k, v, bias, causal, alpha)
    dq, dk, dv, dvalues, _ = _run_backward(name, auto, q, k, v, out, lse, dout, bias, entry_values, causal, scale,
                                           alpha, need_dvalues)
    if dvalues is None:
        dvalues = q.new_zeros(0, dtype=torch.float32)
    return dq, dk, dv, dvalues.float().contiguous()


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, out, lse, bias_tensors, entry_values, bias_shape, causal, scale, alpha, backend,
              need_dvalues):
    if need_dvalues and entry_values is not None:
        dvalues = entry_values.new_empty(entry_values.shape, dtype=torch.float32)
    else:
        dvalues = q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dvalues


def _op_setup_context(ctx, inputs, output):
    q, k, v, bias_tensors, entry_values, bias_shape, causal, scale, alpha, backend = inputs
    out, lse = output
    ctx.n_bias = len(bias_tensors)
    ctx.has_values = entry_values is not None
    saved = [q, k, v, out, lse, *bias_tensors]
    if entry_values is not None:
        saved.append(entry_values)
    ctx.save_for_backward(*saved)
    ctx.args = (list(bias_shape), causal, scale, alpha, backend)


def _op_backward(ctx, dout, dlse):
    saved = ctx.saved_tensors
    q, k, v, out, lse = saved[:5]
    bias_tensors = list(saved[5:5 + ctx.n_bias])
    entry_values = saved[5 + ctx.n_bias] if ctx.has_values else None
    bias_shape, causal, scale, alpha, backend = ctx.args
    need_dvalues = bool(ctx.has_values and ctx.needs_input_grad[4])
    dq, dk, dv, dvalues = _bwd_op(dout, q, k, v, out, lse, bias_tensors, entry_values, bias_shape, causal, scale,
                                  alpha, backend, need_dvalues)
    return (dq, dk, dv, [None] * ctx.n_bias, (dvalues if need_dvalues else None), None, None, None, None, None)


torch.library.register_autograd("memtrace::biased_attention_fwd", _op_backward, setup_context=_op_setup_context)


# ================================================================================================
# The eager path: a plain autograd.Function (also the only path that takes a capture)
# ================================================================================================

class _EagerAttention(torch.autograd.Function):
    """Same math as the op; its backward also fills a SalienceCapture."""

    @staticmethod
    def forward(ctx, q, k, v, entry_values, bias, causal, scale, alpha, backend, auto, capture):
        out, lse = _run_forward(backend, auto, q, k, v, bias, entry_values, causal, scale, alpha)
        ctx.save_for_backward(q, k, v, out, lse, entry_values)
        ctx.bias, ctx.capture = bias, capture
        ctx.args = (causal, scale, alpha, backend, auto)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, entry_values = ctx.saved_tensors
        causal, scale, alpha, backend, auto = ctx.args
        need_dvalues = entry_values is not None and ctx.needs_input_grad[3]
        dout = dout.contiguous() if dout.stride(-1) != 1 else dout
        # The Triton backward can bound the capture's salience on the way (see memtrace.capture).
        make_bound = getattr(ctx.capture, "_fused_bound", None) if backend == "triton" else None
        bound = make_bound(q, k) if make_bound is not None else None
        if bound is not None:
            # rescored between the dQ and dK/dV kernels, so that the bound is gone before dK/dV exist
            bound.after_dq = functools.partial(ctx.capture._score_segments, q, k, v, lse, dout, ctx.bias,
                                               causal=causal, scale=scale, bound=bound)
        dq, dk, dv, dvalues, ran = _run_backward(backend, auto, q, k, v, out, lse, dout, ctx.bias, entry_values,
                                                 causal, scale, alpha, need_dvalues, capture_bound=bound)
        if ctx.capture is not None:
            fused = {"bound": bound} if bound is not None and ran == "triton" else {}
            if bound is not None:
                bound.after_dq = None       # the partial refers to the bound: no reference cycle left
            ctx.capture._fill(q, k, v, out, lse, dout, ctx.bias, entry_values, causal=causal, scale=scale,
                              alpha=alpha, **fused)
        grads = (dq, dk, dv, (dvalues if need_dvalues else None))
        if backend != "reference" and torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (dout, q, k, v, entry_values)):
            grads = _refuse_double_backward(backend, grads)
        return (*grads, None, None, None, None, None, None, None)


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

def biased_attention(q, k, v, bias=None, *, causal=False, scale=None, alpha=1.0, capture=None, backend="auto"):
    """Attention with a sparse additive bias: softmax(scale * q k^T + alpha * M) v (SPEC 2).

    q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D] with Hq % Hkv == 0; float16 / bfloat16 / float32
    (float64 on the reference backend); D in 16, 32, 64, 128 (256 where a backend takes it).
    bias: a TraceBias built for Hq heads and at least (Tq, Tk); entries beyond the call's lengths
    are ignored, duplicates add; gradients reach `bias.value` when it requires grad.
    causal: bottom-right aligned (key j masked when j > i + Tk - Tq).
    scale: defaults to 1/sqrt(D).  alpha: multiplies the bias.
    capture: a SalienceCapture filled by the backward pass (eager only).
    backend: "auto", "triton", "cudnn", "flash", "flash_attn" or "reference" (see the module doc).
    Returns out [B, Hq, Tq, D] in q's dtype, laid out like q.
    """
    V.check_attention_inputs(q, k, v, scale=scale, alpha=alpha)
    causal = V.check_bool("causal", causal)
    V.check_attention_bias(bias, q, k)
    V.check_attention_capture(capture)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    alpha = float(alpha)
    V.check_choice("backend", backend, BACKENDS)
    entry_values = bias.entry_values() if bias is not None else None

    if capture is not None or not _tracing(q):
        # eager: the autograd.Function directly (about 25 us less per call than the op's dispatch)
        name, auto = _resolve(backend, q, k, v, bias, causal, alpha)
        if capture is not None and auto and name != "triton" and _fused_capture_fits(q, k, v, bias, causal, capture):
            name = "triton"
        out, _ = _EagerAttention.apply(q, k, v, entry_values, bias, causal, scale, alpha, name, auto, capture)
        return out
    bias_shape = [bias.num_heads, bias.seq_len_q, bias.seq_len_k] if bias is not None else [0, 0, 0]
    out, _ = _fwd_op(q, k, v, _bias_tensors(bias), entry_values, bias_shape, causal, scale, alpha, backend)
    return out


def _fused_capture_fits(q, k, v, bias, causal, capture) -> bool:
    """Whether "auto" should run a capturing call on the Triton backend: its backward bounds the
    salience on the way, so the capture rescores a few segments instead of recomputing every
    tile (B2 H16 T4096 D128 on the H100: ~0.4 ms instead of ~2.8 ms; BENCHMARKS.md), which
    outweighs the faster dense kernels of the other backends. Not when MEMTRACE_BACKEND forces
    one (select_backend already honoured it) or the fused fill does not apply."""
    if os.environ.get(ENV_VAR, "").strip() not in ("", "auto"):
        return False
    applies = getattr(capture, "_fused_bound_applies", None)
    if applies is None or _reasons("triton", _Call(q, k, v, bias, causal, None)):
        return False
    return applies(q, k)


def _tracing(q) -> bool:
    """Under torch.compile / export, or on fake or meta tensors: go through the custom op, whose
    fake kernels describe the outputs without running a backend."""
    if _compiling() or q.device.type == "meta":
        return True
    try:
        from torch._subclasses.fake_tensor import FakeTensor
        return isinstance(q, FakeTensor)
    except ImportError:  # pragma: no cover
        return False
