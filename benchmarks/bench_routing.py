"""Routing-trie update throughput: the seeds' Python trie, memtrace CPU, memtrace CUDA, in one run.

Workloads (issue 5): N tokens, L = 32 layers, 8 and 64 experts, Zipf-skewed expert choice with 1%
-1 cuts; prefix mode over the whole path (max_depth = L, what the seeds' tree does) and suffix mode
with max_depth 8. A path-step is one node visit of an insertion, i.e. the summed length of every
inserted (sub-)path; it is the same count for all three implementations.

The seeds' trie is re-implemented below (dict of children per node, one path at a time) and is
timed on a slice of the tokens (it manages about a million path-steps per second), memtrace CPU on
one thread over all N tokens, memtrace CUDA over all N tokens (fresh tree, and a second update into
a tree that already holds one batch, which adds the merge cost).

    python benchmarks/bench_routing.py [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import platform
import time

import _harness
import torch

import memtrace as mt
from memtrace.routing import BYTES_PER_NODE

# ---- the seeds' trie (semantic-crystallization-plan.md, RoutingPathTree), in our words -------------

class _SeedNode:
    __slots__ = ("children", "count", "expert", "layer", "reward")

    def __init__(self, expert, layer):
        self.expert, self.layer, self.count, self.reward, self.children = expert, layer, 0, 0.0, {}


class SeedTrie:
    """One root per start layer; insert walks the path creating dict children as needed."""

    def __init__(self, num_layers):
        self.roots = [_SeedNode(-1, s - 1) for s in range(num_layers)]

    def insert(self, path, reward, start=0):
        node = self.roots[start]
        for layer, expert in enumerate(path, start):
            child = node.children.get(expert)
            if child is None:
                child = node.children[expert] = _SeedNode(expert, layer)
            child.count += 1
            child.reward += reward
            node = child


def seed_insert_all(trie, paths, rewards, mode, max_depth):
    """Insert every (sub-)path; returns the path-steps done. Cuts at -1 like memtrace."""
    steps = 0
    L = len(paths[0]) if paths else 0
    starts = range(L) if mode == "suffix" else (0,)
    for path, r in zip(paths, rewards):
        for s in starts:
            sub = path[s:s + max_depth]
            if -1 in sub:
                sub = sub[:sub.index(-1)]
            if sub:
                trie.insert(sub, r, s)
                steps += len(sub)
    return steps


# ---- workloads ------------------------------------------------------------------------------------

def zipf_paths(n, num_layers, num_experts, *, alpha=1.1, cut=0.01, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** alpha
    ranks = torch.multinomial(p / p.sum(), n * num_layers, replacement=True, generator=g).view(n, num_layers)
    perms = torch.stack([torch.randperm(num_experts, generator=g) for _ in range(num_layers)])
    paths = torch.gather(perms.T, 0, ranks)
    paths[torch.rand(n, num_layers, generator=g) < cut] = -1
    rewards = torch.randn(n, generator=g)
    return paths.to(device), rewards.to(device)


def path_steps(paths, mode, max_depth):
    """Summed length of the inserted (sub-)paths (each cut at max_depth and at the first -1)."""
    L = paths.shape[1]
    alive = torch.cumprod((paths >= 0).to(torch.int64), dim=1)  # 1 up to the first -1 from layer 0
    if mode == "prefix":
        return int(alive[:, :max_depth].sum())
    total = 0
    ok = (paths >= 0).to(torch.int64)
    for s in range(L):
        total += int(torch.cumprod(ok[:, s:s + max_depth], dim=1).sum())
    return total


def timed(fn, sync=None, reps=1):
    best = float("inf")
    for _ in range(reps):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - t0)
    return best


def run(quick: bool):
    N = 20_000 if quick else 1_000_000
    L = 32
    seed_tokens = {"prefix": 5_000 if quick else 40_000, "suffix": 1_000 if quick else 8_000}
    cuda = torch.cuda.is_available()
    torch.set_num_threads(1)  # the CPU build is single-threaded; keep ATen glue on one core too
    rows = []
    for num_experts in (8, 64):
        for mode, max_depth in (("prefix", L), ("suffix", 8)):
            paths, rewards = zipf_paths(N, L, num_experts, seed=num_experts)
            steps = path_steps(paths, mode, max_depth)
            row = {"mode": mode, "num_experts": num_experts, "N": N, "L": L, "max_depth": max_depth,
                   "path_steps": steps}
            # seeds' Python trie on a slice
            n_py = seed_tokens[mode]
            py_paths, py_rewards = paths[:n_py].tolist(), rewards[:n_py].tolist()
            trie = SeedTrie(L)
            t0 = time.perf_counter()
            py_steps = seed_insert_all(trie, py_paths, py_rewards, mode, max_depth)
            row["python_tokens"] = n_py
            row["python_steps_per_s"] = py_steps / (time.perf_counter() - t0)
            del trie
            # memtrace CPU, one thread, all N tokens, fresh tree
            holder = {}

            def cpu_update():
                t = mt.RoutingTree(L, num_experts, max_depth=max_depth, mode=mode)
                t.update(paths, rewards, step=1)
                holder["tree"] = t

            t_cpu = timed(cpu_update, reps=1 if not quick else 2)
            row["cpu_seconds"] = t_cpu
            row["cpu_steps_per_s"] = steps / t_cpu
            row["cpu_vs_python"] = row["cpu_steps_per_s"] / row["python_steps_per_s"]
            row["num_nodes"] = holder["tree"].num_nodes
            row["bytes_per_node"] = holder["tree"].nbytes / max(1, holder["tree"].num_nodes)
            cpu_tree = holder.pop("tree")
            if cuda:
                dp, dr = paths.cuda(), rewards.cuda()
                sync = torch.cuda.synchronize

                def gpu_fresh():
                    t = mt.RoutingTree(L, num_experts, max_depth=max_depth, mode=mode, device="cuda")
                    t.update(dp, dr, step=1)
                    holder["tree"] = t

                gpu_fresh()  # warm-up (CUB temp buffers, allocator)
                t_gpu = timed(gpu_fresh, sync, reps=3)
                gtree = holder.pop("tree")
                dp2, dr2 = zipf_paths(N, L, num_experts, seed=num_experts + 1, device="cuda")

                def gpu_second():
                    t = mt.RoutingTree(L, num_experts, max_depth=max_depth, mode=mode, device="cuda")
                    t._arrays, t._level_sizes = gtree._arrays, gtree._level_sizes
                    t.update(dp2, dr2, step=2)

                t_gpu2 = timed(gpu_second, sync, reps=3)
                row["cuda_seconds"] = t_gpu
                row["cuda_steps_per_s"] = steps / t_gpu
                row["cuda_second_update_seconds"] = t_gpu2
                row["cuda_vs_python"] = row["cuda_steps_per_s"] / row["python_steps_per_s"]
                row["cuda_vs_cpu"] = row["cuda_steps_per_s"] / row["cpu_steps_per_s"]
                # the two builds agree: the level arrays, from which to_table is a fixed function, are
                # identical (reward sums to 1e-6); comparing them avoids an [n, max_depth] table here
                a, b = gtree._arrays, cpu_tree._arrays
                same = gtree._level_sizes == cpu_tree._level_sizes
                same = same and all(torch.equal(a[k].cpu(), b[k]) for k in a if k != "reward_sum")
                same = same and torch.allclose(a["reward_sum"].cpu(), b["reward_sum"], rtol=1e-6, atol=1e-9)
                row["cuda_table_equals_cpu"] = bool(same)
                del gtree, a, b
                torch.cuda.empty_cache()
            del cpu_tree
            rows.append(row)
            print_row(row)
    for e in (8, 64):  # suffix (max_depth 8) time over prefix time, per build
        pre = next(r for r in rows if r["num_experts"] == e and r["mode"] == "prefix")
        suf = next(r for r in rows if r["num_experts"] == e and r["mode"] == "suffix")
        for build in ("cpu", "cuda"):
            if f"{build}_seconds" in pre:
                suf[f"{build}_suffix_over_prefix_time"] = suf[f"{build}_seconds"] / pre[f"{build}_seconds"]
    return rows


HEADER = (f"{'mode':<7}{'E':>4}{'N':>9}{'path-steps':>12}{'python/s':>11}{'cpu/s':>11}{'cpu/py':>8}"
          f"{'cuda/s':>11}{'cuda/py':>9}{'cuda 2nd':>10}{'nodes':>11}{'B/node':>7}{'equal':>6}")


def print_row(r):
    if not getattr(print_row, "done", False):
        print(HEADER)
        print_row.done = True
    cuda = r.get("cuda_steps_per_s")
    print(f"{r['mode']:<7}{r['num_experts']:>4}{r['N']:>9}{r['path_steps']:>12.3g}{r['python_steps_per_s']:>11.3g}"
          f"{r['cpu_steps_per_s']:>11.3g}{r['cpu_vs_python']:>8.0f}"
          + (f"{cuda:>11.3g}{r['cuda_vs_python']:>9.0f}{r['cuda_second_update_seconds'] * 1e3:>8.1f}ms"
             if cuda else f"{'-':>11}{'-':>9}{'-':>10}")
          + f"{r['num_nodes']:>11}{r['bytes_per_node']:>7.1f}{r.get('cuda_table_equals_cpu', '-')!s:>6}",
          flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    rows = run(args.quick)
    env = _harness.header(platform=platform.platform(), cpu=platform.processor(),
                          bytes_per_node_layout=BYTES_PER_NODE, quick=args.quick)
    for r in rows:
        extra = [f"{b} suffix/prefix time {r[f'{b}_suffix_over_prefix_time']:.2f}x"
                 for b in ("cpu", "cuda") if f"{b}_suffix_over_prefix_time" in r]
        if extra:
            print(f"E={r['num_experts']}: " + ", ".join(extra))
    if args.json:
        _harness.write_json(args.json, {"env": env, "results": rows}, indent=2)
        print("wrote", args.json)


if __name__ == "__main__":
    main()
