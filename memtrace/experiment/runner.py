"""Runs of the ablation experiment: one (task, arm, seed) trained and measured, one JSON written.

Pairing: for a seed s every arm gets the same initial weights (`build_model(spec, seed=s)`), the
same training batches in the same order (a generator seeded from s only) and the same held-out
batches; the step budget and the learning rate are the same for every arm of an invocation.

Per eval interval (and at step 0) the run records: held-out loss, token accuracy and sequence
accuracy (every scored token right), the manager's metrics (trace coverage, stability, count,
motif count / utility / entropy, FLOPs saved per token, phase) and, for runs that store traces,
the share of stored traces that lie on the task's useful edges (with the share a random causal
edge would have); for the distilled arm, the held motifs distilling / distilled and the last
distillation loss. The summary holds final and best accuracy, steps to 90% / 99% token accuracy
(first eval step at or above; None = not reached within the budget; resolution = eval interval),
wall time per training step (evaluation excluded, the distilled arm's `distill_step` included;
CUDA synchronised at window edges), forward FLOPs per token (analytic model count minus the
manager's counted savings), peak CUDA memory.

The distilled arm: the MoE handle (`hf.attach(...).routers`) is put in mode "distill" with the
arm's distill_steps / distill_lr (`arms.distill_settings`), and `handle.routers.distill_step()`
runs after every `mgr.step()`: D's own optimizer on the pairs the step's training forward
collected (evaluation forwards run in eval mode and collect nothing).

Files: `<out>/<task>__<model>-<position>-T<len>__<arm>[__<tag>]__s<seed>.json`, written to a
temporary file in the same folder and renamed (an interrupted run leaves no partial file).
Learning-rate sweep files start with `sweep__` and are not table runs.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

from .arms import (
    ARMS,
    MOE_ARMS,
    REFERENCE_ARMS,
    ExperimentMemtrace,
    ReferenceBiasMemtrace,
    arm_config,
    distill_settings,
    reference_bias,
)
from .models import ModelSpec, build_model, forward_flops_per_token
from .tasks import TaskSpec, chance_share, make_batch, useful_edge_set

__all__ = ["DEFAULT_LR", "DEFAULT_OUT", "LR_GRID", "RunConfig", "is_complete", "run_many", "run_one", "lr_sweep",
           "run_path", "write_json_atomic"]

DEFAULT_OUT = os.path.join("benchmarks", "results", "experiments")
DEFAULT_LR = 1e-3
LR_GRID = (3e-4, 1e-3, 3e-3)
SCHEMA = 1


@dataclass
class RunConfig:
    """Everything one run needs; stored in its JSON."""
    task: str
    arm: str
    seed: int
    steps: int
    device: str = "cpu"
    lr: float = DEFAULT_LR
    lr_source: str = "default"
    batch_size: int = 32
    seq_len: int = 256
    vocab_size: int = 64
    model: dict = field(default_factory=dict)      # ModelSpec fields (kind, layers, d_model, ...)
    eval_interval: int = 0                         # 0: steps // 20 (at least 1)
    eval_batches: int = 4
    overrides: dict = field(default_factory=dict)  # MemtraceConfig fields and phase fractions
    tag: str = ""
    pilot: bool = False
    plan: str = ""
    plan_call: int = 0
    requested: dict = field(default_factory=dict)  # {"arms": [...], "seeds": [...]} of the invocation
    sweep: bool = False
    out: str = DEFAULT_OUT

    def task_spec(self) -> TaskSpec:
        return TaskSpec(self.task, vocab_size=self.vocab_size, seq_len=self.seq_len, batch_size=self.batch_size)

    def model_spec(self) -> ModelSpec:
        kw = dict(self.model)
        kw.setdefault("vocab_size", self.vocab_size)
        kw["max_len"] = max(kw.get("max_len", 0), self.seq_len)
        return ModelSpec(**kw)

    def interval(self) -> int:
        return self.eval_interval or max(1, self.steps // 20)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", str(text)).strip("-")


def run_name(cfg: RunConfig) -> str:
    ms = cfg.model_spec()
    parts = [cfg.task, f"{ms.kind}-{ms.position}-T{cfg.seq_len}", cfg.arm]
    if cfg.tag:
        parts.append(_slug(cfg.tag))
    parts.append(f"s{cfg.seed}")
    name = "__".join(parts)
    return ("sweep__" + name) if cfg.sweep else name


def run_path(cfg: RunConfig) -> str:
    return os.path.join(cfg.out, run_name(cfg) + ".json")


def write_json_atomic(obj, path: str) -> None:
    """Write JSON beside `path` and rename it into place (never a partial file at `path`)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True, default=_jsonable)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


def write_text_atomic(text: str, path: str) -> None:
    """Write text beside `path` and rename it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".md", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "name"):
        return str(x.name).lower()
    return str(x)


def environment(device: str) -> dict:
    import memtrace
    try:
        import transformers
    except ImportError:         # the router ablation runs without it
        transformers = None
    env = {"device": device, "torch": torch.__version__, "transformers": getattr(transformers, "__version__", None),
           "memtrace": getattr(memtrace, "__version__", "unknown"), "python": platform.python_version(),
           "platform": platform.platform(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "cpu_threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                           cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def _losses(logits, labels):
    """(mean loss over scored positions, per-position next-token loss [B*T] detached,
    token-correct count, scored count, sequences all right, sequences)."""
    lg = logits[:, :-1].float()
    tgt = labels[:, 1:]
    scored = tgt != -100
    loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), ignore_index=-100)
    return loss, scored, lg, tgt


def _token_loss(logits, input_ids):
    """Routing rewards: the next-token loss of every position (the last one repeats its row's mean)."""
    with torch.no_grad():
        lg = logits[:, :-1].float()
        per = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none")
        per = per.view(input_ids.shape[0], -1)
        return torch.cat([per, per.mean(1, keepdim=True)], dim=1).reshape(-1)


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _lr_at(step, steps, lr):
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _useful_share(mgr, edge_keys: set, seq_len: int) -> dict:
    mem = mgr.memory()
    on = total = 0
    per_layer = []
    for layer in range(mgr.num_layers):
        _, q, k, _, _, _ = mem.traces(layer)
        pairs = list(zip(q.tolist(), k.tolist()))
        hit = sum(1 for p in pairs if p in edge_keys)
        per_layer.append(hit / len(pairs) if pairs else None)
        on += hit
        total += len(pairs)
    return {"useful_share": on / total if total else None, "useful_share_per_layer": per_layer,
            "stored_traces": total}


def _evaluate(model, mgr, batches, device):
    model.eval()
    tot_loss = correct = scored_n = seq_ok = seqs = 0.0
    ctx = mgr.paused() if mgr is not None else _null()
    with torch.no_grad(), ctx:
        for b in batches:
            logits = model(b.input_ids.to(device))
            labels = b.labels.to(device)
            loss, scored, lg, tgt = _losses(logits, labels)
            pred = lg.argmax(-1)
            right = (pred == tgt) | ~scored
            tot_loss += float(loss)
            correct += float(((pred == tgt) & scored).sum())
            scored_n += float(scored.sum())
            seq_ok += float(right.all(1).sum())
            seqs += labels.shape[0]
    model.train()
    n = len(batches)
    return {"loss": tot_loss / n, "acc": correct / max(1.0, scored_n), "seq_acc": seq_ok / max(1.0, seqs)}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _manager_metrics(mgr) -> dict:
    if mgr is None:
        return {}
    m = mgr.metrics()
    keep = ("trace_coverage", "trace_stability", "trace_count", "bytes_used", "bytes_quota", "motif_count",
            "motif_mean_utility", "motif_mean_entropy", "flops_saved_per_token", "phase", "routing_tokens")
    out = {k: m[k] for k in keep if k in m}
    out["phase"] = str(mgr.phase.label)
    return out


def _steps_to(curve, target):
    for point in curve:
        if point["acc"] >= target:
            return point["step"]
    return None


def run_one(cfg: RunConfig, progress=None) -> str:
    """Train and measure one run; write its JSON; return the path. `progress(n)` is called with
    the number of steps done since the last call (a tqdm bar's update)."""
    if cfg.arm not in ARMS:
        raise ValueError(f"unknown arm {cfg.arm!r}; known: {', '.join(ARMS)}")
    device = torch.device(cfg.device)
    tspec, mspec = cfg.task_spec(), cfg.model_spec()
    if cfg.arm in MOE_ARMS and mspec.kind != "moe":
        raise ValueError(f"arm {cfg.arm!r} needs the MoE model (--model moe)")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(mspec, seed=cfg.seed, device=device)
    g_train = torch.Generator().manual_seed(1_000_003 * cfg.seed + 17)
    g_eval = torch.Generator().manual_seed(999_999_937 + cfg.seed)
    eval_batches = [make_batch(tspec, g_eval) for _ in range(cfg.eval_batches)]
    edge_set = useful_edge_set(tspec, seed=424_242 + cfg.seed)
    edge_keys = set(edge_set)
    chance = chance_share(edge_set, cfg.seq_len)

    experts = mspec.num_experts if mspec.kind == "moe" else None
    mcfg, ref_start = arm_config(cfg.arm, cfg.steps, num_layers=mspec.layers, seq_len=cfg.seq_len,
                                 overrides=cfg.overrides, num_experts=experts)
    distill = distill_settings(cfg.arm, cfg.steps, cfg.overrides)
    mgr = handle = None
    ref_info = None
    if cfg.arm in REFERENCE_ARMS:
        bias, entries = reference_bias(cfg.arm, edge_set, num_heads=mspec.heads, seq_len=cfg.seq_len,
                                       quota=mcfg.quota_per_head, seed=cfg.seed, device=device)
        mgr = ReferenceBiasMemtrace(mspec.layers, mspec.heads, bias=bias, start=ref_start,
                                    num_experts=experts, config=mcfg, device=device)
        ref_info = {"entries_per_head": len(entries), "start_step": ref_start, "alpha": mgr.fixed_alpha,
                    "useful_share": sum(1 for q, k, _ in entries if (q, k) in edge_keys) / max(1, len(entries))}
    elif mcfg is not None:
        mgr = ExperimentMemtrace(mspec.layers, mspec.heads, num_experts=experts,
                                 config=mcfg, device=device)
    if mgr is not None:
        from ..integrations import hf
        handle = hf.attach(model.lm, mgr)
        if distill is not None:       # held motifs distil, then run distilled (arms.py)
            handle.routers.set_mode("distill", **distill)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    model_flops = forward_flops_per_token(mspec, cfg.seq_len)

    curve = []
    interval = cfg.interval()
    train_time = 0.0
    window_times = []
    losses = []
    grad_norms = []        # mean pre-clip gradient norm of each eval window: a spike shrinks every step's update
    loss_sum = norm_sum = None

    def record(step):
        point = {"step": step, **_evaluate(model, mgr, eval_batches, device), **_manager_metrics(mgr)}
        if mgr is not None and cfg.arm in ("traces", "both"):
            point.update(_useful_share(mgr, edge_keys, cfg.seq_len))
            point["useful_chance"] = chance
        if distill is not None:
            moe = handle.routers.metrics()
            point.update({k: moe[k] for k in ("motifs_distilling", "motifs_distilled", "distill_loss")})
        point["train_loss"] = losses[-1] if losses else None
        point["grad_norm"] = grad_norms[-1] if grad_norms else None
        curve.append(point)

    record(0)
    _sync(device)
    t0 = time.perf_counter()
    done_since = 0
    try:
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg.steps, cfg.lr)
            batch = make_batch(tspec, g_train)
            ids, labels = batch.input_ids.to(device), batch.labels.to(device)
            logits = model(ids)
            loss, _, _, _ = _losses(logits, labels)
            total = loss if mgr is None else loss + mgr.aux_loss().to(loss.device)
            total.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).detach().float()
            opt.step()
            if mgr is not None:
                mgr.step(token_loss=_token_loss(logits, ids) if mgr.num_experts else None)
            if distill is not None:    # D's own optimizer, on the pairs this step's forward collected
                handle.routers.distill_step()
            opt.zero_grad(set_to_none=True)
            loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
            norm_sum = norm if norm_sum is None else norm_sum + norm
            done_since += 1
            if (step + 1) % interval == 0 or step + 1 == cfg.steps:
                _sync(device)
                dt = time.perf_counter() - t0
                train_time += dt
                window_times.append((done_since, dt))
                if progress is not None:
                    progress(done_since)
                losses.append(float(loss_sum) / done_since)
                grad_norms.append(float(norm_sum) / done_since)
                loss_sum = norm_sum = None
                done_since = 0
                record(step + 1)
                _sync(device)
                t0 = time.perf_counter()
    finally:
        # read before detach: the hf handle drops its `routers` when it detaches
        moe_metrics = handle.routers.metrics() if handle is not None and handle.routers is not None else None
        if handle is not None:
            handle.detach()

    final = curve[-1]
    steady = window_times[1:] or window_times
    metrics = _manager_metrics(mgr)
    saved = float(metrics.get("flops_saved_per_token", 0.0) or 0.0)
    summary = {
        "final_loss": final["loss"], "final_acc": final["acc"], "final_seq_acc": final["seq_acc"],
        "best_acc": max(p["acc"] for p in curve),
        "steps_to_90": _steps_to(curve, 0.90), "steps_to_99": _steps_to(curve, 0.99),
        "wall_time_per_step": train_time / cfg.steps,
        "wall_time_per_step_steady": sum(t for _, t in steady) / max(1, sum(n for n, _ in steady)),
        "model_flops_per_token": model_flops, "flops_saved_per_token": saved,
        "flops_per_token": model_flops - saved, "flops_saving_share": saved / model_flops if model_flops else 0.0,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "trace_coverage": final.get("trace_coverage"), "trace_stability": final.get("trace_stability"),
        "trace_count": final.get("trace_count"), "motif_count": final.get("motif_count"),
        "motif_mean_utility": final.get("motif_mean_utility"), "motif_mean_entropy": final.get("motif_mean_entropy"),
        "useful_share": final.get("useful_share"), "useful_chance": chance if cfg.arm in ("traces", "both") else None,
        "motifs_distilled": final.get("motifs_distilled"),
    }
    result = {
        "schema": SCHEMA, "name": run_name(cfg), "task": cfg.task, "arm": cfg.arm, "seed": cfg.seed,
        "steps": cfg.steps, "pilot": cfg.pilot, "sweep": cfg.sweep, "tag": cfg.tag, "plan": cfg.plan,
        "requested": cfg.requested,
        "config": {"run": {k: v for k, v in asdict(cfg).items() if k not in ("out",)},
                   "task": tspec.to_dict(), "model": mspec.to_dict(),
                   "memtrace": None if mcfg is None else mcfg.to_dict(), "reference_bias": ref_info,
                   "distill": distill,
                   "eval_interval": interval, "useful_edges": len(edge_set)},
        "curves": curve, "summary": summary, "moe": moe_metrics, "environment": environment(str(device)),
    }
    if cfg.pilot:
        result["note"] = "PILOT: CPU, tiny, not the table"
    path = run_path(cfg)
    write_json_atomic(result, path)
    return path


def _job(cfg: RunConfig) -> str:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return run_one(cfg)


def is_complete(cfg: RunConfig) -> bool:
    """Whether a finished run of `cfg` is on disk: its JSON exists and was written with the same run
    settings (device, output folder and the invocation's request aside)."""
    try:
        with open(run_path(cfg)) as f:
            stored = json.load(f)["config"]["run"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    skip = ("out", "device", "requested", "lr_source")
    want = json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k not in skip}, default=_jsonable))
    return all(stored.get(k) == v for k, v in want.items())


def run_many(configs: list, parallel: int = 1, show_progress: bool = True, deadline: float | None = None,
             skip_complete: bool = False) -> list:
    """Run every config; `parallel` > 1: that many spawned processes side by side (several small
    runs share one GPU). `deadline` (seconds from now): start no run after it (runs under way finish,
    so a call ends with complete files only); `skip_complete`: leave out configs whose finished JSON
    is already on disk (a resumed plan). Returns the paths written; a failing run raises after the
    others finish."""
    from tqdm import tqdm
    if skip_complete:
        complete = [is_complete(c) for c in configs]
        if any(complete):
            print(f"experiment: {sum(complete)} run(s) already complete, skipped", file=sys.stderr)
        configs = [c for c, done in zip(configs, complete) if not done]
    stop_at = None if deadline is None else time.monotonic() + deadline

    def expired():
        return stop_at is not None and time.monotonic() >= stop_at

    paths, errors, not_started = [], [], []
    if parallel <= 1:
        total = sum(c.steps for c in configs)
        with tqdm(total=total, desc="experiment", unit="step", disable=not show_progress) as bar:
            for cfg in configs:
                if expired():
                    not_started.append(cfg)
                    continue
                bar.set_postfix_str(f"{cfg.task}/{cfg.arm}/s{cfg.seed}")
                try:
                    paths.append(run_one(cfg, progress=bar.update))
                except Exception as exc:   # keep going: the others are independent
                    errors.append((cfg, exc))
    else:
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        queue = list(configs)
        with ctx.Pool(parallel) as pool, tqdm(total=len(configs), desc="experiment", unit="run",
                                               disable=not show_progress) as bar:
            running = []
            while queue or running:
                while queue and len(running) < parallel and not expired():
                    cfg = queue.pop(0)
                    running.append((cfg, pool.apply_async(_job, (cfg,))))
                if expired():
                    not_started += queue
                    queue = []
                finished = [(c, r) for c, r in running if r.ready()]
                if not finished:
                    time.sleep(0.2)
                    continue
                for cfg, res in finished:
                    running.remove((cfg, res))
                    try:
                        paths.append(res.get())
                    except Exception as exc:
                        errors.append((cfg, exc))
                    bar.update(1)
    if not_started:
        print(f"experiment: deadline reached, {len(not_started)} run(s) not started: "
              + ", ".join(run_name(c) for c in not_started[:8]) + (" ..." if len(not_started) > 8 else ""),
              file=sys.stderr)
    if errors:
        lines = [f"{c.task}/{c.arm}/s{c.seed}: {type(e).__name__}: {e}" for c, e in errors]
        raise RuntimeError(f"{len(errors)} run(s) failed:\n  " + "\n  ".join(lines))
    return paths


def sweep_path(cfg: RunConfig) -> str:
    ms = cfg.model_spec()
    return os.path.join(cfg.out, f"sweep__{cfg.task}__{ms.kind}-{ms.position}-T{cfg.seq_len}.json")


def lr_sweep(base: RunConfig, grid=LR_GRID, parallel: int = 1, deadline: float | None = None,
             skip_complete: bool = False):
    """Train the baseline arm (first seed) at each learning rate of `grid` with the full step
    budget; pick the best final held-out accuracy (ties: the lower loss); write the sweep file.
    Returns the chosen lr, or None when the deadline left part of the grid unrun."""
    configs = [replace(base, arm="baseline", lr=float(lr), lr_source="sweep", sweep=True,
                       tag=f"lr{lr:g}") for lr in grid]
    run_many(configs, parallel=parallel, deadline=deadline, skip_complete=skip_complete)
    paths = [run_path(c) for c in configs if is_complete(c)]
    if len(paths) < len(configs):
        return None
    rows = []
    for p in paths:
        with open(p) as f:
            r = json.load(f)
        rows.append({"lr": r["config"]["run"]["lr"], "final_acc": r["summary"]["final_acc"],
                     "final_loss": r["summary"]["final_loss"], "file": os.path.basename(p)})
    best = max(rows, key=lambda r: (r["final_acc"], -r["final_loss"]))
    write_json_atomic({"task": base.task, "model": base.model_spec().to_dict(), "seq_len": base.seq_len,
                       "steps": base.steps, "seed": base.seed, "grid": list(grid), "results": rows,
                       "chosen_lr": best["lr"], "pilot": base.pilot,
                       "environment": environment(base.device)}, sweep_path(base))
    return best["lr"]


def resolve_lr(base: RunConfig) -> tuple:
    """(lr, source): an existing sweep file for this task and model, else the default."""
    path = sweep_path(base)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                return float(json.load(f)["chosen_lr"]), f"sweep file {os.path.basename(path)}"
        except (OSError, ValueError, KeyError):
            pass
    return DEFAULT_LR, "default (no sweep run: pass --lr-sweep or --lr)"


def main_device_note() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `memtrace experiment`")
