"""GPU parity of the Triton attention kernels (fused and standalone correction) at realistic
shapes against the float64 oracle (SPEC 7 tolerances). Skipped without CUDA (see conftest)."""
import importlib
import math
import os

import pytest
import torch

os.environ.setdefault("MEMTRACE_ATTN_TUNE", "0")  # one config per kernel: tests compile, not tune

from memtrace.bias import TraceBias
from memtrace.kernels import attention as ka
from memtrace.kernels import correction as kc

ref = importlib.import_module("memtrace.reference.attention")
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(0.05 * b.numel() ** 0.5)).item()


def setup(B, Hq, Hkv, Tq, Tk, D, dtype, n_per_head, seed, spread=2.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(B, Hkv, Tk, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(B, Hkv, Tk, D, device="cuda", generator=g).to(dtype)
    do = torch.randn(B, Hq, Tq, D, device="cuda", generator=g).to(dtype)
    n = n_per_head * Hq
    h = torch.randint(0, Hq, (n,), device="cuda", generator=g)
    i = torch.randint(0, Tq, (n,), device="cuda", generator=g)
    # half the entries near the diagonal (clustered), half anywhere
    j = torch.where(torch.rand(n, device="cuda", generator=g) < 0.5,
                    (i + Tk - Tq - torch.randint(0, 64, (n,), device="cuda", generator=g)).clamp(0, Tk - 1),
                    torch.randint(0, Tk, (n,), device="cuda", generator=g))
    val = torch.randn(n, device="cuda", generator=g) * spread
    h, i, j, val = torch.cat([h, h[:8]]), torch.cat([i, i[:8]]), torch.cat([j, j[:8]]), torch.cat([val, val[:8]])
    bias = TraceBias.from_coo(h, i, j, val, num_heads=Hq, seq_len_q=Tq, seq_len_k=Tk)
    return q, k, v, do, bias, (h, i, j, val)


def oracle(q, k, v, do, coo, Hq, causal, scale, alpha):
    Tq, Tk = q.shape[2], k.shape[2]
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    dense = ref.dense_bias(*coo, Hq, Tq, Tk).requires_grad_()
    out, lse = ref.attention_with_lse(qd, kd, vd, dense, causal=causal, scale=scale, alpha=alpha)
    out.backward(do.double())
    return out.detach(), lse.detach(), qd.grad, kd.grad, vd.grad, dense.grad


def expected_dvalues(bias, dense_grad):
    eh, ei, ej = bias.entry_coords()
    out = dense_grad[eh, ei, ej].clone()
    pos = bias.entry_pos
    follower = torch.zeros(bias.nnz, dtype=torch.bool, device=pos.device)
    follower[1:] = (pos[1:] == pos[:-1]) & (eh[1:] == eh[:-1])
    out[follower] = 0
    return out


SHAPES = [
    # B, Hq, Hkv, Tq, Tk, D, causal
    (2, 4, 4, 512, 512, 128, False),
    (2, 4, 4, 512, 512, 128, True),
    (1, 8, 2, 333, 700, 64, True),      # GQA, Tq < Tk, odd
    (1, 4, 4, 700, 257, 64, True),      # Tq > Tk: fully masked rows
    (2, 2, 1, 300, 300, 32, False),
    (1, 2, 2, 200, 190, 16, False),
]


MATRIX = [(s, torch.bfloat16) for s in SHAPES] + [(SHAPES[1], torch.float16), (SHAPES[2], torch.float16),
                                                   (SHAPES[0], torch.float32), (SHAPES[3], torch.float32)]


@pytest.mark.parametrize("shape,dtype", MATRIX)
def test_fused_fwd_bwd(shape, dtype):
    B, Hq, Hkv, Tq, Tk, D, causal = shape
    scale, alpha = 1.0 / math.sqrt(D), 0.8
    q, k, v, do, bias, coo = setup(B, Hq, Hkv, Tq, Tk, D, dtype, 200, seed=Tq + D)
    ev = bias.entry_values()
    out, lse = ka.flash_fwd(q, k, v, bias, ev, causal=causal, scale=scale, alpha=alpha)
    dq, dk, dv, dval = ka.flash_bwd(q, k, v, out, lse, do, bias, ev, causal=causal, scale=scale, alpha=alpha,
                                    need_dvalues=True)
    r = oracle(q, k, v, do, coo, Hq, causal, scale, alpha)
    tol = TOL[dtype]
    assert rel(out, r[0]) < tol
    fin = torch.isfinite(r[1])
    assert torch.equal(torch.isfinite(lse), fin)
    assert rel(lse[fin], r[1][fin]) < 1e-4
    for got, want in zip((dq, dk, dv), r[2:5]):
        assert not torch.isnan(got).any()
        assert rel(got, want) < tol
    assert rel(dval, expected_dvalues(bias, r[5])) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_standalone_correction(shape, dtype):
    B, Hq, Hkv, Tq, Tk, D, causal = shape
    scale, alpha = 1.0 / math.sqrt(D), 1.2
    q, k, v, do, bias, coo = setup(B, Hq, Hkv, Tq, Tk, D, dtype, 300, seed=3 * Tq + D)
    ev = bias.entry_values()
    out0, lse0 = ka.flash_fwd(q, k, v, None, causal=causal, scale=scale, alpha=alpha)
    out, lse = kc.correct_fwd(q, k, v, out0, lse0, bias, ev, causal=causal, scale=scale, alpha=alpha)
    dq, dk, dv, _ = ka.flash_bwd(q, k, v, out, lse, do, None, causal=causal, scale=scale, alpha=alpha,
                                 need_dvalues=False)
    dq, dk, dv, dval = kc.correct_bwd(q, k, v, out, lse, do, bias, ev, dq, dk, dv, causal=causal, scale=scale,
                                      alpha=alpha, need_dvalues=True)
    r = oracle(q, k, v, do, coo, Hq, causal, scale, alpha)
    tol = TOL[dtype]
    assert rel(out, r[0]) < tol
    for got, want in zip((dq, dk, dv), r[2:5]):
        assert rel(got, want) < tol
    assert rel(dval, expected_dvalues(bias, r[5])) < tol


def test_no_bias_matches_sdpa():
    q, k, v, do, _, _ = setup(2, 8, 8, 1024, 1024, 128, torch.bfloat16, 1, seed=0)
    for causal in (False, True):
        out, _ = ka.flash_fwd(q, k, v, None, causal=causal, scale=1 / math.sqrt(128), alpha=1.0)
        want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
        assert rel(out, want) < 1e-2
