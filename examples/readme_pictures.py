"""The README's pictures: one PNG of each kind memtrace.viz draws, from real training state.

    python examples/readme_pictures.py [--out docs/images] [--runs benchmarks/results/experiments]

On the CPU (about 40 s, one thread), seeded; the same seed gives the same PNGs on the same machine:

1. A tiny random Mixtral (4 layers, 4 heads, 4 experts, top-1; no download) learns the fixed-layout
   copy task of `memtrace.experiment.tasks` ([x_1..x_15] SEP [x_1..x_15], the same positions in every
   example) with memtrace attached (`mt.Memtrace` + `memtrace.integrations.hf.attach`). The
   manager's curriculum is the experiment's compressed one (`memtrace.experiment.arms.arm_config`,
   arm "both": trace captures from 10% of the steps, the trace bias from 20%, crystallization
   discovery from 30%, held motifs executed from 60%), so traces accumulate and motifs
   crystallize within the budget. Every `mgr.step()` dict is kept: the metrics log.
2. After training, the model routes held-out batches of five tasks with a second manager attached
   that only records routing (no trace bias, no motif executed): one trie per task, for the motif
   activations (how often the router, on its own, sends a token along each held motif's chain).
3. Experiment curves: the run JSON files of `memtrace experiment` under --runs (the group with the
   most runs, each arm's mean over its seeds); if none holds curves, a small CPU pilot of two arms
   (baseline, traces) runs here and the figure says so in its title.
4. Six PNGs into --out: trace_heatmap, memory_history, routing_flow, motif_graph,
   motif_activations, experiment_curves.

`draw(...)` (step 4 alone) is what tests/viz/test_readme_pictures.py runs on tiny state.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

import memtrace as mt
from memtrace import viz

LAYERS, HEADS, D_MODEL, FFN, EXPERTS = 4, 4, 64, 128, 4
VOCAB, SEQ, BATCH, LR = 32, 32, 16, 3e-3
TASK = "fixed_copy"
PROBE_TASKS = ("fixed_copy", "copy", "fixed_copy_gap", "induction", "recall")
# The experiment's schedule, with a quota and motif criteria that fit a 4-layer, 4-expert toy: 32
# traces per head keep the strongest edges only. The load-balance loss is on at the manager's
# default weight (the experiment turns it off so that its arms train one objective; without it this
# toy's routers collapse onto one expert per layer). Balanced routing over 4 experts has a path
# entropy near ln(4^3) = 4.16 nats for a 3-layer chain, so the default max_entropy (1.0) would never
# let a motif through: 4.0 keeps the chains that are at least a little more certain than chance.
OVERRIDES = {"quota_per_head": 32, "max_entropy": 4.0, "min_frequency": 200, "min_utility": 0.2,
             "balance_loss_weight": 0.01}
DPI = 80
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("trace_heatmap", "memory_history", "routing_flow", "motif_graph", "motif_activations", "experiment_curves")


# ---- 1. training ---------------------------------------------------------------------------------

def tiny_mixtral(seed: int):
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=D_MODEL, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        num_key_value_heads=HEADS, intermediate_size=FFN, vocab_size=VOCAB,
                        num_local_experts=EXPERTS, num_experts_per_tok=1, max_position_embeddings=SEQ,
                        pad_token_id=None, bos_token_id=None, eos_token_id=None)
    return MixtralForCausalLM(cfg)


def token_loss(logits, ids):
    """Per-token reward signal for the routing trie: each position's next-token loss (the last
    position repeats its row's mean), as the experiment's runner gives it."""
    with torch.no_grad():
        per = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        per = per.view(ids.shape[0], -1)
        return torch.cat([per, per.mean(1, keepdim=True)], dim=1).flatten()


def train(steps: int, seed: int, say=print) -> dict:
    """Train the tiny Mixtral with memtrace on the copy task; returns model, manager, metrics log."""
    from memtrace.experiment.arms import arm_config
    from memtrace.experiment.tasks import TaskSpec, make_batch
    from memtrace.integrations import hf
    model = tiny_mixtral(seed)
    cfg, _ = arm_config("both", steps, num_layers=LAYERS, seq_len=SEQ, overrides=OVERRIDES)
    mgr = mt.Memtrace(LAYERS, HEADS, num_experts=EXPERTS, config=cfg)
    handle = hf.attach(model, mgr)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    spec = TaskSpec(TASK, vocab_size=VOCAB, seq_len=SEQ, batch_size=BATCH)
    g = torch.Generator().manual_seed(seed)
    log = []
    model.train()
    try:
        for step in range(steps):
            batch = make_batch(spec, g)
            out = model(input_ids=batch.input_ids, labels=batch.labels)
            (out.loss + mgr.aux_loss()).backward()
            opt.step()
            metrics = mgr.step(token_loss=token_loss(out.logits, batch.input_ids))
            opt.zero_grad(set_to_none=True)
            loss = float(out.loss.detach())
            log.append({**metrics, "loss": loss})
            if step % 25 == 0 or step == steps - 1:
                say(f"  step {step:4d}  loss {loss:.3f}  phase {metrics['phase']:<18} "
                    f"traces {metrics.get('trace_count', 0):5d}  motifs {metrics['motif_count']}")
    finally:
        handle.detach()
    return {"model": model, "mgr": mgr, "log": log}


def task_trees(model, seed: int, batches: int = 8) -> dict:
    """{task: RoutingTree} of the trained model's own routing (no motif executed) on held-out
    batches of each task, recorded by a manager whose only phase is crystallization discovery."""
    from memtrace.experiment.tasks import TaskSpec, make_batch
    from memtrace.integrations import hf
    cfg = mt.MemtraceConfig(phase_starts=(None, None, 0, None), max_seq_len=SEQ, motif_max_length=LAYERS,
                            min_frequency=10 ** 9)   # record routes, never hold a motif
    trees = {}
    model.eval()
    for i, task in enumerate(PROBE_TASKS):
        probe = mt.Memtrace(LAYERS, HEADS, num_experts=EXPERTS, config=cfg)
        handle = hf.attach(model, probe)
        g = torch.Generator().manual_seed(10_000 + 97 * seed + i)
        spec = TaskSpec(task, vocab_size=VOCAB, seq_len=SEQ, batch_size=BATCH)
        try:
            with torch.no_grad():
                for _ in range(batches):
                    ids = make_batch(spec, g).input_ids
                    probe.step(token_loss=token_loss(model(input_ids=ids).logits, ids))
        finally:
            handle.detach()
        trees[task] = probe.tree
    return trees


def best_layer(memory, seed: int) -> tuple:
    """(layer, heads): the layer whose traces put the largest share of their strength on the copy
    task's useful edges, and its two heads with the most strength there."""
    from memtrace.experiment.tasks import TaskSpec, useful_edge_set
    useful = set(useful_edge_set(TaskSpec(TASK, vocab_size=VOCAB, seq_len=SEQ, batch_size=BATCH), seed=seed,
                                 examples=8))
    best = None
    for layer in range(memory.num_layers):
        head, q, k, s, _, _ = memory.traces(layer)
        on = torch.tensor([(a, b) in useful for a, b in zip(q.tolist(), k.tolist())], dtype=torch.bool)
        total = float(s.sum())
        share = float(s[on].sum()) / total if total > 0 else 0.0
        per_head = torch.zeros(memory.num_heads).index_add_(0, head[on].long(), s[on].float())
        heads = sorted(torch.argsort(per_head, descending=True)[:2].tolist())
        if best is None or share > best[0]:
            best = (share, layer, heads)
    return best[1], best[2]


# ---- 3. experiment curves ------------------------------------------------------------------------

def load_runs(folder: str) -> tuple:
    """({arm (n seeds): {"step", "loss", "accuracy"}}, title) of the largest group of run JSON files
    in `folder` that hold curves, or (None, None) when there is none."""
    groups = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        if os.path.basename(path).startswith("sweep__"):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                r = json.load(f)
            curve = r["curves"]
            m, t = r["config"]["model"], r["config"]["task"]
            key = (r["task"], m["kind"], m["position"], t["seq_len"], r.get("tag", ""))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(curve, list) and curve and all("step" in p and "acc" in p for p in curve):
            groups[key].append(r)
    if not groups:
        return None, None
    key = max(sorted(groups), key=lambda k: len(groups[k]))
    by_arm = defaultdict(list)
    for r in groups[key]:
        by_arm[r["arm"]].append(r["curves"])
    runs = {}
    for arm, curves in by_arm.items():
        steps = [p["step"] for p in curves[0]]
        same = [c for c in curves if [p["step"] for p in c] == steps]

        def mean(metric):
            return [sum(c[i][metric] for c in same) / len(same) for i in range(len(steps))]
        runs[f"{arm} (n={len(same)})"] = {"step": steps, "loss": mean("loss"), "accuracy": mean("acc")}
    task, kind, position, seq_len, tag = key
    pilot = any(r.get("pilot") for r in groups[key])
    title = (f"held-out curves: {task}, {kind} model, {position}, T={seq_len}" + (f", {tag}" if tag else "")
             + (" (PILOT runs)" if pilot else ""))
    return runs, title


def pilot_runs(seed: int, steps: int = 120) -> tuple:
    """A small CPU pilot of `memtrace experiment` (baseline and traces on the copy task, a 2-layer
    dense model) written to a temporary folder and read back like any run folder."""
    from memtrace.experiment.runner import RunConfig, run_one
    with tempfile.TemporaryDirectory() as tmp:
        for arm in ("baseline", "traces"):
            run_one(RunConfig(task=TASK, arm=arm, seed=seed, steps=steps, device="cpu", lr=LR, batch_size=BATCH,
                              seq_len=SEQ, vocab_size=VOCAB, eval_interval=4, eval_batches=2, pilot=True,
                              model=dict(kind="dense", layers=2, d_model=64, heads=4, ffn=128), out=tmp))
        runs, _ = load_runs(tmp)
    title = (f"CPU PILOT, not a result: {TASK}, 2-layer dense model, {steps} steps, 1 seed "
             "(memtrace experiment; no run files with curves yet)")
    return runs, title


# ---- 4. the pictures -----------------------------------------------------------------------------

def draw(out: str, *, memory, tree, registry, metrics_log, trees, runs, runs_title, layer=0, heads=None,
         dpi: int = DPI) -> list:
    """The six PNGs into `out` (created). Returns [(name, path, (width, height) in pixels)]."""
    os.makedirs(out, exist_ok=True)
    figs = [
        ("trace_heatmap", viz.trace_heatmap(memory, layer, heads=heads)),
        ("memory_history", viz.memory_history(metrics_log)),
        ("routing_flow", viz.routing_flow(tree, registry)),
        ("motif_graph", viz.motif_graph(registry, tree)),
        ("motif_activations", viz.motif_activations(registry, trees=trees)),
        ("experiment_curves", viz.experiment_curves(runs, title=runs_title)),
    ]
    written = []
    for name, fig in figs:
        w, h = fig.get_size_inches() * dpi
        path = viz.save_png(fig, os.path.join(out, f"{name}.png"), dpi=dpi)
        written.append((name, path, (round(w), round(h))))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "images"),
                   help="output folder (default docs/images of this repository)")
    p.add_argument("--runs", default=os.path.join(ROOT, "benchmarks", "results", "experiments"),
                   help="folder of `memtrace experiment` run JSON files (default benchmarks/results/experiments)")
    p.add_argument("--steps", type=int, default=300, help="training steps of the tiny Mixtral (default 300)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(1)     # the thread count changes float sums; one thread also never spins on a busy machine
    torch.manual_seed(args.seed)
    print(f"training a tiny Mixtral with memtrace on {TASK} for {args.steps} steps (CPU)")
    state = train(args.steps, args.seed)
    mgr = state["mgr"]
    print(f"  {mgr.memory().num_traces()} traces, {len(mgr.registry)} held motifs "
          f"({time.perf_counter() - t0:.0f} s)")
    trees = task_trees(state["model"], args.seed)
    layer, heads = best_layer(mgr.memory(), args.seed)
    runs, title = load_runs(args.runs) if os.path.isdir(args.runs) else (None, None)
    if runs is None:
        print(f"no run files with curves under {args.runs}: a CPU pilot of memtrace experiment")
        runs, title = pilot_runs(args.seed)
    written = draw(args.out, memory=mgr.memory(), tree=mgr.tree, registry=mgr.registry, metrics_log=state["log"],
                   trees=trees, runs=runs, runs_title=title, layer=layer, heads=heads)
    for _, path, (w, h) in written:
        print(f"  {os.path.relpath(path)}: {w}x{h} px, {os.path.getsize(path) / 1024:.0f} KB")
    print(f"done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
