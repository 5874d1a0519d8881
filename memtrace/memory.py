"""TraceMemory: persistent attention traces in fixed-capacity per-(layer, head) slabs (SPEC 4).

Slot layout (12 bytes a slot, history and age included)
-------------------------------------------------------
The state is two tensors, one element per slot, ``num_layers x num_heads x quota`` slots:

    strength  float32 [L, H, Q]   M_e >= 0 of a stored trace; -1.0 marks an empty slot
    meta      int64   [L, H, Q]   bit-packed (i, j), age and history of the trace (0 when empty)

``meta`` packs, from the least significant bit:

    bits [0, W)            hist   the last ``window`` = W capture steps, bit 0 = latest
    bits [W, W + A)        age    capture steps since the last reinforcement, saturating at 2^A - 1
    bits [W + A, 64)       pos    i * max_seq_len + j, P = max(1, bit_length(max_seq_len^2 - 1)) bits

    A = 64 - W - P  age bits.  At the defaults (max_seq_len 4096 -> P = 24, window 16) A = 24 and
    age saturates at 16,777,215 steps. Worst case (max_seq_len > 46340 -> P = 32, window 32) A = 0:
    age is not stored and reads 0. Age only feeds the read-out (``traces``); the update rule never
    reads it, so saturation never changes strengths, history or which traces are kept.

The head is the slab, so it costs no bits. Inside a slab the stored traces fill slots [0, n)
sorted by (i, j) ascending; slots [n, Q) are empty. This canonical order is what makes updates
deterministic, lets a candidate edge find its trace by binary search, and makes ``traces`` a
compaction. ``nbytes`` = 12 * L * H * Q exactly (the two tensors; nothing else is kept per slot).

Update (SPEC 4), per layer and head
-----------------------------------
Candidates are the capture's threshold edges plus the scores of the bias entries. When the bias
handed to attention came from ``bias(layer)`` of the current state, its COO order is the slot
order (heads x quota, empty slots as value-0 entries at (0, 0)), so ``capture.bias_scores`` map to
slots with no search. Any other bias is merged with the edges first (bias scores win on overlap).
Arithmetic is float64 and the eviction ranks this step's float64 strengths (ties: the smaller
(i, j) is kept), exactly as the reference does from the same stored values; strengths are then
stored as float32.

On CUDA the update runs as Triton kernels (``memtrace.kernels.trace_update``) with no host
synchronisation; on CPU as a vectorised PyTorch path with the same results. ``backend`` ("auto",
"triton", "torch") or the environment variable MEMTRACE_UPDATE_BACKEND forces one
("triton" on CPU needs TRITON_INTERPRET=1).
"""
from __future__ import annotations

import json
import math

import torch

from . import _validate as V
from . import config
from ._files import check_path, save_safetensors
from .bias import TraceBias

__all__ = ["FORMAT_VERSION", "TraceMemory"]

FORMAT_VERSION = 1
_FORMAT_NAME = "memtrace.TraceMemory"
MAX_QUOTA = 1 << 20
EMPTY_STRENGTH = -1.0
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_CONFIG_KEYS = ("num_layers", "num_heads", "quota", "retention", "decay", "threshold", "prune_eps",
                "attn_eps", "window", "max_seq_len")
_STRUCTURE_KEYS = ("num_layers", "num_heads", "quota", "window", "max_seq_len")
_BACKENDS = ("auto", "triton", "torch")
_INDEX_DTYPES = (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8)
_SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _as(t, dtype):
    """t in dtype (itself when it already is: no dispatcher call, host time per update)."""
    return t if t.dtype == dtype else t.to(dtype)


def _popcount(x: torch.Tensor) -> torch.Tensor:
    """Bits set in each element of an int64 tensor holding values in [0, 2^32)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


class TraceMemory:
    """Sparse per-(layer, head) memory of salient attention edges; see the module docstring."""

    def __init__(self, num_layers, num_heads, quota=2048, retention=0.95, decay=0.98, threshold=0.05,
                 prune_eps=1e-4, attn_eps=1e-3, window=16, max_seq_len=4096, device=None):
        cfg = _check_config(dict(num_layers=num_layers, num_heads=num_heads, quota=quota, retention=retention,
                                 decay=decay, threshold=threshold, prune_eps=prune_eps, attn_eps=attn_eps,
                                 window=window, max_seq_len=max_seq_len))
        device = V.check_device("device", device) if device is not None else torch.device("cpu")
        if device.type == "meta":
            raise ValueError("device must hold data: a TraceMemory cannot live on the meta device")
        self._set_config(cfg)
        shape = (self.num_layers, self.num_heads, self.quota)
        self.strength = torch.full(shape, EMPTY_STRENGTH, dtype=torch.float32, device=device)
        self.meta = torch.zeros(shape, dtype=torch.int64, device=device)
        self.backend = "auto"
        self._token = object()
        self._versions = [0] * self.num_layers
        self._direct_ones = {}

    # -- configuration -----------------------------------------------------------------------------
    def _set_config(self, cfg):
        for key in _CONFIG_KEYS:
            setattr(self, key, cfg[key])
        L = self.max_seq_len
        self.pos_bits = _pos_bits(L)
        self.age_bits = 64 - self.window - self.pos_bits
        self.age_max = (1 << self.age_bits) - 1
        self.hist_mask = (1 << self.window) - 1
        self.pos_shift = self.window + self.age_bits
        self.pos_mask = (1 << self.pos_bits) - 1

    def config(self) -> dict:
        """The constructor's hyper-parameters."""
        return {k: getattr(self, k) for k in _CONFIG_KEYS}

    @property
    def device(self) -> torch.device:
        return self.strength.device

    @property
    def nbytes(self) -> int:
        """Bytes of the state: 12 per slot (float32 strength + int64 packed position/age/history)."""
        return self.strength.numel() * self.strength.element_size() + self.meta.numel() * self.meta.element_size()

    def __repr__(self) -> str:
        return (f"TraceMemory(num_layers={self.num_layers}, num_heads={self.num_heads}, quota={self.quota}, "
                f"window={self.window}, max_seq_len={self.max_seq_len}, device={self.device})")

    # -- field access ------------------------------------------------------------------------------
    def _decode(self, strength, meta):
        """(valid, q_idx, k_idx, age, hist) of slots, int64."""
        valid = strength >= 0
        pos = (meta >> self.pos_shift) & self.pos_mask
        age = (meta >> self.window) & self.age_max if self.age_bits else torch.zeros_like(meta)
        return valid, pos // self.max_seq_len, pos % self.max_seq_len, age, meta & self.hist_mask

    def _all_direct(self, B):
        """bool [B] of True on the memory's device, kept between calls (read-only to the update:
        a fill launch less per call)."""
        key = (self.device, B)
        t = self._direct_ones.get(key)
        if t is None:
            t = self._direct_ones[key] = torch.ones(B, dtype=torch.bool, device=self.device)
        return t

    def _check_layer(self, layer) -> int:
        return V.check_int("layer", layer, low=0, high=self.num_layers - 1)

    # -- read-outs ---------------------------------------------------------------------------------
    def num_traces(self, layer=None) -> int:
        """Stored traces in one layer, or in all layers (one host sync)."""
        if layer is None:
            return int((self.strength >= 0).sum())
        return int((self.strength[self._check_layer(layer)] >= 0).sum())

    def traces(self, layer):
        """(head, q_idx, k_idx, strength, age, recurrence) of a layer's stored traces, sorted by
        (head, q_idx, k_idx): int64 except strength (float32). One host sync (the count)."""
        layer = self._check_layer(layer)
        st, mt = self.strength[layer], self.meta[layer]
        valid, q, k, age, hist = self._decode(st, mt)
        head = torch.arange(self.num_heads, device=self.device).view(-1, 1).expand_as(st)
        return (head[valid], q[valid], k[valid], st[valid].clone(), age[valid], _popcount(hist[valid]))

    def reference_state(self, layer):
        """The layer as a `memtrace.reference.memory` state dict (float64 strength, raw history)."""
        layer = self._check_layer(layer)
        st, mt = self.strength[layer], self.meta[layer]
        valid, q, k, age, hist = self._decode(st, mt)
        head = torch.arange(self.num_heads, device=self.device).view(-1, 1).expand_as(st)
        return {"head": head[valid], "q_idx": q[valid], "k_idx": k[valid], "strength": st[valid].double(),
                "age": age[valid], "hist": hist[valid]}

    def bias(self, layer) -> TraceBias:
        """The layer's traces as a TraceBias (values = strengths), built on the device with no host
        round trip. Its COO order is the slot order: heads x quota entries, an empty slot being a
        value-0 entry at (max_seq_len, 0), a row no trace can hold (the bias is built for
        max_seq_len + 1 query rows of its index), so it adds nothing to attention (exp(0) - 1 = 0)
        and never hides a real edge from the capture's threshold edges. Its stated shape is
        [num_heads, max_seq_len, max_seq_len] (to_dense, seq_len_q): the padding row is internal."""
        layer = self._check_layer(layer)
        st, mt = self.strength[layer], self.meta[layer]
        valid, q, k, _, _ = self._decode(st, mt)
        zero = torch.zeros((), dtype=torch.int64, device=self.device)
        empty_row = torch.full((), self.max_seq_len, dtype=torch.int64, device=self.device)
        head = torch.arange(self.num_heads, device=self.device).repeat_interleave(self.quota)
        bias = TraceBias(head, torch.where(valid, q, empty_row).reshape(-1), torch.where(valid, k, zero).reshape(-1),
                         torch.where(valid, st, torch.zeros((), device=self.device)).reshape(-1),
                         num_heads=self.num_heads, seq_len_q=self.max_seq_len, seq_len_k=self.max_seq_len,
                         _index_rows=self.max_seq_len + 1)
        bias._memtrace_source = (self._token, layer, self._versions[layer])
        return bias

    def _is_own_bias(self, bias, layer) -> bool:
        return getattr(bias, "_memtrace_source", None) == (self._token, layer, self._versions[layer])

    # -- updates -----------------------------------------------------------------------------------
    def update(self, layer, capture, *, validate=None):
        """One SPEC 4 update of `layer` from a SalienceCapture filled by a backward pass.

        validate: also check the capture's values (finite scores, indices in range), which costs a
        host sync; default: only for CPU tensors. Unchecked values are still safe: the kernels
        ignore candidates that are non-finite or out of range.
        """
        layer = self._check_layer(layer)
        inputs = self._capture_inputs(layer, capture, "capture", validate)
        self._run([layer], *(t.unsqueeze(0) for t in inputs[:5]), inputs[5].reshape(1),
                  *(t.unsqueeze(0) for t in inputs[6:]))

    def update_many(self, captures, *, validate=None):
        """Update several layers at once (one batched launch): `captures` maps layer -> capture
        (a dict), or is a sequence whose item l belongs to layer l. Every capture is checked
        before any layer changes."""
        if isinstance(captures, dict):
            items = list(captures.items())
        elif isinstance(captures, (list, tuple)):
            items = list(enumerate(captures))
        else:
            raise TypeError(f"captures must be a dict layer -> capture or a sequence, got {type(captures).__name__}")
        if not items:
            return
        layers = [self._check_layer(layer) for layer, _ in items]
        if len(set(layers)) != len(layers):
            raise ValueError("captures must name each layer at most once")
        prepared = [self._capture_inputs(layer, cap, f"captures[{layer}]", validate) for layer, cap in items]
        C = max(p[0].shape[0] for p in prepared)

        def pad(t, fill):
            return torch.cat([t, t.new_full((C - t.shape[0],), fill)]) if t.shape[0] < C else t

        fills = (-1, 0, 0, 0.0, 0.0)
        edges = [torch.stack([pad(p[n], fills[n]) for p in prepared]) for n in range(5)]
        num_edges = torch.stack([p[5].reshape(()) for p in prepared])
        slot_S = torch.stack([p[6] for p in prepared])
        slot_a = torch.stack([p[7] for p in prepared])
        direct = torch.stack([p[8] for p in prepared])
        self._run(layers, *edges, num_edges, slot_S, slot_a, direct)

    def update_edges(self, layers, head, q_idx, k_idx, salience, attn, *, num_edges=None,
                     trace_salience=None, trace_attn=None, validate=None):
        """Batched low-level update of `layers` (a list of distinct layer indices, length B).

        head, q_idx, k_idx: int [B, C]; salience, attn: float [B, C] - candidate edges of each layer
        (unique per layer; entries at or past num_edges[b] are ignored). num_edges: int [B] device
        tensor (default: all C). trace_salience, trace_attn: float [B, H, Q] - scores of the stored
        slots in slot order (what `capture.bias_scores` holds for a bias from `bias(layer)`); edges
        that are stored traces then keep these scores. Without them stored traces take their
        scores from matching edges (else 0). No host sync on CUDA.

        validate: as in `update` (default: only for CPU tensors): num_edges in [0, C], indices in
        range, finite scores (in float32) and each (head, q_idx, k_idx) at most once a layer.
        """
        if not isinstance(layers, (list, tuple)) or not layers:
            raise TypeError("layers must be a non-empty list of layer indices")
        if set(map(type, layers)) == {int} and 0 <= min(layers) and max(layers) < self.num_layers:
            layers = list(layers)     # the common case, checked in C loops (host time)
        else:
            layers = [self._check_layer(layer) for layer in layers]
        if len(set(layers)) != len(layers):
            raise ValueError("layers must be distinct")
        B = len(layers)
        device = self.strength.device
        named = (("head", head), ("q_idx", q_idx), ("k_idx", k_idx), ("salience", salience), ("attn", attn))
        # the checks cost host time ahead of the update's first kernel: one pass for the common
        # case (exact tensors of the expected dtypes on the memory's device), the full checks else
        fast = all(type(t) is torch.Tensor for _, t in named)
        if fast:
            fast = (head.dtype in _INDEX_DTYPES and q_idx.dtype in _INDEX_DTYPES and k_idx.dtype in _INDEX_DTYPES
                    and salience.dtype in _SCORE_DTYPES and attn.dtype in _SCORE_DTYPES)
        if not fast:
            for name, t in named[:3]:
                V.check_tensor(name, t, ndim=2, integer=True)
            for name, t in named[3:]:
                V.check_tensor(name, t, ndim=2, floating=True)
        shape = head.shape
        if len(shape) != 2:
            raise ValueError(f"head must have 2 dimensions, got shape {tuple(shape)}")
        if shape[0] != B:
            raise ValueError(f"head must have shape {(B, shape[1])}, got {tuple(shape)}")
        C = shape[1]
        for name, t in named:
            if t.shape != shape:
                raise ValueError(f"{name} must have shape {(B, C)}, got {tuple(t.shape)}")
            if t.device != device:
                self._check_device(name, t)
        if num_edges is None:
            num_edges = torch.full((B,), C, dtype=torch.int32, device=device)
        else:
            V.check_tensor("num_edges", num_edges, ndim=1, integer=True)
            if num_edges.shape[0] != B:
                raise ValueError(f"num_edges must have shape {(B,)}, got {tuple(num_edges.shape)}")
            self._check_device("num_edges", num_edges)
        if (trace_salience is None) != (trace_attn is None):
            raise ValueError("trace_salience and trace_attn must be given together")
        shape = (B, self.num_heads, self.quota)
        if trace_salience is None:
            slot_S = torch.zeros(shape, dtype=torch.float32, device=self.device)
            slot_a = torch.zeros(shape, dtype=torch.float32, device=self.device)
            direct = torch.zeros(B, dtype=torch.bool, device=self.device)
        else:
            for name, t in (("trace_salience", trace_salience), ("trace_attn", trace_attn)):
                V.check_tensor(name, t, floating=True)
                if tuple(t.shape) != shape:
                    raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
                self._check_device(name, t)
            slot_S, slot_a = _as(trace_salience, torch.float32), _as(trace_attn, torch.float32)
            direct = self._all_direct(B)
        if validate is None:
            validate = self.device.type == "cpu"
        if validate:
            counts = num_edges.tolist()
            for b, n in enumerate(counts):
                if not 0 <= n <= C:
                    raise ValueError(f"num_edges must be in [0, {C}], got {n} (row {b})")
            for b, n in enumerate(counts):
                _check_candidates(head[b, :n], q_idx[b, :n], k_idx[b, :n], salience[b, :n], attn[b, :n],
                                  ("head", "q_idx", "k_idx", "salience", "attn"), self.num_heads,
                                  self.max_seq_len, self.max_seq_len)
            if trace_salience is not None:
                V.check_finite("trace_salience", slot_S)
                V.check_finite("trace_attn", slot_a)
        self._run(layers, _as(head, torch.int32), _as(q_idx, torch.int32), _as(k_idx, torch.int32),
                  _as(salience, torch.float32), _as(attn, torch.float32), _as(num_edges, torch.int32),
                  slot_S, slot_a, direct)

    def update_dense(self, layer, salience, attn):
        """SPEC 4 with every edge of dense [H, Tq, Tk] maps a candidate (reference path; the maps
        are read in float32)."""
        layer = self._check_layer(layer)
        V.check_tensor("salience", salience, ndim=3, floating=True)
        V.check_tensor("attn", attn, ndim=3, floating=True)
        self._check_device("salience", salience)
        self._check_device("attn", attn)
        if salience.shape != attn.shape:
            raise ValueError(f"attn must have the shape of salience {tuple(salience.shape)}, got {tuple(attn.shape)}")
        H, Tq, Tk = salience.shape
        if H != self.num_heads:
            raise ValueError(f"salience must have {self.num_heads} heads (dim 0), got {H}")
        for name, n in (("salience's query length (dim 1)", Tq), ("salience's key length (dim 2)", Tk)):
            if not 1 <= n <= self.max_seq_len:
                raise ValueError(f"{name} must be in [1, max_seq_len={self.max_seq_len}], got {n}")
        V.check_finite("salience", salience.detach().float())   # as the update reads them
        V.check_finite("attn", attn.detach().float())
        dev = self.device
        h, i, j = torch.meshgrid(torch.arange(H, device=dev, dtype=torch.int32),
                                 torch.arange(Tq, device=dev, dtype=torch.int32),
                                 torch.arange(Tk, device=dev, dtype=torch.int32), indexing="ij")
        n = H * Tq * Tk
        zeros = torch.zeros((1, self.num_heads, self.quota), dtype=torch.float32, device=dev)
        self._run([layer], h.reshape(1, n), i.reshape(1, n), j.reshape(1, n),
                  salience.detach().float().reshape(1, n), attn.detach().float().reshape(1, n),
                  torch.full((1,), n, dtype=torch.int32, device=dev), zeros, zeros.clone(),
                  torch.zeros(1, dtype=torch.bool, device=dev))

    # -- capture intake ----------------------------------------------------------------------------
    def _check_device(self, name, t):
        V.check_not_meta(name, t)
        if t.device != self.device:
            raise ValueError(f"{name} is on {t.device} but the memory is on {self.device}")

    def _capture_inputs(self, layer, capture, name, validate):
        """Check a capture (no value sync unless asked) and turn it into the update's inputs:
        (head, q, k, S, a) [C], num_edges (0-d), slot_S, slot_a [H, Q], direct (0-d bool)."""
        if getattr(capture, "filled", True) is False:
            raise ValueError(f"{name} holds nothing: run a backward pass with capture= first")
        for attr in ("edges", "num_edges", "bias_scores", "bias", "num_heads", "seq_len_q", "seq_len_k"):
            if not hasattr(capture, attr):
                raise TypeError(f"{name} must be a SalienceCapture filled by a backward pass (no attribute {attr!r})")
        if capture.num_heads is None or capture.edges is None:
            raise ValueError(f"{name} holds nothing: run a backward pass with capture= first")
        num_heads = V.check_int(f"{name}.num_heads", capture.num_heads, low=1)
        if num_heads != self.num_heads:
            raise ValueError(f"{name} has {num_heads} heads, the memory {self.num_heads}")
        for attr in ("seq_len_q", "seq_len_k"):
            n = V.check_int(f"{name}.{attr}", getattr(capture, attr), low=1)
            if n > self.max_seq_len:
                raise ValueError(f"{name}.{attr} is {n}, over max_seq_len={self.max_seq_len}")
        edges = capture.edges
        if not isinstance(edges, (tuple, list)) or len(edges) != 5:
            raise TypeError(f"{name}.edges must be a tuple (head, q_idx, k_idx, S, a)")
        eh, eq, ek, eS, ea = edges
        for n_, t in (("head", eh), ("q_idx", eq), ("k_idx", ek)):
            V.check_tensor(f"{name}.edges {n_}", t, ndim=1, integer=True)
        for n_, t in (("S", eS), ("a", ea)):
            V.check_tensor(f"{name}.edges {n_}", t, ndim=1, floating=True)
        C = eh.shape[0]
        for n_, t in (("head", eh), ("q_idx", eq), ("k_idx", ek), ("S", eS), ("a", ea)):
            if t.shape[0] != C:
                raise ValueError(f"{name}.edges {n_} must have {C} entries like head, got {t.shape[0]}")
            self._check_device(f"{name}.edges {n_}", t)
        num_edges = capture.num_edges
        if isinstance(num_edges, int) and not isinstance(num_edges, bool):
            num_edges = torch.tensor(num_edges, dtype=torch.int32, device=self.device)
        V.check_tensor(f"{name}.num_edges", num_edges, integer=True)
        if num_edges.numel() != 1:
            raise ValueError(f"{name}.num_edges must hold one count, got shape {tuple(num_edges.shape)}")
        self._check_device(f"{name}.num_edges", num_edges)
        bias, scores = capture.bias, capture.bias_scores
        if (bias is None) != (scores is None):
            raise ValueError(f"{name}.bias and {name}.bias_scores must both be set or both be None")
        if bias is not None:
            if not isinstance(bias, TraceBias):
                raise TypeError(f"{name}.bias must be a TraceBias, got {type(bias).__name__}")
            if bias.num_heads != self.num_heads:
                raise ValueError(f"{name}.bias has {bias.num_heads} heads, the memory {self.num_heads}")
            # A bias may be built for longer sequences (bias(layer) adds the empty-slot row):
            # its entries past max_seq_len cannot be traces and are ignored by the merge.
            self._check_device(f"{name}.bias", bias.head)
            if not isinstance(scores, (tuple, list)) or len(scores) != 2:
                raise TypeError(f"{name}.bias_scores must be a tuple (S, a)")
            for n_, t in zip(("S", "a"), scores):
                V.check_tensor(f"{name}.bias_scores {n_}", t, ndim=1, floating=True)
                if t.shape[0] != bias.nnz:
                    raise ValueError(f"{name}.bias_scores {n_} must have {bias.nnz} entries (the bias's), "
                                     f"got {t.shape[0]}")
                self._check_device(f"{name}.bias_scores {n_}", t)
        if validate is None:
            validate = self.device.type == "cpu"
        if validate:
            n = int(num_edges)
            if not 0 <= n <= C:
                raise ValueError(f"{name}.num_edges must be in [0, {C}], got {n}")
            _check_candidates(eh[:n], eq[:n], ek[:n], eS[:n], ea[:n],
                              tuple(f"{name}.edges {f}" for f in ("head", "q_idx", "k_idx", "S", "a")),
                              self.num_heads, capture.seq_len_q, capture.seq_len_k)
            if bias is not None:
                V.check_finite(f"{name}.bias_scores S", scores[0].detach().float())
                V.check_finite(f"{name}.bias_scores a", scores[1].detach().float())

        dev = self.device
        num_edges = num_edges.reshape(()).to(torch.int32)
        shape = (self.num_heads, self.quota)
        if bias is not None and self._is_own_bias(bias, layer):
            # bias(layer) of the current state: COO order == slot order.
            return (eh.int(), eq.int(), ek.int(), eS.float(), ea.float(), num_edges,
                    scores[0].detach().float().reshape(shape), scores[1].detach().float().reshape(shape),
                    torch.ones((), dtype=torch.bool, device=dev))
        zeros = torch.zeros(shape, dtype=torch.float32, device=dev)
        if bias is None:
            return (eh.int(), eq.int(), ek.int(), eS.float(), ea.float(), num_edges, zeros, zeros.clone(),
                    torch.zeros((), dtype=torch.bool, device=dev))
        merged = _merge_bias_and_edges(bias, scores, (eh, eq, ek, eS, ea), num_edges, self.num_heads,
                                       self.max_seq_len)
        n = merged[0].shape[0]
        return (*merged, torch.tensor(n, dtype=torch.int32, device=dev), zeros, zeros.clone(),
                torch.zeros((), dtype=torch.bool, device=dev))

    # -- the update itself -------------------------------------------------------------------------
    def _params(self):
        return dict(quota=self.quota, retention=self.retention, decay=self.decay, threshold=self.threshold,
                    prune_eps=self.prune_eps, attn_eps=self.attn_eps, window=self.window,
                    max_seq_len=self.max_seq_len, age_bits=self.age_bits, pos_bits=self.pos_bits)

    def _resolved_backend(self):
        backend = config.settings().update_backend or self.backend
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" and self.quota <= _triton_max_quota() else "torch"
        return backend

    def _run(self, layers, head, q_idx, k_idx, S, a, num_edges, slot_S, slot_a, direct):
        """Apply one update to `layers` (B of them); all tensors already checked and on device."""
        backend = self._resolved_backend()
        if backend == "triton":
            from memtrace.kernels.trace_update import trace_update_slabs
            trace_update_slabs(self.strength, self.meta, layers, head, q_idx, k_idx, S, a, num_edges,
                               slot_S, slot_a, direct, **self._params())
        else:
            idx = torch.tensor(layers, dtype=torch.long, device=self.device)
            st, mt = _update_torch(self.strength[idx], self.meta[idx], head, q_idx, k_idx, S, a, num_edges,
                                   slot_S, slot_a, direct, **self._params())
            self.strength[idx] = st
            self.meta[idx] = mt
        for layer in layers:
            self._versions[layer] += 1

    # -- persistence -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors and hyper-parameters; `load_state_dict` of a memory with the same structure
        (num_layers, num_heads, quota, window, max_seq_len) takes it back, rates included."""
        return {"format_version": FORMAT_VERSION, "config": self.config(),
                "strength": self.strength.clone(), "meta": self.meta.clone()}

    def load_state_dict(self, state_dict) -> None:
        """Validate everything, then replace the state and the rates (nothing changes on error)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        for key in ("format_version", "config", "strength", "meta"):
            if key not in state_dict:
                raise ValueError(f"state_dict is missing {key!r}")
        version = state_dict["format_version"]
        if isinstance(version, torch.Tensor):
            if version.numel() != 1 or version.dtype.is_floating_point or version.dtype.is_complex \
                    or version.device.type == "meta":
                raise ValueError("state_dict['format_version'] must be an int (or a one-element integer "
                                 f"tensor), got a {version.dtype} tensor of shape {tuple(version.shape)} "
                                 f"on {version.device}")
            version = int(version)
        if version != FORMAT_VERSION:
            raise ValueError(f"state_dict has format_version {version!r}, this memtrace reads {FORMAT_VERSION}")
        cfg = state_dict["config"]
        if not isinstance(cfg, dict):
            raise TypeError("state_dict['config'] must be a dict")
        cfg = _check_config(cfg, where="state_dict['config']")
        for key in _STRUCTURE_KEYS:
            if cfg[key] != getattr(self, key):
                raise ValueError(f"state_dict has {key}={cfg[key]}, this memory {getattr(self, key)}")
        strength, meta = state_dict["strength"], state_dict["meta"]
        _check_state_tensors(strength, meta, cfg, "state_dict")
        strength = strength.to(self.device, copy=True)
        meta = meta.to(self.device, copy=True)
        self._set_config(cfg)
        self.strength, self.meta = strength, meta
        self._bump_all()

    def save(self, path) -> None:
        """Write to a safetensors file (tensors + format version + hyper-parameters), atomically
        (see `_files.save_safetensors`)."""
        metadata = {"format": _FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                    "config": json.dumps(self.config())}
        save_safetensors({"strength": self.strength.detach().cpu().contiguous(),
                          "meta": self.meta.detach().cpu().contiguous()}, path, metadata)

    @classmethod
    def load(cls, path, device=None) -> TraceMemory:
        """Read a file written by `save`; raises ValueError (never a half-loaded memory) when the
        file is truncated, of another format or version, or its tensors do not fit its config."""
        from safetensors import safe_open
        path = check_path(path)
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                keys = set(f.keys())
                if metadata.get("format") != _FORMAT_NAME:
                    raise ValueError(f"{path} is not a TraceMemory file (format {metadata.get('format')!r})")
                if metadata.get("format_version") != str(FORMAT_VERSION):
                    raise ValueError(f"{path} has format_version {metadata.get('format_version')!r}, "
                                     f"this memtrace reads {FORMAT_VERSION}")
                if keys != {"strength", "meta"}:
                    raise ValueError(f"{path} must hold tensors 'strength' and 'meta', got {sorted(keys)}")
                try:
                    cfg = json.loads(metadata.get("config", ""))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path} has an unreadable config: {exc}") from None
                tensors = {k: f.get_tensor(k) for k in ("strength", "meta")}
        except ValueError:
            raise
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise ValueError(f"cannot read TraceMemory file {path}: {exc}") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{path} has an unreadable config")
        cfg = _check_config(cfg, where=f"{path} config")
        _check_state_tensors(tensors["strength"], tensors["meta"], cfg, str(path))
        mem = cls(**cfg, device=device)
        mem.strength = tensors["strength"].to(mem.device).clone()
        mem.meta = tensors["meta"].to(mem.device).clone()
        return mem

    def to(self, device) -> TraceMemory:
        """Move the state to `device` (in place; returns self)."""
        device = V.check_device("device", device)
        if device.type == "meta":
            raise ValueError("device must hold data: a TraceMemory cannot move to the meta device")
        strength, meta = self.strength.to(device), self.meta.to(device)
        self.strength, self.meta = strength, meta
        self._bump_all()
        return self

    def _bump_all(self):
        self._versions = [v + 1 for v in self._versions]


# ---- checks --------------------------------------------------------------------------------------

def _check_config(cfg, where=None):
    """The constructor's hyper-parameters, checked (SPEC 6); returns them normalised."""
    missing = [k for k in _CONFIG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{where} is missing {missing}")
    prefix = f"{where}: " if where else ""
    try:
        out = {
            "num_layers": V.check_int("num_layers", cfg["num_layers"], low=1),
            "num_heads": V.check_int("num_heads", cfg["num_heads"], low=1),
            "quota": V.check_int("quota", cfg["quota"], low=1, high=MAX_QUOTA),
            "retention": V.check_rate("retention", cfg["retention"]),
            "decay": V.check_rate("decay", cfg["decay"]),
            "threshold": V.check_float("threshold", cfg["threshold"], low=0.0),
            "prune_eps": V.check_float("prune_eps", cfg["prune_eps"], low=0.0),
            "attn_eps": V.check_float("attn_eps", cfg["attn_eps"], low=0.0),
            "window": V.check_int("window", cfg["window"], low=1, high=32),
            "max_seq_len": V.check_seq_len("max_seq_len", cfg["max_seq_len"]),
        }
    except (TypeError, ValueError) as exc:
        if not where:
            raise
        raise type(exc)(prefix + str(exc)) from None
    return out


def _check_state_tensors(strength, meta, cfg, where):
    """Shapes, dtypes and the slab invariants of a saved state (one host sync, load time only)."""
    shape = (cfg["num_layers"], cfg["num_heads"], cfg["quota"])
    for name, t, dtype in (("strength", strength, torch.float32), ("meta", meta, torch.int64)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"{where}: {name} must be {dtype}, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{where}: {name} must have shape {shape} (layers, heads, quota), got {tuple(t.shape)}")
        V.check_not_meta(f"{where}: {name}", t)
    strength, meta = strength.detach().cpu(), meta.detach().cpu()
    valid = strength >= 0
    if not bool((torch.isfinite(strength) & (valid | (strength == EMPTY_STRENGTH))).all()):
        raise ValueError(f"{where}: strength must hold finite values >= 0 or -1 (empty)")
    if not bool((meta[~valid] == 0).all()):
        raise ValueError(f"{where}: empty slots must have meta 0")
    L = cfg["max_seq_len"]
    pos_bits = _pos_bits(L)
    pos = (meta >> (64 - pos_bits)) & ((1 << pos_bits) - 1)
    if not bool((pos[valid] < L * L).all()):
        raise ValueError(f"{where}: a trace position lies outside max_seq_len={L}")
    # valid slots first, sorted strictly by position
    if shape[2] > 1:
        v0, v1 = valid[..., :-1], valid[..., 1:]
        if bool((v1 & ~v0).any()):
            raise ValueError(f"{where}: a slab has a trace after an empty slot")
        if bool((v1 & (pos[..., 1:] <= pos[..., :-1])).any()):
            raise ValueError(f"{where}: a slab's traces are not sorted by strictly increasing (i, j)")


def _check_candidates(head, q_idx, k_idx, S, a, names, num_heads, seq_len_q, seq_len_k):
    """Values of one layer's valid candidate edges (one host sync; validate mode only): indices
    in range, scores finite in float32 (what the update reads) and each (head, q_idx, k_idx) at
    most once, since two candidates at one position would become two traces there."""
    V.check_index_range(names[0], head, 0, num_heads)
    V.check_index_range(names[1], q_idx, 0, seq_len_q)
    V.check_index_range(names[2], k_idx, 0, seq_len_k)
    V.check_finite(names[3], S.detach().float())
    V.check_finite(names[4], a.detach().float())
    if head.numel() > 1:
        key = torch.sort((head.long() * seq_len_q + q_idx.long()) * seq_len_k + k_idx.long()).values
        dup = key[1:] == key[:-1]
        if bool(dup.any()):
            k0 = int(key[1:][dup][0])
            h, i, j = k0 // (seq_len_q * seq_len_k), k0 // seq_len_k % seq_len_q, k0 % seq_len_k
            raise ValueError(f"{names[0]}, {names[1]}, {names[2]}: candidate edges must be unique per "
                             f"(head, q_idx, k_idx); ({h}, {i}, {j}) appears more than once")


def _pos_bits(max_seq_len):
    return max(1, (max_seq_len * max_seq_len - 1).bit_length())


def _triton_max_quota():
    try:
        from memtrace.kernels.trace_update import MAX_TRITON_QUOTA
    except ImportError:  # triton missing: the torch path serves every device
        return 0
    return MAX_TRITON_QUOTA


# ---- candidate preparation -----------------------------------------------------------------------

def _merge_bias_and_edges(bias, scores, edges, num_edges, num_heads, max_seq_len):
    """Candidates from a bias that did not come from this memory's current state: the union of
    its entries (scored by bias_scores) and the valid threshold edges, one per (h, i, j), a bias
    score winning over an edge's. Fixed size (nnz + C), no host sync: dropped rows get head -1."""
    dev = bias.head.device
    L = max_seq_len
    eh, eq, ek, eS, ea = edges
    C = eh.shape[0]
    ev = torch.arange(C, device=dev) < num_edges
    head = torch.cat([bias.head.long(), eh.long()])
    q = torch.cat([bias.q_idx.long(), eq.long()])
    k = torch.cat([bias.k_idx.long(), ek.long()])
    S = torch.cat([scores[0].detach().float(), eS.float()])
    a = torch.cat([scores[1].detach().float(), ea.float()])
    valid = torch.cat([torch.ones(bias.nnz, dtype=torch.bool, device=dev), ev])
    valid &= (head >= 0) & (head < num_heads) & (q >= 0) & (q < L) & (k >= 0) & (k < L)
    key = torch.where(valid, (head * L + q) * L + k, torch.full_like(head, num_heads * L * L))
    priority = torch.cat([torch.zeros(bias.nnz, dtype=torch.long, device=dev),
                          torch.ones(C, dtype=torch.long, device=dev)])
    order = torch.sort(key * 2 + priority, stable=True).indices
    key_sorted = key[order]
    first = torch.ones_like(valid)
    if first.numel() > 1:
        first[1:] = key_sorted[1:] != key_sorted[:-1]
    keep = first & valid[order]
    head_out = torch.where(keep, head[order], torch.full_like(head, -1))
    return head_out.int(), q[order].int(), k[order].int(), S[order], a[order]


# ---- the vectorised PyTorch update (CPU, and the fallback) ---------------------------------------

def _ln1p_table(window, device):
    return torch.tensor([math.log1p(r) for r in range(window + 1)], dtype=torch.float64, device=device)


def _update_torch(strength, meta, head, q_idx, k_idx, S, a, num_edges, slot_S, slot_a, direct, *, quota,
                  retention, decay, threshold, prune_eps, attn_eps, window, max_seq_len, age_bits, pos_bits):
    """SPEC 4 on B layers' slabs with torch ops (no host sync). strength/meta: [B, H, Q]
    (copies; returned updated); candidates [B, C]; slot scores [B, H, Q]; direct [B] bool."""
    dev = strength.device
    B, H, Q = strength.shape
    C = head.shape[1]
    L = max_seq_len
    W = window
    hist_mask = (1 << W) - 1
    age_max = (1 << age_bits) - 1
    pos_shift = W + age_bits
    pos_mask = (1 << pos_bits) - 1
    # a slab's keys: positions [0, 2^P), then its empty slots at 2^P + slot, slot < Q; the span
    # must hold both (2^(P + 1) did not when Q > 2^P: empty-slot keys ran into the next slab's
    # range, the keys were no longer sorted and the search missed stored traces; issue 28)
    span = (1 << pos_bits) + Q
    ln1p = _ln1p_table(W, dev)
    n_slabs = B * H

    # Stored slots: global keys (slab, position); empty slots sort after the slab's traces.
    valid_old = strength >= 0
    pos_old = (meta >> pos_shift) & pos_mask
    slab = torch.arange(n_slabs, device=dev, dtype=torch.int64).view(B, H, 1)
    slot = torch.arange(Q, device=dev, dtype=torch.int64)
    gkey = (slab * span + torch.where(valid_old, pos_old, (1 << pos_bits) + slot)).reshape(-1)

    # Candidates: validity, then match against the stored traces by binary search.
    head_l, q_l, k_l = head.long(), q_idx.long(), k_idx.long()
    c_valid = (torch.arange(C, device=dev).view(1, C) < num_edges.view(B, 1).long())
    c_valid &= (head_l >= 0) & (head_l < H) & (q_l >= 0) & (q_l < L) & (k_l >= 0) & (k_l < L)
    c_valid &= torch.isfinite(S) & torch.isfinite(a)
    c_pos = torch.where(c_valid, q_l * L + k_l, torch.zeros_like(q_l))
    c_slab = torch.arange(B, device=dev).view(B, 1) * H + torch.where(c_valid, head_l, torch.zeros_like(head_l))
    ckey = (c_slab * span + c_pos).reshape(-1)
    found_at = torch.searchsorted(gkey, ckey).clamp(max=gkey.numel() - 1)
    found = c_valid.reshape(-1) & (gkey[found_at] == ckey)

    # Scores of stored slots: direct (bias order) or from the matching edges.
    write = found & ~direct.view(B, 1).expand(B, C).reshape(-1)
    n_slots = n_slabs * Q
    target = torch.where(write, found_at, torch.full_like(found_at, n_slots))
    S_slots = torch.cat([slot_S.reshape(-1).float(), slot_S.new_zeros(1)])
    a_slots = torch.cat([slot_a.reshape(-1).float(), slot_a.new_zeros(1)])
    S_slots = S_slots.scatter(0, target, S.reshape(-1).float())[:n_slots]
    a_slots = a_slots.scatter(0, target, a.reshape(-1).float())[:n_slots]
    S_slots = torch.where(torch.isfinite(S_slots), S_slots, torch.zeros_like(S_slots)).double()
    a_slots = torch.where(torch.isfinite(a_slots), a_slots, torch.zeros_like(a_slots)).double()

    # 1-3. history, effective salience, reinforce or decay (stored traces).
    st_flat, mt_flat, v_flat = strength.reshape(-1), meta.reshape(-1), valid_old.reshape(-1)
    hist = mt_flat & hist_mask
    age = (mt_flat >> W) & age_max if age_bits else torch.zeros_like(mt_flat)
    hist = ((hist << 1) | (a_slots > attn_eps).long()) & hist_mask
    s_eff = S_slots * ln1p[_popcount(hist)]
    reinforce = s_eff > threshold
    m64 = torch.where(reinforce, retention * st_flat.double() + (1.0 - retention) * s_eff, decay * st_flat.double())
    age = torch.where(reinforce, torch.zeros_like(age), torch.clamp(age + 1, max=age_max))
    alive_old = v_flat & ~(m64 < prune_eps)                                  # 5. prune
    meta_old = (pos_old.reshape(-1) << pos_shift) | (age << W) | hist

    # 4. new edges.
    bit = (a.reshape(-1).double() > attn_eps).long()
    s_new = S.reshape(-1).double() * ln1p[bit]
    m_new = (1.0 - retention) * s_new
    alive_new = c_valid.reshape(-1) & ~found & (s_new > threshold) & ~(m_new < prune_eps)
    meta_new = (c_pos.reshape(-1) << pos_shift) | (bit & hist_mask)

    # 6. evict to quota: rank by (strength desc, position asc) inside each slab.
    item_slab = torch.cat([slab.expand(B, H, Q).reshape(-1), c_slab.reshape(-1)])
    item_pos = torch.cat([pos_old.reshape(-1), c_pos.reshape(-1)])
    item_m = torch.cat([m64, m_new]).clamp(max=FLOAT32_MAX).float()
    item_meta = torch.cat([meta_old, meta_new])
    alive = torch.cat([alive_old, alive_new])
    item_m64 = torch.cat([m64, m_new])
    grp = torch.where(alive, item_slab, torch.full_like(item_slab, n_slabs))
    order = torch.sort(item_pos, stable=True).indices
    order = order[torch.sort(item_m64[order], descending=True, stable=True).indices]
    order = order[torch.sort(grp[order], stable=True).indices]
    grp_sorted = grp[order]
    starts = torch.searchsorted(grp_sorted, torch.arange(n_slabs + 1, device=dev))
    rank = torch.arange(order.numel(), device=dev) - starts[grp_sorted.clamp(max=n_slabs)]
    kept = torch.zeros_like(alive)
    kept[order] = (grp_sorted < n_slabs) & (rank < quota)

    # Write the kept traces back, each slab sorted by position.
    pkey = torch.where(kept, item_slab * span + item_pos, torch.full_like(item_pos, n_slabs * span))
    order = torch.sort(pkey).indices
    grp_sorted = torch.where(kept[order], item_slab[order], torch.full_like(item_slab, n_slabs))
    starts = torch.searchsorted(grp_sorted, torch.arange(n_slabs + 1, device=dev))
    rank = torch.arange(order.numel(), device=dev) - starts[grp_sorted.clamp(max=n_slabs)]
    target = torch.where(grp_sorted < n_slabs, grp_sorted * Q + rank.clamp(max=Q - 1),
                         torch.full_like(rank, n_slots))
    out_strength = torch.full((n_slots + 1,), EMPTY_STRENGTH, dtype=torch.float32, device=dev)
    out_meta = torch.zeros(n_slots + 1, dtype=torch.int64, device=dev)
    out_strength = out_strength.scatter(0, target, item_m[order])[:n_slots]
    out_meta = out_meta.scatter(0, target, item_meta[order])[:n_slots]
    return out_strength.view(B, H, Q), out_meta.view(B, H, Q)
