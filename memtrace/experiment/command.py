"""`memtrace experiment`: the argparse definition and the command (memtrace/cli.py adds it).

    memtrace experiment --task TASK [--arms a,b,...] [--seeds N] [--steps N] [--device cpu|cuda]
                        [--out DIR] [--lr LR | --lr-sweep] [--model moe|dense] [--position rope|nope|learned]
                        [--seq-len T] [--batch B] [--vocab V] [--layers L] [--d-model D] [--heads H]
                        [--experts E] [--top-k K] [--eval-interval N] [--set KEY=VALUE ...] [--tag TAG]
                        [--parallel P] [--pilot]
    memtrace experiment --plan NAME [--call K] [--device cuda] [--parallel P] [--steps N]
    memtrace experiment --report [--out DIR] [--markdown PATH]
    memtrace experiment --router-ablation [--seeds N] [--steps N] [--out DIR]
"""
from __future__ import annotations

import argparse
import json

from .names import ARMS, MOE_ARMS, TASKS, parse_arms


def _int_at_least(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {value}")
        return value
    parse.__name__ = "int"
    return parse


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _arms(text):
    try:
        return parse_arms(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _setting(text):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip(), parsed


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("experiment", help="the ablation experiment (issue 29): train arms on synthetic tasks",
                       description="Train baseline / traces / crystallization / both (and the reference biases) on "
                                   "seeded synthetic tasks; one JSON per run; --report rebuilds EXPERIMENTS.md.")
    p.add_argument("--task", choices=TASKS, help="the task")
    p.add_argument("--arms", type=_arms, default=["baseline", "traces", "crystallization", "both"],
                   help=f"comma-separated arms from {', '.join(ARMS)} (default: the four core arms)")
    p.add_argument("--seeds", type=_int_at_least(1), default=5, help="paired seeds 0..N-1 (default 5)")
    p.add_argument("--steps", type=_int_at_least(1), default=None,
                   help="training steps per run (default 600); with --router-ablation: steps per stream (default 2000)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/experiments)")
    p.add_argument("--lr", type=_positive_float, default=None, help="learning rate for every arm")
    p.add_argument("--lr-sweep", action="store_true", help="sweep the baseline's learning rate first, use the best")
    p.add_argument("--model", choices=("moe", "dense"), default="moe")
    p.add_argument("--position", choices=("rope", "nope", "learned"), default="rope")
    p.add_argument("--seq-len", type=_int_at_least(16), default=256)
    p.add_argument("--batch", type=_int_at_least(1), default=32)
    p.add_argument("--vocab", type=_int_at_least(11), default=64)
    p.add_argument("--layers", type=_int_at_least(1), default=4)
    p.add_argument("--d-model", type=_int_at_least(16), default=256)
    p.add_argument("--heads", type=_int_at_least(1), default=8)
    p.add_argument("--ffn", type=_int_at_least(1), default=512)
    p.add_argument("--experts", type=_int_at_least(1), default=8)
    p.add_argument("--top-k", type=_int_at_least(1), default=2)
    p.add_argument("--eval-interval", type=_int_at_least(1), default=None)
    p.add_argument("--eval-batches", type=_int_at_least(1), default=4)
    p.add_argument("--set", dest="settings", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="a MemtraceConfig override (bias_strength, quota_per_head, min_utility, motif_min_length, "
                        "...) or a phase fraction (trace_start, bias_start, crystal_start, freeze_start, ref_start)")
    p.add_argument("--tag", default="", help="a label for this variant (file names, report groups)")
    p.add_argument("--parallel", type=_int_at_least(1), default=1, help="runs side by side (processes)")
    p.add_argument("--pilot", action="store_true", help="mark the runs as a pilot (always so on CPU)")
    p.add_argument("--plan", choices=("gpu25", "tiny"), default=None, help="print (or with --call, run) a preset")
    p.add_argument("--call", type=_int_at_least(0), default=None, help="with --plan: run this call (0: calibrate)")
    p.add_argument("--deadline", type=_positive_float, default=None,
                   help="with --plan --call K: start no run after this many seconds (runs under way finish); "
                        "a plan call always skips runs whose complete JSON is on disk, so calling it again resumes")
    p.add_argument("--report", action="store_true", help="rebuild EXPERIMENTS.md from the JSON files")
    p.add_argument("--router-ablation", action="store_true",
                   help="the stateful-router ablation (issue 26): semantic / recency / frequency / full routing "
                        "precision on a synthetic retrieval stream, CPU; writes OUT/router_ablation.json")
    p.add_argument("--markdown", default="EXPERIMENTS.md", help="where --report writes (default EXPERIMENTS.md)")
    p.set_defaults(func=cmd_experiment, _parser=p)
    return p


def cmd_experiment(args) -> int:
    parser = args._parser
    from .runner import DEFAULT_OUT
    out = args.out or DEFAULT_OUT
    if args.router_ablation:
        return _router_ablation(args, out)
    if args.report:
        from .report import write_report
        text = write_report(out, args.markdown)
        missing = text.split("## Missing runs", 1)[1].strip().splitlines()[0]
        print(f"wrote {args.markdown}: {missing}")
        return 0
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if device != "cpu" and not device.startswith("cuda"):
        parser.error(f"--device must be cpu or cuda, got {device!r}")
    if args.plan:
        from .plan import describe_plan, plan_configs
        if args.call is None:
            print(describe_plan(args.plan))
            return 0
        if args.call == 0:
            return _calibrate(args, device, out)
        configs = plan_configs(args.plan, call=args.call, device=device, out=out, steps=args.steps)
        if not configs:
            parser.error(f"--call {args.call}: plan {args.plan} has no such call")
        return _run_with_sweeps(configs, args.parallel, args.deadline)
    if args.task is None:
        parser.error("--task is required (or --report, or --plan)")
    from dataclasses import replace

    from .runner import RunConfig, lr_sweep, resolve_lr, run_many
    model = dict(kind=args.model, layers=args.layers, d_model=args.d_model, heads=args.heads, ffn=args.ffn,
                 num_experts=args.experts, top_k=args.top_k, position=args.position)
    if args.model == "dense":
        bad = [a for a in args.arms if a in MOE_ARMS]
        if bad:
            parser.error(f"--arms {','.join(bad)} need the MoE model (--model moe)")
    steps = args.steps or 600
    seeds = list(range(args.seeds))
    base = RunConfig(task=args.task, arm="baseline", seed=0, steps=steps, device=device, batch_size=args.batch,
                     seq_len=args.seq_len, vocab_size=args.vocab, model=model,
                     eval_interval=args.eval_interval or 0, eval_batches=args.eval_batches,
                     overrides=dict(args.settings), tag=args.tag, pilot=args.pilot or device == "cpu", out=out,
                     requested={"arms": list(args.arms), "seeds": seeds})
    try:
        from .arms import arm_config
        from .models import ModelSpec
        for arm in args.arms:
            arm_config(arm, steps, num_layers=args.layers, seq_len=args.seq_len, overrides=base.overrides,
                       num_experts=args.experts if args.model == "moe" else None)
        base.model_spec()
        base.task_spec()
        ModelSpec(**dict(model, vocab_size=args.vocab))
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    if args.lr is not None:
        lr, source = args.lr, "--lr"
    elif args.lr_sweep:
        lr, source = lr_sweep(base, parallel=args.parallel), "sweep (this invocation)"
    else:
        lr, source = resolve_lr(base)
    print(f"memtrace experiment: {args.task}, arms {','.join(args.arms)}, seeds {len(seeds)}, {steps} steps on "
          f"{device}, lr {lr:g} ({source})" + (" [PILOT: CPU, not the table]" if base.pilot else ""))
    configs = [replace(base, arm=a, seed=s, lr=lr, lr_source=source) for s in seeds for a in args.arms]
    paths = run_many(configs, parallel=args.parallel)
    print(f"wrote {len(paths)} run file(s) to {out}")
    return 0


def _router_ablation(args, out) -> int:
    parser = args._parser
    given = (("--task", args.task), ("--plan", args.plan), ("--report", args.report))
    others = [flag for flag, value in given if value]
    if others:
        parser.error(f"--router-ablation cannot be combined with {', '.join(others)}")
    if args.device not in (None, "cpu"):
        parser.error(f"--router-ablation runs on the CPU (one query at a time), got --device {args.device}")
    from .router_ablation import DEFAULT_STEPS, write_router_ablation
    steps = args.steps or DEFAULT_STEPS
    print(f"memtrace experiment: router ablation, seeds {args.seeds}, {steps} steps per stream (CPU)")
    path, result = write_router_ablation(out, seeds=args.seeds, steps=steps)
    for source, entry in result["results"].items():
        arms = ", ".join(f"{arm} {a['mean']:.3f} ± {a['std']:.3f}" for arm, a in entry["arms"].items())
        print(f"state from {source}: precision@{result['task']['k']} {arms}")
    pilot = " [PILOT: fewer seeds or steps]" if result["pilot"] else ""
    print(f"wrote {path} ({result['wall_seconds']:.0f} s){pilot}")
    return 0


def _run_with_sweeps(configs, parallel, deadline=None) -> int:
    """Plan calls: sweeps first (choosing each task's lr), then the runs with their task's lr.
    Runs (and sweep points) already complete on disk are skipped; `deadline` seconds bound when
    the last run may start."""
    import os
    import time
    from dataclasses import replace

    from .runner import is_complete, lr_sweep, resolve_lr, run_many
    stop_at = None if deadline is None else time.monotonic() + deadline

    def left():
        return None if stop_at is None else max(0.0, stop_at - time.monotonic())

    sweeps = [c for c in configs if c.sweep]
    # every sweep point of the call side by side first; lr_sweep then finds them complete and only
    # writes each task's sweep file
    run_many(sweeps, parallel=parallel, deadline=left(), skip_complete=True)
    done = set()
    for c in sweeps:
        key = (c.task, c.seq_len, c.model.get("position"))
        if key not in done:
            done.add(key)
            lr_sweep(replace(c, sweep=False, tag="", lr_source="default"), parallel=parallel, deadline=left(),
                     skip_complete=True)
    runs = []
    for c in configs:
        if c.sweep:
            continue
        lr, source = resolve_lr(c)
        runs.append(replace(c, lr=lr, lr_source=source))
    todo = [c for c in runs if not is_complete(c)]
    paths = run_many(todo, parallel=parallel, deadline=left()) if todo else []
    missing = [c for c in todo if not is_complete(c)]
    print(f"wrote {len(paths)} run file(s) and {len(done)} sweep(s) to {os.path.dirname(paths[0]) if paths else '-'}; "
          f"{len(runs) - len(todo)} were already complete; {len(missing)} of this call still missing")
    return 0


def _calibrate(args, device, out) -> int:
    """Call 0: 50 steps of baseline and both on copy, alone and `parallel` side by side; prints
    ms/step and the speed-up, and the plan's estimate with them."""
    import tempfile
    import time
    from dataclasses import replace

    from .plan import describe_plan, plan_configs
    from .runner import run_many
    base = next(c for c in plan_configs(args.plan, device=device) if c.task == "copy" and not c.sweep)
    tmp = tempfile.mkdtemp(prefix="calib-")
    probe = [replace(base, arm=a, steps=50, out=tmp, tag="calib", eval_interval=50) for a in ("baseline", "both")]
    t = time.perf_counter()
    paths = run_many(probe, parallel=1, show_progress=False)
    alone = []
    for p in paths:
        with open(p) as f:
            alone.append(json.load(f)["summary"]["wall_time_per_step_steady"] * 1000)
    t_alone = time.perf_counter() - t
    P = max(2, args.parallel)
    many = [replace(probe[i % 2], seed=i) for i in range(P)]
    t = time.perf_counter()
    run_many(many, parallel=P, show_progress=False)
    t_many = time.perf_counter() - t
    speed = (t_alone / 2 * P) / t_many
    ms = sum(alone) / len(alone)
    print(f"calibration on {device}: {', '.join(f'{a}: {m:.1f} ms/step' for a, m in zip(('baseline', 'both'), alone))}"
          f"; {P} runs side by side: x{speed:.2f} throughput (including process start)")
    print(describe_plan(args.plan, ms_per_step=ms, speedup=speed))
    print(f"(calibration files in {tmp}, not in {out})")
    return 0
