"""memtrace.biased_attention on CUDA: every backend at realistic shapes against the float64
reference (SPEC 7 tolerances), bias gradients, auto selection, torch.compile, capture, layouts."""
import math

import pytest
import torch
from _helpers import TOL, oracle_attention
from _helpers import rel_err as _rel_err

import memtrace as mt
from memtrace import attention as A

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"


def make_inputs(B, Hq, Hkv, Tq, Tk, D, dtype, *, per_head=256, seed=0, value_low=-1.0, value_high=2.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, device=DEV, generator=g).to(dtype).requires_grad_(True)
    k = torch.randn(B, Hkv, Tk, D, device=DEV, generator=g).to(dtype).requires_grad_(True)
    v = torch.randn(B, Hkv, Tk, D, device=DEV, generator=g).to(dtype).requires_grad_(True)
    n = Hq * per_head
    Lq, Lk = Tq + 5, Tk + 7  # built for longer sequences: entries past the call are ignored
    head = torch.randint(0, Hq, (n,), device=DEV, generator=g)
    q_idx = torch.randint(0, Lq, (n,), device=DEV, generator=g)
    # half the entries in a band near the (bottom-right) diagonal, where attention is causal-visible
    band = (q_idx + (Tk - Tq) - torch.randint(0, 64, (n,), device=DEV, generator=g)).clamp(0, Lk - 1)
    k_idx = torch.where(torch.rand(n, device=DEV, generator=g) < 0.5, band,
                        torch.randint(0, Lk, (n,), device=DEV, generator=g))
    head[-8:], q_idx[-8:], k_idx[-8:] = head[0], q_idx[0], k_idx[0]  # duplicates
    value = (value_low + (value_high - value_low) * torch.rand(n, device=DEV, generator=g)).requires_grad_(True)
    bias = mt.TraceBias.from_coo(head, q_idx, k_idx, value, num_heads=Hq, seq_len_q=Lq, seq_len_k=Lk)
    return q, k, v, bias, (head, q_idx, k_idx, value)


def grad_of(out, seed=1):
    """A seeded upstream gradient like `out`: each test sees the same dO whatever ran before it
    (with the global RNG, the dO, and so the case, depended on the tests run earlier)."""
    g = torch.Generator(device=out.device).manual_seed(seed)
    return torch.randn(out.shape, device=out.device, generator=g).to(out.dtype)


def rel_err(a, b):
    """||a - b|| / ||b||, an all-zero b failing any difference."""
    return _rel_err(a, b, norm_floor=1e-30)


def run(q, k, v, bias, dout, **kw):
    for t in (q, k, v, bias.value if bias is not None else None):
        if t is not None:
            t.grad = None
    out = mt.biased_attention(q, k, v, bias, **kw)
    out.backward(dout)
    res = [out, q.grad, k.grad, v.grad]
    if bias is not None:
        res.append(bias.value.grad)
    return res


def skip_unless_supported(backend, q, k, v, bias, causal):
    reasons = A.backend_reasons(q, k, v, bias, causal=causal)[backend]
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))


CASES = [  # B, Hq, Hkv, Tq, Tk, D, causal  (few: every new shape class compiles kernels)
    (1, 8, 2, 1024, 1024, 128, True),     # GQA, causal
    (2, 4, 4, 333, 333, 64, False),       # odd length
    (1, 4, 2, 777, 200, 64, True),        # causal, Tq > Tk: fully masked rows (triton only)
]


def _check_backend(backend, dtype, case):
    *shape, causal = case
    q, k, v, bias, coo = make_inputs(*shape, dtype, seed=sum(shape))
    skip_unless_supported(backend, q, k, v, bias, causal)
    dout = grad_of(q)
    got = run(q, k, v, bias, dout, causal=causal, backend=backend)
    want = oracle_attention(q, k, v, coo, dout, causal=causal)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dvalue"), got, want):
        err = rel_err(a, b)
        assert err < TOL[dtype], f"{backend} {name}: {err:.3g}"


@pytest.mark.parametrize("backend", ["triton", "cudnn", "flash", "flash_attn"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_backend_parity_bf16(backend, case):
    _check_backend(backend, torch.bfloat16, case)


@pytest.mark.parametrize("backend", ["triton", "cudnn", "flash"])
def test_backend_parity_fp16(backend):
    _check_backend(backend, torch.float16, CASES[0])


@pytest.mark.parametrize("backend", ["triton", "cudnn", "flash"])
def test_no_bias_parity(backend):
    q, k, v, _, _ = make_inputs(1, 8, 2, 1024, 1024, 128, torch.bfloat16, seed=3)
    skip_unless_supported(backend, q, k, v, None, True)
    dout = grad_of(q)
    got = run(q, k, v, None, dout, causal=True, backend=backend)
    want = oracle_attention(q, k, v, None, dout, causal=True)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(a, b) < TOL[torch.bfloat16], name


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_triton_split_backward_overlap(case, monkeypatch):
    """The split backward (dense pass + correct_bwd, taken from 2 entries per row) with the
    key-side correction on the caller's stream beside the dense dQ kernel on a high-priority
    stream (settings attn_bwd_overlap) and without: both match the float64 reference, and out / dq / dk / dv
    bitwise alike (the same kernels, only their order and streams differ; the bias gradient
    goes through autograd's scatter of duplicates, whose float atomics may sum in any order)."""
    from memtrace.kernels import settings
    from memtrace.kernels.attention import config as kcfg
    *shape, causal = case
    q, k, v, bias, coo = make_inputs(*shape, torch.bfloat16, seed=11 + sum(shape), per_head=3 * shape[3])
    assert kcfg.split_backward(bias, False, None)
    dout = grad_of(q)
    want = oracle_attention(q, k, v, coo, dout, causal=causal)
    got = {}
    for overlap in ("0", "1"):
        with settings.override(attn_bwd_overlap=overlap):
            got[overlap] = [t.detach().clone() for t in run(q, k, v, bias, dout, causal=causal, backend="triton")]
        for name, a, b in zip(("out", "dq", "dk", "dv", "dvalue"), got[overlap], want):
            err = rel_err(a, b)
            assert err < TOL[torch.bfloat16], f"overlap={overlap} {name}: {err:.3g}"
    for a, b in zip(got["0"][:4], got["1"][:4]):
        assert torch.equal(a, b)
    assert torch.allclose(got["0"][4], got["1"][4], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES[1:2], ids=lambda c: "x".join(map(str, c)))
def test_triton_fp32(case):
    *shape, causal = case
    q, k, v, bias, coo = make_inputs(*shape, torch.float32, seed=7)
    skip_unless_supported("triton", q, k, v, bias, causal)
    dout = grad_of(q)
    got = run(q, k, v, bias, dout, causal=causal, backend="triton")
    want = oracle_attention(q, k, v, coo, dout, causal=causal)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dvalue"), got, want):
        assert rel_err(a, b) < TOL[torch.float32], name


@pytest.mark.parametrize("D", [16, 256])
def test_triton_head_dims(D):
    q, k, v, bias, coo = make_inputs(1, 4, 2, 300, 300, D, torch.bfloat16, seed=D)
    skip_unless_supported("triton", q, k, v, bias, False)
    dout = grad_of(q)
    got = run(q, k, v, bias, dout, causal=False, backend="triton", alpha=0.7)
    want = oracle_attention(q, k, v, coo, dout, causal=False, alpha=0.7)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dvalue"), got, want):
        assert rel_err(a, b) < TOL[torch.bfloat16], name


@pytest.mark.parametrize("magnitude", [40.0, -40.0])
def test_triton_large_biases(magnitude):
    """Huge positive biases must not overflow; huge negative ones on the edges holding the mass
    cancel the correction identity and must still come out right."""
    B, H, T, D = 1, 4, 256, 64
    g = torch.Generator(device=DEV).manual_seed(5)
    base = torch.randn(B, H, T, D, device=DEV, generator=g)
    q = (2.0 * base).bfloat16().requires_grad_(True)
    k = base.bfloat16().requires_grad_(True)
    v = torch.randn(B, H, T, D, device=DEV, generator=g).bfloat16().requires_grad_(True)
    head = torch.arange(H, device=DEV).repeat_interleave(T)
    idx = torch.arange(T, device=DEV).repeat(H)
    value = torch.full((H * T,), magnitude, device=DEV, requires_grad=True)
    bias = mt.TraceBias.from_coo(head, idx, idx, value, num_heads=H, seq_len_q=T, seq_len_k=T)
    dout = grad_of(q)
    got = run(q, k, v, bias, dout, backend="auto")
    want = oracle_attention(q, k, v, (head, idx, idx, value), dout, causal=False)
    assert rel_err(got[0], want[0]) < TOL[torch.bfloat16]
    for name, a, b in zip(("dq", "dk", "dv", "dvalue"), got[1:], want[1:]):
        # gradients ~0 in exact arithmetic (one-hot softmax) are compared absolutely
        err = (a.double() - b).norm().item() / max(b.norm().item(), math.sqrt(b.numel()) * 0.05)
        assert err < 3e-2, f"{name}: {err:.3g}"


def test_auto_matches_its_choice_and_the_reference():
    q, k, v, bias, coo = make_inputs(1, 8, 2, 1024, 1024, 128, torch.bfloat16, seed=11)
    name, auto = A.select_backend(q, k, v, bias, causal=True)
    assert auto and name in ("cudnn", "triton", "flash", "flash_attn")
    dout = grad_of(q)
    got = run(q, k, v, bias, dout, causal=True)
    explicit = run(*(t.detach().requires_grad_(True) for t in (q, k, v)), bias, dout, causal=True, backend=name)
    torch.testing.assert_close(got[0], explicit[0], rtol=0, atol=0)  # same kernels, same forward
    for a, b in zip(got[1:], explicit[1:]):  # backward kernels may use atomics (cuDNN)
        assert rel_err(a, b) < 1e-2
    want = oracle_attention(q, k, v, coo, dout, causal=True)
    for a, b in zip(got, want):
        assert rel_err(a, b) < TOL[torch.bfloat16]


def test_auto_on_gqa_and_unequal_causal_lengths():
    """Calls the cuDNN/flash kernels cannot take (causal Tq != Tk) still get a fast backend."""
    q, k, v, bias, coo = make_inputs(1, 4, 2, 200, 777, 64, torch.bfloat16, seed=13)
    name, _ = A.select_backend(q, k, v, bias, causal=True)
    assert name != "reference"
    dout = grad_of(q)
    got = run(q, k, v, bias, dout, causal=True)
    want = oracle_attention(q, k, v, coo, dout, causal=True)
    for a, b in zip(got, want):
        assert rel_err(a, b) < TOL[torch.bfloat16]


def test_bias_free_layout_and_transposed_inputs():
    """q/k/v as [B, T, H, D] buffers viewed as [B, H, T, D]: out keeps q's layout."""
    B, H, T, D = 2, 4, 333, 64
    q = torch.randn(B, T, H, D, device=DEV, dtype=torch.bfloat16).transpose(1, 2).requires_grad_(True)
    k = torch.randn(B, T, H, D, device=DEV, dtype=torch.bfloat16).transpose(1, 2).requires_grad_(True)
    v = torch.randn(B, T, H, D, device=DEV, dtype=torch.bfloat16).transpose(1, 2).requires_grad_(True)
    for backend in A.available_backends(q, k, v, None, causal=True):
        if backend == "reference":
            continue
        out = mt.biased_attention(q, k, v, causal=True, backend=backend)
        assert out.stride() == q.stride(), backend
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert rel_err(out, ref) < TOL[torch.bfloat16], backend


def test_torch_compile_fullgraph_gpu():
    q, k, v, bias, coo = make_inputs(2, 4, 4, 333, 333, 64, torch.bfloat16, seed=17)
    proj = torch.nn.Linear(64, 64, device=DEV, dtype=torch.bfloat16)  # noqa

    def model(q, k, v, bias):
        return (mt.biased_attention(proj(q), k, v, bias, causal=True, alpha=0.5).float() ** 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(q, k, v, bias)
    loss.backward()
    got = [t.grad.clone() for t in (q, k, v, bias.value)]
    for t in (q, k, v, bias.value):
        t.grad = None
    ref = model(q, k, v, bias)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-3 * abs(ref.item())
    for a, t in zip(got, (q, k, v, bias.value)):
        assert rel_err(a, t.grad) < 1e-2


class _RecordingCapture:
    def __init__(self):
        self.calls = []

    def fill(self, q, k, v, out, lse, dout, bias, entry_values, *, causal, scale, alpha, bound=None):
        self.calls.append((out.detach().clone(), lse.detach().clone(), causal, scale, alpha))


def test_capture_hook_gets_biased_out_and_lse():
    q, k, v, bias, coo = make_inputs(2, 4, 4, 333, 333, 64, torch.bfloat16, seed=19)
    cap = _RecordingCapture()
    out = mt.biased_attention(q, k, v, bias, causal=True, capture=cap)
    out.backward(torch.randn_like(out))
    assert len(cap.calls) == 1
    cap_out, cap_lse, causal, scale, alpha = cap.calls[0]
    dense = mt.reference.dense_bias(*coo[:3], coo[3].detach().double(), 4, 333, 333)
    ref_out, ref_lse = mt.reference.attention_with_lse(q.detach().double(), k.detach().double(),
                                                       v.detach().double(), dense, causal=True)
    assert rel_err(cap_out, ref_out) < TOL[torch.bfloat16]
    assert rel_err(cap_lse, ref_lse) < 1e-4
    assert causal is True and scale == pytest.approx(1 / 8) and alpha == 1.0


# ---- the warp-specialized dense forward (kernels/attention/fwd_ws.py) -------------------------------
WS_CASES = [  # B, Hq, Hkv, Tq, Tk, D, dtype: non-causal, Tk a multiple of 128 (the WS path's calls)
    (2, 8, 2, 1000, 1280, 128, torch.bfloat16),   # GQA, Tq not a multiple of the 128-row tile
    (1, 4, 4, 512, 512, 64, torch.float16),
    (2, 4, 2, 200, 384, 128, torch.bfloat16),     # Tq < Tk
]


def _ws_runs(q, k, v):
    from memtrace.kernels.attention import fwd_ws
    return fwd_ws.ws_usable(q, k, v, False, q.shape[-1], k.shape[2])


@pytest.mark.parametrize("case", WS_CASES, ids=lambda c: "x".join(map(str, c[:6])))
@pytest.mark.parametrize("values", [(-1.0, 2.0), (-40.0, -20.0)], ids=["mild", "cancelling"])
def test_triton_ws_forward_parity(case, values):
    """The specialized dense pass + standalone correction: out, the gradients and the bias
    gradient against the float64 reference (cancelling rows too), bitwise repeatable, and close to
    the unspecialized fused kernel (settings attn_ws="0")."""
    from memtrace.kernels import settings
    *shape, dtype = case
    q, k, v, bias, coo = make_inputs(*shape, dtype, seed=sum(shape), value_low=values[0], value_high=values[1])
    if not _ws_runs(q, k, v):
        pytest.skip("the warp-specialized forward needs an sm_90 GPU")
    dout = grad_of(q)
    got = run(q, k, v, bias, dout, causal=False, backend="triton")
    want = oracle_attention(q, k, v, coo, dout, causal=False)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dvalue"), got, want):
        assert rel_err(a, b) < TOL[dtype], name
    with torch.no_grad():
        again = mt.biased_attention(q, k, v, bias, backend="triton")
        assert torch.equal(again, got[0].detach()), "the specialized forward is not repeatable"
        with settings.override(attn_ws="0"):
            fused = mt.biased_attention(q, k, v, bias, backend="triton")
        assert rel_err(again, fused) < TOL[dtype]


def test_triton_ws_declines_what_it_cannot_run():
    """Causal calls, Tk not a multiple of 128, non-contiguous inputs and float32 take the fused kernel."""
    q, k, v, _, _ = make_inputs(1, 4, 4, 256, 256, 128, torch.bfloat16)
    if not _ws_runs(q, k, v):
        pytest.skip("the warp-specialized forward needs an sm_90 GPU")
    from memtrace.kernels.attention import fwd_ws
    assert not fwd_ws.ws_usable(q, k, v, True, 128, 256)
    assert not fwd_ws.ws_usable(q, k[:, :, :200], v[:, :, :200], False, 128, 200)
    qt = q.detach().transpose(1, 2).contiguous().transpose(1, 2)
    assert not fwd_ws.ws_usable(qt, k, v, False, 128, 256)
    assert not fwd_ws.ws_usable(q.float(), k.float(), v.float(), False, 128, 256)
    # and the transposed layout still computes the right thing through the fused kernel
    out = mt.biased_attention(qt, k, v, None, backend="triton")
    ref = torch.nn.functional.scaled_dot_product_attention(q.detach().float(), k.detach().float(), v.detach().float())
    assert rel_err(out, ref) < TOL[torch.bfloat16]
