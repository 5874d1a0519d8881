"""key_padding_mask and tensor alpha on CUDA (the triton backend; bf16 too, realistic shapes)
against the float64 reference with the mask: outputs, gradients of q, k, v and the bias values,
the capture, tensor alpha without a host sync, auto routing. Run: python -m pytest tests/gpu/test_padding_mask_gpu.py
"""
import pytest
import torch
from _helpers import TOL, check_capture, rel_err

import memtrace as mt
from memtrace import reference as R
from memtrace.backends import registry

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"


def make_inputs(B, Hq, Hkv, Tq, Tk, D, dtype, *, per_head=256, seed=0):
    """q, k, v (requiring grad) and a TraceBias of per_head entries per head, values in [-1, 2),
    half of them within 64 keys left of the (bottom-right) diagonal."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    shapes = ((B, Hq, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D))
    q, k, v = (torch.randn(s, device=DEV, generator=g).to(dtype).requires_grad_(True) for s in shapes)
    n = Hq * per_head
    head = torch.randint(0, Hq, (n,), device=DEV, generator=g)
    q_idx = torch.randint(0, Tq, (n,), device=DEV, generator=g)
    near = (q_idx + (Tk - Tq) - torch.randint(0, 64, (n,), device=DEV, generator=g)).clamp(0, Tk - 1)
    far = torch.randint(0, Tk, (n,), device=DEV, generator=g)
    k_idx = torch.where(torch.arange(n, device=DEV) % 2 == 0, near, far)
    value = (3 * torch.rand(n, device=DEV, generator=g) - 1).requires_grad_(True)
    bias = mt.TraceBias.from_coo(head, q_idx, k_idx, value, num_heads=Hq, seq_len_q=Tq, seq_len_k=Tk)
    return q, k, v, bias, (head, q_idx, k_idx, value)


def make_mask(kind, B, Tk, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    m = torch.ones(B, Tk, dtype=torch.bool, device=DEV)
    if kind == "random":
        m = torch.rand(B, Tk, device=DEV, generator=g) > 0.3
    elif kind == "left10":
        m[:, : Tk // 10] = False
        m[0, : Tk // 2] = False
    elif kind == "right":
        m[0, Tk - Tk // 3:] = False
        m[-1, Tk - 7:] = False
    elif kind == "empty_row":
        m[0] = False
    return m


def oracle(q, k, v, coo, dout, mask, *, causal, alpha):
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    head, q_idx, k_idx, value = coo
    val64 = value.detach().double().requires_grad_(True)
    dense = R.dense_bias(head, q_idx, k_idx, val64, q.shape[1], q.shape[2], k.shape[2])
    out = R.attention(q64, k64, v64, dense, causal=causal, alpha=alpha, key_padding_mask=mask)
    return (out, *torch.autograd.grad(out, (q64, k64, v64, val64), dout.double()))


def run(q, k, v, bias, dout, mask, **kw):
    for t in (q, k, v, bias.value):
        t.grad = None
    out = mt.biased_attention(q, k, v, bias, key_padding_mask=mask, **kw)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad, bias.value.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind,causal,shape", [
    ("left10", True, (2, 8, 2, 1024, 1024, 128)),
    ("random", False, (2, 8, 8, 1000, 1000, 64)),
    ("right", True, (2, 4, 2, 384, 1031, 128)),
    ("empty_row", True, (2, 4, 4, 777, 777, 64)),
])
def test_parity(dtype, kind, causal, shape):
    B, Hq, Hkv, Tq, Tk, D = shape
    q, k, v, bias, coo = make_inputs(B, Hq, Hkv, Tq, Tk, D, dtype, seed=3)
    mask = make_mask(kind, B, Tk, seed=1)
    dout = torch.randn(q.shape, device=DEV, generator=torch.Generator(device=DEV).manual_seed(5)).to(dtype)
    got = run(q, k, v, bias, dout, mask, causal=causal, alpha=0.6, backend="triton")
    want = oracle(q, k, v, coo, dout, mask, causal=causal, alpha=0.6)
    for name, g, w in zip(("out", "dq", "dk", "dv", "dvalue"), got, want):
        assert torch.isfinite(g).all(), name
        tol = TOL[dtype] if name != "dvalue" else max(TOL[dtype], 1e-4)
        assert rel_err(g, w, 0.0 if name == "out" else 0.05) < tol, name
    if kind == "empty_row":
        assert torch.all(got[0][0] == 0) and torch.all(got[1][0] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_all_true_mask_matches_no_mask(dtype):
    q, k, v, bias, _ = make_inputs(2, 8, 2, 1024, 1024, 128, dtype, seed=7)
    dout = torch.randn(q.shape, device=DEV).to(dtype)
    a = run(q, k, v, bias, dout, None, causal=True, backend="triton")
    b = run(q, k, v, bias, dout, make_mask("all", 2, 1024), causal=True, backend="triton")
    for x, y in zip(a, b):
        assert rel_err(y, x, 0.05) < TOL[dtype]


def test_auto_routes_masked_calls_to_triton():
    q, k, v, bias, _ = make_inputs(2, 8, 2, 512, 512, 128, torch.bfloat16)
    mask = make_mask("left10", 2, 512)
    name, auto = registry.resolve("auto", q, k, v, bias, True, 1.0, mask)
    assert auto and name == "triton"
    name, _ = registry.resolve("auto", q, k, v, bias, True, torch.tensor(0.5, device=DEV), None)
    assert name == "triton"       # a biased tensor-alpha call may cancel: not the dense backends


@pytest.mark.parametrize("fused", ["0", "1"])
def test_capture_with_mask(fused, memtrace_settings):
    memtrace_settings(capture_fused=fused)
    dtype = torch.bfloat16
    B, H, T = 2, 4, 512
    q, k, v, bias, _ = make_inputs(B, H, H, T, T, 64, dtype, per_head=128, seed=11)
    mask = make_mask("left10", B, T)
    dout = torch.randn(q.shape, device=DEV).to(dtype)
    cap = mt.SalienceCapture(threshold=1e-4)
    out = mt.biased_attention(q, k, v, bias, causal=True, alpha=0.5, capture=cap, key_padding_mask=mask)
    out.backward(dout)
    dense = R.dense_bias(bias.head, bias.q_idx, bias.k_idx, bias.value.detach(), H, T, T)
    P = R.probabilities(q.detach().double(), k.detach().double(), dense, causal=True, alpha=0.5,
                        key_padding_mask=mask)
    dP = torch.matmul(dout.double(), v.detach().double().transpose(-1, -2))
    S, a = (P * dP.abs()).mean(0), P.mean(0)
    check_capture(cap, S, a, bias, 1e-4, dtype)
    n = int(cap.num_edges)
    assert n > 0 and not torch.any(cap.edges[2][:n] < T // 10)     # keys masked in every batch element


@pytest.mark.parametrize("masked", [False, True])
def test_tensor_alpha_no_sync(masked):
    """alpha as a 0-d CUDA tensor: same result as the float, and no host sync in the forward and
    backward (after a warm-up that tunes and caches the bias range)."""
    dtype = torch.bfloat16
    q, k, v, bias, _ = make_inputs(2, 8, 2, 1024, 1024, 128, dtype, seed=13)
    mask = make_mask("left10", 2, 1024) if masked else None
    dout = torch.randn(q.shape, device=DEV).to(dtype)
    want = run(q, k, v, bias, dout, mask, causal=True, alpha=0.3)
    alpha = torch.tensor(0.3, device=DEV)
    got = run(q, k, v, bias, dout, mask, causal=True, alpha=alpha)        # warm-up
    for x, y in zip(got, want):
        assert rel_err(x, y, 0.05) < TOL[dtype]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = mt.biased_attention(q, k, v, bias, causal=True, alpha=alpha, key_padding_mask=mask)
        out.backward(dout)
    finally:
        torch.cuda.set_sync_debug_mode("default")
