"""mt.nn.StatefulRouter (SPEC 14): against memtrace/reference/stateful_router.py over several calls
(state included), Theorem 1 (beta = gamma = 0 is a linear top-k gate), gradients, the options
(load balancing, unit dropout, hierarchical routing, entropy monitor), MoE-gate and CMS-slot use,
no host sync in forward (structure: no .item()/.tolist()/bool() reaches the host), bad input."""
import warnings

import pytest
import torch
from _helpers import rel_err

import memtrace as mt
from memtrace.reference import stateful_router as SR


def _router(**kw):
    torch.manual_seed(0)
    kw = {"alpha": 0.7, "beta": 0.2, "gamma": 0.1, "decay": 0.3, **kw}
    return mt.nn.StatefulRouter(6, 8, 3, dtype=torch.float64, **kw)


@pytest.mark.parametrize("kw", [{}, {"balance": 0.5}, {"num_domains": 4, "domain_k": 2}])
def test_matches_reference_over_calls(kw):
    r = _router(**kw)
    t_last, n_act = torch.full((8,), -1, dtype=torch.int64), torch.zeros(8, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    for t in range(5):
        x = torch.randn(10, 6, generator=g, dtype=torch.float64)
        w, idx = r(x)
        extra = {}
        if "num_domains" in kw:
            extra = {"domains": r.domains, "domain_scores": r.domain_router(x).detach(), "domain_k": 2}
        rw, ridx, t_last, n_act = SR.stateful_route(x, r.units.detach(), t, t_last, n_act, 3, alpha=0.7, beta=0.2,
                                                    gamma=0.1, decay=0.3, balance=kw.get("balance", 0.0), **extra)
        assert torch.equal(idx, ridx)
        assert rel_err(w, rw) < 1e-12
        assert torch.equal(r.t_last, t_last) and torch.equal(r.n_act.double(), n_act)
    assert int(r.t) == 5


def test_theorem1_linear_topk_gate():
    r = mt.nn.StatefulRouter(6, 8, 2)
    lin = torch.nn.Linear(6, 8, bias=False)
    lin.weight.data.copy_(r.units.data)
    x = torch.randn(32, 6)
    for _ in range(3):      # the state moves; with beta = gamma = 0 it does not matter
        w, idx = r(x)
        logits = lin(x)
        top = torch.topk(logits, 2, dim=-1)
        assert torch.equal(idx, top.indices)
        assert torch.allclose(w, torch.softmax(top.values, -1))


def test_gradients_match_reference():
    r = _router()
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    r(torch.randn(4, 6, dtype=torch.float64))          # some history
    t_last, n_act = r.t_last.clone(), r.n_act.double().clone()
    w, idx = r(x)
    dw = torch.randn_like(w)
    (w * dw).sum().backward()
    xr = x.detach().clone().requires_grad_()
    ur = r.units.detach().clone().requires_grad_()
    rw, ridx, _, _ = SR.stateful_route(xr, ur, 1, t_last, n_act, 3, alpha=0.7, beta=0.2, gamma=0.1, decay=0.3)
    assert torch.equal(idx, ridx)
    gx, gu = torch.autograd.grad((rw * dw).sum(), [xr, ur])
    assert rel_err(x.grad, gx) < 1e-12 and rel_err(r.units.grad, gu) < 1e-12
    x2 = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    r.update_state = False          # a pure function of x for gradcheck
    assert torch.autograd.gradcheck(lambda x: r(x)[0], (x2,))


def test_temporal_and_usage_terms_prefer_recent_units():
    r = mt.nn.StatefulRouter(4, 6, 1, alpha=0.0, beta=1.0, gamma=0.0, decay=0.5)
    with torch.no_grad():
        r.t.fill_(10)
        r.t_last.copy_(torch.tensor([-1, 2, 9, 5, -1, 0]))
    _, idx = r(torch.randn(3, 4))
    assert idx.flatten().tolist() == [2, 2, 2]
    r = mt.nn.StatefulRouter(4, 6, 1, alpha=0.0, beta=0.0, gamma=1.0)
    with torch.no_grad():
        r.n_act.copy_(torch.tensor([0.0, 3, 1, 7, 0, 2]))
    assert r(torch.randn(2, 4))[1].flatten().tolist() == [3, 3]


def test_load_balancing_boosts_underused():
    r = mt.nn.StatefulRouter(4, 4, 1, alpha=0.0, balance=1.0, update_state=False)
    with torch.no_grad():
        r.n_act.copy_(torch.tensor([5.0, 0.0, 5.0, 5.0]))
    assert r(torch.randn(3, 4))[1].flatten().tolist() == [1, 1, 1]


def test_unit_dropout_training_only_and_never_nan():
    r = mt.nn.StatefulRouter(4, 5, 4, dropout=1.0, update_state=False)
    with torch.no_grad():
        r.n_act.copy_(torch.tensor([10.0, 10.0, 10.0, 1.0, 0.0]))
    x = torch.randn(50, 4)
    r.train()
    w, idx = r(x)
    assert torch.isfinite(w).all()
    assert (idx == 4).any(-1).all()           # never dropped (n_act 0)
    r.eval()
    w2, idx2 = r(x)
    assert torch.equal(idx2, torch.topk(x @ r.units.detach().T, 4, -1).indices)


def test_hierarchical_selects_inside_chosen_domains():
    r = mt.nn.StatefulRouter(6, 12, 2, num_domains=3, domain_k=1)
    x = torch.randn(20, 6)
    _, idx = r(x)
    dom = r.domain_router(x).argmax(-1)
    assert torch.equal(r.domains[idx], dom[:, None].expand(-1, 2))


def test_entropy_monitor():
    r = mt.nn.StatefulRouter(4, 8, 1, alpha=0.0, gamma=1.0, entropy_threshold=0.5)
    with torch.no_grad():
        r.n_act[3] = 100.0
    r(torch.randn(16, 4))                  # everyone picks unit 3: entropy 0
    assert float(r.selection_entropy) == 0.0 and bool(r.entropy_alert)
    with pytest.warns(UserWarning, match="selection entropy"):
        r.check_entropy()
    r.reset_state()
    assert int(r.t) == 0 and (r.t_last == -1).all() and (r.n_act == 0).all()
    r2 = mt.nn.StatefulRouter(4, 8, 1, entropy_threshold=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r2(torch.randn(256, 4) * 10)
        r2.check_entropy()


def test_as_moe_gate_feeds_routing_trie():
    layers, E = 3, 8
    routers = [mt.nn.StatefulRouter(6, E, 2, beta=0.1, gamma=0.1) for _ in range(layers)]
    x = torch.randn(40, 6)
    paths = torch.stack([r(x)[1][:, 0] for r in routers], 1)          # top-1 per layer: [N, L]
    tree = mt.RoutingTree(layers, E)
    tree.update(paths)
    assert tree.num_nodes > 0


def test_as_selector_over_cms_slots():
    cms = mt.nn.CMSMemory(5, [(8, 4, 0.2)], 3, backend="torch")
    _, st = cms(torch.randn(1, 6, 5))
    r = mt.nn.StatefulRouter(3, 8, 2, beta=0.5, gamma=0.1)
    slots = st.keys[0][0]                                              # [N, d_k]
    q = torch.randn(4, 3)
    w, idx = r(q, units=slots)
    assert idx.shape == (4, 2) and torch.allclose(w.sum(-1), torch.ones(4))
    ref = SR.stateful_route(q.double(), slots.double(), 0, torch.full((8,), -1), torch.zeros(8, dtype=torch.float64),
                            2, beta=0.5, gamma=0.1)
    assert torch.equal(idx, ref[1])


def test_forward_has_no_host_sync(monkeypatch):
    """Structure: no tensor -> host conversion runs during forward (on CUDA, tests/gpu checks it
    with torch.cuda.set_sync_debug_mode)."""
    r = mt.nn.StatefulRouter(6, 16, 2, beta=0.2, gamma=0.1, balance=0.3, dropout=0.2, num_domains=4, domain_k=2,
                             entropy_threshold=0.5)
    x = torch.randn(8, 6)

    def boom(*a, **k):
        raise AssertionError("host sync in forward")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    r.train()
    r(x)


@pytest.mark.parametrize("kw, match", [
    ({"k": 9}, "k must be <= 8"), ({"k": 0}, "k must be >= 1"), ({"dropout": 1.5}, "dropout"),
    ({"num_domains": 3}, "num_domains must divide"), ({"num_domains": 4, "domain_k": 1, "k": 3}, "domain_k"),
    ({"decay": -1.0}, "decay"),
])
def test_bad_arguments(kw, match):
    args = {"k": 2, **kw}
    with pytest.raises(ValueError, match=match):
        mt.nn.StatefulRouter(4, 8, **args)


def test_bad_input():
    r = mt.nn.StatefulRouter(4, 8, 2)
    with pytest.raises(ValueError, match="x must have shape"):
        r(torch.randn(3, 5))
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        r(torch.randn(3))
    with pytest.raises(ValueError, match="units must have shape"):
        r(torch.randn(3, 4), units=torch.randn(7, 4))
