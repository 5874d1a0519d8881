"""The whole trace loop, capture -> update -> bias -> attention, against the same loop run on the
float64 reference (issue 4, item 4)."""
import pytest
import torch

import memtrace as mt
from memtrace import reference as R

PARAMS = dict(quota=6, retention=0.7, decay=0.8, threshold=0.002, prune_eps=1e-3, attn_eps=1e-3, window=4)


def _reference_step(state, q, k, v, dout, *, causal, alpha, capture_threshold, num_heads, T):
    bias = R.dense_bias(state["head"], state["q_idx"], state["k_idx"], state["strength"], num_heads, T, T)
    out = R.attention(q, k, v, bias, causal=causal, alpha=alpha)
    S, a = R.salience(q, k, v, dout, bias, causal=causal, alpha=alpha)
    # Candidates: every edge over the capture threshold, and every stored trace (its bias score).
    listed = S > capture_threshold
    listed[state["head"], state["q_idx"], state["k_idx"]] = True
    h, i, j = torch.nonzero(listed, as_tuple=True)
    return out, R.trace_update(state, (h, i, j, S[h, i, j], a[h, i, j]), **PARAMS)


@pytest.mark.parametrize("causal", [False, True])
def test_capture_update_bias_loop_matches_reference(causal):
    B, Hq, Hkv, T, D = 2, 2, 1, 9, 16
    alpha, capture_threshold = 0.5, 1e-3
    memory = mt.TraceMemory(num_layers=2, num_heads=Hq, max_seq_len=T, **PARAMS)
    state = R.empty_state()
    g = torch.Generator().manual_seed(100 + causal)
    for step in range(4):
        q, k, v, dout = (torch.randn(B, h, T, D, generator=g) for h in (Hq, Hkv, Hkv, Hq))
        q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
        capture = mt.SalienceCapture(threshold=capture_threshold, capacity=Hq * T * T)
        out = mt.biased_attention(q, k, v, memory.bias(1), causal=causal, alpha=alpha, capture=capture)
        out.backward(dout)
        memory.update(1, capture)

        ref_out, state = _reference_step(state, *(t.detach().double() for t in (q, k, v, dout)), causal=causal,
                                         alpha=alpha, capture_threshold=capture_threshold, num_heads=Hq, T=T)
        torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)
        head, q_idx, k_idx, strength, age, recurrence = memory.traces(1)
        assert head.tolist() == state["head"].tolist(), f"step {step}"
        assert q_idx.tolist() == state["q_idx"].tolist() and k_idx.tolist() == state["k_idx"].tolist()
        torch.testing.assert_close(strength.double(), state["strength"], rtol=1e-4, atol=1e-6)
        assert age.tolist() == state["age"].tolist()
        popcount = [bin(x).count("1") for x in state["hist"].tolist()]
        assert recurrence.tolist() == popcount
    assert memory.num_traces(0) == 0 and memory.num_traces(1) == state["head"].numel() > 0
