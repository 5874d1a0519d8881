"""MemtraceConfig: every hyper-parameter of training with memory (SPEC 9), validated.

The field names and defaults are SPEC 9's, which are the seeds' `persistent_traces` and
`semantic_crystallization` keys (seeds/semantic-crystallization-plan.md, "Hyperparameters") plus
the loss weights and the phase layout. The ranges are those of the constructors the manager feeds
(TraceMemory, RoutingTree.candidates, MotifRegistry), or stricter, so a config that validates
never makes one of them raise later.

The dataclass is frozen: derive a changed config with `dataclasses.replace(cfg, field=value)`,
which validates again.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from .. import _validate as V
from ..memory import MAX_QUOTA as _MAX_QUOTA

__all__ = ["MemtraceConfig", "NUM_PHASE_STARTS"]

NUM_PHASE_STARTS = 4          # trace accumulation, trace-biased, crystallization discovery, crystallization
_MAX_MOTIF_LENGTH = V.MAX_ROUTING_DEPTH

# Seed keys (seeds/semantic-crystallization-plan.md, "Integration with vector store" and
# "Hyperparameters"; seeds/persistent-traces-quick-reference.md, "Configuration Cheat Sheet")
# and the MemtraceConfig field each one sets.
_SEED_TRACE_KEYS = {
    "quota_per_head": "quota_per_head", "salience_threshold": "salience_threshold",
    "retention_rate": "retention_rate", "decay_rate": "decay_rate", "bias_strength": "bias_strength",
    "update_interval": "update_interval", "warmup_steps": "warmup_steps",
    # not in the seeds, but trace settings of this config: accepted in the same section
    "prune_eps": "prune_eps", "attn_eps": "attn_eps", "window": "window", "max_seq_len": "max_seq_len",
}
_SEED_CRYSTAL_KEYS = {
    "min_frequency": "min_frequency", "min_utility": "min_utility", "max_entropy": "max_entropy",
    "min_age": "min_age", "max_motifs": "max_motifs", "motif_min_length": "motif_min_length",
    "motif_max_length": "motif_max_length", "prune_interval": "prune_interval",
}
_SEED_LOSS_KEYS = {
    "trace_utilization": "trace_loss_weight", "crystallization": "crystal_loss_weight",
    "load_balance": "balance_loss_weight", "ewc": "ewc_weight",
}
# Seed keys that belong to other parts of the system (the vector stores of SPEC 11; `sparsity`,
# which the threshold and the quota replace): accepted and ignored, so a seed file loads as is.
_SEED_TRACE_IGNORED = frozenset({"sparsity", "persist_to_vector_store", "trace_sync_interval", "embedding_dim",
                                 "warm_start", "task_tag"})
_SEED_CRYSTAL_IGNORED = frozenset({"persist_motifs", "motif_embedding_dim", "share_across_models"})
_SEED_SECTIONS = ("persistent_traces", "semantic_crystallization", "loss_weights")


@dataclass(frozen=True)
class MemtraceConfig:
    """The manager's hyper-parameters (SPEC 9 names and defaults).

    Trace memory (SPEC 4; passed to TraceMemory as quota, threshold, retention, decay, ...):
      quota_per_head       int in [1, 2^20]: traces kept per (layer, head)
      salience_threshold   float >= 0, in normalised salience units (the manager's calibration)
      retention_rate       float in [0, 1): EMA momentum of a reinforced trace. 1 is refused: a new
                           trace would be stored with strength (1 - retention) * S = 0 and pruned
      decay_rate           float in [0, 1]: strength kept by an unreinforced trace per capture step
      prune_eps, attn_eps  floats >= 0; window int in [1, 32]; max_seq_len int in [1, 65535]
      bias_strength        float >= 0: beta of alpha = beta / max(M)
      update_interval      int >= 1: steps between captures (and between motif considerations)
      warmup_steps         int >= 0: steps from the start of the first trace phase to its first capture
    Crystallization (SPEC 5; RoutingTree.candidates / MotifRegistry):
      min_frequency int >= 0, min_utility float, max_entropy float >= 0, min_age int >= 0,
      max_motifs int >= 1, motif_min_length <= motif_max_length ints in [1, 255],
      prune_interval int >= 1: steps between registry revalidations
    Loss weights, floats >= 0: trace_loss_weight, crystal_loss_weight, balance_loss_weight, ewc_weight.
    Phases (memtrace.training.schedule):
      total_steps      None or int >= 1
      phase_fractions  4 entries, each a float in [0, 1] or None (phase off), non-decreasing where
                       set: where trace accumulation, trace-biased training, crystallization
                       discovery and crystallization begin, as fractions of total_steps
      phase_starts     None, or the same 4 as absolute steps (ints >= 0 or None, non-decreasing
                       where set); wins over phase_fractions when given
    A phase whose start is None, or at or past total_steps, is off.
    """

    quota_per_head: int = 2048
    salience_threshold: float = 0.05
    retention_rate: float = 0.95
    decay_rate: float = 0.98
    prune_eps: float = 1e-4
    attn_eps: float = 1e-3
    window: int = 16
    max_seq_len: int = 4096
    bias_strength: float = 0.1
    update_interval: int = 100
    warmup_steps: int = 1000
    min_frequency: int = 100
    min_utility: float = 0.05
    max_entropy: float = 1.0
    min_age: int = 500
    max_motifs: int = 512
    motif_min_length: int = 3
    motif_max_length: int = 8
    prune_interval: int = 1000
    trace_loss_weight: float = 0.005
    crystal_loss_weight: float = 0.002
    balance_loss_weight: float = 0.01
    ewc_weight: float = 0.0
    total_steps: int | None = None
    phase_fractions: tuple = (0.2, 0.3, 0.7, 0.85)
    phase_starts: tuple | None = None

    def __post_init__(self):
        for name, value in _normalised(self).items():
            object.__setattr__(self, name, value)

    # -- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Every field by name; JSON-serialisable (tuples become lists in JSON, from_dict restores them)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d) -> MemtraceConfig:
        """The inverse of to_dict; absent fields take their defaults, unknown keys raise ValueError."""
        return V.dataclass_from_dict(cls, d, "config")

    @classmethod
    def from_seed_dict(cls, d) -> MemtraceConfig:
        """Build from the seeds' nested layout (seeds/semantic-crystallization-plan.md, "Hyperparameters"
        and the `memory:` block of "Integration with vector store"):

            {"persistent_traces": {...}, "semantic_crystallization": {...}, "loss_weights": {...}}

        optionally wrapped in {"memory": {...}} (its "vector_store" block is ignored). Section keys
        map to fields of the same name, except loss_weights: trace_utilization -> trace_loss_weight,
        crystallization -> crystal_loss_weight, load_balance -> balance_loss_weight, ewc ->
        ewc_weight (task must be 1.0). `enabled: false` in persistent_traces switches off the two
        trace phases, in semantic_crystallization the two crystallization phases (their
        phase_fractions / phase_starts entries become None); absent, a section is on. Seed keys of
        other subsystems (sparsity, vector-store and embedding settings) are ignored. Top-level keys
        may also be MemtraceConfig fields (total_steps, phase_fractions, ...). Anything else: ValueError.
        """
        if not isinstance(d, dict):
            raise TypeError(f"seed config must be a dict, got {type(d).__name__}")
        if "memory" in d:
            if set(d) != {"memory"}:
                raise ValueError(f"seed config with a 'memory' block must hold nothing else, got keys {sorted(d)}")
            d = d["memory"]
            if not isinstance(d, dict):
                raise TypeError(f"seed config 'memory' must be a dict, got {type(d).__name__}")
            d = {k: v for k, v in d.items() if k != "vector_store"}
        flat, enabled = {}, {}
        unknown = sorted(str(k) for k in d if k not in _SEED_SECTIONS and k not in _FIELD_NAMES)
        if unknown:
            raise ValueError(f"unknown seed config keys: {unknown}; expected sections {list(_SEED_SECTIONS)} "
                             "or MemtraceConfig fields")
        for key, value in d.items():
            if key not in _SEED_SECTIONS:
                flat[key] = value
        sections = (("persistent_traces", _SEED_TRACE_KEYS, _SEED_TRACE_IGNORED),
                    ("semantic_crystallization", _SEED_CRYSTAL_KEYS, _SEED_CRYSTAL_IGNORED),
                    ("loss_weights", _SEED_LOSS_KEYS, frozenset({"task"})))
        for section, mapping, ignored in sections:
            body = d.get(section)
            if body is None:
                continue
            if not isinstance(body, dict):
                raise TypeError(f"seed config '{section}' must be a dict, got {type(body).__name__}")
            known = set(mapping) | set(ignored) | ({"enabled"} if section != "loss_weights" else set())
            bad = sorted(str(k) for k in body if k not in known)
            if bad:
                raise ValueError(f"unknown keys in seed config '{section}': {bad}; known: {sorted(known)}")
            if section == "loss_weights" and "task" in body:
                task = V.check_float("loss_weights.task", body["task"])
                if task != 1.0:
                    raise ValueError(f"loss_weights.task must be 1.0 (the manager adds weighted auxiliary losses "
                                     f"to the task loss as given), got {task}")
            if "enabled" in body:
                enabled[section] = V.check_bool(f"{section}.enabled", body["enabled"])
            for key, value in body.items():
                if key in mapping:
                    field = mapping[key]
                    if field in flat:
                        raise ValueError(f"{field} is given twice (top level and '{section}.{key}')")
                    flat[field] = value
        off = [i for section, idx in (("persistent_traces", (0, 1)), ("semantic_crystallization", (2, 3)))
               if enabled.get(section) is False for i in idx]
        if off:
            fractions = list(flat.get("phase_fractions", _DEFAULTS["phase_fractions"]))
            if len(fractions) == NUM_PHASE_STARTS:
                for i in off:
                    fractions[i] = None
            flat["phase_fractions"] = tuple(fractions)
            starts = flat.get("phase_starts")
            if starts is not None and not isinstance(starts, (str, bytes)) and len(starts) == NUM_PHASE_STARTS:
                starts = list(starts)
                for i in off:
                    starts[i] = None
                flat["phase_starts"] = tuple(starts)
        return cls(**flat)


_FIELD_NAMES = frozenset(f.name for f in fields(MemtraceConfig))
_DEFAULTS = {f.name: f.default for f in fields(MemtraceConfig)}


def _phase_tuple(name: str, value, check) -> tuple:
    """4 entries (list or tuple), each None or check(name[i], entry); non-decreasing where set."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be a tuple of {NUM_PHASE_STARTS} entries, got {type(value).__name__}")
    if len(value) != NUM_PHASE_STARTS:
        raise ValueError(f"{name} must have {NUM_PHASE_STARTS} entries (trace accumulation, trace-biased, "
                         f"crystallization discovery, crystallization), got {len(value)}")
    out = tuple(None if v is None else check(f"{name}[{i}]", v) for i, v in enumerate(value))
    last = None
    for i, v in enumerate(out):
        if v is None:
            continue
        if last is not None and v < last[1]:
            raise ValueError(f"{name} must be non-decreasing where set (phases begin in order), "
                             f"got {name}[{i}]={v} < {name}[{last[0]}]={last[1]}")
        last = (i, v)
    return out


def _normalised(cfg: MemtraceConfig) -> dict:
    """Every field checked and normalised (ints as int, floats as float, tuples as tuples)."""
    g = cfg.__dict__
    out = {
        "quota_per_head": V.check_int("quota_per_head", g["quota_per_head"], low=1, high=_MAX_QUOTA),
        "salience_threshold": V.check_float("salience_threshold", g["salience_threshold"], low=0.0),
        "retention_rate": V.check_rate("retention_rate", g["retention_rate"]),
        "decay_rate": V.check_rate("decay_rate", g["decay_rate"]),
        "prune_eps": V.check_float("prune_eps", g["prune_eps"], low=0.0),
        "attn_eps": V.check_float("attn_eps", g["attn_eps"], low=0.0),
        "window": V.check_int("window", g["window"], low=1, high=32),
        "max_seq_len": V.check_seq_len("max_seq_len", g["max_seq_len"]),
        "bias_strength": V.check_float("bias_strength", g["bias_strength"], low=0.0),
        "update_interval": V.check_int("update_interval", g["update_interval"], low=1),
        "warmup_steps": V.check_int("warmup_steps", g["warmup_steps"], low=0),
        "min_frequency": V.check_int("min_frequency", g["min_frequency"], low=0),
        "min_utility": V.check_float("min_utility", g["min_utility"]),
        "max_entropy": V.check_float("max_entropy", g["max_entropy"], low=0.0),
        "min_age": V.check_int("min_age", g["min_age"], low=0, high=V.MAX_ROUTING_STEP),
        "max_motifs": V.check_int("max_motifs", g["max_motifs"], low=1),
        "motif_min_length": V.check_int("motif_min_length", g["motif_min_length"], low=1, high=_MAX_MOTIF_LENGTH),
        "motif_max_length": V.check_int("motif_max_length", g["motif_max_length"], low=1, high=_MAX_MOTIF_LENGTH),
        "prune_interval": V.check_int("prune_interval", g["prune_interval"], low=1),
        "trace_loss_weight": V.check_float("trace_loss_weight", g["trace_loss_weight"], low=0.0),
        "crystal_loss_weight": V.check_float("crystal_loss_weight", g["crystal_loss_weight"], low=0.0),
        "balance_loss_weight": V.check_float("balance_loss_weight", g["balance_loss_weight"], low=0.0),
        "ewc_weight": V.check_float("ewc_weight", g["ewc_weight"], low=0.0),
        "total_steps": None if g["total_steps"] is None else V.check_int("total_steps", g["total_steps"], low=1),
        "phase_fractions": _phase_tuple("phase_fractions", g["phase_fractions"],
                                        lambda n, v: V.check_float(n, v, low=0.0, high=1.0)),
        "phase_starts": None if g["phase_starts"] is None else _phase_tuple(
            "phase_starts", g["phase_starts"], lambda n, v: V.check_int(n, v, low=0)),
    }
    if out["retention_rate"] >= 1.0:
        raise ValueError("retention_rate must be < 1 (a new trace is stored with strength (1 - retention_rate) * S, "
                         "so 1 would store nothing), got 1.0")
    if out["motif_min_length"] > out["motif_max_length"]:
        raise ValueError(f"motif_min_length ({out['motif_min_length']}) must be <= motif_max_length "
                         f"({out['motif_max_length']})")
    return out

