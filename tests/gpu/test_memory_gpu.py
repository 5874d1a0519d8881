"""TraceMemory on CUDA: the Triton update against the CPU path (itself checked against the
float64 reference) at larger sizes, against the reference directly, and determinism."""
import random

import pytest
import torch
from _helpers import assert_state_equal, candidates_of, fake_capture, params_of

import memtrace as mt
from memtrace.reference import trace_update

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_edges(g, L, H, T, C, values):
    """Unique random candidate edges per layer: [L, C] tensors, values from a small set (ties)."""
    cells = H * T * T
    idx = torch.stack([torch.randperm(cells, generator=g)[:C] for _ in range(L)])
    head, rest = idx // (T * T), idx % (T * T)
    vals = torch.tensor(values)
    S = vals[torch.randint(0, len(values), (L, C), generator=g)]
    a = torch.tensor([0.0, 5e-4, 0.3, 0.9])[torch.randint(0, 4, (L, C), generator=g)]
    return head.int(), (rest // T).int(), (rest % T).int(), S, a


def _pair(**kw):
    cpu = mt.TraceMemory(**kw)
    gpu = mt.TraceMemory(**kw, device="cuda")
    assert gpu._resolved_backend() == "triton"
    return cpu, gpu


def _assert_same(cpu, gpu):
    assert torch.equal(gpu.meta.cpu(), cpu.meta)
    torch.testing.assert_close(gpu.strength.cpu(), cpu.strength, rtol=1e-6, atol=0)


@pytest.mark.parametrize("quota,T,C", [(16, 24, 600), (128, 64, 3000), (700, 96, 9000)])
def test_triton_matches_cpu_path_batched(quota, T, C):
    L, H = 4, 6
    cpu, gpu = _pair(num_layers=L, num_heads=H, quota=quota, retention=0.7, decay=0.8, threshold=0.05,
                     prune_eps=0.02, window=5, max_seq_len=T)
    g = torch.Generator().manual_seed(quota)
    for step in range(12):
        head, q, k, S, a = random_edges(g, L, H, T, C, (0.01, 0.2, 0.2, 0.5, 1.0, 3.0))
        n = torch.randint(C // 2, C + 1, (L,), generator=g).int()
        layers = [0, 1, 2, 3] if step % 3 else [3, 1]
        sel = torch.tensor(layers)
        args = (head[sel], q[sel], k[sel], S[sel], a[sel])
        cpu.update_edges(layers, *args, num_edges=n[sel])
        gpu.update_edges(layers, *(t.cuda() for t in args), num_edges=n[sel].cuda())
        _assert_same(cpu, gpu)
        # direct slot scores (what a bias from bias(layer) gets scored with)
        tS = torch.rand(len(layers), H, quota, generator=g)
        tA = torch.rand(len(layers), H, quota, generator=g)
        cpu.update_edges(layers, *args, num_edges=n[sel], trace_salience=tS, trace_attn=tA)
        gpu.update_edges(layers, *(t.cuda() for t in args), num_edges=n[sel].cuda(),
                         trace_salience=tS.cuda(), trace_attn=tA.cuda())
        _assert_same(cpu, gpu)
    assert gpu.num_traces() > 0


def test_triton_matches_reference_directly():
    mem = mt.TraceMemory(1, 3, quota=5, retention=0.6, decay=0.7, threshold=0.05, prune_eps=0.02, window=3,
                         max_seq_len=10, device="cuda")
    rng = random.Random(4)
    ref = mt.reference.empty_state()
    for step in range(30):
        coords = sorted({(rng.randrange(3), rng.randrange(10), rng.randrange(10)) for _ in range(rng.randint(0, 30))})
        S = torch.zeros(3, 10, 10)
        a = torch.zeros(3, 10, 10)
        for c in coords:
            S[c] = rng.choice([0.1, 0.4, 0.4, 1.0])
            a[c] = rng.choice([0.0, 0.5])
        cand = candidates_of(S, a, coords)
        mem.update(0, fake_capture(tuple(t.cuda() for t in cand), num_heads=3, seq_len=10))
        ref = trace_update(ref, cand, **params_of(mem))
        got = {k: v.cpu() for k, v in mem.reference_state(0).items()}
        assert_state_equal(got, ref, f"step {step}")


def test_full_size_quota_2048_matches_torch_path_on_gpu():
    L, H, Q, T, C = 2, 8, 2048, 512, 40000
    tri = mt.TraceMemory(L, H, quota=Q, max_seq_len=T, device="cuda")
    tor = mt.TraceMemory(L, H, quota=Q, max_seq_len=T, device="cuda")
    tor.backend = "torch"
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        head, q, k, S, a = (t.cuda() for t in random_edges(g, L, H, T, C, (0.06, 0.1, 0.5, 1.0, 2.0)))
        tri.update_edges([0, 1], head, q, k, S, a)
        tor.update_edges([0, 1], head, q, k, S, a)
        assert torch.equal(tri.meta, tor.meta)
        torch.testing.assert_close(tri.strength, tor.strength, rtol=1e-6, atol=0)
    assert tri.num_traces() == L * H * Q          # slabs full: eviction ran every step


def test_deterministic():
    def run():
        mem = mt.TraceMemory(3, 4, quota=64, max_seq_len=64, device="cuda")
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            head, q, k, S, a = (t.cuda() for t in random_edges(g, 3, 4, 64, 2000, (0.1, 0.2, 0.2, 1.0)))
            mem.update_edges([0, 1, 2], head, q, k, S, a)
        return mem.strength.clone(), mem.meta.clone()

    first = run()
    for _ in range(2):
        again = run()
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_bias_and_update_stay_on_device():
    mem = mt.TraceMemory(2, 2, quota=8, max_seq_len=32, device="cuda")
    mem.update(0, fake_capture(tuple(torch.tensor(t).cuda() for t in ([0, 1], [3, 4], [5, 6], [1.0, 2.0], [0.5, 0.5])),
                               num_heads=2, seq_len=32))
    edges = tuple(torch.tensor(t).cuda() for t in ([0], [7], [7], [1.0], [0.5]))
    cap = fake_capture(edges, num_heads=2, seq_len=32)
    scores = (torch.rand(2 * 8, device="cuda"), torch.rand(2 * 8, device="cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cap.bias, cap.bias_scores = mem.bias(0), scores
        mem.update(0, cap, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert mem.num_traces(0) >= 2


def test_cached_workspaces_and_fast_launches_across_streams_and_shapes():
    """The update keeps its scratch buffers per (stream, shape) and relaunches its kernels without
    Triton's dispatch (kernels/launch.py): two memories updated in turn on two streams, with the
    shapes changing between steps and inputs at varying alignments, stay equal to the CPU path."""
    kw = dict(num_layers=3, num_heads=4, quota=32, retention=0.7, decay=0.8, threshold=0.05, prune_eps=0.02,
              window=4, max_seq_len=40)
    pairs = [_pair(**kw), _pair(**kw)]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    g = torch.Generator().manual_seed(7)
    for step in range(10):
        for (cpu, gpu), stream in zip(pairs, streams):
            C = (500, 777)[step % 2]
            head, q, k, S, a = random_edges(g, 3, 4, 40, C, (0.01, 0.2, 0.5, 1.0, 3.0))
            layers = [0, 1, 2] if step % 3 else [2, 0]
            sel = torch.tensor(layers)
            args = [t[sel] for t in (head, q, k, S, a)]
            cpu.update_edges(layers, *args)
            off = step % 3          # contiguous inputs that start 0, 4 or 8 bytes into their storage
            dev = [t.new_zeros(off + t.numel()).cuda()[off:].view(t.shape).copy_(t) for t in args]
            assert all(d.is_contiguous() for d in dev) and (dev[0].data_ptr() % 16 == 0) == (off == 0)
            with torch.cuda.stream(stream):
                gpu.update_edges(layers, *dev)
            torch.cuda.synchronize()
            _assert_same(cpu, gpu)

