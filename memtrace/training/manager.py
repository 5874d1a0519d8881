"""Memtrace: the training manager (SPEC 9). One object owns the trace memory of every layer, the
routing trie, the motif registry and the captures, and runs the seeds' curriculum.

    mgr = mt.Memtrace(num_layers, num_heads, num_experts=None, config=None, device=None)
    out = mgr.attention(layer, q, k, v, causal=True, key_padding_mask=None, scale=None)
    mgr.record_routing(layer, expert_idx, probs=None)
    (task_loss + mgr.aux_loss()).backward()
    metrics = mgr.step(token_loss=None)

What a step does is `memtrace.training.schedule.plan_at(config, mgr.step_count)`:
- bias (trace-biased phases): attention gets the layer's traces as a TraceBias with
  alpha = bias_strength / max(M) of that layer, a 0-d device tensor recomputed after each memory
  update (where the op takes a tensor alpha; else the same value as a float), and no bias at all
  while the layer's memory is empty;
- trace loss (trace_loss_weight > 0, biased steps): the share of attention on stored edges, from
  the call's lse (`memtrace.losses.trace_attention_mass`); its gradient includes the softmax's
  push-down of the other keys, one more attention forward and backward per layer in the backward
  (without it the loss grows q and k without bound and training stalls);
- capture: the same fused call also carries a capture (memtrace.training.capture_step: salience
  normalised per layer and capture step by the mean salience of the step's edges, the rule that
  makes `salience_threshold` mean the same across loss reductions, batch sizes and lengths).
  On a capture step of a phase without bias, stored traces still go in as a bias with alpha 0 so
  that the capture scores them exactly (SPEC 3 b); attention is unchanged. `step()` then updates
  every layer that was captured in one batched TraceMemory update;
- record_routing: `record_routing` keeps the step's top-1 experts; `step()` adds them to the trie
  as paths [N, L] (a layer not recorded: -1) with rewards = -token_loss;
- consider_motifs / revalidate: the registry takes the trie's candidates / drops motifs whose
  utility fell; freeze_motifs: `held_motifs()` are the motifs to execute frozen (the MoE
  integration runs them; `on_motifs_changed` tells it when the set changes, and it reports the
  FLOPs it saves through `add_flops_saved`).

Host syncs: none on a step that neither captures nor records routing (attention, aux_loss and
step only queue device work and read host-side state). A capture step syncs once per layer in
the backward (the capture cut) and once in step() (the metrics, alphas and which layers hold
traces); a routing step syncs in record_routing (the range check) and in the trie update.
"""
from __future__ import annotations

import inspect
import json
import math

import torch

from .. import _validate as V
from .._files import check_path, save_safetensors
from ..attention import biased_attention
from ..backends.base import bias_range
from ..crystallize import Motif, MotifRegistry
from ..memory import TraceMemory
from ..routing import RoutingTree
from .capture_step import CallObserver, LayerCapture, default_capacity
from .config import MemtraceConfig
from .schedule import Phase, phase_at, plan_at

__all__ = ["FORMAT_VERSION", "HISTOGRAM_EDGES", "Memtrace"]

FORMAT_VERSION = 1
_FORMAT_NAME = "memtrace.Memtrace"
# Buckets of the salience histogram metric, in normalised units (1 = the mean edge of the step).
HISTOGRAM_EDGES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


def _attention_takes(name: str) -> bool:
    try:
        return name in inspect.signature(biased_attention).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _in_backward() -> bool:
    """Inside the autograd engine (a forward recomputed by torch.utils.checkpoint)."""
    return torch._C._current_graph_task_id() != -1


class Memtrace:
    """The training manager; see the module docstring."""

    def __init__(self, num_layers, num_heads, *, num_experts=None, config=None, device=None):
        self.num_layers = V.check_int("num_layers", num_layers, low=1, high=V.MAX_ROUTING_LAYERS)
        self.num_heads = V.check_int("num_heads", num_heads, low=1)
        self.num_experts = None if num_experts is None else V.check_int(
            "num_experts", num_experts, low=1, high=V.MAX_ROUTING_EXPERTS)
        if config is None:
            config = MemtraceConfig()
        elif isinstance(config, dict):
            config = MemtraceConfig.from_dict(config)
        elif not isinstance(config, MemtraceConfig):
            raise TypeError(f"config must be a MemtraceConfig, a dict or None, got {type(config).__name__}")
        self.config = config
        self.device = V.check_device("device", device) if device is not None else torch.device("cpu")
        self._build(self._fresh_state())
        self._hooks = []
        self._ewc = None
        self._store = None         # persist_to: (store, settings), SPEC 11
        self._dp = None            # distribute: the data-parallel exchange, SPEC 15
        self._mask_tensor_alpha = _attention_takes("key_padding_mask")

    # -- construction and state --------------------------------------------------------------------
    def _fresh_state(self) -> dict:
        c = self.config
        memory = TraceMemory(self.num_layers, self.num_heads, quota=c.quota_per_head, retention=c.retention_rate,
                             decay=c.decay_rate, threshold=c.salience_threshold, prune_eps=c.prune_eps,
                             attn_eps=c.attn_eps, window=c.window, max_seq_len=c.max_seq_len, device=self.device)
        tree = None
        if self.num_experts is not None:
            tree = RoutingTree(self.num_layers, self.num_experts, max_depth=min(c.motif_max_length, self.num_layers),
                               mode="suffix", device=self.device)
        return {"memory": memory, "tree": tree, "registry": MotifRegistry(max_motifs=c.max_motifs),
                "step": 0, "flops_saved": 0.0, "flops_tokens": 0, "metrics": {},
                "capture_cuts": [None] * self.num_layers}

    def _build(self, state: dict) -> None:
        """Install a complete state (everything was built and checked before: a swap)."""
        self._memory = state["memory"]
        self._tree = state["tree"]
        self._registry = state["registry"]
        self._step = state["step"]
        self._flops_saved = state["flops_saved"]
        self._flops_tokens = state["flops_tokens"]
        self._metrics = dict(state["metrics"])
        # per layer, the capture cut that the last capture step's salience suggests (None: decide
        # at the next capture step, unfused, with a host sync); part of the state, since it
        # decides which edges the next capture lists
        self._capture_cuts = list(state["capture_cuts"])
        self._refresh_alpha()
        self._reset_step()

    def _reset_step(self) -> None:
        self._plan = plan_at(self.config, self._step)
        self._captures = {}
        self._calls = {}
        self._masses = {}
        self._routes = {}
        self._probs = {}

    def _refresh_alpha(self) -> None:
        """alpha = beta / max(M) per layer (0 for an empty layer) on the device; which layers hold
        traces, on the host (one sync: called on capture steps and on load only). The layers'
        biases are rebuilt here too, and their values checked (finite, in range) here, where the
        step syncs anyway: the steps until the next update reuse them with no sync and no rebuild."""
        top = self._memory.strength.reshape(self.num_layers, -1).amax(dim=1)
        beta = self.config.bias_strength
        self._alpha = torch.where(top > 0, beta / torch.where(top > 0, top, torch.ones_like(top)),
                                  torch.zeros_like(top))
        host = torch.stack([top, self._alpha]).tolist()
        self._has_traces = [m >= 0 for m in host[0]]
        self._alpha_host = host[1]
        self._bias_cache = {}
        for layer, has in enumerate(self._has_traces):
            if has:
                bias_range(self._bias(layer))

    # -- read-outs ---------------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Steps taken (the index of the step in progress)."""
        return self._step

    @property
    def phase(self) -> Phase:
        """The phase of the step in progress."""
        return phase_at(self.config, self._step)

    @property
    def plan(self):
        """schedule.plan_at(config, step_count): what the step in progress does."""
        return self._plan

    @property
    def tree(self) -> RoutingTree | None:
        return self._tree

    @property
    def registry(self) -> MotifRegistry:
        return self._registry

    def memory(self, layer=None) -> TraceMemory:
        """The TraceMemory holding every layer (`layer`, when given, is checked: read that layer
        with memory.traces(layer), memory.bias(layer), ...)."""
        if layer is not None:
            V.check_int("layer", layer, low=0, high=self.num_layers - 1)
        return self._memory

    def alpha(self, layer) -> torch.Tensor:
        """The layer's bias strength, a 0-d device tensor (0 while the layer holds no trace)."""
        return self._alpha[V.check_int("layer", layer, low=0, high=self.num_layers - 1)]

    def held_motifs(self) -> list:
        """The motifs to execute frozen now: the registry's, in the crystallization phase; else []."""
        return self._registry.motifs if self._plan.freeze_motifs else []

    def frozen_experts(self) -> set:
        """(layer, expert) pairs that belong to a held motif (the experts to keep frozen)."""
        return {(m.start_layer + t, e) for m in self.held_motifs() for t, e in enumerate(m.experts)}

    def on_motifs_changed(self, callback) -> None:
        """callback(added, removed): called by step() when the held set changes (lists of Motif)."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        self._hooks.append(callback)

    def add_flops_saved(self, flops, tokens=0) -> None:
        """Count FLOPs that executing motifs saved (host numbers, from the MoE integration)."""
        flops = V.check_float("flops", flops, low=0.0)
        tokens = V.check_int("tokens", tokens, low=0)
        self._flops_saved += flops
        self._flops_tokens += tokens

    def track_parameters(self, model) -> None:
        """Enable EWC over `model`'s trainable parameters (an nn.Module or (name, param) pairs):
        the Fisher is accumulated on capture steps, the anchor is taken at each phase change."""
        from ..losses import EWC
        self._ewc = EWC(model, weight=self.config.ewc_weight)

    # -- the forward -------------------------------------------------------------------------------
    def _bias(self, layer):
        b = self._bias_cache.get(layer)
        if b is None or not self._memory._is_own_bias(b, layer):     # the memory changed since
            b = self._bias_cache[layer] = self._memory.bias(layer)
        return b

    def attention(self, layer, q, k, v, *, causal=True, key_padding_mask=None, scale=None):
        """Biased attention of `layer` as the step's plan says ([B, H, T, D] in and out).

        Traces sit at absolute (query, key) positions of a sequence, so the bias and the capture
        apply to calls whose queries and keys are the same positions from 0 (training, a prefill):
        a call with Tq != Tk (a decode step with a KV cache, a chunked prefill) runs plain attention
        and records nothing. Left-padded rows are shifted against those positions; train with right
        padding (transformers' default for training)."""
        layer = V.check_int("layer", layer, low=0, high=self.num_layers - 1)
        if q.dim() == 4 and q.shape[1] != self.num_heads:
            raise ValueError(f"q must have {self.num_heads} heads (dim 1), got shape {tuple(q.shape)}")
        if q.dim() == 4 and k.dim() == 4 and q.shape[2] != k.shape[2]:
            kwargs = {} if key_padding_mask is None else {"key_padding_mask": key_padding_mask}
            return biased_attention(q, k, v, None, causal=causal, scale=scale, **kwargs)
        plan = self._plan
        has = self._has_traces[layer]
        bias = alpha = None
        if has and (plan.bias or plan.capture):
            bias = self._bias(layer)
            alpha = self._alpha[layer] if plan.bias else 0.0
            if plan.bias and not self._mask_tensor_alpha:
                alpha = self._alpha_host[layer]
        replay = _in_backward()
        capture = None
        if plan.capture:
            capture = CallObserver(self, layer, key_padding_mask, cut=self._capture_cuts[layer], q=q, k=k,
                                   capacity=default_capacity(self.config.quota_per_head, self.num_heads))
        kwargs = {}
        if key_padding_mask is not None:
            kwargs["key_padding_mask"] = key_padding_mask
        out, lse = biased_attention(q, k, v, bias, causal=causal, scale=scale,
                                    alpha=1.0 if alpha is None else alpha, capture=capture, return_lse=True, **kwargs)
        if replay:
            return out
        if plan.capture and torch.is_grad_enabled() and out.requires_grad:
            self._calls[layer] = self._calls.get(layer, 0) + 1
        if (bias is not None and plan.bias and self.config.trace_loss_weight > 0 and out.requires_grad
                and not _under_saved_tensor_hooks()):
            from ..losses import trace_attention_mass
            self._masses[layer] = trace_attention_mass(
                q, k, lse, bias, scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
                alpha=self._alpha_host[layer], causal=causal, key_padding_mask=key_padding_mask)
        return out

    def _fill(self, layer, q, k, v, out, lse, dout, bias, entry_values, *, causal, scale, alpha, key_padding_mask,
              extra, inner=None, bound=None):
        cap = self._captures.get(layer)
        if cap is None:
            cap = self._captures[layer] = LayerCapture(self.config.salience_threshold,
                                                       default_capacity(self.config.quota_per_head, self.num_heads))
        cap.add(q, k, v, out, lse, dout, bias, entry_values, causal=causal, scale=scale, alpha=alpha,
                key_padding_mask=key_padding_mask, extra=extra, inner=inner, bound=bound)

    # -- routing -----------------------------------------------------------------------------------
    def record_routing(self, layer, expert_idx, probs=None) -> None:
        """Record the top-1 expert of each token at `layer`: expert_idx int [N] or [B, T], -1 where
        the layer did not route the token; probs (optional) [N, E] or [B, T, E] router
        probabilities, kept with their graph for this step's load-balance and crystal losses.

        Checked before anything is kept (ValueError / TypeError, no state change): shape, the
        same N as the layers recorded before in this step, and (on routing steps only: one host
        sync) the range -1..num_experts-1. Off routing steps the experts are not kept."""
        if self.num_experts is None:
            raise ValueError("record_routing needs a manager built with num_experts")
        layer = V.check_int("layer", layer, low=0, high=self.num_layers - 1)
        V.check_tensor("expert_idx", expert_idx, integer=True)
        if expert_idx.dim() not in (1, 2):
            raise ValueError(f"expert_idx must be [N] or [B, T], got shape {tuple(expert_idx.shape)}")
        if expert_idx.device != self.device:
            raise ValueError(f"expert_idx is on {expert_idx.device}, the manager on {self.device}")
        flat = expert_idx.reshape(-1)
        N = flat.shape[0]
        if probs is not None:
            V.check_tensor("probs", probs, floating=True)
            if tuple(probs.shape) != (*expert_idx.shape, self.num_experts):
                raise ValueError(f"probs must have shape {(*expert_idx.shape, self.num_experts)} (expert_idx's "
                                 f"shape, then experts), got {tuple(probs.shape)}")
            if probs.device != self.device:
                raise ValueError(f"probs is on {probs.device}, the manager on {self.device}")
        if _in_backward():
            return        # a forward recomputed by checkpointing: recorded already
        mine = len(self._routes.get(layer, []))      # this record's round (micro-batch) in the step
        for lay, recs in self._routes.items():
            if lay != layer and len(recs) > mine and recs[mine].shape[0] != N:
                raise ValueError(f"expert_idx has {N} tokens, but layer {lay} recorded {recs[mine].shape[0]} "
                                 "for the same micro-batch of this step")
        if self._plan.record_routing:
            V.check_index_range("expert_idx", flat, -1, self.num_experts)
            self._routes.setdefault(layer, []).append(flat.detach().long())
        if probs is not None:
            self._probs[layer] = (probs.reshape(N, self.num_experts), flat.detach().long())

    # -- the auxiliary losses ----------------------------------------------------------------------
    def aux_loss(self) -> torch.Tensor:
        """The enabled auxiliary losses of this step, weighted (a 0-d tensor; 0 when none applies):
        trace utilisation over the layers that attended with a bias, load balance and crystal
        stability over the router probabilities given to record_routing, EWC when tracked."""
        from ..losses import crystal_stability_loss, load_balance_loss, trace_utilization_loss
        c = self.config
        total = torch.zeros((), device=self.device)
        if c.trace_loss_weight > 0 and self._masses:
            masses = [self._masses[k] for k in sorted(self._masses)]
            total = total + c.trace_loss_weight * trace_utilization_loss(masses)
        if self._probs:
            layers = sorted(self._probs)
            probs = [self._probs[k][0] for k in layers]
            same = all(p.shape == probs[0].shape for p in probs)
            if c.balance_loss_weight > 0 and same:
                total = total + c.balance_loss_weight * load_balance_loss(probs, from_logits=False,
                                                                          check_values=False)
            held = self.held_motifs()
            if c.crystal_loss_weight > 0 and held and same and layers == list(range(self.num_layers)):
                paths = torch.stack([self._probs[k][1] for k in layers], dim=1)
                total = total + c.crystal_loss_weight * crystal_stability_loss(
                    probs, held, min_utility=c.min_utility, paths=paths, check_values=False)
        if self._ewc is not None and c.ewc_weight > 0:
            total = total + self._ewc.loss()
        return total

    # -- the step ----------------------------------------------------------------------------------
    def step(self, token_loss=None) -> dict:
        """After backward: memory update (capture steps), trie update (routing steps), registry
        consider / revalidate, then the next step. Returns the metrics (see `metrics`)."""
        plan = self._plan
        missing = sorted(lay for lay, n in self._calls.items() if n and lay not in self._captures)
        if plan.capture and missing:
            raise RuntimeError(f"step() on capture step {self._step}: layers {missing} ran attention but no "
                               "backward reached them since; call loss.backward() before mgr.step()")
        paths = rewards = None
        if self._dp is not None:
            self._dp.bytes_last_step = 0
        if plan.record_routing and self._routes and self._tree is not None:
            paths, rewards = self._paths(token_loss)
        if plan.record_routing and self._tree is not None and self._dp is not None:
            if paths is None:       # this rank routed nothing this step; the others may have
                paths = torch.zeros((0, self.num_layers), dtype=torch.int64, device=self.device)
            if rewards is None:     # no token_loss: reward 0, as the tree takes None
                rewards = torch.zeros(paths.shape[0], dtype=torch.float64, device=self.device)
            paths, rewards = self._dp.gather_paths(paths, rewards)
            if paths.shape[0] == 0:
                paths = rewards = None
        before = set(m.key for m in self.held_motifs())
        metrics = dict(self._metrics)
        merged = None
        if plan.capture and self._dp is not None:
            merged = self._dp.merge_captures(self._captures, self.num_layers, self._memory.max_seq_len)
        elif plan.capture and self._captures:
            merged = {lay: self._captures[lay].merged(self._memory.max_seq_len) for lay in sorted(self._captures)}
        if merged:
            metrics.update(self._update_memory(merged))
            if self._ewc is not None:
                self._ewc.accumulate()
        if paths is not None:
            self._tree.update(paths, rewards, step=self._step)
        if self._tree is not None and plan.consider_motifs:
            c = self.config
            self._registry.consider(self._tree, step=self._step, min_frequency=c.min_frequency,
                                    min_utility=c.min_utility, max_entropy=c.max_entropy,
                                    min_length=c.motif_min_length, max_length=c.motif_max_length, min_age=c.min_age)
        if self._tree is not None and plan.revalidate:
            self._registry.revalidate(self._tree, step=self._step, min_utility=self.config.min_utility)
        old_phase = plan.phase
        self._step += 1
        self._reset_step()
        if self._ewc is not None and self.phase != old_phase:
            self._ewc.consolidate()
        held = self.held_motifs()
        after = {m.key for m in held}
        if after != before:
            added = [m for m in held if m.key not in before]
            removed = [Motif(k[0], k[1], 0, 0.0, 0.0, 0, 0.0) for k in sorted(before - after)]
            for hook in self._hooks:
                hook(added, removed)
        metrics.update(self._host_metrics(plan))
        if self._dp is not None:
            metrics["exchange_bytes"] = self._dp.bytes_last_step
        if self._store is not None and self._step % self._store[1].trace_sync_interval == 0:
            metrics["store_sync"] = self.sync_store()
        self._metrics = metrics
        return dict(metrics)

    # -- vector stores (SPEC 11) -------------------------------------------------------------------
    def persist_to(self, store, settings=None):
        """Sync the memory (and the registry) into `store` every settings.trace_sync_interval
        steps, under settings.task_tag, and warm-start from it now when settings.warm_start.

        store: a memtrace.stores store, or a StoreSettings naming one (then `settings` is it). When
        the store's optional package is missing (ImportError naming the extra) or it cannot open,
        this warns and returns None: the manager goes on, its own file (save) holding the state.
        Returns the store. persist_to(None) detaches."""
        import warnings

        from ..stores import StoreSettings, open_store
        if store is None:
            self._store = None
            return None
        if isinstance(store, StoreSettings):
            settings, store = store, None
        settings = StoreSettings(persist_to_vector_store=True) if settings is None else settings
        if not isinstance(settings, StoreSettings):
            raise TypeError(f"settings must be a memtrace.stores.StoreSettings, got {type(settings).__name__}")
        if store is None:
            try:
                store = open_store(settings)
            except (ImportError, OSError) as exc:
                warnings.warn(f"Memtrace: no vector store ({exc}); training goes on, save() keeps the state",
                              RuntimeWarning, stacklevel=2)
                return None
        self._store = (store, settings)
        if settings.warm_start:
            self.warm_start()
        return store

    def sync_store(self) -> dict:
        """Sync now (what step() does every trace_sync_interval steps); a failing store warns and
        returns {"error": message}: training goes on."""
        import warnings
        if self._store is None:
            raise RuntimeError("no store attached: call persist_to(store) first")
        store, s = self._store
        try:
            out = {"traces": store.sync_traces(self._memory, self._step, tag=s.task_tag)}
            if s.persist_motifs:
                out["motifs"] = store.sync_motifs(self._registry, self._tree, self._step, tag=s.task_tag)
        except Exception as exc:
            warnings.warn(f"Memtrace: syncing the vector store at step {self._step} failed ({type(exc).__name__}: "
                          f"{exc}); training goes on, save() keeps the state", RuntimeWarning, stacklevel=2)
            return {"error": f"{type(exc).__name__}: {exc}"}
        return {k: v["sync"] for k, v in out.items()}

    def warm_start(self) -> int:
        """Load the attached store's last traces (and motifs, when synced) of the task tag into this
        manager; returns the number of traces (0 when the store holds none for the tag)."""
        if self._store is None:
            raise RuntimeError("no store attached: call persist_to(store) first")
        store, s = self._store
        try:
            n = store.load_traces(self._memory, tag=s.task_tag)
        except KeyError:
            return 0
        if s.persist_motifs:
            try:
                store.load_motifs(self._registry, tag=s.task_tag)
            except KeyError:
                pass
        self._refresh_alpha()
        return n

    def _paths(self, token_loss):
        layers = sorted(self._routes)
        rounds = len(self._routes[layers[0]])
        if any(len(self._routes[lay]) != rounds for lay in layers):
            raise RuntimeError("record_routing was called a different number of times for different layers "
                               f"in this step: {({lay: len(self._routes[lay]) for lay in layers})}")
        N = sum(r.shape[0] for r in self._routes[layers[0]])
        paths = torch.full((N, self.num_layers), -1, dtype=torch.long, device=self.device)
        for lay in layers:
            paths[:, lay] = torch.cat(self._routes[lay])
        rewards = None
        if token_loss is not None:
            V.check_tensor("token_loss", token_loss, floating=True)
            if token_loss.numel() != N:
                raise ValueError(f"token_loss must hold one loss per routed token ({N}), got shape "
                                 f"{tuple(token_loss.shape)}")
            if token_loss.device != self.device:
                raise ValueError(f"token_loss is on {token_loss.device}, the manager on {self.device}")
            rewards = -token_loss.detach().reshape(-1).double()
            V.check_finite("token_loss", rewards)
        return paths, rewards

    def _update_memory(self, merged_by_layer) -> dict:
        mem = self._memory
        layers = sorted(merged_by_layer)
        merged = [merged_by_layer[lay] for lay in layers]
        C = max(m[0][0].shape[0] for m in merged)

        def pad(t, fill):
            return torch.cat([t, t.new_full((C - t.shape[0],), fill)]) if t.shape[0] < C else t

        fields = [torch.stack([pad(m[0][n], f) for m in merged]) for n, f in enumerate((-1, 0, 0, 0.0, 0.0))]
        num = torch.stack([m[1].to(torch.int32) for m in merged])
        shape = (mem.num_heads, mem.quota)
        direct = any(m[2] is not None for m in merged)
        slot_S = slot_a = None
        if direct:
            zeros = torch.zeros(shape, dtype=torch.float32, device=self.device)
            slot_S = torch.stack([m[2][0].reshape(shape) if m[2] is not None else zeros for m in merged])
            slot_a = torch.stack([m[2][1].reshape(shape) if m[2] is not None else zeros for m in merged])
            for m, lay in zip(merged, layers):
                if m[3] is not None and not mem._is_own_bias(m[3], lay):
                    raise RuntimeError("the trace memory changed during the step")   # pragma: no cover
        idx = torch.tensor(layers, device=self.device)
        before_st, before_meta = mem.strength[idx].clone(), mem.meta[idx].clone()
        coverage = []
        for m in merged:
            if m[2] is None:
                coverage.append(torch.zeros((), device=self.device))
            else:
                coverage.append(m[2][1].sum() / (mem.num_heads * m[4]))
        mem.update_edges(layers, *fields, num_edges=num, trace_salience=slot_S, trace_attn=slot_a)
        jac = _jaccard(mem, before_st, before_meta, mem.strength[idx], mem.meta[idx])
        # histogram: the captured edges and the stored traces' scores, in normalised units
        S = fields[3].reshape(-1)
        live = (torch.arange(C, device=self.device).view(1, C) < num.view(-1, 1)).reshape(-1)
        if slot_S is not None:
            S = torch.cat([S, slot_S.reshape(-1)])
            live = torch.cat([live, (before_st >= 0).reshape(-1)])
        bucket = torch.bucketize(S, torch.tensor(HISTOGRAM_EDGES, device=self.device))
        hist = torch.zeros(len(HISTOGRAM_EDGES) + 1, device=self.device).index_add_(0, bucket, live.float())
        self._refresh_alpha()
        count = (mem.strength >= 0).sum()
        cuts = torch.stack([self._captures[lay].next_cut.float() for lay in layers])
        vals = torch.cat([torch.stack(coverage).mean().reshape(1), jac.mean().reshape(1), hist,
                          count.reshape(1).float(), cuts]).tolist()
        vals, cuts = vals[:-len(layers)], vals[-len(layers):]
        for lay, cut in zip(layers, cuts):       # the next capture step's cut (fused, no sync)
            self._capture_cuts[lay] = cut if math.isfinite(cut) and cut > _MIN_FUSED_CUT else None
        self._layer_coverage = coverage
        return {"trace_coverage": vals[0], "trace_stability": vals[1],
                "salience_histogram": {"edges": list(HISTOGRAM_EDGES), "counts": [int(x) for x in vals[2:-1]]},
                "trace_count": int(vals[-1]), "bytes_used": 12 * int(vals[-1]), "bytes_quota": mem.nbytes,
                "last_capture_step": self._step}

    def _host_metrics(self, plan) -> dict:
        motifs = self._registry.motifs
        n = len(motifs)
        return {"step": plan.step, "phase": plan.phase.label, "motif_count": n,
                "motif_mean_utility": sum(m.utility for m in motifs) / n if n else 0.0,
                "motif_mean_entropy": sum(m.entropy for m in motifs) / n if n else 0.0,
                "flops_saved_per_token": self._flops_saved / self._flops_tokens if self._flops_tokens else 0.0,
                "routing_tokens": self._tree.num_tokens if self._tree is not None else 0}

    def metrics(self) -> dict:
        """The metrics of the last step (SPEC 9): step, phase, trace_coverage (share of attention
        mass on stored edges), trace_stability (Jaccard of the stored edge sets before and after
        the update), salience_histogram (normalised salience of the captured edges), trace_count,
        bytes_used vs bytes_quota, motif_count, motif_mean_utility, motif_mean_entropy,
        flops_saved_per_token, routing_tokens. Trace metrics are those of the last capture step
        (last_capture_step); nothing here syncs."""
        return dict(self._metrics)

    # -- persistence -------------------------------------------------------------------------------
    def _shape(self) -> dict:
        return {"num_layers": self.num_layers, "num_heads": self.num_heads, "num_experts": self.num_experts}

    def distribute(self, group=None) -> "Memtrace":
        """Keep this manager equal on every rank of a data-parallel group (torch.distributed,
        initialised; None = the default group): each step's captures and routing are exchanged
        before the update (memtrace.training.distributed). Collective: every rank calls it, and
        every rank raises ValueError when the ranks' configs or shapes differ. Returns self."""
        from .distributed import DataParallel
        self._dp = DataParallel(group, self.device, {"config": self.config.to_dict(), "shape": self._shape()})
        return self

    @property
    def distributed(self) -> bool:
        """Whether `distribute` made this manager one of a data-parallel group's."""
        return self._dp is not None

    @property
    def rank(self) -> int:
        """This process's rank in the manager's data-parallel group (0 when not distributed)."""
        return 0 if self._dp is None else self._dp.rank

    def state_dict(self) -> dict:
        """Everything a resumed run needs (between steps): config, shape, step, memory, trie,
        registry, metrics, FLOPs counters and the EWC state when tracked."""
        return {"format_version": FORMAT_VERSION, "shape": self._shape(), "config": self.config.to_dict(),
                "step": self._step, "flops_saved": self._flops_saved, "flops_tokens": self._flops_tokens,
                "metrics": dict(self._metrics), "capture_cuts": list(self._capture_cuts),
                "memory": self._memory.state_dict(),
                "tree": None if self._tree is None else self._tree.state_dict(),
                "registry": self._registry.state_dict(),
                "ewc": None if self._ewc is None else self._ewc.state_dict()}

    def load_state_dict(self, sd) -> None:
        """Take a state_dict of a manager of the same shape; everything is built and checked first,
        then swapped in (a bad state leaves this manager as it was)."""
        if not isinstance(sd, dict):
            raise TypeError(f"state_dict must be a dict, got {type(sd).__name__}")
        need = ("format_version", "shape", "config", "step", "memory", "tree", "registry")
        missing = [k for k in need if k not in sd]
        if missing:
            raise ValueError(f"state_dict is missing {missing}")
        if sd["format_version"] != FORMAT_VERSION:
            raise ValueError(f"state_dict has format_version {sd['format_version']!r}, this memtrace reads "
                             f"{FORMAT_VERSION}")
        shape = dict(sd["shape"])
        if shape != self._shape():
            raise ValueError(f"state_dict is for a model of shape {shape}, this manager has {self._shape()}")
        config = MemtraceConfig.from_dict(dict(sd["config"]))
        old = self.config
        self.config = config
        try:
            state = self._fresh_state()
            state["memory"].load_state_dict(sd["memory"])
            if (sd["tree"] is None) != (state["tree"] is None):
                raise ValueError("state_dict's routing tree does not match num_experts")
            if state["tree"] is not None:
                state["tree"].load_state_dict(sd["tree"])
            state["registry"].load_state_dict(sd["registry"])
            for m in state["registry"].motifs:
                if m.start_layer + m.length > self.num_layers or (
                        self.num_experts is not None and max(m.experts) >= self.num_experts):
                    raise ValueError(f"state_dict holds motif {m.key}, outside this model's layers / experts")
            state["step"] = V.check_int("state_dict['step']", sd["step"], low=0)
            state["flops_saved"] = V.check_float("flops_saved", sd.get("flops_saved", 0.0), low=0.0)
            state["flops_tokens"] = V.check_int("flops_tokens", sd.get("flops_tokens", 0), low=0)
            state["metrics"] = dict(sd.get("metrics") or {})
            state["capture_cuts"] = _check_cuts(sd.get("capture_cuts"), self.num_layers)
            ewc = sd.get("ewc")
            if ewc is not None and self._ewc is not None:
                import copy
                probe = copy.copy(self._ewc)
                probe.load_state_dict(ewc)          # validates without touching self._ewc
            else:
                probe = None
        except BaseException:
            self.config = old
            raise
        self._build(state)
        if probe is not None:
            self._ewc = probe

    def save(self, path) -> None:
        """One safetensors file (atomic): tensors of the memory, trie and EWC; the rest as JSON.
        Distributed (`distribute`): only rank 0 writes (the ranks' states are the same; no
        collective, so it may be called from rank 0 alone); any number of ranks can load it once
        it exists (the write is atomic: a reader finds the whole file or none)."""
        if self._dp is None or self._dp.rank == 0:
            self._write(path)

    def _write(self, path) -> None:
        sd = self.state_dict()
        tensors = {f"memory.{k}": sd["memory"][k].detach().cpu().contiguous() for k in ("strength", "meta")}
        if sd["tree"] is not None:
            tensors.update({f"tree.{k}": t.detach().cpu().contiguous() for k, t in sd["tree"].items()})
        if sd["ewc"] is not None:
            tensors.update({f"ewc.{k}": t.detach().cpu().contiguous() for k, t in sd["ewc"].items()})
        meta = {k: sd[k] for k in ("shape", "config", "step", "flops_saved", "flops_tokens", "metrics", "registry",
                                   "capture_cuts")}
        meta["memory_config"] = sd["memory"]["config"]
        meta["memory_format_version"] = sd["memory"]["format_version"]
        meta["has_tree"] = sd["tree"] is not None
        meta["has_ewc"] = sd["ewc"] is not None
        save_safetensors(tensors, path, {"format": _FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                                         "state": json.dumps(meta)})

    @staticmethod
    def _read(path) -> dict:
        from safetensors import safe_open
        path = check_path(path)
        try:
            with safe_open(path, framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, FileNotFoundError):
            raise
        except Exception as exc:  # safetensors raises its own error types on damaged files
            raise ValueError(f"cannot read a Memtrace state from {path!r}: {exc}") from None
        if header.get("format") != _FORMAT_NAME:
            raise ValueError(f"{path!r} is not a Memtrace state file (format {header.get('format')!r})")
        if header.get("format_version") != str(FORMAT_VERSION):
            raise ValueError(f"{path!r} has format_version {header.get('format_version')!r}, this memtrace reads "
                             f"{FORMAT_VERSION}")
        try:
            meta = json.loads(header.get("state", ""))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path!r} has an unreadable state: {exc}") from None
        sub = {p: {k[len(p) + 1:]: t for k, t in tensors.items() if k.startswith(p + ".")}
               for p in ("memory", "tree", "ewc")}
        return {"format_version": FORMAT_VERSION, "shape": meta["shape"], "config": meta["config"],
                "step": meta["step"], "flops_saved": meta["flops_saved"], "flops_tokens": meta["flops_tokens"],
                "metrics": meta["metrics"], "registry": meta["registry"], "capture_cuts": meta.get("capture_cuts"),
                "memory": {"format_version": meta["memory_format_version"], "config": meta["memory_config"],
                           **sub["memory"]},
                "tree": sub["tree"] if meta["has_tree"] else None, "ewc": sub["ewc"] if meta["has_ewc"] else None}

    def load_file(self, path) -> None:
        """load_state_dict from a file written by `save`."""
        self.load_state_dict(self._read(path))

    @classmethod
    def load(cls, path, device=None) -> Memtrace:
        """A manager rebuilt from a file written by `save` (EWC comes back once track_parameters
        is called and the state is loaded again with load_file)."""
        sd = cls._read(path)
        shape = sd["shape"]
        mgr = cls(shape["num_layers"], shape["num_heads"], num_experts=shape["num_experts"],
                  config=MemtraceConfig.from_dict(sd["config"]), device=device)
        mgr.load_state_dict(sd)
        return mgr

    def __repr__(self) -> str:
        return (f"Memtrace(num_layers={self.num_layers}, num_heads={self.num_heads}, num_experts={self.num_experts}, "
                f"step={self._step}, phase={self.phase.label}, device={self.device})")


# Below this a fused capture bound would let every row through (memtrace.capture's own limit).
_MIN_FUSED_CUT = 1e-30


def _check_cuts(cuts, num_layers):
    """A state's capture cuts: None (an older file: none yet) or one finite float > 0 or None per layer."""
    if cuts is None:
        return [None] * num_layers
    if not isinstance(cuts, (list, tuple)) or len(cuts) != num_layers:
        raise ValueError(f"state_dict['capture_cuts'] must list one cut per layer ({num_layers})")
    for c in cuts:
        if c is not None and not (isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)
                                  and c > _MIN_FUSED_CUT):
            raise ValueError(f"state_dict['capture_cuts'] holds {c!r}: a cut is a finite float > 1e-30 or None")
    return [None if c is None else float(c) for c in cuts]


def _under_saved_tensor_hooks() -> bool:
    """True inside torch.utils.checkpoint (or any saved-tensor hooks): a recomputed forward must
    save exactly what the first one did, so the first adds no extra graph (the trace-mass loss)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(True) is not None


def _jaccard(mem, st0, meta0, st1, meta1) -> torch.Tensor:
    """Per layer, |A & B| / |A | B| of the stored (head, i, j) sets before and after (1 when both empty)."""
    B, H, Q = st0.shape
    span = mem.pos_mask + 1
    base = (torch.arange(B, device=st0.device).view(B, 1, 1) * H
            + torch.arange(H, device=st0.device).view(1, H, 1)) * span

    def keys(st, mt):
        pos = (mt >> mem.pos_shift) & mem.pos_mask
        return torch.where(st >= 0, base + pos, torch.full_like(pos, -1)).reshape(-1)

    k0, k1 = keys(st0, meta0), keys(st1, meta1)
    both = torch.sort(torch.cat([k0, k1])).values
    dup = (both[1:] == both[:-1]) & (both[1:] >= 0)
    layer_of = (both[1:] // (H * span)).clamp(min=0)
    inter = torch.zeros(B, device=st0.device).index_add_(0, layer_of, dup.float())
    n0 = (st0 >= 0).reshape(B, -1).sum(1).float()
    n1 = (st1 >= 0).reshape(B, -1).sum(1).float()
    union = n0 + n1 - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
