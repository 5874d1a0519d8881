"""The routing trie and motif registry of SPEC 5 as a plain dict, one path at a time (float64).

A node is keyed by (start_layer, experts tuple) and holds [count, reward_sum, first_seen, last_seen].
Everything is recomputed from that dict on every query: slow and obvious, the oracle for parity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["MotifRegistry", "RefMotif", "RoutingTree"]


@dataclass(frozen=True)
class RefMotif:
    start_layer: int
    experts: tuple
    count: int
    utility: float
    entropy: float
    age: int
    score: float


class RoutingTree:
    def __init__(self, num_layers, num_experts, max_depth=8, mode="suffix"):
        self.num_layers, self.num_experts, self.max_depth, self.mode = num_layers, num_experts, max_depth, mode
        self.nodes = {}  # (s, experts) -> [count, reward_sum, first_seen, last_seen]
        self.tokens = 0
        self.reward_total = 0.0
        self.step = 0

    def update(self, paths, rewards=None, step=0):
        paths = torch.as_tensor(paths).tolist()
        rewards = [0.0] * len(paths) if rewards is None else [float(r) for r in torch.as_tensor(rewards).tolist()]
        starts = range(self.num_layers) if self.mode == "suffix" else [0]
        for path, r in zip(paths, rewards):
            for s in starts:
                sub = []
                for e in path[s:s + self.max_depth]:
                    if e == -1:
                        break
                    sub.append(e)
                    node = self.nodes.setdefault((s, tuple(sub)), [0, 0.0, step, step])
                    node[0] += 1
                    node[1] += r
                    node[3] = step
        self.tokens += len(paths)
        self.reward_total += sum(rewards)
        self.step = step

    @property
    def global_mean_reward(self):
        return self.reward_total / self.tokens if self.tokens else 0.0

    @property
    def num_nodes(self):
        return len(self.nodes)

    def node_entropy(self, s, experts):
        kids = [v[0] for (ks, ke), v in self.nodes.items() if ks == s and len(ke) == len(experts) + 1
                and ke[:-1] == tuple(experts)]
        total = sum(kids)
        return -sum(c / total * math.log(c / total) for c in kids) if total else 0.0

    def stats(self, s, experts, step=None):
        experts = tuple(experts)
        if (s, experts) not in self.nodes:
            return None
        count, reward_sum, first, last = self.nodes[(s, experts)]
        step = self.step if step is None else step
        return {"count": count, "reward_sum": reward_sum, "utility": reward_sum / count - self.global_mean_reward,
                "node_entropy": self.node_entropy(s, experts),
                "entropy": sum(self.node_entropy(s, experts[:t]) for t in range(len(experts))),
                "first_seen": first, "last_seen": last, "age": step - first}

    def to_table(self):
        keys = sorted(self.nodes, key=lambda k: (k[0], list(k[1])))
        rows = [self.nodes[k] for k in keys]
        experts = [list(e) + [-1] * (self.max_depth - len(e)) for _, e in keys]
        return {"start_layer": torch.tensor([s for s, _ in keys], dtype=torch.int64),
                "depth": torch.tensor([len(e) for _, e in keys], dtype=torch.int64),
                "experts": torch.tensor(experts, dtype=torch.int64).reshape(len(keys), self.max_depth),
                "count": torch.tensor([r[0] for r in rows], dtype=torch.int64),
                "reward_sum": torch.tensor([r[1] for r in rows], dtype=torch.float64),
                "first_seen": torch.tensor([r[2] for r in rows], dtype=torch.int64),
                "last_seen": torch.tensor([r[3] for r in rows], dtype=torch.int64)}

    def candidates(self, min_frequency=100, min_utility=0.05, max_entropy=1.0, min_length=3, max_length=8,
                   min_age=0, step=None, weights=(1.0, 1.0, 1.0, 0.0)):
        out = []
        for s, experts in self.nodes:
            st = self.stats(s, experts, step)
            if (st["count"] >= min_frequency and st["utility"] > min_utility and st["entropy"] < max_entropy
                    and min_length <= len(experts) <= max_length and st["age"] >= min_age):
                score = (weights[0] * math.log(st["count"]) + weights[1] * st["utility"]
                         - weights[2] * st["entropy"] + weights[3] * st["age"])
                out.append(RefMotif(s, experts, st["count"], st["utility"], st["entropy"], st["age"], score))
        return sorted(out, key=lambda m: (-m.utility, -m.score, m.start_layer, m.experts))


class MotifRegistry:
    """Held motifs keyed by (start_layer, experts); evicts the lowest utility beyond max_motifs."""

    def __init__(self, max_motifs=512, weights=(1.0, 1.0, 1.0, 0.0), threshold=None):
        self.max_motifs, self.weights, self.threshold = max_motifs, weights, threshold
        self.motifs = {}

    def consider(self, tree, step=None, **criteria):
        for m in tree.candidates(step=step, weights=self.weights, **criteria):
            if self.threshold is None or m.score > self.threshold:
                self.motifs[(m.start_layer, m.experts)] = m
        # Keep the best max_motifs in candidate order: the lowest utility goes first.
        ranked = sorted(self.motifs.values(), key=lambda m: (-m.utility, -m.score, m.start_layer, m.experts))
        self.motifs = {(m.start_layer, m.experts): m for m in ranked[:self.max_motifs]}

    def revalidate(self, tree, step=None, min_utility=0.0):
        """Drop the motifs whose utility fell below min_utility (or that the tree lost) and refresh
        the statistics (and score) of the ones kept, as read at `step` (SPEC 5.5); returns the
        dropped motifs."""
        dropped = []
        for key in list(self.motifs):
            st = tree.stats(*key, step=step)
            if st is None or st["utility"] < min_utility:
                dropped.append(self.motifs.pop(key))
                continue
            score = (self.weights[0] * math.log(st["count"]) + self.weights[1] * st["utility"]
                     - self.weights[2] * st["entropy"] + self.weights[3] * st["age"])
            self.motifs[key] = RefMotif(key[0], key[1], st["count"], st["utility"], st["entropy"], st["age"],
                                        score)
        return dropped
