"""mt.nn.StatefulRouter's fused route (kernels/router.py, interpreted): against the float64 reference
SR.stateful_route over several calls (indices, weights, state), against the PyTorch path (outputs,
state, gradients), balance, units= given, ties (lowest index), dispatch, no host sync in forward
(structure), bad input, and the sm_90 compile of both kernels."""
import os
import sys
from pathlib import Path

import pytest
import torch
from _helpers import TOL, rel_err

import memtrace as mt
from memtrace.reference import stateful_router as SR

INTERP = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                            reason="needs TRITON_INTERPRET=1 (the Triton kernels on CPU)")
D = 20          # over one 16-wide column block: the kernel's D loop runs twice
N = 21          # over one 16-token block, not a multiple of it
KW = {"alpha": 0.7, "beta": 0.5, "gamma": 0.1, "decay": 0.3}


def _pair(U, k, dtype=torch.float32, seed=0, **kw):
    """The same router twice: fused (backend triton) and PyTorch."""
    torch.manual_seed(seed)
    kw = {**KW, **kw}
    fused = mt.nn.StatefulRouter(D, U, k, backend="triton", dtype=dtype, **kw)
    ref = mt.nn.StatefulRouter(D, U, k, backend="torch", dtype=dtype, **kw)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


def _launches(monkeypatch):
    """Count the calls of the fused route (the kernels still run)."""
    from memtrace.kernels import router as KR
    calls = []
    route = KR.route
    monkeypatch.setattr(KR, "route", lambda *a, **k: calls.append(1) or route(*a, **k))
    return calls


@INTERP
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("balance", [0.0, 0.4])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("U", [8, 6, 64])
def test_fused_matches_reference_over_calls(dtype, U, k, balance, monkeypatch):
    calls = _launches(monkeypatch)
    r, _ = _pair(U, k, dtype, balance=balance, entropy_threshold=1.0)
    t_last, n_act = torch.full((U,), -1, dtype=torch.int64), torch.zeros(U, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for t in range(3):
        x = torch.randn(N, D, generator=g).to(dtype)
        with torch.no_grad():
            w, idx = r(x)
        # the oracle on the same (rounded) inputs: the kernel's fp32 scores are within ~1e-6 of it
        rw, ridx, t_last, n_act = SR.stateful_route(x.double(), r.units.detach().double(), t, t_last, n_act, k,
                                                    balance=balance, **KW)
        assert torch.equal(idx, ridx)
        assert w.dtype == dtype and rel_err(w, rw) < TOL[dtype]
        assert torch.equal(r.t_last, t_last) and torch.equal(r.n_act.double(), n_act)
        h = SR.selection_entropy(ridx, U)
        assert abs(float(r.selection_entropy) - float(h)) < 1e-6
        assert bool(r.entropy_alert) == bool(h < 1.0)
        assert int(r.t) == t + 1 and not r.route_counts.any()
    assert len(calls) == 3


@INTERP
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_matches_torch_path(dtype):
    """Same indices, weights within the dtype's tolerance, same state, call after call (at fp16 the
    PyTorch path rounds R to fp16: these inputs have no near-ties at that rounding)."""
    r, t = _pair(8, 2, dtype, balance=0.3, entropy_threshold=1.5)
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        x = torch.randn(N, D, generator=g).to(dtype)
        with torch.no_grad():
            (w, idx), (tw, tidx) = r(x), t(x)
        assert torch.equal(idx, tidx)
        assert rel_err(w, tw) < TOL[dtype]
        for name in ("t", "t_last", "n_act", "entropy_alert"):
            assert torch.equal(getattr(r, name), getattr(t, name)), name
        assert torch.allclose(r.selection_entropy, t.selection_entropy, atol=1e-6)


@INTERP
@pytest.mark.parametrize("given", [False, True])
def test_fused_gradients_match_torch_path(given):
    r, t = _pair(6, 3, balance=0.4)
    g = torch.Generator().manual_seed(3)
    history = torch.randn(9, D, generator=g)
    r(history)
    t(history)                                                  # some state: every term is live
    x = torch.randn(N, D, generator=g)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    if given:           # e.g. a CMS level's keys, a separate leaf
        u = torch.randn(6, D, generator=g)
        us = [u.clone().requires_grad_(), u.clone().requires_grad_()]
        (w, idx), (tw, tidx) = r(xs[0], units=us[0]), t(xs[1], units=us[1])
    else:
        (w, idx), (tw, tidx) = r(xs[0]), t(xs[1])
        us = [r.units, t.units]
    assert w.requires_grad and torch.equal(idx, tidx)
    dw = torch.randn(w.shape, generator=g)
    (w * dw).sum().backward()
    (tw * dw).sum().backward()
    assert rel_err(xs[0].grad, xs[1].grad) < 1e-5
    assert rel_err(us[0].grad, us[1].grad) < 1e-5
    assert us[0].grad.abs().sum() > 0
    for name in ("t", "t_last", "n_act"):
        assert torch.equal(getattr(r, name), getattr(t, name)), name


@INTERP
def test_fused_gradient_units_only_fp16_against_reference():
    """units needing grad while x does not (a frozen input), fp16: against float64 autograd through
    the oracle on the same rounded inputs (the PyTorch path's fp16-rounded scores pick another unit
    at a near-tie of these inputs, row 14: 0.1338 vs 0.1337)."""
    r, _ = _pair(8, 2, torch.float16)
    x = torch.randn(N, D).half()
    w, idx = r(x)
    dw = torch.randn(w.shape).half()
    (w * dw).sum().backward()
    ur = r.units.detach().double().requires_grad_()
    rw, ridx, _, _ = SR.stateful_route(x.double(), ur, 0, torch.full((8,), -1), torch.zeros(8, dtype=torch.float64),
                                       2, **KW)
    (gu,) = torch.autograd.grad((rw * dw.double()).sum(), [ur])
    assert torch.equal(idx, ridx)
    assert r.units.grad.dtype == torch.float16 and rel_err(r.units.grad, gu) < TOL[torch.float16]


@INTERP
def test_fused_units_given_other_dtype_against_reference():
    """units= fp32 for fp16 x: cast to x's dtype as the PyTorch path does; the module's own units unused."""
    r, _ = _pair(6, 2, torch.float16)
    g = torch.Generator().manual_seed(4)
    slots = torch.randn(12, D, generator=g)[::2]          # strided rows
    x = torch.randn(N, D, generator=g).half()
    with torch.no_grad():
        w, idx = r(x, units=slots)
    rw, ridx, _, _ = SR.stateful_route(x.double(), slots.half().double(), 0, torch.full((6,), -1),
                                       torch.zeros(6, dtype=torch.float64), 2, **KW)
    assert torch.equal(idx, ridx) and rel_err(w, rw) < TOL[torch.float16]


@INTERP
def test_fused_ties_go_to_lowest_index():
    """Exact ties: the lowest unit index wins (torch.topk promises no order among ties)."""
    r = mt.nn.StatefulRouter(D, 6, 3, alpha=0.0, backend="triton")
    with torch.no_grad():
        w, idx = r(torch.randn(5, D))
    assert idx.tolist() == [[0, 1, 2]] * 5
    assert torch.allclose(w, torch.full_like(w, 1 / 3))
    assert r.t_last.tolist() == [0, 0, 0, -1, -1, -1]
    r = mt.nn.StatefulRouter(D, 6, 2, alpha=0.0, gamma=1.0, backend="triton", update_state=False)
    with torch.no_grad():
        r.n_act.copy_(torch.tensor([0.0, 3, 1, 3, 0, 3]))     # three units tie at the top
        _, idx = r(torch.randn(4, D))
    assert idx.tolist() == [[1, 3]] * 4


@INTERP
def test_fused_update_state_false_and_empty_batch():
    r, t = _pair(8, 2, update_state=False)
    x = torch.randn(N, D)
    with torch.no_grad():
        a, b = r(x), r(x)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert int(r.t) == 0 and (r.t_last == -1).all() and not r.n_act.any() and not r.route_counts.any()
    r, t = _pair(8, 2)
    with torch.no_grad():
        (w, idx), (tw, tidx) = r(torch.zeros(0, D)), t(torch.zeros(0, D))
    assert w.shape == tw.shape == (0, 2) and idx.shape == tidx.shape == (0, 2)
    for name in ("t", "t_last", "n_act", "selection_entropy"):
        assert torch.equal(getattr(r, name), getattr(t, name)), name


@INTERP
def test_dispatch(monkeypatch):
    calls = _launches(monkeypatch)
    x = torch.randn(4, D)
    mt.nn.StatefulRouter(D, 8, 2)(x)                               # auto on the CPU: PyTorch
    mt.nn.StatefulRouter(D, 8, 2, backend="torch")(x)
    mt.nn.StatefulRouter(D, 8, 2, backend="triton", num_domains=2)(x)
    mt.nn.StatefulRouter(D, 8, 2, backend="triton", dtype=torch.float64)(x.double())
    from memtrace.kernels import router as KR
    mt.nn.StatefulRouter(D, KR.MAX_UNITS + 1, 2, backend="triton")(x)
    drop = mt.nn.StatefulRouter(D, 8, 2, backend="triton", dropout=0.5)
    drop.train()
    drop(x)
    assert calls == []
    drop.eval()                                                      # dropout acts in training only
    drop(x)
    mt.nn.StatefulRouter(D, 8, 2, backend="triton", dtype=torch.float64)(x)   # fp32 x, fp64 units: PyTorch
    assert len(calls) == 1
    mt.nn.StatefulRouter(D, 8, 2, backend="triton")(x, units=torch.randn(8, D, dtype=torch.bfloat16))
    assert len(calls) == 2


def test_fused_forward_has_no_host_sync(monkeypatch):
    """Structure: no tensor -> host conversion runs in the fused path's Python (module and
    launchers, with and without grad); the launches themselves are stubbed (the interpreter copies
    tensors to numpy). The state reaches the kernels as tensors, never as host numbers."""
    from memtrace.kernels import router as KR
    launched = []

    class Stub:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(self.name)
                assert all(isinstance(a, (torch.Tensor, int, float)) for a in args)
                n_tensors = 9 if self.name == "route" else 6
                assert all(isinstance(a, torch.Tensor) for a in args[:n_tensors])
            return launch

    monkeypatch.setattr(KR, "_ROUTE", Stub("route"))
    monkeypatch.setattr(KR, "_UPDATE", Stub("update"))
    r = mt.nn.StatefulRouter(6, 16, 2, beta=0.2, gamma=0.1, balance=0.3, dropout=0.2, entropy_threshold=0.5,
                             backend="triton")
    r.eval()
    x = torch.randn(8, 6, requires_grad=True)

    def boom(*a, **k):
        raise AssertionError("host sync in forward")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    r(x)
    with torch.no_grad():
        r(x, units=torch.randn(16, 6))
    assert launched == ["route", "update"] * 2


@INTERP
def test_fused_bad_input_leaves_state():
    r = mt.nn.StatefulRouter(4, 8, 2, backend="triton")
    with pytest.raises(ValueError, match="x must have shape"):
        r(torch.randn(3, 5))
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        r(torch.randn(3))
    with pytest.raises(ValueError, match="units must have shape"):
        r(torch.randn(3, 4), units=torch.randn(7, 4))
    assert int(r.t) == 0 and (r.t_last == -1).all() and not r.route_counts.any()
    with pytest.raises(ValueError, match="backend must be one of"):
        mt.nn.StatefulRouter(4, 8, 2, backend="cuda")


def test_router_config_from_environment(memtrace_env):
    from memtrace import config
    memtrace_env.set("MEMTRACE_ROUTER_CONFIG", "128,64,8,2")
    assert config.settings().kernels.router_config == (128, 64, 8, 2)
    with pytest.raises(ValueError, match="router_config"):
        memtrace_env.set("MEMTRACE_ROUTER_CONFIG", "128,64,6,2")       # 6 warps
    with pytest.raises(ValueError, match="MEMTRACE_ROUTER_CONFIG"):
        memtrace_env.set("MEMTRACE_ROUTER_CONFIG", "128,x")


# ---- sm_90 compile (real Triton frontend + ptxas, no GPU), as tests/kernels/test_kernels_compile.py --

COMPILE_CASES = [  # (dtype, U, k, balance): the benchmark's gate (bf16, 8 and 64 units), fp32, the limit
    ("bfloat16", 64, 2, 0.0), ("bfloat16", 8, 2, 0.0), ("float32", 6, 3, 0.5), ("float16", 256, 2, 0.0)]


def test_router_kernels_compile_for_h100(tmp_path):
    import _sm90
    kernels = _sm90.run_compile_worker(__file__, tmp_path)
    routes = [x for x in kernels if x["kernel"] == "_route_kernel"]
    assert len(routes) == len(COMPILE_CASES)
    assert sum(x["kernel"] == "_update_kernel" for x in kernels) >= 1
    for x in kernels:
        assert "cubin" in x["stages"], x
    for x in routes:        # the score tile stays in registers at the gate's sizes
        if x["constexprs"]["BU"] <= 64:
            assert x.get("stack_bytes", 0) == 0, x


def _compile_worker(report_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # tests/: _sm90
    import _sm90

    def launch():
        from memtrace.kernels import router as KR
        for dtype, U, k, balance in COMPILE_CASES:
            dt = getattr(torch, dtype)
            x, units = torch.randn(256, 1024).to(dt), torch.randn(U, 1024).to(dt)
            t, t_last, n_act = torch.zeros((), dtype=torch.int64), torch.full((U,), -1), torch.zeros(U)
            counts = torch.zeros(U, dtype=torch.int32)
            KR.route(x, units, t, t_last, n_act, torch.ones(U), k, counts, alpha=1.0, beta=0.5, gamma=0.1,
                     balance=balance)
            KR.update_state(counts, t, t_last, n_act, torch.zeros(()), torch.zeros((), dtype=torch.bool),
                            threshold=0.5 if balance else None)

    _sm90.compile_report(report_path, launch)


if __name__ == "__main__":
    _compile_worker(sys.argv[1])
