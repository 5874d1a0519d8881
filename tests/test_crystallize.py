"""MotifRegistry against the reference registry, eviction, revalidation; CompositeExpert; FLOP helper."""
import dataclasses

import pytest
import torch
from torch import nn

import memtrace as mt
from memtrace.crystallize import CompositeExpert, linear_router_flops, mlp_expert_flops, motif_flops_saved
from memtrace.reference.routing import MotifRegistry as RefRegistry
from memtrace.reference.routing import RoutingTree as RefTree

L, E = 6, 4
CRIT = dict(min_frequency=10, min_utility=0.0, max_entropy=4.0, min_length=2, max_length=4)


def planted_paths(n, seed):
    """Random paths where tokens routed 1-2-3 from layer 1 get a high reward."""
    g = torch.Generator().manual_seed(seed)
    paths = torch.randint(0, E, (n, L), generator=g)
    good = torch.rand(n, generator=g) < 0.3
    paths[good, 1:4] = torch.tensor([1, 2, 3])
    rewards = torch.randn(n, generator=g) * 0.1 + good.double()
    return paths, rewards


def trees(seed=0, steps=(0, 5)):
    tree, ref = mt.RoutingTree(L, E, max_depth=4, mode="suffix"), RefTree(L, E, 4, "suffix")
    for i, step in enumerate(steps):
        p, r = planted_paths(400, seed + i)
        tree.update(p, r, step)
        ref.update(p, r, step)
    return tree, ref


def keys(motifs):
    return [(m.start_layer, m.experts) for m in motifs]


def test_motif_fields():
    m = mt.Motif(start_layer=1, experts=(1, 2, 3), count=5, utility=0.5, entropy=0.1, age=3, score=2.0)
    assert m.key == (1, (1, 2, 3)) and m.length == 3 and list(m.layers) == [1, 2, 3]
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.count = 6  # frozen


@pytest.mark.parametrize("max_motifs,threshold", [(512, None), (3, None), (5, 2.0)])
def test_registry_matches_reference(max_motifs, threshold):
    tree, ref = trees()
    reg = mt.MotifRegistry(max_motifs=max_motifs, threshold=threshold)
    rreg = RefRegistry(max_motifs=max_motifs, threshold=threshold)
    added = reg.consider(tree, step=6, **CRIT)
    rreg.consider(ref, step=6, **CRIT)
    assert keys(reg.motifs) == sorted(rreg.motifs, key=lambda k: (-rreg.motifs[k].utility, -rreg.motifs[k].score, k))
    assert keys(added) == keys(reg.motifs) and len(reg) <= max_motifs
    if max_motifs == 512:
        assert (1, (1, 2, 3)) in reg  # the planted motif
    assert reg.motifs[0].utility >= reg.motifs[-1].utility
    if threshold is not None:
        assert all(m.score > threshold for m in reg.motifs)
    assert reg.consider(tree, step=6, **CRIT) == []  # nothing new the second time


def test_eviction_keeps_highest_utility():
    tree, _ = trees()
    full = tree.candidates(step=6, **CRIT)
    reg = mt.MotifRegistry(max_motifs=4)
    reg.consider(tree, step=6, **CRIT)
    assert keys(reg.motifs) == keys(full[:4])
    assert min(m.utility for m in reg.motifs) >= max(m.utility for m in full[4:])


def test_revalidate_unfreezes_motifs_whose_utility_fell():
    tree, ref = trees()
    reg, rreg = mt.MotifRegistry(), RefRegistry()
    reg.consider(tree, **CRIT)
    rreg.consider(ref, **CRIT)
    assert (1, (1, 2, 3)) in reg
    # the planted chain now loses: many tokens take it with a strongly negative reward
    p, _ = planted_paths(400, 99)
    p[:, 1:4] = torch.tensor([1, 2, 3])
    r = torch.full((400,), -5.0, dtype=torch.float64)
    tree.update(p, r, 9)
    ref.update(p, r, 9)
    dropped = reg.revalidate(tree, step=9, min_utility=0.0)
    rreg.revalidate(ref, step=9, min_utility=0.0)
    assert (1, (1, 2, 3)) in keys(dropped) and (1, (1, 2, 3)) not in reg
    assert sorted(keys(reg.motifs)) == sorted(rreg.motifs)
    for m in reg.motifs:  # statistics refreshed from the tree
        st = tree.stats(m.start_layer, m.experts, step=9)
        assert m.utility == pytest.approx(st["utility"]) and m.count == st["count"] and m.age == st["age"]


def test_registry_bad_input_leaves_it_unchanged():
    tree, _ = trees()
    reg = mt.MotifRegistry(max_motifs=8)
    reg.consider(tree, **CRIT)
    before = reg.motifs
    with pytest.raises(ValueError, match="min_frequency"):
        reg.consider(tree, **dict(CRIT, min_frequency=-1))
    with pytest.raises(TypeError):
        reg.consider(tree, bogus=1)
    with pytest.raises(TypeError, match="min_utility"):
        reg.revalidate(tree, min_utility="high")
    for bad_tree in (None, "tree", {}):
        with pytest.raises(TypeError, match="tree"):
            reg.consider(bad_tree, **CRIT)
        with pytest.raises(TypeError, match="tree"):
            reg.revalidate(bad_tree)
    assert reg.motifs == before
    for kwargs, exc, word in [(dict(max_motifs=0), ValueError, "max_motifs"),
                              (dict(weights=(1.0, 1.0)), ValueError, "weights"),
                              (dict(threshold=float("nan")), ValueError, "threshold")]:
        with pytest.raises(exc, match=word):
            mt.MotifRegistry(**kwargs)


def test_registry_state_dict_roundtrip():
    tree, _ = trees()
    reg = mt.MotifRegistry(max_motifs=6, weights=(1.0, 2.0, 0.5, 0.01))
    reg.consider(tree, **CRIT)
    other = mt.MotifRegistry()
    other.load_state_dict(reg.state_dict())
    assert other.motifs == reg.motifs and other.weights == reg.weights and other.max_motifs == 6


def test_registry_load_state_dict_rejects_bad_dicts():
    """Missing keys and malformed motifs raise ValueError/TypeError naming them (not KeyError),
    and the registry keeps what it held."""
    reg = mt.MotifRegistry(max_motifs=4)
    motif = dict(start_layer=1, experts=[1, 2], count=12, utility=0.5, entropy=0.2, age=3, score=1.5)
    good = dict(reg.state_dict(), motifs=[motif])
    reg.load_state_dict(good)
    before = reg.motifs
    bad = [
        ({k: v for k, v in good.items() if k != "motifs"}, ValueError, "motifs"),
        ("not a dict", TypeError, "state_dict"),
        (dict(good, motifs=None), TypeError, "motifs"),
        (dict(good, motifs=[5]), TypeError, "motifs"),
        (dict(good, motifs=[{"start_layer": 0}]), ValueError, "experts"),
        (dict(good, motifs=[dict(motif, start_layer=-1)]), ValueError, "start_layer"),
        (dict(good, motifs=[dict(motif, experts=[])]), ValueError, "experts"),
        (dict(good, motifs=[dict(motif, experts=[1, -2])]), ValueError, "experts"),
        (dict(good, motifs=[dict(motif, count="a")]), TypeError, "count"),
        (dict(good, motifs=[dict(motif, utility=float("nan"))]), ValueError, "utility"),
        (dict(good, weights=None), ValueError, "weights"),
    ]
    for sd, exc, word in bad:
        with pytest.raises(exc, match=word):
            reg.load_state_dict(sd)
        assert reg.motifs == before


# ---- composite experts ------------------------------------------------------------------------------

def expert_layers(d=8, layers=L, experts=E):
    torch.manual_seed(0)
    return nn.ModuleList([nn.ModuleList([nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(experts)])
                          for _ in range(layers)])


def test_composite_expert_runs_the_chain():
    layers = expert_layers()
    motif = mt.Motif(1, (1, 2, 3), 10, 0.5, 0.1, 0, 1.0)
    x = torch.randn(5, 8)
    want = layers[3][3](layers[2][2](layers[1][1](x)))
    comp = CompositeExpert(layers, motif)
    torch.testing.assert_close(comp(x), want)
    assert all(not p.requires_grad for p in comp.parameters())
    with torch.no_grad():  # frozen: a copy, so training the live experts does not move it
        layers[2][2][0].weight.add_(1.0)
    torch.testing.assert_close(comp(x), want)
    live = CompositeExpert(layers, (1, (1, 2, 3)), frozen=False)
    torch.testing.assert_close(live(x), layers[3][3](layers[2][2](layers[1][1](x))))
    assert live.chain[1] is layers[2][2]
    res = CompositeExpert(layers, (0, (0, 1)), residual=True)
    h = x + layers[0][0](x)
    torch.testing.assert_close(res(x), h + layers[1][1](h))
    comp.train()
    assert not comp.chain[0].training


def test_composite_expert_bad_input():
    layers = expert_layers()
    with pytest.raises(ValueError, match="experts"):
        CompositeExpert(layers, (0, (0, 4)))
    with pytest.raises(ValueError, match="layers"):
        CompositeExpert(layers, (4, (0, 1, 2)))
    with pytest.raises(ValueError, match="motif"):
        CompositeExpert(layers, (0, ()))
    for motif in (5, None, (0,), (0, 1, 2)):
        with pytest.raises(TypeError, match="motif"):
            CompositeExpert(layers, motif)
    with pytest.raises(TypeError, match="experts"):
        CompositeExpert(layers, (0, 5))
    with pytest.raises(TypeError, match=r"experts_per_layer\[0\]"):
        CompositeExpert([torch.nn.Linear(8, 8)], (0, (0,)))
    with pytest.raises(TypeError, match=r"experts_per_layer\[0\]\[1\]"):
        CompositeExpert([[torch.nn.Linear(8, 8), 3]], (0, (1,)))
    with pytest.raises(ValueError, match=r"experts_per_layer\[0\] holds 0"):
        CompositeExpert([[]], (0, (0,)))
    comp = CompositeExpert(layers, (0, torch.tensor([1, 2])))
    assert comp.experts == (1, 2) and all(type(e) is int for e in comp.experts)


def test_flops_saved_matches_seeds_example():
    # seeds' appendix 3.4: k=4 layers, top_k=2, router = 10% of an expert -> 4.4 expert-equivalents
    assert motif_flops_saved(4, router_flops=0.1, expert_flops=1.0, top_k=2) == pytest.approx(4.4)
    assert motif_flops_saved(3, router_flops=2.0, expert_flops=5.0, top_k=1, tokens=10) == pytest.approx(60.0)
    layers = expert_layers()
    comp = CompositeExpert(layers, (0, (1, 2, 3, 0)))
    r, e = linear_router_flops(8, E), mlp_expert_flops(8, 32)
    assert (r, e) == (64.0, 1024.0)
    assert comp.flops_saved(router_flops=r, expert_flops=e, top_k=2) == pytest.approx(4 * (r + e))
    with pytest.raises(ValueError, match="top_k"):
        motif_flops_saved(4, router_flops=1.0, expert_flops=1.0, top_k=0)


# ---- issue 28 ------------------------------------------------------------------------------------

def _assert_registries_equal(reg, rreg, where):
    ref = sorted(rreg.motifs.values(), key=lambda m: (-m.utility, -m.score, m.start_layer, m.experts))
    assert keys(reg.motifs) == keys(ref), where
    for m, r in zip(reg.motifs, ref):
        assert (m.count, m.age) == (r.count, r.age), (where, m.key)
        for f in ("utility", "entropy", "score"):
            assert getattr(m, f) == pytest.approx(getattr(r, f), rel=1e-9, abs=1e-12), (where, m.key, f)


@pytest.mark.parametrize("seed", range(6))
def test_registry_matches_reference_over_consider_and_revalidate(seed):
    """Issue 28.9: revalidate refreshed the kept motifs' statistics in the implementation but not
    in the reference, so a later consider evicted differently. SPEC 5.5: revalidate refreshes the
    statistics of the motifs it keeps; implementation and reference must agree after every call of
    a random sequence of updates, considers and revalidates."""
    import random

    rng = random.Random(seed)
    tree, ref = mt.RoutingTree(L, E, max_depth=4, mode="suffix"), RefTree(L, E, 4, "suffix")
    max_motifs = rng.choice([2, 3, 5])
    reg, rreg = mt.MotifRegistry(max_motifs=max_motifs), RefRegistry(max_motifs=max_motifs)
    crit = dict(min_frequency=5, min_utility=-0.5, max_entropy=6.0, min_length=1, max_length=3)
    step = 0
    for t in range(10):
        step += rng.randint(0, 3)
        g = torch.Generator().manual_seed(seed * 100 + t)
        n = rng.randint(20, 120)
        paths = torch.randint(0, E, (n, L), generator=g)
        bonus = rng.uniform(-1.0, 1.0) * (paths[:, 1] == 1)
        rewards = torch.randn(n, generator=g, dtype=torch.float64) + bonus
        tree.update(paths, rewards, step)
        ref.update(paths, rewards, step)
        action = rng.choice(["consider", "revalidate", "both"])
        if action in ("consider", "both"):
            reg.consider(tree, step=step, **crit)
            rreg.consider(ref, step=step, **crit)
            _assert_registries_equal(reg, rreg, f"consider {t}")
        if action in ("revalidate", "both"):
            min_utility = rng.uniform(-0.3, 0.3)
            dropped = reg.revalidate(tree, step=step, min_utility=min_utility)
            rdropped = rreg.revalidate(ref, step=step, min_utility=min_utility)
            assert sorted(keys(dropped)) == sorted(keys(rdropped))
            _assert_registries_equal(reg, rreg, f"revalidate {t}")


def test_revalidate_refresh_changes_later_eviction():
    """The case behind issue 28.9, by hand: a held motif's utility falls (still above
    min_utility); revalidate refreshes it, so the next consider evicts it for a newcomer whose
    utility lies between its old and new values: implementation and reference alike."""
    tree, ref = mt.RoutingTree(2, 2, max_depth=2, mode="prefix"), RefTree(2, 2, 2, "prefix")
    crit = dict(min_frequency=1, min_utility=-10.0, max_entropy=10.0, min_length=2, max_length=2)
    for t in (tree, ref):
        t.update(torch.tensor([[0, 0], [1, 1]]), torch.tensor([2.0, 0.0], dtype=torch.float64), 0)
    reg, rreg = mt.MotifRegistry(max_motifs=1), RefRegistry(max_motifs=1)
    reg.consider(tree, step=0, **crit)
    rreg.consider(ref, step=0, **crit)
    assert keys(reg.motifs) == [(0, (0, 0))] and list(rreg.motifs) == [(0, (0, 0))]
    # (0, 0) now earns less; (1, 1) much more
    for t in (tree, ref):
        t.update(torch.tensor([[0, 0], [0, 0], [1, 1]]), torch.tensor([-1.0, -1.0, 3.0], dtype=torch.float64),
                 1)
    reg.revalidate(tree, step=1, min_utility=-10.0)
    rreg.revalidate(ref, step=1, min_utility=-10.0)
    _assert_registries_equal(reg, rreg, "revalidate")
    crit_new = dict(crit, min_frequency=2)
    reg.consider(tree, step=1, **crit_new)
    rreg.consider(ref, step=1, **crit_new)
    _assert_registries_equal(reg, rreg, "consider")
