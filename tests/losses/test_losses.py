"""memtrace.losses against memtrace.reference.losses (float64): values, gradients, bad input."""
import math

import pytest
import torch

import memtrace as mt
from memtrace import losses as L
from memtrace.reference import losses as R
from memtrace.reference.attention import attention_with_lse, dense_bias


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---- trace utilisation ----------------------------------------------------------------------------

def make_bias(gen, H, Tq, Tk, E, dtype=torch.float32, seq_q=None, seq_k=None, dup=True):
    seq_q, seq_k = seq_q or Tq, seq_k or Tk
    head = torch.randint(0, H, (E,), generator=gen)
    qi = torch.randint(0, seq_q, (E,), generator=gen)
    kj = torch.randint(0, seq_k, (E,), generator=gen)
    if dup and E > 2:
        head[1], qi[1], kj[1] = head[0], qi[0], kj[0]
    value = torch.rand(E, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    return mt.TraceBias(head, qi, kj, value, num_heads=H, seq_len_q=seq_q, seq_len_k=seq_k)


def qk(gen, B, Hq, Hkv, Tq, Tk, D, dtype):
    q = torch.randn(B, Hq, Tq, D, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    k = torch.randn(B, Hkv, Tk, D, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True)
    return q, k


def dense_lse(q, k, bias, scale, alpha, causal, kpm=None):
    Hq, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    Md = dense_bias(bias.head, bias.q_idx, bias.k_idx, bias.value, Hq, bias.seq_len_q, bias.seq_len_k,
                    dtype=q.dtype)[:, :Tq, :Tk]
    v = torch.zeros(k.shape, dtype=q.dtype)
    return attention_with_lse(q, k, v, Md, causal=causal, scale=scale, alpha=alpha, key_padding_mask=kpm)[1]


CASES = [  # B, Hq, Hkv, Tq, Tk, D, E, causal
    (1, 1, 1, 1, 1, 16, 1, False), (2, 4, 2, 5, 7, 16, 13, True), (3, 6, 3, 9, 4, 32, 40, False),
    (2, 2, 1, 11, 11, 16, 60, True), (1, 3, 3, 6, 9, 8, 0, True),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", CASES)
def test_trace_mass_matches_reference(case, seed):
    B, Hq, Hkv, Tq, Tk, D, E, causal = case
    gen = torch.Generator().manual_seed(1000 * seed + hash(case) % 997)
    q, k = qk(gen, B, Hq, Hkv, Tq, Tk, D, torch.float32)
    bias = make_bias(gen, Hq, Tq, Tk, E, seq_q=Tq + 2, seq_k=Tk + 3)   # some entries beyond the call: ignored
    scale, alpha = 1 / math.sqrt(D), 0.7
    with torch.no_grad():
        lse = dense_lse(q.double(), k.double(), bias, scale, alpha, causal).float()
    lse.requires_grad_(True)
    got = L.trace_attention_mass(q, k, lse, bias, scale=scale, alpha=alpha, causal=causal)
    ref = R.trace_attention_mass(q, k, lse, bias, scale=scale, alpha=alpha, causal=causal)
    assert got.shape == (Hq,) and got.dtype == torch.float32
    assert float((got.double() - ref).abs().max().detach()) < 1e-5
    assert bool((got >= 0).all()) and bool((got <= 1 + 1e-5).all())
    # the share with the true lse is the dense softmax share
    ref_true = R.trace_attention_mass(q, k, None, bias, scale=scale, alpha=alpha, causal=causal)
    assert float((got.double() - ref_true).abs().max().detach()) < 1e-5
    # gradients w.r.t. q, k, lse and the bias values
    w = torch.randn(Hq, generator=gen, dtype=torch.float64)
    inputs = (q, k, lse, bias.value)
    g_got = torch.autograd.grad((got.double() * w).sum(), inputs, allow_unused=True)
    g_ref = torch.autograd.grad((ref * w).sum(), inputs, allow_unused=True)
    for a, b in zip(g_got, g_ref):
        if b is None or b.numel() == 0 or b.abs().max() == 0:
            assert a is None or a.numel() == 0 or float(a.abs().max()) < 1e-6
        else:
            assert rel(a, b) < 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", CASES[1:])
@pytest.mark.parametrize("padded", [False, True])
def test_trace_mass_with_constant_lse_has_the_share_gradient(case, seed, padded):
    """With the attention op's lse (a constant), the push-down is added: the gradients w.r.t. q, k
    and the bias values are those of the true softmax share (dense float64 reference, lse=None);
    push_down=False keeps the stored edges' unnormalised gradient."""
    B, Hq, Hkv, Tq, Tk, D, E, causal = case
    gen = torch.Generator().manual_seed(7000 + 100 * seed + hash(case) % 97 + 13 * padded)
    q, k = qk(gen, B, Hq, Hkv, Tq, Tk, D, torch.float64)
    bias = make_bias(gen, Hq, Tq, Tk, E, dtype=torch.float64, seq_q=Tq + 1, seq_k=Tk + 2)
    kpm = None
    if padded:
        kpm = torch.rand(B, Tk, generator=gen) > 0.3
        kpm[0, :] = False                     # one sequence attends to nothing: its rows carry no mass
    scale, alpha = 1 / math.sqrt(D), 0.6
    kw = dict(scale=scale, alpha=alpha, causal=causal, key_padding_mask=kpm)
    with torch.no_grad():
        lse = dense_lse(q, k, bias, scale, alpha, causal, kpm)
    got = L.trace_attention_mass(q, k, lse, bias, **kw)
    ref = R.trace_attention_mass(q, k, None, bias, **kw)
    assert float((got - ref).abs().max()) < 1e-12
    w = torch.randn(Hq, generator=gen, dtype=torch.float64)
    inputs = (q, k, bias.value)
    g_got = torch.autograd.grad((got * w).sum(), inputs)
    g_ref = torch.autograd.grad((ref * w).sum(), inputs)
    # 1e-7: the push-down's attention call works with a float32 log-sum-exp
    for name, a, b in zip(("q", "k", "value"), g_got, g_ref):
        assert _close(a, b, 1e-7), name
    # without the push-down: the gradient of the stored edges' weights with lse held fixed
    old = L.trace_attention_mass(q, k, lse, bias, push_down=False, **kw)
    fixed = R.trace_attention_mass(q, k, lse.clone().requires_grad_(True), bias, **kw)
    for a, b in zip(torch.autograd.grad((old * w).sum(), inputs), torch.autograd.grad((fixed * w).sum(), inputs)):
        assert _close(a, b, 1e-10)


def _close(a, b, tol):
    if b.numel() == 0 or float(b.abs().max()) == 0:
        return a.numel() == 0 or float(a.abs().max()) < 1e-12
    return rel(a, b) < tol


def test_trace_mass_push_down_in_float32_through_the_op():
    """The manager's way: lse from memtrace.biased_attention (non-differentiable), float32, GQA,
    causal. The q / k gradients match the dense share's."""
    gen = torch.Generator().manual_seed(11)
    B, Hq, Hkv, T, D = 2, 4, 2, 24, 16
    q, k = qk(gen, B, Hq, Hkv, T, T, D, torch.float32)
    v = torch.randn(B, Hkv, T, D, generator=gen)
    bias = make_bias(gen, Hq, T, T, 90, dtype=torch.float32)
    bias.value.requires_grad_(False)
    out, lse = mt.biased_attention(q, k, v, bias, causal=True, alpha=0.5, return_lse=True, backend="reference")
    assert not lse.requires_grad
    got = L.trace_attention_mass(q, k, lse, bias, scale=D ** -0.5, alpha=0.5, causal=True)
    ref = R.trace_attention_mass(q, k, None, bias, scale=D ** -0.5, alpha=0.5, causal=True)
    g_got = torch.autograd.grad(got.sum(), (q, k))
    g_ref = torch.autograd.grad(ref.sum(), (q, k))
    for a, b in zip(g_got, g_ref):
        assert rel(a, b) < 1e-5


def test_trace_mass_gradcheck_float64():
    gen = torch.Generator().manual_seed(7)
    q, k = qk(gen, 2, 4, 2, 5, 6, 4, torch.float64)
    bias = make_bias(gen, 4, 5, 6, 15, dtype=torch.float64)
    lse = (torch.randn(2, 4, 5, generator=gen, dtype=torch.float64) + 2.0).requires_grad_(True)
    for causal in (False, True):
        f = lambda q, k, lse, value: L.trace_attention_mass(
            q, k, lse, mt.TraceBias(bias.head, bias.q_idx, bias.k_idx, value, num_heads=4, seq_len_q=5, seq_len_k=6),
            scale=0.5, alpha=0.3, causal=causal)
        assert torch.autograd.gradcheck(f, (q, k, lse, bias.value))
    # with the graph's lse: the full softmax share, against the dense reference's gradient
    got = L.trace_attention_mass(q, k, dense_lse(q, k, bias, 0.5, 0.3, True), bias, scale=0.5, alpha=0.3, causal=True)
    ref = R.trace_attention_mass(q, k, None, bias, scale=0.5, alpha=0.3, causal=True)
    inputs = (q, k, bias.value)
    for a, b in zip(torch.autograd.grad(got.sum(), inputs), torch.autograd.grad(ref.sum(), inputs)):
        assert rel(a, b) < 1e-10


def test_trace_mass_key_padding_and_masked_rows():
    gen = torch.Generator().manual_seed(3)
    B, H, T, D = 2, 2, 6, 16
    q, k = qk(gen, B, H, H, T, T, D, torch.float64)
    bias = make_bias(gen, H, T, T, 25, dtype=torch.float64)
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[1, :2] = False
    with torch.no_grad():
        lse = dense_lse(q, k, bias, 0.25, 1.0, True, kpm)        # rows 0, 1 of batch 1: fully masked (-inf)
    assert bool(torch.isinf(lse).any())
    got = L.trace_attention_mass(q, k, lse, bias, scale=0.25, alpha=1.0, causal=True, key_padding_mask=kpm)
    ref = R.trace_attention_mass(q, k, lse, bias, scale=0.25, alpha=1.0, causal=True, key_padding_mask=kpm)
    assert rel(got, ref) < 1e-12
    g = torch.autograd.grad(got.sum(), (q, k, bias.value))
    assert all(bool(torch.isfinite(x).all()) for x in g)


def test_trace_mass_every_stored_edge_gives_one():
    gen = torch.Generator().manual_seed(5)
    B, H, Tq, Tk = 2, 2, 3, 4
    q, k = qk(gen, B, H, 1, Tq, Tk, 16, torch.float64)
    hh, ii, jj = torch.meshgrid(torch.arange(H), torch.arange(Tq), torch.arange(Tk), indexing="ij")
    bias = mt.TraceBias.from_coo(hh.flatten(), ii.flatten(), jj.flatten(), torch.rand(H * Tq * Tk, generator=gen),
                                 num_heads=H, seq_len_q=Tq, seq_len_k=Tk)
    lse = dense_lse(q, k, bias, 0.3, 1.0, False)
    got = L.trace_attention_mass(q, k, lse, bias, scale=0.3, alpha=1.0, causal=False)
    assert torch.allclose(got, torch.ones(H, dtype=torch.float64), atol=1e-6)


def test_trace_mass_empty_bias_is_zero_with_gradient():
    gen = torch.Generator().manual_seed(2)
    q, k = qk(gen, 1, 2, 2, 3, 3, 16, torch.float32)
    bias = mt.TraceBias.empty(num_heads=2, seq_len_q=3, seq_len_k=3)
    lse = torch.zeros(1, 2, 3)
    m = L.trace_attention_mass(q, k, lse, bias, scale=0.25, alpha=1.0, causal=True)
    assert torch.equal(m, torch.zeros(2))
    loss = L.trace_utilization_loss([m])
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(q.grad, torch.zeros_like(q))


def test_trace_mass_half_inputs():
    gen = torch.Generator().manual_seed(9)
    q, k = qk(gen, 1, 2, 2, 4, 4, 16, torch.bfloat16)
    bias = make_bias(gen, 2, 4, 4, 6)
    lse = dense_lse(q.detach().double(), k.detach().double(), bias, 0.25, 1.0, False).float()
    got = L.trace_attention_mass(q, k, lse, bias, scale=0.25, alpha=1.0, causal=False)
    ref = R.trace_attention_mass(q.detach(), k.detach(), lse, bias, scale=0.25, alpha=1.0, causal=False)
    assert got.dtype == torch.float32 and rel(got, ref) < 1e-2


@pytest.mark.parametrize("kw,exc,match", [
    (dict(q=torch.zeros(2, 2, 3)), ValueError, "q"),
    (dict(k=torch.zeros(1, 3, 4, 16)), ValueError, "multiple"),
    (dict(k=torch.zeros(1, 2, 4, 16, dtype=torch.float64)), TypeError, "dtype"),
    (dict(lse=torch.zeros(1, 2, 4)), ValueError, "lse"),
    (dict(bias="x"), TypeError, "bias"),
    (dict(bias=mt.TraceBias.empty(num_heads=3, seq_len_q=3, seq_len_k=4)), ValueError, "num_heads"),
    (dict(key_padding_mask=torch.ones(1, 3, dtype=torch.bool)), ValueError, "key_padding_mask"),
    (dict(key_padding_mask=torch.ones(1, 4)), TypeError, "key_padding_mask"),
    (dict(scale=0.0), ValueError, "scale"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
])
def test_trace_mass_bad_input(kw, exc, match):
    args = dict(q=torch.zeros(1, 2, 3, 16), k=torch.zeros(1, 2, 4, 16), lse=torch.zeros(1, 2, 3),
                bias=mt.TraceBias.empty(num_heads=2, seq_len_q=3, seq_len_k=4), scale=0.25, alpha=1.0, causal=False,
                key_padding_mask=None)
    args.update(kw)
    with pytest.raises(exc, match=match):
        L.trace_attention_mass(args.pop("q"), args.pop("k"), args.pop("lse"), args.pop("bias"), **args)


def test_trace_utilization_loss():
    gen = torch.Generator().manual_seed(4)
    masses = [torch.rand(4, generator=gen, dtype=torch.float64).requires_grad_(True),
              torch.rand(2, generator=gen, dtype=torch.float64).requires_grad_(True)]
    got = L.trace_utilization_loss(masses)
    ref = R.trace_utilization_loss(masses)
    assert abs(float(got - ref)) < 1e-15 and abs(float(got) + float(torch.cat(masses).mean())) < 1e-15
    assert torch.autograd.gradcheck(lambda a, b: L.trace_utilization_loss([a, b]), tuple(masses))
    stacked = torch.rand(3, 5, generator=gen)
    assert abs(float(L.trace_utilization_loss(stacked) - R.trace_utilization_loss(stacked))) < 1e-6
    assert L.trace_utilisation_loss is L.trace_utilization_loss
    empty = torch.zeros(0, 4, requires_grad=True)
    z = L.trace_utilization_loss(empty)
    z.backward()
    assert float(z) == 0.0 and float(L.trace_utilization_loss([])) == 0.0
    with pytest.raises(ValueError, match="masses"):
        L.trace_utilization_loss(torch.zeros(2, 2, 2))
    with pytest.raises(TypeError, match=r"masses\[1\]"):
        L.trace_utilization_loss([torch.zeros(2), torch.zeros(2, dtype=torch.long)])
    with pytest.raises(TypeError, match="masses"):
        L.trace_utilization_loss(3.0)


# ---- crystallisation stability ------------------------------------------------------------------

def motif(s, ex, utility=1.0):
    return mt.Motif(start_layer=s, experts=tuple(ex), count=1, utility=utility, entropy=0.0, age=0, score=0.0)


def random_probs(gen, Lyr, N, E, dtype=torch.float64, sharp=2.0):
    return torch.softmax(sharp * torch.randn(Lyr, N, E, generator=gen, dtype=torch.float64), -1).to(dtype)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_crystal_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    Lyr, N, E = 5, 37 + seed, 3
    probs = random_probs(gen, Lyr, N, E).requires_grad_(True)
    motifs = [motif(0, (0, 1, 2), 0.5), motif(1, (2, 2), 0.01), motif(2, (1, 0, 0), 0.2), motif(4, (1,), 0.3),
              motif(0, (1, 1, 1, 1, 1), 0.9)]
    paths = torch.randint(-1, E, (N, Lyr), generator=gen) if seed == 2 else None
    got = L.crystal_stability_loss(probs, motifs, min_utility=0.05, paths=paths)
    ref = R.crystal_stability_loss(list(probs), motifs, min_utility=0.05, paths=paths)
    assert abs(float(got - ref)) < 1e-12
    h = L.motif_entropies(probs, motifs, paths=paths)
    for i, m in enumerate(motifs):
        assert abs(float(h[i] - R.motif_entropy(list(probs), m, paths))) < 1e-12
    g_got, = torch.autograd.grad(got, probs)
    g_ref, = torch.autograd.grad(ref, probs)
    assert rel(g_got, g_ref) < 1e-10
    assert torch.autograd.gradcheck(lambda p: L.crystal_stability_loss(p, motifs, paths=paths), (probs,))


def test_crystal_float32_and_list_input():
    gen = torch.Generator().manual_seed(11)
    probs = random_probs(gen, 4, 50, 5, torch.float32)
    motifs = [motif(1, (0, 3, 4), 0.3), motif(0, (2, 2, 2, 2), 0.1)]
    got = L.crystal_stability_loss(list(probs), motifs)
    ref = R.crystal_stability_loss(list(probs), motifs)
    assert got.dtype == torch.float32 and abs(float(got) - float(ref)) < 1e-5


def test_crystal_one_hot_equals_the_tries_entropy():
    gen = torch.Generator().manual_seed(5)
    Lyr, N, E = 6, 400, 3
    # skewed routing so that motifs repeat; some tokens unrouted at some layers
    paths = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), N * Lyr, replacement=True, generator=gen).view(N, Lyr)
    paths[torch.rand(N, Lyr, generator=gen) < 0.05] = -1
    tree = mt.RoutingTree(Lyr, E, max_depth=6, mode="suffix")
    tree.update(paths, step=0)
    onehot = torch.zeros(Lyr, N, E, dtype=torch.float64)
    routed = paths.T >= 0
    onehot[routed] = torch.nn.functional.one_hot(paths.T[routed], E).double()
    checked = 0
    for s, ex in [(0, (0, 0, 0)), (1, (0, 1)), (2, (1, 0, 0, 2)), (0, (0,)), (3, (0, 0, 0))]:
        st = tree.stats(s, ex)
        if st is None:
            continue
        h = L.motif_entropies(onehot, [motif(s, ex)], paths=paths, check_values=False)
        assert abs(float(h[0]) - st["entropy"]) < 1e-9, (s, ex)
        checked += 1
    assert checked >= 4


def test_crystal_indicator_and_empty():
    gen = torch.Generator().manual_seed(1)
    probs = random_probs(gen, 3, 20, 4).requires_grad_(True)
    low = [motif(0, (0, 1, 2), utility=0.05), motif(1, (1, 1), utility=-3.0)]
    z = L.crystal_stability_loss(probs, low, min_utility=0.05)
    assert float(z) == 0.0
    z = L.crystal_stability_loss(probs, [])
    z.backward()
    assert float(z) == 0.0 and torch.equal(probs.grad, torch.zeros_like(probs))
    # a motif no token follows: its later terms are 0, no NaN
    peaked = torch.zeros(3, 4, 4, dtype=torch.float64)
    peaked[:, :, 0] = 1.0
    h = L.motif_entropies(peaked.requires_grad_(True), [motif(0, (3, 3, 3))])
    h.sum().backward()
    assert float(h[0]) == 0.0 and bool(torch.isfinite(peaked.grad).all())


@pytest.mark.parametrize("args,kw,exc,match", [
    ((torch.rand(3, 4),), {}, ValueError, "router_probs"),
    (([torch.rand(4, 3), torch.rand(5, 3)],), {}, ValueError, r"router_probs\[1\]"),
    ((torch.rand(2, 4, 3) * 3,), {}, ValueError, "probabilities"),
    ((torch.rand(2, 4, 3),), dict(motifs=[motif(1, (0, 0))]), ValueError, "beyond"),
    ((torch.rand(2, 4, 3),), dict(motifs=[motif(0, (0, 3))]), ValueError, "experts"),
    ((torch.rand(2, 4, 3),), dict(motifs=[(0, (1,))]), TypeError, "Motif"),
    ((torch.rand(2, 4, 3),), dict(paths=torch.zeros(4, 3, dtype=torch.long)), ValueError, "paths"),
    ((torch.rand(2, 4, 3),), dict(paths=torch.full((4, 2), 3)), ValueError, "paths"),
    ((torch.rand(2, 4, 3),), dict(paths=torch.zeros(4, 2)), TypeError, "paths"),
    ((torch.rand(2, 4, 3),), dict(min_utility="a"), TypeError, "min_utility"),
    ((torch.rand(2, 4, 3, dtype=torch.float64).long(),), {}, TypeError, "router_probs"),
])
def test_crystal_bad_input(args, kw, exc, match):
    kw = dict(kw)
    motifs = kw.pop("motifs", [motif(0, (0, 1))])
    with pytest.raises(exc, match=match):
        L.crystal_stability_loss(*args, motifs, **kw)


# ---- load balance --------------------------------------------------------------------------------

@pytest.mark.parametrize("top_k", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_balance_matches_reference(top_k, seed):
    gen = torch.Generator().manual_seed(seed * 10 + top_k)
    E = 5 + seed * 2
    layers = [torch.randn(3, 7 + seed, E, generator=gen, dtype=torch.float64).requires_grad_(True) for _ in range(3)]
    mask = torch.rand(3, 7 + seed, generator=gen) > 0.3
    for m in (None, mask):
        got = L.load_balance_loss(layers, top_k=top_k, mask=m)
        ref = R.load_balance_loss(layers, top_k=top_k, mask=m)
        assert abs(float(got - ref)) < 1e-12
        g1 = torch.autograd.grad(got, layers)
        g2 = torch.autograd.grad(ref, layers)
        assert max(rel(a, b) for a, b in zip(g1, g2)) < 1e-10
        assert torch.autograd.gradcheck(lambda *xs: L.load_balance_loss(list(xs), top_k=top_k, mask=m), tuple(layers))


def test_balance_probabilities_float32_and_bounds():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 8, generator=gen)
    probs = torch.softmax(logits, -1)
    a = L.load_balance_loss(logits)
    b = L.load_balance_loss(probs, from_logits=False)
    assert a.dtype == torch.float32 and abs(float(a - b)) < 1e-6
    assert abs(float(a) - float(R.load_balance_loss(logits))) < 1e-6
    uniform = torch.zeros(8, 4)
    uniform[torch.arange(8), torch.arange(8) % 4] = 5.0      # balanced top-1, peaked probabilities
    assert float(L.load_balance_loss(uniform)) == pytest.approx(1.0, rel=1e-6)   # f = P = 1/E
    collapsed = torch.zeros(8, 4)
    collapsed[:, 0] = 30.0
    assert float(L.load_balance_loss(collapsed)) == pytest.approx(4.0, rel=1e-5)


def test_balance_empty():
    x = torch.zeros(0, 4, requires_grad=True)
    z = L.load_balance_loss(x)
    z.backward()
    assert float(z) == 0.0
    x = torch.randn(3, 4, requires_grad=True)
    z = L.load_balance_loss(x, mask=torch.zeros(3, dtype=torch.bool))
    z.backward()
    assert float(z) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    assert float(L.load_balance_loss([])) == 0.0


@pytest.mark.parametrize("args,kw,exc,match", [
    ((torch.randn(4, 3),), dict(top_k=4), ValueError, "top_k"),
    ((torch.randn(4, 3),), dict(top_k=0), ValueError, "top_k"),
    (([torch.randn(4, 3), torch.randn(5, 3)],), {}, ValueError, r"router_logits\[1\]"),
    ((torch.randn(4, 3),), dict(mask=torch.ones(5, dtype=torch.bool)), ValueError, "mask"),
    ((torch.randn(4, 3),), dict(mask=torch.ones(4)), TypeError, "mask"),
    ((torch.tensor([[0.0, float("nan")]]),), {}, ValueError, "NaN"),
    ((torch.tensor([[0.5, -0.5]]),), dict(from_logits=False), ValueError, "probabilities"),
    ((torch.ones(4, 3, dtype=torch.long),), {}, TypeError, "router_logits"),
    (("logits",), {}, TypeError, "router_logits"),
])
def test_balance_bad_input(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        L.load_balance_loss(*args, **kw)


# ---- EWC -----------------------------------------------------------------------------------------

def small_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).to(dtype)


def test_ewc_fisher_running_mean_and_penalty():
    model = small_model()
    ewc = L.EWC(model, weight=0.7)
    grads = {n: [] for n, _ in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        model.zero_grad()
        model(torch.randn(6, 5, generator=gen, dtype=torch.float64)).square().sum().backward()
        for n, p in model.named_parameters():
            grads[n].append(p.grad.clone())
        ewc.accumulate(model)
    for n in grads:
        assert torch.allclose(ewc.fisher[n], torch.stack(grads[n]).square().mean(0), rtol=1e-12, atol=0)
    assert float(ewc.loss(model)) == 0.0              # no anchor yet
    ewc.consolidate()
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert float(ewc.loss()) == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    params = dict(model.named_parameters())
    got = ewc.loss(model)
    ref = R.ewc_penalty(params, anchor, ewc.fisher, 0.7)
    assert abs(float(got - ref)) < 1e-12
    g1 = torch.autograd.grad(got, list(params.values()))
    g2 = torch.autograd.grad(ref, list(params.values()))
    assert max(rel(a, b) for a, b in zip(g1, g2)) < 1e-12
    names = list(params)
    assert torch.autograd.gradcheck(
        lambda *ps: 0.35 * sum((ewc.fisher[n] * (p - ewc.anchor[n]).square()).sum() for n, p in zip(names, ps)),
        tuple(p.detach().clone().requires_grad_(True) for p in params.values()))


def test_ewc_missing_grad_counts_as_zero_and_named_params():
    w = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
    ewc = L.EWC([("w", w), ("b", b)], weight=2.0)
    w.grad = torch.full((3,), 2.0)
    ewc.accumulate()
    w.grad = None
    ewc.accumulate()
    assert torch.equal(ewc.fisher["w"], torch.full((3,), 2.0))
    assert ewc.fisher["b"].dtype == torch.float32 and ewc.names == ["w", "b"]
    z = ewc.loss()
    z.backward()                          # attached: no "does not require grad" error
    assert float(z) == 0.0


def test_ewc_state_dict_round_trip_and_atomic_load():
    model = small_model(1)
    ewc = L.EWC(model, weight=0.3)
    model(torch.randn(2, 5, dtype=torch.float64)).sum().backward()
    ewc.accumulate(model)
    ewc.consolidate(model)
    sd = ewc.state_dict()
    other = L.EWC(small_model(2), weight=1.0)
    other.load_state_dict(sd)
    assert other.count == 1 and other.weight == 0.3
    assert all(torch.equal(other.fisher[n], ewc.fisher[n]) and torch.equal(other.anchor[n], ewc.anchor[n])
               for n in ewc.names)
    fresh = L.EWC(small_model(3))
    before = fresh.state_dict()
    bad = dict(sd)
    bad["fisher.0.weight"] = torch.zeros(9)
    with pytest.raises(ValueError, match="shape"):
        fresh.load_state_dict(bad)
    with pytest.raises(ValueError, match="keys"):
        fresh.load_state_dict({k: v for k, v in sd.items() if k != "count"})
    bad = dict(sd)
    bad["anchor.2.bias"] = torch.full((3,), float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN"):
        fresh.load_state_dict(bad)
    after = fresh.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert fresh.anchor is None


def test_ewc_bad_input():
    with pytest.raises(TypeError, match="params"):
        L.EWC(torch.zeros(3))
    with pytest.raises(ValueError, match="weight"):
        L.EWC(small_model(), weight=-1.0)
    with pytest.raises(ValueError, match="unique"):
        p = torch.nn.Parameter(torch.zeros(1))
        L.EWC([("a", p), ("a", p)])
    ewc = L.EWC(small_model())
    with pytest.raises(ValueError, match="lacks"):
        ewc.accumulate(torch.nn.Linear(5, 4))
    with pytest.raises(TypeError, match="model"):
        ewc.loss("model")
