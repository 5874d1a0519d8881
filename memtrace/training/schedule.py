"""The seeds' training curriculum as a pure function of the step (SPEC 9).

seeds/semantic-crystallization-plan.md, "Training Curriculum", splits training into five phases;
each later phase keeps what the earlier ones switched on:

    FOUNDATION          plain attention, nothing recorded
    TRACE_ACCUMULATION  salience captured every `update_interval` steps, no bias yet
    TRACE_BIASED        the trace bias on every step, captures continue
    CRYSTAL_DISCOVERY   routing recorded every step, the registry filled, nothing frozen
    CRYSTALLIZATION     held motifs frozen and executed, the registry revalidated and pruned

Steps count from 0 (step s is the (s+1)-th optimizer step). Everything here is a deterministic
function of (config, step), so a run resumed at step N plans exactly as the uninterrupted one.

Where the phases start (`phase_starts`):
- `config.phase_starts` given: those absolute steps.
- else `config.total_steps` given: floor(fraction * total_steps) for each phase_fractions entry,
  the fraction read as the decimal it was written as (0.29 * 100 gives 29, not 28).
- neither (an open-ended run): every phase that is not switched off starts at step 0. With no
  length there are no fractions to take, and refusing to run would make the default config
  unusable; so everything is on from the start and the other settings do the pacing: the first
  capture waits `warmup_steps`, the bias is empty until a capture stores traces, and no motif can
  be frozen before it has `min_frequency` tokens and `min_age` steps.
A start of None, or one at or past total_steps (when total_steps is set), means the phase is off.
When two phases start at the same step the later one is the phase of that step.

A phase that is off contributes nothing, and the phases after it still get everything they
imply: trace-biased training captures even without an accumulation phase, and crystallization
records routing and considers motifs even without a discovery phase (it cannot freeze what it
never observed).

What a step does (`plan_at`), with
    trace_start   = start of the first trace phase that is on (accumulation, else trace-biased)
    crystal_start = start of the first crystallization phase that is on (discovery, else crystallization)
- capture:         trace_start is set, step >= trace_start + warmup_steps and
                   (step - trace_start - warmup_steps) % update_interval == 0. So warmup_steps
                   counts from the start of trace accumulation (SPEC 9: it "delays the first capture
                   of the accumulation phase"), and captures then come every update_interval steps
                   on one cadence through every later phase. If the warm-up outlasts the
                   accumulation phase, the first capture falls in a later phase.
- bias:            step >= start of TRACE_BIASED (on).
- record_routing:  step >= crystal_start.
- consider_motifs: record_routing and (step - crystal_start) % update_interval == 0 (the start
                   included): the registry takes the trie's new candidates.
- freeze_motifs:   step >= start of CRYSTALLIZATION (on): held motifs run frozen.
- revalidate:      record_routing, step > crystal_start and (step - crystal_start) % prune_interval
                   == 0: the registry refreshes its motifs' statistics and drops those whose
                   utility fell below min_utility (SPEC 5.5; the seeds' periodic revalidation,
                   math-foundations section 5.2).
- prune:           revalidate and freeze_motifs: in the crystallization phase a revalidation also
                   unfreezes the dropped motifs and releases their composite experts (the seeds'
                   "competitive pruning of low-utility motifs", curriculum phase 5).
Steps past total_steps keep the last phase and its cadences.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from fractions import Fraction

from .. import _validate as V
from .config import NUM_PHASE_STARTS, MemtraceConfig

__all__ = ["Phase", "Plan", "phase_at", "phase_starts", "plan_at"]


class Phase(enum.IntEnum):
    """The five phases in curriculum order (ints 0..4, so phases compare by order)."""
    FOUNDATION = 0
    TRACE_ACCUMULATION = 1
    TRACE_BIASED = 2
    CRYSTAL_DISCOVERY = 3
    CRYSTALLIZATION = 4

    @property
    def label(self) -> str:
        """Lower-case name, for metrics and logs ("trace_biased")."""
        return self.name.lower()


@dataclass(frozen=True)
class Plan:
    """What training step `step` does (see the module docstring for each flag's rule)."""
    step: int
    phase: Phase
    capture: bool
    bias: bool
    record_routing: bool
    consider_motifs: bool
    freeze_motifs: bool
    revalidate: bool
    prune: bool


def _check_config(config) -> MemtraceConfig:
    if not isinstance(config, MemtraceConfig):
        raise TypeError(f"config must be a memtrace.training.MemtraceConfig, got {type(config).__name__}")
    return config


def phase_starts(config: MemtraceConfig) -> tuple:
    """The absolute first step of trace accumulation, trace-biased training, crystallization
    discovery and crystallization, each an int or None (off). See the module docstring."""
    _check_config(config)
    total = config.total_steps
    if config.phase_starts is not None:
        starts = config.phase_starts
    elif total is not None:
        starts = tuple(None if f is None else int(Fraction(repr(f)) * total) for f in config.phase_fractions)
    else:
        starts = tuple(None if f is None else 0 for f in config.phase_fractions)
    if total is not None:
        starts = tuple(None if s is None or s >= total else s for s in starts)
    return starts


def _check_step(step) -> int:
    return V.check_int("step", step, low=0)


def phase_at(config: MemtraceConfig, step: int) -> Phase:
    """The phase of training step `step` (>= 0): the latest phase that is on and has begun."""
    starts = phase_starts(config)
    step = _check_step(step)
    phase = Phase.FOUNDATION
    for i, s in enumerate(starts):
        if s is not None and s <= step:
            phase = Phase(i + 1)
    return phase


def _first(*starts):
    return next((s for s in starts if s is not None), None)


def plan_at(config: MemtraceConfig, step: int) -> Plan:
    """What step `step` does: its phase and the capture / bias / routing / motif flags."""
    starts = phase_starts(config)
    step = _check_step(step)
    assert len(starts) == NUM_PHASE_STARTS
    accumulate, biased, discover, crystallize = starts
    trace_start = _first(accumulate, biased)
    crystal_start = _first(discover, crystallize)

    capture = False
    if trace_start is not None:
        first_capture = trace_start + config.warmup_steps
        capture = step >= first_capture and (step - first_capture) % config.update_interval == 0
    bias = biased is not None and step >= biased
    record = crystal_start is not None and step >= crystal_start
    since = step - crystal_start if record else -1
    consider = record and since % config.update_interval == 0
    freeze = crystallize is not None and step >= crystallize
    revalidate = record and since > 0 and since % config.prune_interval == 0
    return Plan(step=step, phase=phase_at(config, step), capture=capture, bias=bias, record_routing=record,
                consider_motifs=consider, freeze_motifs=freeze, revalidate=revalidate,
                prune=revalidate and freeze)
