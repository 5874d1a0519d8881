"""Interpreter parity of kernels/attention.py and kernels/correction.py against the float64 oracle.

Runs on the CPU under TRITON_INTERPRET=1 (set below when no GPU is present). Shapes are tiny: the
interpreter is slow. fp16 and fp32 only (the interpreter cannot do a bf16 tl.dot).
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from memtrace.bias import TraceBias  # noqa: E402
import importlib  # noqa: E402
ref = importlib.import_module("memtrace.reference.attention")
from memtrace.kernels import attention as ka  # noqa: E402
from memtrace.kernels import correction as kc  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3}


def rel(a, b):
    """||a - b|| / ||b||, with ||b|| floored at 0.05 * sqrt(numel) so that an exactly-zero oracle
    (a single visible key has zero gradient) is compared in absolute terms."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    floor = 0.05 * max(b.numel(), 1) ** 0.5
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def make_bias(Hq, Tq_max, Tk_max, n, seed, scale_vals=1.0, dups=True, extra=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(0, Hq, (n,), generator=g)
    i = torch.randint(0, Tq_max, (n,), generator=g)
    j = torch.randint(0, Tk_max, (n,), generator=g)
    val = torch.randn(n, generator=g) * scale_vals
    if dups and n >= 6:
        h[-2:], i[-2:], j[-2:] = h[0], i[0], j[0]
    if extra is not None:
        eh, ei, ej, ev = extra
        h, i, j, val = torch.cat([h, eh]), torch.cat([i, ei]), torch.cat([j, ej]), torch.cat([val, ev])
    b = TraceBias.from_coo(h.to(DEV), i.to(DEV), j.to(DEV), val.to(DEV), num_heads=Hq,
                           seq_len_q=Tq_max, seq_len_k=Tk_max)
    return b, (h, i, j, val)


def inputs(B, Hq, Hkv, Tq, Tk, D, dtype, seed, qk_mult=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, Tq, D, generator=g) * qk_mult).to(dtype).to(DEV)
    k = (torch.randn(B, Hkv, Tk, D, generator=g) * qk_mult).to(dtype).to(DEV)
    v = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype).to(DEV)
    do = torch.randn(B, Hq, Tq, D, generator=g).to(dtype).to(DEV)
    return q, k, v, do


def oracle(q, k, v, do, coo, Hq, Tq_max, Tk_max, causal, scale, alpha):
    """float64 out, lse, dq, dk, dv and the dense bias gradient [H, Tq, Tk] (alpha * sum_b dS)."""
    Tq, Tk = q.shape[2], k.shape[2]
    qd, kd, vd = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    if coo is None:
        dense = torch.zeros(Hq, Tq, Tk, dtype=torch.float64)
    else:
        h, i, j, val = coo
        dense = ref.dense_bias(h, i, j, val, Hq, Tq, Tk)
    dense.requires_grad_()
    out, lse = ref.attention_with_lse(qd, kd, vd, dense, causal=causal, scale=scale, alpha=alpha)
    out.backward(do.double().cpu())
    return out.detach(), lse.detach(), qd.grad, kd.grad, vd.grad, dense.grad


def expected_dvalues(bias, dense_grad):
    """dvalues per sorted entry: the dense gradient at the entry for leaders inside the call's
    (Tq, Tk), 0 for duplicate followers and entries outside."""
    eh, ei, ej = (t.cpu() for t in bias.entry_coords())
    Hq, Tq, Tk = dense_grad.shape
    inside = (ei < Tq) & (ej < Tk)
    out = torch.zeros(bias.nnz, dtype=torch.float64)
    out[inside] = dense_grad[eh[inside], ei[inside], ej[inside]]
    pos = bias.entry_pos.cpu()
    follower = torch.zeros(bias.nnz, dtype=torch.bool)
    if bias.nnz > 1:
        follower[1:] = (pos[1:] == pos[:-1]) & (eh[1:] == eh[:-1])
    out[follower] = 0
    return out


CASES = [
    # B, Hq, Hkv, Tq, Tk, D, causal, n_entries, Tq_max, Tk_max
    (1, 2, 2, 19, 23, 16, False, 40, 19, 23),
    (2, 4, 2, 21, 9, 32, True, 50, 30, 12),     # Tq > Tk: fully masked rows; bias built bigger
    (1, 2, 1, 7, 33, 16, True, 30, 7, 40),      # Tq < Tk, GQA 2:1, entries past Tk
    (1, 1, 1, 1, 1, 16, False, 3, 1, 1),
    (2, 2, 2, 33, 33, 16, True, 0, 33, 33),     # empty bias
    (1, 1, 1, 20, 24, 16, True, 300, 20, 24),   # dense entries: many chunks per block (pipelining)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_flash_fwd_bwd_matches_oracle(case, dtype):
    B, Hq, Hkv, Tq, Tk, D, causal, n, Tq_max, Tk_max = case
    scale, alpha = 1.0 / math.sqrt(D), 0.7
    q, k, v, do = inputs(B, Hq, Hkv, Tq, Tk, D, dtype, seed=n + Tq)
    bias, coo = make_bias(Hq, Tq_max, Tk_max, n, seed=Tk, scale_vals=2.0)
    ev = bias.entry_values()
    out, lse = ka.flash_fwd(q, k, v, bias, ev, causal=causal, scale=scale, alpha=alpha)
    r_out, r_lse, r_dq, r_dk, r_dv, r_db = oracle(q, k, v, do, coo, Hq, Tq_max, Tk_max, causal, scale, alpha)
    tol = TOL[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert rel(out, r_out) < tol
    finite = torch.isfinite(r_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert rel(lse.cpu()[finite], r_lse[finite]) < 1e-5
    dq, dk, dv, dvals = ka.flash_bwd(q, k, v, out, lse, do, bias, ev, causal=causal, scale=scale,
                                     alpha=alpha, need_dvalues=True)
    for got, want in ((dq, r_dq), (dk, r_dk), (dv, r_dv)):
        assert got.dtype == dtype and got.shape == want.shape
        assert not torch.isnan(got).any()
        assert rel(got, want) < tol
    want_dv = expected_dvalues(bias, r_db)
    assert dvals.shape == (bias.nnz,)
    if bias.nnz:
        assert rel(dvals.cpu(), want_dv) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES[:3])
def test_correction_after_dense_matches_oracle(case, dtype):
    """correct_fwd on the unbiased (out, lse); correct_bwd on a dense backward fed (O', LSE')."""
    B, Hq, Hkv, Tq, Tk, D, causal, n, Tq_max, Tk_max = case
    scale, alpha = 1.0 / math.sqrt(D), 1.3
    q, k, v, do = inputs(B, Hq, Hkv, Tq, Tk, D, dtype, seed=7 + n)
    bias, coo = make_bias(Hq, Tq_max, Tk_max, n, seed=11 + n, scale_vals=2.0)
    ev = bias.entry_values()
    out0, lse0 = ka.flash_fwd(q, k, v, None, causal=causal, scale=scale, alpha=alpha)
    out, lse = kc.correct_fwd(q, k, v, out0, lse0, bias, ev, causal=causal, scale=scale, alpha=alpha)
    assert out.data_ptr() == out0.data_ptr()  # in place
    r_out, r_lse, r_dq, r_dk, r_dv, r_db = oracle(q, k, v, do, coo, Hq, Tq_max, Tk_max, causal, scale, alpha)
    tol = TOL[dtype]
    assert rel(out, r_out) < tol
    finite = torch.isfinite(r_lse)
    assert rel(lse.cpu()[finite], r_lse[finite]) < 1e-5
    dq, dk, dv, _ = ka.flash_bwd(q, k, v, out, lse, do, None, causal=causal, scale=scale, alpha=alpha,
                                 need_dvalues=False)
    dq, dk, dv, dvals = kc.correct_bwd(q, k, v, out, lse, do, bias, ev, dq, dk, dv, causal=causal,
                                       scale=scale, alpha=alpha, need_dvalues=True)
    for got, want in ((dq, r_dq), (dk, r_dk), (dv, r_dv)):
        assert rel(got, want) < tol
    assert rel(dvals.cpu(), expected_dvalues(bias, r_db)) < tol


@pytest.mark.parametrize("big", [40.0, -40.0])
def test_large_biases(big):
    """Large positive biases (no overflow in the shifted frame) and large negative ones on
    random edges; fp32."""
    B, Hq, Hkv, Tq, Tk, D = 1, 2, 2, 17, 20, 16
    q, k, v, do = inputs(B, Hq, Hkv, Tq, Tk, D, torch.float32, seed=3)
    bias, coo = make_bias(Hq, Tq, Tk, 60, seed=5, scale_vals=1.0)
    h, i, j, val = coo
    val = torch.full_like(val, big) * torch.rand(val.shape, generator=torch.Generator().manual_seed(1))
    bias = TraceBias.from_coo(h.to(DEV), i.to(DEV), j.to(DEV), val.to(DEV), num_heads=Hq, seq_len_q=Tq, seq_len_k=Tk)
    coo = (h, i, j, val)
    ev = bias.entry_values()
    out, lse = ka.flash_fwd(q, k, v, bias, ev, causal=False, scale=0.25, alpha=1.0)
    r_out, r_lse, r_dq, r_dk, r_dv, r_db = oracle(q, k, v, do, coo, Hq, Tq, Tk, False, 0.25, 1.0)
    assert rel(out, r_out) < 1e-5 and rel(lse.cpu(), r_lse) < 1e-5
    dq, dk, dv, dvals = ka.flash_bwd(q, k, v, out, lse, do, bias, ev, causal=False, scale=0.25, alpha=1.0,
                                     need_dvalues=True)
    for got, want in ((dq, r_dq), (dk, r_dk), (dv, r_dv)):
        assert rel(got, want) < 1e-5
    assert rel(dvals.cpu(), expected_dvalues(bias, r_db)) < 1e-5


def test_cancellation_forward_falls_back():
    """Entries on each row's dominant edge with a bias of -30: 1 + sum w ~ 1e-6, the identity
    cancels; the fused forward must recompute those blocks exactly."""
    B, Hq, Tq, Tk, D = 1, 1, 16, 16, 16
    g = torch.Generator().manual_seed(0)
    k = torch.randn(B, Hq, Tk, D, generator=g)
    q = 4.0 * k[:, :, torch.arange(Tq) % Tk] + 0.1 * torch.randn(B, Hq, Tq, D, generator=g)
    v = torch.randn(B, Hq, Tk, D, generator=g)
    do = torch.randn(B, Hq, Tq, D, generator=g)
    i = torch.arange(Tq)
    coo = (torch.zeros_like(i), i, i % Tk, torch.full((Tq,), -30.0))
    q, k, v, do = (t.to(DEV) for t in (q, k, v, do))
    bias = TraceBias.from_coo(*(t.to(DEV) for t in coo), num_heads=1, seq_len_q=Tq, seq_len_k=Tk)
    out, lse = ka.flash_fwd(q, k, v, bias, bias.entry_values(), causal=False, scale=1.0, alpha=1.0)
    r_out, r_lse, *_ = oracle(q, k, v, do, coo, 1, Tq, Tk, False, 1.0, 1.0)
    assert rel(out, r_out) < 1e-5 and rel(lse.cpu(), r_lse) < 1e-5


def test_cancellation_standalone_correction_falls_back():
    B, Hq, Tq, Tk, D = 1, 1, 16, 16, 16
    g = torch.Generator().manual_seed(1)
    k = torch.randn(B, Hq, Tk, D, generator=g)
    q = 4.0 * k + 0.1 * torch.randn(B, Hq, Tq, D, generator=g)
    v = torch.randn(B, Hq, Tk, D, generator=g)
    i = torch.arange(0, Tq, 2)   # every other row cancels; the others hold no entry
    coo = (torch.zeros_like(i), i, i, torch.full(i.shape, -30.0))
    q, k, v = (t.to(DEV) for t in (q, k, v))
    bias = TraceBias.from_coo(*(t.to(DEV) for t in coo), num_heads=1, seq_len_q=Tq, seq_len_k=Tk)
    out0, lse0 = ka.flash_fwd(q, k, v, None, causal=True, scale=1.0, alpha=1.0)
    out, lse = kc.correct_fwd(q, k, v, out0, lse0, bias, bias.entry_values(), causal=True, scale=1.0, alpha=1.0)
    r_out, r_lse, *_ = oracle(q, k, v, v, coo, 1, Tq, Tk, True, 1.0, 1.0)
    assert rel(out, r_out) < 1e-5 and rel(lse.cpu(), r_lse) < 1e-5
