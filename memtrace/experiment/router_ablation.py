"""The stateful-router ablation (issue 26 point 4): does `mt.nn.StatefulRouter`'s recency and usage
state raise retrieval precision over semantic-only routing, as the seed mixture-of-memories.md
claims (Precision@3 0.82 semantic only -> 0.89 + temporal, 0.86 + usage, 0.94 full)?

The task (`LocalityTask`, `make_stream`), generated on the fly from a seed:
    units    U unit embeddings, i.i.d. Gaussian rows of [U, d] scaled to unit length.
    queries  a stream of S steps, each with one target unit:
             - popularity: a random ranking of the units with Zipf weights 1 / rank^zipf;
             - a working set of `working_set` units, drawn by popularity without replacement;
               at each step, with probability `drift`, one member (uniform) is replaced by a unit
               outside the set drawn by popularity (the set drifts: mean dwell working_set / drift);
             - the target is, with probability `locality`, a working-set member drawn by popularity
               within the set, and otherwise any unit drawn by popularity;
             - the query is a noisy view of the target's embedding, e_t + noise * z / sqrt(d) with
               z ~ N(0, I_d), scaled to unit length (so similarity is the cosine). noise = 2.0 was
               set by hand on streams outside every seed used here so that semantic-only routing
               lands near the seed's 0.82: similarity alone is ambiguous.
    Splits: a seed's validation stream and its test stream come from different generators (their
    own units, popularity and queries), so nothing chosen on validation has seen the test stream.

Routing: one `StatefulRouter(d, U, k, alpha, beta, gamma, decay)` per stream, fresh state, one
query per call in stream order (the state is sequential), the stream's units passed as `units=`;
no training. Where the state comes from (`STATE_SOURCES`):
    "selections"  the router as built: after each call it records its own k selections (t_last,
                  n_act), the seed's "activations"; a wrong pick is reinforced like a right one.
    "targets"     the state records the unit actually used at each step (known after routing, e.g.
                  the memory the user opened): the router routes step s, then t_last[target] and
                  n_act[target] are written. Routing never sees the current step's target.

Metric: Precision@k = (number of steps whose target is among the router's k selections) / S,
on the test stream (k = 3, the seed's Precision@3). Per arm, mean and sample standard deviation
(n - 1) over seeds.

Arms (`ARMS`) and weights: alpha = 1 - beta - gamma (the seed's weights sum to 1; top-k only sees
the ratios). semantic: beta = gamma = 0 (the linear top-k gate, seed Theorem 1); recency: gamma = 0,
a grid over (beta, decay); frequency: beta = 0, a grid over gamma; full: a grid over (beta, gamma,
decay). Each arm's weights are chosen by the mean validation precision over seeds (ties: the first
grid point), never by the test stream; every grid point's validation precision is in the result.
The seed's own weights (recency 0.8/0.2, usage 0.8/0.2, full 0.7/0.2/0.1, decay = the router's
default 0.1, which the seed does not give) are grid points and are also reported on test.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

import torch

from .. import _validate as V
from ..nn.router import StatefulRouter

__all__ = ["ARMS", "DEFAULT_SEEDS", "DEFAULT_STEPS", "RESULT_FILE", "SEED_CLAIM", "SEED_WEIGHTS", "STATE_SOURCES",
           "LocalityTask", "RetrievalStream", "RouterWeights", "make_stream", "precision_at_k", "route_stream",
           "run_router_ablation", "weight_grid", "write_router_ablation"]

ARMS = ("semantic", "recency", "frequency", "full")
STATE_SOURCES = ("selections", "targets")
SEED_CLAIM = {"semantic": 0.82, "recency": 0.89, "frequency": 0.86, "full": 0.94}
RESULT_FILE = "router_ablation.json"
DEFAULT_STEPS = 2000
DEFAULT_SEEDS = 5
_SPLIT_OFFSET = {"test": 0, "validation": 1}

# grids: gamma multiplies log(1 + n_act), which reaches ~8 over a few thousand steps, hence small values
_BETAS = (0.05, 0.1, 0.2, 0.4)
_DECAYS = (0.03, 0.1, 0.3)
_GAMMAS = (0.01, 0.02, 0.05, 0.1, 0.2)
_FULL_BETAS = (0.1, 0.2, 0.4)
_FULL_GAMMAS = (0.02, 0.05, 0.1)
_SEED_DECAY = 0.1                       # the router's default; the seed gives no lambda


@dataclass(frozen=True)
class LocalityTask:
    """The retrieval world's sizes and its temporal locality (see the module docstring)."""
    num_units: int = 64
    dim: int = 32
    k: int = 3
    working_set: int = 6
    locality: float = 0.8
    drift: float = 0.02
    zipf: float = 1.0
    noise: float = 2.0

    def __post_init__(self):
        V.check_int("num_units", self.num_units, low=2)
        V.check_int("dim", self.dim, low=1)
        V.check_int("k", self.k, low=1, high=self.num_units)
        V.check_int("working_set", self.working_set, low=1, high=self.num_units - 1)
        V.check_rate("locality", self.locality)
        V.check_rate("drift", self.drift)
        V.check_float("zipf", self.zipf, low=0.0)
        V.check_float("noise", self.noise, low=0.0)


@dataclass(frozen=True)
class RetrievalStream:
    """One split's units, queries and targets."""
    units: torch.Tensor        # [U, d] float32, unit rows
    queries: torch.Tensor      # [S, d] float32, unit rows
    targets: torch.Tensor      # [S] int64


@dataclass(frozen=True)
class RouterWeights:
    """The router's (beta, gamma, decay); alpha = 1 - beta - gamma."""
    beta: float = 0.0
    gamma: float = 0.0
    decay: float = _SEED_DECAY

    @property
    def alpha(self) -> float:
        return 1.0 - self.beta - self.gamma

    def as_dict(self) -> dict:
        return {"alpha": round(self.alpha, 10), "beta": self.beta, "gamma": self.gamma, "decay": self.decay}


SEED_WEIGHTS = {"recency": RouterWeights(beta=0.2), "frequency": RouterWeights(gamma=0.2),
                "full": RouterWeights(beta=0.2, gamma=0.1)}


def weight_grid(arm: str) -> list:
    """Every RouterWeights an arm is tried with on validation (semantic: the one point)."""
    if arm == "semantic":
        return [RouterWeights()]
    if arm == "recency":
        return [RouterWeights(beta=b, decay=d) for b in _BETAS for d in _DECAYS]
    if arm == "frequency":
        return [RouterWeights(gamma=g) for g in _GAMMAS]
    if arm == "full":
        return [RouterWeights(beta=b, gamma=g, decay=d) for b in _FULL_BETAS for g in _FULL_GAMMAS for d in _DECAYS]
    raise ValueError(f"arm must be one of {', '.join(ARMS)}, got {arm!r}")


def make_stream(task: LocalityTask, steps: int, seed: int, split: str = "test") -> RetrievalStream:
    """The seeded stream of one split (deterministic per (task, steps, seed, split))."""
    if not isinstance(task, LocalityTask):
        raise TypeError(f"task must be a LocalityTask, got {type(task).__name__}")
    steps = V.check_int("steps", steps, low=1)
    seed = V.check_int("seed", seed, low=0)
    if split not in _SPLIT_OFFSET:
        raise ValueError(f"split must be one of {', '.join(_SPLIT_OFFSET)}, got {split!r}")
    gen = torch.Generator().manual_seed(2 * seed + _SPLIT_OFFSET[split])
    U, d = task.num_units, task.dim
    units = torch.randn(U, d, generator=gen)
    units = units / units.norm(dim=1, keepdim=True)
    ranking = torch.randperm(U, generator=gen)
    popularity = torch.empty(U, dtype=torch.float64)
    popularity[ranking] = torch.arange(1, U + 1, dtype=torch.float64).pow(-task.zipf)
    working = torch.multinomial(popularity, task.working_set, replacement=False, generator=gen)
    drifts = torch.rand(steps, generator=gen) < task.drift
    local = torch.rand(steps, generator=gen) < task.locality
    targets = torch.empty(steps, dtype=torch.int64)
    for s in range(steps):
        if drifts[s]:
            outside = popularity.clone()
            outside[working] = 0.0
            slot = torch.randint(task.working_set, (), generator=gen)
            working[slot] = torch.multinomial(outside, 1, generator=gen)[0]
        pool = working if local[s] else torch.arange(U)
        targets[s] = pool[torch.multinomial(popularity[pool], 1, generator=gen)[0]]
    noise = torch.randn(steps, d, generator=gen) * (task.noise / math.sqrt(d))
    queries = units[targets] + noise
    queries = queries / queries.norm(dim=1, keepdim=True)
    return RetrievalStream(units=units, queries=queries, targets=targets)


def precision_at_k(selections: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of steps whose target is among that step's selections ([S, k] and [S])."""
    V.check_tensor("selections", selections, ndim=2, integer=True)
    V.check_tensor("targets", targets, ndim=1, integer=True)
    if selections.shape[0] != targets.shape[0] or not targets.numel():
        raise ValueError(f"selections [S, k] and targets [S] must have the same S >= 1, got "
                         f"{tuple(selections.shape)} and {tuple(targets.shape)}")
    return float((selections == targets[:, None]).any(dim=1).double().mean())


def route_stream(stream: RetrievalStream, k: int, weights: RouterWeights, state_from: str = "selections"):
    """[S, k] selections of a fresh StatefulRouter routing the stream one query at a time."""
    if state_from not in STATE_SOURCES:
        raise ValueError(f"state_from must be one of {', '.join(STATE_SOURCES)}, got {state_from!r}")
    U, d = stream.units.shape
    router = StatefulRouter(d, U, k, alpha=weights.alpha, beta=weights.beta, gamma=weights.gamma,
                            decay=weights.decay, update_state=state_from == "selections")
    router.eval()
    out = torch.empty(stream.queries.shape[0], k, dtype=torch.int64)
    with torch.no_grad():
        for s in range(stream.queries.shape[0]):
            out[s] = router(stream.queries[s:s + 1], units=stream.units)[1][0]
            if state_from == "targets":
                # the used unit becomes known after routing: it, not the picks, is what the state records
                target = stream.targets[s]
                router.t_last[target] = router.t
                router.n_act[target] += 1
                router.t += 1
    return out


def _mean_std(values) -> dict:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std}


def _choose(grid_rows) -> dict:
    """The grid row with the highest mean validation precision (the first of equals)."""
    best = grid_rows[0]
    for row in grid_rows[1:]:
        if row["validation_mean"] > best["validation_mean"]:
            best = row
    return best


def _precisions(streams, task, weights, state_from) -> list:
    return [precision_at_k(route_stream(s, task.k, weights, state_from), s.targets) for s in streams]


def run_router_ablation(seeds: int = DEFAULT_SEEDS, steps: int = DEFAULT_STEPS, task: LocalityTask | None = None,
                        state_sources=STATE_SOURCES) -> dict:
    """The ablation as a JSON-able dict: per state source, every grid point's validation precision
    and each arm's chosen weights with its test precision per seed, mean and std; the seed's own
    weights on test; the gain of each arm over semantic-only, paired by seed."""
    from .runner import environment
    seeds = V.check_int("seeds", seeds, low=1)
    steps = V.check_int("steps", steps, low=1)
    task = LocalityTask() if task is None else task
    if not isinstance(task, LocalityTask):
        raise TypeError(f"task must be a LocalityTask or None, got {type(task).__name__}")
    state_sources = tuple(state_sources)
    bad = [s for s in state_sources if s not in STATE_SOURCES]
    if bad or not state_sources:
        raise ValueError(f"state_sources must be a non-empty subset of {STATE_SOURCES}, got {state_sources}")
    started = time.perf_counter()
    seed_list = list(range(seeds))
    validation = [make_stream(task, steps, s, "validation") for s in seed_list]
    test = [make_stream(task, steps, s, "test") for s in seed_list]
    semantic_test = _precisions(test, task, RouterWeights(), "selections")   # state unused: one run serves both
    semantic_validation = _precisions(validation, task, RouterWeights(), "selections")
    by_source = {}
    for source in state_sources:
        grid, arms, seed_weights = {}, {}, {}
        for arm in ARMS:
            rows = []
            for w in weight_grid(arm):
                vals = semantic_validation if arm == "semantic" else _precisions(validation, task, w, source)
                rows.append({"weights": w.as_dict(), "validation_per_seed": vals,
                             "validation_mean": _mean_std(vals)["mean"]})
            grid[arm] = rows
            chosen = _choose(rows)
            w = RouterWeights(**{k: chosen["weights"][k] for k in ("beta", "gamma", "decay")})
            vals = semantic_test if arm == "semantic" else _precisions(test, task, w, source)
            arms[arm] = {"weights": chosen["weights"], "validation_mean": chosen["validation_mean"],
                         "test_per_seed": vals, **_mean_std(vals)}
            if arm in SEED_WEIGHTS:
                sw = SEED_WEIGHTS[arm]
                svals = _precisions(test, task, sw, source)
                seed_weights[arm] = {"weights": sw.as_dict(), "test_per_seed": svals, **_mean_std(svals)}
        for entry in list(arms.values()) + list(seed_weights.values()):
            entry["gain_over_semantic"] = _mean_std([a - b for a, b in zip(entry["test_per_seed"], semantic_test)])
        by_source[source] = {"arms": arms, "seed_weights": seed_weights, "grid": grid}
    return {
        "experiment": "router_ablation",
        "schema": 1,
        "pilot": seeds < DEFAULT_SEEDS or steps < DEFAULT_STEPS,
        "claim": {"source": "seeds/mixture-of-memories.md, 'Ablation Study Results'", "precision_at_3": SEED_CLAIM},
        "arms": list(ARMS),
        "task": asdict(task),
        "seeds": seed_list,
        "steps": steps,
        "validation_steps": steps,
        "metric": f"precision@{task.k}: share of test steps whose target unit is among the router's {task.k} "
                  "selections; mean and sample std (n - 1) over seeds",
        "selection_rule": "per arm and state source, the grid point with the highest mean validation precision "
                          "over seeds (validation streams are separate generators from the test streams)",
        "state_sources": {"selections": "the router records its own k selections (the module as built)",
                          "targets": "the router records the unit actually used, after routing each step"},
        "results": by_source,
        "wall_seconds": time.perf_counter() - started,
        "environment": environment("cpu"),
    }


def write_router_ablation(out_dir: str, **kwargs) -> tuple:
    """Run the ablation and write `out_dir/router_ablation.json` atomically; (path, result)."""
    from .runner import write_json_atomic
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
    result = run_router_ablation(**kwargs)
    path = os.path.join(os.fspath(out_dir), RESULT_FILE)
    write_json_atomic(result, path)
    return path, result
