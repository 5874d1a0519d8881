"""Training with memory (issue 24, "Speed and memory"): the full training step of a Hugging Face
model with memtrace attached, against the same model with attn_implementation="sdpa", in one process.

Models (transformers, random weights, bf16 on CUDA; `--tiny` shrinks everything and runs float32,
which is what the CPU smoke test does):
  llama    LlamaConfig: hidden 2048, 16 query / 8 kv heads (head dim 128), 8 layers,
           intermediate 5632, vocab 32000; B 2, T 4096
  mixtral  MixtralConfig: the same attention and widths, 8 experts top-2, 4 layers
The step: loss = model(input_ids, labels).loss (+ mgr.aux_loss() where memtrace is attached),
backward, AdamW step, (mgr.step()), zero_grad; the same fixed random batch every step.

Rows (per model):
  a  sdpa          attn_implementation="sdpa", no memtrace: the baseline
  b  bias          memtrace attached (memtrace.integrations.hf.attach), the bias on with a full
                   memory (2048 traces per head at random causal positions), no capture
                   (target <= 1.05x a)
  c  capture       the capture step: bias + capture + mgr.step()'s memory update (target <= 1.35x a)
  d  amortised     (99 * b + c) / 100: one capture every update_interval = 100 steps (target <= 1.06x
                   a); its peak is max(b, c)
  e  seeds_eager   the seeds' capture step as a peer: hand-written eager attention with a dense
                   [B, H, T, T] additive bias (alpha * M + the causal mask, rebuilt from the memory
                   every step), softmax retained (retain_grad), after backward S = mean_b A * |dA|,
                   top-k (the quota) per head, the memory updated from those edges
                   (TraceMemory.update_edges; the seeds' own Python update would be slower): ratio only
  f  routing       mixtral only: row b with routing recorded (mgr.record_routing from the MoE router
                   hooks) and mgr.step()'s trie update; share = (f - b) / f, target <= 2%.
                   `routing_direct_share` is the same cost measured directly (record_routing calls and
                   mgr.step(), each bracketed by synchronisations, over a few extra steps)
Peak memory: torch.cuda.max_memory_allocated over one step after the timed ones (the allocator's peak
reset first): `peak_mib` is the whole peak (weights and optimizer state included), `step_peak_mib`
what the step added above what was allocated before it; target for b, c (and d): peak <= 1.05x a's.

How the manager is put into each plan: a MemtraceConfig with phase_starts (0, 0, None, None) (trace
accumulation and trace-biased training from step 0; routing rows add crystallization discovery at 0):
no capture = warmup_steps 10**9 (the first capture never comes); capture every step = warmup_steps 0,
update_interval 1. The memory is filled once through TraceMemory.update_edges, and each row loads
that state with its own config through Memtrace.load_state_dict (which also recomputes alpha and
resets the step count to 0).

Timing: each row runs --warmup steps, then --steps steps, each one timed with CUDA events (the
device synchronised after each step) or time.perf_counter on the CPU; the median is reported.
Out of memory in a row: the row records "OOM" and the run goes on. The JSON is rewritten after
every row (a run cut short keeps what was measured).

    python benchmarks/bench_training.py [--only llama|mixtral] [--steps N] [--warmup N] [--tiny]
                                        [--json PATH]
"""
from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import statistics
import sys
import time
import traceback

import _harness
import torch

import memtrace as mt
from memtrace.integrations import hf

FULL = dict(hidden=2048, heads=16, kv_heads=8, intermediate=5632, vocab=32000, B=2, T=4096, traces=2048,
            llama_layers=8, mixtral_layers=4, experts=8, top_k=2)
TINY = dict(hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=128, B=2, T=64, traces=32,
            llama_layers=2, mixtral_layers=2, experts=8, top_k=2)
UPDATE_INTERVAL = 100          # row d: one capture step every UPDATE_INTERVAL steps
NEVER = 10**9                  # warmup_steps that no benchmark reaches: no capture
TARGETS = {"b": 1.05, "c": 1.35, "d": 1.06}
PEAK_TARGET = 1.05
ROUTING_SHARE_TARGET = 0.02
SEEDS_ATTN = "memtrace_bench_seeds"    # the seeds' eager attention, registered in transformers' AttentionInterface
ROW_NAMES = {"a": "sdpa", "b": "bias", "c": "capture", "d": "amortised", "e": "seeds_eager", "f": "routing"}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _is_oom(exc) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ---- models ---------------------------------------------------------------------------------------

def build_model(kind, size, device, dtype):
    """A random LlamaForCausalLM / MixtralForCausalLM (sdpa attention), in `dtype` on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
    common = dict(hidden_size=size["hidden"], num_attention_heads=size["heads"],
                  num_key_value_heads=size["kv_heads"], intermediate_size=size["intermediate"],
                  vocab_size=size["vocab"], max_position_embeddings=max(size["T"], 128), attention_dropout=0.0,
                  attn_implementation="sdpa")
    if kind == "llama":
        cfg, cls = LlamaConfig(num_hidden_layers=size["llama_layers"], **common), LlamaForCausalLM
    else:
        cfg = MixtralConfig(num_hidden_layers=size["mixtral_layers"], num_local_experts=size["experts"],
                            num_experts_per_tok=size["top_k"], sliding_window=None, **common)
        cls = MixtralForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(cfg)
    model.set_attn_implementation("sdpa")
    return model.to(dtype).train()


# ---- the manager: filling its memory, choosing its plan -------------------------------------------

def base_config(size, **plan) -> mt.MemtraceConfig:
    """The manager's config: quota = traces per head (the memory is full), max_seq_len = T."""
    return mt.MemtraceConfig(quota_per_head=size["traces"], max_seq_len=size["T"], **plan)


PLANS = {   # row -> the schedule fields that give that row's plan at every step
    "b": dict(phase_starts=(0, 0, None, None), warmup_steps=NEVER, update_interval=UPDATE_INTERVAL),
    "c": dict(phase_starts=(0, 0, None, None), warmup_steps=0, update_interval=1),
    "f": dict(phase_starts=(0, 0, 0, None), warmup_steps=NEVER, update_interval=UPDATE_INTERVAL),
}


def random_causal_edges(num_heads, seq_len, per_head, device, generator):
    """(head, q_idx, k_idx) int64 [num_heads * per_head]: per head, per_head distinct (i, j) with
    j <= i drawn uniformly without replacement."""
    n_pairs = seq_len * (seq_len + 1) // 2
    keys = torch.rand(num_heads, n_pairs, device=device, generator=generator).topk(per_head, dim=1).indices
    n = keys.reshape(-1)
    i = torch.floor((torch.sqrt(8.0 * n.double() + 1.0) - 1.0) / 2.0).long()
    i = torch.where(i * (i + 1) // 2 > n, i - 1, i)            # float rounding, either way
    i = torch.where((i + 1) * (i + 2) // 2 <= n, i + 1, i)
    head = torch.arange(num_heads, device=device).repeat_interleave(per_head)
    return head, i, n - i * (i + 1) // 2


def fill_memory(mgr, size, device):
    """Fill every (layer, head) of the manager's memory with `traces` traces at random causal
    positions (one TraceMemory.update_edges over all layers); returns the state to load per row."""
    g = torch.Generator(device=device).manual_seed(1)
    L, H, Q = mgr.num_layers, mgr.num_heads, size["traces"]
    edges = [random_causal_edges(H, size["T"], Q, device, g) for _ in range(L)]
    head, q_idx, k_idx = (torch.stack([e[n] for e in edges]) for n in range(3))
    salience = 1.0 + torch.rand(L, H * Q, device=device, generator=g)       # above any threshold, varied
    mgr.memory().update_edges(list(range(L)), head, q_idx, k_idx, salience, torch.ones_like(salience))
    stored = mgr.memory().num_traces()
    if stored != L * H * Q:
        raise RuntimeError(f"the memory holds {stored} traces after filling, expected {L * H * Q}")
    return mgr.state_dict()


def use_plan(mgr, filled_state, size, row) -> None:
    """Load the filled memory with the config of `row` (step count 0, alpha recomputed)."""
    mgr.load_state_dict({**filled_state, "config": base_config(size, **PLANS[row]).to_dict(), "step": 0})


# ---- the seeds' way: eager attention with a dense bias, retain_grad capture ----------------------

class SeedsCapture:
    """Row e's state: the manager whose memory gives the dense bias and takes the update, and the
    retained attention probabilities of the step per layer."""

    def __init__(self, mgr, batch, dtype):
        self.mgr, self.batch, self.dtype = mgr, batch, dtype
        self.probs = {}

    def dense_bias(self, layer, T, device):
        """[B, H, T, T] in the model's dtype: alpha * M where a trace is stored, -inf above the diagonal."""
        mem = self.mgr.memory()
        dense = mem.bias(layer).to_dense()[:, :T, :T] * self.mgr.alpha(layer)
        causal = torch.ones(T, T, dtype=torch.bool, device=device).triu(1)
        dense = dense.masked_fill(causal, float("-inf")).to(self.dtype)
        return dense.unsqueeze(0).expand(self.batch, -1, -1, -1).contiguous()

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """The AttentionInterface entry: softmax(q k^T * scale + bias) v, the probabilities retained."""
        layer = module.layer_idx
        B, H, T, D = query.shape
        rep = H // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
        scale = scaling if scaling is not None else 1.0 / math.sqrt(D)
        logits = torch.matmul(query, key.transpose(-1, -2)) * scale + self.dense_bias(layer, T, query.device)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
        if probs.requires_grad:
            probs.retain_grad()
            self.probs[layer] = probs
        out = torch.matmul(probs, value)
        return out.transpose(1, 2).contiguous(), None

    @torch.no_grad()
    def update(self) -> None:
        """After backward: S = mean_b A * |dA| per layer, top-k (the quota) per head, one batched update."""
        mem = self.mgr.memory()
        layers = sorted(self.probs)
        heads, qs, ks, ss, aa = [], [], [], [], []
        for layer in layers:
            A = self.probs.pop(layer)
            A, dA = A.detach(), A.grad
            S = (A.float() * dA.float().abs()).mean(0)                  # [H, T, T]
            H, T = S.shape[0], S.shape[1]
            vals, idx = torch.topk(S.reshape(H, -1), mem.quota, dim=1)
            attn = A.float().mean(0).reshape(H, -1).gather(1, idx)
            heads.append(torch.arange(H, device=S.device).repeat_interleave(mem.quota))
            qs.append((idx // T).reshape(-1))
            ks.append((idx % T).reshape(-1))
            ss.append(vals.reshape(-1))
            aa.append(attn.reshape(-1))
            del A, dA, S
        if layers:
            mem.update_edges(layers, *(torch.stack(x) for x in (heads, qs, ks, ss, aa)), validate=False)


def _register_seeds(seeds) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(SEEDS_ATTN, seeds.attention)
    AttentionMaskInterface.register(SEEDS_ATTN, lambda *args, **kwargs: None)   # the bias carries the mask


# ---- timing ---------------------------------------------------------------------------------------

def time_steps(step, device, warmup, steps):
    """Median ms of `steps` calls of step() after `warmup` untimed ones (each timed call
    synchronised: CUDA events on the GPU, perf_counter on the CPU); also every time."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def profile_steps(step, device, path, steps=2):
    """torch.profiler over `steps` calls of step(): the top operators and kernels by device time
    (self and total) and by host time, written to `path` (where a row's time goes)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    events = prof.key_averages()
    dev = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(f"{steps} steps\n")
        f.write(events.table(sort_by=dev, row_limit=40, max_name_column_width=90) + "\n")
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=90) + "\n")


def peak_of(step, device):
    """(peak MiB of the whole process's allocations during one step, MiB the step added) or (None, None)."""
    if device.type != "cuda":
        return None, None
    with _harness.PeakMemory() as pm:
        step()
    return pm.mib + pm.base / 2**20, pm.mib


def make_step(model, opt, ids, mgr=None, after_backward=None):
    def step():
        loss = model(input_ids=ids, labels=ids).loss
        if mgr is not None:
            loss = loss + mgr.aux_loss()
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        if mgr is not None:
            mgr.step()
        opt.zero_grad(set_to_none=True)
    return step


class RoutingTimer:
    """Row f's direct measurement: the manager's record_routing (called by the MoE router hooks)
    and step(), each bracketed by synchronisations, summed per step."""

    def __init__(self, mgr, device):
        self.mgr, self.device, self.ms = mgr, device, 0.0

    def _timed(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            _sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.device)
                self.ms += (time.perf_counter() - t0) * 1e3
        return wrapper

    def __enter__(self):
        self.mgr.record_routing = self._timed(self.mgr.record_routing)     # the hooks look it up per call
        self.mgr.step = self._timed(self.mgr.step)
        return self

    def __exit__(self, *exc):
        del self.mgr.record_routing, self.mgr.step
        return False


# ---- one model ------------------------------------------------------------------------------------

def run_model(kind, size, device, dtype, args, rows, save):
    model = build_model(kind, size, device, dtype)
    T, B = size["T"], size["B"]
    g = torch.Generator(device=device).manual_seed(2)
    ids = torch.randint(0, size["vocab"], (B, T), device=device, generator=g)
    num_experts = size["experts"] if kind == "mixtral" else None
    mgr = mt.Memtrace(model.config.num_hidden_layers, size["heads"], num_experts=num_experts,
                      config=base_config(size, **PLANS["b"]), device=device)
    filled = fill_memory(mgr, size, device)
    seeds = SeedsCapture(mgr, B, dtype)
    _register_seeds(seeds)
    print(f"\n== {kind}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, B{B} T{T} "
          f"{str(dtype).replace('torch.', '')}, {size['traces']} traces per head, {device}", flush=True)
    results = {}

    def run_row(row, setup, teardown):
        entry = {"model": kind, "row": row, "name": ROW_NAMES[row]}
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        ctx = None
        try:
            step, ctx = setup(opt)
            entry["ms"], entry["times_ms"] = time_steps(step, device, args.warmup, args.steps)
            entry["peak_mib"], entry["step_peak_mib"] = peak_of(step, device)
            if args.profile and row in "abc":
                profile_steps(step, device, os.path.join(args.profile, f"profile_{kind}_{row}.txt"))
            if row == "f":
                with RoutingTimer(mgr, device) as timer:
                    n = max(1, min(args.steps, 5))
                    for _ in range(n):
                        step()
                entry["routing_direct_ms"] = timer.ms / n
        except Exception as exc:  # an OOM (recorded, the run goes on) or a failure (recorded too)
            if not _is_oom(exc):
                traceback.print_exc()
            entry["ms"] = "OOM" if _is_oom(exc) else None
            entry["error"] = "OOM" if _is_oom(exc) else f"{type(exc).__name__}: {exc}"[:600]
        finally:
            try:
                teardown(ctx)
            finally:
                opt.zero_grad(set_to_none=True)
                del opt
                seeds.probs.clear()
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        results[row] = entry
        rows.append(entry)
        add_ratios(results)          # now, so that a run cut short keeps the ratios of its finished rows
        _report_row(entry)
        save()

    def memtrace_row(row):
        def setup(opt):
            use_plan(mgr, filled, size, row)
            handle = hf.attach(model, mgr)
            return make_step(model, opt, ids, mgr), handle
        return setup, lambda handle: handle is not None and handle.detach()

    def seeds_setup(opt):
        mgr.load_state_dict(filled)     # the memory the dense bias is built from (and the update goes into)
        model.set_attn_implementation(SEEDS_ATTN)
        return make_step(model, opt, ids, after_backward=seeds.update), None

    run_row("a", lambda opt: (make_step(model, opt, ids), None), lambda ctx: None)
    run_row("b", *memtrace_row("b"))
    if kind == "mixtral":
        run_row("f", *memtrace_row("f"))
    run_row("c", *memtrace_row("c"))
    run_row("e", seeds_setup, lambda ctx: model.set_attn_implementation("sdpa"))
    rows.append(amortised(kind, results))
    _report_row(rows[-1])
    add_ratios(results)
    save()


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def amortised(kind, results) -> dict:
    """Row d: (99 b + c) / 100 (one capture per UPDATE_INTERVAL steps); peak max(b, c)."""
    b, c = results.get("b", {}), results.get("c", {})
    entry = {"model": kind, "row": "d", "name": ROW_NAMES["d"], "update_interval": UPDATE_INTERVAL}
    if _num(b.get("ms")) and _num(c.get("ms")):
        entry["ms"] = ((UPDATE_INTERVAL - 1) * b["ms"] + c["ms"]) / UPDATE_INTERVAL
    else:
        entry["ms"] = "OOM" if "OOM" in (b.get("ms"), c.get("ms")) else None
    for key in ("peak_mib", "step_peak_mib"):
        values = [r.get(key) for r in (b, c)]
        entry[key] = max(values) if all(_num(v) for v in values) else None
    results["d"] = entry
    return entry


def add_ratios(results) -> None:
    """ratio (ms / a's ms), peak_ratio, the targets and whether they are met, and row f's shares."""
    a = results.get("a", {})
    for row, entry in results.items():
        if _num(entry.get("ms")) and _num(a.get("ms")):
            entry["ratio"] = entry["ms"] / a["ms"]
        if _num(entry.get("peak_mib")) and _num(a.get("peak_mib")):
            entry["peak_ratio"] = entry["peak_mib"] / a["peak_mib"]
            entry["step_peak_ratio"] = entry["step_peak_mib"] / a["step_peak_mib"] if a["step_peak_mib"] else None
        if row in TARGETS:
            entry["target"] = TARGETS[row]
            entry["met"] = entry["ratio"] <= TARGETS[row] if "ratio" in entry else None
            entry["peak_target"] = PEAK_TARGET
            entry["peak_met"] = entry["peak_ratio"] <= PEAK_TARGET if "peak_ratio" in entry else None
    f, b = results.get("f"), results.get("b", {})
    if f is not None:
        f["target"] = ROUTING_SHARE_TARGET
        f["met"] = None
        if _num(f.get("ms")) and _num(b.get("ms")):
            f["routing_share"] = (f["ms"] - b["ms"]) / f["ms"]
            f["met"] = f["routing_share"] <= ROUTING_SHARE_TARGET
        if _num(f.get("ms")) and _num(f.get("routing_direct_ms")):
            f["routing_direct_share"] = f["routing_direct_ms"] / f["ms"]


# ---- output ---------------------------------------------------------------------------------------

def _fmt(x, spec):
    return format(x, spec) if _num(x) else str(x if x is not None else "-")


def _report_row(entry) -> None:
    print(f"  {entry['row']} {entry['name']:12s} {_fmt(entry.get('ms'), '10.2f')} ms   peak "
          f"{_fmt(entry.get('peak_mib'), '9.1f')} MiB (step {_fmt(entry.get('step_peak_mib'), '8.1f')})"
          + (f"   {entry['error']}" if entry.get("error") and entry["error"] != "OOM" else ""), flush=True)


def print_table(rows) -> None:
    print(f"\n{'model':8s} {'row':3s} {'name':12s} {'ms':>10s} {'peak MiB':>10s} {'ratio':>7s} {'peak x':>7s} "
          f"{'target':>7s} {'met':>5s} {'peak ok':>7s}  notes")
    for r in rows:
        note = ""
        if r["row"] == "f":
            note = (f"routing share {_fmt(r.get('routing_share'), '.2%')} (direct "
                    f"{_fmt(r.get('routing_direct_share'), '.2%')}), target <= {ROUTING_SHARE_TARGET:.0%}")
        elif r.get("error") and r["error"] != "OOM":
            note = r["error"][:80]
        print(f"{r['model']:8s} {r['row']:3s} {r['name']:12s} {_fmt(r.get('ms'), '10.2f'):>10s} "
              f"{_fmt(r.get('peak_mib'), '10.1f'):>10s} {_fmt(r.get('ratio'), '7.3f'):>7s} "
              f"{_fmt(r.get('peak_ratio'), '7.3f'):>7s} {_fmt(r.get('target'), '7.2f'):>7s} "
              f"{_fmt(r.get('met'), ''):>5s} {_fmt(r.get('peak_met'), ''):>7s}  {note}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write the rows and the environment here")
    ap.add_argument("--only", choices=("llama", "mixtral"), default=None)
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="after timing rows a, b and c, profile 2 more steps of each (torch.profiler) and write "
                         "DIR/profile_<model>_<row>.txt: the operators and kernels by device time")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row (default 10)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per row first (default 3; --tiny 1)")
    ap.add_argument("--tiny", action="store_true", help="tiny models (the CPU smoke test; float32)")
    ap.add_argument("--quick", action="store_true", help="the same as --tiny (what `memtrace bench --quick` passes)")
    args = ap.parse_args(argv)
    tiny = args.tiny or args.quick
    if args.warmup is None:
        args.warmup = 1 if tiny else 3
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = TINY if tiny else FULL
    rows = []
    doc = {"benchmark": "bench_training", **_harness.header(), "tiny": tiny, "dtype": str(dtype).replace("torch.", ""),
           "size": size, "steps": args.steps, "warmup": args.warmup, "update_interval": UPDATE_INTERVAL,
           "baseline": "row a: the same model with attn_implementation='sdpa', no memtrace",
           "targets": {"b_ratio": TARGETS["b"], "c_ratio": TARGETS["c"], "d_ratio": TARGETS["d"],
                       "peak_ratio": PEAK_TARGET, "routing_share": ROUTING_SHARE_TARGET},
           "rows": rows}

    def save():
        if args.json:
            _harness.write_json(args.json, doc)

    for kind in ("llama", "mixtral"):
        if args.only in (None, kind):
            run_model(kind, size, device, dtype, args, rows, save)
            gc.collect()             # the model, its manager and optimizer go before the next model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print_table(rows)
    save()
    return 0 if all(_num(r.get("ms")) or r.get("ms") == "OOM" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
