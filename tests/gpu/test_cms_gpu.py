"""CUDA checks of mt.nn.CMSMemory (Triton scan at the seed's level sizes against the float64
reference) and of mt.nn.StatefulRouter (no host sync in forward, under torch.cuda sync debug)."""
import pytest
import torch
from _helpers import rel_err

import memtrace as mt
from memtrace.reference import cms as R

LEVELS = [(64, 64, 0.1), (256, 128, 0.05), (1024, 256, 0.01)]


@pytest.mark.parametrize("addressing", ["content", "lru", "hybrid"])
def test_cms_triton_matches_reference_seed_sizes(addressing):
    torch.manual_seed(0)
    m = mt.nn.CMSMemory(128, LEVELS, 64, addressing, backend="triton").cuda()
    x = torch.randn(2, 48, 128, device="cuda", requires_grad=True)
    out, st = m(x)
    p = {n: t.detach().double().requires_grad_() for n, t in m.named_parameters()}
    ref, rst = R.cms(x.detach().double(), p, m.levels, addressing=addressing)
    assert rel_err(out, ref) < 1e-4
    dout = torch.randn_like(out)
    (out * dout).sum().backward()
    grads = torch.autograd.grad((ref * dout.double()).sum(), list(p.values()), allow_unused=True)
    params = dict(m.named_parameters())
    for (n, _), gr in zip(p.items(), grads):
        if gr is not None:
            assert rel_err(params[n].grad, gr, 1e-3) < 1e-3, n


def test_router_forward_has_no_host_sync():
    r = mt.nn.StatefulRouter(256, 64, 2, beta=0.2, gamma=0.1, balance=0.3, dropout=0.1, num_domains=8, domain_k=2,
                             entropy_threshold=0.5, device="cuda")
    x = torch.randn(16384, 256, device="cuda")
    r.train()
    r(x)                                   # warm-up (allocator, kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            r(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_router_fused_gate_matches_reference_without_host_sync():
    """The fused route (kernels/router.py) at the benchmark's gate size, bf16: the oracle on the
    same bf16 inputs, then no host sync over calls with and without grad."""
    from memtrace.reference import stateful_router as SR
    torch.manual_seed(0)
    r = mt.nn.StatefulRouter(1024, 64, 2, beta=0.5, gamma=0.1, balance=0.3, entropy_threshold=0.5, device="cuda",
                             dtype=torch.bfloat16)
    x = torch.randn(16384, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        w, idx = r(x)
    rw, ridx, _, _ = SR.stateful_route(x.double(), r.units.detach().double(), 0, torch.full_like(r.t_last, -1),
                                       torch.zeros(64, dtype=torch.float64, device="cuda"), 2,
                                       beta=0.5, gamma=0.1, balance=0.3)
    same = (idx == ridx).all(-1)
    assert same.float().mean() > 0.999          # fp32 accumulation order vs float64: only near-ties may differ
    assert rel_err(w[same], rw[same]) < 1e-2
    assert int(r.n_act.sum()) == 2 * 16384 and int(r.t) == 1
    xg = x.clone().requires_grad_()
    r(xg)[0].sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            with torch.no_grad():
                r(x)
            r(xg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
