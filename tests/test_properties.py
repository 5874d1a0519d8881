"""Bounded property tests (hypothesis) against the float64 references (issue 28).

TraceMemory's update on random small configurations (max_seq_len, quota, heads, window, rates),
several steps each: the torch path must equal `memtrace.reference.trace_update` step by step, and
under TRITON_INTERPRET=1 the Triton path must equal the torch path. Quotas above 2^P
(P = bit_length(max_seq_len^2 - 1)) are drawn often: the torch path dropped new traces there.
The whole file stays well under a minute on two cores with TRITON_INTERPRET=1.
"""
import os

import pytest
import torch
from _helpers import assert_state_equal, params_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memtrace as mt
from memtrace.reference import trace_update

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def memories(draw):
    """A TraceMemory config: small max_seq_len, quotas on both sides of 2^P, a few heads."""
    T = draw(st.integers(1, 6))
    pos_space = 1 << max(1, (T * T - 1).bit_length())
    quota = draw(st.one_of(st.integers(1, 2 * pos_space + 3),
                           st.sampled_from([pos_space, pos_space + 1, 2048])))
    return dict(num_layers=draw(st.integers(1, 2)), num_heads=draw(st.integers(1, 3)), quota=quota,
                retention=draw(st.sampled_from([0.0, 0.5, 0.9])),
                decay=draw(st.sampled_from([0.5, 0.9, 1.0])),
                threshold=draw(st.sampled_from([0.0, 0.05, 0.3])),
                prune_eps=draw(st.sampled_from([0.0, 1e-4, 0.05])),
                attn_eps=1e-3, window=draw(st.integers(1, 4)), max_seq_len=T)


@st.composite
def steps(draw, cfg, max_steps):
    """Per step: unique candidate edges (head, i, j, S, a) of one layer, values from small sets
    (ties happen) with zeros and sub-threshold values."""
    H, T = cfg["num_heads"], cfg["max_seq_len"]
    cells = [(h, i, j) for h in range(H) for i in range(T) for j in range(T)]
    out = []
    for _ in range(draw(st.integers(1, max_steps))):
        layer = draw(st.integers(0, cfg["num_layers"] - 1))
        chosen = draw(st.lists(st.sampled_from(cells), unique=True, max_size=len(cells)))
        S = draw(st.lists(st.sampled_from([0.0, 0.01, 0.1, 0.3, 0.3, 1.0, 2.5]), min_size=len(chosen),
                          max_size=len(chosen)))
        a = draw(st.lists(st.sampled_from([0.0, 5e-4, 0.2, 0.7]), min_size=len(chosen), max_size=len(chosen)))
        out.append((layer, chosen, S, a))
    return out


def _edge_tensors(chosen, S, a):
    h, i, j = (torch.tensor([c[n] for c in chosen], dtype=torch.int32).view(1, -1) for n in range(3))
    S, a = (torch.tensor(x, dtype=torch.float32).view(1, -1) for x in (S, a))
    return h, i, j, S, a


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_torch_update_matches_reference_stepwise(data):
    cfg = data.draw(memories(), label="config")
    mem = mt.TraceMemory(**cfg)
    mem.backend = "torch"
    for n, (layer, chosen, S, a) in enumerate(data.draw(steps(cfg, 5), label="steps")):
        before = mem.reference_state(layer)      # re-fed each step: the stored float32 strengths
        h, i, j, s, at = _edge_tensors(chosen, S, a)
        mem.update_edges([layer], h, i, j, s, at)
        cands = (h[0].long(), i[0].long(), j[0].long(), s[0].double(), at[0].double())
        want = trace_update(before, cands, **params_of(mem))
        assert_state_equal(mem.reference_state(layer), want, f"step {n} layer {layer} {cfg}")
        assert all(mem.num_traces(layer) <= mem.quota * mem.num_heads for layer in range(mem.num_layers))


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (the Triton kernels on CPU)")
@settings(max_examples=30, **SETTINGS)
@given(data=st.data())
def test_triton_update_matches_torch_and_reference(data):
    from memtrace.kernels.trace_update import MAX_TRITON_QUOTA

    cfg = data.draw(memories(), label="config")
    if cfg["quota"] > 64:          # the interpreter's cost grows with the quota's block
        cfg["quota"] = 64
    assert cfg["quota"] <= MAX_TRITON_QUOTA
    tri, ref = mt.TraceMemory(**cfg), mt.TraceMemory(**cfg)
    tri.backend, ref.backend = "triton", "torch"
    for n, (layer, chosen, S, a) in enumerate(data.draw(steps(cfg, 3), label="steps")):
        before = tri.reference_state(layer)
        args = _edge_tensors(chosen, S, a)
        tri.update_edges([layer], *args)
        ref.update_edges([layer], *args)
        assert torch.equal(tri.meta, ref.meta), f"step {n} {cfg}"
        torch.testing.assert_close(tri.strength, ref.strength, rtol=1e-6, atol=0)
        h, i, j, s, at = args
        want = trace_update(before, (h[0].long(), i[0].long(), j[0].long(), s[0].double(), at[0].double()),
                            **params_of(tri))
        assert_state_equal(tri.reference_state(layer), want, f"step {n} layer {layer} {cfg}")
