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
