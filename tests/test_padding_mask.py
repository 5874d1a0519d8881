"""key_padding_mask and tensor alpha in memtrace.biased_attention (SPEC 2, 3, 9; issue 24 points 3, 5).

Parity against the float64 reference (memtrace.reference with the mask) on the reference backend
and, under TRITON_INTERPRET=1, on the triton backend: random masks, left / right padding, fully
masked rows (with and without causal), GQA, odd sizes, empty and full biases, bias entries on
masked keys, gradients of q, k, v and the bias values, the salience capture, tensor alpha against
float alpha, the routing of masked calls, the custom op, and bad input. Tiny shapes: the
interpreter is slow.
"""
import pytest
import torch
from _helpers import TOL, check_capture, interpreting, make_inputs, rel_err

import memtrace as mt
from memtrace import attention as A
from memtrace import reference as R
from memtrace.backends import registry

BACKENDS = ["reference"] + (["triton"] if interpreting() else [])
needs_triton = pytest.mark.skipif(not interpreting(), reason="the triton backend on the CPU needs TRITON_INTERPRET=1")


def make_mask(kind, B, Tk, seed=0):
    """bool [B, Tk], True = attend."""
    g = torch.Generator().manual_seed(seed)
    m = torch.ones(B, Tk, dtype=torch.bool)
    if kind == "random":
        m = torch.rand(B, Tk, generator=g) > 0.35
        m[:, 0] = True
    elif kind == "left":            # left padding of 1 and of 40% of the keys
        m[0, :1] = False
        m[-1, : max(1, (2 * Tk) // 5)] = False
    elif kind == "right":
        m[0, Tk - 3:] = False
        m[-1, Tk // 2:] = False
    elif kind == "empty_row":       # batch element 0 has no key at all: every row is fully masked
        m[0] = False
        m[-1, ::2] = False
    elif kind != "all":
        raise KeyError(kind)
    return m


def oracle(q, k, v, coo, dout, mask, *, causal, alpha=1.0, scale=None):
    """(out, dq, dk, dv, dvalue or None) in float64 through autograd on the dense reference."""
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    dense, val64 = None, None
    if coo is not None:
        head, q_idx, k_idx, value = coo
        val64 = value.detach().double().requires_grad_(True)
        dense = R.dense_bias(head, q_idx, k_idx, val64, q.shape[1], q.shape[2], k.shape[2])
    alpha = alpha.double() if isinstance(alpha, torch.Tensor) else alpha
    out = R.attention(q64, k64, v64, dense, causal=causal, scale=scale, alpha=alpha, key_padding_mask=mask)
    inputs = [q64, k64, v64] + ([val64] if val64 is not None else [])
    grads = torch.autograd.grad(out, inputs, dout.double(), allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(inputs, grads)]
    return (out, *grads) if val64 is not None else (out, *grads, None)


def run(q, k, v, bias, dout, mask, **kw):
    """(out, dq, dk, dv, dvalue or None) of the op."""
    for t in (q, k, v):
        t.grad = None
    if bias is not None:
        bias.value.grad = None
    out = mt.biased_attention(q, k, v, bias, key_padding_mask=mask, **kw)
    out.backward(dout)
    dval = bias.value.grad if bias is not None else None
    return out.detach(), q.grad, k.grad, v.grad, dval


def assert_close_to_oracle(got, want, dtype):
    tol = TOL[dtype]
    names = ("out", "dq", "dk", "dv", "dvalue")
    for name, g, w in zip(names, got, want):
        if w is None:
            continue
        assert torch.isfinite(g).all(), f"{name} has NaN / Inf"
        # gradients of bias values are float32 whatever q's dtype; rows that are ~0 compare absolutely
        assert rel_err(g, w, 0.05 if name != "out" else 0.0) < (tol if name != "dvalue" else max(tol, 1e-5)), name


# ---- parity ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,causal,shape", [
    ("random", False, (2, 2, 2, 13, 13)),
    ("left", True, (2, 4, 2, 21, 21)),          # GQA, left padding under causal (rows with no key)
    ("right", False, (2, 2, 1, 9, 19)),         # Tq != Tk
    ("empty_row", True, (2, 2, 2, 19, 11)),     # causal with Tq > Tk: rows masked by both
])
def test_parity_fp32(backend, kind, causal, shape):
    B, Hq, Hkv, Tq, Tk = shape
    q, k, v, bias, coo = make_inputs(B, Hq, Hkv, Tq, Tk, 16, n=30, seed=3)
    mask = make_mask(kind, B, Tk, seed=1)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    got = run(q, k, v, bias, dout, mask, causal=causal, alpha=0.7, backend=backend)
    want = oracle(q, k, v, coo, dout, mask, causal=causal, alpha=0.7)
    assert_close_to_oracle(got, want, torch.float32)


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
def test_parity_fp16_no_bias(causal):
    q, k, v, _, _ = make_inputs(2, 2, 2, 17, 17, 32, dtype=torch.float16, seed=5)
    mask = make_mask("left", 2, 17)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).half()
    got = run(q, k, v, None, dout, mask, causal=causal, backend="triton")
    want = oracle(q, k, v, None, dout, mask, causal=causal)
    assert_close_to_oracle(got, want, torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_give_zero_and_no_nan(backend):
    q, k, v, bias, _ = make_inputs(2, 2, 2, 9, 9, 16, seed=11)
    mask = make_mask("empty_row", 2, 9)
    mask[1, :3] = False                    # causal: rows 0..2 of batch 1 see no key either
    dout = torch.randn(q.shape)
    out, dq, dk, dv, dval = run(q, k, v, bias, dout, mask, causal=True, backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all() and torch.isfinite(dval).all()
    assert torch.all(out[0] == 0) and torch.all(out[1, :, :3] == 0)
    assert torch.all(dq[0] == 0) and torch.all(dq[1, :, :3] == 0)
    assert torch.all(dk[0] == 0) and torch.all(dv[0] == 0)
    assert torch.all(dk[1, :, :3] == 0) and torch.all(dv[1, :, :3] == 0)
    # the backend's own lse is -inf there
    with torch.no_grad():
        _, lse = registry.REGISTRY[backend].forward(q, k, v, bias, bias.entry_values(), causal=True, scale=0.25,
                                                    alpha=1.0, key_padding_mask=mask)
    assert torch.all(lse[0] == float("-inf")) and torch.all(lse[1, :, :3] == float("-inf"))
    assert torch.isfinite(lse[1, :, 3:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_true_mask_equals_no_mask(backend):
    """reference: bitwise; triton: the masked kernel variant (every key block through the masked
    loop) rounds differently, so within SPEC 7 of the unmasked call."""
    q, k, v, bias, _ = make_inputs(2, 2, 1, 11, 13, 16, seed=13)
    dout = torch.randn(q.shape)
    a = run(q, k, v, bias, dout, None, causal=True, backend=backend)
    b = run(q, k, v, bias, dout, make_mask("all", 2, 13), causal=True, backend=backend)
    for x, y in zip(a, b):
        if backend == "reference":
            assert torch.equal(x, y)
        else:
            assert rel_err(y, x, 0.05) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_entries_on_masked_keys_add_nothing(backend):
    """A bias whose entries all sit on masked keys (large values) changes nothing and gets zero
    gradient; with entries on both, only the kept ones count."""
    B, H, T = 2, 2, 12
    q, k, v, _, _ = make_inputs(B, H, H, T, T, 16, seed=17)
    mask = make_mask("left", B, T)              # batch 0: key 0 masked; batch 1: keys 0..3
    head = torch.tensor([0, 1, 0, 1, 0])
    qi = torch.tensor([5, 6, 7, 2, 9])
    kj = torch.tensor([0, 0, 3, 1, 8])          # keys 0, 1, 3 are masked in batch 1 (key 0 in both)
    value = torch.tensor([6.0, -3.0, 4.0, 5.0, 1.5], requires_grad=True)
    bias = mt.TraceBias.from_coo(head, qi, kj, value, num_heads=H, seq_len_q=T, seq_len_k=T)
    dout = torch.randn(q.shape)
    got = run(q, k, v, bias, dout, mask, backend=backend)
    want = oracle(q, k, v, (head, qi, kj, value), dout, mask, causal=False)
    assert_close_to_oracle(got, want, torch.float32)
    assert got[4][0] == 0                       # key 0 is masked in every batch element
    # only entries on key 0 (masked everywhere): the output is the unbiased masked attention
    only_masked = mt.TraceBias.from_coo(head[:2], qi[:2], kj[:2], value.detach()[:2].clone().requires_grad_(),
                                        num_heads=H, seq_len_q=T, seq_len_k=T)
    out_b = run(q, k, v, only_masked, dout, mask, backend=backend)
    out_0 = run(q, k, v, None, dout, mask, backend=backend)
    assert rel_err(out_b[0], out_0[0]) < 1e-6
    assert torch.all(out_b[4] == 0)


@needs_triton
def test_masked_cancelling_rows():
    """Negative biases that make the correction identity cancel (the cancelling-row launches),
    with a mask, fused forms forced to split (masked calls must ignore that: no split form takes a
    mask)."""
    from memtrace import config
    q, k, v, _, _ = make_inputs(2, 2, 2, 16, 16, 16, seed=19)
    g = torch.Generator().manual_seed(4)
    n = 60
    head, qi, kj = (torch.randint(0, m, (n,), generator=g) for m in (2, 16, 16))
    value = (-6 * torch.rand(n, generator=g)).requires_grad_()
    bias = mt.TraceBias.from_coo(head, qi, kj, value, num_heads=2, seq_len_q=16, seq_len_k=16)
    mask = make_mask("random", 2, 16, seed=7)
    dout = torch.randn(q.shape)
    want = oracle(q, k, v, (head, qi, kj, value), dout, mask, causal=True, alpha=1.5)
    with config.override(attn_fwd_split="1", attn_bwd_split="1"):
        got = run(q, k, v, bias, dout, mask, causal=True, alpha=1.5, backend="triton")
        from memtrace.kernels.attention import flash_fwd
        flags = flash_fwd(q.detach(), k.detach(), v.detach(), bias, bias.entry_values().detach(), causal=True,
                          scale=0.25, alpha=1.5, return_flags=True, key_padding_mask=mask)[2]
    assert int(flags.sum()) > 0, "the test needs cancelling rows"
    assert_close_to_oracle(got, want, torch.float32)


# ---- capture -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused", ["0", "1"])
def test_capture_with_mask(backend, fused, memtrace_settings):
    """Edges on masked keys never appear; everything else equals the reference capture."""
    if backend == "reference" and fused == "1":
        pytest.skip("the fused bound is the triton backward's")
    memtrace_settings(capture_fused=fused)
    B, H, T = 2, 2, 16
    q, k, v, bias, _ = make_inputs(B, H, H, T, T, 16, n=20, seed=23, out_of_range=False)
    mask = make_mask("random", B, T, seed=3)
    mask[:, 5] = False                           # key 5 masked in every batch element
    dout = torch.randn(q.shape)
    cap = mt.SalienceCapture(threshold=1e-3)
    out = mt.biased_attention(q, k, v, bias, causal=True, alpha=0.8, capture=cap, backend=backend,
                              key_padding_mask=mask)
    out.backward(dout)
    dense = R.dense_bias(bias.head, bias.q_idx, bias.k_idx, bias.value.detach(), H, T, T)
    P = R.probabilities(*(t.detach().double() for t in (q, k)), dense, causal=True, alpha=0.8,
                        key_padding_mask=mask)
    dP = torch.matmul(dout.double(), v.detach().double().transpose(-1, -2))
    S, a = (P * dP.abs()).mean(0), P.mean(0)
    check_capture(cap, S, a, bias, 1e-3, torch.float32)
    n = int(cap.num_edges)
    assert n > 0
    j = cap.edges[2][:n].long()
    assert not torch.any(j == 5), "an edge on a key masked in every batch element was captured"
    bS, ba = cap.bias_scores
    on5 = bias.k_idx == 5
    assert torch.all(bS[on5] == 0) and torch.all(ba[on5] == 0)


# ---- tensor alpha ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_tensor_alpha_equals_float_alpha(backend, masked):
    q, k, v, bias, coo = make_inputs(2, 2, 2, 10, 10, 16, seed=29)
    mask = make_mask("right", 2, 10) if masked else None
    dout = torch.randn(q.shape)
    a = run(q, k, v, bias, dout, mask, causal=True, alpha=0.37, backend=backend)
    b = run(q, k, v, bias, dout, mask, causal=True, alpha=torch.tensor(0.37), backend=backend)
    for x, y in zip(a, b):
        assert rel_err(y, x, 0.05) < 1e-6
    want = oracle(q, k, v, coo, dout, mask, causal=True, alpha=0.37)
    assert_close_to_oracle(b, want, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_alpha_is_not_read_on_the_host(backend, monkeypatch):
    """No .item() / float() / .tolist() of a tensor alpha (or a view of it) in the forward, the
    backward or the capture (each is a device sync on CUDA)."""
    q, k, v, bias, _ = make_inputs(2, 2, 2, 8, 8, 16, seed=31)
    mask = make_mask("left", 2, 8)
    alpha = torch.tensor(0.5)
    ptr = alpha.data_ptr()
    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        orig = getattr(torch.Tensor, name)

        def guarded(self, *args, _orig=orig, _name=name, **kwargs):
            if self.numel() == 1 and self.data_ptr() == ptr:
                raise AssertionError(f"alpha.{_name}() was called: a host sync")
            return _orig(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, guarded)
    cap = mt.SalienceCapture(threshold=1e-3)
    out = mt.biased_attention(q, k, v, bias, alpha=alpha, backend=backend, key_padding_mask=mask, capture=cap)
    out.sum().backward()
    monkeypatch.undo()
    assert torch.isfinite(out).all() and cap.filled


def test_tensor_alpha_bad_input():
    q, k, v, bias, _ = make_inputs(1, 2, 2, 6, 6, 16, seed=37)
    with pytest.raises(ValueError, match="alpha must not require grad"):
        mt.biased_attention(q, k, v, bias, alpha=torch.tensor(0.5, requires_grad=True))
    with pytest.raises(TypeError, match="alpha"):
        mt.biased_attention(q, k, v, bias, alpha=torch.tensor([0.5]))
    with pytest.raises(TypeError, match="alpha"):
        mt.biased_attention(q, k, v, bias, alpha=torch.tensor(1))
    with pytest.raises(ValueError, match="alpha"):
        mt.biased_attention(q, k, v, bias, alpha=torch.tensor(0.5, device="meta"))


def test_tensor_alpha_routing():
    """A biased tensor-alpha call may cancel (not read on the host): the dense backends decline."""
    q, k, v, bias, _ = make_inputs(1, 2, 2, 6, 6, 16, seed=41)
    from memtrace.backends.base import Call
    call = Call(q, k, v, bias, False, None, None, True)
    for name in ("cudnn", "flash", "flash_attn"):
        assert any("alpha is a tensor" in r for r in registry.REGISTRY[name].not_supported_reasons(call))


# ---- routing, custom op, bad input ----------------------------------------------------------------

def test_masked_calls_route_to_mask_taking_backends():
    q, k, v, bias, _ = make_inputs(2, 2, 2, 6, 6, 16, seed=43)
    mask = make_mask("left", 2, 6)
    reasons = mt.attention.backend_reasons(q, k, v, bias, key_padding_mask=mask)
    for name in ("cudnn", "flash", "flash_attn"):
        assert any("key_padding_mask" in r for r in reasons[name]), reasons[name]
    assert not reasons["reference"]
    name, auto = registry.resolve("auto", q, k, v, bias, False, 1.0, mask)
    assert auto and name == ("triton" if interpreting() else "reference")
    with pytest.raises(ValueError, match="key_padding_mask"):
        mt.biased_attention(q, k, v, bias, key_padding_mask=mask, backend="cudnn")


def test_opcheck_with_mask_and_tensor_alpha():
    q, k, v, bias, _ = make_inputs(2, 2, 1, 5, 6, 16, seed=47)
    ev = bias.entry_values()
    mask = make_mask("random", 2, 6, seed=2)
    args = (q, k, v, A._bias_tensors(bias), ev, [2, bias.seq_len_q, bias.seq_len_k], True, 0.25, 1.0,
            "reference", mask, torch.tensor(0.6))
    torch.library.opcheck(A._fwd_op, args, test_utils=("test_schema", "test_faketensor",
                                                       "test_autograd_registration"))
    # the op differentiates like the eager path
    out, _ = torch.ops.memtrace.biased_attention_fwd(*args)
    dout = torch.randn(out.shape)
    got = torch.autograd.grad(out, (q, k, v, ev), dout)
    want = oracle(q, k, v, (bias.head, bias.q_idx, bias.k_idx, bias.value), dout, mask, causal=True,
                  alpha=0.6, scale=0.25)
    for g, w in zip(got[:3], want[1:4]):
        assert rel_err(g, w, 0.05) < 1e-5


def test_torch_compile_with_mask():
    q, k, v, bias, _ = make_inputs(2, 2, 2, 6, 7, 16, seed=53)
    mask = make_mask("right", 2, 7)

    def model(q, k, v, bias, mask, alpha):
        return mt.biased_attention(q, k, v, bias, causal=True, alpha=alpha, backend="reference",
                                   key_padding_mask=mask).square().sum()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    alpha = torch.tensor(0.4)
    loss = compiled(q, k, v, bias, mask, alpha)
    got = torch.autograd.grad(loss, (q, k, v, bias.value))
    ref = model(q, k, v, bias, mask, alpha)
    want = torch.autograd.grad(ref, (q, k, v, bias.value))
    torch.testing.assert_close(loss, ref)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("bad,exc,match", [
    (lambda B, T: torch.ones(B, T, dtype=torch.int64), TypeError, "torch.bool"),
    (lambda B, T: torch.ones(B, T), TypeError, "torch.bool"),
    (lambda B, T: [[True] * T] * B, TypeError, "key_padding_mask"),
    (lambda B, T: torch.ones(B, T + 1, dtype=torch.bool), ValueError, "key_padding_mask must have shape"),
    (lambda B, T: torch.ones(B, 1, 1, T, dtype=torch.bool), ValueError, "key_padding_mask must have shape"),
    (lambda B, T: torch.ones(B, T, dtype=torch.bool, device="meta"), ValueError, "key_padding_mask is on"),
])
def test_bad_mask(bad, exc, match):
    q, k, v, bias, _ = make_inputs(2, 2, 2, 5, 6, 16, seed=59)
    with pytest.raises(exc, match=match):
        mt.biased_attention(q, k, v, bias, key_padding_mask=bad(2, 6))
