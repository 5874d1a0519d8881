"""What biased_attention accepts at the edges of float32 (issue 28, points 4 and 5): non-finite or
huge scales are refused with a reason; a NaN that reaches the kernels past the value check comes
out as NaN on every backend, never as a silent zero."""
import os

import pytest
import torch

import memtrace as mt

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BACKENDS = ["reference"] + (["triton"] if INTERPRET else [])


def _inputs(seed, B=1, H=2, T=6, D=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), 1e30, 1e38, 1e4 * (1 + 1e-6), -1.0, 0.0])
def test_bad_scales_are_refused_naming_scale(scale):
    q, k, v = _inputs(1)
    with pytest.raises(ValueError, match="scale"):
        mt.biased_attention(q, k, v, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_largest_scale_gives_finite_outputs_and_gradients(backend, dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in _inputs(2))
    out = mt.biased_attention(q, k, v, scale=1e4, backend=backend)
    out.float().sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_nan_written_past_the_version_counter_is_nan_on_every_backend():
    """The value check is cached on the value tensor's version counter (no sync per call); a write
    through .data skips it. Then the NaN must come out as NaN, the same on every backend."""
    q, k, v = _inputs(3)
    val = torch.tensor([0.5, 1.0, 2.0])
    bias = mt.TraceBias.from_coo(torch.tensor([0, 1, 1]), torch.tensor([1, 2, 4]), torch.tensor([0, 2, 3]), val,
                                 num_heads=2, seq_len_q=6, seq_len_k=6)
    for backend in BACKENDS:
        assert torch.isfinite(mt.biased_attention(q, k, v, bias, backend=backend)).all()
    bias.value.data[1] = float("nan")      # bypasses the version counter
    nan_rows = {}
    for backend in BACKENDS:
        out = mt.biased_attention(q, k, v, bias, backend=backend)
        nan_rows[backend] = torch.isnan(out).any(-1)
        assert nan_rows[backend][0, 1, 2], f"{backend}: the row with the NaN entry is not NaN"
        assert not nan_rows[backend][0, 0].any(), f"{backend}: NaN leaked into another head"
    for backend in BACKENDS:
        assert torch.equal(nan_rows[backend], nan_rows["reference"])
    # a new value tensor is checked again and refused
    with pytest.raises(ValueError, match="NaN|finite"):
        mt.TraceBias.from_coo(bias.head, bias.q_idx, bias.k_idx, bias.value.detach().clone(), num_heads=2,
                              seq_len_q=6, seq_len_k=6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_positive_bias_is_refused_and_the_largest_taken_is_accurate(backend):
    """Issue 28 point 2: with one key, P = 1 exactly, so dv must equal dout. A positive alpha * bias
    over MAX_POSITIVE_BIAS_LOGIT is refused with the reason; up to it, SPEC 7's 1e-5 holds."""
    from memtrace.backends.base import MAX_POSITIVE_BIAS_LOGIT

    def one_key(value, seed):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, 1, 1, 16, generator=g).requires_grad_() for _ in range(3))
        dout = torch.randn(1, 1, 1, 16, generator=g)
        b = mt.TraceBias.from_coo(*(torch.tensor([0]),) * 3, torch.tensor([value]), num_heads=1, seq_len_q=1,
                                  seq_len_k=1)
        return q, k, v, dout, b

    q, k, v, dout, b = one_key(1e4, 1)
    with pytest.raises(ValueError, match="alpha \\* bias"):
        mt.biased_attention(q, k, v, b, backend=backend)
    q, k, v, dout, b = one_key(2.0, 1)
    with pytest.raises(ValueError, match="alpha \\* bias"):
        mt.biased_attention(q, k, v, b, alpha=MAX_POSITIVE_BIAS_LOGIT, backend=backend)
    for seed in range(6):
        for value in (MAX_POSITIVE_BIAS_LOGIT, 0.63 * MAX_POSITIVE_BIAS_LOGIT, 31.3):
            q, k, v, dout, b = one_key(value, seed)
            mt.biased_attention(q, k, v, b, backend=backend).backward(dout)
            assert ((v.grad - dout).norm() / dout.norm()).item() < 1e-5
    # negative values stay allowed (down to the overflow bound): their edges get no mass
    q, k, v, dout, b = one_key(-1e4, 2)
    assert torch.isfinite(mt.biased_attention(q, k, v, b, backend=backend)).all()


def _fp16_dvalue_error(seed, backend):
    """Relative error of d(bias values) against the float64 oracle on one of issue 28's random fp16
    cases (point 3: biases up to ~12, so some entries dominate their rows)."""
    from _helpers import make_inputs
    g = torch.Generator().manual_seed(seed)
    Tq, Tk = (int(x) for x in torch.randint(3, 12, (2,), generator=g))
    q, k, v, bias, _ = make_inputs(1, 2, 1, Tq, Tk, 16, torch.float16, seed=seed, value_scale=4.0)
    dout = torch.randn(q.shape, generator=g).half()
    val = bias.value.detach().clone().requires_grad_()
    b = mt.TraceBias.from_coo(bias.head, bias.q_idx, bias.k_idx, val, num_heads=2, seq_len_q=bias.seq_len_q,
                              seq_len_k=bias.seq_len_k)
    mt.biased_attention(*(t.detach().clone().requires_grad_() for t in (q, k, v)), b, backend=backend).backward(dout)
    val64 = bias.value.detach().double().requires_grad_()
    dense = mt.reference.dense_bias(bias.head, bias.q_idx, bias.k_idx, val64, 2, bias.seq_len_q, bias.seq_len_k)
    mt.reference.attention(q.double(), k.double(), v.double(), dense[:, :Tq, :Tk]).backward(dout.double())
    return ((val.grad.double() - val64.grad).norm() / val64.grad.norm()).item()


@pytest.mark.parametrize("seed", [27, 34, 39])
def test_fp16_bias_gradient_on_the_reference_backend(seed):
    assert _fp16_dvalue_error(seed, "reference") < 5e-3


@pytest.mark.skipif(not INTERPRET, reason="the Triton backend runs on the CPU under TRITON_INTERPRET=1")
@pytest.mark.xfail(strict=True, reason="issue 28 point 3, open: the Triton backward's row term D = rowsum(dO * O) "
                   "reads the fp16-rounded output; where an entry dominates its row, dS on it is a small difference "
                   "of two large terms and the rounding of O passes SPEC 7's 5e-3 (measured 1.0e-2 - 1.4e-2)")
@pytest.mark.parametrize("seed", [27, 34, 39])
def test_fp16_bias_gradient_on_the_triton_backend(seed):
    assert _fp16_dvalue_error(seed, "triton") < 5e-3
