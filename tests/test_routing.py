"""RoutingTree (C++ CPU build) against the dict trie of memtrace.reference, both modes; bad input."""
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import memtrace as mt
from memtrace.reference.routing import RoutingTree as RefTree
from memtrace.routing import BYTES_PER_NODE

TABLE_KEYS = ("start_layer", "depth", "experts", "count", "reward_sum", "first_seen", "last_seen")


def zipf_paths(n, num_layers, num_experts, *, cut=0.05, alpha=1.2, seed=0):
    """Zipf-skewed expert ids (a per-layer permutation of the ranks), with -1 cuts."""
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** alpha
    ranks = torch.multinomial(p / p.sum(), n * num_layers, replacement=True, generator=g).view(n, num_layers)
    perms = torch.stack([torch.randperm(num_experts, generator=g) for _ in range(num_layers)])
    paths = torch.gather(perms.T, 0, ranks)  # layer l maps rank r to perms[l, r]
    paths[torch.rand(n, num_layers, generator=g) < cut] = -1
    return paths


def assert_tables_equal(a, b, rtol=1e-9):
    assert set(a) == set(TABLE_KEYS) == set(b)
    for k in TABLE_KEYS:
        if k == "reward_sum":
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=1e-9)
        else:
            assert torch.equal(a[k], b[k]), k


def build_pair(mode, num_layers, num_experts, max_depth, updates, n, seed=0, cut=0.05):
    tree = mt.RoutingTree(num_layers, num_experts, max_depth=max_depth, mode=mode)
    ref = RefTree(num_layers, num_experts, max_depth, mode)
    g = torch.Generator().manual_seed(seed)
    for u, step in enumerate(updates):
        paths = zipf_paths(n, num_layers, num_experts, cut=cut, seed=seed * 100 + u)
        rewards = torch.randn(n, generator=g, dtype=torch.float64) + 0.3 * (paths[:, 0] == 0)
        tree.update(paths, rewards, step=step)
        ref.update(paths, rewards, step=step)
    return tree, ref


@pytest.mark.parametrize("mode", ["prefix", "suffix"])
@pytest.mark.parametrize("num_layers,num_experts,max_depth", [(6, 4, 3), (8, 8, 8), (5, 3, 9), (12, 64, 4)])
def test_table_matches_reference(mode, num_layers, num_experts, max_depth):
    tree, ref = build_pair(mode, num_layers, num_experts, max_depth, updates=(0, 4, 4, 11), n=200)
    assert tree.num_nodes == ref.num_nodes
    assert_tables_equal(tree.to_table(), ref.to_table())
    assert tree.global_mean_reward == pytest.approx(ref.global_mean_reward, rel=1e-12, abs=1e-12)
    assert tree.nbytes == BYTES_PER_NODE * tree.num_nodes + 8 * tree.depth
    assert BYTES_PER_NODE <= 32


@pytest.mark.parametrize("mode", ["prefix", "suffix"])
def test_stats_and_candidates_match_reference(mode):
    tree, ref = build_pair(mode, 7, 5, 5, updates=(1, 3, 8), n=400, seed=3)
    rng = random.Random(0)
    for s, experts in rng.sample(sorted(ref.nodes), 60):
        for step in (None, 20):
            got, want = tree.stats(s, experts, step=step), ref.stats(s, experts, step=step)
            assert set(got) == set(want)
            for k in want:
                assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k
    for crit in (dict(min_frequency=5, min_utility=0.0, max_entropy=3.0, min_length=1, max_length=5),
                 dict(min_frequency=2, min_utility=-10.0, max_entropy=10.0, min_length=2, max_length=3, min_age=2,
                      step=9)):
        got = tree.candidates(**crit)
        want = ref.candidates(**crit)
        assert [(m.start_layer, m.experts) for m in got] == [(m.start_layer, m.experts) for m in want]
        for m, r in zip(got, want):
            assert m.count == r.count and m.age == r.age
            assert m.utility == pytest.approx(r.utility, rel=1e-9, abs=1e-12)
            assert m.entropy == pytest.approx(r.entropy, rel=1e-9, abs=1e-12)
            assert m.score == pytest.approx(r.score, rel=1e-9, abs=1e-12)
        assert len(got) > 0


def test_entropy_by_hand():
    # prefix paths: 0-1 (x2), 0-2, 1-1 ; root children counts (3, 1); node (0,) children (2, 1)
    tree = mt.RoutingTree(2, 3, max_depth=2, mode="prefix")
    tree.update(torch.tensor([[0, 1], [0, 2], [0, 1], [1, 1]]), torch.tensor([1.0, 0.0, 1.0, 2.0]), step=5)
    h_root = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    h_0 = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert tree.root_entropy(0) == pytest.approx(h_root)
    st0 = tree.stats(0, (0,))
    assert st0["node_entropy"] == pytest.approx(h_0) and st0["entropy"] == pytest.approx(h_root)
    st01 = tree.stats(0, (0, 1), step=9)
    assert st01["count"] == 2 and st01["node_entropy"] == 0.0 and st01["entropy"] == pytest.approx(h_root + h_0)
    assert st01["utility"] == pytest.approx(1.0 - 1.0) and st01["age"] == 4
    assert tree.global_mean_reward == pytest.approx(1.0)
    assert tree.stats(0, (2,)) is None and tree.stats(1, (1,)) is None  # prefix: only start layer 0


def test_first_and_last_seen_and_none_rewards():
    tree = mt.RoutingTree(3, 2, max_depth=3, mode="suffix")
    tree.update(torch.tensor([[0, 1, 1]]), None, step=2)
    tree.update(torch.tensor([[1, 1, -1]]), None, step=7)
    st = tree.stats(1, (1,))
    assert (st["count"], st["first_seen"], st["last_seen"], st["age"]) == (2, 2, 7, 5)
    assert tree.stats(0, (0, 1, 1))["last_seen"] == 2
    assert tree.stats(1, (1, -1 + 1)) is None  # -1 cut: (1, 0) never recorded
    assert tree.global_mean_reward == 0.0 and tree.num_tokens == 2


def test_edge_cases_empty_and_cut_everything():
    tree = mt.RoutingTree(4, 3, max_depth=8, mode="suffix")
    tree.update(torch.zeros(0, 4, dtype=torch.int64), step=1)
    assert tree.num_nodes == 0 and tree.to_table()["experts"].shape == (0, 8)
    tree.update(torch.full((5, 4), -1), torch.ones(5), step=2)
    assert tree.num_nodes == 0 and tree.global_mean_reward == 1.0
    assert tree.candidates(min_frequency=0, min_utility=-1e9, min_length=1) == []
    tree.update(torch.tensor([[2, -1, 1, 0]], dtype=torch.int32), torch.tensor([0.5], dtype=torch.float32), step=3)
    ref = RefTree(4, 3, 8, "suffix")
    ref.update(torch.full((5, 4), -1), torch.ones(5), step=2)
    ref.update(torch.tensor([[2, -1, 1, 0]]), torch.tensor([0.5]), step=3)
    assert_tables_equal(tree.to_table(), ref.to_table())


def test_table_is_canonical_and_op_is_registered():
    tree, _ = build_pair("suffix", 6, 4, 4, updates=(0,), n=100)
    t = tree.to_table()
    keys = [(s, e) for s, e in zip(t["start_layer"].tolist(), t["experts"].tolist())]
    assert keys == sorted(keys)
    assert hasattr(torch.ops.memtrace, "routing_update")
    e = torch.zeros(0, dtype=torch.int32)
    out = torch.ops.memtrace.routing_update(e, e.short(), e.long(), e.double(), e, e, [],
                                            torch.tensor([[1, 0]]), torch.tensor([2.0], dtype=torch.float64),
                                            3, 8, 2, False)
    assert out[0].tolist() == [0, 0] and out[1].tolist() == [1, 0] and out[6].tolist() == [1, 1]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 7), st.sampled_from(["prefix", "suffix"]),
       st.integers(0, 10 ** 6))
def test_random_small_tries(num_layers, num_experts, max_depth, mode, seed):
    g = torch.Generator().manual_seed(seed)
    tree = mt.RoutingTree(num_layers, num_experts, max_depth=max_depth, mode=mode)
    ref = RefTree(num_layers, num_experts, max_depth, mode)
    for step in (0, 2):
        n = int(torch.randint(0, 30, (1,), generator=g))
        paths = torch.randint(-1, num_experts, (n, num_layers), generator=g)
        rewards = torch.randn(n, generator=g)
        tree.update(paths, rewards, step)
        ref.update(paths, rewards, step)
    assert_tables_equal(tree.to_table(), ref.to_table())


# ---- bad input (SPEC 6): the error names the argument, the trie is unchanged -------------------

def _snapshot(tree):
    return tree.to_table(), tree.global_mean_reward, tree.num_tokens, tree.step


@pytest.mark.parametrize("paths,rewards,step,exc,word", [
    ([[0, 1, 2]], None, 0, TypeError, "paths"),
    (torch.zeros(3, dtype=torch.int64), None, 0, ValueError, "paths"),
    (torch.zeros(2, 4, dtype=torch.int64), None, 0, ValueError, "paths"),
    (torch.zeros(2, 3), None, 0, TypeError, "paths"),
    (torch.tensor([[0, 1, 4]]), None, 0, ValueError, "paths"),
    (torch.tensor([[0, -2, 1]]), None, 0, ValueError, "paths"),
    (torch.tensor([[0, 1, 4]], dtype=torch.uint16), None, 0, ValueError, "paths"),
    (torch.tensor([[0, 1, 4]], dtype=torch.uint32), None, 0, ValueError, "paths"),
    (torch.tensor([[0, 1, 4]], dtype=torch.uint64), None, 0, ValueError, "paths"),
    (torch.tensor([[0, 1, -1]]).to(torch.uint64), None, 0, ValueError, "paths"),  # 2^64 - 1, not the -1 cut
    (torch.tensor([[0, 1, 2]]), torch.ones(2), 0, ValueError, "rewards"),
    (torch.tensor([[0, 1, 2]]), torch.ones(1, dtype=torch.int64), 0, TypeError, "rewards"),
    (torch.tensor([[0, 1, 2]]), torch.tensor([float("nan")]), 0, ValueError, "rewards"),
    (torch.tensor([[0, 1, 2]]), torch.tensor([float("inf")]), 0, ValueError, "rewards"),
    (torch.tensor([[0, 1, 2]]), [1.0], 0, TypeError, "rewards"),
    (torch.tensor([[0, 1, 2], [0, 1, 2]]), torch.tensor([1e308, 1e308], dtype=torch.float64), 0, ValueError,
     "rewards"),  # finite, but their sum overflows float64
    (torch.tensor([[0, 1, 2]]), None, -1, ValueError, "step"),
    (torch.tensor([[0, 1, 2]]), None, 2 ** 31, ValueError, "step"),
    (torch.tensor([[0, 1, 2]]), None, 1.5, TypeError, "step"),
])
def test_bad_update_leaves_tree_unchanged(paths, rewards, step, exc, word):
    tree, _ = build_pair("suffix", 3, 4, 3, updates=(0,), n=50)
    before = _snapshot(tree)
    with pytest.raises(exc, match=word):
        tree.update(paths, rewards, step)
    after = _snapshot(tree)
    assert_tables_equal(before[0], after[0], rtol=0)
    assert before[1:] == after[1:]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.uint16, torch.uint32, torch.uint64])
def test_update_takes_any_integer_dtype(dtype):
    paths = zipf_paths(40, 3, 4, cut=0.0, seed=5)
    want = mt.RoutingTree(3, 4, max_depth=3)
    want.update(paths, None, 2)
    tree = mt.RoutingTree(3, 4, max_depth=3)
    tree.update(paths.to(dtype), None, 2)
    assert_tables_equal(want.to_table(), tree.to_table(), rtol=0)


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(num_layers=0, num_experts=4), ValueError, "num_layers"),
    (dict(num_layers=3, num_experts=0), ValueError, "num_experts"),
    (dict(num_layers=3, num_experts=40000), ValueError, "num_experts"),
    (dict(num_layers=3, num_experts=4, max_depth=0), ValueError, "max_depth"),
    (dict(num_layers=3, num_experts=4, max_depth=256), ValueError, "max_depth"),
    (dict(num_layers=3, num_experts=4, mode="infix"), ValueError, "mode"),
    (dict(num_layers=3.0, num_experts=4), TypeError, "num_layers"),
    (dict(num_layers=3, num_experts=4, device="gpu"), ValueError, "device"),
    (dict(num_layers=3, num_experts=4, device=1.5), TypeError, "device"),
    (dict(num_layers=3, num_experts=4, device="cuda:99"), ValueError, "device"),
])
def test_bad_constructor(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        mt.RoutingTree(**kwargs)


def test_bad_device_in_load_and_to(tmp_path):
    tree, _ = build_pair("suffix", 3, 4, 3, updates=(0,), n=20)
    tree.save(tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match="device"):
        mt.RoutingTree.load(tmp_path / "t.safetensors", device="gpu")
    with pytest.raises(ValueError, match="device"):
        tree.to("gpu")


def test_bad_queries():
    tree, _ = build_pair("suffix", 3, 4, 3, updates=(0,), n=50)
    with pytest.raises(ValueError, match="start_layer"):
        tree.stats(3, (0,))
    with pytest.raises(ValueError, match="experts"):
        tree.stats(0, (4,))
    with pytest.raises(ValueError, match="experts"):
        tree.stats(0, ())
    with pytest.raises(TypeError, match="experts"):
        tree.stats(0, 1)
    with pytest.raises(ValueError, match="weights"):
        tree.candidates(weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="min_frequency"):
        tree.candidates(min_frequency=-1)
    with pytest.raises(ValueError, match="step"):
        tree.candidates(step=-3)


# ---- persistence ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["prefix", "suffix"])
def test_save_load_roundtrip(tmp_path, mode):
    tree, _ = build_pair(mode, 6, 4, 4, updates=(0, 5), n=120)
    path = tmp_path / "trie.safetensors"
    tree.save(path)
    back = mt.RoutingTree.load(path)
    assert (back.num_layers, back.num_experts, back.max_depth, back.mode) == (6, 4, 4, mode)
    assert_tables_equal(tree.to_table(), back.to_table(), rtol=0)
    assert (back.global_mean_reward, back.num_tokens, back.step) == (tree.global_mean_reward, tree.num_tokens, 5)
    paths = zipf_paths(30, 6, 4, seed=9)
    tree.update(paths, None, 6)
    back.update(paths, None, 6)
    assert_tables_equal(tree.to_table(), back.to_table(), rtol=0)


def test_save_replaces_whole_and_names_a_missing_directory(tmp_path):
    tree, _ = build_pair("prefix", 4, 4, 3, updates=(0,), n=50)
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        tree.save(tmp_path / "no_such_dir" / "trie.safetensors")
    path = tmp_path / "trie.safetensors"
    tree.save(path)
    tree.update(zipf_paths(20, 4, 4, seed=3), None, 1)
    tree.save(path)                       # over the old file: no temporary left, the new tree read back
    assert [p.name for p in tmp_path.iterdir()] == ["trie.safetensors"]
    assert_tables_equal(tree.to_table(), mt.RoutingTree.load(path).to_table(), rtol=0)


def test_load_rejects_damaged_files(tmp_path):
    from safetensors.torch import save_file

    tree, _ = build_pair("suffix", 5, 4, 3, updates=(0,), n=80)
    good = tmp_path / "good.safetensors"
    tree.save(good)
    data = good.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 7):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError):
            mt.RoutingTree.load(bad)
    sd = tree.state_dict()

    def write(name, sd, meta):
        p = tmp_path / name
        save_file(sd, str(p), metadata=meta)
        return p

    meta = {"format": "memtrace.RoutingTree", "format_version": "1"}
    with pytest.raises(ValueError, match="version"):
        mt.RoutingTree.load(write("v.safetensors", sd, dict(meta, format_version="99")))
    with pytest.raises(ValueError, match="not a memtrace"):
        mt.RoutingTree.load(write("f.safetensors", sd, {"format": "other"}))
    broken = dict(sd, count=sd["count"][:-1].clone())
    with pytest.raises(ValueError, match="length"):
        mt.RoutingTree.load(write("len.safetensors", broken, meta))
    expert = sd["expert"].clone()
    expert[0] = 7
    with pytest.raises(ValueError, match="expert"):
        mt.RoutingTree.load(write("e.safetensors", dict(sd, expert=expert), meta))
    parent = sd["parent"].clone()
    parent[-1] = 10 ** 6
    with pytest.raises(ValueError, match="parent"):
        mt.RoutingTree.load(write("p.safetensors", dict(sd, parent=parent), meta))
    count = sd["count"].clone()
    count[-1] = 10 ** 9
    with pytest.raises(ValueError, match="count"):
        mt.RoutingTree.load(write("c.safetensors", dict(sd, count=count), meta))
    # load_state_dict with a bad state leaves the tree as it was
    before = _snapshot(tree)
    with pytest.raises(ValueError):
        tree.load_state_dict(dict(sd, count=count))
    assert_tables_equal(before[0], tree.to_table(), rtol=0)


def test_load_state_dict_rejects_malformed_states():
    tree, _ = build_pair("suffix", 5, 4, 3, updates=(0, 3), n=80)
    sd = tree.state_dict()
    first_seen = sd["first_seen"].clone()
    first_seen[0] = -4
    bad = [
        ([1, 2], TypeError, "state_dict"),
        (dict(sd, config=sd["config"].tolist()), TypeError, "config"),
        (dict(sd, level_sizes=sd["level_sizes"].tolist()), TypeError, "level_sizes"),
        (dict(sd, num_tokens=80), TypeError, "num_tokens"),
        (dict(sd, reward_total=0.5), TypeError, "reward_total"),
        (dict(sd, step=3), TypeError, "step"),
        (dict(sd, first_seen=first_seen), ValueError, "first_seen"),
        (dict(sd, num_tokens=torch.tensor([10], dtype=torch.int64)), ValueError, "num_tokens"),
    ]
    before = _snapshot(tree)
    for state, exc, word in bad:
        with pytest.raises(exc, match=word):
            tree.load_state_dict(state)
        after = _snapshot(tree)
        assert_tables_equal(before[0], after[0], rtol=0)
        assert before[1:] == after[1:]


def test_opcheck():
    from memtrace.routing import _ops

    ops = _ops()  # also registers the fake (shape) implementation
    tree, _ = build_pair("suffix", 4, 3, 3, updates=(1,), n=20)
    arrays = [tree._arrays[k] for k in ("parent", "expert", "count", "reward_sum", "first_seen", "last_seen")]
    args = (*arrays, tree._level_sizes, torch.tensor([[0, 1, 2, 0], [2, -1, 1, 1]]),
            torch.tensor([0.5, -1.0], dtype=torch.float64), 2, 3, 3, True)
    result = torch.library.opcheck(ops.routing_update.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_suffix_cuts_by_hand():
    # SPEC 5.2: every start layer's sub-path, cut at max_depth experts and at its first -1.
    paths = torch.tensor([[0, 1, -1, 2], [0, 1, 2, -1], [-1, 0, 1, 2]])
    rewards = torch.tensor([1.0, 2.0, 4.0])
    expected = {(0, (0,)): (2, 3.0), (0, (0, 1)): (2, 3.0), (1, (1,)): (2, 3.0), (1, (1, 2)): (1, 2.0),
                (1, (0,)): (1, 4.0), (1, (0, 1)): (1, 4.0), (2, (2,)): (1, 2.0), (2, (1,)): (1, 4.0),
                (2, (1, 2)): (1, 4.0), (3, (2,)): (2, 5.0)}
    tree = mt.RoutingTree(4, 3, max_depth=2, mode="suffix")
    tree.update(paths, rewards, step=5)
    tab = tree.to_table()
    got = {(int(tab["start_layer"][i]), tuple(tab["experts"][i, :int(tab["depth"][i])].tolist())):
           (int(tab["count"][i]), float(tab["reward_sum"][i])) for i in range(tree.num_nodes)}
    assert got == expected
    assert tree.global_mean_reward == pytest.approx(7 / 3)  # each token once, even with cuts
    prefix = mt.RoutingTree(4, 3, max_depth=3, mode="prefix")
    prefix.update(paths, rewards, step=5)
    assert prefix.num_nodes == 3 and prefix.stats(0, (0, 1, 2))["count"] == 1
    assert prefix.global_mean_reward == pytest.approx(7 / 3)  # the token cut at layer 0 still counts


def test_candidate_criteria_boundaries_by_hand():
    # SPEC 5.3: count >= min_frequency, utility > min_utility, entropy < max_entropy,
    # min_length <= k <= max_length, age >= min_age. Motif (0, (0, 0, 0)): count 2, utility 0.5,
    # entropy ln 2 (root children 2:2, then single children), first seen at step 3, latest step 10.
    tree = mt.RoutingTree(3, 2, max_depth=3, mode="prefix")
    tree.update(torch.tensor([[0, 0, 0], [0, 0, 0], [1, 1, 1], [1, 1, 0]]), torch.tensor([1.0, 1.0, 0.0, 0.0]),
                step=3)
    tree.update(torch.zeros(0, 3, dtype=torch.int64), step=10)
    base = dict(min_frequency=2, min_utility=0.49, max_entropy=0.7, min_length=3, max_length=3, min_age=7)
    (m,) = tree.candidates(**base)
    assert (m.key, m.count, m.age) == ((0, (0, 0, 0)), 2, 7)
    assert m.utility == pytest.approx(0.5) and m.entropy == pytest.approx(math.log(2))
    assert m.score == pytest.approx(math.log(2) + 0.5 - math.log(2))
    for change in (dict(min_frequency=3), dict(min_utility=0.5), dict(max_entropy=math.log(2)), dict(min_age=8),
                   dict(min_length=4, max_length=4), dict(max_length=2, min_length=2)):
        assert [c.key for c in tree.candidates(**{**base, **change})] != [m.key], change
    assert [c.key for c in tree.candidates(**{**base, "min_age": 8}, step=11)] == [m.key]
    # ties on utility -> score descending -> (start_layer, experts) ascending
    everything = tree.candidates(min_frequency=1, min_utility=-1.0, max_entropy=5.0, min_length=1, max_length=3)
    assert [c.key for c in everything] == [(0, (0,)), (0, (0, 0)), (0, (0, 0, 0)), (0, (1,)), (0, (1, 1)),
                                           (0, (1, 1, 0)), (0, (1, 1, 1))]


# ---- issue 28 ------------------------------------------------------------------------------------

_OP_PROBE = """
import sys, torch
import memtrace.routing as R
v = int(sys.argv[1])
z = lambda dt: torch.zeros(0, dtype=dt)
empty = (z(torch.int32), z(torch.int16), z(torch.int64), z(torch.float64), z(torch.int32), z(torch.int32))
paths = torch.full((40, 2), v)
paths[::3, 1] = 1
try:
    R._ops().routing_update(*empty, [], paths, torch.zeros(40, dtype=torch.float64), 0, 8, 4, True)
    print("STORED")
except ValueError as exc:
    print("VALUEERROR", exc)
"""


@pytest.mark.parametrize("bad", [4, 7, 100, 10**8, -2, -(10**8)])
def test_op_rejects_expert_ids_out_of_range(bad):
    """Issue 28.7: the registered op trusted expert ids: 7 (of 4 experts) was stored, 100
    corrupted the heap, 10**8 segfaulted. Run in a subprocess (a crash before the fix must not
    take pytest down): the op must raise ValueError and the process survive."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _OP_PROBE, str(bad)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
    assert res.stdout.startswith("VALUEERROR"), res.stdout
    assert "expert ids in [0, 4)" in res.stdout


def test_op_accepts_minus_one_and_rejects_bad_trie_arrays():
    """-1 cuts a path (stored as nothing); trie arrays that break the trie's invariants (a parent
    outside the previous level, an expert id out of range, a negative count, unsorted keys) are
    refused by the op itself, not trusted."""
    ops = mt.routing._ops()
    z = lambda dt: torch.zeros(0, dtype=dt)  # noqa: E731
    empty = (z(torch.int32), z(torch.int16), z(torch.int64), z(torch.float64), z(torch.int32), z(torch.int32))
    out = ops.routing_update(*empty, [], torch.full((5, 2), -1), torch.zeros(5, dtype=torch.float64), 0, 8, 4,
                             True)
    assert out[0].numel() == 0 and out[6].tolist() == []
    tree = mt.RoutingTree(2, 4, max_depth=2, mode="prefix")
    tree.update(torch.tensor([[0, 1], [2, 3]]))
    arrays = {k: t.clone() for k, t in tree._arrays.items()}
    paths, rewards = torch.tensor([[0, 1]]), torch.zeros(1, dtype=torch.float64)
    keys = ("parent", "expert", "count", "reward_sum", "first_seen", "last_seen")
    for key, index, value, word in (("parent", 2, 5, "parent"), ("parent", 0, 3, "parent"),
                                    ("expert", 1, 9, "expert"), ("expert", 0, -1, "expert"),
                                    ("count", 3, -1, "count"), ("expert", 0, 2, "increasing")):
        bad = dict(arrays)
        bad[key] = arrays[key].clone()
        bad[key][index] = value
        with pytest.raises(ValueError, match=word):
            ops.routing_update(*(bad[k] for k in keys), tree._level_sizes, paths, rewards, 1, 2, 4, False)


_ZERO_LAYER_PROBE = """
import torch
import memtrace.routing as R
z = lambda dt: torch.zeros(0, dtype=dt)
empty = (z(torch.int32), z(torch.int16), z(torch.int64), z(torch.float64), z(torch.int32), z(torch.int32))
for suffix in (False, True):
    out = R._ops().routing_update(*empty, [], torch.zeros((3, 0), dtype=torch.int64),
                                  torch.zeros(3, dtype=torch.float64), 0, 4, 4, suffix)
    print(sum(t.numel() for t in out))
"""


def test_op_paths_without_layers_store_nothing():
    """Paths [N, 0] in prefix mode read layer 0 of an empty tensor (a segfault on the CPU, out of
    bounds on CUDA): now they start no sub-path. In a subprocess, so a crash fails this test only."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _ZERO_LAYER_PROBE], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
    assert res.stdout.split() == ["0", "0"]


def test_op_rejects_a_level_below_an_empty_one():
    """Level sizes [0, 1]: the depth-2 node has no parent to point to (on CUDA its key read the
    previous level's empty remap before the check)."""
    ops = mt.routing._ops()
    arrays = (torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int16), torch.ones(1, dtype=torch.int64),
              torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="routing_update"):
        ops.routing_update(*arrays, [0, 1], torch.tensor([[0, 1]]), torch.zeros(1, dtype=torch.float64), 1, 2, 4,
                           False)


def test_counts_near_int64_max_refused_or_saturated_not_wrapped(tmp_path):
    """Issue 28.8: a crafted state with counts of 2^63-1 loaded, the next update wrapped them to
    -2^63 and save() failed. Now: an update that would take the token total (which bounds every
    count) past 2^63-1 is refused before anything changes; the op itself saturates counts; a state
    whose children's counts only fit by int64 wrap-around is refused on load."""
    big = 2**63 - 1
    tree = mt.RoutingTree(3, 4, max_depth=3, mode="prefix")
    tree.update(torch.tensor([[0, 1, 2]]), torch.tensor([1.0], dtype=torch.float64))
    sd = tree.state_dict()
    sd["count"] = torch.full_like(sd["count"], big)
    sd["num_tokens"] = torch.tensor([big])
    crafted = mt.RoutingTree(3, 4, max_depth=3, mode="prefix")
    crafted.load_state_dict(sd)                      # consistent: loads
    before = _snapshot(crafted)
    with pytest.raises(ValueError, match="2\\^63"):
        crafted.update(torch.tensor([[0, 1, 2]]))
    assert_tables_equal(before[0], crafted.to_table(), rtol=0)
    assert before[1:] == _snapshot(crafted)[1:]
    crafted.save(tmp_path / "t.safetensors")         # still a valid tree
    assert mt.RoutingTree.load(tmp_path / "t.safetensors").stats(0, (0, 1, 2))["count"] == big

    # the op on the same arrays saturates instead of wrapping
    ops = mt.routing._ops()
    keys = ("parent", "expert", "count", "reward_sum", "first_seen", "last_seen")
    out = ops.routing_update(*(crafted._arrays[k] for k in keys), crafted._level_sizes,
                             torch.tensor([[0, 1, 2]]), torch.zeros(1, dtype=torch.float64), 1, 3, 4, False)
    assert out[2].tolist() == [big, big, big]

    # two children of 2^62 under a parent of 2^63-1: their sum (2^63) wraps in int64, refused
    tree = mt.RoutingTree(2, 4, max_depth=2, mode="prefix")
    tree.update(torch.tensor([[0, 1], [0, 2]]))
    sd = tree.state_dict()
    assert sd["level_sizes"].tolist() == [1, 2]
    sd["count"] = torch.tensor([big, 2**62, 2**62])
    sd["num_tokens"] = torch.tensor([big])
    with pytest.raises(ValueError, match="children count more tokens"):
        mt.RoutingTree(2, 4, max_depth=2, mode="prefix").load_state_dict(sd)
    # the same at the roots: two start layers' worth within one root would pass num_tokens
    tree = mt.RoutingTree(2, 4, max_depth=1, mode="prefix")
    tree.update(torch.tensor([[0, 1], [1, 2]]))
    sd = tree.state_dict()
    sd["count"] = torch.tensor([2**62, 2**62])
    sd["num_tokens"] = torch.tensor([big])
    with pytest.raises(ValueError, match="num_tokens"):
        mt.RoutingTree(2, 4, max_depth=1, mode="prefix").load_state_dict(sd)


def test_routing_path_none_and_meta_tensors_named(tmp_path):
    """Issue 28: RoutingTree.load(None) / save(None) raised os.fspath's TypeError without naming
    `path`; meta tensors reached NotImplementedError instead of a TypeError naming the argument."""
    tree = mt.RoutingTree(3, 4, max_depth=3)
    tree.update(torch.tensor([[0, 1, 2]]))
    for call in (lambda: tree.save(None), lambda: mt.RoutingTree.load(None), lambda: mt.RoutingTree.load(7)):
        with pytest.raises(TypeError, match="path"):
            call()
    meta = torch.device("meta")
    before = _snapshot(tree)
    calls = [
        ("paths", lambda: tree.update(torch.zeros(2, 3, dtype=torch.long, device=meta))),
        ("rewards", lambda: tree.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, device=meta))),
        ("count", lambda: tree.load_state_dict(dict(tree.state_dict(),
                                                    count=tree.state_dict()["count"].to(meta)))),
        ("experts", lambda: tree.stats(0, torch.zeros(2, dtype=torch.long, device=meta))),
    ]
    for word, call in calls:
        with pytest.raises(TypeError, match=f"{word} is a meta tensor"):
            call()
    assert_tables_equal(before[0], tree.to_table(), rtol=0)
    with pytest.raises(ValueError, match="meta"):
        mt.RoutingTree(3, 4, device="meta")
    with pytest.raises(ValueError, match="meta"):
        tree.to("meta")
    tree.save(tmp_path / "r.safetensors")
    assert mt.RoutingTree.load(str(tmp_path / "r.safetensors")).num_nodes == tree.num_nodes
