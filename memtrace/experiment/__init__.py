"""The ablation experiment of issue 29 / SPEC 10 ("does it help?"): synthetic tasks, small
MoE / dense transformers with memtrace attached, arms, runs, the report. See README.md here.

Light on import: the submodules (tasks, models, arms, runner, plan, report, command) load torch
and transformers when imported."""
from .names import ARMS, MOE_ARMS, REFERENCE_ARMS, TASKS

__all__ = ["ARMS", "MOE_ARMS", "REFERENCE_ARMS", "TASKS"]
