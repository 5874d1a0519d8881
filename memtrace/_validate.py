"""Every input check of SPEC 6, in one place.

Each check raises ValueError (wrong value, shape, range) or TypeError (wrong type or dtype) with a
message that names the argument and says what was expected. Checks never mutate anything, so a
caller that validates everything before touching its state leaves that state unchanged on error.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HEAD_DIMS = (16, 32, 64, 128, 256)
MAX_SEQ_LEN = 65535
_LIMITED_UNSIGNED = tuple(getattr(torch, n) for n in ("uint16", "uint32", "uint64") if hasattr(torch, n))


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes: Iterable[torch.dtype] | None = None,
                 integer: bool = False, floating: bool = False) -> torch.Tensor:
    """A tensor of the given rank and dtype family."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if integer and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if floating and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t


def check_not_meta(name: str, t: torch.Tensor) -> None:
    """A tensor that holds data: a meta tensor (shape only) can be neither read nor updated, so it
    is a TypeError here rather than a RuntimeError / NotImplementedError deep inside an op."""
    if t.device.type == "meta":
        raise TypeError(f"{name} is a meta tensor (shape only, no data); "
                        "memtrace needs tensors that hold data")


def check_same_device(**tensors: torch.Tensor) -> None:
    """All the named tensors live on one device."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "all inputs must be on one device")


def check_finite(name: str, t: torch.Tensor) -> None:
    """No NaN or Inf (one device sync; used on public entry points only)."""
    if not t.numel():
        return      # (an empty meta tensor holds nothing to check either)
    check_not_meta(name, t)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _min_max(name: str, t: torch.Tensor) -> tuple:
    """(min, max) of a non-empty integer tensor as Python ints. torch has no min/max for
    uint16/32/64, so those are read as int64, where a uint64 value >= 2^63 would wrap negative
    (2^64 - 1 into the -1 that means "no routing"): it is refused instead."""
    if t.dtype not in _LIMITED_UNSIGNED:
        return int(t.min()), int(t.max())
    t = t.long()
    lo = int(t.min())
    if lo < 0:
        raise ValueError(f"{name} holds uint64 values >= 2^63")
    return lo, int(t.max())


def check_index_range(name: str, t: torch.Tensor, low: int, high: int) -> None:
    """Every element in [low, high)."""
    if t.numel() == 0:
        return
    check_not_meta(name, t)
    lo, hi = _min_max(name, t)
    if lo < low or hi >= high:
        raise ValueError(f"{name} must lie in [{low}, {high}), got values in [{lo}, {hi}]")


def check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """A Python int (bools rejected) within [low, high]."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    if not isinstance(value, int):
        if isinstance(value, torch.Tensor) or not hasattr(value, "__index__"):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_float(name: str, value, *, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> float:
    """A finite real number within [low, high] ((low, high] when low_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_rate(name: str, value) -> float:
    """A rate in [0, 1]."""
    return check_float(name, value, low=0.0, high=1.0)


def check_seq_len(name: str, value) -> int:
    return check_int(name, value, low=1, high=MAX_SEQ_LEN)


def check_device(name: str, value) -> torch.device:
    """A torch.device, a device string or a CUDA ordinal naming a device this process can use."""
    if isinstance(value, bool) or not isinstance(value, (torch.device, str, int)):
        raise TypeError(f"{name} must be a torch.device, a str or an int, got {type(value).__name__}")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{name} must name a torch device such as 'cpu' or 'cuda:0', got {value!r} ({exc})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} is {value!r} but CUDA is not available")
        if device.index is not None and not 0 <= device.index < torch.cuda.device_count():
            raise ValueError(f"{name} is {value!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
        if device.index is None:    # 'cuda' means the current device; tensors made there say 'cuda:N'
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def check_choice(name: str, value, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


# ---- attention (SPEC 2) ------------------------------------------------------------------------

# The largest softmax scale taken: 1/sqrt(D) is ~0.1; at 1e4 a logit gap of 1e-3 already weighs e^10.
MAX_SCALE = 1e4


def check_attention_inputs(q, k, v, *, scale, alpha) -> None:
    """q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D]; one dtype and device; Hq % Hkv == 0; D supported."""
    check_tensor("q", q, ndim=4, dtypes=ATTENTION_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=ATTENTION_DTYPES)
    check_tensor("v", v, ndim=4, dtypes=ATTENTION_DTYPES)
    check_same_device(q=q, k=k, v=v)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    check_not_meta("q", q)    # (k and v share q's device)
    B, Hq, Tq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != B:
        raise ValueError(f"k must have batch size {B} like q, got {k.shape[0]}")
    if k.shape[3] != D:
        raise ValueError(f"k and v must have head dim {D} like q, got {k.shape[3]}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q's heads ({Hq}) must be a multiple of k's heads ({Hkv}) (grouped-query attention)")
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim must be one of {HEAD_DIMS}, got {D}")
    Tk = k.shape[2]
    if B < 1:
        raise ValueError(f"q must have batch size >= 1, got {B}")
    if not 1 <= Tq <= MAX_SEQ_LEN:
        raise ValueError(f"q's sequence length must be in [1, {MAX_SEQ_LEN}], got {Tq}")
    if not 1 <= Tk <= MAX_SEQ_LEN:
        raise ValueError(f"k's sequence length must be in [1, {MAX_SEQ_LEN}], got {Tk}")
    if scale is not None:
        check_float("scale", scale, low=0.0, low_open=True)
        if scale > MAX_SCALE:
            raise ValueError(f"scale must be <= {MAX_SCALE:g}, got {scale:g}: the kernels form scale * q.k * log2(e) "
                             "in float32, which overflows for large scales (and softmax is a hard max long before)")
    check_alpha(alpha, q)


def check_bool(name: str, value) -> bool:
    """A Python bool (or a 0-d bool tensor is rejected: it would need a device sync)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_attention_bias(bias, q, k) -> None:
    """bias is None or a TraceBias for q's heads, on q's device, built for at least (Tq, Tk).

    Entries beyond the call's (Tq, Tk) are ignored, so a bias built for longer sequences is fine;
    one built for shorter sequences than the call is an error (its index has no rows for them).
    """
    if bias is None:
        return
    from .bias import TraceBias  # local: bias.py imports this module
    if not isinstance(bias, TraceBias):
        raise TypeError(f"bias must be a memtrace.TraceBias or None, got {type(bias).__name__}")
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    if bias.num_heads != Hq:
        raise ValueError(f"bias must have num_heads equal to q's heads ({Hq}), got {bias.num_heads}")
    if bias.device != q.device:
        raise ValueError(f"bias is on {bias.device} but q is on {q.device}; all inputs must be on one device")
    if bias.seq_len_q < Tq:
        raise ValueError(f"bias was built for seq_len_q={bias.seq_len_q}, shorter than q's sequence length {Tq}")
    if bias.seq_len_k < Tk:
        raise ValueError(f"bias was built for seq_len_k={bias.seq_len_k}, shorter than k's sequence length {Tk}")
    value = bias.value   # a public attribute: may have been replaced since from_coo checked it
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"bias.value must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 1 or value.shape[0] != bias.nnz:
        raise ValueError(f"bias.value must have shape ({bias.nnz},) (one value per entry), got {tuple(value.shape)}")
    if value.device != bias.device:
        raise ValueError(f"bias.value is on {value.device} but the bias's indices are on {bias.device}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"bias values must be floating point, got {value.dtype}")


# ---- routing trie (SPEC 5, issue 5) -------------------------------------------------------------

MAX_ROUTING_EXPERTS = 32767   # int16 expert ids in the trie
MAX_ROUTING_LAYERS = 32767
MAX_ROUTING_DEPTH = 255
MAX_ROUTING_STEP = 2**31 - 1  # int32 first_seen / last_seen


def check_routing_paths(paths, *, num_layers: int, num_experts: int, device: torch.device) -> torch.Tensor:
    """paths: integer [N, num_layers] on `device`, every entry in [-1, num_experts)."""
    check_tensor("paths", paths, ndim=2, integer=True)
    if paths.shape[1] != num_layers:
        raise ValueError(f"paths must have shape [N, {num_layers}] (one column per layer), got {tuple(paths.shape)}")
    check_not_meta("paths", paths)
    if paths.device != device:
        raise ValueError(f"paths is on {paths.device} but the routing tree is on {device}")
    if paths.numel():
        lo, hi = _min_max("paths", paths)
        if lo < -1 or hi >= num_experts:
            raise ValueError(f"paths entries must be expert ids in [0, {num_experts}) or -1 (no routing), "
                             f"got values in [{lo}, {hi}]")
    return paths


def check_routing_rewards(rewards, *, num_tokens: int, device: torch.device):
    """rewards: None or a finite floating [num_tokens] tensor on `device`."""
    if rewards is None:
        return None
    check_tensor("rewards", rewards, ndim=1, floating=True)
    if rewards.shape[0] != num_tokens:
        raise ValueError(f"rewards must have shape [{num_tokens}] (one per path), got {tuple(rewards.shape)}")
    check_not_meta("rewards", rewards)
    if rewards.device != device:
        raise ValueError(f"rewards is on {rewards.device} but the routing tree is on {device}")
    check_finite("rewards", rewards)
    return rewards


def check_routing_step(name: str, step) -> int:
    """A training step that fits the trie's int32 first_seen / last_seen."""
    return check_int(name, step, low=0, high=MAX_ROUTING_STEP)


# ---- salience capture (SPEC 3, issue 4) ---------------------------------------------------------

MAX_CAPTURE_CAPACITY = 2**31 - 2   # slots are addressed by int32 (one extra dump slot)


def check_capture_threshold(value) -> float:
    """The capture threshold: a finite float >= 0 (edges with S > threshold are kept)."""
    return check_float("threshold", value, low=0.0)


def check_capture_capacity(value) -> int:
    """The capture's edge-buffer size: an int in [1, 2^31 - 2] (bools rejected)."""
    if isinstance(value, bool):
        raise TypeError("capacity must be an int, got bool")
    return check_int("capacity", value, low=1, high=MAX_CAPTURE_CAPACITY)


def check_capture_fill_inputs(q, k, v, lse, dout, bias) -> None:
    """What a backward hands SalienceCapture._fill: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] as
    attention takes them, lse float [B, Hq, Tq], dout like q, bias None or a TraceBias built for
    Hq heads. Shape and device checks only (no device sync)."""
    check_attention_inputs(q, k, v, scale=None, alpha=0.0)
    B, Hq, Tq, D = q.shape
    check_tensor("lse", lse, ndim=3, floating=True)
    if tuple(lse.shape) != (B, Hq, Tq):
        raise ValueError(f"lse must have shape {(B, Hq, Tq)}, got {tuple(lse.shape)}")
    check_tensor("dout", dout, ndim=4, floating=True)
    if dout.shape != q.shape:
        raise ValueError(f"dout must have q's shape {tuple(q.shape)}, got {tuple(dout.shape)}")
    check_same_device(q=q, lse=lse, dout=dout)
    if bias is not None:
        if not all(hasattr(bias, name) for name in ("entry_coords", "src_entry", "num_heads")):
            raise TypeError(f"bias must be a memtrace.TraceBias or None, got {type(bias).__name__}")
        if bias.num_heads != Hq:
            raise ValueError(f"bias must be built for {Hq} query heads, got num_heads={bias.num_heads}")
        if bias.device != q.device:
            raise ValueError(f"bias is on {bias.device} but q is on {q.device}; all inputs must be on one device")


def check_alpha(alpha, q) -> None:
    """alpha: a finite float, or a 0-d floating tensor on q's device that does not require grad
    (a tensor is not read on the host: no NaN check, no sync)."""
    if not isinstance(alpha, torch.Tensor):
        check_float("alpha", alpha)
        return
    if alpha.dim() != 0 or not alpha.is_floating_point():
        raise TypeError(f"alpha must be a float or a 0-d floating-point tensor, got a {alpha.dtype} tensor of "
                        f"shape {tuple(alpha.shape)}")
    if alpha.device != q.device:
        raise ValueError(f"alpha is on {alpha.device} but q is on {q.device}; a tensor alpha must be on q's device")
    if alpha.requires_grad:
        raise ValueError("alpha must not require grad: biased_attention treats a tensor alpha as a constant "
                         "(pass alpha.detach())")


def check_key_padding_mask(mask, q, k) -> None:
    """key_padding_mask: a bool tensor [B, Tk] on q's device (True = attend), like the 2-D
    attention_mask of transformers after .bool(); integer and float masks are refused (SDPA reads a
    float mask as additive, so 0/1 floats would be ambiguous)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor [B, Tk] or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must have dtype torch.bool (True = attend), got {mask.dtype}; "
                        "convert a 0/1 attention_mask with .bool()")
    want = (q.shape[0], k.shape[2])
    if tuple(mask.shape) != want:
        raise ValueError(f"key_padding_mask must have shape [B, Tk] = {list(want)}, got {list(mask.shape)}")
    if mask.device != q.device:
        raise ValueError(f"key_padding_mask is on {mask.device} but q is on {q.device}; it must be on q's device")


def dataclass_from_dict(cls, d, name: str):
    """cls(**d) for a settings dataclass, refusing a non-dict (TypeError) and keys that are not
    its fields (ValueError, listing the known ones); absent fields take their defaults."""
    import dataclasses
    if not isinstance(d, dict):
        raise TypeError(f"{name} must be a dict, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in d if k not in names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {unknown}; known keys: {sorted(names)}")
    return cls(**d)
