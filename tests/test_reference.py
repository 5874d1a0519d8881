"""The oracle itself, checked against hand-computed cases and independent formulations."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memtrace import reference as R

F64 = torch.float64


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


# ---- attention ---------------------------------------------------------------------------------

def test_attention_hand_case():
    # one query, two keys: logits [0, ln 3] + bias [ln 2, 0] -> weights 2:3
    q = torch.tensor([[[[1.0, 0.0]]]], dtype=F64)
    k = torch.tensor([[[[0.0, 0.0], [math.log(3.0), 0.0]]]], dtype=F64)
    v = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]], dtype=F64)
    bias = torch.tensor([[[math.log(2.0), 0.0]]], dtype=F64)
    out, lse = R.attention_with_lse(q, k, v, bias, scale=1.0)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.4, 0.6], dtype=F64))
    torch.testing.assert_close(lse[0, 0, 0], torch.tensor(math.log(5.0), dtype=F64))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tq,tk,hq,hkv", [(7, 7, 4, 2), (5, 9, 2, 1), (3, 3, 3, 3)])
def test_attention_matches_sdpa_math(seed, causal, tq, tk, hq, hkv):
    q, k, v = (_rand(2, hq, tq, 16, seed=seed), _rand(2, hkv, tk, 16, seed=seed + 10),
               _rand(2, hkv, tk, 16, seed=seed + 20))
    bias = _rand(hq, tq, tk, seed=seed + 30)
    out = R.attention(q, k, v, bias, causal=causal, alpha=0.7, scale=0.3)
    mask = 0.7 * bias
    if causal:
        mask = mask.masked_fill(~R.causal_mask(tq, tk), float("-inf"))
    kk, vv = (t.repeat_interleave(hq // hkv, dim=1) for t in (k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_fully_masked_rows_give_zero_and_finite_gradients():
    # Tq > Tk with causal bottom-right: the first Tq - Tk queries see no key.
    q, k, v = (_rand(1, 2, 6, 16, seed=3).requires_grad_(), _rand(1, 2, 2, 16, seed=4).requires_grad_(),
               _rand(1, 2, 2, 16, seed=5).requires_grad_())
    out, lse = R.attention_with_lse(q, k, v, causal=True)
    assert torch.all(out[:, :, :4] == 0) and torch.all(torch.isneginf(lse[:, :, :4]))
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, :4] == 0)


def test_dense_bias_duplicates_add_and_out_of_range_entries_drop():
    h = torch.tensor([0, 0, 1, 1])
    i = torch.tensor([1, 1, 0, 5])
    j = torch.tensor([2, 2, 0, 0])
    val = torch.tensor([1.0, 2.5, -1.0, 9.0])
    dense = R.dense_bias(h, i, j, val, 2, 3, 4)
    assert dense.shape == (2, 3, 4)
    assert dense[0, 1, 2] == 3.5 and dense[1, 0, 0] == -1.0
    assert dense.abs().sum() == 4.5


@pytest.mark.parametrize("causal", [False, True])
def test_sparse_correction_identity_is_exact(causal):
    """The identity the kernels rely on (issue 7): unbiased O, LSE plus per-entry weights
    w = exp(s - LSE) * expm1(b) give the biased attention exactly."""
    B, H, Tq, Tk, D = 2, 3, 6, 8, 16
    q, k, v = _rand(B, H, Tq, D, seed=7), _rand(B, H, Tk, D, seed=8), _rand(B, H, Tk, D, seed=9)
    g = torch.Generator().manual_seed(11)
    n = 12
    h, i, j = (torch.randint(0, H, (n,), generator=g), torch.randint(0, Tq, (n,), generator=g),
               torch.randint(0, Tk, (n,), generator=g))
    bias = R.dense_bias(h, i, j, 2 * _rand(n, seed=12), H, Tq, Tk)
    out0, lse0 = R.attention_with_lse(q, k, v, causal=causal)
    logits = R.logits_of(q, k, causal=causal)
    w = torch.exp(logits - lse0[..., None]) * torch.expm1(bias)
    w = torch.where(torch.isfinite(logits), w, torch.zeros_like(w))
    out1 = (out0 + w @ v) / (1 + w.sum(-1, keepdim=True))
    lse1 = lse0 + torch.log1p(w.sum(-1))
    out, lse = R.attention_with_lse(q, k, v, bias, causal=causal)
    torch.testing.assert_close(out1, out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse1, lse, rtol=1e-12, atol=1e-12)


# ---- salience ----------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_salience_matches_autograd_through_probabilities(causal):
    B, Hq, Hkv, Tq, Tk, D = 3, 4, 2, 5, 7, 16
    q, k, v, dout = (_rand(B, Hq, Tq, D, seed=1), _rand(B, Hkv, Tk, D, seed=2), _rand(B, Hkv, Tk, D, seed=3),
                     _rand(B, Hq, Tq, D, seed=4))
    bias = _rand(Hq, Tq, Tk, seed=5)
    probs = R.probabilities(q, k, bias, causal=causal).requires_grad_()
    out = probs @ v.repeat_interleave(Hq // Hkv, dim=1)
    out.backward(dout)
    S, a = R.salience(q, k, v, dout, bias, causal=causal)
    torch.testing.assert_close(S, (probs * probs.grad.abs()).mean(0).detach())
    torch.testing.assert_close(a, probs.mean(0).detach())
    torch.testing.assert_close(a.sum(-1), torch.ones(Hq, Tq, dtype=F64))


# ---- trace-memory update rule ------------------------------------------------------------------

PARAMS = dict(quota=2, retention=0.9, decay=0.5, threshold=0.01, prune_eps=1e-3, attn_eps=1e-3, window=4)


def _cand(edges):
    cols = list(zip(*edges))
    return tuple(torch.tensor(c, dtype=F64 if n >= 3 else torch.int64) for n, c in enumerate(cols))


def test_update_rule_by_hand():
    st0 = R.empty_state()
    # step 1: three new edges of head 0; S_eff = S ln 2 (one history bit); quota 2 evicts a tie:
    # (1, 0) and (2, 0) both hold 0.1 * ln 2, the larger (i, j) = (2, 0) goes.
    st1 = R.trace_update(st0, _cand([(0, 1, 0, 1.0, 0.5), (0, 1, 1, 2.0, 0.5), (0, 2, 0, 1.0, 0.5)]), **PARAMS)
    assert st1["q_idx"].tolist() == [1, 1] and st1["k_idx"].tolist() == [0, 1]
    ln2, ln3 = math.log(2), math.log(3)
    torch.testing.assert_close(st1["strength"], torch.tensor([0.1 * ln2, 0.2 * ln2], dtype=F64))
    assert st1["hist"].tolist() == [1, 1] and st1["age"].tolist() == [0, 0]
    # step 2: (1, 0) reinforced with two history bits, (1, 1) unseen -> decays, ages, shifts history
    st2 = R.trace_update(st1, _cand([(0, 1, 0, 1.0, 0.5)]), **PARAMS)
    torch.testing.assert_close(st2["strength"], torch.tensor([0.9 * 0.1 * ln2 + 0.1 * ln3, 0.5 * 0.2 * ln2], dtype=F64))
    assert st2["hist"].tolist() == [3, 2] and st2["age"].tolist() == [0, 1]
    # step 3: an edge of another head with attention under attn_eps has no history bit, so its
    # effective salience is S * ln(1) = 0 and it is not inserted; head 0 decays.
    st3 = R.trace_update(st2, _cand([(1, 0, 0, 5.0, 1e-4)]), **PARAMS)
    assert st3["head"].tolist() == [0, 0]
    torch.testing.assert_close(st3["strength"], 0.5 * st2["strength"])
    assert st3["hist"].tolist() == [6, 4]
    # the history keeps `window` = 4 bits: after 3 more silent steps it is empty
    s = st3
    for _ in range(3):
        s = R.trace_update(s, _cand([(0, 3, 3, 0.0, 0.0)]), **PARAMS)
    assert s["hist"].tolist() == [0, 0] and s["age"].tolist() == [4, 5]
    # 0.5^8 * 0.16 < prune_eps = 1e-3: five more silent steps prune both
    for _ in range(5):
        s = R.trace_update(s, _cand([(0, 3, 3, 0.0, 0.0)]), **PARAMS)
    assert s["head"].numel() == 0


edge = st.tuples(st.integers(0, 2), st.integers(0, 5), st.integers(0, 5))


@settings(max_examples=40, deadline=None)
@given(steps=st.lists(st.dictionaries(edge, st.tuples(st.floats(0, 3), st.floats(0, 1)), max_size=25),
                      min_size=1, max_size=6),
       quota=st.integers(1, 4))
def test_update_properties_quota_and_nonnegative(steps, quota):
    params = dict(PARAMS, quota=quota)
    s = R.empty_state()
    for cands in steps:
        edges = [(h, i, j, sv, av) for (h, i, j), (sv, av) in cands.items()]
        s = R.trace_update(s, _cand(edges) if edges else _cand([(0, 0, 0, 0.0, 0.0)]), **params)
        assert (s["strength"] >= params["prune_eps"]).all()
        counts = torch.bincount(s["head"], minlength=3)
        assert counts.max().item() <= quota if counts.numel() else True
        assert (s["hist"] < (1 << params["window"])).all()


@settings(max_examples=30, deadline=None)
@given(cands=st.dictionaries(edge, st.tuples(st.floats(0.1, 3), st.floats(0.01, 1)), min_size=1, max_size=20))
def test_step_without_salience_is_pure_decay_and_prune(cands):
    params = dict(PARAMS, quota=100, prune_eps=0.05)
    edges = [(h, i, j, sv, av) for (h, i, j), (sv, av) in cands.items()]
    s1 = R.trace_update(R.empty_state(), _cand(edges), **params)
    s2 = R.trace_update(s1, _cand([(0, 0, 0, 0.0, 0.0)]), **params)
    decayed = params["decay"] * s1["strength"]
    keep = decayed >= params["prune_eps"]
    torch.testing.assert_close(s2["strength"], decayed[keep])
    assert s2["q_idx"].tolist() == s1["q_idx"][keep].tolist()
    assert (s2["age"] == s1["age"][keep] + 1).all()


@pytest.mark.parametrize("window", [1, 4, 16])
def test_constant_salience_converges_to_steady_state(window):
    params = dict(PARAMS, quota=8, window=window, retention=0.8)
    s = R.empty_state()
    for _ in range(200):
        s = R.trace_update(s, _cand([(0, 2, 1, 0.7, 0.3)]), **params)
    expected = R.steady_state_strength(0.7, window=window)
    assert abs(s["strength"].item() - expected) < 1e-9 * expected
    assert s["hist"].item() == (1 << window) - 1


def test_update_dense_equals_candidate_list():
    g = torch.Generator().manual_seed(5)
    S = torch.rand(2, 4, 3, generator=g, dtype=F64)
    a = torch.rand(2, 4, 3, generator=g, dtype=F64)
    params = dict(PARAMS, quota=3, threshold=0.2)
    dense = R.trace_update_dense(R.empty_state(), S, a, **params)
    h, i, j = torch.nonzero(torch.ones_like(S), as_tuple=True)
    listed = R.trace_update(R.empty_state(), (h, i, j, S[h, i, j], a[h, i, j]), **params)
    for key in dense:
        assert torch.equal(dense[key], listed[key])
