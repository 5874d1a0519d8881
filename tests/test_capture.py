"""SalienceCapture (SPEC 3, issue 4) against the float64 oracle, on the CPU.

The Triton kernels run in the interpreter (TRITON_INTERPRET=1, set below when no GPU is present):
tiny shapes, fp16 / fp32 only (the interpreter cannot do a bf16 tl.dot). The dense fallback path
(CPU without the interpreter) is checked too.
"""
import functools
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _helpers import (
    DEV,
    check_capture,
    entry_mask,
    make_bias,
    make_tensors,
    oracle_salience,
    quantile_threshold,
    rel_err,
)

import memtrace as mt
from memtrace import capture as capture_mod
from memtrace import reference as R
from memtrace.capture import SalienceCapture

# ||got - ref|| / ||ref||: an all-zero ref fails any difference
rel = functools.partial(rel_err, norm_floor=1e-30)


def fill(cap, q, k, v, do, bias, causal, scale=None, alpha=1.0):
    out, lse, S, a = oracle_salience(q, k, v, do, bias, causal, scale, alpha)
    ev = bias.entry_values() if bias is not None else None
    cap.fill(q, k, v, out.to(q.dtype), lse.float(), do, bias, ev, causal=causal, scale=scale, alpha=alpha)
    return S, a


CASES = [
    # B, Hq, Hkv, Tq, Tk, D, dtype, causal, with_bias
    (2, 2, 2, 37, 53, 16, torch.float32, False, False),
    (1, 4, 2, 40, 40, 32, torch.float16, True, True),      # GQA, causal, square
    (3, 2, 1, 50, 29, 16, torch.float16, True, True),      # causal with Tq > Tk: masked rows
    (2, 3, 1, 21, 70, 16, torch.float32, True, True),      # causal with Tq < Tk
    (2, 2, 2, 64, 64, 16, torch.float32, False, True),
]


@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D,dtype,causal,with_bias", CASES)
def test_parity(B, Hq, Hkv, Tq, Tk, D, dtype, causal, with_bias):
    q, k, v, do = make_tensors(B, Hq, Hkv, Tq, Tk, D, dtype, seed=Tq * 7 + Tk)
    # bias built for larger maxima than the call: entries past (Tq, Tk) must be ignored
    bias = make_bias(Hq, Tq + 9, Tk + 5, 60, seed=Tq)[0] if with_bias else None
    S_probe = oracle_salience(q, k, v, do, bias, causal)[2]
    threshold = quantile_threshold(S_probe, 0.9)
    cap = SalienceCapture(threshold=threshold)
    S, a = fill(cap, q, k, v, do, bias, causal)
    check_capture(cap, S, a, bias, threshold, dtype)
    assert not bool(cap.stats["overflow"]) and bool(cap.stats["exact"])
    assert cap.num_heads == Hq and cap.seq_len_q == Tq and cap.seq_len_k == Tk
    assert cap.bias is bias


def test_random_shapes():
    """A few random shapes, scale and alpha (seeded, so the run is reproducible)."""
    g = torch.Generator().manual_seed(123)
    for trial in range(3):
        Hkv = int(torch.randint(1, 3, (1,), generator=g))
        Hq = Hkv * int(torch.randint(1, 3, (1,), generator=g))
        B = int(torch.randint(1, 3, (1,), generator=g))
        Tq, Tk = (int(x) for x in torch.randint(1, 48, (2,), generator=g))
        D = [16, 32][trial % 2]
        causal = bool(trial % 2)
        scale = float(torch.rand((), generator=g)) * 0.4 + 0.05
        alpha = float(torch.randn((), generator=g))
        q, k, v, do = make_tensors(B, Hq, Hkv, Tq, Tk, D, torch.float32, seed=1000 + trial)
        bias = make_bias(Hq, Tq + 3, Tk + 3, 25, seed=trial)[0]
        S_probe = oracle_salience(q, k, v, do, bias, causal, scale, alpha)[2]
        threshold = quantile_threshold(S_probe, 0.7)
        cap = SalienceCapture(threshold=threshold)
        S, a = fill(cap, q, k, v, do, bias, causal, scale, alpha)
        check_capture(cap, S, a, bias, threshold, torch.float32)


def test_bias_on_strong_edges_is_scored_exactly():
    """A big bias on an edge changes its P a lot: the edge must not appear with the unbiased
    value; its exact score is in bias_scores (duplicates get the merged entry's score)."""
    B, H, T, D = 2, 2, 33, 16
    q, k, v, do = make_tensors(B, H, H, T, T, D, torch.float32, seed=5)
    h = torch.tensor([0, 0, 1, 1, 0], device=DEV)
    i = torch.tensor([3, 3, 10, 32, 40], device=DEV)          # the last one is out of range
    j = torch.tensor([7, 7, 2, 32, 1], device=DEV)
    val = torch.tensor([2.0, 1.5, -3.0, 4.0, 1.0], device=DEV)
    bias = mt.TraceBias.from_coo(h, i, j, val, num_heads=H, seq_len_q=48, seq_len_k=48)
    cap = SalienceCapture(threshold=0.0)
    S, a = fill(cap, q, k, v, do, bias, False, alpha=1.5)
    check_capture(cap, S, a, bias, 0.0, torch.float32)
    bS, ba = cap.bias_scores
    assert torch.equal(bS[0], bS[1]) and bS[0] > 0          # duplicates share the merged score
    assert bS[4] == 0 and ba[4] == 0
    # every other edge is a candidate at threshold 0 (S > 0 almost surely)
    assert int(cap.num_edges) == int((S > 0).sum()) - 3     # 3 distinct entries in range


def test_overflow_keeps_strongest():
    B, H, T, D = 2, 2, 48, 16
    q, k, v, do = make_tensors(B, H, H, T, T, D, torch.float16, seed=9)
    bias = make_bias(H, T, T, 40, seed=3)[0]
    capacity = 300
    cap = SalienceCapture(threshold=0.0, capacity=capacity)
    S, a = fill(cap, q, k, v, do, bias, True)
    ent = entry_mask(bias, S)
    cands = S[(S > 0) & ~ent]
    assert bool(cap.stats["overflow"]) and bool(cap.stats["exact"])
    assert int(cap.stats["num_candidates"]) == cands.numel()
    assert int(cap.num_edges) == capacity
    check_capture(cap, S, a, bias, 0.0, torch.float16)
    top = torch.sort(cands, descending=True).values
    h, i, j, s, _ = cap.valid_edges()
    kept = S[h.long(), i.long(), j.long()]
    # the kept edges are the `capacity` strongest (float32 rounding aside)
    assert kept.min() >= top[capacity] * (1 - 1e-5)
    kept_sorted = torch.sort(kept, descending=True).values
    assert rel(kept_sorted, top[:capacity]) < 1e-5
    assert abs(float(cap.stats["kept_min_salience"]) - float(top[capacity - 1])) <= 1e-4 * float(top[capacity - 1])


def test_overflow_with_ties():
    """Equal salience everywhere (q = 0, dO = 1, v = 1): every kept edge is among the strongest
    (all are); the cut bin holds more candidates than the staging buffer, so the kernels report
    exact=False (which of the tied edges is kept is then arrival order); the dense path keeps the
    smallest (head, q, k)."""
    B, H, T, D = 1, 1, 20, 16
    q = torch.zeros(B, H, T, D, device=DEV)
    k = torch.randn(B, H, T, D, device=DEV)
    v = torch.ones(B, H, T, D, device=DEV)
    do = torch.ones(B, H, T, D, device=DEV)
    cap = SalienceCapture(threshold=0.01, capacity=50)
    S, a = fill(cap, q, k, v, do, None, False)
    assert bool(cap.stats["overflow"]) and int(cap.stats["num_candidates"]) == T * T
    assert int(cap.num_edges) == 50
    check_capture(cap, S, a, None, 0.01, torch.float32)
    h, i, j, s, _ = cap.valid_edges()
    assert torch.allclose(s.double(), S.max().expand(50), rtol=1e-6)
    dense = SalienceCapture(threshold=0.01, capacity=50)
    dense._edges, dense._num_edges, dense._bias_scores, dense._stats = capture_mod._fill_dense(
        dense, q, k, v, do, None, False, 1.0 / math.sqrt(D), 1.0)
    h, i, j, s, _ = dense.valid_edges()
    assert torch.equal(i.long() * T + j.long(), torch.arange(50, device=DEV))


def test_dense_path_matches_kernels(monkeypatch):
    """CPU without the interpreter: the dense reference fills the same fields the same way."""
    B, Hq, Hkv, Tq, Tk, D = 2, 2, 1, 30, 41, 16
    q, k, v, do = make_tensors(B, Hq, Hkv, Tq, Tk, D, torch.float32, seed=77)
    bias = make_bias(Hq, Tq + 2, Tk, 30, seed=8)[0]
    S_probe = oracle_salience(q, k, v, do, bias, True)[2]
    threshold = quantile_threshold(S_probe, 0.8)
    caps = []
    for interp in (True, False):
        monkeypatch.setattr(capture_mod, "_use_interpreter", lambda interp=interp: interp)
        for capacity in (10_000, 40):
            cap = SalienceCapture(threshold=threshold, capacity=capacity)
            S, a = fill(cap, q, k, v, do, bias, True)
            check_capture(cap, S, a, bias, threshold, torch.float32)
            caps.append(cap)
    for c1, c2 in ((caps[0], caps[2]), (caps[1], caps[3])):
        assert int(c1.num_edges) == int(c2.num_edges)
        for t1, t2 in zip(c1.edges[:3], c2.edges[:3]):
            assert torch.equal(t1, t2)
        assert rel(c1.edges[3], c2.edges[3]) < 1e-5
        assert rel(c1.bias_scores[0], c2.bias_scores[0]) < 1e-5
        for key in ("num_candidates", "overflow", "exact"):
            assert torch.equal(c1.stats[key], c2.stats[key])


def test_fully_masked_rows_give_zero():
    """causal with Tq > Tk: rows i < Tq - Tk see no key; lse = -inf there; nothing is NaN."""
    B, H, Tq, Tk, D = 1, 2, 24, 8, 16
    q, k, v, do = make_tensors(B, H, H, Tq, Tk, D, torch.float32, seed=4)
    bias = mt.TraceBias.from_coo(torch.tensor([0, 1], device=DEV), torch.tensor([2, 20], device=DEV),
                                 torch.tensor([0, 3], device=DEV), torch.tensor([1.0, 1.0], device=DEV),
                                 num_heads=H, seq_len_q=Tq, seq_len_k=Tk)
    cap = SalienceCapture(threshold=0.0)
    S, a = fill(cap, q, k, v, do, bias, True)
    check_capture(cap, S, a, bias, 0.0, torch.float32)
    h, i, j, s, aa = cap.valid_edges()
    assert torch.all(i >= Tq - Tk)                       # no edge from a fully masked row
    assert cap.bias_scores[0][0] == 0                    # entry on a masked row scores 0
    assert cap.bias_scores[0][1] > 0


def test_refill_and_empty_bias():
    B, H, T, D = 1, 2, 16, 16
    q, k, v, do = make_tensors(B, H, H, T, T, D, torch.float32, seed=2)
    cap = SalienceCapture(threshold=1e9)
    assert not cap.filled
    with pytest.raises(RuntimeError):
        _ = cap.edges
    empty = mt.TraceBias.empty(num_heads=H, seq_len_q=T, seq_len_k=T, device=DEV)
    S, a = fill(cap, q, k, v, do, empty, False)
    assert int(cap.num_edges) == 0 and int(cap.stats["num_candidates"]) == 0
    assert float(cap.stats["kept_min_salience"]) == 0.0
    assert cap.bias_scores[0].shape == (0,)
    cap.threshold = 0.0
    S, a = fill(cap, q, k, v, do, None, False)
    check_capture(cap, S, a, None, 0.0, torch.float32)
    assert cap.bias is None


@pytest.mark.parametrize("threshold", [-0.1, float("nan"), float("inf"), "0.1", None])
def test_bad_threshold(threshold):
    with pytest.raises((ValueError, TypeError), match="threshold"):
        SalienceCapture(threshold=threshold)


@pytest.mark.parametrize("capacity", [0, -5, 1.5, 2**31, True])
def test_bad_capacity(capacity):
    with pytest.raises((ValueError, TypeError), match="capacity"):
        SalienceCapture(capacity=capacity)


def test_bad_fill_inputs():
    B, H, T, D = 1, 2, 16, 16
    q, k, v, do = make_tensors(B, H, H, T, T, D, torch.float32, seed=2)
    lse = torch.zeros(B, H, T, device=DEV)
    cap = SalienceCapture()
    with pytest.raises(ValueError, match="lse"):
        cap.fill(q, k, v, q, lse[:, :, :-1], do, None, None)
    with pytest.raises(ValueError, match="dout"):
        cap.fill(q, k, v, q, lse, do[:, :1], None, None)
    with pytest.raises(ValueError, match="head dim"):
        cap.fill(q[..., :12], k[..., :12], v[..., :12], q, lse, do[..., :12], None, None)
    bias = mt.TraceBias.empty(num_heads=H + 1, seq_len_q=T, seq_len_k=T, device=DEV)
    with pytest.raises(ValueError, match="heads"):
        cap.fill(q, k, v, q, lse, do, bias, None)
    with pytest.raises(TypeError, match="bias"):
        cap.fill(q, k, v, q, lse, do, "bias", None)
    assert not cap.filled                                # a failed fill leaves it as it was


def test_public_name():
    assert mt.SalienceCapture is SalienceCapture
    assert "capacity=131072" in repr(SalienceCapture())


def test_through_biased_attention():
    """The attention op's backward fills the capture (skipped while the op cannot run here)."""
    B, Hq, Hkv, T, D = 1, 2, 1, 24, 16
    q, k, v, do = make_tensors(B, Hq, Hkv, T, T, D, torch.float32, seed=6)
    bias = make_bias(Hq, T, T, 12, seed=6)[0]
    cap = SalienceCapture(threshold=0.0)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    try:
        out = mt.biased_attention(qq, kk, vv, bias, causal=True, capture=cap)
    except (ImportError, NotImplementedError) as exc:       # pragma: no cover
        pytest.skip(f"biased_attention unavailable: {exc}")
    out.backward(do)
    S, a = oracle_salience(q, k, v, do, bias, True)[2:]
    check_capture(cap, S, a, bias, 0.0, torch.float32)


@pytest.mark.parametrize("use_desc,hist_in_main,config,sparse_emit", [
    (False, True, (32, 32, 4, 1, 1), 0), (True, True, (16, 16, 4, 1, 1), 64), (False, False, (16, 32, 4, 1, 1), 0),
    (False, True, (32, 32, 4, 1, 0), 0), (True, False, (16, 16, 4, 1, 0), 64),
    (False, False, (16, 16, 4, 1, 0), 10**6)])
def test_kernel_variants(monkeypatch, memtrace_settings, use_desc, hist_in_main, config, sparse_emit):
    """Pointer loads vs TMA descriptors, histogram in the main pass vs its own overflow pass,
    per-tile programs (last config field 1) vs streaming programs (0, key ranges split over
    programs), ranked emission vs one atomic per candidate (sparse_emit: always, up to 64 per
    tile, never); also a non-contiguous q (descriptor not possible: falls back to pointers)."""
    monkeypatch.setattr(capture_mod, "_USE_DESC", use_desc)
    monkeypatch.setattr(capture_mod, "_HIST_IN_MAIN", hist_in_main)
    monkeypatch.setattr(capture_mod, "_CONFIG_OVERRIDE", config)
    memtrace_settings(capture_emit=sparse_emit)
    B, Hq, Hkv, Tq, Tk, D = 2, 2, 1, 40, 45, 16
    q, k, v, do = make_tensors(B, Hq, Hkv, Tq, Tk, D, torch.float16, seed=31)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)          # [B, Tq, H, D] memory, [B, H, Tq, D] view
    bias = make_bias(Hq, Tq, Tk, 30, seed=31)[0]
    for capacity in (100_000, 150):
        cap = SalienceCapture(threshold=1e-4, capacity=capacity)
        S, a = fill(cap, q, k, v, do, bias, True)
        check_capture(cap, S, a, bias, 1e-4, torch.float16)
        assert bool(cap.stats["overflow"]) == (capacity == 150)
        if capacity == 150:
            top = torch.sort(S[(S > 1e-4) & ~entry_mask(bias, S)], descending=True).values
            h, i, j, s, _ = cap.valid_edges()
            assert S[h.long(), i.long(), j.long()].min() >= top[capacity] * (1 - 1e-5)


def test_config_last_field_is_checked(monkeypatch):
    """The tile config's last field selects the kernel (0 streaming, 1 per tile); the key-split
    factor 2 it once also took is gone and is refused rather than misread."""
    monkeypatch.setattr(capture_mod, "_CONFIG_OVERRIDE", (16, 16, 4, 1, 2))
    q, k, v, do = make_tensors(1, 1, 1, 8, 8, 16, torch.float32, seed=2)
    with pytest.raises(ValueError, match="last field"):
        fill(SalienceCapture(threshold=0.0), q, k, v, do, None, False)


# ---- SPEC 3 from its text, independently of memtrace.reference (hand-computed, tiny) -------------
# The tests above compare the capture with mt.reference; these recompute S and a from the SPEC 3
# formulas in plain float64 loops (biased P, dP = dO_i . V_j with kv head h // (Hq / Hkv), mean
# over the batch, bottom-right causal mask) and check BOTH the reference and the capture, filled
# by the backward of mt.biased_attention, so a misreading shared by the two cannot pass.

def spec3_loops(q, k, v, do, coo, causal, scale=None, alpha=1.0):
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q, k, v, do = (t.detach().double().cpu() for t in (q, k, v, do))
    bias = {}
    for h, i, j, val in coo:
        if i < Tq and j < Tk:
            bias[(h, i, j)] = bias.get((h, i, j), 0.0) + val          # duplicates add (SPEC 2)
    S = torch.zeros(Hq, Tq, Tk, dtype=torch.float64)
    A = torch.zeros(Hq, Tq, Tk, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            hk = h // group
            for i in range(Tq):
                keys = [j for j in range(Tk) if not causal or j <= i + (Tk - Tq)]
                if not keys:
                    continue
                logit = {j: scale * float(q[b, h, i] @ k[b, hk, j]) + alpha * bias.get((h, i, j), 0.0)
                         for j in keys}
                m = max(logit.values())
                z = sum(math.exp(x - m) for x in logit.values())
                for j in keys:
                    p = math.exp(logit[j] - m) / z
                    S[h, i, j] += p * abs(float(do[b, h, i] @ v[b, hk, j])) / B
                    A[h, i, j] += p / B
    return S, A


def spec3_capture(q, k, v, do, coo, causal, threshold, capacity=1 << 17, scale=None, alpha=1.0, t_max=None):
    """Fill a capture through mt.biased_attention's backward; coo: [(head, i, j, value)]."""
    Hq, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    bias = None
    if coo:
        h, i, j, val = zip(*coo)
        bias = mt.TraceBias.from_coo(torch.tensor(h, device=DEV), torch.tensor(i, device=DEV),
                                     torch.tensor(j, device=DEV), torch.tensor(val, device=DEV),
                                     num_heads=Hq, seq_len_q=t_max or Tq, seq_len_k=t_max or Tk)
    cap = SalienceCapture(threshold=threshold, capacity=capacity)
    qq, kk, vv = (t.detach().to(DEV).clone().requires_grad_() for t in (q, k, v))
    out = mt.biased_attention(qq, kk, vv, bias, causal=causal, scale=scale, alpha=alpha, capture=cap)
    out.backward(do.to(DEV))
    return cap, bias


def _exact_example(dtype=torch.float32):
    """q = 0: P = 1/4 on every edge; dP[b, i, j] = r_i * c[b, j] (dO, V one-hot in dim 0), so
    S[i, j] = r_i * (|c[0, j]| + |c[1, j]|) / 8 and a = 1/4, all exact in float32."""
    B, H, T, D = 2, 1, 4, 16
    q = torch.zeros(B, H, T, D, dtype=dtype)
    k = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(0)).to(dtype)   # irrelevant
    v = torch.zeros(B, H, T, D, dtype=dtype)
    v[0, 0, :, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    v[1, 0, :, 0] = torch.tensor([3.0, 2.0, -1.0, 4.0])
    do = torch.zeros(B, H, T, D, dtype=dtype)
    do[:, 0, :, 0] = torch.tensor([0.0, 2.0, 3.0, 4.0])                 # r: row 0 has S = 0
    S = torch.tensor([[0.0, 0.0, 0.0, 0.0],
                      [1.0, 1.0, 1.0, 2.0],
                      [1.5, 1.5, 1.5, 3.0],
                      [2.0, 2.0, 2.0, 4.0]], dtype=torch.float64)[None]
    return q, k, v, do, S, torch.full_like(S, 0.25)


def _edge_set(cap):
    h, i, j, _, _ = cap.valid_edges()
    return [(int(x), int(y), int(z)) for x, y, z in zip(h, i, j)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])    # kernels / dense path
def test_spec3_exact_values_and_strict_threshold(dtype):
    q, k, v, do, S, A = _exact_example(dtype)
    S_loop, A_loop = spec3_loops(q, k, v, do, [], False)
    assert torch.equal(S_loop, S) and torch.equal(A_loop, A)
    S_ref, A_ref = R.salience(q.double(), k.double(), v.double(), do.double())
    assert torch.allclose(S_ref, S, rtol=0, atol=1e-12) and torch.allclose(A_ref, A, rtol=0, atol=1e-12)
    # thresholds exactly at edge values (strict: those edges are out), 0 (S = 0 edges are out),
    # and just under 2.0 (2 - 1e-12 rounds to 2.0f: the edges with S = 2 must stay in)
    for thr in (0.0, 1.0, 1.5, 2.0, 3.0, 4.0, 2.0 - 1e-12, 1.5 + 1e-12):
        cap, _ = spec3_capture(q, k, v, do, [], False, thr)
        want = [(0, i, j) for i in range(4) for j in range(4) if S[0, i, j] > thr]
        assert _edge_set(cap) == want, thr
        assert int(cap.stats["num_candidates"]) == len(want)
        assert not bool(cap.stats["overflow"]) and bool(cap.stats["exact"])
        kept_min = min((float(S[e]) for e in want), default=0.0)
        assert float(cap.stats["kept_min_salience"]) == kept_min
        _, _, _, s, a = cap.valid_edges()
        assert torch.equal(s.double().cpu(), torch.tensor([float(S[e]) for e in want], dtype=torch.float64))
        assert torch.all(a == 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spec3_capacity_keeps_strongest_ties_to_smaller_key(dtype):
    """12 edges over 0: 4 (3,3), 3 (2,3), then four ties at 2 ((1,3) < (3,0) < (3,1) < (3,2))."""
    q, k, v, do, S, _ = _exact_example(dtype)
    kept = {1: [(0, 3, 3)], 2: [(0, 2, 3), (0, 3, 3)],
            4: [(0, 1, 3), (0, 2, 3), (0, 3, 0), (0, 3, 3)],
            5: [(0, 1, 3), (0, 2, 3), (0, 3, 0), (0, 3, 1), (0, 3, 3)]}
    for capacity, want in kept.items():
        cap, _ = spec3_capture(q, k, v, do, [], False, 0.0, capacity=capacity)
        assert _edge_set(cap) == want, capacity
        assert int(cap.num_edges) == capacity
        assert int(cap.stats["num_candidates"]) == 12
        assert bool(cap.stats["overflow"]) and bool(cap.stats["exact"])
        assert float(cap.stats["kept_min_salience"]) == min(float(S[e]) for e in want)
    cap, _ = spec3_capture(q, k, v, do, [], False, 0.0, capacity=12)          # exactly full
    assert int(cap.num_edges) == 12 and not bool(cap.stats["overflow"])


SPEC3_CASES = [
    # B, Hq, Hkv, Tq, Tk, causal, coo (head, i, j, value), alpha, scale, t_max
    (2, 1, 1, 4, 4, False, [(0, 1, 0, 2.0), (0, 2, 3, -1.5), (0, 1, 0, 0.5)], 1.3, None, None),
    (2, 2, 1, 4, 4, True, [(0, 1, 0, 2.0), (1, 3, 3, -1.5), (0, 1, 0, 0.5), (1, 0, 2, 3.0)], 1.3, None, None),
    (2, 4, 2, 3, 4, True, [(3, 0, 1, 1.0), (1, 2, 3, -2.0), (2, 0, 3, 5.0)], 1.0, 0.4, None),
    (2, 2, 1, 4, 2, True, [(0, 0, 0, 1.0), (1, 3, 1, 2.0), (1, 2, 0, 0.5)], -0.7, None, None),
    (2, 2, 1, 4, 4, False, [(0, 3, 0, 1.0), (1, 5, 0, 0.5), (0, 2, 5, 1.0), (1, 1, 1, 0.0)], 2.0, None, 6),
]


@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,causal,coo,alpha,scale,t_max", SPEC3_CASES)
def test_spec3_independent_random(B, Hq, Hkv, Tq, Tk, causal, coo, alpha, scale, t_max):
    """Biased P, mean over the batch, query-head GQA mapping, causal masking (masked edges never
    emitted, masked / out-of-range bias entries score 0), the threshold set, and SPEC 3b: every
    bias entry (COO order, duplicates sharing their merged entry's score) scored, whatever S."""
    g = torch.Generator().manual_seed(B * 1000 + Hq * 100 + Tq * 10 + Tk)
    q, do = (torch.randn(B, Hq, Tq, 16, generator=g) for _ in range(2))
    k, v = (torch.randn(B, Hkv, Tk, 16, generator=g) for _ in range(2))
    S, A = spec3_loops(q, k, v, do, coo, causal, scale, alpha)
    # the reference agrees with the SPEC text
    dense = None
    if coo:
        h, i, j, val = (torch.tensor(x) for x in zip(*coo))
        dense = R.dense_bias(h, i, j, val.double(), Hq, Tq, Tk)
    S_ref, A_ref = R.salience(q.double(), k.double(), v.double(), do.double(), dense,
                              causal=causal, scale=scale, alpha=alpha)
    assert torch.allclose(S_ref, S, rtol=1e-12, atol=1e-14) and torch.allclose(A_ref, A, rtol=1e-12, atol=1e-14)
    # discriminating: the unbiased P, or the batch sum, would give other numbers
    S_unbiased, _ = spec3_loops(q, k, v, do, [], causal, scale, alpha)
    assert (S_unbiased - S).abs().max() > 1e-3
    entries = {(h, i, j) for h, i, j, _ in coo}
    free = [(h, i, j) for h in range(Hq) for i in range(Tq) for j in range(Tk)
            if (h, i, j) not in entries and S[h, i, j] > 0]
    vals = sorted({float(S[e]) for e in free})
    threshold = 0.5 * (vals[len(vals) // 3] + vals[len(vals) // 3 + 1])     # between two values
    cap, bias = spec3_capture(q, k, v, do, coo, causal, threshold, scale=scale, alpha=alpha, t_max=t_max)
    want = [e for e in free if S[e] > threshold]
    assert _edge_set(cap) == want
    masked = [(h, i, j) for h in range(Hq) for i in range(Tq) for j in range(Tk) if causal and j > i + Tk - Tq]
    assert not set(_edge_set(cap)) & set(masked)
    assert int(cap.stats["num_candidates"]) == len(want) and not bool(cap.stats["overflow"])
    h, i, j, s, a = cap.valid_edges()
    idx = (h.long().cpu(), i.long().cpu(), j.long().cpu())
    assert torch.allclose(s.double().cpu(), S[idx], rtol=1e-5, atol=1e-7)
    assert torch.allclose(a.double().cpu(), A[idx], rtol=1e-5, atol=1e-7)
    assert abs(float(cap.stats["kept_min_salience"]) - float(S[idx].min())) <= 1e-5 * float(S[idx].min())
    bS, bA = cap.bias_scores
    eS = torch.tensor([float(S[e[:3]]) if e[1] < Tq and e[2] < Tk else 0.0 for e in coo], dtype=torch.float64)
    eA = torch.tensor([float(A[e[:3]]) if e[1] < Tq and e[2] < Tk else 0.0 for e in coo], dtype=torch.float64)
    assert torch.allclose(bS.double().cpu(), eS, rtol=1e-5, atol=1e-7)
    assert torch.allclose(bA.double().cpu(), eA, rtol=1e-5, atol=1e-7)
