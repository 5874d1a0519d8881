"""What every attention backend shares: the facts of a call, the Backend interface, the facts of
a bias that decide how it may run, and the dense-kernel-plus-correction scheme of the backends
built on someone else's dense attention.

Every backend computes the biased output O' and log-sum-exp LSE' in its forward, and in its
backward the gradients of q, k, v (and of the bias entry values) from O', LSE' and dO.
"""
from __future__ import annotations

import math
import weakref

import torch

from .. import config


class Call:
    """The facts about a call that decide which backends can take it (metadata only: works on
    fake tensors)."""

    __slots__ = ("device", "dtype", "batch", "q_heads", "kv_heads", "seq_len_q", "seq_len_k",
                 "head_dim", "causal", "has_bias", "last_dim_contiguous", "min_bias_logit",
                 "has_key_padding_mask", "alpha_is_tensor")

    def __init__(self, q, k, v, bias, causal, min_bias_logit=None, key_padding_mask=None, alpha_is_tensor=False):
        self.device = q.device
        self.dtype = q.dtype
        self.batch, self.q_heads, self.seq_len_q, self.head_dim = q.shape
        self.kv_heads, self.seq_len_k = k.shape[1], k.shape[2]
        self.causal = bool(causal)
        self.has_bias = bias is not None and bias.nnz > 0
        self.last_dim_contiguous = all(t.stride(-1) == 1 for t in (q, k, v))
        # alpha * (lowest merged entry value), when known: below ln(CANCEL_THRESHOLD) the
        # correction identity O' = (O + sum w v) / (1 + sum w) can cancel (see kernels/attention/cancel.py)
        self.min_bias_logit = min_bias_logit if self.has_bias else None
        # a [B, Tk] key padding mask is passed (only the triton and reference backends take one)
        self.has_key_padding_mask = key_padding_mask is not None
        # alpha is a 0-d device tensor: alpha * bias is unknown on the host (min_bias_logit None)
        self.alpha_is_tensor = bool(alpha_is_tensor)

    def kind(self):
        """A key for 'this kind of call' (used to remember run-time failures of a backend)."""
        return (self.device.type, self.dtype, self.head_dim, self.q_heads != self.kv_heads, self.causal,
                self.seq_len_q == self.seq_len_k, self.has_key_padding_mask)


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def interpreting() -> bool:
    return config.triton_interpreter()


def cuda_capability(device):
    try:
        return torch.cuda.get_device_capability(device)
    except Exception:  # pragma: no cover - no driver
        return (0, 0)


class Backend:
    """One implementation of biased attention. Subclasses set `name` and implement the three
    methods; `forward` returns (out [B, Hq, Tq, D] in q's dtype, lse [B, Hq, Tq] float32, -inf on
    fully masked rows), `backward` returns (dq, dk, dv, dvalues or None)."""

    name = "?"

    def not_supported_reasons(self, call: Call) -> list:
        raise NotImplementedError

    def forward(self, q, k, v, bias, entry_values, *, causal, scale, alpha, key_padding_mask=None):
        raise NotImplementedError

    def backward(self, q, k, v, out, lse, dout, bias, entry_values, *, causal, scale, alpha, need_dvalues,
                 key_padding_mask=None):
        raise NotImplementedError


def no_mask_reason(call):
    """[reason] for a backend that takes no key padding mask, when the call has one."""
    if call.has_key_padding_mask:
        return ["a key_padding_mask (only the triton and reference backends take one)"]
    return []


def fold_alpha(entry_values, alpha, bias=None):
    """(entry_values, alpha) for the kernels: a tensor alpha is multiplied into the entry values on
    the device (the kernels then run with alpha = 1.0, and their d values are multiplied by alpha
    again, see scale_dvalues), so that it is never read on the host; a float alpha passes as is."""
    if not isinstance(alpha, torch.Tensor):
        return entry_values, alpha
    if entry_values is None and bias is not None and bias.nnz > 0:
        entry_values = bias.entry_values()
    if entry_values is None:
        return None, 1.0
    return entry_values * alpha.detach().to(entry_values.dtype), 1.0


def scale_dvalues(dvalues, alpha):
    """The d entry_values of kernels run through fold_alpha: d/d(alpha v) * alpha."""
    if dvalues is None or not isinstance(alpha, torch.Tensor):
        return dvalues
    return dvalues * alpha.detach().to(dvalues.dtype)


def attention_kernels():
    """(memtrace.kernels.attention, None), or (None, the reason it cannot be imported); cached."""
    if not _KERNELS:
        try:
            from ..kernels import attention as module
            _KERNELS.append((module, None))
        except Exception as exc:  # an auto-selected backend falls back quietly on import errors
            _KERNELS.append((None, f"memtrace.kernels.attention cannot be imported ({type(exc).__name__}: {exc})"))
    return _KERNELS[0]


_KERNELS: list = []


class CorrectedDenseBackend(Backend):
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
        above ln(CANCEL_THRESHOLD) can never cancel), or a tensor alpha (whether it can cancel is
        not known on the host without a sync)."""
        if not call.has_bias:
            return []
        err = attention_kernels()[1]
        if err:
            return [err]
        if call.alpha_is_tensor:
            return ["alpha is a tensor with a bias: whether alpha * bias can make the correction identity cancel "
                    "is unknown without a host sync (the triton backend handles cancelling rows)"]
        floor = cancel_floor()
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
            names = ", ".join(dtype_name(d) for d in self.dtypes)
            reasons.append(f"dtype {dtype_name(call.dtype)} ({names} only)")
        if call.head_dim > self.max_head_dim:
            reasons.append(f"head dim {call.head_dim} (at most {self.max_head_dim})")
        if call.causal and call.seq_len_q != call.seq_len_k and not self.supports_causal_unequal:
            reasons.append(f"causal with seq_len_q != seq_len_k ({call.seq_len_q} vs {call.seq_len_k}): "
                           "its causal mask is not bottom-right aligned")
        if call.q_heads != call.kv_heads and not self.supports_gqa:
            reasons.append("grouped-query attention (Hq != Hkv)")
        reasons.extend(no_mask_reason(call))
        reasons.extend(self.correction_reasons(call))
        if call.device.type == "cuda" and not reasons:
            reasons.extend(self._dense_reasons(call))
        return reasons

    # dense part, implemented per backend: (out, lse [B, Hq, Tq] float32) and (dq, dk, dv)
    def dense_forward(self, q, k, v, *, causal, scale):
        raise NotImplementedError

    def dense_backward(self, q, k, v, out, lse, dout, *, causal, scale):
        raise NotImplementedError

    @staticmethod
    def _refuse_mask(key_padding_mask):
        if key_padding_mask is not None:
            raise NotImplementedError("this backend takes no key_padding_mask")

    def forward(self, q, k, v, bias, entry_values, *, causal, scale, alpha, key_padding_mask=None):
        self._refuse_mask(key_padding_mask)
        out, lse = self.dense_forward(q, k, v, causal=causal, scale=scale)
        if bias is None or bias.nnz == 0:
            return out, lse
        cancel = may_cancel(bias, alpha)
        entry_values, alpha = fold_alpha(entry_values, alpha, bias)
        return attention_kernels()[0].correct_fwd(q, k, v, out, lse, bias, entry_values, causal=causal, scale=scale,
                                      alpha=alpha, may_cancel=cancel)

    def backward(self, q, k, v, out, lse, dout, bias, entry_values, *, causal, scale, alpha, need_dvalues,
                 key_padding_mask=None):
        self._refuse_mask(key_padding_mask)
        dq, dk, dv = self.dense_backward(q, k, v, out, lse, dout, causal=causal, scale=scale)
        if bias is None or bias.nnz == 0:
            dvalues = entry_values.new_zeros(entry_values.shape) if need_dvalues and entry_values is not None else None
            return dq, dk, dv, dvalues
        folded, alpha_k = fold_alpha(entry_values, alpha, bias)
        dq, dk, dv, dvalues = attention_kernels()[0].correct_bwd(
            q, k, v, out, lse, dout, bias, folded, dq, dk, dv, causal=causal, scale=scale, alpha=alpha_k,
            need_dvalues=need_dvalues)
        return dq, dk, dv, scale_dvalues(dvalues, alpha)


# |alpha * bias| above this is refused: the kernels add it to scale * q.k and multiply by log2(e) in
# float32, which overflows to Inf (then NaN) near float32's max (3.4e38); softmax saturates long before.
MAX_BIAS_LOGIT = torch.finfo(torch.float32).max / 16
# The largest positive alpha * bias taken. An edge with such a logit dominates its row, so the row's
# log-sum-exp is about that large and float32 keeps it to ~logit * 2^-23: the backward's P on the
# edge (exp(logit - lse)) carries that relative error. Measured on the Triton backward (one key, dv
# against dout, 20 seeds): 5.3e-6 at 64, 2.3e-3 at 1e4; SPEC 7 asks 1e-5. Negative values are not
# bounded this way: their edges get P ~ 0, whose absolute error is tiny.
MAX_POSITIVE_BIAS_LOGIT = 64.0

# id(value tensor) -> (weak reference, version, lowest and highest merged entry value). A value that
# was seen and not modified since (no optimizer step, no in-place write) is not read again, so
# steady-state calls do no device sync for it.
_BIAS_RANGES: dict = {}


def bias_range(bias):
    """(min, max) of the merged entry values (one device sync per new or modified value tensor);
    ValueError when a value is NaN or Inf (SPEC 6).

    What is checked when: every new value tensor, and again after each in-place change that bumps
    its version counter (optimizer steps, `value[...] = x`). A write that bypasses the counter
    (`value.data[...] = x`, a numpy view) is not seen; a NaN written so comes out as NaN in the
    rows it reaches, on every backend (never as a silent zero)."""
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


def min_bias_logit(bias, alpha):
    """alpha * (lowest merged entry value), or None without entries or with a tensor alpha (not read
    on the host: neither this nor the MAX_BIAS_LOGIT check is made for it); ValueError when
    |alpha * bias| passes MAX_BIAS_LOGIT."""
    if bias is None or bias.nnz == 0:
        return None
    if isinstance(alpha, torch.Tensor):
        bias_range(bias)        # still refuses NaN / Inf values (cached per value tensor)
        return None
    low, high = bias_range(bias)
    if abs(alpha) * max(abs(low), abs(high)) > MAX_BIAS_LOGIT:
        raise ValueError(f"alpha * bias reaches {max(abs(alpha * low), abs(alpha * high)):.3g} (alpha={alpha:.3g}, "
                         f"bias values in [{low:.3g}, {high:.3g}]): over {MAX_BIAS_LOGIT:.3g}, the float32 "
                         "logits overflow to Inf")
    top = max(alpha * low, alpha * high)
    if top > MAX_POSITIVE_BIAS_LOGIT:
        raise ValueError(f"alpha * bias reaches +{top:.3g} (alpha={alpha:.3g}, bias values in "
                         f"[{low:.3g}, {high:.3g}]): over +{MAX_POSITIVE_BIAS_LOGIT:g}, the edge dominates its "
                         "row's float32 log-sum-exp, whose rounding then reaches the gradients (relative error "
                         f"~ logit * 2^-23, over SPEC 7's 1e-5); e^{MAX_POSITIVE_BIAS_LOGIT:g} already outweighs "
                         "any other key")
    return min(alpha * low, alpha * high)


def may_cancel(bias, alpha):
    """Whether a row's corrected normaliser 1 + sum w can fall under CANCEL_THRESHOLD: only when
    alpha * some value < ln(CANCEL_THRESHOLD), since 1 + sum w >= exp(min alpha b). When it
    cannot (the usual case; auto only picks the dense backends then) the forwards skip the launch
    that recomputes cancelled rows (~13 us at B4 H16 T4096 on the H100). Cached per value tensor.
    A tensor alpha is not read on the host (no sync): such a call may always cancel (the triton
    backend then runs its cancelling-row launches, which cost only what they find)."""
    if bias is None or bias.nnz == 0:
        return False
    if isinstance(alpha, torch.Tensor):
        return True
    low, high = bias_range(bias)
    return min(alpha * low, alpha * high) < cancel_floor()


def cancel_floor():
    """ln(CANCEL_THRESHOLD): the lowest alpha * bias value with which no row can cancel."""
    return math.log(getattr(attention_kernels()[0], "CANCEL_THRESHOLD", 0.25))


def lse_to_bht(lse, shape_bht):
    """A dense op's logsumexp ([B, H, T], [B, H, T, 1] or row-padded) as float32 [B, H, T]."""
    B, H, T = shape_bht
    if lse.dim() == 4:
        lse = lse[..., 0]
    if lse.shape[-1] != T:
        lse = lse[..., :T]
    return lse.float().contiguous()


def last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def like(ref, value):
    """`value` copied into a tensor with torch.empty_like(ref)'s layout (what the fake kernels say)."""
    target = torch.empty_like(ref)
    target.copy_(value)
    return target
