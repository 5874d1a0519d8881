"""memtrace.training: the pieces of the training manager (SPEC 9) that stand on their own.

`MemtraceConfig` holds every hyper-parameter of training with memory, validated and serialisable;
`memtrace.training.schedule` turns it into the seeds' five-phase curriculum, a pure function of
the step (`phase_at`, `plan_at`).
"""
from .config import MemtraceConfig
from .manager import Memtrace
from .schedule import Phase, Plan, phase_at, phase_starts, plan_at

__all__ = ["Memtrace", "MemtraceConfig", "Phase", "Plan", "phase_at", "phase_starts", "plan_at"]
