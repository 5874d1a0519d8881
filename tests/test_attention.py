"""memtrace.biased_attention on the CPU: every backend that runs here against the float64 oracle,
bias gradients, edge cases, bad input, backend selection, torch.compile and the capture hook.

Backends tested here: "reference" always; "triton" and a CPU stand-in for the corrected dense
backends (reference dense attention + kernels/attention/correct_*.py) when TRITON_INTERPRET=1 (the
interpreter cannot do a bf16 tl.dot, so fp16/fp32 only). Shapes stay tiny: the interpreter is slow.
"""
import copy
import math
import warnings

import pytest
import torch
from _helpers import TOL, CorrectedReferenceBackend, interpreting, make_inputs, oracle_attention, rel_err, run_and_grad

import memtrace as mt
from memtrace import attention as A
from memtrace import config
from memtrace.backends import base as backend_base
from memtrace.backends import registry, torch_ops

INTERPRET = interpreting()


# ---- helpers ------------------------------------------------------------------------------------

def check_parity(q, k, v, bias, coo, *, causal, backend, scale=None, alpha=1.0, tol=None, seed=1, rms_floor=0.0):
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(q.shape, generator=g).to(q.dtype)
    got = run_and_grad(q, k, v, bias, dout, causal=causal, backend=backend, scale=scale, alpha=alpha)
    want = oracle_attention(q, k, v, coo if bias is not None else None, dout, causal=causal, scale=scale, alpha=alpha)
    tol = tol or TOL[q.dtype]
    for name, a, b in zip(("out", "dq", "dk", "dv", "dvalue"), got, want):
        if b is None:
            continue
        assert a is not None, f"{name} missing"
        assert a.shape == b.shape, f"{name} shape {tuple(a.shape)} != {tuple(b.shape)}"
        err = rel_err(a, b, rms_floor if name != "out" else 0.0)
        assert err < tol, f"{backend} {name}: rel err {err:.3g} >= {tol}"
    return got


def cpu_backends():
    """Backends to run on this machine: reference, plus the Triton ones under the interpreter."""
    names = ["reference"]
    if INTERPRET:
        names += ["triton", "corrected_cpu"]
    return names


@pytest.fixture(autouse=True)
def _registry(monkeypatch):
    """The CPU stand-in backend, registered for each test and removed after it."""
    registry.register_backend(CorrectedReferenceBackend())
    registry.reset()
    with config.override(backend="auto"):
        yield
    registry.unregister_backend("corrected_cpu")
    registry.reset()


@pytest.fixture
def add_backend():
    """register_backend for one test; unregistered after it, pass or fail."""
    added = []

    def add(backend, **kwargs):
        registry.register_backend(backend, **kwargs)
        added.append(backend.name)
    yield add
    for name in added:
        registry.unregister_backend(name)
    registry.reset()


# ---- parity -------------------------------------------------------------------------------------

SHAPES = [  # B, Hq, Hkv, Tq, Tk, D
    (1, 2, 2, 5, 5, 16),
    (2, 4, 2, 7, 13, 32),     # GQA, Tq < Tk
    (1, 2, 1, 13, 6, 16),     # MQA, Tq > Tk: causal leaves rows fully masked
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_parity_fp32(backend, shape, causal):
    q, k, v, bias, coo = make_inputs(*shape, dtype=torch.float32, seed=sum(shape))
    check_parity(q, k, v, bias, coo, causal=causal, backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("causal", [False, True])
def test_parity_fp16(backend, causal):
    q, k, v, bias, coo = make_inputs(2, 4, 2, 9, 11, 32, dtype=torch.float16, seed=3)
    check_parity(q, k, v, bias, coo, causal=causal, backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_no_bias_and_empty_bias(backend):
    q, k, v, _, _ = make_inputs(1, 2, 1, 6, 9, 16, seed=5)
    check_parity(q, k, v, None, None, causal=True, backend=backend)
    empty = mt.TraceBias.empty(num_heads=2, seq_len_q=6, seq_len_k=9)
    empty.value.requires_grad_(True)
    got = check_parity(q, k, v, empty, (empty.head, empty.q_idx, empty.k_idx, empty.value), causal=True,
                       backend=backend)
    assert got[4] is not None and got[4].shape == (0,)


@pytest.mark.parametrize("backend", cpu_backends())
def test_custom_scale_and_alpha(backend):
    q, k, v, bias, coo = make_inputs(1, 2, 2, 7, 7, 16, seed=7)
    check_parity(q, k, v, bias, coo, causal=False, backend=backend, scale=0.3, alpha=0.6)
    check_parity(q, k, v, bias, coo, causal=True, backend=backend, scale=0.1, alpha=-0.15)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("magnitude", [30.0, -30.0])
def test_large_biases(backend, magnitude):
    """Huge positive biases must not overflow; huge negative ones on the edges that hold the mass
    cancel the correction identity (1 + sum w ~ 0) and must still be exact."""
    B, H, T, D = 1, 2, 8, 16
    g = torch.Generator().manual_seed(11)
    q = torch.randn(B, H, T, D, generator=g)
    k = q.clone()  # row i attends mostly to key i: the diagonal holds the mass
    q = (3.0 * q).requires_grad_(True)
    k.requires_grad_(True)
    v = torch.randn(B, H, T, D, generator=g).requires_grad_(True)
    head = torch.arange(H).repeat_interleave(T)
    idx = torch.arange(T).repeat(H)
    value = torch.full((H * T,), magnitude).requires_grad_(True)
    bias = mt.TraceBias.from_coo(head, idx, idx, value, num_heads=H, seq_len_q=T, seq_len_k=T)
    if magnitude < 0 and backend == "corrected_cpu":
        with pytest.raises(ValueError, match="cancel"):  # declines; auto would pick another backend
            mt.biased_attention(q, k, v, bias, backend=backend)
        return
    # with +30 the softmax is one-hot to e^-30, so the exact q/k gradients are ~e^-30: compare
    # those absolutely (RMS floor 1) rather than relatively to their vanishing norm
    check_parity(q, k, v, bias, (head, idx, idx, value), causal=False, backend=backend, rms_floor=1.0)


@pytest.mark.parametrize("backend", cpu_backends())
def test_fully_masked_rows_are_zero_and_finite(backend):
    """causal with Tq > Tk: rows i < Tq - Tk see no key: out 0, gradients 0, no NaN."""
    q, k, v, bias, coo = make_inputs(1, 2, 2, 9, 4, 16, seed=13)
    dout = torch.randn(q.shape)
    out, dq, dk, dv, dval = run_and_grad(q, k, v, bias, dout, causal=True, backend=backend)
    masked = 9 - 4
    for t in (out, dq, dk, dv, dval):
        assert torch.isfinite(t).all()
    assert out[:, :, :masked].abs().max() == 0
    assert dq[:, :, :masked].abs().max() == 0


def test_duplicates_add_and_share_gradient():
    """Two COO entries at one (h, i, j) act as their sum; each gets that edge's gradient."""
    q, k, v, _, _ = make_inputs(1, 1, 1, 4, 4, 16, seed=17)
    h = torch.zeros(3, dtype=torch.long)
    i = torch.tensor([1, 1, 2])
    j = torch.tensor([3, 3, 0])
    val = torch.tensor([0.5, 1.5, -1.0], requires_grad=True)
    b2 = mt.TraceBias.from_coo(h, i, j, val, num_heads=1, seq_len_q=4, seq_len_k=4)
    val1 = torch.tensor([2.0, -1.0], requires_grad=True)
    b1 = mt.TraceBias.from_coo(h[1:], i[1:], j[1:], val1, num_heads=1, seq_len_q=4, seq_len_k=4)
    o2 = mt.biased_attention(q, k, v, b2, backend="reference")
    o1 = mt.biased_attention(q, k, v, b1, backend="reference")
    torch.testing.assert_close(o2, o1)
    o2.sum().backward()
    o1.sum().backward()
    assert val.grad[0] == val.grad[1] == val1.grad[0]
    assert val.grad[2] == val1.grad[1]


def test_entries_past_the_call_are_ignored():
    """A bias built for longer sequences acts like its restriction to the call's lengths."""
    q, k, v, _, _ = make_inputs(1, 2, 2, 5, 6, 16, seed=19)
    h = torch.tensor([0, 1, 1, 0])
    i = torch.tensor([4, 2, 9, 1])
    j = torch.tensor([5, 1, 1, 30])
    val = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    big = mt.TraceBias.from_coo(h, i, j, val, num_heads=2, seq_len_q=10, seq_len_k=31)
    small = mt.TraceBias.from_coo(h[:2], i[:2], j[:2], val.detach()[:2], num_heads=2, seq_len_q=5, seq_len_k=6)
    for backend in cpu_backends():
        a = mt.biased_attention(q, k, v, big, backend=backend)
        b = mt.biased_attention(q, k, v, small, backend=backend)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        a.sum().backward()
        assert val.grad[2] == 0 and val.grad[3] == 0
        val.grad = None


def test_masked_entries_get_no_gradient():
    """Entries hidden by the causal mask change nothing and get a zero gradient."""
    q, k, v, _, _ = make_inputs(1, 1, 1, 5, 5, 16, seed=23)
    val = torch.tensor([5.0, 1.0], requires_grad=True)
    bias = mt.TraceBias.from_coo(torch.tensor([0, 0]), torch.tensor([1, 3]), torch.tensor([4, 2]), val,
                                 num_heads=1, seq_len_q=5, seq_len_k=5)
    for backend in cpu_backends():
        out = mt.biased_attention(q, k, v, bias, causal=True, backend=backend)
        only_visible = mt.TraceBias.from_coo(torch.tensor([0]), torch.tensor([3]), torch.tensor([2]),
                                             torch.tensor([1.0]), num_heads=1, seq_len_q=5, seq_len_k=5)
        ref = mt.biased_attention(q, k, v, only_visible, causal=True, backend=backend)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        out.sum().backward()
        assert val.grad[0] == 0 and val.grad[1] != 0
        val.grad = None


def test_no_grad_and_frozen_bias():
    """Inference (no grad anywhere) and a bias whose values do not require grad."""
    q, k, v, bias, coo = make_inputs(1, 2, 2, 6, 6, 16, seed=29, requires_grad=False)
    with torch.no_grad():
        out = mt.biased_attention(q, k, v, bias)
    ref = oracle_attention(q, k, v, coo, torch.zeros_like(q), causal=False)[0]
    assert rel_err(out, ref) < 1e-5
    q.requires_grad_(True)
    out = mt.biased_attention(q, k, v, bias)
    out.sum().backward()
    assert q.grad is not None and bias.value.grad is None


def test_output_layout_follows_q():
    """q given as a [B, T, H, D] buffer viewed as [B, H, T, D]: out (and dq) keep that layout."""
    B, H, T, D = 2, 3, 5, 16
    q = torch.randn(B, T, H, D).transpose(1, 2).requires_grad_(True)
    k = torch.randn(B, T, H, D).transpose(1, 2)
    v = torch.randn(B, T, H, D).transpose(1, 2)
    out = mt.biased_attention(q, k, v)
    assert out.stride() == q.stride()
    out.sum().backward()
    assert q.grad.shape == q.shape
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_float64_runs_on_the_reference():
    q, k, v, bias, coo = make_inputs(1, 2, 2, 4, 6, 16, dtype=torch.float64, seed=31)
    check_parity(q, k, v, bias, coo, causal=True, backend="auto")
    assert A.select_backend(q, k, v, bias)[0] == "reference"


def test_bias_value_updated_in_place_is_rechecked():
    q, k, v, bias, _ = make_inputs(1, 2, 2, 4, 4, 16, seed=37, requires_grad=False)
    mt.biased_attention(q, k, v, bias)
    with torch.no_grad():
        bias.value[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        mt.biased_attention(q, k, v, bias)


# ---- capture hook -------------------------------------------------------------------------------

class _RecordingCapture:
    def __init__(self):
        self.calls = []

    def fill(self, q, k, v, out, lse, dout, bias, entry_values, *, causal, scale, alpha, bound=None):
        self.calls.append(dict(q=q, k=k, v=v, out=out.detach().clone(), lse=lse.detach().clone(), dout=dout,
                               bias=bias, entry_values=entry_values, causal=causal, scale=scale, alpha=alpha))


def test_capture_is_filled_by_backward_with_biased_out_and_lse():
    q, k, v, bias, coo = make_inputs(2, 2, 1, 6, 7, 16, seed=41)
    cap = _RecordingCapture()
    dout = torch.randn(q.shape)
    out = mt.biased_attention(q, k, v, bias, causal=True, alpha=0.5, capture=cap)
    assert cap.calls == []  # filled by the backward, not the forward
    out.backward(dout)
    assert len(cap.calls) == 1 and q.grad is not None and bias.value.grad is not None
    call = cap.calls[0]
    dense = mt.reference.dense_bias(*coo[:3], coo[3].detach().double(), 2, 6, 7)
    ref_out, ref_lse = mt.reference.attention_with_lse(q.detach().double(), k.detach().double(),
                                                       v.detach().double(), dense, causal=True, alpha=0.5)
    assert rel_err(call["out"], ref_out) < 1e-5
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(call["lse"]), fin)
    assert rel_err(call["lse"][fin], ref_lse[fin]) < 1e-5
    assert call["causal"] is True and call["alpha"] == 0.5 and call["scale"] == pytest.approx(0.25)
    assert call["bias"] is bias and call["dout"].shape == q.shape
    # the gradients equal those of the op without capture
    want = run_and_grad(*(t.detach().requires_grad_(True) for t in (q, k, v)), bias, dout, causal=True, alpha=0.5)
    torch.testing.assert_close(q.grad, want[1])


def test_capture_must_have_fill():
    q, k, v, bias, _ = make_inputs(1, 2, 2, 4, 4, 16)
    with pytest.raises(TypeError, match="capture"):
        mt.biased_attention(q, k, v, bias, capture=object())


# ---- bad input ----------------------------------------------------------------------------------

def _good():
    q, k, v, bias, _ = make_inputs(1, 4, 2, 6, 8, 16, requires_grad=False)
    return q, k, v, bias


def _with_value(bias, value):
    """A copy of `bias` whose public `value` attribute was replaced (as a user may do, e.g. by a
    Parameter) with `value`."""
    other = copy.copy(bias)
    other.value = value
    return other


@pytest.mark.parametrize("case,error,match", [
    (lambda q, k, v, b: dict(q=q.numpy()), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v, b: dict(q=q[0]), ValueError, "q must have 4 dimensions"),
    (lambda q, k, v, b: dict(k=k[0]), ValueError, "k must have 4 dimensions"),
    (lambda q, k, v, b: dict(v=v[..., 0]), ValueError, "v must have 4 dimensions"),
    (lambda q, k, v, b: dict(q=q.long()), TypeError, "q must have dtype"),
    (lambda q, k, v, b: dict(k=k.half()), TypeError, "share one dtype"),
    (lambda q, k, v, b: dict(v=v[:, :, :5]), ValueError, "same shape"),
    (lambda q, k, v, b: dict(k=k[:1].expand(2, -1, -1, -1), v=v[:1].expand(2, -1, -1, -1)), ValueError, "batch"),
    (lambda q, k, v, b: dict(q=torch.zeros(1, 4, 6, 24), k=torch.zeros(1, 2, 8, 24), v=torch.zeros(1, 2, 8, 24)),
     ValueError, "head dim"),
    (lambda q, k, v, b: dict(k=torch.zeros(1, 2, 8, 32), v=torch.zeros(1, 2, 8, 32)), ValueError, "head dim"),
    (lambda q, k, v, b: dict(k=k[:, :1].expand(1, 3, 8, 16).contiguous(), v=v[:, :1].expand(1, 3, 8, 16).contiguous()),
     ValueError, "multiple"),
    (lambda q, k, v, b: dict(k=torch.zeros(1, 2, 65536, 16), v=torch.zeros(1, 2, 65536, 16)), ValueError, "65535"),
    (lambda q, k, v, b: dict(k=k.to("meta"), v=v.to("meta")), ValueError, "device"),
    (lambda q, k, v, b: dict(scale=float("nan")), ValueError, "scale"),
    (lambda q, k, v, b: dict(scale=float("inf")), ValueError, "scale"),
    (lambda q, k, v, b: dict(scale=-1.0), ValueError, "scale"),
    (lambda q, k, v, b: dict(scale=0.0), ValueError, "scale"),
    (lambda q, k, v, b: dict(scale="0.1"), TypeError, "scale"),
    (lambda q, k, v, b: dict(alpha=float("nan")), ValueError, "alpha"),
    (lambda q, k, v, b: dict(alpha=float("-inf")), ValueError, "alpha"),
    (lambda q, k, v, b: dict(alpha=torch.tensor([1.0])), TypeError, "alpha"),
    # alpha * bias past float32's range: the kernels' logits overflow to Inf and give NaN
    (lambda q, k, v, b: dict(alpha=1e38), ValueError, "alpha \\* bias"),
    (lambda q, k, v, b: dict(alpha=-1e38), ValueError, "alpha \\* bias"),
    (lambda q, k, v, b: dict(causal=1), TypeError, "causal"),
    (lambda q, k, v, b: dict(causal="yes"), TypeError, "causal"),
    (lambda q, k, v, b: dict(bias=torch.zeros(4, 6, 8)), TypeError, "bias must be a memtrace.TraceBias"),
    (lambda q, k, v, b: dict(bias=mt.TraceBias.empty(num_heads=2, seq_len_q=6, seq_len_k=8)), ValueError,
     "num_heads"),
    (lambda q, k, v, b: dict(bias=mt.TraceBias.empty(num_heads=4, seq_len_q=5, seq_len_k=8)), ValueError,
     "seq_len_q"),
    (lambda q, k, v, b: dict(bias=mt.TraceBias.empty(num_heads=4, seq_len_q=6, seq_len_k=7)), ValueError,
     "seq_len_k"),
    (lambda q, k, v, b: dict(bias=mt.TraceBias.empty(num_heads=4, seq_len_q=6, seq_len_k=8, device="meta")),
     ValueError, "device"),
    # bias.value replaced after construction: was a RuntimeError from index_add inside the op
    (lambda q, k, v, b: dict(bias=_with_value(b, torch.zeros(3))), ValueError, "bias.value"),
    (lambda q, k, v, b: dict(bias=_with_value(b, b.value[:, None])), ValueError, "bias.value"),
    (lambda q, k, v, b: dict(bias=_with_value(b, b.value.to("meta"))), ValueError, "bias.value"),
    (lambda q, k, v, b: dict(bias=_with_value(b, b.value.tolist())), TypeError, "bias.value"),
    (lambda q, k, v, b: dict(backend="cuda"), ValueError, "backend must be one of"),
    (lambda q, k, v, b: dict(backend=3), TypeError, "backend"),
    (lambda q, k, v, b: dict(capture=42), TypeError, "capture"),
])
def test_bad_input(case, error, match):
    q, k, v, bias = _good()
    kwargs = dict(q=q, k=k, v=v, bias=bias)
    kwargs.update(case(q, k, v, bias))
    args = [kwargs.pop(n) for n in ("q", "k", "v", "bias")]
    with pytest.raises(error, match=match):
        mt.biased_attention(*args, **kwargs)


def test_bad_input_leaves_bias_untouched():
    q, k, v, bias = _good()
    before = [t.clone() for t in (bias.value, bias.entry_pos, bias.q_offsets)]
    with pytest.raises(ValueError):
        mt.biased_attention(q, k, v, bias, alpha=float("nan"))
    for a, b in zip(before, (bias.value, bias.entry_pos, bias.q_offsets)):
        assert torch.equal(a, b)


# ---- backend selection --------------------------------------------------------------------------

def test_unsupported_backend_names_the_takers():
    q, k, v, bias = _good()
    with pytest.raises(ValueError) as info:
        mt.biased_attention(q, k, v, bias, backend="cudnn")
    msg = str(info.value)
    assert "cudnn" in msg and "needs a CUDA device" in msg and "reference" in msg
    with pytest.raises(ValueError, match="flash_attn"):
        mt.biased_attention(q, k, v, bias, backend="flash_attn")


def test_bf16_triton_on_cpu_is_refused_with_reason():
    q, k, v, bias = _good()
    with pytest.raises(ValueError, match="interpreter|TRITON_INTERPRET"):
        mt.biased_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias, backend="triton")


def test_auto_on_cpu():
    q, k, v, bias = _good()
    name, auto = A.select_backend(q, k, v, bias)
    assert auto and name == ("triton" if INTERPRET else "reference")
    reasons = A.backend_reasons(q, k, v, bias)
    assert set(reasons) >= {"triton", "cudnn", "flash", "flash_attn", "reference"}
    assert reasons["reference"] == [] and reasons["cudnn"]
    assert "reference" in A.available_backends(q, k, v, bias)


def test_environment_variable_forces_a_backend(monkeypatch):
    q, k, v, bias = _good()
    try:
        monkeypatch.setenv("MEMTRACE_BACKEND", "reference")
        config.reload()
        assert A.select_backend(q, k, v, bias) == ("reference", False)
        monkeypatch.setenv("MEMTRACE_BACKEND", "cudnn")
        config.reload()
        with pytest.raises(ValueError, match="MEMTRACE_BACKEND"):
            mt.biased_attention(q, k, v, bias)
        monkeypatch.setenv("MEMTRACE_BACKEND", "nonsense")
        with pytest.raises(ValueError, match="MEMTRACE_BACKEND"):
            config.reload()
        # an explicit argument wins over the variable
        monkeypatch.setenv("MEMTRACE_BACKEND", "cudnn")
        config.reload()
        assert A.select_backend(q, k, v, bias, backend="reference") == ("reference", False)
    finally:
        monkeypatch.delenv("MEMTRACE_BACKEND")
        config.reload()


class _Broken(backend_base.Backend):
    name = "broken"

    def not_supported_reasons(self, call):
        return []

    def forward(self, *args, **kwargs):
        raise RuntimeError("kernel exploded\nsecond line")

    def backward(self, *args, **kwargs):
        raise RuntimeError("backward exploded")


def test_auto_falls_back_once_with_a_warning(add_backend):
    add_backend(_Broken(), priority=0)
    q, k, v, bias, coo = make_inputs(1, 2, 2, 5, 5, 16, seed=43)
    with pytest.warns(RuntimeWarning, match="broken"):
        out = mt.biased_attention(q, k, v, bias)
    want = oracle_attention(q, k, v, coo, torch.ones_like(q), causal=False)
    assert rel_err(out, want[0]) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        mt.biased_attention(q, k, v, bias)  # no second warning; not tried again
    assert "failed earlier" in " ".join(A.backend_reasons(q, k, v, bias)["broken"])
    with pytest.raises(ValueError, match="failed earlier"):
        mt.biased_attention(q, k, v, bias, backend="broken")


def test_explicit_backend_raises_the_real_error(add_backend):
    add_backend(_Broken())
    q, k, v, bias, _ = make_inputs(1, 2, 2, 5, 5, 16, seed=47)
    with pytest.raises(RuntimeError, match="kernel exploded"):
        mt.biased_attention(q, k, v, bias, backend="broken")


def test_private_torch_op_schema_guard(monkeypatch):
    """A changed schema of PyTorch's private ops turns the backend off with a reason."""
    monkeypatch.setitem(torch_ops._TORCH_OP_SCHEMAS, "_scaled_dot_product_flash_attention",
                        ([("query", "Tensor"), ("renamed", "Tensor")], 9))
    monkeypatch.setattr(torch_ops, "_SCHEMA_CHECKS", {})
    assert "does not know" in torch_ops.torch_op_mismatch("_scaled_dot_product_flash_attention")
    assert torch_ops.torch_op_mismatch("_scaled_dot_product_cudnn_attention") is None
    assert torch_ops.torch_op_mismatch("_scaled_dot_product_cudnn_attention_backward") is None
    assert torch_ops.torch_op_mismatch("_scaled_dot_product_flash_attention_backward") is None


def test_negative_biases_steer_auto_away_from_the_standalone_correction(monkeypatch):
    """alpha * bias below ln(CANCEL_THRESHOLD) can cancel the identity: corrected-dense backends
    decline, the fused Triton path (or the reference) takes the call."""
    if not INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 for the corrected CPU stand-in")
    q, k, v, bias, _ = make_inputs(1, 2, 2, 5, 5, 16, seed=53, value_scale=1.0)
    assert A.select_backend(q, k, v, bias, backend="corrected_cpu")[0] == "corrected_cpu"
    registry.reset()
    with pytest.raises(ValueError, match="cancel"):
        mt.biased_attention(q, k, v, bias, alpha=18.0, backend="corrected_cpu")
    # "auto" with the corrected stand-in first in line: it takes the mild call, not the cancelling one
    monkeypatch.setattr(registry, "AUTO_PRIORITY", ("corrected_cpu", *registry.AUTO_PRIORITY))
    used = []
    for name in ("corrected_cpu", "triton", "reference"):
        backend = A.get_backend(name)
        monkeypatch.setattr(backend, "forward",
                            lambda *a, _f=backend.forward, _n=name, **kw: used.append(_n) or _f(*a, **kw))
    registry.reset()
    with torch.no_grad():
        mt.biased_attention(q, k, v, bias)
        assert used[0] == "corrected_cpu", used     # (its dense part runs the reference forward)
        for alpha in (18.0, -18.0):       # |alpha * bias| up to 62: under MAX_POSITIVE_BIAS_LOGIT, far under ln(0.25)
            used.clear()
            out = mt.biased_attention(q, k, v, bias, alpha=alpha)
            assert used and used[0] in ("triton", "reference"), used
            dense = mt.reference.dense_bias(bias.head, bias.q_idx, bias.k_idx, bias.value.double(), 2, 5, 5)
            want = mt.reference.attention(q.double(), k.double(), v.double(), dense, alpha=alpha)
            assert rel_err(out, want) < 1e-5


# ---- torch.library / torch.compile --------------------------------------------------------------

def test_opcheck():
    q, k, v, bias, _ = make_inputs(1, 2, 1, 5, 6, 16, seed=59)
    ev = bias.entry_values()
    args = (q, k, v, A._bias_tensors(bias), ev, [2, bias.seq_len_q, bias.seq_len_k], True, 0.25, 1.0,
            "reference")
    torch.library.opcheck(A._fwd_op, args, test_utils=("test_schema", "test_faketensor",
                                                       "test_autograd_registration"))


def test_torch_compile_fullgraph_matches_eager():
    q, k, v, bias, coo = make_inputs(2, 4, 2, 6, 9, 16, seed=61)
    proj = torch.nn.Linear(16, 16)

    def model(q, k, v, bias):
        out = mt.biased_attention(proj(q), k, v, bias, causal=True, alpha=0.5, backend="reference")
        return (out * out).sum()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v, bias)
    loss.backward()
    got = [t.grad.clone() for t in (q, k, v, bias.value)]
    for t in (q, k, v, bias.value):
        t.grad = None
    ref = model(q, k, v, bias)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for a, t in zip(got, (q, k, v, bias.value)):
        torch.testing.assert_close(a, t.grad)


def test_torch_compile_inductor_no_bias():
    """Inductor (the default compiler) with bias=None and auto selection."""
    q, k, v, _, _ = make_inputs(1, 2, 2, 5, 5, 16, seed=67)

    def model(q, k, v):
        return mt.biased_attention(q, k, v, causal=True).sum()

    torch._dynamo.reset()
    loss = torch.compile(model, fullgraph=True)(q, k, v)
    torch.testing.assert_close(loss, model(q, k, v))


@pytest.mark.parametrize("backend", cpu_backends())
def test_custom_op_path_in_eager(backend, monkeypatch):
    """The torch.library op (what torch.compile traces) run eagerly, forward and backward through
    register_autograd, agrees with the oracle like the autograd.Function path does."""
    monkeypatch.setattr(A, "_tracing", lambda q: True)
    q, k, v, bias, coo = make_inputs(2, 4, 2, 6, 9, 16, seed=71)
    check_parity(q, k, v, bias, coo, causal=True, backend=backend)
    q, k, v, _, _ = make_inputs(1, 2, 2, 5, 5, 16, seed=73)
    check_parity(q, k, v, None, None, causal=False, backend=backend)


# ---- double backward ----------------------------------------------------------------------------

class _Opaque(backend_base.Backend):
    """A kernel-like backend: the reference math run under no_grad, so the gradients it returns
    carry no graph (as those of the Triton / cuDNN / flash kernels)."""

    name = "opaque"

    def not_supported_reasons(self, call):
        return []

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return A.get_backend("reference").forward(*args, **kwargs)

    def backward(self, *args, **kwargs):
        with torch.no_grad():
            return A.get_backend("reference").backward(*args, **kwargs)


def test_double_backward_is_exact_on_the_reference_and_refused_elsewhere(add_backend):
    """A gradient penalty (create_graph=True, then backward through dq): the reference backward is
    plain torch math and differentiates exactly; a kernel backend must raise, not silently treat
    its first-order gradients as constants (which dropped the penalty's second-order term)."""
    add_backend(_Opaque())
    q, k, v, bias, coo = make_inputs(1, 2, 1, 4, 6, 16, seed=79)

    def penalised(attend, q, k, v, bias):
        out = attend(q, k, v, bias)
        dq, = torch.autograd.grad((out * out).sum(), q, create_graph=True)
        return out.sum() + (dq * dq).sum()

    q64, k64, v64, val64 = (t.detach().double().requires_grad_(True) for t in (q, k, v, coo[3]))
    dense = lambda val: mt.reference.dense_bias(*coo[:3], val, 2, 4, 6)  # noqa: E731
    penalised(lambda q, k, v, val: mt.reference.attention(q, k, v, dense(val), causal=True),
              q64, k64, v64, val64).backward()
    penalised(lambda q, k, v, b: mt.biased_attention(q, k, v, b, causal=True, backend="reference"),
              q, k, v, bias).backward()
    for got, want in zip((q, k, v, bias.value), (q64, k64, v64, val64)):
        assert rel_err(got.grad, want.grad) < 1e-4
    for backend in ["opaque"] + (["triton"] if INTERPRET else []):
        loss = penalised(lambda q, k, v, b: mt.biased_attention(q, k, v, b, causal=True, backend=backend),
                         q, k, v, bias)
        with pytest.raises(RuntimeError, match="double backward"):
            loss.backward()


def test_may_cancel_follows_the_lowest_bias_logit():
    """The forwards skip the cancelled-row recompute only when no row can cancel: 1 + sum w >=
    exp(alpha * min value) >= CANCEL_THRESHOLD, i.e. alpha * min value >= ln(CANCEL_THRESHOLD)."""
    from memtrace.kernels.attention import CANCEL_THRESHOLD

    from memtrace.backends.base import may_cancel as _may_cancel
    floor = math.log(CANCEL_THRESHOLD)

    def bias_of(values):
        n = len(values)
        z = torch.zeros(n, dtype=torch.long)
        return mt.TraceBias.from_coo(z, torch.arange(n), torch.arange(n), torch.tensor(values),
                                     num_heads=1, seq_len_q=n, seq_len_k=n)
    assert not _may_cancel(None, 1.0)
    assert not _may_cancel(bias_of([0.5, floor + 1e-3]), 1.0)
    assert _may_cancel(bias_of([0.5, floor - 1e-3]), 1.0)
    assert _may_cancel(bias_of([0.5, 2.0]), -1.0)          # alpha < 0 turns the largest value lowest
    assert not _may_cancel(bias_of([0.5, 2.0]), 0.1)
    # duplicates add before the test: two entries of floor / 2 at one position reach floor - 1e-3
    dup = mt.TraceBias.from_coo(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                                torch.zeros(2, dtype=torch.long), torch.tensor([floor / 2, floor / 2 - 1e-3]),
                                num_heads=1, seq_len_q=1, seq_len_k=1)
    assert _may_cancel(dup, 1.0)


def test_triton_backward_skips_the_cancellation_work_when_no_row_can_cancel(monkeypatch):
    """Non-negative traces (alpha > 0) cannot cancel: the triton backend's backward must not run
    the cancelling-row flags pass or the exact-row kernels (~2.5% of a forward+backward on the
    H100); with a value under ln(0.25) / alpha it must."""
    if not INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 (the Triton kernels on CPU)")
    from memtrace.kernels.attention import bwd as kbwd
    calls = []
    real_flags, real_exact = kbwd.cancel_flags, kbwd.exact_rows
    monkeypatch.setattr(kbwd, "cancel_flags", lambda *a, **kw: calls.append("flags") or real_flags(*a, **kw))
    monkeypatch.setattr(kbwd, "exact_rows", lambda *a, **kw: calls.append("exact") or real_exact(*a, **kw))
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 12, 16, generator=g, requires_grad=True) for _ in range(3))
    head, i, j = torch.randint(0, 2, (20,), generator=g), torch.randint(0, 12, (20,), generator=g), \
        torch.randint(0, 12, (20,), generator=g)
    for low, expect in ((0.0, []), (-3.0, ["flags", "exact"])):
        calls.clear()
        value = torch.rand(20, generator=g) + low
        bias = mt.TraceBias.from_coo(head, i, j, value, num_heads=2, seq_len_q=12, seq_len_k=12)
        mt.biased_attention(q, k, v, bias, backend="triton").sum().backward()
        assert calls == expect, (low, calls)


# ---- return_lse ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("causal", [False, True])
def test_return_lse_matches_the_oracle(backend, causal):
    """lse is the natural log-sum-exp of each row's biased logits (-inf where no key is left),
    float32 [B, Hq, Tq]; out is the same tensor return_lse=False gives."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    # corrected_cpu declines alpha * bias < ln(1/4); duplicate entries sum, so its values stay small
    scale = 1.0 if backend == "corrected_cpu" else 3.0
    q, k, v, bias, coo = make_inputs(2, 4, 2, 9, 6, 16, torch.float32, seed=seed, value_scale=scale)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :4] = False                    # with causal, rows 0-6 of batch 1 keep no key
    out, lse = mt.biased_attention(q, k, v, bias, causal=causal, alpha=0.4, backend=backend, return_lse=True,
                                   key_padding_mask=mask if backend != "corrected_cpu" else None)
    plain = mt.biased_attention(q, k, v, bias, causal=causal, alpha=0.4, backend=backend,
                                key_padding_mask=mask if backend != "corrected_cpu" else None)
    assert torch.equal(out, plain)
    head, qi, ki, val = coo
    dense = mt.reference.dense_bias(head, qi, ki, val.double(), 4, bias.seq_len_q, bias.seq_len_k)[:, :9, :6]
    _, want = mt.reference.attention_with_lse(q.double(), k.double(), v.double(), dense, causal=causal, alpha=0.4,
                                              key_padding_mask=mask if backend != "corrected_cpu" else None)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 9) and not lse.requires_grad
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(lse), finite) and bool((lse[~finite] == float("-inf")).all())
    assert torch.allclose(lse[finite].double(), want[finite], atol=1e-5, rtol=1e-5)


def test_return_lse_is_a_constant_on_every_path():
    """No gradient flows through lse: it does not require grad, eagerly, through the op and
    under torch.compile, and backward through out is unchanged by asking for it."""
    q, k, v, bias, _ = make_inputs(1, 2, 2, 5, 5, 16, torch.float32, seed=3)
    out, lse = mt.biased_attention(q, k, v, bias, backend="reference", return_lse=True)
    assert out.requires_grad and not lse.requires_grad
    out.sum().backward()
    g_with = q.grad.clone()
    q.grad = None
    mt.biased_attention(q, k, v, bias, backend="reference").sum().backward()
    assert torch.equal(q.grad, g_with)
    compiled = torch.compile(lambda *t: mt.biased_attention(*t, bias, backend="reference", return_lse=True),
                             backend="eager", fullgraph=True)
    c_out, c_lse = compiled(q, k, v)
    assert not c_lse.requires_grad and torch.allclose(c_lse, lse) and torch.allclose(c_out, out)


def test_return_lse_must_be_a_bool():
    q, k, v, _, _ = make_inputs(1, 2, 2, 5, 5, 16, torch.float32)
    with pytest.raises(TypeError, match="return_lse"):
        mt.biased_attention(q, k, v, return_lse=1)
