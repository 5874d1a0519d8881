"""The flash_attn backend's glue on the CPU, against a stand-in for the flash-attn package.

The package is on neither of our machines, so `backend="flash_attn"` never ran. The stand-in
implements the two private functions the backend calls, `flash_attn_interface._flash_attn_forward`
and `_flash_attn_backward`, with flash-attn 2.x's documented behaviour: [B, T, H, D] layout, GQA,
bottom-right causal, the forward returning (out, softmax_lse [B, H, Tq]) in 2.7's 4-tuple or
2.4-2.6's 8-tuple, the backward recomputing P from the LSE it is given (the biased LSE' here) and
writing dq, dk, dv in place. What this checks is ours: the layout transposes, the keyword
arguments per version, the LSE extraction, and the sparse correction around the dense calls
(run in the Triton interpreter), against the float64 oracle.
"""
import inspect
import os
import sys
import types

import pytest
import torch
from _helpers import TOL, CorrectedReferenceBackend, make_inputs, oracle_attention, rel_err, run_and_grad

from memtrace import attention as A
from memtrace.backends import registry
from memtrace.backends.flash_attn import FlashAttnBackend

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = pytest.mark.skipif(not INTERPRET, reason="the correction kernels need TRITON_INTERPRET=1 on the CPU")


def _bhtd(t):
    return t.transpose(1, 2)


def _forward(q, k, v, scale, causal):
    """flash-attn's forward on [B, T, H, D]: the reference backend's dense attention."""
    out, lse = A.get_backend("reference").forward(_bhtd(q), _bhtd(k), _bhtd(v), None, None, causal=causal,
                                                  scale=scale, alpha=1.0)
    return _bhtd(out).to(q.dtype), lse.float()


def _backward(dout, q, k, v, out, lse, dq, dk, dv, scale, causal):
    """flash-attn's backward: P recomputed from the LSE it is given, results written in place
    (the dense backward of _helpers' corrected CPU stand-in)."""
    grads = CorrectedReferenceBackend().dense_backward(_bhtd(q), _bhtd(k), _bhtd(v), _bhtd(out), lse,
                                                        _bhtd(dout), causal=causal, scale=scale)
    for dst, src in zip((dq, dk, dv), grads):
        dst.copy_(_bhtd(src))


def _interface(version):
    """A flash_attn_interface module with 2.7's (window_size_left/right, 4-tuple) or 2.4-2.6's
    (window_size, 8-tuple) private signatures; `calls` records the keyword arguments received."""
    calls = []
    if version == "2.7":
        def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left=-1,
                                window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False):
            calls.append(("fwd", window_size_left, window_size_right, softcap, alibi_slopes, return_softmax))
            out, lse = _forward(q, k, v, softmax_scale, causal)
            return out, lse, None, None

        def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                                 window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
                                 deterministic=False, rng_state=None):
            calls.append(("bwd", window_size_left, window_size_right, softcap, alibi_slopes, deterministic))
            _backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)
            return dq, dk, dv, None
    else:
        def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size=(-1, -1), softcap=0.0,
                                alibi_slopes=None, return_softmax=False):
            calls.append(("fwd", window_size, softcap, alibi_slopes, return_softmax))
            out, lse = _forward(q, k, v, softmax_scale, causal)
            return out, q, k, v, out, lse, None, None

        def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                                 window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                 rng_state=None):
            calls.append(("bwd", window_size, softcap, alibi_slopes, deterministic))
            _backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, softmax_scale, causal)
            return dq, dk, dv, None
    module = types.ModuleType("flash_attn.flash_attn_interface")
    module._flash_attn_forward = _flash_attn_forward
    module._flash_attn_backward = _flash_attn_backward
    return module, calls


class _FlashAttnOnCpu(FlashAttnBackend):
    """The real backend class with the CUDA requirement lifted (the stand-in runs on the CPU)."""

    name = "flash_attn_cpu"
    dtypes = (torch.float16, torch.float32)

    def not_supported_reasons(self, call):
        err = self._load()[1]
        return [err] if err else self.correction_reasons(call)


@pytest.fixture
def stand_in(monkeypatch, request):
    module, calls = _interface(request.param)
    package = types.ModuleType("flash_attn")
    package.flash_attn_interface = module
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", module)
    monkeypatch.setattr(FlashAttnBackend, "_api", None)          # re-read the (stand-in) package
    monkeypatch.setattr(_FlashAttnOnCpu, "_api", None)
    registry.register_backend(_FlashAttnOnCpu())
    registry.reset()
    yield calls
    registry.unregister_backend("flash_attn_cpu")
    registry.reset()


@pytest.mark.parametrize("stand_in", ["2.7", "2.4"], indirect=True)
@pytest.mark.parametrize("shape,causal", [((2, 4, 2, 7, 11, 16), True), ((1, 2, 2, 9, 9, 32), False),
                                          ((1, 2, 1, 12, 6, 16), True)],
                         ids=["gqa-causal-Tq<Tk", "mha", "mqa-causal-Tq>Tk"])
def test_flash_attn_backend_matches_the_oracle(stand_in, shape, causal):
    q, k, v, bias, coo = make_inputs(*shape, dtype=torch.float16, seed=sum(shape))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(q.dtype)
    got = run_and_grad(q, k, v, bias, dout, causal=causal, backend="flash_attn_cpu")
    want = oracle_attention(q, k, v, coo, dout, causal=causal)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dvalue"), got, want):
        assert rel_err(a, b, 1e-3 if name != "out" else 0.0) < TOL[torch.float16], name
    kinds = [c[0] for c in stand_in]
    assert kinds == ["fwd", "bwd"]
    # no sliding window, no softcap, no ALiBi, no returned probabilities, in either version's words
    if len(stand_in[0]) == 6:
        assert stand_in[0][1:] == (-1, -1, 0.0, None, False) and stand_in[1][1:5] == (-1, -1, 0.0, None)
    else:
        assert stand_in[0][1:] == ((-1, -1), 0.0, None, False) and stand_in[1][1:4] == ((-1, -1), 0.0, None)


@pytest.mark.parametrize("stand_in", ["2.7"], indirect=True)
def test_unknown_signature_is_declined(stand_in, monkeypatch):
    module = sys.modules["flash_attn.flash_attn_interface"]
    monkeypatch.setattr(module, "_flash_attn_forward", lambda q, k, v, p, scale: None)
    monkeypatch.setattr(FlashAttnBackend, "_api", None)
    assert "signature" in FlashAttnBackend._load()[1]
    assert "softmax_scale" not in inspect.signature(module._flash_attn_forward).parameters
