"""`memtrace experiment --report`: EXPERIMENTS.md rebuilt from the run JSON files.

Sections: setup (models, tasks, arms, budget, environment), one table per group (task, model,
positions, length, tag) with mean +- standard deviation over seeds per arm (final accuracy, steps to
90% / 99%, wall time per step, FLOPs per token, peak memory, trace coverage, useful-edge share,
motif count, and for the distilled arm how many of them ran distilled), PNG curves (held-out
accuracy, mean +- spread per arm; matplotlib Agg), one line per prediction of the seeds
(confirmed / not confirmed / mixed / not measured, with the numbers; the FLOPs one also for the
distilled arm), the stateful-router ablation (router_ablation.json, from `memtrace experiment --router-ablation`; said
to be missing when absent), and the missing runs: those of the gpu25 plan (the table) and those an
invocation asked for (each JSON's `requested`) with no file. Pilot runs (CPU, tiny) are listed
apart and never used for a verdict. Steps to a target that was never reached count as the step budget in means (written
">budget").
"""
from __future__ import annotations

import glob
import json
import math
import os
from collections import defaultdict

__all__ = ["PREDICTIONS", "build_report", "load_runs", "router_section", "write_report"]

ROUTER_FILE = "router_ablation.json"         # router_ablation.RESULT_FILE (not imported: it loads torch)


def load_runs(folder: str) -> tuple:
    """(table runs, sweep runs, unreadable files) from folder/*.json."""
    runs, sweeps, bad = [], [], []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        if os.path.basename(path) == ROUTER_FILE:        # not a run: its own section
            continue
        try:
            with open(path) as f:
                r = json.load(f)
        except (OSError, ValueError) as exc:
            bad.append((os.path.basename(path), str(exc)))
            continue
        if os.path.basename(path).startswith("sweep__"):
            sweeps.append(r)
        elif isinstance(r, dict) and "arm" in r and "summary" in r:
            r["_file"] = os.path.basename(path)
            runs.append(r)
        else:
            bad.append((os.path.basename(path), "not a run file"))
    return runs, sweeps, bad


def group_key(r) -> tuple:
    m = r["config"]["model"]
    return (r["task"], m["kind"], m["position"], r["config"]["task"]["seq_len"], r.get("tag", ""))


def _label(key) -> str:
    task, kind, pos, T, tag = key
    return f"{task} / {kind} / {pos} / T={T}" + (f" / {tag}" if tag else "")


def _stats(values):
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None, 0
    mean = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, sd, len(vals)


def _steps_to(r, which):
    v = r["summary"].get(which)
    return (r["steps"], True) if v is None else (v, False)


def _fmt(mean, sd, digits=3, scale=1.0, unit=""):
    if mean is None:
        return "-"
    return f"{mean * scale:.{digits}g} ± {sd * scale:.2g}{unit}"


ORDER = ("baseline", "traces", "crystallization", "both", "distilled", "oracle", "random")


def _table(rows_by_arm) -> list:
    head = ("| arm | seeds | final acc | steps to 90% | steps to 99% | wall ms/step | fwd MFLOP/token | "
            "FLOPs saved | peak MiB | trace coverage | useful share (chance) | motifs |")
    out = [head, "|" + "---|" * 12]
    for arm in sorted(rows_by_arm, key=lambda a: ORDER.index(a) if a in ORDER else 99):
        rs = rows_by_arm[arm]
        col = lambda k: _stats([r["summary"].get(k) for r in rs])

        def steps(which):
            vals = [_steps_to(r, which) for r in rs]
            m, s, _ = _stats([v for v, _ in vals])
            cens = sum(1 for _, c in vals if c)
            return _fmt(m, s, 4) + (f" ({cens} >budget)" if cens else "")
        peak = col("peak_memory_bytes")
        useful = col("useful_share")
        chance = col("useful_chance")
        distilled = col("motifs_distilled")
        motifs = _fmt(*col("motif_count")[:2])
        if distilled[0] is not None:      # the distilled arm: how many held motifs ran distilled at the end
            motifs += f" ({_fmt(*distilled[:2])} distilled)"
        out.append("| " + " | ".join([
            arm, str(len(rs)), _fmt(*col("final_acc")[:2]), steps("steps_to_90"), steps("steps_to_99"),
            _fmt(*col("wall_time_per_step")[:2], scale=1000), _fmt(*col("flops_per_token")[:2], scale=1e-6),
            _fmt(*col("flops_saving_share")[:2], scale=100, unit="%"),
            "-" if peak[0] is None else _fmt(*peak[:2], scale=1 / 2**20),
            _fmt(*col("trace_coverage")[:2]),
            "-" if useful[0] is None else f"{_fmt(*useful[:2])} ({chance[0]:.3g})", motifs]) + " |")
    return out


def _curves(key, rows_by_arm, fig_dir) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for arm in sorted(rows_by_arm, key=lambda a: ORDER.index(a) if a in ORDER else 99):
        rs = rows_by_arm[arm]
        steps = [p["step"] for p in rs[0]["curves"]]
        for ax, metric in zip(axes, ("acc", "loss")):
            series = [[p[metric] for p in r["curves"]] for r in rs if len(r["curves"]) == len(steps)]
            if not series:
                continue
            mean = [sum(col) / len(col) for col in zip(*series)]
            sd = [_stats(list(col))[1] or 0.0 for col in zip(*series)]
            ax.plot(steps, mean, label=f"{arm} (n={len(series)})")
            ax.fill_between(steps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], alpha=0.2)
            ax.set_xlabel("step")
            ax.set_ylabel(f"held-out {metric}")
    axes[0].legend(fontsize=7)
    fig.suptitle(_label(key), fontsize=9)
    fig.tight_layout()
    os.makedirs(fig_dir, exist_ok=True)
    name = "curves__" + "__".join(str(k) for k in key if k != "").replace("/", "-") + ".png"
    fig.savefig(os.path.join(fig_dir, name), dpi=90)
    plt.close(fig)
    return name


# ---- predictions ------------------------------------------------------------------------------

def _paired(groups, task_filter, arm, metric, tag="", position="rope", long=False):
    """[(task, seed, arm value, baseline value)] over the groups that match."""
    out = []
    for key, by_arm in groups.items():
        task, kind, pos, T, gtag = key
        if task not in task_filter or pos != position or gtag != tag or (T >= 4096) != long:
            continue
        base = {r["seed"]: r for r in by_arm.get("baseline", [])}
        for r in by_arm.get(arm, []):
            if r["seed"] in base:
                out.append((task, r["seed"], metric(r), metric(base[r["seed"]])))
    return out


def _s90(r):
    return _steps_to(r, "steps_to_90")[0]


def _verdict_lower(pairs, rel=0.0):
    """Arm value lower than the baseline's (faster): confirmed when the mean paired change is below
    -rel and at least 80% of the pairs go that way; not confirmed when the mean does not improve;
    mixed otherwise."""
    if not pairs:
        return "not measured", "no paired runs"
    diffs = [(a - b) / b if b else 0.0 for _, _, a, b in pairs]
    mean = sum(diffs) / len(diffs)
    better = sum(1 for d in diffs if d < 0)
    nums = f"mean paired change {mean * 100:+.1f}% over {len(diffs)} pairs, {better}/{len(diffs)} better"
    if mean < -rel and better >= 0.8 * len(diffs):
        return "confirmed", nums
    if mean >= 0 or better <= len(diffs) / 2:
        return "not confirmed", nums
    return "mixed", nums


def _final_acc(r):
    return r["summary"]["final_acc"]


def _p_convergence(groups, tasks, arm):
    verdict, nums = _verdict_lower(_paired(groups, tasks, arm, _s90))
    acc = _paired(groups, tasks, arm, _final_acc)
    if acc:
        # steps to 90% is censored at the budget when neither arm gets there: the final accuracy says more
        mean_arm = sum(a for _, _, a, _ in acc) / len(acc)
        mean_base = sum(b for _, _, _, b in acc) / len(acc)
        nums += f"; final accuracy {mean_arm:.3f} against the baseline's {mean_base:.3f} over the same pairs"
    return verdict, nums


def _p_flops(groups, arms=("crystallization", "both")):
    rows = [r for by_arm in groups.values() for a in arms for r in by_arm.get(a, [])]
    if not rows:
        return "not measured", f"no {' / '.join(arms)} runs"
    shares = [r["summary"].get("flops_saving_share") or 0.0 for r in rows]
    mean = sum(shares) / len(shares)
    nums = f"FLOPs saved {mean * 100:.1f}% of the forward (mean of {len(rows)} runs, max {max(shares) * 100:.1f}%)"
    if mean >= 0.15:
        return "confirmed", nums
    if max(shares) >= 0.15:
        return "mixed", nums
    return "not confirmed", nums


def _p_speed(groups, arm, low):
    pairs = _paired(groups, set(t for t, *_ in groups), arm, lambda r: r["summary"]["wall_time_per_step_steady"])
    if not pairs:
        return "not measured", "no paired runs"
    ratios = [b / a for *_, a, b in pairs if a]
    mean = sum(ratios) / len(ratios)
    nums = f"training speed {mean * 100:.0f}% of the baseline's (mean of {len(ratios)} pairs)"
    return ("confirmed" if mean >= low else "not confirmed"), nums


def _p_long(groups):
    pairs = _paired(groups, {"copy", "induction", "recall"}, "traces", lambda r: r["summary"]["final_loss"], tag="long",
                    long=True)
    if not pairs:
        return "not measured", "no paired long-context (T >= 4096) runs"
    verdict, nums = _verdict_lower(pairs, rel=0.05)
    return verdict, "held-out loss: " + nums


def _p_coverage(groups):
    vals = [r["summary"].get("trace_coverage") for by_arm in groups.values() for a in ("traces", "both")
            for r in by_arm.get(a, []) if r["summary"].get("trace_coverage") is not None]
    if not vals:
        return "not measured", "no traces runs"
    mean = sum(vals) / len(vals)
    return ("confirmed" if mean >= 0.30 else "not confirmed"), f"final trace coverage {mean:.3f} (mean of {len(vals)})"


def _p_motifs(groups):
    vals = [r["summary"].get("motif_count") or 0 for by_arm in groups.values() for a in ("crystallization", "both")
            for r in by_arm.get(a, [])]
    if not vals:
        return "not measured", "no crystallization runs"
    mean = sum(vals) / len(vals)
    return ("confirmed" if mean >= 50 else "not confirmed"), f"held motifs at the end: {mean:.1f} (mean of {len(vals)})"


def _p_beta(groups):
    pts = []
    for key, by_arm in groups.items():
        if key[0] == "fixed_copy" and key[2] == "rope" and (key[4].startswith("beta") or key[4] == ""):
            for r in by_arm.get("traces", []):
                beta = (r["config"]["memtrace"] or {}).get("bias_strength")
                pts.append((beta, _s90(r)))
    betas = sorted({b for b, _ in pts if b is not None})
    if len(betas) < 3:
        return "not measured", "fewer than 3 bias strengths on fixed_copy"
    means = [(b, sum(s for bb, s in pts if bb == b) / sum(1 for bb, _ in pts if bb == b)) for b in betas]
    text = ", ".join(f"beta {b:g}: {m:.0f}" for b, m in means)
    mono = all(means[i + 1][1] <= means[i][1] for i in range(len(means) - 1))
    down = means[-1][1] < means[0][1]
    return ("confirmed" if mono and down else "mixed" if down else "not confirmed"), "mean steps to 90%: " + text


PREDICTIONS = (
    ("Traces speed up convergence on copy tasks (quick-reference checklist; plan: 'bias injection improves "
     "convergence on copy tasks')", lambda g: _p_convergence(g, {"copy", "fixed_copy"}, "traces")),
    ("Traces speed up induction heads (plan: 'faster convergence, better long-range')",
     lambda g: _p_convergence(g, {"induction"}, "traces")),
    ("Traces help associative recall", lambda g: _p_convergence(g, {"recall"}, "traces")),
    ("Combined system converges faster than the baseline (plan, phase 5 criterion)",
     lambda g: _p_convergence(g, {"copy", "fixed_copy", "induction", "recall"}, "both")),
    ("Crystallized motifs save 15-30% of FLOPs (plan 'Expected Outcomes'; quick reference +15-30%)", _p_flops),
    ("Crystallized motifs save 15-30% of FLOPs, held chains distilled into one expert (issue 29 point 3: "
     "the later layers' router and expert calls skipped)", lambda g: _p_flops(g, ("distilled",))),
    ("Training speed with traces is 95-98% of the baseline's (quick-reference table)",
     lambda g: _p_speed(g, "traces", 0.95)),
    ("Training speed with crystallization is ~99% of the baseline's (quick-reference table)",
     lambda g: _p_speed(g, "crystallization", 0.98)),
    ("Long-context performance +5-15% with traces (quick-reference table; plan: perplexity >= 5% better)", _p_long),
    ("Trace coverage >= 30% of attention (plan, target goals)", _p_coverage),
    (">= 50 stable crystallized motifs after training (plan, target goals)", _p_motifs),
    ("Stronger bias -> faster convergence (math foundations, entropy reduction)", _p_beta),
)


def _missing(runs) -> list:
    from .plan import plan_configs
    from .runner import run_name
    have = {r["_file"][:-5] for r in runs}
    expected = {}
    for cfg in plan_configs("gpu25", include_sweeps=False):
        expected[run_name(cfg)] = "gpu25 plan"
    for r in runs:
        req = r.get("requested") or {}
        if not req:
            continue
        stem = r["_file"][:-5]
        prefix = stem.rsplit("__", 1)[0]
        parts = prefix.split("__")
        for arm in req.get("arms", []):
            for seed in req.get("seeds", []):
                name = "__".join(parts[:2] + [arm] + parts[3:] + [f"s{seed}"])
                expected.setdefault(name, "requested by " + stem)
    return sorted((n, why) for n, why in expected.items() if n not in have)


def _weights(w) -> str:
    return f"{w['alpha']:g}, {w['beta']:g}, {w['gamma']:g}, {w['decay']:g}"


def router_section(folder: str) -> list:
    """The 'Stateful router' section from folder/router_ablation.json (or a line saying it is missing)."""
    lines = ["## Stateful router (seed: 0.82 -> 0.94)", ""]
    path = os.path.join(folder, ROUTER_FILE)
    if not os.path.exists(path):
        return lines + [f"Missing: no {ROUTER_FILE} in `{folder}` (run `memtrace experiment --router-ablation`)."]
    try:
        with open(path) as f:
            r = json.load(f)
        results, claim, k = r["results"], r["claim"]["precision_at_3"], r["task"]["k"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return lines + [f"Unreadable: {ROUTER_FILE}: {exc}"]
    env = r.get("environment", {})
    lines += [("PILOT (fewer seeds or steps than the measurement): not evidence. " if r.get("pilot") else "")
              + f"{len(r['seeds'])} seeds, {r['steps']} test and {r['validation_steps']} validation steps per "
              f"stream, {r['task']['num_units']} units, k = {k}; {env.get('device')}, torch {env.get('torch')}, "
              f"{env.get('date', '?')[:10]}. Task and arms: memtrace/experiment/router_ablation.py. "
              f"Metric: {r['metric']}. Weights: {r['selection_rule']}; every grid point is in the JSON.", ""]
    claimed_gain = claim["full"] - claim["semantic"]
    for source, entry in results.items():
        lines += [f"State from {source}: {r['state_sources'].get(source, '')}.", "",
                  f"| arm | precision@{k} | seed's claim | gain over semantic (paired) | weights (alpha, beta, gamma, "
                  "decay) |", "|---|---|---|---|---|"]
        # sort_keys wrote the dicts alphabetically: the JSON's "arms" keeps the arms' order
        order = [a for a in r.get("arms", []) if a in entry["arms"]] or sorted(entry["arms"])
        rows = [(arm, arm, entry["arms"][arm], "chosen on validation") for arm in order]
        rows += [(f"{arm} (seed's weights)", arm, entry["seed_weights"][arm], "the seed's")
                 for arm in order if arm in entry["seed_weights"]]
        for name, arm, a, how in rows:
            gain = a["gain_over_semantic"]
            lines.append(f"| {name} | {a['mean']:.3f} ± {a['std']:.3f} | {claim.get(arm, '-')} | "
                         f"{gain['mean']:+.3f} ± {gain['std']:.3f} | {_weights(a['weights'])} ({how}) |")
        full, semantic = entry["arms"]["full"], entry["arms"]["semantic"]
        gains = [a - b for a, b in zip(full["test_per_seed"], semantic["test_per_seed"])]
        gain = sum(gains) / len(gains)
        # a gain counts only when every seed shows it
        verdict = ("no consistent gain" if min(gains) <= 0 else "reaches the seed's gain" if gain >= claimed_gain
                   else "a gain on every seed, smaller than the seed's")
        lines += ["", f"Full stateful minus semantic only: {gain:+.3f} ± {full['gain_over_semantic']['std']:.3f} over "
                  f"{len(gains)} seeds (seed: {claimed_gain:+.2f}): {verdict}.", ""]
    return lines


def build_report(folder: str, fig_dir: str | None = None, md_dir: str = ".") -> str:
    """EXPERIMENTS.md content from the runs in `folder` (figures into fig_dir when given)."""
    runs, sweeps, bad = load_runs(folder)
    table = [r for r in runs if not r.get("pilot")]
    pilots = [r for r in runs if r.get("pilot")]
    lines = ["# EXPERIMENTS: does it help? (issue 29, SPEC 10)", "",
             "Generated by `memtrace experiment --report` from "
             f"`{folder}` ({len(table)} table runs, {len(pilots)} pilot runs, {len(sweeps)} sweep files). "
             "Do not edit by hand.", "", "## Setup", "",
             "Tasks, models, arms and measurements: memtrace/experiment/README.md. Same initial weights, data "
             "order and step budget for every arm of a seed; the learning rate is the baseline's best from a sweep "
             "where one was run (`lr_source` in each JSON). Mean ± standard deviation over seeds.", ""]
    envs = sorted({(r["environment"].get("device"), r["environment"].get("gpu"), r["environment"].get("torch"),
                    r["environment"].get("transformers")) for r in table}, key=str)
    for dev, gpu, tv, hv in envs:
        lines.append(f"- device {dev}{' (' + gpu + ')' if gpu else ''}, torch {tv}, transformers {hv}")
    if sweeps:
        lines += ["", "Learning-rate sweeps (baseline, first seed):", ""]
        for s in sweeps:
            if "chosen_lr" in s:
                grid = ", ".join(f"{r['lr']:g}: acc {r['final_acc']:.3f}" for r in s.get("results", []))
                lines.append(f"- {s['task']} (T={s.get('seq_len')}): chose lr {s['chosen_lr']:g} ({grid})"
                             + (" [pilot]" if s.get("pilot") else ""))
    for title, subset in (("Results", table), ("Pilot runs (CPU, tiny, not the table)", pilots)):
        groups = defaultdict(lambda: defaultdict(list))
        for r in subset:
            groups[group_key(r)][r["arm"]].append(r)
        lines += ["", f"## {title}", ""]
        if not subset:
            lines.append("No runs." if title == "Results" else "None.")
            continue
        if title != "Results":
            lines.append("These runs test the pipeline, not the science: nothing below is evidence.")
            lines.append("")
        for key in sorted(groups):
            lines += [f"### {_label(key)}", ""] + _table(groups[key])
            steps = sorted({r["steps"] for rs in groups[key].values() for r in rs})
            lines.append("")
            lines.append(f"Step budget {', '.join(map(str, steps))}; eval every "
                         f"{next(iter(groups[key].values()))[0]['config']['eval_interval']} steps.")
            if fig_dir is not None and title == "Results":
                name = _curves(key, groups[key], fig_dir)
                if name:
                    link = os.path.relpath(os.path.join(fig_dir, name), md_dir)
                    lines += ["", f"![{_label(key)}]({link})"]
            lines.append("")
    groups = defaultdict(lambda: defaultdict(list))
    for r in table:
        groups[group_key(r)][r["arm"]].append(r)
    lines += ["", "## The seeds' predictions", "",
              "Verdicts from table runs only (pilot runs never count). Rule for 'faster': the mean paired change "
              "in steps to 90% accuracy is negative and at least 80% of the seed pairs improve -> confirmed; "
              "no mean improvement or at most half the pairs improve -> not confirmed; otherwise mixed.", ""]
    for text, fn in PREDICTIONS:
        verdict, nums = fn(groups)
        lines.append(f"- **{verdict}**: {text}: {nums}.")
    lines += [""] + router_section(folder)
    missing = _missing(runs)
    lines += ["", "## Missing runs", ""]
    if missing:
        lines.append(f"{len(missing)} expected run(s) have no JSON file:")
        lines += [f"- {n} ({why})" for n, why in missing]
    else:
        lines.append("None: every expected run has its file.")
    if bad:
        lines += ["", "Unreadable files (skipped, listed here so nothing is skipped silently):"]
        lines += [f"- {n}: {why}" for n, why in bad]
    return "\n".join(lines) + "\n"


def write_report(folder: str, out_md: str = "EXPERIMENTS.md", fig_dir: str | None = None) -> str:
    from .runner import write_text_atomic
    fig_dir = fig_dir or os.path.join(folder, "figures")
    text = build_report(folder, fig_dir, md_dir=os.path.dirname(os.path.abspath(out_md)))
    write_text_atomic(text, out_md)
    return text
