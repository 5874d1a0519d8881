"""Presets: the whole table sized for the GPU budget (`gpu25`), and a tiny CPU pilot (`tiny`).

`memtrace experiment --plan gpu25` prints the calls and the arithmetic below;
`memtrace experiment --plan gpu25 --call K --device cuda --parallel 6` runs call K (1, 2, 3);
`--call 0` is the calibration (50 steps of two arms, alone and 6 side by side) that checks the
assumed time per step before the table is spent.

The budget: one session's 30 device minutes in 10-minute calls; ~25 minutes of it for the table
(the rest: machine start, calibration, slack). Models are small (MoE: 4 layers, d 256, 8 heads of
32, FFN 512, 8 experts top-2, vocab 64; dense: the same with one FFN), so one process leaves an
H100 mostly idle (launch-bound): several runs go side by side as separate processes
(`--parallel`), each its own CUDA context.

Arithmetic (assumed, to be replaced by call 0's numbers): t = 30 ms per training step for one
process alone (T = 256, batch 32; memtrace arms with captures every steps/40 included), and an
effective speed-up S = 4 from 6 processes side by side (6 processes at ~1.5x the single-process
step time each). A 600-step run then costs 600 x 30 ms / 4 = 4.5 s of call time, plus ~15% for
the 20 evaluations of 4 held-out batches.

    call 1  lr sweep, copy + fixed_copy: 2 tasks x 3 lrs x 1 seed (baseline)   6 runs
            core table, copy + fixed_copy: 2 tasks x 4 arms x 5 seeds           40 runs
                                                              46 x 4.5 s x 1.15 = 238 s
    call 2  lr sweep, the other three tasks                                      9 runs
            core table, induction + recall + fixed_copy_gap: 3 x 4 x 5          60 runs = 357 s
    call 3  brackets: oracle + random on copy, fixed_copy, fixed_copy_gap x 5 seeds      30
            beta sweep: traces on fixed_copy, beta 0.05 / 0.3 / 1 / 3, 3 seeds            12
            no RoPE: fixed_copy + fixed_copy_gap x baseline / traces / oracle, 3 seeds    18
            dense model: fixed_copy x baseline / traces, 3 seeds                          6
            knobs: quota 256 and phases at 2% / 5% (traces, fixed_copy), U_min 0.01 / 0.2,
                   motif length 2 and the config's max_entropy 1.0 (crystallization,
                   recall), 3 seeds each                                                  18
            distilled chains (issue 29 point 3): recall + copy, 3 seeds (seeds 0-2 pair
                   with the core table's baseline and crystallization runs)                6
                   (assumed to cost what a crystallization run does: D's own optimizer
                   step is one expert-sized MLP per distilling motif, skipped layers save)
            long context: copy at T = 4096, batch 4, 300 steps, baseline / traces, 2 seeds  4
                   (~60 ms a step alone: 4 x 300 x 60 ms = 72 s, run alone at the end)
                                                              94 x 4.5 s x 1.15 + 72 = 558 s
    total ~ 1153 s = 19 minutes of calls, + process start and Triton compilation (~30-60 s a
    call: the kernel cache on disk is shared by the processes of a machine) -> ~21 minutes.
If call 0 measures t' and S', multiply each call's time by (t' / 30 ms) x (4 / S'); when a call
would pass ~9 minutes, lower the steps (`--steps`, which every plan call takes) rather than the
seeds: 5 paired seeds are the point of the table.

Measured (H100, session 17, docs/perf-log.md): with 6 processes side by side a 600-step run cost
~24 s of call time (baseline 61-226 ms a step, traces 250-440 ms; GPU utilisation 14-26%: the
processes are host-bound), about 5x the assumption above, and 10 processes were slower than 6. The
whole plan is therefore ~85 minutes of calls, about three sessions: `--call K` resumes, so each
session continues where the last stopped.
"""
from __future__ import annotations

from dataclasses import replace

from .runner import RunConfig

__all__ = ["PLANS", "describe_plan", "plan_configs"]

GPU_MODEL = dict(kind="moe", layers=4, d_model=256, heads=8, ffn=512, num_experts=8, top_k=2)
TINY_MODEL = dict(kind="moe", layers=2, d_model=32, heads=2, ffn=64, num_experts=4, top_k=2)
CORE_ARMS = ("baseline", "traces", "crystallization", "both")
TASKS5 = ("copy", "induction", "recall", "fixed_copy", "fixed_copy_gap")


def _g(call, task, arms, seeds, **kw):
    return dict(call=call, task=task, arms=tuple(arms), seeds=tuple(range(seeds)), **kw)


def _gpu25():
    groups = []
    for call, tasks in ((1, ("copy", "fixed_copy")), (2, ("induction", "recall", "fixed_copy_gap"))):
        # each call sweeps its own tasks' learning rate first: a call cut short still holds
        # complete, tuned rows for the tasks it reached
        for t in tasks:
            groups.append(_g(call, t, ("baseline",), 1, sweep=True))
        for t in tasks:
            groups.append(_g(call, t, CORE_ARMS, 5))
    for t in ("copy", "fixed_copy", "fixed_copy_gap"):
        groups.append(_g(3, t, ("oracle", "random"), 5))
    for beta in (0.05, 0.3, 1.0, 3.0):
        groups.append(_g(3, "fixed_copy", ("traces",), 3, overrides={"bias_strength": beta}, tag=f"beta{beta:g}"))
    for t in ("fixed_copy", "fixed_copy_gap"):
        groups.append(_g(3, t, ("baseline", "traces", "oracle"), 3, model={"position": "nope"}))
    # the dense model of the same sizes (one FFN instead of 8 experts) for the traces-only arms
    groups.append(_g(3, "fixed_copy", ("baseline", "traces"), 3, model={"kind": "dense"}))
    groups.append(_g(3, "fixed_copy", ("traces",), 3, overrides={"quota_per_head": 256}, tag="quota256"))
    # the seeds' curriculum starts the bias at 20% of the steps; a task learned before that leaves
    # the traces nothing to speed up: the same arm with the phases at 2% / 5%
    groups.append(_g(3, "fixed_copy", ("traces",), 3, overrides={"trace_start": 0.02, "bias_start": 0.05},
                     tag="early"))
    for u in (0.01, 0.2):
        groups.append(_g(3, "recall", ("crystallization",), 3, overrides={"min_utility": u}, tag=f"umin{u:g}"))
    groups.append(_g(3, "recall", ("crystallization",), 3,
                     overrides={"motif_min_length": 2, "motif_max_length": 2}, tag="motif2"))
    # the config's own path-entropy limit (the arms use ln(num_experts), see arms.py)
    groups.append(_g(3, "recall", ("crystallization",), 3, overrides={"max_entropy": 1.0}, tag="hmax1"))
    for t in ("recall", "copy"):   # no tag: the rows join the core table's groups, paired by seed
        groups.append(_g(3, t, ("distilled",), 3))
    groups.append(_g(3, "copy", ("baseline", "traces"), 2, seq_len=4096, batch_size=4, steps=300, tag="long"))
    return dict(model=GPU_MODEL, steps=600, seq_len=256, batch_size=32, vocab_size=64, eval_batches=4,
                groups=groups)


def _tiny():
    groups = [_g(1, "fixed_copy", ("baseline", "traces"), 1),
              _g(1, "copy", ("baseline", "crystallization", "distilled"), 1)]
    return dict(model=TINY_MODEL, steps=6, seq_len=32, batch_size=4, vocab_size=32, eval_batches=1, groups=groups)


PLANS = {"gpu25": _gpu25, "tiny": _tiny}


def plan_configs(name: str, *, call=None, device="cpu", out=None, steps=None, include_sweeps=True) -> list:
    """The RunConfigs of plan `name` (only call `call` when given). Sweep groups come back with
    sweep=True and arm baseline, one per lr of the runner's LR_GRID."""
    from .runner import DEFAULT_OUT, LR_GRID
    if name not in PLANS:
        raise ValueError(f"unknown plan {name!r}; known: {', '.join(PLANS)}")
    p = PLANS[name]()
    configs = []
    for grp in p["groups"]:
        if call is not None and grp["call"] != call:
            continue
        if grp.get("sweep") and not include_sweeps:
            continue
        model = dict(p["model"], **grp.get("model", {}))
        n_steps = steps if steps is not None else grp.get("steps", p["steps"])
        if steps is not None and "steps" in grp:      # keep the long-context runs' share of the budget
            n_steps = max(1, steps * grp["steps"] // p["steps"])
        base = RunConfig(task=grp["task"], arm="baseline", seed=0, steps=n_steps, device=device,
                         batch_size=grp.get("batch_size", p["batch_size"]), seq_len=grp.get("seq_len", p["seq_len"]),
                         vocab_size=p["vocab_size"], model=model, eval_batches=p["eval_batches"],
                         overrides=dict(grp.get("overrides", {})), tag=grp.get("tag", ""), plan=name,
                         plan_call=grp["call"],
                         pilot=(name == "tiny" or device == "cpu"), out=out or DEFAULT_OUT,
                         requested={"arms": list(grp["arms"]), "seeds": list(grp["seeds"])})
        if grp.get("sweep"):
            configs += [replace(base, lr=lr, lr_source="sweep", sweep=True, tag=f"lr{lr:g}") for lr in LR_GRID]
            continue
        configs += [replace(base, arm=a, seed=s) for s in grp["seeds"] for a in grp["arms"]]
    return configs


def describe_plan(name: str, ms_per_step: float = 30.0, speedup: float = 4.0) -> str:
    """The plan's calls, run counts and estimated call times at `ms_per_step` and `speedup`."""
    configs = plan_configs(name)
    lines = [f"plan {name}: {len(configs)} runs; estimate at {ms_per_step:g} ms/step alone (x T/256 for longer "
             f"sequences) and x{speedup:g} from processes side by side, +15% for evaluation"]
    total = 0.0
    for call in sorted({c for c in (_call_of(name, cfg) for cfg in configs)}):
        cs = [c for c in configs if _call_of(name, c) == call]
        secs = sum(c.steps * ms_per_step / 1000 * max(1.0, c.seq_len * c.batch_size / (256 * 32)) for c in cs)
        secs = secs / speedup * 1.15
        total += secs
        lines.append(f"  call {call}: {len(cs):3d} runs, {sum(c.steps for c in cs):6d} steps, ~{secs / 60:4.1f} min"
                     f"   memtrace experiment --plan {name} --call {call} --device cuda --parallel 6")
    lines.append(f"  total ~{total / 60:.1f} min of calls (+ start and compilation, ~1 min a call)")
    lines.append("  report: memtrace experiment --report")
    return "\n".join(lines)


def _call_of(name, cfg) -> int:
    return cfg.plan_call
