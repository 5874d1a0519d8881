"""The experiment's arms: which memtrace machinery a run switches on, as a MemtraceConfig.

    baseline         no memtrace at all: the transformers model with attn_implementation="sdpa"
                     (the honest alternative a user has; the same weights and data as every arm)
    traces           persistent attention traces: trace accumulation from 10% of the steps, the
                     trace bias from 20% on (the seeds' curriculum, compressed: foundation,
                     accumulation, trace-biased), a capture every max(1, steps // 40) steps
    crystallization  MoE only: crystallization discovery from 30%, held motifs executed inside the
                     model (router bypass, `memtrace.integrations.moe`) from 60%
    both             traces and crystallization on the schedules above
    distilled        MoE only (issue 29 point 3): the crystallization schedule above, and every
                     held motif distilled into one expert (`memtrace.integrations.moe`, mode
                     "distill"): from freeze_start a held motif runs carried while its distilled
                     expert D learns the chain's summed routed output (one `distill_step()` per
                     training step), for distill_fraction (0.15) of the steps, counted per motif
                     over the steps it had tokens; then it runs distilled to the end: D at the
                     start layer, no router and no expert at the chain's later layers. A motif
                     first held later distils later (one held after 1 - distill_fraction of the
                     run never finishes); one dropped by revalidation loses its D.
    oracle           reference bias, upper bracket: a fixed position-indexed bias on the task's
                     known useful edges (`tasks.useful_edge_set`: each (query, key) with its
                     frequency over 512 sampled examples, the top quota_per_head per head, the
                     same for every head and layer), alpha = beta / max, from the step the traces
                     arm turns its bias on. For fixed-layout tasks this is exactly the useful
                     edges; for the others it is the best any position-indexed memory can hold.
    random           reference bias, control: as many entries per head as the oracle, with the
                     oracle's values, at uniformly random causal (query, key) positions that are not
                     useful edges (seeded by the run's seed): is it the selected edges that help,
                     or any bias of that size and strength?

Schedules scale with the step budget (a 1000-step run cannot wait the seeds' 1000 warm-up steps);
the resolved config is stored in each run's JSON. `min_age` = max(1, steps // 20) steps and
`prune_interval` = max(1, steps // 10); motif lengths are clipped to the model's depth. The
MoE load-balance loss is off (weight 0) in every arm unless overridden, so the MoE baseline (which
has no manager to add it) and the memtrace arms train the same objective apart from the mechanism
under test. A motif's path entropy (the sum of the node entropies along its chain, SPEC 5.3) may
reach ln(num_experts), the uncertainty of one uniform expert choice, instead of the config's 1.0:
in a CPU pilot (4 layers, 8 experts top-2, copy, 300 steps) the lowest path entropy of any
length-3 chain seen 100+ times was 1.03, so the default admitted no motif and the crystallization
arms would have measured nothing; `--set max_entropy=1.0` runs the default. Ablation knobs are
plain MemtraceConfig overrides (`--set bias_strength=1.0`,
`quota_per_head`, `min_utility` (U_min), `motif_min_length` / `motif_max_length`, ...), applied
last; `ref_start` / `trace_start` / `bias_start` / `crystal_start` / `freeze_start` (fractions of
the steps) move the phases; `distill_fraction` (of the steps) and `distill_lr` (D's AdamW) set the
distilled arm's distillation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from ..attention import biased_attention
from ..bias import TraceBias
from ..training.config import MemtraceConfig
from ..training.manager import Memtrace
from .names import ARMS, MOE_ARMS, REFERENCE_ARMS, parse_arms

__all__ = ["ARMS", "DISTILL_KEYS", "MOE_ARMS", "PHASE_KEYS", "REFERENCE_ARMS", "ExperimentMemtrace",
           "ReferenceBiasMemtrace", "arm_config", "distill_settings", "parse_arms", "reference_bias"]

PHASE_KEYS = {"trace_start": 0.1, "bias_start": 0.2, "crystal_start": 0.3, "freeze_start": 0.6, "ref_start": None}
DISTILL_KEYS = {"distill_fraction": 0.15, "distill_lr": 1e-3}


def _at(fraction, steps):
    return None if fraction is None else int(fraction * steps)


def phase_fractions(overrides: dict) -> dict:
    out = dict(PHASE_KEYS)
    for k in PHASE_KEYS:
        if k in overrides:
            out[k] = None if overrides[k] is None else float(overrides[k])
    if out["ref_start"] is None:
        out["ref_start"] = out["bias_start"]
    return out


def arm_config(arm: str, steps: int, *, num_layers: int, seq_len: int, overrides: dict | None = None,
               num_experts: int | None = None):
    """(MemtraceConfig or None for baseline, reference-bias start step or None) for `arm`.
    With `num_experts`, motifs may have a path entropy up to ln(num_experts) (see the module
    docstring) unless `max_entropy` is overridden."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")
    overrides = dict(overrides or {})
    ph = phase_fractions(overrides)
    fields = {f.name for f in dataclasses.fields(MemtraceConfig)}
    unknown = sorted(k for k in overrides if k not in fields and k not in PHASE_KEYS and k not in DISTILL_KEYS)
    if unknown:
        raise ValueError(f"unknown override{'s' if len(unknown) > 1 else ''} {unknown}; MemtraceConfig fields or "
                         f"{sorted(PHASE_KEYS) + sorted(DISTILL_KEYS)}")
    distill_settings(arm, steps, overrides)    # checks the distillation keys of every arm
    if arm == "baseline":
        return None, None
    traces = arm in ("traces", "both")
    crystal = arm in MOE_ARMS
    starts = (_at(ph["trace_start"], steps) if traces else None, _at(ph["bias_start"], steps) if traces else None,
              _at(ph["crystal_start"], steps) if crystal else None,
              _at(ph["freeze_start"], steps) if crystal else None)
    base = dict(phase_starts=starts, total_steps=steps, update_interval=max(1, steps // 40), warmup_steps=0,
                max_seq_len=seq_len, min_age=max(1, steps // 20), prune_interval=max(1, steps // 10),
                motif_min_length=min(3, num_layers), motif_max_length=min(8, num_layers), balance_loss_weight=0.0)
    if num_experts is not None:
        base["max_entropy"] = math.log(max(2, int(num_experts)))
    base.update({k: v for k, v in overrides.items() if k in fields})
    if base["motif_min_length"] > base["motif_max_length"]:
        base["motif_min_length"] = base["motif_max_length"]
    cfg = MemtraceConfig(**base)
    ref_start = _at(ph["ref_start"], steps) if arm in REFERENCE_ARMS else None
    return cfg, ref_start


def distill_settings(arm: str, steps: int, overrides: dict | None = None) -> dict | None:
    """The distilled arm's `MoEHandle.set_mode("distill", ...)` keywords (distill_steps =
    max(1, distill_fraction x steps), distill_lr); None for the other arms."""
    overrides = dict(overrides or {})
    frac = overrides.get("distill_fraction", DISTILL_KEYS["distill_fraction"])
    lr = overrides.get("distill_lr", DISTILL_KEYS["distill_lr"])
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1:
        raise ValueError(f"distill_fraction must be a fraction of the steps in (0, 1], got {frac!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"distill_lr must be a finite float > 0, got {lr!r}")
    if arm != "distilled":
        return None
    return {"distill_steps": max(1, int(frac * steps)), "distill_lr": float(lr)}


class ExperimentMemtrace(Memtrace):
    """The manager with a switch for evaluation forwards: inside `paused()` routing is not
    recorded (held-out batches must not feed the trie nor mix with the step's training routes)."""

    _paused = False

    @contextlib.contextmanager
    def paused(self):
        prev = self._paused
        self._paused = True
        try:
            yield self
        finally:
            self._paused = prev

    def record_routing(self, layer, expert_idx, probs=None):
        if self._paused:
            return None
        return super().record_routing(layer, expert_idx, probs=probs)


class ReferenceBiasMemtrace(ExperimentMemtrace):
    """A manager whose phases are all off and whose attention adds a fixed TraceBias (the same for
    every layer) with alpha = beta / max(value) from step `start` on (reference arms)."""

    def __init__(self, num_layers, num_heads, *, bias: TraceBias, start: int, num_experts=None, config=None,
                 device=None):
        super().__init__(num_layers, num_heads, num_experts=num_experts, config=config, device=device)
        self.fixed_bias = bias
        self.start = int(start)
        top = float(bias.value.max()) if bias.nnz else 0.0
        self.fixed_alpha = self.config.bias_strength / top if top > 0 else 0.0

    def attention(self, layer, q, k, v, *, causal=True, key_padding_mask=None, scale=None):
        if self.step_count < self.start or self.fixed_alpha == 0.0 or q.shape[2] != k.shape[2]:
            return super().attention(layer, q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
        kwargs = {} if key_padding_mask is None else {"key_padding_mask": key_padding_mask}
        return biased_attention(q, k, v, self.fixed_bias, causal=causal, scale=scale, alpha=self.fixed_alpha,
                                **kwargs)


def reference_bias(kind: str, edge_set: dict, *, num_heads: int, seq_len: int, quota: int, seed: int,
                   device="cpu") -> tuple:
    """(TraceBias, [(q, k, value), ...] per head) of the oracle or random reference arm."""
    ranked = sorted(edge_set.items(), key=lambda kv: (-kv[1], kv[0]))[:quota]
    if kind == "oracle":
        entries = [(q, k, v) for (q, k), v in ranked]
    elif kind == "random":
        g = torch.Generator().manual_seed(10_007 * seed + 3)
        taken = set(edge_set)
        want = len(ranked)
        values = [v for _, v in ranked]
        perm = torch.randperm(len(values), generator=g).tolist()
        picked = []
        seen = set()
        total = seq_len * (seq_len + 1) // 2
        if want > total - len(taken):
            raise ValueError(f"random reference: {want} entries do not fit the {total - len(taken)} free causal pairs")
        while len(picked) < want:
            q = int(torch.randint(0, seq_len, (1,), generator=g))
            k = int(torch.randint(0, q + 1, (1,), generator=g))
            if (q, k) in taken or (q, k) in seen:
                continue
            seen.add((q, k))
            picked.append((q, k))
        entries = [(q, k, values[perm[i]]) for i, (q, k) in enumerate(picked)]
    else:
        raise ValueError(f"reference bias kind must be 'oracle' or 'random', got {kind!r}")
    n = len(entries)
    head = torch.arange(num_heads).repeat_interleave(n)
    qi = torch.tensor([e[0] for e in entries] * num_heads, dtype=torch.long)
    ki = torch.tensor([e[1] for e in entries] * num_heads, dtype=torch.long)
    val = torch.tensor([e[2] for e in entries] * num_heads, dtype=torch.float32)
    bias = TraceBias.from_coo(head.to(device), qi.reshape(-1).to(device), ki.reshape(-1).to(device),
                              val.reshape(-1).to(device), num_heads=num_heads, seq_len_q=seq_len, seq_len_k=seq_len)
    return bias, entries
