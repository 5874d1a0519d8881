"""Hugging Face transformers integration (SPEC 9): a model trains with a memtrace manager attached.

    import memtrace as mt
    from memtrace.integrations import hf
    mgr = mt.Memtrace(cfg.num_hidden_layers, cfg.num_attention_heads)
    handle = hf.attach(model, mgr)          # attention + mask through transformers' registries, routers
    loss = model(**batch).loss + mgr.aux_loss()
    loss.backward(); opt.step(); mgr.step(); opt.zero_grad()
    handle.detach()                          # the model is what it was before attach

`attach(model, mgr)`
    1. finds the model's attention modules (those whose forward calls transformers'
       `ALL_ATTENTION_FUNCTIONS`), reads each one's `layer_idx`, and checks, before changing
       anything, that memtrace computes them exactly: no sliding window, no logit soft-capping,
       no attention dropout, no cross-attention, a supported head dim, layer indices within the
       manager's. Anything else is a ValueError naming the module and the reason.
    2. registers "memtrace" in `transformers.AttentionInterface` (the attention function below)
       and in `transformers.masking_utils.AttentionMaskInterface` (the mask function below), once
       per process (the registries are global; the names stay registered after detach);
    3. attaches the routers of its mixture-of-experts blocks, if any
       (`memtrace.integrations.moe.attach_routers`: top-1 paths recorded by forward hooks that do
       not change the outputs);
    4. switches the model with `model.set_attn_implementation("memtrace")`.
    `handle.detach()` removes the router hooks, unbinds the modules and restores every config's
    attention implementation exactly as it was: parameters, buffers, hooks and configs are then
    those of before attach (the registry entries are left: they are inert without the switch).

How padding and the KV cache reach memtrace
    The mask function receives what `create_causal_mask` prepared (the 2-D padding mask, the
    query length and offset, the key length and offset) and returns what the attention function
    receives as `attention_mask`, in the convention of transformers' FlashAttention path:
      - None: no padding, and the keys are exactly positions 0 .. last query (training, prefill,
        decoding with a DynamicCache); the attention function then calls memtrace with
        `key_padding_mask=None`, `causal=module.is_causal`;
      - a [B, L] bool tensor (True = attend) of the keys' padding, where L = the number of keys up
        to the last query's position. L < the keys' length happens with a StaticCache (slots past
        the current position are empty): the attention function cuts k and v to their first L
        positions. It becomes `key_padding_mask`.
    memtrace's causal mask is bottom-right aligned (key j is masked when j > i + Tk - Tq). With
    the keys cut to L = q_offset + Tq - kv_offset, query i (at position q_offset + i) sees key j
    (at kv_offset + j) exactly when kv_offset + j <= q_offset + i: transformers' causal mask. A
    decode step (Tq = 1) therefore sees every cached key, left padding is the key padding mask of
    every step, and a padded query row attends to nothing and gives 0 (sdpa gives 0 too; those
    positions are padding and nobody reads them).
    Masks memtrace cannot express are refused loudly, never approximated: a custom 4-D mask, a
    packed-sequence mask (position_ids restarting inside a row without an attention_mask),
    sliding-window, chunked or or/and-combined mask functions. Models that always build a
    sliding mask next to the causal one (Qwen2-MoE) are fine as long as no layer uses it.

Training with `transformers.Trainer`
    `MemtraceCallback(mgr)` calls `mgr.step()` after each optimizer step, adds `mgr.metrics()` to
    the logs and saves / loads the manager beside checkpoints; `MemtraceTrainer(..., memtrace=mgr)`
    is a Trainer that also adds `mgr.aux_loss()` to the training loss (its `compute_loss`) and
    puts the metrics into the logs before every reporting integration sees them.

Saving beside `save_pretrained`: `save_memtrace(model_dir, mgr)` writes
`<model_dir>/memtrace.safetensors`; `load_memtrace(model_dir)` returns a manager from it, or
`load_memtrace(model_dir, mgr)` loads it into `mgr`.
"""
from __future__ import annotations

import inspect
import os
import warnings

import torch

try:
    import transformers
    from transformers import AttentionInterface, PreTrainedConfig, PreTrainedModel, Trainer, TrainerCallback
    from transformers.masking_utils import (
        AttentionMaskInterface,
        bidirectional_mask_function,
        causal_mask_function,
    )
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
except ImportError as exc:   # transformers missing, or a version without these interfaces
    raise ImportError("memtrace.integrations.hf needs Hugging Face transformers >= 5.17: "
                      "pip install memtrace[hf]") from exc

from .._validate import HEAD_DIMS
from . import moe

__all__ = ["ATTN_IMPLEMENTATION", "MEMTRACE_FILE", "MemtraceCallback", "MemtraceHandle", "MemtraceTrainer",
           "attach", "attention_modules", "load_memtrace", "memtrace_attention_forward", "memtrace_mask",
           "save_memtrace"]

ATTN_IMPLEMENTATION = "memtrace"
MEMTRACE_FILE = "memtrace.safetensors"
_BINDING = "_memtrace_binding"      # the attribute an attached attention module carries (in its __dict__)
_MIN_VERSION = (5, 17)


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


if _version_tuple(transformers.__version__) < _MIN_VERSION:
    raise ImportError(f"memtrace.integrations.hf needs transformers >= 5.17, found {transformers.__version__}: "
                      "pip install -U memtrace[hf]")


# ---- the mask function --------------------------------------------------------------------------

class UnsupportedMask:
    """What the mask function returns for a mask memtrace cannot express. Models build some masks
    that no layer uses (Qwen2-MoE makes a sliding-window mask beside the causal one); the error
    is raised by the attention function, only if a layer receives one."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self):
        return f"UnsupportedMask({self.reason!r})"


def _mask_function_names(fn, depth=0) -> list:
    """Qualified names of a mask function and of the mask functions it combines (and_masks /
    or_masks keep them in their closure)."""
    names = [getattr(fn, "__qualname__", None) or type(fn).__name__]
    for cell in (getattr(fn, "__closure__", None) or ()) if depth < 4 else ():
        try:
            content = cell.cell_contents
        except ValueError:       # an empty cell
            continue
        for item in content if isinstance(content, (tuple, list)) else (content,):
            if callable(item) and not isinstance(item, (torch.Tensor, type)):
                names += _mask_function_names(item, depth + 1)
    return names


_MASK_KINDS = (("sliding", "a sliding-window mask"), ("chunk", "a chunked-attention mask"),
               ("packed", "a packed-sequence mask (position_ids restarting inside a row without an "
                          "attention_mask: pass an attention_mask, or unpack the sequences)"),
               ("blockwise", "a block overlay mask (bidirectional blocks, e.g. image tokens)"))


def _describe_mask_function(fn) -> str:
    names = " ".join(_mask_function_names(fn))
    kinds = [what for key, what in _MASK_KINDS if key in names]
    if kinds:
        return " and ".join(kinds)
    return f"a custom mask function ({names})"


def memtrace_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, device=None, **kwargs):
    """The "memtrace" entry of transformers' AttentionMaskInterface.

    Returns None (no padding, keys = positions 0 .. last query), a [B, L] bool key padding mask
    (True = attend; L = keys up to the last query's position), or an UnsupportedMask. The module
    docstring explains why this is exactly transformers' mask."""
    if mask_function is causal_mask_function:
        causal = True
    elif mask_function is bidirectional_mask_function:
        causal = False
    else:
        return UnsupportedMask(f"memtrace takes a causal or bidirectional attention with a key padding mask, "
                               f"not {_describe_mask_function(mask_function)}")
    n_keys = kv_length
    if causal:
        n_keys = q_offset + q_length - kv_offset
        if isinstance(n_keys, torch.Tensor):        # a StaticCache's offset is a tensor: one host sync
            n_keys = int(n_keys)
        if not 1 <= n_keys <= kv_length:
            return UnsupportedMask(f"the queries (offset {int(q_offset)}, length {q_length}) end outside the "
                                   f"keys (offset {int(kv_offset)}, length {kv_length}): a sliding or "
                                   "rolling cache, which memtrace does not take")
    if attention_mask is None:
        if n_keys == kv_length:
            return None
        return torch.ones(batch_size, n_keys, dtype=torch.bool, device=device)
    if attention_mask.ndim != 2:     # 4-D masks leave create_causal_mask before reaching this function
        return UnsupportedMask(f"memtrace takes a 2-D padding mask, got a {attention_mask.ndim}-D one")
    padding = attention_mask.to(dtype=torch.bool)
    end = kv_offset + n_keys
    if padding.shape[-1] < end:      # positions past the mask are empty cache slots (as transformers pads)
        padding = torch.nn.functional.pad(padding, (0, end - padding.shape[-1]), value=False)
    padding = padding[:, kv_offset:end]
    # No padding: None, so the attention runs without a mask (one host sync, as transformers'
    # sdpa and flash mask functions do; skipped while compiling, where the mask is kept).
    if n_keys == kv_length and not torch.compiler.is_compiling() and bool(padding.all()):
        return None
    return padding


# ---- the attention function ---------------------------------------------------------------------

# Keyword arguments some models pass to the attention function for features memtrace does not have;
# an error when set (None means "off" for all of them).
_UNSUPPORTED_KWARGS = {
    "sliding_window": "sliding-window attention",
    "softcap": "attention logit soft-capping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "position_bias": "an additive position bias",
    "head_mask": "a head mask",
    "cu_seq_lens_q": "packed sequences (cu_seqlens)",
    "cu_seq_lens_k": "packed sequences (cu_seqlens)",
}


class _Binding:
    """What an attached attention module carries: its handle and layer index. Shared, not copied,
    by copy.deepcopy (a deep copy of an attached model uses the same manager)."""

    __slots__ = ("handle", "layer")

    def __init__(self, handle, layer):
        self.handle = handle
        self.layer = layer

    def __deepcopy__(self, memo):
        return self


def memtrace_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The "memtrace" entry of transformers' AttentionInterface.

    query [B, Hq, Tq, D], key / value [B, Hkv, Tk, D] (Hkv < Hq taken as is: no repeat_kv);
    attention_mask: what `memtrace_mask` returned. Calls `mgr.attention(layer, q, k, v,
    causal=..., key_padding_mask=..., scale=scaling)` and returns (out [B, Tq, Hq, D], None)."""
    binding = getattr(module, _BINDING, None)
    if binding is None:
        raise RuntimeError(f"{type(module).__name__} runs with attn_implementation='memtrace' but is not "
                           "attached to a memtrace manager: call memtrace.integrations.hf.attach(model, mgr)")
    if dropout:
        raise ValueError(f"memtrace attention has no dropout, but {type(module).__name__} (layer {binding.layer}) "
                         f"asks for dropout={dropout}: set config.attention_dropout = 0 and the module's "
                         "attention_dropout = 0")
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"memtrace attention does not support {what} (`{name}` passed by "
                             f"{type(module).__name__}, layer {binding.layer})")
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)

    key_padding_mask = None
    if isinstance(attention_mask, UnsupportedMask):
        raise ValueError(f"{attention_mask.reason} (layer {binding.layer})")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2:
            shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
            raise ValueError(f"memtrace attention got an attention mask of shape {shape} (layer {binding.layer}): it "
                             "takes a key padding mask, so pass a 2-D attention_mask [batch, keys] to the model, "
                             "not a prepared 4-D mask")
        n_keys = attention_mask.shape[-1]
        if n_keys > key.shape[2]:
            raise ValueError(f"the padding mask covers {n_keys} keys, but layer {binding.layer} has {key.shape[2]}")
        if n_keys < key.shape[2]:                    # a StaticCache: the slots past the last query are empty
            key, value = key[:, :, :n_keys], value[:, :, :n_keys]
        key_padding_mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask.bool()

    d_v = value.shape[-1]
    if d_v != query.shape[-1]:                       # DeepSeek-style: values narrower than q and k
        if d_v > query.shape[-1]:
            raise ValueError(f"memtrace attention needs the values' head dim ({d_v}) <= the queries' "
                             f"({query.shape[-1]}) (layer {binding.layer})")
        value = torch.nn.functional.pad(value, (0, query.shape[-1] - d_v))
    out = binding.handle.mgr.attention(binding.layer, query, key, value, causal=causal,
                                       key_padding_mask=key_padding_mask, scale=scaling)
    if d_v != query.shape[-1]:
        out = out[..., :d_v]
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    """Register the attention and mask functions (global, class-level registries; idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, memtrace_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, memtrace_mask)


# ---- finding and checking the attention modules -------------------------------------------------

_USES_INTERFACE: dict = {}


def _uses_attention_interface(cls) -> bool:
    """Whether `cls.forward` dispatches through transformers' ALL_ATTENTION_FUNCTIONS (cached)."""
    if cls not in _USES_INTERFACE:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        _USES_INTERFACE[cls] = "ALL_ATTENTION_FUNCTIONS" in source
    return _USES_INTERFACE[cls]


def attention_modules(model) -> list:
    """[(qualified name, module)] of the attention modules of `model`: the modules (not models)
    whose forward calls transformers' attention interface, in `named_modules` order."""
    return [(name, m) for name, m in model.named_modules()
            if not isinstance(m, PreTrainedModel) and _uses_attention_interface(type(m))]


def _config_of(module, model):
    return getattr(module, "config", None) or model.config


def _problems(name, module, model) -> list:
    """Why memtrace cannot compute this attention module exactly ([] when it can)."""
    cfg = _config_of(module, model)
    out = []
    layer = getattr(module, "layer_idx", None)
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        out.append(f"it has no integer layer_idx (got {layer!r}); memtrace keeps its memory per layer")
    window = getattr(module, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if window:
        out.append(f"it uses sliding-window attention (sliding_window={window})")
    elif isinstance(layer, int) and layer_types is not None and layer < len(layer_types) \
            and layer_types[layer] != "full_attention":
        out.append(f"its layer type is {layer_types[layer]!r}, memtrace computes 'full_attention' only")
    elif layer_types is None and getattr(cfg, "sliding_window", None):
        out.append(f"the config asks for sliding-window attention (sliding_window={cfg.sliding_window}); "
                   "set config.sliding_window = None if your sequences never exceed the window")
    softcap = getattr(module, "softcap", None) or getattr(cfg, "attn_logit_softcapping", None)
    if softcap:
        out.append(f"it soft-caps its attention logits (softcap={softcap})")
    dropout = getattr(module, "attention_dropout", getattr(cfg, "attention_dropout", 0.0))
    if isinstance(dropout, (int, float)) and dropout > 0:
        out.append(f"it has attention dropout {dropout}; set config.attention_dropout = 0 "
                   "(and the module's attention_dropout) before attach")
    if getattr(module, "is_cross_attention", False) or getattr(cfg, "is_encoder_decoder", False) \
            or getattr(cfg, "add_cross_attention", False):
        out.append("it is (or sits in a model with) cross-attention / encoder-decoder attention, "
                   "which memtrace does not take")
    d_qk = getattr(module, "qk_head_dim", None) or getattr(module, "head_dim", None)
    d_v = getattr(module, "v_head_dim", d_qk)
    if isinstance(d_qk, int) and d_qk not in HEAD_DIMS:
        out.append(f"its head dim {d_qk} is not one memtrace computes ({', '.join(map(str, HEAD_DIMS))})")
    elif isinstance(d_qk, int) and isinstance(d_v, int) and d_v > d_qk:
        out.append(f"its values' head dim {d_v} exceeds the queries' {d_qk}")
    return [f"{name} ({type(module).__name__}): {p}" for p in out]


def _num_heads(module, model):
    cfg = _config_of(module, model)
    for holder, attr in ((module, "num_heads"), (module, "num_attention_heads"), (cfg, "num_attention_heads")):
        value = getattr(holder, attr, None)
        if isinstance(value, int):
            return value
    return None


def _configs(model) -> list:
    """Every config object of the model whose attention implementation set_attn_implementation
    may change: the model's, its sub-models', and their sub_configs (recursively)."""
    found, stack = {}, [model.config]
    stack += [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while stack:
        cfg = stack.pop()
        if not isinstance(cfg, PreTrainedConfig) or id(cfg) in found:
            continue
        found[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", None) or {}:
            stack.append(getattr(cfg, key, None))
    return list(found.values())


_MISSING = object()
_CONFIG_ATTRS = ("_attn_implementation_internal", "_attn_was_changed")


# ---- attach / detach ----------------------------------------------------------------------------

class MemtraceHandle:
    """What `attach` returns. `layers`: {module name: layer index}; `routers`: the MoE attachment
    (`memtrace.integrations.moe.attach_routers`'s handle) or None; `detach()` restores the model
    (idempotent); also a context manager (`with hf.attach(model, mgr): ...` detaches at exit)."""

    def __init__(self, model, mgr, modules, config_snapshot):
        self.model = model
        self.mgr = mgr
        self.layers = {name: m.layer_idx for name, m in modules}
        self.routers = None
        self._modules = [m for _, m in modules]
        self._config_snapshot = config_snapshot
        self.attached = False

    def detach(self) -> None:
        if not self.attached:
            return
        self.attached = False
        errors = []
        if self.routers is not None:
            try:
                self.routers.detach()
            except Exception as exc:   # keep restoring the rest; re-raised below
                errors.append(exc)
            self.routers = None
        for m in self._modules:
            m.__dict__.pop(_BINDING, None)
        for cfg, saved in self._config_snapshot:
            for attr, value in zip(_CONFIG_ATTRS, saved):
                if value is _MISSING:
                    cfg.__dict__.pop(attr, None)
                else:
                    cfg.__dict__[attr] = value
        self.model.__dict__.pop(_BINDING, None)
        if errors:
            raise errors[0]

    def __deepcopy__(self, memo):      # a deep copy of an attached model shares its handle and manager
        return self

    def save(self, model_dir) -> str:
        """save_memtrace(model_dir, self.mgr)."""
        return save_memtrace(model_dir, self.mgr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()
        return False

    def __repr__(self):
        state = "attached" if self.attached else "detached"
        return (f"MemtraceHandle({type(self.model).__name__}, {len(self.layers)} attention layers, "
                f"routers={'yes' if self.routers is not None else 'no'}, {state})")


def attach(model, mgr) -> MemtraceHandle:
    """Route `model`'s attention (and its padding) through `mgr`, record its MoE routing; returns a
    handle whose `detach()` restores the model. See the module docstring for the steps.

    ValueError, with the model untouched, when the model has no attention modules using
    transformers' attention interface, or one memtrace cannot compute exactly (sliding window,
    soft-capping, dropout, cross-attention, unsupported head dim, no layer_idx), or the layers or
    heads do not fit the manager, or the model is already attached."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if not callable(getattr(mgr, "attention", None)):
        raise TypeError(f"mgr must be a memtrace.Memtrace (with an attention method), got {type(mgr).__name__}")
    if getattr(model, _BINDING, None) is not None:
        raise ValueError(f"{type(model).__name__} is already attached to a memtrace manager: detach it first")

    # 1. check everything before changing anything
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention layers that use transformers' "
                         "AttentionInterface (modules whose forward calls ALL_ATTENTION_FUNCTIONS): "
                         "memtrace has nothing to attach to")
    can_set = getattr(type(model), "_can_set_attn_implementation", None)     # transformers' own check
    if can_set is not None and not can_set():
        raise ValueError(f"{type(model).__name__} cannot switch its attention implementation "
                         "(transformers: it does not follow the AttentionInterface)")
    problems = [p for name, m in modules for p in _problems(name, m, model)]
    if problems:
        raise ValueError("memtrace cannot attach to " + type(model).__name__ + ":\n  " + "\n  ".join(problems))
    seen = {}
    for name, m in modules:
        if m.layer_idx in seen:
            problems.append(f"{name} and {seen[m.layer_idx]} share layer_idx {m.layer_idx}")
        seen[m.layer_idx] = name
    num_layers = getattr(mgr, "num_layers", None)
    if isinstance(num_layers, int):
        problems += [f"{name} has layer_idx {m.layer_idx}, the manager has {num_layers} layers"
                     for name, m in modules if m.layer_idx >= num_layers]
    num_heads = getattr(mgr, "num_heads", None)
    if isinstance(num_heads, int):
        for name, m in modules:
            heads = _num_heads(m, model)
            if heads is not None and heads != num_heads:
                problems.append(f"{name} has {heads} query heads, the manager {num_heads}")
    moe_scan = moe.find_moe_blocks(model)
    if moe_scan.skipped:     # attach_routers(strict=True) would refuse them
        problems.append("its mixture-of-experts blocks cannot be read: " + moe_scan.describe().replace("\n", "\n  "))
    if len(moe_scan) and hasattr(mgr, "num_experts"):
        experts = sorted({blk.num_experts for blk in moe_scan})
        if mgr.num_experts is None or experts != [mgr.num_experts]:
            problems.append(f"its mixture-of-experts blocks have {', '.join(map(str, experts))} experts, the manager "
                            f"num_experts={mgr.num_experts}")
    if problems:
        hint = ""
        if isinstance(num_layers, int) and isinstance(num_heads, int):
            heads = {_num_heads(m, model) for _, m in modules} - {None}
            hint = (f"\n(build the manager for this model: mt.Memtrace(num_layers={len(modules)}, "
                    f"num_heads={min(heads) if len(heads) == 1 else num_heads}"
                    + (f", num_experts={sorted({blk.num_experts for blk in moe_scan})[0]}" if len(moe_scan) else "")
                    + ", ...))")
        raise ValueError("memtrace cannot attach to " + type(model).__name__ + ":\n  " + "\n  ".join(problems) + hint)

    # 2. change: registries, routers, attention implementation, bindings (undone on failure)
    _register()
    snapshot = [(cfg, tuple(cfg.__dict__.get(a, _MISSING) for a in _CONFIG_ATTRS)) for cfg in _configs(model)]
    handle = MemtraceHandle(model, mgr, modules, snapshot)
    handle.attached = True
    try:
        if len(moe_scan):
            handle.routers = moe.attach_routers(model, mgr)
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(f"{type(model).__name__} did not switch to attn_implementation='memtrace' "
                             f"(it kept {model.config._attn_implementation!r})")
        for _, m in modules:
            m.__dict__[_BINDING] = _Binding(handle, m.layer_idx)
        model.__dict__[_BINDING] = handle
    except BaseException:
        handle.detach()
        raise
    return handle


# ---- saving beside save_pretrained --------------------------------------------------------------

def _memtrace_path(model_dir) -> str:
    return os.path.join(os.fspath(model_dir), MEMTRACE_FILE)


def save_memtrace(model_dir, mgr) -> str:
    """Write the manager's whole state to `<model_dir>/memtrace.safetensors` (beside the files of
    `model.save_pretrained(model_dir)`; the directory is created if needed). Returns the path."""
    os.makedirs(os.fspath(model_dir), exist_ok=True)
    path = _memtrace_path(model_dir)
    mgr.save(path)
    return path


def load_memtrace(model_dir, mgr=None):
    """The manager saved in `<model_dir>/memtrace.safetensors`: a new `memtrace.Memtrace` when
    `mgr` is None, else loaded into `mgr` (whose shape must match; nothing half-loaded) and
    returned. FileNotFoundError naming the file when there is none."""
    path = _memtrace_path(model_dir)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no memtrace state in {os.fspath(model_dir)!r} (expected {path})")
    from ..training.manager import Memtrace
    if mgr is None:
        return Memtrace.load(path)
    mgr.load_file(path)
    return mgr


# ---- transformers.Trainer -----------------------------------------------------------------------

def _flat_metrics(metrics, prefix="memtrace/") -> dict:
    """mgr.metrics() as log entries: numbers and 0-d / one-element tensors as Python numbers,
    strings and enums as strings, nested dicts flattened with '/'; sequences (histograms) left out."""
    out = {}
    for key, value in (metrics or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_metrics(value, name + "/"))
        elif isinstance(value, torch.Tensor):
            if value.numel() == 1:
                out[name] = value.item()
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif hasattr(value, "name") and hasattr(type(value), "__members__"):     # an Enum (the phase)
            out[name] = value.name.lower()
    return out


class MemtraceCallback(TrainerCallback):
    """A `transformers.Trainer` callback driving a memtrace manager.

    Order within one Trainer step (transformers 5.17 `_inner_training_loop`): forward + backward
    for each micro-batch (`training_step`; the manager accumulates its capture over them) -> grad
    clipping -> on_pre_optimizer_step -> optimizer.step() -> **on_optimizer_step: `mgr.step()`**
    -> lr_scheduler.step() -> model.zero_grad() -> on_step_end -> logging (**on_log: the metrics**)
    -> saving (**on_save: `<checkpoint>/memtrace.safetensors`**). `mgr.step()` runs once per
    optimizer step, after every backward of it and while the gradients still exist (before
    zero_grad), so a manager that reads them (EWC's Fisher) sees them.

    Resuming: on_train_begin of a resumed run (state.global_step > 0) loads
    `<resume_from or output_dir/checkpoint-<global_step>>/memtrace.safetensors` into the manager
    (a warning when the checkpoint has none). `MemtraceTrainer` passes the exact checkpoint.

    The auxiliary loss is not a callback's business (a callback cannot change the loss): use
    `MemtraceTrainer`, or override `compute_loss` as it does. Metrics: on_log adds
    `mgr.metrics()` (keys `memtrace/...`) to the logs the later callbacks see (the progress bar
    and printer) and to `state.log_history`; reporting integrations (wandb, tensorboard, ...) run
    before user callbacks, so they get the metrics only through `MemtraceTrainer.log`.
    """

    def __init__(self, mgr, *, resume_from=None, log_metrics: bool = True, save: bool = True):
        self.mgr = mgr
        self.resume_from = resume_from
        self.log_metrics = log_metrics
        self.save = save
        self.last_step_metrics = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.mgr.distributed and _data_parallel():
            self.mgr.distribute()       # every rank's callback gets here: the exchange's setup is collective
        if state.global_step <= 0 and self.resume_from is None:
            return
        folder = self.resume_from or os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isfile(_memtrace_path(folder)):
            load_memtrace(folder, self.mgr)
        else:
            warnings.warn(f"resuming at step {state.global_step} without a memtrace state "
                          f"({_memtrace_path(folder)} is missing): the manager starts from its current state",
                          stacklevel=2)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.last_step_metrics = self.mgr.step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.log_metrics or logs is None or any(k.startswith("memtrace/") for k in logs):
            return
        if "loss" not in logs:          # evaluation / final summary logs: leave them as they are
            return
        extra = _flat_metrics(self.mgr.metrics())
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):
        if not self.save or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            save_memtrace(folder, self.mgr)
        else:
            warnings.warn(f"memtrace: no checkpoint folder {folder} to save the manager in", stacklevel=2)


def _data_parallel() -> bool:
    """Whether this process is one of several ranks of an initialised torch.distributed job."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class MemtraceTrainer(Trainer):
    """`transformers.Trainer` with memtrace: `MemtraceTrainer(model=model, memtrace=mgr, args=...,
    ...)`, the model attached to `mgr` beforehand (`hf.attach(model, mgr)`).

    - adds `mgr.aux_loss()` to the training loss (`compute_loss`), once per optimizer step's worth
      of micro-batches: divided by the gradient-accumulation steps exactly when the Trainer does
      not divide the loss itself (a model that takes `num_items_in_batch`);
    - adds a `MemtraceCallback(mgr)` (mgr.step, checkpoint save / resume) unless one is given;
    - `log` puts `mgr.metrics()` (keys `memtrace/...`) into the training logs before any callback
      or reporting integration sees them;
    - `train(resume_from_checkpoint=...)` loads the manager from that checkpoint.
    Evaluation losses are the model's own (no aux loss)."""

    def __init__(self, *args, memtrace=None, **kwargs):
        if memtrace is None or not callable(getattr(memtrace, "aux_loss", None)):
            raise TypeError("MemtraceTrainer needs memtrace=<a memtrace.Memtrace>")
        model = kwargs.get("model", args[0] if args else None)
        handle = getattr(model, _BINDING, None) if model is not None else None
        if handle is None or handle.mgr is not memtrace:
            raise ValueError("MemtraceTrainer: attach the model to this manager first "
                             "(memtrace.integrations.hf.attach(model, mgr))")
        self.memtrace = memtrace
        super().__init__(*args, **kwargs)
        callback = next((cb for cb in self.callback_handler.callbacks if isinstance(cb, MemtraceCallback)), None)
        if callback is None:
            callback = MemtraceCallback(memtrace)
            self.add_callback(callback)
        self._memtrace_callback = callback

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not (model.training and torch.is_grad_enabled()):
            return result
        loss, outputs = result if return_outputs else (result, None)
        aux = self.memtrace.aux_loss()
        trainer_divides = ((not self.model_accepts_loss_kwargs or num_items_in_batch is None)
                           and self.compute_loss_func is None)
        if not trainer_divides:
            aux = aux / self.current_gradient_accumulation_steps
        loss = loss + aux.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        if "loss" in logs and not any(k.startswith("memtrace/") for k in logs):
            logs = {**logs, **_flat_metrics(self.memtrace.metrics())}
        return super().log(logs, start_time)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        folder = resume_from_checkpoint
        if isinstance(folder, bool):
            folder = get_last_checkpoint(self.args.output_dir) if folder else None
        self._memtrace_callback.resume_from = os.fspath(folder) if folder is not None else None
        return super().train(resume_from_checkpoint, *args, **kwargs)
