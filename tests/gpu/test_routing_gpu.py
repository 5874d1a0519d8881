"""CUDA routing trie == CPU routing trie (tables, stats, candidates) on large random inputs."""
import pytest
import torch

import memtrace as mt
from memtrace.reference.routing import RoutingTree as RefTree

pytestmark = pytest.mark.gpu
KEYS = ("start_layer", "depth", "experts", "count", "reward_sum", "first_seen", "last_seen")


def zipf_paths(n, num_layers, num_experts, *, cut=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** 1.1
    ranks = torch.multinomial(p / p.sum(), n * num_layers, replacement=True, generator=g).view(n, num_layers)
    perms = torch.stack([torch.randperm(num_experts, generator=g) for _ in range(num_layers)])
    paths = torch.gather(perms.T, 0, ranks)
    paths[torch.rand(n, num_layers, generator=g) < cut] = -1
    return paths, torch.randn(n, generator=g)


def assert_same(a, b):
    for k in KEYS:
        x, y = a[k].cpu(), b[k].cpu()
        if k == "reward_sum":
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)
        else:
            assert torch.equal(x, y), k


@pytest.mark.parametrize("num_experts", [8, 64])
@pytest.mark.parametrize("mode,max_depth", [("prefix", 32), ("suffix", 8)])
def test_cuda_table_equals_cpu(num_experts, mode, max_depth):
    n = 100_000 if mode == "prefix" else 40_000
    cpu = mt.RoutingTree(32, num_experts, max_depth=max_depth, mode=mode)
    gpu = mt.RoutingTree(32, num_experts, max_depth=max_depth, mode=mode, device="cuda")
    for u, step in enumerate((0, 3, 3, 10)):
        paths, rewards = zipf_paths(n // (u + 1), 32, num_experts, seed=num_experts + u)
        dtype = torch.int32 if u % 2 else torch.int64
        cpu.update(paths.to(dtype), rewards, step)
        gpu.update(paths.to(dtype).cuda(), rewards.cuda(), step)
    assert gpu.num_nodes == cpu.num_nodes and gpu.nbytes == cpu.nbytes
    assert_same(gpu.to_table(), cpu.to_table())
    assert gpu.global_mean_reward == pytest.approx(cpu.global_mean_reward, rel=1e-9, abs=1e-12)
    crit = dict(min_frequency=50, min_utility=-0.5, max_entropy=20.0, min_length=2, max_length=6)
    cg, cc = gpu.candidates(**crit), cpu.candidates(**crit)
    assert [(m.start_layer, m.experts, m.count, m.age) for m in cg] == \
        [(m.start_layer, m.experts, m.count, m.age) for m in cc]
    for a, b in zip(cg, cc):
        assert a.utility == pytest.approx(b.utility, rel=1e-6, abs=1e-9)
        assert a.entropy == pytest.approx(b.entropy, rel=1e-9, abs=1e-12)
    if cc:
        m = cc[len(cc) // 2]
        sg, sc = gpu.stats(m.start_layer, m.experts), cpu.stats(m.start_layer, m.experts)
        for k in sc:
            assert sg[k] == pytest.approx(sc[k], rel=1e-6, abs=1e-9), k


@pytest.mark.parametrize("mode", ["prefix", "suffix"])
def test_cuda_matches_reference_small(mode):
    ref = RefTree(7, 5, 4, mode)
    gpu = mt.RoutingTree(7, 5, max_depth=4, mode=mode, device="cuda")
    for u, step in enumerate((1, 2, 9)):
        paths, rewards = zipf_paths(300, 7, 5, cut=0.1, seed=u)
        ref.update(paths, rewards, step)
        gpu.update(paths.cuda(), rewards.cuda(), step)
    assert_same(gpu.to_table(), ref.to_table())


def test_cuda_bad_input_and_persistence(tmp_path):
    gpu = mt.RoutingTree(6, 4, max_depth=4, mode="suffix", device="cuda")
    paths, rewards = zipf_paths(1000, 6, 4)
    gpu.update(paths.cuda(), rewards.cuda(), 1)
    before = gpu.to_table()
    with pytest.raises(ValueError, match="paths"):
        gpu.update(paths, None, 2)  # CPU paths, CUDA tree
    with pytest.raises(ValueError, match="rewards"):
        gpu.update(paths.cuda(), rewards, 2)
    bad = paths.cuda().clone()
    bad[0, 0] = 4
    with pytest.raises(ValueError, match="paths"):
        gpu.update(bad, None, 2)
    assert_same(before, gpu.to_table())
    gpu.save(tmp_path / "t.safetensors")
    back = mt.RoutingTree.load(tmp_path / "t.safetensors")  # onto the CPU
    assert back.device.type == "cpu"
    assert_same(before, back.to_table())
    again = back.to("cuda")
    again.update(paths.cuda(), rewards.cuda(), 5)
    gpu.update(paths.cuda(), rewards.cuda(), 5)
    assert_same(gpu.to_table(), again.to_table())


# ---- issue 28 ------------------------------------------------------------------------------------

_TRIE_KEYS = ("parent", "expert", "count", "reward_sum", "first_seen", "last_seen")


def _empty_trie_cuda():
    return tuple(torch.zeros(0, dtype=dt, device="cuda")
                 for dt in (torch.int32, torch.int16, torch.int64, torch.float64, torch.int32, torch.int32))


@pytest.mark.parametrize("bad", [4, 7, 100, 10**8, -2, -(10**8)])
def test_cuda_op_rejects_expert_ids_out_of_range(bad):
    """Issue 28.7 on CUDA: the op counts ids outside [-1, num_experts) into a device flag read with
    the depth-1 item count (no extra sync) and raises ValueError before any kernel indexes with
    them; the CUDA context stays usable."""
    ops = mt.routing._ops()
    paths = torch.full((40, 2), bad, device="cuda")
    paths[::3, 1] = 1
    rewards = torch.zeros(40, dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match=r"expert ids in \[0, 4\)"):
        ops.routing_update(*_empty_trie_cuda(), [], paths, rewards, 0, 8, 4, True)
    torch.cuda.synchronize()          # no sticky CUDA error
    good = torch.tensor([[0, 1], [-1, 3]], device="cuda")
    zero = torch.zeros(2, dtype=torch.float64, device="cuda")
    out = ops.routing_update(*_empty_trie_cuda(), [], good, zero, 0, 8, 4, True)
    cpu = ops.routing_update(*(t.cpu() for t in _empty_trie_cuda()), [], good.cpu(),
                             torch.zeros(2, dtype=torch.float64), 0, 8, 4, True)
    for a, b in zip(out, cpu):
        assert torch.equal(a.cpu(), b)


def test_cuda_op_rejects_bad_trie_arrays_and_saturates_counts():
    """Trie arrays that break the invariants are refused (CPU and CUDA alike); counts near 2^63
    saturate instead of wrapping."""
    ops = mt.routing._ops()
    tree = mt.RoutingTree(2, 4, max_depth=2, mode="prefix", device="cuda")
    tree.update(torch.tensor([[0, 1], [2, 3]], device="cuda"))
    arrays = {k: t.clone() for k, t in tree._arrays.items()}
    paths = torch.tensor([[0, 1]], device="cuda")
    rewards = torch.zeros(1, dtype=torch.float64, device="cuda")
    for key, index, value in (("parent", 2, 5), ("parent", 0, 3), ("expert", 1, 9), ("expert", 0, -1),
                              ("count", 3, -1), ("expert", 0, 2)):
        bad = dict(arrays)
        bad[key] = arrays[key].clone()
        bad[key][index] = value
        for dev in ("cuda", "cpu"):
            with pytest.raises(ValueError, match="routing_update"):
                ops.routing_update(*(bad[k].to(dev) for k in _TRIE_KEYS), tree._level_sizes, paths.to(dev),
                                   rewards.to(dev), 1, 2, 4, False)
    torch.cuda.synchronize()
    big = 2**63 - 1
    sat = dict(arrays, count=torch.full_like(arrays["count"], big))
    out = ops.routing_update(*(sat[k] for k in _TRIE_KEYS), tree._level_sizes, paths, rewards, 1, 2, 4, False)
    assert out[2].cpu().tolist() == [big, big, big, big]


def test_cuda_op_zero_layer_paths_and_level_below_an_empty_one():
    """Paths [N, 0] in prefix mode start no sub-path (the seed kernel read layer 0 of an empty
    tensor); level sizes [0, 1] are refused with ValueError (the key kernel read the empty previous
    level's remap before the check). The context stays usable."""
    ops = mt.routing._ops()
    for suffix in (False, True):
        out = ops.routing_update(*_empty_trie_cuda(), [], torch.zeros((3, 0), dtype=torch.int64, device="cuda"),
                                 torch.zeros(3, dtype=torch.float64, device="cuda"), 0, 4, 4, suffix)
        assert sum(t.numel() for t in out) == 0
    arrays = tuple(torch.tensor([v], dtype=dt, device="cuda")
                   for v, dt in ((0, torch.int32), (0, torch.int16), (1, torch.int64), (0.0, torch.float64),
                                 (0, torch.int32), (0, torch.int32)))
    with pytest.raises(ValueError, match="routing_update"):
        ops.routing_update(*arrays, [0, 1], torch.tensor([[0, 1]], device="cuda"),
                           torch.zeros(1, dtype=torch.float64, device="cuda"), 1, 2, 4, False)
    torch.cuda.synchronize()
