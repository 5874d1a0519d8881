"""Semantic crystallization (SPEC 5.5): motifs, the registry that freezes them, composite experts.

A motif is a chain of experts (start_layer s, (e_s, ..., e_{s+k-1})) that the RoutingTree found
frequent, useful and stable. The MotifRegistry holds at most `max_motifs` of them (the lowest
utility is evicted first) and unfreezes those whose utility later falls. A CompositeExpert runs a
held motif as one module E_{e_k} o ... o E_{e_1}: no router call, one expert per layer.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import _validate as V

__all__ = [
    "CompositeExpert",
    "FusedExpertView",
    "Motif",
    "MotifRegistry",
    "check_weights",
    "fused_expert_layout",
    "linear_router_flops",
    "mlp_expert_flops",
    "motif_flops_saved",
]


@dataclass(frozen=True)
class Motif:
    """One routing motif and its SPEC 5.3 statistics at the step it was read."""
    start_layer: int
    experts: tuple
    count: int
    utility: float
    entropy: float
    age: int
    score: float

    @property
    def key(self) -> tuple:
        return (self.start_layer, self.experts)

    @property
    def length(self) -> int:
        return len(self.experts)

    @property
    def layers(self) -> range:
        return range(self.start_layer, self.start_layer + len(self.experts))


def check_weights(weights) -> tuple:
    """Score weights (w1, w2, w3, w4) of SPEC 5.3: four finite floats."""
    if not isinstance(weights, (tuple, list)) or len(weights) != 4:
        raise ValueError(f"weights must be a sequence of 4 floats (w1..w4), got {weights!r}")
    return tuple(V.check_float(f"weights[{i}]", w) for i, w in enumerate(weights))


def _check_tree(tree, method: str) -> None:
    if not callable(getattr(tree, method, None)):
        raise TypeError(f"tree must be a memtrace.RoutingTree, got {type(tree).__name__}")


def _rank(m: Motif) -> tuple:
    """Candidate order: utility descending, then score descending, then (start_layer, experts)."""
    return (-m.utility, -m.score, m.start_layer, m.experts)


class MotifRegistry:
    """The crystallized motifs, at most `max_motifs`, best first.

    consider(tree, step, **criteria) adds the tree's candidates (those with score > threshold
    when a threshold is set) and refreshes the statistics of held motifs that are candidates
    again; beyond max_motifs the lowest utility is evicted. revalidate(tree, step, min_utility)
    unfreezes every held motif whose utility fell below min_utility or that the tree lost.
    """

    def __init__(self, max_motifs: int = 512, weights=(1.0, 1.0, 1.0, 0.0), threshold: float | None = None):
        self.max_motifs = V.check_int("max_motifs", max_motifs, low=1)
        self.weights = check_weights(weights)
        self.threshold = None if threshold is None else V.check_float("threshold", threshold)
        self._motifs: dict[tuple, Motif] = {}

    def consider(self, tree, step: int | None = None, **criteria) -> list[Motif]:
        """Add the tree's candidates; return the motifs newly frozen by this call (still held)."""
        if "weights" in criteria:
            raise TypeError("consider() takes the registry's weights; pass weights to MotifRegistry()")
        _check_tree(tree, "candidates")
        cands = tree.candidates(step=step, weights=self.weights, **criteria)  # validates; may raise
        held = dict(self._motifs)
        for m in cands:
            if self.threshold is None or m.score > self.threshold:
                held[m.key] = m
        ranked = sorted(held.values(), key=_rank)[:self.max_motifs]
        added = [m for m in ranked if m.key not in self._motifs]
        self._motifs = {m.key: m for m in ranked}
        return added

    def revalidate(self, tree, step: int | None = None, min_utility: float = 0.0) -> list[Motif]:
        """Unfreeze motifs whose utility is now below min_utility; return them."""
        _check_tree(tree, "stats")
        min_utility = V.check_float("min_utility", min_utility)
        keep, dropped = {}, []
        for key, m in self._motifs.items():
            st = tree.stats(key[0], key[1], step=step)
            if st is None or st["utility"] < min_utility:
                dropped.append(m)
            else:
                keep[key] = Motif(m.start_layer, m.experts, st["count"], st["utility"], st["entropy"], st["age"],
                                  self._score(st))
        self._motifs = keep
        return dropped

    def _score(self, st: dict) -> float:
        w1, w2, w3, w4 = self.weights
        return w1 * math.log(st["count"]) + w2 * st["utility"] - w3 * st["entropy"] + w4 * st["age"]

    @property
    def motifs(self) -> list[Motif]:
        return sorted(self._motifs.values(), key=_rank)

    def __len__(self) -> int:
        return len(self._motifs)

    def __contains__(self, key) -> bool:
        if isinstance(key, Motif):
            key = key.key
        return tuple(key) in self._motifs if isinstance(key, tuple) else False

    def __iter__(self):
        return iter(self.motifs)

    def get(self, start_layer: int, experts) -> Motif | None:
        return self._motifs.get((start_layer, tuple(experts)))

    def starting_at(self, layer: int) -> list[Motif]:
        """Held motifs whose chain starts at `layer`, best first."""
        return [m for m in self.motifs if m.start_layer == layer]

    def state_dict(self) -> dict:
        return {"max_motifs": self.max_motifs, "weights": list(self.weights), "threshold": self.threshold,
                "motifs": [asdict(m) for m in self.motifs]}

    def load_state_dict(self, sd: dict) -> None:
        """Validate everything, then replace the registry (nothing changes on error)."""
        if not isinstance(sd, dict):
            raise TypeError(f"state_dict must be a dict, got {type(sd).__name__}")
        missing = [k for k in ("max_motifs", "weights", "threshold", "motifs") if k not in sd]
        if missing:
            raise ValueError(f"state_dict is missing {missing}")
        other = MotifRegistry(sd["max_motifs"], sd["weights"], sd["threshold"])
        if not isinstance(sd["motifs"], (list, tuple)):
            raise TypeError(f"state_dict['motifs'] must be a list of dicts, got {type(sd['motifs']).__name__}")
        motifs = {}
        for n, d in enumerate(sd["motifs"]):
            where = f"state_dict['motifs'][{n}]"
            if not isinstance(d, dict):
                raise TypeError(f"{where} must be a dict, got {type(d).__name__}")
            missing = [k for k in ("start_layer", "experts", "count", "utility", "entropy", "age", "score")
                       if k not in d]
            if missing:
                raise ValueError(f"{where} is missing {missing}")
            if not isinstance(d["experts"], (list, tuple)) or not d["experts"]:
                raise ValueError(f"{where}: experts must be a non-empty list of expert ids, got {d['experts']!r}")
            m = Motif(V.check_int(f"{where}: start_layer", d["start_layer"], low=0),
                      tuple(V.check_int(f"{where}: experts", e, low=0) for e in d["experts"]),
                      V.check_int(f"{where}: count", d["count"], low=0),
                      V.check_float(f"{where}: utility", d["utility"]),
                      V.check_float(f"{where}: entropy", d["entropy"]),
                      V.check_int(f"{where}: age", d["age"]),
                      V.check_float(f"{where}: score", d["score"]))
            motifs[m.key] = m
        if len(motifs) > other.max_motifs:
            raise ValueError(f"state_dict holds {len(motifs)} motifs, more than max_motifs={other.max_motifs}")
        self.max_motifs, self.weights, self.threshold = other.max_motifs, other.weights, other.threshold
        self._motifs = motifs


def fused_expert_layout(module) -> dict | None:
    """The layout of a fused experts module, or None when `module` is not one.

    transformers 5.x stores all experts of a layer in 3-D tensors: `gate_up_proj` [E, 2I, H] (gated;
    `up_proj` [E, I, H] when not gated) and `down_proj` [E, H, I], or the transposes ([E, H, 2I],
    [E, I, H]) when `is_transposed`, with optional `*_bias` [E, out] tensors, and `act_fn` (plus
    `_apply_gate` for the gate/up split). Returns dict(num_experts, hidden, intermediate, has_gate,
    has_bias, is_transposed, gated_names) read from the module's attributes and checked against the
    tensor shapes; None if the attributes or shapes do not fit.
    """
    if isinstance(module, (list, tuple, nn.ModuleList)) or not isinstance(module, nn.Module):
        return None
    has_gate = isinstance(getattr(module, "gate_up_proj", None), torch.Tensor)
    up_name = "gate_up_proj" if has_gate else "up_proj"
    up, down = getattr(module, up_name, None), getattr(module, "down_proj", None)
    if not (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == 3 and down.dim() == 3):
        return None
    if not callable(getattr(module, "act_fn", None)):
        return None
    is_transposed = bool(getattr(module, "is_transposed", False))
    bias_names = (f"{up_name}_bias", "down_proj_bias")
    has_bias = bool(getattr(module, "has_bias", False)) or any(
        isinstance(getattr(module, n, None), torch.Tensor) for n in bias_names)
    E = up.shape[0]
    if down.shape[0] != E or E < 1:
        return None
    up_out, hidden = (up.shape[2], up.shape[1]) if is_transposed else (up.shape[1], up.shape[2])
    inter = up_out // 2 if has_gate else up_out
    if has_gate and up_out % 2:
        return None
    want_down = (E, inter, hidden) if is_transposed else (E, hidden, inter)
    if tuple(down.shape) != want_down:
        return None
    if has_bias:
        for n, width in zip(bias_names, (up_out, hidden)):
            b = getattr(module, n, None)
            if not isinstance(b, torch.Tensor) or tuple(b.shape) != (E, width):
                return None
    return {"num_experts": int(E), "hidden": int(hidden), "intermediate": int(inter), "has_gate": has_gate,
            "has_bias": has_bias, "is_transposed": is_transposed, "up_name": up_name}


def _default_gate(act_fn, h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return act_fn(gate) * up


class FusedExpertView(nn.Module):
    """Expert `index` of a fused experts module, as an ordinary expert module x [.., H] -> [.., H].

    A live view (the default) owns no parameters: at every call it reads `experts.gate_up_proj[index]`
    and `experts.down_proj[index]` (basic indexing: views that share the fused tensors' storage),
    so it sees the live weights, gradients flow into the fused tensors' slice `index` only, and no
    expert's tensors are copied. The fused module is held by reference, not registered as a
    sub-module (so this module's parameters() are empty and the fused tensors are not saved
    twice). copy.deepcopy (what CompositeExpert(frozen=True) does) returns an owned copy: this
    expert's slices cloned as 2-D parameters, the other experts untouched.

    The math is transformers' eager experts forward for one expert: h = x W_up^T (+ b), the
    module's `_apply_gate` (default: act(gate) * up over the two halves) or act_fn when not gated,
    then h W_down^T (+ b) — bitwise the same per row as the fused module's eager loop.
    """

    def __init__(self, experts: nn.Module, index: int):
        super().__init__()
        layout = fused_expert_layout(experts)
        if layout is None:
            raise TypeError(f"experts must be a fused experts module (gate_up_proj/up_proj and down_proj "
                            f"[num_experts, ...] tensors and act_fn), got {type(experts).__name__}")
        self.index = V.check_int("index", index, low=0, high=layout["num_experts"] - 1)
        self.layout = layout
        object.__setattr__(self, "_fused", experts)  # a reference, not a sub-module
        gate = getattr(experts, "_apply_gate", None)
        if getattr(getattr(type(experts), "_apply_gate", None), "__name__", "") == "_default_apply_gate":
            gate = None  # transformers' default split: the same math as _default_gate, no reference kept
        object.__setattr__(self, "_gate_fn", gate if callable(gate) else None)
        object.__setattr__(self, "_act_fn", experts.act_fn)

    @property
    def is_view(self) -> bool:
        return self._fused is not None

    @property
    def fused(self) -> nn.Module | None:
        """The fused experts module this view reads (None for an owned copy)."""
        return self._fused

    def _names(self) -> tuple:
        up = self.layout["up_name"]
        names = [up, "down_proj"]
        if self.layout["has_bias"]:
            names += [f"{up}_bias", "down_proj_bias"]
        return tuple(names)

    def tensor(self, name: str) -> torch.Tensor:
        """This expert's slice of fused tensor `name` (a view), or the owned copy of it."""
        if self._fused is not None:
            return getattr(self._fused, name)[self.index]
        return getattr(self, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        up_w, down_w = self.tensor(lay["up_name"]), self.tensor("down_proj")
        up_b = self.tensor(f"{lay['up_name']}_bias") if lay["has_bias"] else None
        down_b = self.tensor("down_proj_bias") if lay["has_bias"] else None
        if lay["is_transposed"]:
            h = x @ up_w
            h = h + up_b if up_b is not None else h
        else:
            h = nn.functional.linear(x, up_w, up_b)
        if lay["has_gate"]:
            h = self._gate_fn(h) if self._gate_fn is not None else _default_gate(self._act_fn, h)
        else:
            h = self._act_fn(h)
        if lay["is_transposed"]:
            out = h @ down_w
            return out + down_b if down_b is not None else out
        return nn.functional.linear(h, down_w, down_b)

    def owned_copy(self) -> "FusedExpertView":
        """This expert's tensors cloned into parameters of a new, self-contained module."""
        new = FusedExpertView.__new__(FusedExpertView)
        nn.Module.__init__(new)
        new.index, new.layout = self.index, dict(self.layout)
        object.__setattr__(new, "_fused", None)
        object.__setattr__(new, "_gate_fn", self._gate_fn)
        object.__setattr__(new, "_act_fn", copy.deepcopy(self._act_fn))
        for name in self._names():
            t = self.tensor(name)
            req = t.requires_grad if isinstance(t, nn.Parameter) or self._fused is None else \
                getattr(self._fused, name).requires_grad
            new.register_parameter(name, nn.Parameter(t.detach().clone(), requires_grad=req))
        return new

    def __deepcopy__(self, memo):
        new = self.owned_copy()
        memo[id(self)] = new
        return new

    def extra_repr(self) -> str:
        kind = f"view of {type(self._fused).__name__}" if self._fused is not None else "owned copy"
        lay = self.layout
        return f"index={self.index}, {kind}, hidden={lay['hidden']}, intermediate={lay['intermediate']}"


class CompositeExpert(nn.Module):
    """A crystallized motif as one module: x -> E_{e_k}(... E_{e_1}(x)), no router calls.

    experts_per_layer[l] is layer l's expert list (an nn.ModuleList or any sequence of modules),
    or a fused experts module holding every expert of the layer in [num_experts, ...] tensors
    (transformers 5.x `MixtralExperts`, `Qwen2MoeExperts`, `DeepseekV3Experts`, ...): expert e of
    such a layer is a FusedExpertView, a view of its slices (no copy of the other experts).
    frozen=True (default) deep-copies the chain's experts and freezes their parameters, so that
    later training of the live model does not move the crystallized unit (for a fused layer only
    expert e's slices are copied); frozen=False shares the live modules (a FusedExpertView then
    reads the live fused tensors; its parameters stay owned by the fused module, so they are not
    listed in this module's parameters()). residual=True applies each expert as h + E(h).
    """

    def __init__(self, experts_per_layer: Sequence[Sequence[nn.Module]], motif, *, frozen: bool = True,
                 residual: bool = False):
        super().__init__()
        if isinstance(motif, Motif):
            start_layer, experts = motif.start_layer, motif.experts
        elif isinstance(motif, (tuple, list)) and len(motif) == 2:
            start_layer, experts = motif
        else:
            raise TypeError(f"motif must be a memtrace.Motif or a (start_layer, experts) pair, got {motif!r}")
        start_layer = V.check_int("start_layer", start_layer, low=0)
        if not isinstance(experts_per_layer, (list, tuple, nn.ModuleList)):
            raise TypeError("experts_per_layer must be a sequence (one expert list per layer)")
        if isinstance(experts, torch.Tensor):
            V.check_not_meta("experts", experts)
            experts = experts.tolist()
        if not isinstance(experts, (list, tuple)):
            raise TypeError(f"motif's experts must be a sequence of expert ids, got {type(experts).__name__}")
        experts = tuple(V.check_int("experts", e, low=0) for e in experts)
        if not experts:
            raise ValueError("motif must hold at least one expert")
        if start_layer + len(experts) > len(experts_per_layer):
            raise ValueError(f"motif spans layers {start_layer}..{start_layer + len(experts) - 1} but only "
                             f"{len(experts_per_layer)} layers of experts were given")
        chain = []
        for i, e in enumerate(experts):
            layer_idx = start_layer + i
            layer = experts_per_layer[layer_idx]
            if not isinstance(layer, (list, tuple, nn.ModuleList)):
                layout = fused_expert_layout(layer)
                if layout is None:
                    raise TypeError(f"experts_per_layer[{layer_idx}] must be a sequence of expert modules or a "
                                    "fused experts module (transformers 5.x: gate_up_proj/up_proj and down_proj "
                                    f"[num_experts, ...] tensors), got {type(layer).__name__}")
                if e >= layout["num_experts"]:
                    raise ValueError(f"experts: expert {e} at layer {layer_idx} is out of range, "
                                     f"experts_per_layer[{layer_idx}] holds {layout['num_experts']} experts")
                chain.append(FusedExpertView(layer, e))
                continue
            if e >= len(layer):
                raise ValueError(f"experts: expert {e} at layer {layer_idx} is out of range, "
                                 f"experts_per_layer[{layer_idx}] holds {len(layer)} experts")
            if not isinstance(layer[e], nn.Module):
                raise TypeError(f"experts_per_layer[{layer_idx}][{e}] must be an nn.Module, "
                                f"got {type(layer[e]).__name__}")
            chain.append(layer[e])
        if frozen:
            chain = [copy.deepcopy(m) for m in chain]
            for m in chain:
                m.requires_grad_(False)
                m.eval()
        self.chain = nn.ModuleList(chain)
        self.start_layer, self.experts = start_layer, experts
        self.frozen, self.residual = bool(frozen), bool(residual)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for expert in self.chain:
            hidden = hidden + expert(hidden) if self.residual else expert(hidden)
        return hidden

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # a crystallized unit stays in eval mode (dropout off, norms fixed)
            for m in self.chain:
                m.eval()
        return self

    def extra_repr(self) -> str:
        return f"start_layer={self.start_layer}, experts={self.experts}, frozen={self.frozen}"

    def flops_saved(self, *, router_flops: float, expert_flops: float, top_k: int = 1, tokens: int = 1) -> float:
        return motif_flops_saved(len(self.experts), router_flops=router_flops, expert_flops=expert_flops,
                                 top_k=top_k, tokens=tokens)


def motif_flops_saved(length: int, *, router_flops: float, expert_flops: float, top_k: int = 1,
                      tokens: int = 1) -> float:
    """FLOPs a crystallized motif of `length` layers saves per its tokens (seeds' appendix 3.4).

    Routed: every layer calls the router and evaluates top_k experts; crystallized: no router and
    one expert per layer. Savings = tokens * length * (router_flops + (top_k - 1) * expert_flops).
    With length 4, top_k 2 and a router costing 0.1 expert this is 4.4 expert evaluations.
    """
    length = V.check_int("length", length, low=0)
    top_k = V.check_int("top_k", top_k, low=1)
    tokens = V.check_int("tokens", tokens, low=0)
    router_flops = V.check_float("router_flops", router_flops, low=0.0)
    expert_flops = V.check_float("expert_flops", expert_flops, low=0.0)
    return float(tokens * length * (router_flops + (top_k - 1) * expert_flops))


def linear_router_flops(d_model: int, num_experts: int) -> float:
    """Multiply-adds of a linear router (logits = h W, W [d_model, num_experts]) as 2 FLOPs each."""
    return 2.0 * V.check_int("d_model", d_model, low=1) * V.check_int("num_experts", num_experts, low=1)


def mlp_expert_flops(d_model: int, d_hidden: int, gated: bool = False) -> float:
    """FLOPs of a 2-layer MLP expert per token (3 matrices when gated, as SwiGLU)."""
    mats = 3 if gated else 2
    return 2.0 * mats * V.check_int("d_model", d_model, low=1) * V.check_int("d_hidden", d_hidden, low=1)
