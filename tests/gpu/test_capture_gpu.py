"""Salience capture on the GPU (Triton path) against the float64 oracle, realistic shapes.

Skipped without CUDA (tests/gpu/conftest.py). bf16 is tested here (the CPU interpreter cannot).
"""

import pytest
import torch
from _helpers import TOL, entry_mask, oracle_salience, rel_err

import memtrace as mt
from memtrace import capture as capture_mod
from memtrace.capture import SalienceCapture

DEV = "cuda"


def _inputs(B, Hq, Hkv, Tq, Tk, D, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, device=DEV, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Tk, D, device=DEV, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Tk, D, device=DEV, generator=g).to(dtype)
    do = torch.randn(B, Hq, Tq, D, device=DEV, generator=g).to(dtype)
    return q, k, v, do


def _bias(Hq, Tq_max, Tk_max, n, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    h = torch.randint(0, Hq, (n,), device=DEV, generator=g)
    i = torch.randint(0, Tq_max, (n,), device=DEV, generator=g)
    j = torch.randint(0, Tk_max, (n,), device=DEV, generator=g)
    val = torch.randn(n, device=DEV, generator=g)
    h[-3:], i[-3:], j[-3:] = h[0], i[0], j[0]            # duplicates add
    return mt.TraceBias.from_coo(h, i, j, val, num_heads=Hq, seq_len_q=Tq_max, seq_len_k=Tk_max)


def _rel(got, ref):
    return rel_err(got, ref, norm_floor=1e-30)


def _check(cap, S, a, bias, threshold, dtype, margin=1e-4):
    n = int(cap.num_edges)
    h, i, j, s, aa = (t[:n].long() if t.dtype == torch.int32 else t[:n] for t in cap.edges)
    key = (h * S.shape[1] + i) * S.shape[2] + j
    assert torch.all(key[1:] > key[:-1]), "edges must be unique and sorted by (head, q, k)"
    for t in cap.edges:
        assert torch.all(t[n:] == 0)
    ent = entry_mask(bias, S)
    assert not ent[h, i, j].any(), "bias entries are reported in bias_scores, not as edges"
    assert _rel(s, S[h, i, j]) < TOL[dtype]
    assert _rel(aa, a[h, i, j]) < TOL[dtype]
    emitted = torch.zeros_like(ent)
    emitted[h, i, j] = True
    sure_in = (S > threshold * (1 + margin) + 1e-12) & ~ent
    sure_out = (S <= threshold * (1 - margin)) | ent
    if not bool(cap.stats["overflow"]):
        assert torch.all(emitted[sure_in]), "an edge over the threshold is missing"
    assert not torch.any(emitted & sure_out), "an edge under the threshold was emitted"
    assert torch.isfinite(s).all() and torch.isfinite(aa).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_fill_parity(dtype, causal):
    B, Hq, Hkv, Tq, Tk, D = 2, 4, 2, 300, 517, 64
    q, k, v, do = _inputs(B, Hq, Hkv, Tq, Tk, D, dtype, seed=1)
    bias = _bias(Hq, 400, 600, 500, seed=2)                   # some entries past (Tq, Tk)
    out, lse, S, a = oracle_salience(q, k, v, do, bias, causal)
    threshold = float(torch.quantile(S.flatten()[::7].float(), 0.995))
    cap = SalienceCapture(threshold=threshold)
    cap.fill(q, k, v, out.to(dtype), lse.float(), do, bias, bias.entry_values(), causal=causal)
    _check(cap, S, a, bias, threshold, dtype)
    assert not bool(cap.stats["overflow"]) and bool(cap.stats["exact"])
    bS, ba = cap.bias_scores
    inside = (bias.q_idx < Tq) & (bias.k_idx < Tk)
    hh, ii, jj = bias.head, bias.q_idx.clamp(max=Tq - 1), bias.k_idx.clamp(max=Tk - 1)
    refS = torch.where(inside, S[hh, ii, jj], torch.zeros((), dtype=S.dtype, device=DEV))
    refa = torch.where(inside, a[hh, ii, jj], torch.zeros((), dtype=S.dtype, device=DEV))
    assert _rel(bS, refS) < TOL[dtype] and _rel(ba, refa) < TOL[dtype]
    assert cap.num_heads == Hq and cap.seq_len_q == Tq and cap.seq_len_k == Tk


@pytest.mark.parametrize("sparse_emit", [512, 0])
@pytest.mark.parametrize("D", [32, 128])
def test_fill_realistic_bf16(D, sparse_emit, memtrace_settings):
    """Per-candidate (512) and ranked (0) emission of the streaming kernel."""
    memtrace_settings(capture_emit=sparse_emit)
    B, H, T = 2, 4, 1024
    q, k, v, do = _inputs(B, H, H, T, T, D, torch.bfloat16, seed=3)
    out, lse, S, a = oracle_salience(q, k, v, do, None, False)
    threshold = float(torch.quantile(S.flatten()[::11].float(), 0.999))
    cap = SalienceCapture(threshold=threshold)
    cap.fill(q, k, v, out.bfloat16(), lse.float(), do, None, None)
    _check(cap, S, a, None, threshold, torch.bfloat16)
    assert cap.bias_scores is None


def test_per_tile_kernel(monkeypatch):
    """The per-tile PASS 0 (config's last field 1; the streaming kernel is the default), causal
    with Tq != Tk and a bias, at the H100 tiles."""
    monkeypatch.setattr(capture_mod, "_CONFIG_OVERRIDE", (128, 64, 8, 2, 1))
    B, Hq, Hkv, Tq, Tk, D = 2, 4, 2, 700, 1000, 128
    q, k, v, do = _inputs(B, Hq, Hkv, Tq, Tk, D, torch.bfloat16, seed=5)
    bias = _bias(Hq, Tq, Tk, 300, seed=5)
    out, lse, S, a = oracle_salience(q, k, v, do, bias, True)
    threshold = float(torch.quantile(S.flatten()[::7].float(), 0.998))
    cap = SalienceCapture(threshold=threshold)
    cap.fill(q, k, v, out.bfloat16(), lse.float(), do, bias, bias.entry_values(), causal=True)
    _check(cap, S, a, bias, threshold, torch.bfloat16)


@pytest.mark.parametrize("sparse_emit", [512, 0])
def test_overflow_keeps_strongest(sparse_emit, memtrace_settings):
    memtrace_settings(capture_emit=sparse_emit)
    B, H, T, D = 2, 4, 512, 64
    q, k, v, do = _inputs(B, H, H, T, T, D, torch.float16, seed=4)
    out, lse, S, a = oracle_salience(q, k, v, do, None, False)
    capacity = 5000
    cap = SalienceCapture(threshold=0.0, capacity=capacity)
    cap.fill(q, k, v, out.half(), lse.float(), do, None, None)
    assert bool(cap.stats["overflow"]) and bool(cap.stats["exact"])
    assert int(cap.num_edges) == capacity
    assert int(cap.stats["num_candidates"]) == int((S > 0).sum())
    top = torch.sort(S.flatten(), descending=True).values
    cut_in, cut_out = top[capacity - 1].item(), top[capacity].item()
    h, i, j, s, _ = cap.valid_edges()
    kept = S[h.long(), i.long(), j.long()]
    # Every kept edge is among the strongest (up to float32 rounding near the cut).
    assert kept.min().item() >= cut_out * (1 - 1e-5)
    assert abs(float(cap.stats["kept_min_salience"]) - cut_in) <= 1e-4 * cut_in


def test_fully_masked_rows_and_biased_attention():
    """causal with Tq > Tk: the first Tq - Tk rows see no key (P = 0, no NaN); through the op."""
    B, Hq, Hkv, Tq, Tk, D = 2, 4, 1, 160, 96, 64
    q, k, v, do = _inputs(B, Hq, Hkv, Tq, Tk, D, torch.bfloat16, seed=5)
    bias = _bias(Hq, Tq, Tk, 300, seed=6)
    out, lse, S, a = oracle_salience(q, k, v, do, bias, True)
    threshold = float(torch.quantile(S.flatten().float(), 0.99))
    cap = SalienceCapture(threshold=threshold)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    o = mt.biased_attention(qq, kk, vv, bias, causal=True, capture=cap)
    o.backward(do)
    assert cap.filled
    _check(cap, S, a, bias, threshold, torch.bfloat16, margin=1e-2)
    assert torch.isfinite(cap.bias_scores[0]).all()
    assert float(cap.stats["kept_min_salience"]) > threshold


def _capture_via_op(q, k, v, do, bias, causal, threshold, fused, memtrace_env, capacity=1 << 17):
    memtrace_env.set("MEMTRACE_CAPTURE_FUSED", "1" if fused else "0")
    cap = SalienceCapture(threshold=threshold, capacity=capacity)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    mt.biased_attention(qq, kk, vv, bias, causal=causal, capture=cap, backend="triton").backward(do)
    return cap, (qq.grad, kk.grad, vv.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 2, 300, 517, 64), (4, 4, 4, 1024, 1024, 128)])
def test_fused_capture_through_triton(shape, causal, dtype, memtrace_env):
    """The Triton backward's salience bound + segment rescoring against the oracle and against
    the unfused fill (every tile scored): the same edges up to float32 noise at the threshold,
    the same gradients."""
    B, Hq, Hkv, Tq, Tk, D = shape
    q, k, v, do = _inputs(B, Hq, Hkv, Tq, Tk, D, dtype, seed=Tq + D)
    bias = _bias(Hq, Tq + 50, Tk + 50, 4 * Tq, seed=Tk)
    out, lse, S, a = oracle_salience(q, k, v, do, bias, causal)
    threshold = float(torch.quantile(S.flatten()[::13].float(), 0.999))
    fused, g_f = _capture_via_op(q, k, v, do, bias, causal, threshold, True, memtrace_env)
    plain, g_p = _capture_via_op(q, k, v, do, bias, causal, threshold, False, memtrace_env)
    _check(fused, S, a, bias, threshold, dtype, margin=1e-2)
    assert not bool(fused.stats["overflow"])
    for x, y in zip(g_f, g_p):
        assert torch.equal(x, y)
    keys = []
    for cap in (fused, plain):
        n = int(cap.num_edges)
        h, i, j = (t[:n].long() for t in cap.edges[:3])
        keys.append(dict(zip(((h * Tq + i) * Tk + j).tolist(), cap.edges[3][:n].tolist())))
    for key in set(keys[0]) ^ set(keys[1]):
        s = keys[0].get(key, keys[1].get(key))
        assert abs(s - threshold) <= 1e-5 * threshold, "fused and unfused differ away from the threshold"
    for key in set(keys[0]) & set(keys[1]):
        assert abs(keys[0][key] - keys[1][key]) <= 1e-5 * keys[1][key] + 1e-12
    bf, bp = fused.bias_scores, plain.bias_scores
    assert torch.equal(bf[0], bp[0]) and torch.equal(bf[1], bp[1])


def test_fused_capture_overflow(memtrace_env):
    """Threshold 0: everything is a candidate; the fused fill overflows into the exact passes."""
    B, H, T, D = 2, 2, 512, 64
    q, k, v, do = _inputs(B, H, H, T, T, D, torch.bfloat16, seed=8)
    out, lse, S, a = oracle_salience(q, k, v, do, None, True)
    fused, _ = _capture_via_op(q, k, v, do, None, True, 0.0, True, memtrace_env, capacity=5000)
    assert bool(fused.stats["overflow"]) and int(fused.num_edges) == 5000
    _check(fused, S, a, None, 0.0, torch.bfloat16, margin=1e-2)
    n = int(fused.num_edges)
    h, i, j = (t[:n].long() for t in fused.edges[:3])
    rest = S.clone()
    rest[h, i, j] = -1
    assert S[h, i, j].min() >= rest.max() * (1 - 2e-2)


def test_auto_runs_a_capture_on_triton(memtrace_env, monkeypatch):
    memtrace_env.unset("MEMTRACE_BACKEND")
    memtrace_env.unset("MEMTRACE_CAPTURE_FUSED")
    from memtrace import attention as A
    q, k, v, do = _inputs(2, 4, 4, 512, 512, 128, torch.bfloat16, seed=9)
    assert A._prefers_triton(q, k, v, None, False, SalienceCapture(1e-3))


def test_fill_glue_graph_matches_eager(monkeypatch, memtrace_settings):
    """The fill's glue replayed as a CUDA graph, shared by captures across shapes, thresholds and an
    overflow, gives exactly what the eager glue gives (and each capture keeps its own results)."""
    calls = [  # B, Hq, Tq, Tk, quantile of S for the threshold (None: 0, overflowing), capacity
        (2, 4, 300, 500, 0.995, 4096), (1, 4, 200, 700, 0.995, 4096), (2, 4, 300, 500, None, 4096),
        (2, 4, 300, 500, 0.98, 4096), (2, 2, 128, 64, 0.9, 1000)]
    results = {}
    for graph in (False, True):
        memtrace_settings(capture_graph=graph)
        capture_mod._GLUE_CACHE.clear()
        caps = []
        for n, (B, Hq, Tq, Tk, quant, capacity) in enumerate(calls):
            q, k, v, do = _inputs(B, Hq, Hq, Tq, Tk, 64, torch.bfloat16, seed=40 + n)
            out, lse, S, _ = oracle_salience(q, k, v, do, None, False)
            thr = 0.0 if quant is None else float(S.flatten().quantile(quant))
            cap = SalienceCapture(threshold=thr, capacity=capacity)
            cap.fill(q, k, v, out.to(q.dtype), lse.float(), do, None, None)
            caps.append(cap)
        assert bool(caps[2].stats["overflow"]) and not bool(caps[0].stats["overflow"])
        results[graph] = caps
    for eager, replayed in zip(results[False], results[True]):
        for a, b in zip(eager.edges, replayed.edges):
            assert torch.equal(a, b)
        assert torch.equal(eager.num_edges, replayed.num_edges)
        for name in eager.stats:
            assert torch.equal(eager.stats[name], replayed.stats[name]), name
    assert capture_mod._GLUE_CACHE        # the graph path kept its shared glue
