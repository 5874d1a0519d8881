"""Mixture-of-experts blocks of Hugging Face models: routing records and crystallized motifs (SPEC 5.5, 9).

Three things, all found from module attributes (never by patching a model family's code):

1. `find_moe_blocks(model)` lists every sparse MoE block with its decoder-layer index, its router
   (the `gate`/`router` child), its experts container and its routing rule (`RouterRule`). The
   transformers 5.x families share one protocol, which is what is read:
   - router: a module with `weight` [E, H], `top_k` (and `num_experts`) whose forward maps hidden
     states to `(router_logits [N, E], top_k_weights [N, k], top_k_index [N, k])`;
   - experts: a fused module holding every expert in 3-D tensors (`gate_up_proj` [E, 2I, H],
     `down_proj` [E, H, I], `act_fn`, optionally transposed or with biases, see
     `memtrace.crystallize.fused_expert_layout`) called as `experts(hidden [N, H], index, weights)`.
   The rule is read from the router's attributes: softmax then top-k, renormalised or not
   (Mixtral: always; Qwen2-MoE / Qwen3-MoE / OLMoE: `norm_topk_prob`), DeepSeek-V2 softmax with
   greedy or group-limited greedy selection times `routed_scaling_factor`, DeepSeek-V3 sigmoid
   scores + `e_score_correction_bias` for the choice, group-limited (`n_group`, `topk_group`),
   weights from the uncorrected scores, renormalised (`norm_topk_prob`) and scaled. A module that
   has an `experts` child but does not fit is skipped with its reason (`MoEScan.describe()`);
   `attach_routers` refuses a model with such blocks (ValueError naming them and why).

2. `attach_routers(model, mgr)` puts a forward hook on each router. For every call it records,
   per token, the top-1 expert (the selected expert with the largest combination weight, i.e.
   the argmax of the router's scores among the selected ones) with
   `mgr.record_routing(layer, expert_idx [N], probs=probs [N, E])` (N = B*T tokens in row-major
   order, probs the router's distribution: softmax of the logits, or the sigmoid scores
   normalised to sum 1 for sigmoid routers; it keeps its graph, for the stability loss). Hooks
   return nothing: outputs are bitwise unchanged. Padding: tokens whose 2-D attention mask is 0
   record -1. The mask is read from the `attention_mask` argument of the attached model's forward
   (a forward pre-hook on `model`), or given explicitly with `handle.set_attention_mask(mask)` /
   `with handle.attention_mask(mask):` (which wins); a [B, Tk] mask with Tk >= T is aligned on its
   last T columns (KV-cache decoding); masks of another rank (4-D custom masks) are ignored.
   Recomputed forwards under gradient checkpointing (inside backward) are not recorded again.

3. Crystallized motifs run inside the model (`handle.apply_motifs(motifs)`, `handle.refresh()`).
   While at least one motif is held, the router and experts of every MoE block get an instance
   `forward` that wraps their own (nothing else of the block changes: shared experts, jitter,
   output reshapes run as before); with no motif held the original forwards are restored and the
   model runs bitwise as without memtrace. For a held motif (s, (e_s, ..., e_{s+k-1})):
   - at its start layer s the block routes every token as usual (top-k, both experts); a
     non-padding token whose top-1 there is e_s enters the motif;
   - at layers s+1 .. s+k-1 such a token is *carried*: the router runs only on the other tokens
     (the carried rows are not passed to it, so their router logits are never computed; the
     returned logits hold 0 for them), and the experts module runs the other tokens through its
     own forward and each carried token through one expert, e_{s+i}, read as a
     `FusedExpertView` of the fused tensors (no copy);
   - combination weight of a carried token: the sum of its top-k routing weights at the start
     layer (the block's total routed mass for it: 1 for renormalised softmax routers,
     `routed_scaling_factor` for renormalised DeepSeek-V3, less when not renormalised), detached,
     so the carried token's routed contribution keeps the scale the block gives it;
   - the top-1 recorded for a carried token is the motif's expert (it was computed by that expert,
     so the trie keeps counting the motif and `revalidate` sees fresh statistics), and its probs
     row is the one-hot of that expert, a constant (no router ran for it: the load-balance loss
     counts it where it went, the stability loss sees a determined continuation, no gradient);
     when the manager's `record_routing` takes a `carried` keyword, the [N] bool mask of carried
     tokens is passed too;
   - two motifs with the same start layer and first expert: the first one given (the registry's
     best) wins; a motif whose layers are not all MoE blocks, or whose expert ids are out of
     range, is skipped (`handle.skipped_motifs`);
   - frozen experts: every (layer, expert) of a held motif gets no gradient: a gradient hook on the
     fused tensors zeroes those experts' slices (the tensors are shared by all experts, so
     requires_grad cannot be switched per expert); hooks are removed when the motif is unfrozen
     or on detach. A zero gradient does not stop an optimizer with momentum or weight decay from
     moving a slice, so the frozen slices are snapshotted (only those experts) and written back
     right after every `torch.optim` optimizer step that holds the fused tensors (a global
     optimizer step post-hook, registered only while motifs are held) and by `refresh()`.
     `pin_frozen=False` turns the write-back off.
   - FLOPs saved are counted from the tokens actually carried (not estimated): per carried token
     and carried layer, the router matmul (2 H E) plus, with top-k > 1, the k-1 experts it no
     longer runs ((k-1) x 2 x 3 H I for a gated expert; `memtrace.crystallize.linear_router_flops`
     and `mlp_expert_flops`). `handle.flops_saved` (total), `handle.metrics()`; forwarded to the
     manager with `mgr.add_flops_saved(flops, 0)` per carried layer and `mgr.add_flops_saved(0, N)`
     per forward (the N token rows entering the first MoE block while motifs execute, padding
     included), so that the manager's FLOPs saved per token = saved / tokens seen while executing.
     The start layer saves nothing (its router decides the entry). Recomputed forwards
     (checkpointing) count nothing.
   - which motifs: `handle.refresh()` (and, by default, a check before every forward of the
     attached model) executes the manager's `held_motifs()` (the registry's in the
     crystallization phase, else none), so `mgr.step()`'s consider / revalidate / unfreeze take
     effect at the next forward; `handle.apply_motifs(motifs)` sets them by hand (and stops
     following the manager until the next `refresh()`).
   Carrying needs the token rows: one host sync per carried layer (`nonzero`). The carry state is
   rebuilt at the first MoE layer of every forward (so a checkpointed recompute, which repeats the
   same routing, reproduces it).

4. Distilled motifs (`mode="distill"`: `attach_routers(..., mode="distill", distill_steps=...,
   distill_lr=...)` or `handle.set_mode("distill", ...)`; the default mode "carry" is section 3
   unchanged, bitwise). Every held motif (s, (e_s, ..., e_{s+k-1})) gets a distilled expert D owned
   by the handle (not a parameter of the model, so the user's optimizer never sees it): a gated MLP
   of the start block's expert shape, initialised as a copy of e_s (`FusedExpertView.owned_copy`).
   A motif is first *distilling*, then *distilled*:
   - distilling: it executes exactly as in carry mode (outputs bitwise as in carry mode) and, on
     training-mode forwards of the model (`model.training`; never inside backward, so a
     checkpointed recompute collects nothing), the handle collects for every token entering it
     the pair (h_s, target): h_s the experts module's input row at layer s, target the sum over
     layers s..s+k-1 of the experts module's output row for that token (the block's routed
     contribution: at s the top-k mixture, at s+i the carried weight * e_{s+i}(h_{s+i})), detached,
     in float32. A shared expert outside the experts module (Qwen2-MoE, DeepSeek) is not part of
     the target and keeps running in both modes.
   - `handle.distill_step()` (the training loop calls it after its own backward / optimizer step;
     no extra forward) takes, for every distilling motif with collected rows, one AdamW step
     (lr `distill_lr`, no weight decay, D's own optimizer) on
         loss = mean over its rows and hidden units of (weight * D(h_s) - target)^2
     with weight the token's start-layer routed mass (as in carry mode), then drops the collected
     pairs. A step in which a motif had no rows does not count for it. After `distill_steps`
     counted steps (or `handle.finish_distillation(motifs)`) the motif is distilled: D is frozen
     (requires_grad False, eval mode, its optimizer dropped).
   - distilled: a token entering the motif at layer s gets `weight * D(h_s)` as the experts
     module's output instead of its top-k mixture (the router at s still runs: it decides the
     entry); at layers s+1..s+k-1 the router skips it as in carry mode (same records: the motif's
     expert, one-hot probs, the carried mask) and the experts module returns 0 for it without
     calling any expert: the MoE block adds nothing for that token there, attention and
     everything else still run.
   - FLOPs saved, from the rows actually skipped: per distilled token and skipped layer the router
     plus top_k experts (2 H E + top_k x expert); at the start layer top_k experts minus the one
     expert-sized D ((top_k - 1) x expert). Counted into `handle.flops_saved` and the manager's
     `add_flops_saved` as in carry mode (`tokens_skipped`, `tokens_distilled` in `metrics()`).
     The cost of training D is not a forward cost and is not subtracted.
   - D lives as long as its motif is held: a motif dropped from the held set loses its D (its
     chain was unfrozen, D would be stale); a re-application that keeps it (the manager's set
     changed elsewhere) keeps D and its progress. `set_mode("carry")` and `detach()` drop every D.
     D is not saved with the manager (`hf.save`, `mgr.state_dict()`): a resumed run distils again.
   Collecting and running D cost one host sync per start layer that has such tokens (`nonzero`,
   `unique`), besides carry mode's; at most the last 64 forwards' pairs wait for `distill_step`.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import _validate as V
from ..crystallize import FusedExpertView, fused_expert_layout, linear_router_flops, mlp_expert_flops

__all__ = ["MODES", "MoEBlock", "MoEHandle", "MoEScan", "RouterRule", "attach_routers", "apply_motifs",
           "find_moe_blocks"]

_ROUTER_NAMES = ("gate", "router")
_MISSING = object()
MODES = ("carry", "distill")
_DISTILLING, _DISTILLED = 1, 2     # a held motif's state in distill mode (per motif id, on device)
_MAX_PENDING = 64                  # collected forwards kept until distill_step (bounds memory)


# ----------------------------------------------------------------------------------------------
# Routing rules
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RouterRule:
    """How a router turns logits into (weights, indices); read from the router's attributes.

    scoring: "softmax" or "sigmoid". selection: "topk" (plain top-k of the scores),
    "group_limited_greedy" (DeepSeek-V2: keep the topk_group groups with the largest max score),
    "group_limited_bias" (DeepSeek-V3: choice scores = scores + e_score_correction_bias, keep the
    topk_group groups with the largest sum of their top-2 choice scores). normalize: the k
    weights renormalised to sum 1. scaling: factor applied to the weights at the end.
    """
    scoring: str
    selection: str
    top_k: int
    num_experts: int
    normalize: bool
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1

    def describe(self) -> str:
        sel = {"topk": f"top-{self.top_k}",
               "group_limited_greedy": f"top-{self.top_k} within the best {self.topk_group}/{self.n_group} groups",
               "group_limited_bias": f"top-{self.top_k} of score+correction bias within the best "
                                     f"{self.topk_group}/{self.n_group} groups"}[self.selection]
        txt = f"{self.scoring} over {self.num_experts} experts, {sel}"
        txt += ", renormalised" if self.normalize else ", not renormalised"
        if self.scaling != 1.0:
            txt += f", x{self.scaling:g}"
        return txt

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The router's distribution over experts [N, E] float32 (sigmoid scores normalised to 1)."""
        if self.scoring == "softmax":
            return torch.softmax(logits.float(), dim=-1)
        s = torch.sigmoid(logits.float())
        return s / s.sum(-1, keepdim=True).clamp_min(1e-20)

    def select(self, logits: torch.Tensor, correction_bias: torch.Tensor | None = None) -> tuple:
        """Reference routing: (weights [N, k] float32, indices [N, k]) from logits [N, E], weights
        sorted descending (transformers' routers may return them unsorted)."""
        logits = logits.float()
        E, k = self.num_experts, self.top_k
        scores = torch.softmax(logits, -1) if self.scoring == "softmax" else torch.sigmoid(logits)
        choice = scores if correction_bias is None else scores + correction_bias.float()
        if self.selection != "topk":
            grouped = choice.view(-1, self.n_group, E // self.n_group)
            if self.selection == "group_limited_bias":
                group_scores = grouped.topk(min(2, E // self.n_group), dim=-1)[0].sum(-1)
            else:
                group_scores = grouped.max(-1).values
            keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(self.topk_group, dim=-1)[1], 1.0)
            keep = keep.unsqueeze(-1).expand_as(grouped).reshape(-1, E).bool()
            choice = choice.masked_fill(~keep, float("-inf"))
        idx = choice.topk(k, dim=-1)[1]
        w = scores.gather(1, idx)
        if self.normalize:
            w = w / (w.sum(-1, keepdim=True) + (1e-20 if self.scoring == "sigmoid" else 0.0))
        w = w * self.scaling
        order = torch.sort(w, dim=-1, descending=True, stable=True)[1]
        return w.gather(1, order), idx.gather(1, order)


def _read_router(gate: nn.Module) -> tuple:
    """(RouterRule, None) or (None, reason)."""
    name = type(gate).__name__
    if isinstance(gate, nn.Linear):
        return None, (f"router {name} is a plain nn.Linear: the routing rule lives in the block's own forward "
                      "(transformers 4.x layout), which memtrace does not read")
    w = getattr(gate, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None, f"router {name} has no 2-D `weight` [num_experts, hidden]"
    top_k = getattr(gate, "top_k", None)
    if not isinstance(top_k, int) or top_k < 1:
        return None, f"router {name} has no integer `top_k`"
    E = getattr(gate, "num_experts", w.shape[0])
    if not isinstance(E, int) or E != w.shape[0] or top_k > E:
        return None, f"router {name}: num_experts={E!r} disagrees with weight {tuple(w.shape)} or top_k={top_k}"
    scaling = float(getattr(gate, "routed_scaling_factor", 1.0) or 1.0)
    if isinstance(getattr(gate, "e_score_correction_bias", None), torch.Tensor):
        G, TG = getattr(gate, "num_group", getattr(gate, "n_group", None)), getattr(gate, "topk_group", None)
        if not (isinstance(G, int) and isinstance(TG, int) and G >= 1 and E % G == 0 and 1 <= TG <= G):
            return None, f"router {name}: sigmoid router with unreadable groups (num_group={G!r}, topk_group={TG!r})"
        return RouterRule("sigmoid", "group_limited_bias", top_k, E, bool(getattr(gate, "norm_topk_prob", True)),
                          scaling, G, TG), None
    method = getattr(gate, "topk_method", None)
    if method is not None:
        if method == "greedy":
            return RouterRule("softmax", "topk", top_k, E, False, scaling), None
        if method == "group_limited_greedy":
            G, TG = getattr(gate, "num_group", None), getattr(gate, "topk_group", None)
            if not (isinstance(G, int) and isinstance(TG, int) and G >= 1 and E % G == 0 and 1 <= TG <= G):
                return None, f"router {name}: group-limited router with unreadable groups ({G!r}, {TG!r})"
            return RouterRule("softmax", "group_limited_greedy", top_k, E, False, scaling, G, TG), None
        return None, f"router {name}: unknown topk_method {method!r}"
    if getattr(gate, "bias", None) is not None and not isinstance(gate.bias, torch.Tensor):
        return None, f"router {name}: unreadable bias"
    # softmax over the logits then top-k; transformers' Mixtral router always renormalises.
    return RouterRule("softmax", "topk", top_k, E, bool(getattr(gate, "norm_topk_prob", True)), scaling), None


# ----------------------------------------------------------------------------------------------
# Finding the blocks
# ----------------------------------------------------------------------------------------------
@dataclass
class MoEBlock:
    """One sparse MoE block: where it is, its router, its experts, its rule."""
    name: str
    layer: int
    module: nn.Module
    gate: nn.Module
    gate_name: str
    experts: nn.Module
    rule: RouterRule
    layout: dict
    _views: dict = field(default_factory=dict, repr=False)

    @property
    def num_experts(self) -> int:
        return self.rule.num_experts

    @property
    def top_k(self) -> int:
        return self.rule.top_k

    @property
    def hidden_size(self) -> int:
        return self.layout["hidden"]

    @property
    def router_flops(self) -> float:
        """FLOPs of the router per token: the logits matmul, 2 H E."""
        return linear_router_flops(self.hidden_size, self.num_experts)

    @property
    def expert_flops(self) -> float:
        """FLOPs of one expert per token (2 x 3 H I gated, 2 x 2 H I otherwise)."""
        return mlp_expert_flops(self.hidden_size, self.layout["intermediate"], gated=self.layout["has_gate"])

    def expert(self, e: int) -> FusedExpertView:
        """Expert e as a module: a view of the fused tensors (cached; no copy)."""
        if e not in self._views:
            self._views[e] = FusedExpertView(self.experts, e)
        return self._views[e]

    def fused_tensors(self) -> dict:
        """name -> fused tensor [E, ...] of the experts (weights and biases)."""
        up = self.layout["up_name"]
        names = [up, "down_proj"] + ([f"{up}_bias", "down_proj_bias"] if self.layout["has_bias"] else [])
        return {n: getattr(self.experts, n) for n in names}

    def describe(self) -> str:
        shapes = ", ".join(f"{n} {list(t.shape)}" for n, t in self.fused_tensors().items())
        return (f"layer {self.layer}: {self.name} ({type(self.module).__name__}); router {self.gate_name} "
                f"({type(self.gate).__name__}): {self.rule.describe()}; experts {type(self.experts).__name__} "
                f"fused {shapes}{', gated' if self.layout['has_gate'] else ''}"
                f"{', transposed' if self.layout['is_transposed'] else ''}")


class MoEScan(list):
    """The MoE blocks of a model (a list of MoEBlock, by layer) and the MoE-like modules skipped."""

    def __init__(self, blocks=(), skipped=()):
        super().__init__(blocks)
        self.skipped = list(skipped)  # (module name, reason)

    def describe(self) -> str:
        lines = [f"{len(self)} MoE block(s) understood" + (":" if len(self) else "")]
        lines += ["  " + b.describe() for b in self]
        if self.skipped:
            lines.append(f"{len(self.skipped)} MoE-like module(s) skipped:")
            lines += [f"  {n}: {r}" for n, r in self.skipped]
        return "\n".join(lines)


def _layer_index(model: nn.Module, name: str) -> int | None:
    """Index of the decoder layer holding module `name`: the nearest ancestor that is an element of
    an nn.ModuleList (its `layer_idx`, or its self_attn's, when it has one; else its list index)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if not parts[i].isdigit():
            continue
        parent = model.get_submodule(".".join(parts[:i]))
        if isinstance(parent, nn.ModuleList):
            layer = parent[int(parts[i])]
            for obj in (layer, getattr(layer, "self_attn", None)):
                li = getattr(obj, "layer_idx", None)
                if isinstance(li, int) and not isinstance(li, bool):
                    return li
            return int(parts[i])
    return None


def find_moe_blocks(model: nn.Module) -> MoEScan:
    """Every sparse MoE block of `model` (a module with an `experts` child and a `gate`/`router`
    child that fit the protocol in the module docstring), sorted by layer; modules with an
    `experts` child that do not fit are listed in `.skipped` with the reason."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    blocks, skipped = [], []
    for name, mod in model.named_modules():
        experts = mod._modules.get("experts")
        if not isinstance(experts, nn.Module):
            continue
        gname = next((n for n in _ROUTER_NAMES if isinstance(mod._modules.get(n), nn.Module)), None)
        if gname is None:
            skipped.append((name, f"{type(mod).__name__} has experts but no `gate`/`router` sub-module"))
            continue
        gate = mod._modules[gname]
        rule, why = _read_router(gate)
        if rule is None:
            skipped.append((name, why))
            continue
        layout = fused_expert_layout(experts)
        if layout is None:
            skipped.append((name, f"experts {type(experts).__name__} are not a fused experts module "
                                  "(gate_up_proj/up_proj and down_proj [num_experts, ...] tensors and act_fn)"))
            continue
        if layout["num_experts"] != rule.num_experts or layout["hidden"] != gate.weight.shape[1]:
            skipped.append((name, f"router ({rule.num_experts} experts, hidden {gate.weight.shape[1]}) and experts "
                                  f"({layout['num_experts']} experts, hidden {layout['hidden']}) disagree"))
            continue
        layer = _layer_index(model, name)
        if layer is None:
            skipped.append((name, "not inside an nn.ModuleList of layers: its layer index is unknown"))
            continue
        blocks.append(MoEBlock(name, layer, mod, gate, gname, experts, rule, layout))
    blocks.sort(key=lambda b: b.layer)
    for a, b in zip(blocks, blocks[1:]):
        if a.layer == b.layer:
            skipped.append((b.name, f"layer index {b.layer} is also claimed by {a.name}"))
    seen, unique = set(), []
    for b in blocks:
        if b.layer not in seen:
            seen.add(b.layer)
            unique.append(b)
    return MoEScan(unique, skipped)


# ----------------------------------------------------------------------------------------------
# The handle: recording hooks, carry state, motif execution
# ----------------------------------------------------------------------------------------------
def _in_backward() -> bool:
    """True inside autograd's backward (a checkpointed forward being recomputed)."""
    return torch._C._current_graph_task_id() != -1


def _zero_rows(rows: torch.Tensor):
    def hook(grad):
        return grad.index_fill(0, rows.to(grad.device), 0)
    return hook


@dataclass
class _Carry:
    expert: torch.Tensor   # [N] long, -1 where not carried
    weight: torch.Tensor   # [N] float32, detached
    mask: torch.Tensor     # [N] bool
    skip: torch.Tensor | None = None   # [N] bool, carried rows of distilled motifs (distill mode only)


@dataclass
class _Entry:
    """Tokens entering a motif at its start layer, in distill mode."""
    motif: torch.Tensor    # [N] long motif id at this start layer, -1 where none
    weight: torch.Tensor   # [N] float32, detached: the routed mass
    distilled: torch.Tensor   # [N] bool: run D here, skip the chain's later layers
    collect: torch.Tensor     # [N] bool: a distilling motif, collect (h_s, target)


class _Distiller:
    """A held motif's distilled expert D (an owned copy of e_s at first) and its own optimizer."""

    def __init__(self, block: "MoEBlock", first_expert: int, lr: float):
        self.expert = block.expert(first_expert).owned_copy()
        self.expert.requires_grad_(True)
        self.opt = torch.optim.AdamW(self.expert.parameters(), lr=lr, weight_decay=0.0)
        self.steps = 0            # distillation steps in which the motif had rows
        self.rows = 0             # rows of the last step
        self.loss = None          # loss before the last step
        self.distilled = False

    def finish(self) -> None:
        self.distilled = True
        for p in self.expert.parameters():
            p.grad = None
        self.expert.requires_grad_(False)
        self.expert.eval()
        self.opt = None       # its moments are no longer needed


def _or(a, b):
    if a is None:
        return b
    return a if b is None else a | b


def _check_mode(mode, distill_steps, distill_lr) -> tuple:
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return (mode, V.check_int("distill_steps", distill_steps, low=1),
            V.check_float("distill_lr", distill_lr, low=0.0, low_open=True))


def _motif_fields(m) -> tuple:
    if not all(hasattr(m, a) for a in ("start_layer", "experts")):
        if isinstance(m, (tuple, list)) and len(m) == 2:
            return int(m[0]), tuple(int(e) for e in m[1])
        raise TypeError(f"a motif must be a memtrace.Motif (start_layer, experts) or a pair, got {m!r}")
    return int(m.start_layer), tuple(int(e) for e in m.experts)


class MoEHandle:
    """What `attach_routers` returns; `detach()` removes every hook and patch (idempotent)."""

    def __init__(self, model: nn.Module, mgr, scan: MoEScan, *, record: bool = True, pin_frozen: bool = True,
                 mode: str = "carry", distill_steps: int = 100, distill_lr: float = 1e-3):
        self.mode, self.distill_steps, self.distill_lr = _check_mode(mode, distill_steps, distill_lr)
        self.model, self.mgr, self.blocks = model, mgr, scan
        self.by_layer = {b.layer: b for b in scan}
        self.record, self.pin_frozen = bool(record), bool(pin_frozen)
        self.flops_saved = 0.0
        self.tokens_seen = 0              # token rows at the first MoE block (padding included)
        self.tokens_executing = 0         # the same, counted only while motifs execute
        self.tokens_carried = 0           # carried token-layers
        self.router_rows_skipped = 0      # carried + skipped token-layers; the router rows not computed
        self.tokens_skipped = 0           # token-layers of distilled motifs skipped (no router, no expert)
        self.tokens_distilled = 0         # tokens that ran a distilled expert at a start layer
        self.skipped_motifs: list = []    # (motif key, reason)
        self._motifs: list = []           # applied (start_layer, experts) keys, in priority order
        self._mask_override = _MISSING
        self._auto_mask = None
        self._carry: dict = {}
        self._carry_n = -1
        self._hooks: list = []
        self._patched: list = []          # (module, previous instance forward or _MISSING)
        self._freeze_hooks: list = []
        self._snapshots: list = []        # (fused tensor, rows, values)
        self._start_maps: dict = {}       # layer -> (lookup [E] long motif id, experts [M, maxlen] long)
        self._given: list = []            # the motifs last given to apply_motifs (re-applied by set_mode)
        # distill mode (module docstring, section 4)
        self._distillers: dict = {}       # motif key -> _Distiller; survives a re-application that keeps it
        self._chains: dict = {}           # start layer -> [motif keys] in motif-id order
        self._states: dict = {}           # start layer -> [M] long _DISTILLING / _DISTILLED per motif id
        self._lengths: dict = {}          # start layer -> [M] long chain length per motif id
        self._entry: dict = {}            # start layer -> _Entry of the forward in progress
        self._collecting: dict = {}       # start layer -> rows being summed in the forward in progress
        self._pending: list = []          # (start layer, keys, motif ids, h_s, target, weight) per forward
        self._first_layer = scan[0].layer if len(scan) else None
        self._follow = True               # execute the manager's held motifs (refresh); False after apply_motifs
        self._source_keys = None          # the manager's held keys last seen
        self._opt_hook = None
        self._attached = True
        self._rec_kwargs = self._record_signature(mgr)
        self._hooks.append(model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
        try:
            self._mask_pos = list(inspect.signature(model.forward).parameters).index("attention_mask")
        except (ValueError, TypeError):
            self._mask_pos = None
        if self.record:
            for b in scan:
                self._hooks.append(b.gate.register_forward_hook(self._make_record_hook(b)))

    # -- manager plumbing ------------------------------------------------------------------------
    @staticmethod
    def _record_signature(mgr) -> set:
        fn = getattr(mgr, "record_routing", None)
        if fn is None:
            return set()
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            return {"probs"}
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return {"probs", "carried"}
        return {k for k in ("probs", "carried") if k in params}

    def _record(self, layer: int, top1: torch.Tensor, probs: torch.Tensor, carried) -> None:
        fn = getattr(self.mgr, "record_routing", None)
        if fn is None:
            return
        kw = {}
        if "probs" in self._rec_kwargs:
            kw["probs"] = probs
        if "carried" in self._rec_kwargs and carried is not None:
            kw["carried"] = carried
        fn(layer, top1, **kw)

    # -- attention mask --------------------------------------------------------------------------
    def set_attention_mask(self, mask) -> None:
        """Use this 2-D [B, T] mask (nonzero/True = real token) for the next forwards; None: no
        padding; `handle.clear_attention_mask()` returns to the mask read from model(...)."""
        if mask is not None:
            V.check_tensor("attention_mask", mask, ndim=2)
        self._mask_override = mask

    def clear_attention_mask(self) -> None:
        self._mask_override = _MISSING

    @contextlib.contextmanager
    def attention_mask(self, mask):
        prev = self._mask_override
        self.set_attention_mask(mask)
        try:
            yield self
        finally:
            self._mask_override = prev

    def _model_pre_hook(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and self._mask_pos is not None and len(args) > self._mask_pos:
            mask = args[self._mask_pos]
        self._auto_mask = mask if isinstance(mask, torch.Tensor) else None
        if self._follow and len(self.blocks) and not _in_backward():
            motifs = self._manager_motifs()
            keys = [_motif_fields(m) for m in motifs]
            if keys != self._source_keys:
                self._source_keys = keys
                self.apply_motifs(motifs, follow=True)

    def _token_mask(self, n: int, device) -> torch.Tensor | None:
        """[n] bool, True for real tokens, or None (no usable 2-D mask)."""
        mask = self._auto_mask if self._mask_override is _MISSING else self._mask_override
        if mask is None or mask.dim() != 2:
            return None
        B, Tk = mask.shape
        if B == 0 or n % B or n // B > Tk:
            raise ValueError(f"attention_mask of shape {tuple(mask.shape)} does not fit the {n} tokens the MoE "
                             "router received (expected [B, Tk] with B*T tokens and Tk >= T)")
        return mask[:, Tk - n // B:].reshape(n).to(device=device).bool()

    # -- recording -------------------------------------------------------------------------------
    def _make_record_hook(self, block: MoEBlock):
        def hook(module, args, output):
            if not self._attached:
                return None
            if not (isinstance(output, (tuple, list)) and len(output) >= 3):
                raise RuntimeError(f"memtrace: router {type(module).__name__} of {block.name} returned "
                                   f"{type(output).__name__}, not (logits, top_k_weights, top_k_index)")
            logits, w, idx = output[0], output[1], output[2]
            n = idx.shape[0]
            # the differentiable part runs in a checkpointed recompute too (the recompute must save
            # the same tensors as the forward did); only the recording is skipped there
            probs = block.rule.probs(logits)
            carry = self._carry.get(block.layer) if self._carry_n == n else None
            carried = None
            if carry is not None:  # no router ran for carried rows: their distribution is their expert
                carried = carry.mask
                onehot = torch.nn.functional.one_hot(carry.expert.clamp_min(0), probs.shape[-1]).to(probs.dtype)
                probs = torch.where(carried.unsqueeze(-1), onehot, probs)
            if _in_backward():
                return None
            if block.layer == self._first_layer:
                self.tokens_seen += n
            top1 = idx.gather(-1, w.argmax(-1, keepdim=True)).squeeze(-1).long()
            valid = self._token_mask(n, top1.device)
            if valid is not None:
                top1 = top1.masked_fill(~valid, -1)
            self._record(block.layer, top1, probs, carried)
            return None
        return hook

    # -- motifs ----------------------------------------------------------------------------------
    @property
    def held_motifs(self) -> list:
        """The (start_layer, experts) keys executing now, in priority order."""
        return list(self._motifs)

    def _plan(self, motifs) -> tuple:
        keys, skipped, firsts = [], [], {}
        for m in motifs:
            s, ex = _motif_fields(m)
            key = (s, ex)
            if key in keys:
                continue
            if len(ex) < 2:
                skipped.append((key, "a motif of one expert carries no token past its start layer"))
                continue
            missing = [s + i for i in range(len(ex)) if (s + i) not in self.by_layer]
            if missing:
                skipped.append((key, f"layers {missing} have no MoE block"))
                continue
            bad = [(s + i, e) for i, e in enumerate(ex) if not 0 <= e < self.by_layer[s + i].num_experts]
            if bad:
                skipped.append((key, f"expert ids out of range at (layer, expert) {bad}"))
                continue
            if (s, ex[0]) in firsts:
                skipped.append((key, f"shadowed by {firsts[(s, ex[0])]} (same start layer and first expert)"))
                continue
            firsts[(s, ex[0])] = key
            keys.append(key)
        return keys, skipped

    def apply_motifs(self, motifs, *, follow: bool = False) -> list:
        """Execute exactly these motifs from now on (replacing the previous set; an empty set
        restores the original forwards and unfreezes everything). Returns the applied keys.
        The handle stops following the manager's held motifs until `refresh()` (follow=False)."""
        if not self._attached:
            raise RuntimeError("this MoE handle was detached")
        self._follow = bool(follow)
        motifs = list(motifs)
        keys, skipped = self._plan(motifs)
        self._unapply()
        self._given = motifs
        self.skipped_motifs = skipped
        self._keep_distillers(keys)
        if not keys:
            return []
        self._motifs = keys
        by_start: dict = {}
        for s, ex in keys:
            by_start.setdefault(s, []).append(ex)
        for s, chains in by_start.items():
            blk = self.by_layer[s]
            dev = blk.gate.weight.device
            lookup = torch.full((blk.num_experts,), -1, dtype=torch.long, device=dev)
            width = max(len(c) for c in chains)
            table = torch.full((len(chains), width), -1, dtype=torch.long, device=dev)
            for i, c in enumerate(chains):
                lookup[c[0]] = i
                table[i, :len(c)] = torch.tensor(c, dtype=torch.long, device=dev)
            self._start_maps[s] = (lookup, table)
            if self.mode == "distill":
                self._chains[s] = [(s, c) for c in chains]
                self._lengths[s] = (table >= 0).sum(1)
        self._refresh_states()
        frozen: dict = {}
        for s, ex in keys:
            for i, e in enumerate(ex):
                frozen.setdefault(s + i, set()).add(e)
        for layer, es in frozen.items():
            blk = self.by_layer[layer]
            for t in blk.fused_tensors().values():
                rows = torch.tensor(sorted(es), dtype=torch.long, device=t.device)
                if t.requires_grad:
                    self._freeze_hooks.append(t.register_hook(_zero_rows(rows)))
                if self.pin_frozen:
                    self._snapshots.append((t, rows, t.detach().index_select(0, rows).clone()))
        if self.pin_frozen and self._snapshots:
            owned = {id(t) for t, _, _ in self._snapshots}

            def after_step(optimizer, args, kwargs):
                if any(id(p) in owned for g in optimizer.param_groups for p in g["params"]):
                    self.restore_frozen()
            self._opt_hook = register_optimizer_step_post_hook(after_step)
        for blk in self.blocks:
            self._patch(blk.gate, self._make_gate_forward(blk))
            self._patch(blk.experts, self._make_experts_forward(blk))
        return list(keys)

    # -- distill mode ----------------------------------------------------------------------------
    def set_mode(self, mode: str, *, distill_steps: int | None = None, distill_lr: float | None = None) -> None:
        """Switch between "carry" (section 3) and "distill" (section 4) execution of the held
        motifs, and/or change distill_steps / distill_lr (None: keep). Leaving distill mode drops
        every distilled expert; entering it gives each held motif a fresh one. A motif whose count
        already reaches a lowered distill_steps is distilled now."""
        if not self._attached:
            raise RuntimeError("this MoE handle was detached")
        mode, steps, lr = _check_mode(mode, self.distill_steps if distill_steps is None else distill_steps,
                                      self.distill_lr if distill_lr is None else distill_lr)
        changed = mode != self.mode
        self.mode, self.distill_steps, self.distill_lr = mode, steps, lr
        for d in self._distillers.values():
            if d.opt is not None:
                for g in d.opt.param_groups:
                    g["lr"] = lr
        if changed:
            self._distillers.clear()
            self._pending.clear()
            if self._given:
                self.apply_motifs(self._given, follow=self._follow)
        self.finish_distillation([k for k, d in self._distillers.items() if d.steps >= steps])

    def _keep_distillers(self, keys) -> None:
        """Drop the distilled experts of motifs no longer held; give new held motifs one (distill mode)."""
        held = set(keys)
        for k in [k for k in self._distillers if k not in held]:
            del self._distillers[k]
        if self.mode != "distill":
            return
        for s, ex in keys:
            if (s, ex) not in self._distillers:
                self._distillers[(s, ex)] = _Distiller(self.by_layer[s], ex[0], self.distill_lr)

    def _refresh_states(self) -> None:
        for s, chains in self._chains.items():
            st = [_DISTILLED if self._distillers[k].distilled else _DISTILLING for k in chains]
            self._states[s] = torch.tensor(st, dtype=torch.long, device=self._lengths[s].device)

    def distill_step(self) -> dict:
        """One AdamW step of every distilling motif's D on the (h_s, target) pairs collected since
        the last call (module docstring, section 4), then drop them. Motifs that reach
        distill_steps become distilled. Returns {motif key: loss before the step (float)}."""
        if not self._attached:
            raise RuntimeError("this MoE handle was detached")
        pending, self._pending = self._pending, []
        if self.mode != "distill":
            return {}
        parts: dict = {}
        for _, chains, mids, x, target, weight in pending:
            for m in torch.unique(mids).tolist():
                d = self._distillers.get(chains[m])
                if d is None or d.distilled:      # released or finished since it was collected
                    continue
                rows = (mids == m).nonzero().squeeze(1)
                parts.setdefault(chains[m], []).append((x.index_select(0, rows), target.index_select(0, rows),
                                                        weight.index_select(0, rows)))
        losses, done = {}, []
        with torch.enable_grad():
            for key, ps in parts.items():
                d = self._distillers[key]
                x, target, weight = (torch.cat(t) for t in zip(*ps))
                pred = d.expert(x).float() * weight.unsqueeze(1)
                loss = nn.functional.mse_loss(pred, target)
                d.opt.zero_grad(set_to_none=True)
                loss.backward()
                d.opt.step()
                d.steps += 1
                d.rows = int(x.shape[0])
                d.loss = losses[key] = float(loss.detach())
                if d.steps >= self.distill_steps:
                    done.append(key)
        self.finish_distillation(done)
        return losses

    def finish_distillation(self, motifs=None) -> list:
        """Make these held motifs (keys or Motifs; None: every distilling one) distilled now: D
        frozen, executed from the next forward. Returns the keys switched."""
        if not self._attached:
            raise RuntimeError("this MoE handle was detached")
        if motifs is None:
            keys = [k for k, d in self._distillers.items() if not d.distilled]
        else:
            keys = [_motif_fields(m) for m in motifs]
            if self.mode != "distill" and keys:
                raise ValueError("motifs: the handle is in carry mode; call set_mode('distill') first")
            unknown = [k for k in keys if k not in self._distillers]
            if unknown:
                raise ValueError(f"motifs {unknown} are not held motifs of this handle (held: {list(self._motifs)})")
        switched = [k for k in keys if not self._distillers[k].distilled]
        for k in switched:
            self._distillers[k].finish()
        if switched:
            self._refresh_states()
        return switched

    def distilled_expert(self, motif) -> nn.Module | None:
        """The distilled expert D of a held motif (key or Motif) in distill mode, else None."""
        return getattr(self._distillers.get(_motif_fields(motif)), "expert", None)

    def distill_status(self) -> dict:
        """{motif key: {"steps", "rows", "loss", "distilled"}} of the held motifs in distill mode (rows and
        loss: the last distillation step's rows and loss before it)."""
        return {k: {"steps": d.steps, "rows": d.rows, "loss": d.loss, "distilled": d.distilled}
                for k, d in self._distillers.items()}

    def _collect(self, layer: int, hidden: torch.Tensor, out: torch.Tensor, entry) -> None:
        """Sum the experts' output rows of tokens in distilling motifs over their chain (section 4).
        Everything is detached before it is indexed: no autograd node may save a tensor here, since
        a checkpointed recompute (which collects nothing) must save what the forward saved."""
        for s, c in list(self._collecting.items()):
            live = c["length"] > layer - s        # rows still inside their chain at this layer
            rows = out.detach().index_select(0, c["rows"]).float()
            c["target"] = c["target"] + torch.where(live.unsqueeze(1), rows, 0.0)
            if layer == s + c["width"] - 1:
                del self._collecting[s]
                self._pending.append((s, self._chains[s], c["mids"], c["x"], c["target"], c["weight"]))
                del self._pending[:-_MAX_PENDING]
        if entry is None:
            return
        idx = entry.collect.nonzero().squeeze(1)
        if not idx.numel():
            return
        mids = entry.motif.index_select(0, idx)
        self._collecting[layer] = {"rows": idx, "mids": mids, "length": self._lengths[layer].to(mids.device)[mids],
                                   "width": self._start_maps[layer][1].shape[1],
                                   "x": hidden.detach().index_select(0, idx),
                                   "target": out.detach().index_select(0, idx).float(),
                                   "weight": entry.weight.index_select(0, idx)}

    def _manager_motifs(self) -> list:
        held = getattr(self.mgr, "held_motifs", None)
        if callable(held):
            return list(held())
        if getattr(self.mgr, "registry", None) is not None:
            return list(self.mgr.registry.motifs)
        return []

    def refresh(self) -> list:
        """Write the frozen slices back (pin_frozen), then execute the manager's held motifs
        (`mgr.held_motifs()` when it has it, else `mgr.registry.motifs`) and follow them from now
        on (the attached model's forward pre-hook re-reads them before every forward, so a change
        made by `mgr.step()` or `mgr.load_state_dict()` takes effect at the next forward).
        Returns the applied keys."""
        self.restore_frozen()
        motifs = self._manager_motifs()
        self._source_keys = [_motif_fields(m) for m in motifs]
        keys, _ = self._plan(motifs)
        if keys != self._motifs or not self._follow:
            return self.apply_motifs(motifs, follow=True)
        return list(self._motifs)

    def restore_frozen(self) -> None:
        """Write the snapshot of every frozen expert slice back into the fused tensors."""
        with torch.no_grad():
            for t, rows, vals in self._snapshots:
                t.index_copy_(0, rows, vals)

    def clear_motifs(self) -> None:
        self.apply_motifs([])

    def _patch(self, module: nn.Module, fwd) -> None:
        self._patched.append((module, module.__dict__.get("forward", _MISSING)))
        module.forward = fwd

    def _unapply(self) -> None:
        for module, prev in reversed(self._patched):
            if prev is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = prev
        self._patched.clear()
        if self._opt_hook is not None:
            self._opt_hook.remove()
            self._opt_hook = None
        for h in self._freeze_hooks:
            h.remove()
        self._freeze_hooks.clear()
        self._snapshots.clear()
        self._start_maps.clear()
        self._motifs = []
        self._carry.clear()
        self._carry_n = -1
        for d in (self._chains, self._states, self._lengths, self._entry, self._collecting):
            d.clear()

    def _count(self, block: MoEBlock, n: int) -> None:
        saved = n * (block.router_flops + (block.top_k - 1) * block.expert_flops)
        self.tokens_carried += n
        self.router_rows_skipped += n
        self._add_saved(saved)

    def _count_skipped(self, block: MoEBlock, n: int) -> None:
        # a distilled motif's later layer: neither the router nor any of the top_k experts runs
        self.tokens_skipped += n
        self.router_rows_skipped += n
        self._add_saved(n * (block.router_flops + block.top_k * block.expert_flops))

    def _count_distilled(self, block: MoEBlock, n: int) -> None:
        # a distilled motif's start layer: one expert-sized D instead of the top_k experts
        self.tokens_distilled += n
        self._add_saved(n * (block.top_k - 1) * block.expert_flops)

    def _add_saved(self, saved: float) -> None:
        self.flops_saved += saved
        add = getattr(self.mgr, "add_flops_saved", None)
        if callable(add):
            add(saved, 0)

    def _make_gate_forward(self, block: MoEBlock):
        orig = block.gate.forward          # bound: the class forward, or whatever was there before
        H, E = block.hidden_size, block.num_experts

        def forward(hidden_states, *args, **kwargs):
            flat = hidden_states.reshape(-1, H)
            n = flat.shape[0]
            if block.layer == self._first_layer or self._carry_n != n:
                self._carry.clear()
                self._entry.clear()
                self._carry_n = n
                if not _in_backward():
                    self._collecting.clear()       # rows of an earlier forward that did not finish
                if block.layer == self._first_layer and not _in_backward():
                    self.tokens_executing += n
                    add = getattr(self.mgr, "add_flops_saved", None)
                    if callable(add):
                        add(0.0, n)
            carry = self._carry.get(block.layer)
            if carry is None:
                out = orig(hidden_states, *args, **kwargs)
                free = None
            else:
                free_idx = (~carry.mask).nonzero().squeeze(1)
                car_idx = carry.mask.nonzero().squeeze(1)
                lg, w, ix = orig(flat.index_select(0, free_idx), *args, **kwargs)[:3]
                k = ix.shape[-1]
                lg = lg.new_zeros(n, E).index_copy(0, free_idx, lg)
                wf = w.new_zeros(n, k).index_copy(0, free_idx, w)
                wf = wf.index_put((car_idx, torch.zeros_like(car_idx)),
                                  carry.weight.index_select(0, car_idx).to(w.dtype))
                ixf = ix.new_zeros(n, k).index_copy(0, free_idx, ix)
                ixf = ixf.index_copy(0, car_idx, carry.expert.index_select(0, car_idx).to(ix.dtype)
                                     .unsqueeze(1).expand(-1, k).contiguous())
                out = (lg, wf, ixf)
                free = ~carry.mask
                if not _in_backward() and car_idx.numel():
                    n_skip = 0 if carry.skip is None else int(carry.skip.sum())
                    if n_skip:
                        self._count_skipped(block, n_skip)
                    if car_idx.numel() > n_skip:
                        self._count(block, int(car_idx.numel()) - n_skip)
            if block.layer in self._start_maps:
                self._start(block, out, free, n)
            return out
        return forward

    def _start(self, block: MoEBlock, out, free, n: int) -> None:
        lookup, table = self._start_maps[block.layer]
        w, ix = out[1], out[2]
        top1 = ix.gather(-1, w.argmax(-1, keepdim=True)).squeeze(-1).long()
        mid = lookup.to(top1.device)[top1]
        ok = mid >= 0
        if free is not None:
            ok = ok & free
        valid = self._token_mask(n, top1.device)
        if valid is not None:
            ok = ok & valid
        weight = w.detach().float().sum(-1)
        table = table.to(top1.device)
        safe = mid.clamp_min(0)
        dist = None
        states = self._states.get(block.layer)
        if states is not None:          # distill mode
            st = torch.where(ok, states.to(top1.device)[safe], 0)
            dist = st == _DISTILLED
            self._entry[block.layer] = _Entry(torch.where(ok, mid, -1), weight, dist, st == _DISTILLING)
        for i in range(1, table.shape[1]):
            ex = table[:, i][safe]
            m = ok & (ex >= 0)
            skip = None if dist is None else m & dist
            layer = block.layer + i
            prev = self._carry.get(layer)
            if prev is None:
                self._carry[layer] = _Carry(torch.where(m, ex, -1), torch.where(m, weight, 0.0), m, skip)
            else:
                self._carry[layer] = _Carry(torch.where(m, ex, prev.expert), torch.where(m, weight, prev.weight),
                                            m | prev.mask, _or(skip, prev.skip))

    def _make_experts_forward(self, block: MoEBlock):
        orig = block.experts.forward

        def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            n = hidden_states.shape[0]
            carry = self._carry.get(block.layer) if self._carry_n == n else None
            entry = self._entry.get(block.layer) if self._carry_n == n else None
            if carry is None and entry is None:
                return orig(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
            dist_idx = None if entry is None else entry.distilled.nonzero().squeeze(1)
            if carry is None and not dist_idx.numel():    # distilling motifs only: the block's own forward
                out = orig(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
            else:
                out = self._mixed_experts(block, orig, carry, entry, dist_idx, hidden_states, top_k_index,
                                          top_k_weights, *args, **kwargs)
            if entry is not None or self._collecting:
                if self.model.training and not _in_backward():
                    self._collect(block.layer, hidden_states, out, entry)
            return out
        return forward

    def _mixed_experts(self, block, orig, carry, entry, dist_idx, hidden_states, top_k_index, top_k_weights,
                       *args, **kwargs):
        """The experts' output [N, H] when some rows are carried, skipped or run a distilled expert."""
        n = hidden_states.shape[0]
        special = carry.mask if carry is not None else hidden_states.new_zeros(n, dtype=torch.bool)
        if dist_idx is not None and dist_idx.numel():
            special = special.index_fill(0, dist_idx, True)
        free_idx = (~special).nonzero().squeeze(1)
        out_f = orig(hidden_states.index_select(0, free_idx), top_k_index.index_select(0, free_idx),
                     top_k_weights.index_select(0, free_idx), *args, **kwargs)
        out = out_f.new_zeros(n, out_f.shape[-1]).index_copy(0, free_idx, out_f)
        if carry is not None:
            # skipped rows (distilled motifs past their start) stay 0: no expert runs for them
            run = carry.mask if carry.skip is None else carry.mask & ~carry.skip
            car_idx = run.nonzero().squeeze(1)
            experts = carry.expert.index_select(0, car_idx)
            for e in torch.unique(experts).tolist():
                rows = car_idx[experts == e]
                y = block.expert(int(e))(hidden_states.index_select(0, rows))
                y = y * top_k_weights.index_select(0, rows)[:, 0, None]
                out = out.index_copy(0, rows, y.to(out.dtype))
        if dist_idx is not None and dist_idx.numel():
            chains = self._chains[block.layer]
            mids = entry.motif.index_select(0, dist_idx)
            for m in torch.unique(mids).tolist():
                rows = dist_idx[mids == m]
                y = self._distillers[chains[m]].expert(hidden_states.index_select(0, rows))
                y = y * entry.weight.index_select(0, rows).to(y.dtype).unsqueeze(1)
                out = out.index_copy(0, rows, y.to(out.dtype))
            if not _in_backward():
                self._count_distilled(block, int(dist_idx.numel()))
        return out

    # -- metrics and teardown --------------------------------------------------------------------
    def metrics(self) -> dict:
        losses = [d.loss for d in self._distillers.values() if not d.distilled and d.loss is not None]
        return {"flops_saved": self.flops_saved, "tokens_seen": self.tokens_seen,
                "tokens_executing": self.tokens_executing,
                "flops_saved_per_token": self.flops_saved / self.tokens_executing if self.tokens_executing else 0.0,
                "tokens_carried": self.tokens_carried, "motifs_executing": len(self._motifs),
                "motifs_skipped": len(self.skipped_motifs), "mode": self.mode,
                "tokens_skipped": self.tokens_skipped, "tokens_distilled": self.tokens_distilled,
                "motifs_distilling": sum(1 for d in self._distillers.values() if not d.distilled),
                "motifs_distilled": sum(1 for d in self._distillers.values() if d.distilled),
                "distill_loss": sum(losses) / len(losses) if losses else None}

    def describe(self) -> str:
        lines = [self.blocks.describe()]
        for k in self._motifs:
            d = self._distillers.get(k)
            state = "" if d is None else (" (distilled)" if d.distilled else f" (distilling, {d.steps} steps)")
            lines.append(f"executing motif {k}{state}")
        lines += [f"skipped motif {k}: {r}" for k, r in self.skipped_motifs]
        return "\n".join(lines)

    def detach(self) -> None:
        """Remove the hooks, restore the original forwards, unfreeze (gradient hooks removed)."""
        if not self._attached:
            return
        self._unapply()
        self._distillers.clear()
        self._pending.clear()
        self._given = []
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._attached = False

    @property
    def attached(self) -> bool:
        return self._attached


def attach_routers(model: nn.Module, mgr, *, strict: bool = True, record: bool = True, pin_frozen: bool = True,
                   mode: str = "carry", distill_steps: int = 100, distill_lr: float = 1e-3) -> MoEHandle:
    """Hook the routers of every MoE block of `model` (see the module docstring); returns the handle.

    A model without MoE blocks gives a handle with no blocks. With strict=True (default), a model
    with MoE-like modules that are not understood raises ValueError naming each and why, and the
    model is left untouched; strict=False hooks the understood blocks only. mode: how held motifs
    execute, "carry" (section 3) or "distill" (section 4, with distill_steps and distill_lr).
    """
    _check_mode(mode, distill_steps, distill_lr)
    scan = find_moe_blocks(model)
    if scan.skipped and strict:
        raise ValueError("memtrace cannot read the MoE blocks of this model (nothing was attached):\n"
                         + scan.describe())
    num_layers = getattr(mgr, "num_layers", None)
    if isinstance(num_layers, int):
        over = [b.name for b in scan if b.layer >= num_layers]
        if over:
            raise ValueError(f"MoE blocks {over} sit at layers >= the manager's num_layers={num_layers}")
    return MoEHandle(model, mgr, scan, record=record, pin_frozen=pin_frozen, mode=mode, distill_steps=distill_steps,
                     distill_lr=distill_lr)


def apply_motifs(handle: MoEHandle, motifs) -> list:
    """`handle.apply_motifs(motifs)`: execute exactly these motifs (empty: none)."""
    if not isinstance(handle, MoEHandle):
        raise TypeError(f"handle must be what attach_routers returned, got {type(handle).__name__}")
    return handle.apply_motifs(motifs)
