"""TraceMemory (SPEC 4): parity with the float64 reference over many random steps, properties,
hand-worked cases, bad input (error raised and state unchanged), persistence."""
import math
import os
import random

import pytest
import torch
from _helpers import assert_state_equal, candidates_of, fake_capture, params_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memtrace as mt
from memtrace.reference import steady_state_strength, trace_update, trace_update_dense

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ---- helpers -------------------------------------------------------------------------------------

def random_maps(rng, H, T, density, values):
    """Sparse dense maps S, a with values from a small set (so ties happen)."""
    S = torch.zeros(H, T, T)
    a = torch.zeros(H, T, T)
    for h in range(H):
        for i in range(T):
            for j in range(T):
                if rng.random() < density:
                    S[h, i, j] = rng.choice(values) if values else 3 * rng.random()
                    a[h, i, j] = rng.choice([0.0, 5e-4, 0.2, 0.7])
    return S, a


def nonzero_coords(S, a, threshold=None):
    mask = (S > threshold) if threshold is not None else ((S != 0) | (a != 0))
    return [tuple(c) for c in torch.nonzero(mask).tolist()]


def run_random_steps(mem, layer, steps, seed, mode, stepwise, T, density=0.25,
                     values=(0.02, 0.1, 0.3, 0.3, 1.0, 2.5)):
    """Drive `mem` and the reference side by side; mode: edges | direct | foreign."""
    rng = random.Random(seed)
    H = mem.num_heads
    ref = mem.reference_state(layer)
    for step in range(steps):
        S, a = random_maps(rng, H, T, density, values)
        if stepwise:
            ref = mem.reference_state(layer)
        if mode == "edges":
            coords = nonzero_coords(S, a)
            cap = fake_capture(candidates_of(S, a, coords), num_heads=H, seq_len=T)
            ref_coords = coords
        else:
            cap_coords = nonzero_coords(S, a, threshold=0.25)
            if mode == "direct":
                bias = mem.bias(layer)
            else:
                n = rng.randint(0, 12)
                bh = torch.randint(0, H, (n,), generator=torch.Generator().manual_seed(seed + step))
                bq = torch.randint(0, T, (n,), generator=torch.Generator().manual_seed(seed + step + 1))
                bk = torch.randint(0, T, (n,), generator=torch.Generator().manual_seed(seed + step + 2))
                if n > 2:
                    bh[-1], bq[-1], bk[-1] = bh[0], bq[0], bk[0]          # duplicate entries add
                bias = mt.TraceBias.from_coo(bh, bq, bk, torch.rand(n), num_heads=H, seq_len_q=T, seq_len_k=T)
            # as the capture does: entries outside the call's (T, T) (bias(layer)'s empty slots) score 0
            inside = (bias.q_idx < T) & (bias.k_idx < T)
            bq_in, bk_in = bias.q_idx.clamp(max=T - 1), bias.k_idx.clamp(max=T - 1)
            scores = (torch.where(inside, S[bias.head, bq_in, bk_in], 0.0),
                      torch.where(inside, a[bias.head, bq_in, bk_in], 0.0))
            cap = fake_capture(candidates_of(S, a, cap_coords), num_heads=H, seq_len=T, bias=bias, bias_scores=scores)
            if mode == "direct":
                stored = ref if not stepwise else mem.reference_state(layer)
                bias_coords = list(zip(stored["head"].tolist(), stored["q_idx"].tolist(), stored["k_idx"].tolist()))
            else:
                bias_coords = list(zip(bias.head.tolist(), bias.q_idx.tolist(), bias.k_idx.tolist()))
            ref_coords = cap_coords + bias_coords
        mem.update(layer, cap)
        ref = trace_update(ref, candidates_of(S, a, ref_coords), **params_of(mem))
        assert_state_equal(mem.reference_state(layer), ref, f"step {step}")
    return mem


# ---- parity with the reference -------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["edges", "direct", "foreign"])
@pytest.mark.parametrize("stepwise", [True, False])
def test_parity_many_steps_small_quota(mode, stepwise):
    mem = mt.TraceMemory(2, 3, quota=4, retention=0.6, decay=0.7, threshold=0.05, prune_eps=0.02,
                         attn_eps=1e-3, window=3, max_seq_len=9)
    # Strengths are stored in float32 and ranked as stored; the reference keeps float64. Values
    # from a small set make exact ties (decided by (i, j)) but also near-ties closer than one
    # float32 ulp, which only a run re-fed with our state each step (stepwise) compares exactly.
    values = (0.02, 0.1, 0.3, 0.3, 1.0, 2.5) if stepwise else None
    run_random_steps(mem, 1, 40, seed={"edges": 1, "direct": 2, "foreign": 3}[mode] * 10 + stepwise, mode=mode,
                     stepwise=stepwise, T=6, values=values)
    assert mem.num_traces(0) == 0


def test_parity_ties_deliberate():
    """Every candidate has the same S and a: eviction is decided by the (i, j) tie-break alone."""
    mem = mt.TraceMemory(1, 2, quota=3, retention=0.5, window=4, max_seq_len=8)
    H, T = 2, 5
    S = torch.full((H, T, T), 0.4)
    a = torch.full((H, T, T), 0.5)
    coords = [(h, i, j) for h in range(H) for i in range(T) for j in range(T) if (i * 7 + j * 3 + h) % 4 == 0]
    cand = candidates_of(S, a, coords)
    ref = trace_update(mt.reference.empty_state(), cand, **params_of(mem))
    mem.update(0, fake_capture(cand, num_heads=H, seq_len=T))
    assert_state_equal(mem.reference_state(0), ref)
    # the three smallest (i, j) of each head survive
    for h in range(H):
        mine = sorted((i, j) for hh, i, j in coords if hh == h)[:3]
        got = [(i, j) for hh, i, j in zip(*(mem.reference_state(0)[k].tolist() for k in ("head", "q_idx", "k_idx")))
               if hh == h]
        assert got == mine


def test_parity_update_dense():
    mem = mt.TraceMemory(3, 2, quota=5, retention=0.7, decay=0.8, threshold=0.1, prune_eps=0.05, window=5,
                         max_seq_len=16)
    g = torch.Generator().manual_seed(3)
    ref = mt.reference.empty_state()
    for step in range(12):
        S = torch.rand(2, 4, 7, generator=g) * (torch.rand(2, 4, 7, generator=g) < 0.3)
        a = torch.rand(2, 4, 7, generator=g) * (torch.rand(2, 4, 7, generator=g) < 0.5)
        mem.update_dense(2, S, a)
        ref = trace_update_dense(ref, S, a, **params_of(mem))
        assert_state_equal(mem.reference_state(2), ref, f"step {step}")
    assert mem.num_traces() == mem.num_traces(2) > 0


def test_update_many_matches_single_updates():
    kw = dict(quota=3, retention=0.5, decay=0.6, window=3, max_seq_len=8)
    one, many = mt.TraceMemory(3, 2, **kw), mt.TraceMemory(3, 2, **kw)
    rng = random.Random(5)
    for _step in range(10):
        caps = {}
        for layer in (0, 2):
            S, a = random_maps(rng, 2, 5, 0.3, (0.1, 0.5, 1.0))
            coords = nonzero_coords(S, a)
            caps[layer] = fake_capture(candidates_of(S, a, coords), num_heads=2, seq_len=5, pad=layer)
        for layer, cap in caps.items():
            one.update(layer, cap)
        many.update_many(caps)
        assert torch.equal(one.strength, many.strength) and torch.equal(one.meta, many.meta)


def test_update_edges_low_level_matches_capture_path():
    kw = dict(quota=4, window=4, max_seq_len=8)
    a_mem, b_mem = mt.TraceMemory(2, 2, **kw), mt.TraceMemory(2, 2, **kw)
    rng = random.Random(9)
    for _step in range(8):
        S, a = random_maps(rng, 2, 6, 0.3, (0.1, 0.5, 1.0))
        cand = candidates_of(S, a, nonzero_coords(S, a))
        a_mem.update(1, fake_capture(cand, num_heads=2, seq_len=6))
        h, i, j, s, at = cand
        b_mem.update_edges([1], h.view(1, -1), i.view(1, -1), j.view(1, -1), s.float().view(1, -1),
                           at.float().view(1, -1))
        assert torch.equal(a_mem.strength, b_mem.strength) and torch.equal(a_mem.meta, b_mem.meta)


# ---- hand-worked cases ---------------------------------------------------------------------------

def test_hand_worked_three_steps():
    """retention 0.5, decay 0.5, threshold 0.1, prune_eps 0.05, window 2, quota 1, one head."""
    mem = mt.TraceMemory(1, 1, quota=1, retention=0.5, decay=0.5, threshold=0.1, prune_eps=0.05, window=2,
                         max_seq_len=4)
    ln2, ln3 = math.log(2), math.log(3)
    e = lambda i, j, S, a: fake_capture(([0], [i], [j], [S], [a]), num_heads=1, seq_len=4)  # noqa: E731
    # step 1: (1, 2) S=1, a=0.5 -> hist 1, Sh = ln2 > 0.1 -> M = 0.5 ln2, age 0
    mem.update(0, e(1, 2, 1.0, 0.5))
    h, q, k, M, age, r = mem.traces(0)
    assert (q.tolist(), k.tolist(), age.tolist(), r.tolist()) == ([1], [2], [0], [1])
    assert M.item() == pytest.approx(0.5 * ln2, rel=1e-6)
    # step 2: same edge S=2, a=0.5 -> hist 0b11, r 2, Sh = 2 ln3, M = 0.5 (0.5 ln2) + 0.5 (2 ln3)
    mem.update(0, e(1, 2, 2.0, 0.5))
    M2 = 0.25 * ln2 + ln3
    assert mem.traces(0)[3].item() == pytest.approx(M2, rel=1e-6)
    assert mem.traces(0)[5].tolist() == [2]
    # step 3: a new edge (0, 3) with S = 1, a = 1 would insert at 0.5 ln2 = 0.347 < M2 decayed
    # (0.5 M2 = 0.72): quota 1 evicts the new one; the stored trace decays, age 1, hist 0b10
    mem.update(0, e(0, 3, 1.0, 1.0))
    h, q, k, M, age, r = mem.traces(0)
    assert (q.tolist(), k.tolist(), age.tolist(), r.tolist()) == ([1], [2], [1], [1])
    assert M.item() == pytest.approx(0.5 * M2, rel=1e-6)
    # steps without salience: decays by 0.5 until under prune_eps (0.72 -> 0.36 -> 0.18 -> 0.09 -> pruned)
    empty = fake_capture(([], [], [], [], []), num_heads=1, seq_len=4)
    for _ in range(3):
        mem.update(0, empty)
    assert mem.num_traces() == 1 and mem.traces(0)[4].tolist() == [4]
    mem.update(0, empty)
    assert mem.num_traces() == 0


def test_attention_below_eps_gives_no_insert():
    mem = mt.TraceMemory(1, 1, quota=4, threshold=0.0, max_seq_len=4)
    mem.update(0, fake_capture(([0], [0], [1], [5.0], [1e-4]), num_heads=1, seq_len=4))
    assert mem.num_traces() == 0   # r = 0 -> Sh = 0, not above threshold 0


# ---- properties ----------------------------------------------------------------------------------

edge_lists = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 4), st.integers(0, 4),
                                st.sampled_from([0.0, 0.05, 0.3, 1.0, 3.0]), st.sampled_from([0.0, 0.5])),
                      max_size=20, unique_by=lambda e: e[:3])


def _cap_of(edges):
    cols = list(zip(*edges)) if edges else [[], [], [], [], []]
    return fake_capture(tuple(list(c) for c in cols), num_heads=2, seq_len=5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(edge_lists, min_size=1, max_size=6), quota=st.integers(1, 4),
       retention=st.sampled_from([0.0, 0.5, 0.9]), decay=st.sampled_from([0.0, 0.5, 1.0]))
def test_property_quota_and_non_negative(steps, quota, retention, decay):
    mem = mt.TraceMemory(1, 2, quota=quota, retention=retention, decay=decay, window=4, max_seq_len=5)
    for edges in steps:
        mem.update(0, _cap_of(edges))
        h, q, k, M, age, r = mem.traces(0)
        assert all(int((h == hh).sum()) <= quota for hh in range(2))
        assert bool((M >= 0).all())
        assert bool((r <= 4).all())


@settings(max_examples=30, deadline=None)
@given(edges=edge_lists, decay=st.sampled_from([0.3, 0.9, 1.0]))
def test_property_step_without_salience_decays_and_prunes(edges, decay):
    mem = mt.TraceMemory(1, 2, quota=8, decay=decay, prune_eps=0.05, window=3, max_seq_len=5)
    mem.update(0, _cap_of(edges))
    h, q, k, M, age, r = mem.traces(0)
    mem.update(0, _cap_of([]))
    h2, q2, k2, M2, age2, r2 = mem.traces(0)
    expected = (M.double() * decay)
    keep = ~(expected < 0.05)
    assert torch.equal(h2, h[keep]) and torch.equal(q2, q[keep]) and torch.equal(k2, k[keep])
    torch.testing.assert_close(M2.double(), expected[keep], rtol=1e-6, atol=0)
    assert torch.equal(age2, age[keep] + 1)


@settings(max_examples=15, deadline=None)
@given(S=st.floats(0.1, 5.0), window=st.integers(1, 8), retention=st.sampled_from([0.3, 0.6, 0.8]))
def test_property_steady_state(S, window, retention):
    mem = mt.TraceMemory(1, 1, quota=2, retention=retention, window=window, max_seq_len=4)
    cap = fake_capture(([0], [1], [1], [S], [0.5]), num_heads=1, seq_len=4)
    for _ in range(window + int(math.log(1e-9) / math.log(retention)) + 2):
        mem.update(0, cap)
    M = mem.traces(0)[3].item()
    assert M == pytest.approx(steady_state_strength(S, window=window), rel=1e-5)


# ---- read-outs -----------------------------------------------------------------------------------

def test_bias_is_slot_order_and_traces_sorted():
    mem = mt.TraceMemory(2, 3, quota=4, threshold=0.0, max_seq_len=10)
    edges = ([2, 0, 0, 1, 2], [5, 3, 1, 9, 0], [1, 2, 8, 9, 4], [1.0, 2.0, 3.0, 4.0, 5.0], [0.5] * 5)
    mem.update(1, fake_capture(edges, num_heads=3, seq_len=10))
    h, q, k, M, age, r = mem.traces(1)
    assert list(zip(h.tolist(), q.tolist(), k.tolist())) == [(0, 1, 8), (0, 3, 2), (1, 9, 9), (2, 0, 4), (2, 5, 1)]
    assert h.dtype == q.dtype == k.dtype == age.dtype == r.dtype == torch.int64 and M.dtype == torch.float32
    b = mem.bias(1)
    # the bias states the memory's shape [H, T, T]; one extra query row (10) of its index holds the
    # empty slots, outside every edge the memory can store
    assert b.nnz == 3 * 4 and (b.seq_len_q, b.seq_len_k, b.num_heads) == (10, 10, 3) and b.index_rows == 11
    dense = torch.zeros(3, 10, 10)
    dense[h, q, k] = M
    torch.testing.assert_close(b.to_dense(), dense)
    assert b.head.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert b.q_idx.tolist()[:4] == [1, 3, 10, 10] and b.value.tolist()[2:4] == [0.0, 0.0]
    assert mem.num_traces() == 5 and mem.num_traces(0) == 0


def test_nbytes_is_twelve_per_slot_and_layout_limits():
    mem = mt.TraceMemory(3, 4, quota=5)
    assert mem.nbytes == 12 * 3 * 4 * 5
    assert (mem.pos_bits, mem.age_bits, mem.age_max) == (24, 24, 2 ** 24 - 1)
    worst = mt.TraceMemory(1, 1, quota=1, window=32, max_seq_len=65535)
    assert (worst.pos_bits, worst.age_bits) == (32, 0)
    tiny = mt.TraceMemory(1, 1, quota=1, window=1, max_seq_len=1)
    assert tiny.pos_bits + tiny.age_bits + tiny.window == 64


def test_age_saturates_when_few_bits():
    mem = mt.TraceMemory(1, 1, quota=2, decay=1.0, window=30, max_seq_len=32768)  # P = 30 -> A = 4
    assert mem.age_max == 15
    mem.update(0, fake_capture(([0], [32767], [32767], [1.0], [0.5]), num_heads=1, seq_len=32768))
    empty = fake_capture(([], [], [], [], []), num_heads=1, seq_len=32768)
    for _ in range(20):
        mem.update(0, empty)
    h, q, k, M, age, r = mem.traces(0)
    assert (q.item(), k.item(), age.item()) == (32767, 32767, 15)


# ---- persistence ---------------------------------------------------------------------------------

def _filled(**kw):
    mem = mt.TraceMemory(2, 2, quota=3, window=5, max_seq_len=12, **kw)
    run_random_steps(mem, 0, 5, seed=1, mode="edges", stepwise=True, T=6)
    return mem


def test_save_load_round_trip(tmp_path):
    mem = _filled(retention=0.8)
    path = tmp_path / "m.safetensors"
    mem.save(path)
    back = mt.TraceMemory.load(path)
    assert back.config() == mem.config()
    assert torch.equal(back.strength, mem.strength) and torch.equal(back.meta, mem.meta)
    for x, y in zip(back.traces(0), mem.traces(0)):
        assert torch.equal(x, y)


def test_state_dict_round_trip():
    mem = _filled(decay=0.5)
    other = mt.TraceMemory(2, 2, quota=3, window=5, max_seq_len=12)
    other.load_state_dict(mem.state_dict())
    assert other.decay == 0.5
    assert torch.equal(other.strength, mem.strength) and torch.equal(other.meta, mem.meta)


def test_load_truncated_file(tmp_path):
    path = tmp_path / "m.safetensors"
    _filled().save(path)
    data = path.read_bytes()
    for cut in (0, 7, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(ValueError):
            mt.TraceMemory.load(tmp_path / "cut.safetensors")


def test_load_wrong_version_and_shapes(tmp_path):
    from safetensors.torch import save_file
    mem = _filled()
    import json
    cfg = json.dumps(mem.config())
    tensors = {"strength": mem.strength, "meta": mem.meta}
    save_file(tensors, str(tmp_path / "v.safetensors"),
              metadata={"format": "memtrace.TraceMemory", "format_version": "99", "config": cfg})
    with pytest.raises(ValueError, match="format_version"):
        mt.TraceMemory.load(tmp_path / "v.safetensors")
    bad = dict(mem.config(), quota=4)
    save_file(tensors, str(tmp_path / "s.safetensors"),
              metadata={"format": "memtrace.TraceMemory", "format_version": "1", "config": json.dumps(bad)})
    with pytest.raises(ValueError, match="shape"):
        mt.TraceMemory.load(tmp_path / "s.safetensors")
    unsorted = mem.meta.clone()
    unsorted[0, 0, :2] = unsorted[0, 0, :2].flip(0)
    save_file({"strength": mem.strength, "meta": unsorted}, str(tmp_path / "u.safetensors"),
              metadata={"format": "memtrace.TraceMemory", "format_version": "1", "config": cfg})
    with pytest.raises(ValueError):
        mt.TraceMemory.load(tmp_path / "u.safetensors")
    save_file(tensors, str(tmp_path / "f.safetensors"), metadata={"format": "other"})
    with pytest.raises(ValueError, match="not a TraceMemory"):
        mt.TraceMemory.load(tmp_path / "f.safetensors")


# ---- bad input: error raised and state unchanged -------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(quota=0), ValueError, "quota"), (dict(retention=1.5), ValueError, "retention"),
    (dict(decay=-0.1), ValueError, "decay"), (dict(window=0), ValueError, "window"),
    (dict(window=33), ValueError, "window"), (dict(max_seq_len=65536), ValueError, "max_seq_len"),
    (dict(threshold=float("nan")), ValueError, "threshold"), (dict(prune_eps=-1.0), ValueError, "prune_eps"),
    (dict(attn_eps="x"), TypeError, "attn_eps"), (dict(quota=2.5), TypeError, "quota"),
    (dict(num_layers=0), ValueError, "num_layers"), (dict(num_heads="2"), TypeError, "num_heads"),
])
def test_constructor_rejects(kwargs, exc, word):
    args = dict(num_layers=2, num_heads=2)
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        mt.TraceMemory(**args)


def _snapshot(mem):
    return mem.strength.clone(), mem.meta.clone(), mem.config()


def _unchanged(mem, snap):
    return torch.equal(mem.strength, snap[0]) and torch.equal(mem.meta, snap[1]) and mem.config() == snap[2]


def _good_cap(**over):
    cap = fake_capture(([0, 1], [1, 2], [2, 3], [1.0, 2.0], [0.5, 0.5]), num_heads=2, seq_len=12)
    for k, v in over.items():
        setattr(cap, k, v)
    return cap


def _bad_update_calls(mem):
    good = _good_cap()
    e = good.edges
    nan_S = (e[0], e[1], e[2], torch.tensor([float("nan"), 1.0, 0, 0, 0]), e[4])
    yield "layer", lambda: mem.update(2, good)
    yield "layer", lambda: mem.update(-1, good)
    yield "layer", lambda: mem.update(1.0, good)
    yield "capture", lambda: mem.update(0, object())
    yield "heads", lambda: mem.update(0, _good_cap(num_heads=3))
    yield "max_seq_len", lambda: mem.update(0, _good_cap(seq_len_q=13))
    yield "edges", lambda: mem.update(0, _good_cap(edges=e[:4]))
    yield "S", lambda: mem.update(0, _good_cap(edges=nan_S))
    yield "head", lambda: mem.update(0, _good_cap(edges=(e[0] + 5,) + e[1:]))
    yield "q_idx", lambda: mem.update(0, _good_cap(edges=(e[0], e[1] + 12) + e[2:]))
    yield "S", lambda: mem.update(0, _good_cap(edges=e[:3] + (e[3].view(-1, 1), e[4])))
    yield "num_edges", lambda: mem.update(0, _good_cap(num_edges=torch.tensor([1, 2])))
    yield "bias", lambda: mem.update(0, _good_cap(bias=mem.bias(0)))
    yield "bias_scores", lambda: mem.update(0, _good_cap(bias=mem.bias(0),
                                                         bias_scores=(torch.zeros(3), torch.zeros(3))))
    yield "salience", lambda: mem.update_dense(0, torch.rand(2, 3), torch.rand(2, 3))
    yield "heads", lambda: mem.update_dense(0, torch.rand(3, 3, 3), torch.rand(3, 3, 3))
    yield "attn", lambda: mem.update_dense(0, torch.rand(2, 3, 3), torch.rand(2, 3, 4))
    yield "salience", lambda: mem.update_dense(0, torch.full((2, 3, 3), float("inf")), torch.rand(2, 3, 3))
    yield "attn", lambda: mem.update_dense(0, torch.rand(2, 3, 3), torch.full((2, 3, 3), float("nan")))
    yield "salience", lambda: mem.update_dense(0, torch.ones(2, 3, 3, dtype=torch.int64), torch.rand(2, 3, 3))
    yield "max_seq_len", lambda: mem.update_dense(0, torch.rand(2, 13, 3), torch.rand(2, 13, 3))
    yield "layer", lambda: mem.update_dense(5, torch.rand(2, 3, 3), torch.rand(2, 3, 3))
    yield "layers", lambda: mem.update_many({0: good, 7: good})
    yield "heads", lambda: mem.update_many({0: good, 1: _good_cap(num_heads=1)})
    yield "captures", lambda: mem.update_many(good)
    yield "layer", lambda: mem.bias(2)
    yield "layer", lambda: mem.traces("0")
    yield "layer", lambda: mem.num_traces(9)
    yield "head", lambda: mem.update_edges([0], torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                                           torch.zeros(3, dtype=torch.long), torch.zeros(3), torch.zeros(3))
    yield "layers", lambda: mem.update_edges([0, 0], *(torch.zeros(2, 1, dtype=torch.long),) * 3,
                                             torch.zeros(2, 1), torch.zeros(2, 1))
    # update_edges checks a list of plain ints in one pass; anything else goes through check_int
    edge = (torch.zeros(1, 1, dtype=torch.long),) * 3 + (torch.zeros(1, 1), torch.zeros(1, 1))
    yield "layer", lambda: mem.update_edges([mem.num_layers], *edge)
    yield "layer", lambda: mem.update_edges([-1], *edge)
    yield "layer", lambda: mem.update_edges([True], *edge)
    yield "layer", lambda: mem.update_edges([0.0], *edge)


def test_bad_input_raises_and_leaves_state_unchanged():
    mem = _filled()
    snap = _snapshot(mem)
    for word, call in _bad_update_calls(mem):
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        assert word.lower() in str(info.value).lower() or word == "layers", (word, str(info.value))
        assert _unchanged(mem, snap), word


def test_duplicate_candidate_edges_rejected():
    """Two candidates at one (head, i, j) would become two traces at one position (a slab that no
    longer loads back): update and update_edges reject them, before any change."""
    mem = _filled()
    snap = _snapshot(mem)
    dup = fake_capture(([0, 1, 0], [1, 2, 1], [2, 3, 2], [1.0, 2.0, 3.0], [0.5, 0.5, 0.5]), num_heads=2, seq_len=12)
    with pytest.raises(ValueError, match="unique"):
        mem.update(0, dup)
    with pytest.raises(ValueError, match="unique"):
        mem.update_many({1: dup})
    idx = torch.tensor([[0, 0]])
    with pytest.raises(ValueError, match="unique"):
        mem.update_edges([0], idx, idx + 1, idx + 2, torch.ones(1, 2), torch.ones(1, 2))
    assert _unchanged(mem, snap)
    # past num_edges duplicates are padding and ignored; the state still round-trips
    mem.update_edges([0], idx, idx + 1, idx + 2, torch.ones(1, 2), torch.ones(1, 2),
                     num_edges=torch.tensor([1]))
    other = mt.TraceMemory(2, 2, quota=3, window=5, max_seq_len=12)
    other.load_state_dict(mem.state_dict())


def test_update_edges_checks_values_on_cpu():
    """update_edges validates like update on the CPU: indices, counts and scores (SPEC 6)."""
    mem = _filled()
    snap = _snapshot(mem)
    i64 = lambda *v: torch.tensor([v])  # noqa: E731
    ones = torch.ones(1, 1)
    calls = [
        ("head", lambda: mem.update_edges([0], i64(2), i64(0), i64(0), ones, ones)),
        ("q_idx", lambda: mem.update_edges([0], i64(0), i64(12), i64(0), ones, ones)),
        ("k_idx", lambda: mem.update_edges([0], i64(0), i64(0), i64(-1), ones, ones)),
        ("salience", lambda: mem.update_edges([0], i64(0), i64(0), i64(0), ones * float("nan"), ones)),
        ("attn", lambda: mem.update_edges([0], i64(0), i64(0), i64(0), ones, ones * float("inf"))),
        ("num_edges", lambda: mem.update_edges([0], i64(0), i64(0), i64(0), ones, ones, num_edges=i64(2)[0])),
        ("trace_salience", lambda: mem.update_edges([0], i64(0), i64(0), i64(0), ones, ones,
                                                    trace_salience=torch.full((1, 2, 3), float("nan")),
                                                    trace_attn=torch.zeros(1, 2, 3))),
    ]
    for word, call in calls:
        with pytest.raises(ValueError, match=word):
            call()
        assert _unchanged(mem, snap), word
    mem.update_edges([0], i64(0), i64(12), i64(0), ones, ones, validate=False)  # unchecked: ignored


def test_values_that_overflow_float32_rejected():
    """float64 scores beyond float32's range would turn into Inf where the update reads them."""
    mem = _filled()
    snap = _snapshot(mem)
    huge = torch.full((2, 3, 3), 1e300, dtype=torch.float64)
    with pytest.raises(ValueError, match="salience"):
        mem.update_dense(0, huge, torch.rand(2, 3, 3, dtype=torch.float64))
    e = _good_cap().edges
    with pytest.raises(ValueError, match="S"):
        mem.update(0, _good_cap(edges=e[:3] + (e[3].double().index_fill(0, torch.tensor([0]), 1e300), e[4])))
    assert _unchanged(mem, snap)


def test_bad_capture_metadata_and_device_named():
    mem = _filled()
    snap = _snapshot(mem)
    for attr, value in (("seq_len_q", None), ("seq_len_k", "12"), ("num_heads", 2.0)):
        with pytest.raises((TypeError, ValueError), match=attr):
            mem.update(0, _good_cap(**{attr: value}))
    assert _unchanged(mem, snap)
    with pytest.raises(ValueError, match="device"):
        mt.TraceMemory(1, 1, device="gpu")


def test_bad_state_dict_leaves_state_unchanged():
    mem = _filled()
    snap = _snapshot(mem)
    good = mem.state_dict()
    bad_dicts = [
        "not a dict",
        {k: v for k, v in good.items() if k != "meta"},
        dict(good, format_version=2),
        dict(good, strength=good["strength"][:, :, :2]),
        dict(good, meta=good["meta"].int()),
        dict(good, strength=torch.full_like(good["strength"], float("nan"))),
        dict(good, strength=torch.full_like(good["strength"], -2.0)),
        dict(good, config=dict(good["config"], quota=7)),
        dict(good, config=dict(good["config"], retention=2.0)),
        dict(good, meta=torch.full_like(good["meta"], -1)),
    ]
    for sd in bad_dicts:
        with pytest.raises((ValueError, TypeError)):
            mem.load_state_dict(sd)
        assert _unchanged(mem, snap)


def test_save_to_bad_path_and_load_missing_file(tmp_path):
    mem = _filled()
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        mem.save(tmp_path / "no_such_dir" / "m.safetensors")
    # a save over an existing file replaces it whole and leaves no temporary file behind
    mem.save(tmp_path / "m.safetensors")
    mem.save(tmp_path / "m.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert _unchanged(mt.TraceMemory.load(tmp_path / "m.safetensors"), _snapshot(mem))
    with pytest.raises(ValueError):
        mt.TraceMemory.load(tmp_path / "missing.safetensors")


def test_stale_bias_is_merged_not_mapped():
    """A bias taken before the last update no longer matches the slots: scored as a foreign bias."""
    mem = mt.TraceMemory(1, 1, quota=4, threshold=0.0, max_seq_len=8)
    mem.update(0, fake_capture(([0, 0], [1, 2], [1, 2], [1.0, 1.0], [0.5, 0.5]), num_heads=1, seq_len=8))
    old_bias = mem.bias(0)
    mem.update(0, fake_capture(([0], [0], [3], [3.0], [0.5]), num_heads=1, seq_len=8))
    ref = mem.reference_state(0)
    S = torch.zeros(1, 8, 8)
    a = torch.zeros(1, 8, 8)
    S[0, 1, 1], a[0, 1, 1] = 2.0, 0.5
    inside = old_bias.q_idx < 8                    # empty slots sit on row 8, outside the call
    bq = old_bias.q_idx.clamp(max=7)
    scores = (torch.where(inside, S[old_bias.head, bq, old_bias.k_idx], 0.0),
              torch.where(inside, a[old_bias.head, bq, old_bias.k_idx], 0.0))
    mem.update(0, fake_capture(([], [], [], [], []), num_heads=1, seq_len=8, bias=old_bias, bias_scores=scores))
    coords = [c for c in zip(old_bias.head.tolist(), old_bias.q_idx.tolist(), old_bias.k_idx.tolist()) if c[1] < 8]
    ref = trace_update(ref, candidates_of(S, a, coords), **params_of(mem))
    assert_state_equal(mem.reference_state(0), ref)


# ---- the Triton kernels in the interpreter -------------------------------------------------------

@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (the Triton kernels on CPU)")
@pytest.mark.parametrize("mode", ["edges", "direct"])
def test_triton_kernels_interpreted_match_reference(mode):
    mem = mt.TraceMemory(2, 2, quota=3, retention=0.6, decay=0.7, threshold=0.05, prune_eps=0.02, window=3,
                         max_seq_len=9)
    mem.backend = "triton"
    run_random_steps(mem, 1, 6, seed=11, mode=mode, stepwise=False, T=5, density=0.3)


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (the Triton kernels on CPU)")
def test_triton_match_edge_at_origin():
    """The match searches all Q slots reading meta only (meta 0 past slot 0 = empty): edge (0, 0)
    (pos 0, in slot 0 when stored) against empty, partly filled and full slabs, its history
    running out, next to the torch path."""
    kw = dict(num_layers=1, num_heads=3, quota=4, retention=0.5, decay=0.9, threshold=0.05, prune_eps=1e-4,
              window=2, max_seq_len=6)
    tri, ref = mt.TraceMemory(**kw), mt.TraceMemory(**kw)
    tri.backend, ref.backend = "triton", "torch"
    steps = [  # (head, i, j, S, a) per step; head 0 gets (0, 0) then loses its history, head 2 fills up
        [(0, 0, 0, 1.0, 0.9), (2, 0, 1, 1.0, 0.9), (2, 1, 1, 1.0, 0.9)],
        [(1, 0, 0, 0.0, 0.0), (2, 0, 0, 1.0, 0.9), (2, 3, 3, 1.0, 0.9), (2, 5, 5, 1.0, 0.9)],
        [(0, 0, 0, 0.0, 0.0), (1, 0, 0, 1.0, 0.9), (2, 0, 0, 0.5, 0.9), (2, 4, 4, 2.0, 0.9)],
        [(0, 0, 0, 0.0, 0.0), (0, 2, 2, 1.0, 0.9), (2, 0, 1, 0.0, 0.0)],
        [(0, 0, 0, 1.0, 0.9), (0, 0, 1, 1.0, 0.9), (1, 5, 5, 1.0, 0.9), (2, 0, 0, 3.0, 0.9)],
    ]
    for edges in steps:
        cols = list(zip(*edges))
        args = [torch.tensor([c], dtype=torch.int32) for c in cols[:3]] + [torch.tensor([c]) for c in cols[3:]]
        tri.update_edges([0], *args)
        ref.update_edges([0], *args)
        assert torch.equal(tri.meta, ref.meta)
        torch.testing.assert_close(tri.strength, ref.strength, rtol=1e-6, atol=0)


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (the Triton kernels on CPU)")
@pytest.mark.parametrize("merge_max", [64, 2])
def test_triton_kernels_interpreted_many_new_candidates(merge_max, monkeypatch):
    """More new candidates than quota in one head, ties included: the radix select path; new
    traces placed by the merge (up to merge_max kept per slab) or by the full sort (more)."""
    from memtrace.kernels import trace_update as tu
    monkeypatch.setattr(tu, "SELECT_MERGE_MAX", merge_max)
    kw = dict(quota=4, retention=0.5, window=4, max_seq_len=8)
    tri, ref_mem = mt.TraceMemory(2, 2, **kw), mt.TraceMemory(2, 2, **kw)
    tri.backend = "triton"
    rng = random.Random(2)
    for _step in range(3):
        caps = {}
        for layer in (0, 1):
            S, a = random_maps(rng, 2, 6, 0.6, (0.3, 0.3, 1.0, 1.0, 2.0))
            caps[layer] = fake_capture(candidates_of(S, a, nonzero_coords(S, a)), num_heads=2, seq_len=6)
        tri.update_many(caps)
        ref_mem.update_many(caps)
        assert torch.equal(tri.meta, ref_mem.meta)
        torch.testing.assert_close(tri.strength, ref_mem.strength, rtol=1e-6, atol=0)


def _triton_and_torch(L, H, Q, T):
    """Two memories of one shape (rates fixed), on the Triton and the torch update paths."""
    kw = dict(num_layers=L, num_heads=H, quota=Q, retention=0.6, decay=0.7, threshold=0.05, prune_eps=0.02,
              window=3, max_seq_len=T)
    tri, ref = mt.TraceMemory(**kw), mt.TraceMemory(**kw)
    tri.backend, ref.backend = "triton", "torch"
    return tri, ref


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (the Triton kernels on CPU)")
@pytest.mark.parametrize("merge_max", [64, 2])
def test_triton_kernels_interpreted_many_blocks_odd_heads(merge_max, monkeypatch):
    """Several candidate blocks per layer and a head count that is not a power of two: the match
    kernel's per-block head counts and the group kernel's block shares (one atomic per block and
    head) must place every new trace, as the vectorised torch path does; the select places the
    new traces by merging (merge_max 64: every slab here) or by sorting (2: slabs with more)."""
    from memtrace.kernels import trace_update as tu
    monkeypatch.setattr(tu, "SELECT_MERGE_MAX", merge_max)
    L, H, Q, T, C = 2, 3, 8, 40, 1300          # C over the kernels' 512-edge blocks: 3 blocks a layer
    tri, ref = _triton_and_torch(L, H, Q, T)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        cells = torch.stack([torch.randperm(H * T * T, generator=g)[:C] for _ in range(L)])
        head, rest = (cells // (T * T)).int(), cells % (T * T)
        S = torch.tensor([0.01, 0.3, 0.3, 1.0, 2.0])[torch.randint(0, 5, (L, C), generator=g)]
        a = torch.tensor([0.0, 0.3, 0.9])[torch.randint(0, 3, (L, C), generator=g)]
        n = torch.tensor([C, C - 77], dtype=torch.int32)
        args = (head, (rest // T).int(), (rest % T).int(), S, a)
        tri.update_edges([0, 1], *args, num_edges=n)
        ref.update_edges([0, 1], *args, num_edges=n)
        assert torch.equal(tri.meta, ref.meta)
        torch.testing.assert_close(tri.strength, ref.strength, rtol=1e-6, atol=0)
    assert (tri.strength >= 0).sum() == L * H * Q     # every slab full: the select evicted


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (the Triton kernels on CPU)")
def test_triton_kept_workspace_counters_return_to_zero(monkeypatch):
    """On CUDA the update's workspace is kept between calls and no memset clears its per-slab
    counters: the select kernel leaves them at zero. Here the workspace is kept on the CPU too,
    over steps with and without candidates; every step must match the torch path and end with
    zero counters."""
    from memtrace.kernels import trace_update as tu
    kept = {}
    real = tu._workspace

    def keep(device, n_edges, n_slabs, Q):
        key = (n_edges, n_slabs, Q)
        if key not in kept:
            kept[key] = real(device, n_edges, n_slabs, Q)
        return kept[key]
    monkeypatch.setattr(tu, "_workspace", keep)
    L, H, Q, T, C = 2, 3, 4, 12, 60
    tri, ref = _triton_and_torch(L, H, Q, T)
    g = torch.Generator().manual_seed(9)
    for step in range(4):
        c = 0 if step == 2 else C
        cells = torch.stack([torch.randperm(H * T * T, generator=g)[:c] for _ in range(L)])
        head, rest = (cells // (T * T)).int(), cells % (T * T)
        S = torch.tensor([0.01, 0.3, 1.0, 2.0])[torch.randint(0, 4, (L, c), generator=g)]
        a = torch.tensor([0.0, 0.9])[torch.randint(0, 2, (L, c), generator=g)]
        args = (head, (rest // T).int(), (rest % T).int(), S, a)
        tri.update_edges([0, 1], *args)
        ref.update_edges([0, 1], *args)
        assert torch.equal(tri.meta, ref.meta), step
        torch.testing.assert_close(tri.strength, ref.strength, rtol=1e-6, atol=0)
        assert kept and all(int(ws["counts"].abs().sum()) == 0 for ws in kept.values()), step
    assert len(kept) == 2      # steps with C candidates reused one workspace


# ---- with the real SalienceCapture ---------------------------------------------------------------

def test_update_from_real_capture_matches_reference():
    """bias(layer) -> biased_attention(capture=...) -> backward -> update, against the reference
    fed the capture's own scores (threshold edges, and bias scores of the stored traces)."""
    torch.manual_seed(0)
    H, T, D = 2, 12, 16
    mem = mt.TraceMemory(1, H, quota=6, threshold=5e-4, window=4, max_seq_len=16)
    for step in range(4):
        q, k, v = (torch.randn(2, H, T, D, requires_grad=True) for _ in range(3))
        bias = mem.bias(0)
        cap = mt.SalienceCapture(threshold=0.002)
        out = mt.biased_attention(q, k, v, bias, capture=cap)
        out.backward(torch.randn_like(out))
        scores = {}
        for e in zip(*(t.tolist() for t in cap.valid_edges())):
            scores[e[:3]] = e[3:]
        bS, bA = cap.bias_scores
        for h, i, j, s, a, val in zip(bias.head.tolist(), bias.q_idx.tolist(), bias.k_idx.tolist(), bS.tolist(),
                                      bA.tolist(), bias.value.tolist()):
            if val > 0:                       # stored traces (empty slots are value-0 entries)
                scores[(h, i, j)] = (s, a)
        coords = sorted(scores)
        cols = list(zip(*coords)) if coords else [[], [], []]
        cand = (*(torch.tensor(c, dtype=torch.long) for c in cols),
                torch.tensor([scores[c][0] for c in coords], dtype=torch.float64),
                torch.tensor([scores[c][1] for c in coords], dtype=torch.float64))
        ref = trace_update(mem.reference_state(0), cand, **params_of(mem))
        mem.update(0, cap)
        assert_state_equal(mem.reference_state(0), ref, f"step {step}")
    assert mem.num_traces() > 0


def test_unfilled_capture_rejected():
    mem = mt.TraceMemory(1, 2, quota=4)
    with pytest.raises(ValueError, match="backward"):
        mem.update(0, mt.SalienceCapture())


# ---- SPEC 4 rule by rule, hand-computed, on every engine -----------------------------------------
# Each case below states the expected state (h, i, j, M, age, hist) after every step, computed by
# hand in the comments, and runs the same steps through the float64 reference and TraceMemory
# (torch backend with plain edges, with the memory's own bias scoring the stored traces, and
# update_dense; the Triton kernels too under TRITON_INTERPRET=1). Boundaries use float32-exact
# values: a threshold equal to 2^k * ln(1 + r) in float64 is met exactly by S = 2^k.
# Unlike the parity tests, these would catch a misreading of SPEC 4 shared by code and reference.

LN2, LN3, LN4 = math.log1p(1), math.log1p(2), math.log1p(3)
EPS = 2.0 ** -10                       # attn_eps in these cases (float32-exact)
ABOVE_EPS = EPS * (1 + 2.0 ** -23)     # the next float32 above it
HAND_ENGINES = ["reference", "torch", "torch-direct", "torch-dense", "triton", "triton-direct"]


def _f32(x):
    assert float(torch.tensor(x, dtype=torch.float32)) == x, f"{x} is not float32-exact"
    return x


def _load_exact(mem, layer, traces):
    """Put exact (h, i, j, M, age, hist) traces into `mem` through load_state_dict."""
    sd = mem.state_dict()
    strength, meta = sd["strength"], sd["meta"]
    slot = [0] * mem.num_heads
    for h, i, j, M, age, hist in sorted(traces):
        word = ((i * mem.max_seq_len + j) << mem.pos_shift) | (age << mem.window) | hist
        strength[layer, h, slot[h]] = _f32(M)
        meta[layer, h, slot[h]] = word - (1 << 64) if word >= 1 << 63 else word
        slot[h] += 1
    mem.load_state_dict(sd)


def _state_rows(state):
    return [tuple(r) for r in zip(*(state[k].tolist() for k in ("head", "q_idx", "k_idx", "strength", "age", "hist")))]


def run_hand_case(engine, cfg, init, steps, layer=0):
    """The state rows (h, i, j, M, age, hist) after each step. steps: lists of candidates
    (h, i, j, S, a) with float32-exact S, a (a stored trace missing from a step scores 0)."""
    if engine.startswith("triton") and not INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 (the Triton kernels on CPU)")
    mem = mt.TraceMemory(layer + 1, **cfg)
    _load_exact(mem, layer, init)
    mem.backend = engine.split("-")[0] if engine != "reference" else "torch"
    ref = mem.reference_state(layer)
    H, T = mem.num_heads, mem.max_seq_len
    out = []
    for cands in steps:
        for c in cands:
            _f32(c[3]), _f32(c[4])
        cols = list(zip(*cands)) if cands else [[], [], [], [], []]
        edges = (torch.tensor(cols[0], dtype=torch.long), torch.tensor(cols[1], dtype=torch.long),
                 torch.tensor(cols[2], dtype=torch.long), torch.tensor(cols[3], dtype=torch.float64),
                 torch.tensor(cols[4], dtype=torch.float64))
        if engine == "reference":
            ref = trace_update(ref, edges, **params_of(mem))
            out.append(_state_rows(ref))
            continue
        if engine == "torch-dense":
            # maps just large enough for the candidates (stored traces outside them score 0)
            Tq, Tk = (1 + max([c[n] for c in cands], default=0) for n in (1, 2))
            S, a = torch.zeros(H, Tq, Tk), torch.zeros(H, Tq, Tk)
            for h, i, j, s, at in cands:
                S[h, i, j], a[h, i, j] = s, at
            mem.update_dense(layer, S, a)
        elif engine.endswith("-direct"):
            # the capture as biased_attention(bias=mem.bias(layer)) fills it: threshold edges plus
            # the scores of every bias entry (0 for the empty slots, on row max_seq_len)
            bias = mem.bias(layer)
            score = {c[:3]: c[3:] for c in cands}
            bs = [score.get(e, (0.0, 0.0)) for e in zip(bias.head.tolist(), bias.q_idx.tolist(), bias.k_idx.tolist())]
            bias_scores = (torch.tensor([s for s, _ in bs]), torch.tensor([at for _, at in bs]))
            mem.update(layer, fake_capture(edges, num_heads=H, seq_len=T, bias=bias, bias_scores=bias_scores))
        else:
            mem.update(layer, fake_capture(edges, num_heads=H, seq_len=T))
        out.append(_state_rows(mem.reference_state(layer)))
        # traces() reads the same state: recurrence = popcount(hist), strength float32
        h, q, k, _, age, r = mem.traces(layer)
        rows = out[-1]
        assert list(zip(h.tolist(), q.tolist(), k.tolist(), age.tolist())) == [(x[0], x[1], x[2], x[4]) for x in rows]
        assert r.tolist() == [x[5].bit_count() for x in rows]
    return out


def assert_hand(got, expected, engine):
    """Integers exactly; M to 1e-12 relative in the float64 reference, 1e-6 (float32) elsewhere."""
    rel = 1e-12 if engine == "reference" else 1e-6
    for step, (g, e) in enumerate(zip(got, expected)):
        assert [x[:3] + x[4:] for x in g] == [x[:3] + x[4:] for x in e], f"{engine} step {step + 1}: {g} != {e}"
        for x, y in zip(g, e):
            assert x[3] == pytest.approx(y[3], rel=rel, abs=0), \
                f"{engine} step {step + 1} M at {x[:3]}: {x[3]} != {y[3]}"
    assert len(got) == len(expected)


@pytest.mark.parametrize("engine", HAND_ENGINES)
def test_hand_history_attn_eps_and_window_wrap(engine):
    """Rule 1-3: bit set only where a > attn_eps (strictly), hist shifted and masked to window=3,
    r = popcount(hist), Sh = S ln(1 + r). retention = decay = 0.5, threshold 0, prune_eps 0."""
    cfg = dict(num_heads=2, quota=4, retention=0.5, decay=0.5, threshold=0.0, prune_eps=0.0, attn_eps=EPS,
               window=3, max_seq_len=4)
    e, f = (0, 1, 2), (1, 0, 0)
    steps = [
        # 1: e a just above eps -> hist 0b001, r 1, Sh = ln2 > 0: insert M = 0.5 ln2.
        #    f a == eps exactly -> bit 0, r 0, Sh = 1 * ln1 = 0, not > 0: no insert
        [(*e, 1.0, ABOVE_EPS), (*f, 1.0, EPS)],
        # 2: e a == eps -> hist 0b010, r 1 (from the history), Sh = ln2: M = 0.25 ln2 + 0.5 ln2 = 0.75 ln2
        #    f a above eps -> inserted, M = 0.5 ln2, hist 0b001
        [(*e, 1.0, EPS), (*f, 1.0, ABOVE_EPS)],
        # 3: e hist 0b101, r 2, Sh = ln3: M = 0.375 ln2 + 0.5 ln3.  f not a candidate: hist 0b010,
        #    S = 0 -> decay M = 0.25 ln2, age 1
        [(*e, 1.0, 0.5)],
        # 4: e hist 0b1011 & 0b111 = 0b011 (bit 3 drops off), r 2: M = 0.1875 ln2 + 0.25 ln3 + 0.5 ln3
        #    f hist 0b100: M = 0.125 ln2, age 2
        [(*e, 1.0, 0.5)],
        # 5: e hist 0b111, r 3, Sh = ln4: M = 0.09375 ln2 + 0.375 ln3 + 0.5 ln4
        #    f S = 8 but a = 0: hist 0b1000 & 0b111 = 0, r 0, Sh = 0 -> decay M = 0.0625 ln2, age 3
        [(*e, 1.0, 0.5), (*f, 8.0, 0.0)],
        # 6: e a == eps: hist 0b110, r 2: M = 0.046875 ln2 + 0.1875 ln3 + 0.25 ln4 + 0.5 ln3
        #    f a 0.5: hist 0b001, r 1, Sh = ln2 > 0: M = 0.03125 ln2 + 0.5 ln2, age 0
        [(*e, 1.0, EPS), (*f, 1.0, 0.5)],
    ]
    M_e = [0.5 * LN2, 0.75 * LN2, 0.375 * LN2 + 0.5 * LN3, 0.1875 * LN2 + 0.75 * LN3,
           0.09375 * LN2 + 0.375 * LN3 + 0.5 * LN4, 0.046875 * LN2 + 0.6875 * LN3 + 0.25 * LN4]
    expected = [
        [(*e, M_e[0], 0, 0b001)],
        [(*e, M_e[1], 0, 0b010), (*f, 0.5 * LN2, 0, 0b001)],
        [(*e, M_e[2], 0, 0b101), (*f, 0.25 * LN2, 1, 0b010)],
        [(*e, M_e[3], 0, 0b011), (*f, 0.125 * LN2, 2, 0b100)],
        [(*e, M_e[4], 0, 0b111), (*f, 0.0625 * LN2, 3, 0b000)],
        [(*e, M_e[5], 0, 0b110), (*f, 0.53125 * LN2, 0, 0b001)],
    ]
    assert_hand(run_hand_case(engine, cfg, [], steps), expected, engine)


@pytest.mark.parametrize("engine", HAND_ENGINES)
@pytest.mark.parametrize("window", [1, 32])
def test_hand_history_window_edges(engine, window):
    """window 32 (the top bit of a full 32-bit history drops off) and window 1 (r is 0 or 1)."""
    cfg = dict(num_heads=1, quota=4, retention=0.5, decay=0.5, threshold=0.0, prune_eps=0.0, attn_eps=EPS,
               window=window, max_seq_len=4)
    full = (1 << window) - 1
    top = 1 << (window - 1)
    init = [(0, 0, 0, 1.0, 0, full), (0, 0, 1, 1.0, 5, top)]
    steps = [
        # (0,0,0) a 0.5: hist (full << 1 | 1) & full = full, r = W, Sh = ln(1 + W): M = 0.5 + 0.5 ln(1 + W)
        # (0,0,1) a 0: the only bit (the top one) shifts out: hist 0, r 0, Sh 0 -> decay 0.5, age 6
        [(0, 0, 0, 1.0, 0.5), (0, 0, 1, 1.0, 0.0)],
        # (0,0,0) a 0: hist full - 1 (bit 0 clear), r = W - 1: M = 0.5 M + 0.5 ln(W)
        #   (window 1: r 0, Sh 0 -> decay: M = 0.5 M, age 1)
        # (0,0,1) a 0.5: hist 0b1, r 1, Sh = ln2: M = 0.25 + 0.5 ln2, age 0
        [(0, 0, 0, 1.0, 0.0), (0, 0, 1, 1.0, 0.5)],
    ]
    M1 = 0.5 + 0.5 * math.log1p(window)
    M2 = 0.5 * M1 + 0.5 * math.log(window) if window > 1 else 0.5 * M1
    expected = [
        [(0, 0, 0, M1, 0, full), (0, 0, 1, 0.5, 6, 0)],
        [(0, 0, 0, M2, 0 if window > 1 else 1, full - 1), (0, 0, 1, 0.25 + 0.5 * LN2, 0, 1)],
    ]
    assert_hand(run_hand_case(engine, cfg, init, steps), expected, engine)


@pytest.mark.parametrize("engine", HAND_ENGINES)
def test_hand_threshold_is_strict(engine):
    """Rules 3-4 at Sh == threshold exactly (threshold = 0.5 ln2 in float64, met by S = 0.5, r = 1):
    stored traces decay, new edges are not inserted; one float32 ulp of S above, they reinforce /
    insert with M = (1 - retention) Sh."""
    thr = 0.5 * LN2
    up = 0.5 * (1 + 2.0 ** -23)                  # next float32 above 0.5
    cfg = dict(num_heads=1, quota=8, retention=0.5, decay=0.5, threshold=thr, prune_eps=0.0, attn_eps=EPS,
               window=4, max_seq_len=4)
    init = [(0, 0, 1, 1.0, 3, 0b0), (0, 0, 2, 1.0, 3, 0b0), (0, 0, 3, 1.0, 3, 0b1), (0, 2, 0, 1.0, 3, 0b1)]
    steps = [[
        (0, 0, 1, 0.5, 0.5),    # hist 1, r 1, Sh = 0.5 ln2 == thr: decay M = 0.5, age 4
        (0, 0, 2, up, 0.5),     # Sh = up ln2 > thr: M = 0.5 * 1 + 0.5 up ln2, age 0
        (0, 0, 3, 0.5, 0.5),    # hist 0b11, r 2, Sh = 0.5 ln3 > thr: M = 0.5 + 0.25 ln3, age 0
        (0, 2, 0, 0.5, 0.0),    # hist 0b10, r 1 (new r, after the shift), Sh == thr: decay 0.5, age 4
        (0, 1, 0, 0.5, 0.5),    # new, Sh == thr: not inserted
        (0, 1, 1, up, 0.5),     # new, Sh = up ln2 > thr: M = 0.5 up ln2, age 0, hist 1
        (0, 1, 2, 1.0, EPS),    # new, a == eps: r 0, Sh 0: not inserted
    ]]
    expected = [[(0, 0, 1, 0.5, 4, 0b1), (0, 0, 2, 0.5 + 0.5 * up * LN2, 0, 0b1), (0, 0, 3, 0.5 + 0.25 * LN3, 0, 0b11),
                 (0, 1, 1, 0.5 * up * LN2, 0, 0b1), (0, 2, 0, 0.5, 4, 0b10)]]
    assert_hand(run_hand_case(engine, cfg, init, steps), expected, engine)


@pytest.mark.parametrize("engine", HAND_ENGINES)
def test_hand_prune_is_strict(engine):
    """Rule 5: M == prune_eps survives, M < prune_eps goes (stored traces after decay, and new
    edges whose initial strength (1 - retention) Sh falls under prune_eps)."""
    cfg = dict(num_heads=1, quota=4, retention=0.5, decay=0.5, threshold=0.0, prune_eps=0.25, attn_eps=EPS,
               window=2, max_seq_len=4)
    init = [(0, 0, 0, 0.5, 0, 0), (0, 0, 1, 0.25, 0, 0), (0, 1, 1, 0.125, 0, 0)]
    # 1: 0.5 -> 0.25 == prune_eps: kept, age 1; 0.25 -> 0.125 and 0.125 -> 0.0625: pruned
    # 2: 0.25 -> 0.125: pruned, the memory is empty
    expected = [[(0, 0, 0, 0.25, 1, 0)], []]
    assert_hand(run_hand_case(engine, cfg, init, [[], []]), expected, engine)
    # new edges: prune_eps = 0.25 ln2 = (1 - 0.5) * 0.5 * ln2, S = 0.5 meets it exactly (kept);
    # S = 0.5 (1 - 2^-24) (the float32 below) gives M one rounding under it (pruned at once)
    cfg.update(prune_eps=0.25 * LN2)
    below = 0.5 * (1 - 2.0 ** -24)
    steps = [[(0, 0, 0, 0.5, 0.5), (0, 0, 1, below, 0.5)], []]
    # 2: 0.5 * M < prune_eps: pruned
    expected = [[(0, 0, 0, 0.25 * LN2, 0, 1)], []]
    assert_hand(run_hand_case(engine, cfg, [], steps), expected, engine)


@pytest.mark.parametrize("engine", HAND_ENGINES)
def test_hand_eviction_weakest_first_ties_and_heads(engine):
    """Rule 6 per head: quota 2 a head; the weakest goes first, on equal M the larger (i, j)
    (lexicographic: (3, 0) > (2, 2)); a head's count never affects the other head."""
    cfg = dict(num_heads=2, quota=2, retention=0.5, decay=0.5, threshold=0.0, prune_eps=0.0, attn_eps=EPS,
               window=2, max_seq_len=4)
    init = [(0, 2, 2, 1.0, 0, 0), (0, 3, 0, 1.0, 0, 0)]
    steps = [
        # head 0: stored (2,2), (3,0) decay to 0.5 each (age 1); new (3,3) S 2 -> M = 0.5 * 2 ln2 = ln2,
        #   new (0,1) S 1 -> 0.5 ln2 = 0.347. Ranked: ln2 (3,3); 0.5 (2,2) = 0.5 (3,0), tie: (3,0) is
        #   larger and goes first; 0.347 (0,1) goes. Kept: (2,2) 0.5, (3,3) ln2.
        # head 1: three new edges at 0.5 ln2 each: the largest (i, j), (1,2), goes.
        [(0, 3, 3, 2.0, 0.5), (0, 0, 1, 1.0, 0.5), (1, 0, 3, 1.0, 0.5), (1, 1, 0, 1.0, 0.5), (1, 1, 2, 1.0, 0.5)],
        # head 0: (2,2) -> 0.25 age 2, (3,3) -> 0.5 ln2 = 0.347 age 1 hist 0b10; new (0,0) S 0.25 ->
        #   0.125 ln2 = 0.087, the weakest: evicted although new.
        # head 1: (0,3), (1,0) decay to 0.25 ln2 (hist 0b10, S 0 -> Sh 0), age 1; (1,2) comes back new
        #   (its history started over when evicted: hist 0b1) with S 4 -> M = 2 ln2: the tie between
        #   the stored ones evicts (1,0).
        [(0, 0, 0, 0.25, 0.5), (1, 1, 2, 4.0, 0.5)],
    ]
    expected = [
        [(0, 2, 2, 0.5, 1, 0), (0, 3, 3, LN2, 0, 1), (1, 0, 3, 0.5 * LN2, 0, 1), (1, 1, 0, 0.5 * LN2, 0, 1)],
        [(0, 2, 2, 0.25, 2, 0), (0, 3, 3, 0.5 * LN2, 1, 0b10), (1, 0, 3, 0.25 * LN2, 1, 0b10),
         (1, 1, 2, 2 * LN2, 0, 1)],
    ]
    assert_hand(run_hand_case(engine, cfg, init, steps), expected, engine)


@pytest.mark.parametrize("engine", HAND_ENGINES)
def test_hand_age_reset_increment_and_saturation(engine):
    """age + 1 on decay, 0 on reinforcement and insertion; stored in 4 bits here (max_seq_len
    32768 -> 30 position bits, window 30), so it saturates at 15 where SPEC's count (and the
    float64 reference, which stores ints) goes on to 16: a documented storage limit."""
    cfg = dict(num_heads=1, quota=2, retention=0.5, decay=1.0, threshold=0.0, prune_eps=0.0, attn_eps=EPS,
               window=30, max_seq_len=32768)
    init = [(0, 0, 1, 1.0, 14, 0)]
    steps = [[], [], [(0, 0, 1, 1.0, 0.5), (0, 5, 5, 1.0, 0.5)], []]
    # 1: decay 1.0 keeps M = 1, age 15; 2: age 16 (stored: 15, saturated); 3: hist 1, r 1,
    # Sh = ln2: M = 0.5 + 0.5 ln2, age 0; new (5,5): M = 0.5 ln2, age 0; 4: both age 1, hist 0b10
    M3 = 0.5 + 0.5 * LN2
    sat = 16 if engine == "reference" else 15
    expected = [[(0, 0, 1, 1.0, 15, 0)], [(0, 0, 1, 1.0, sat, 0)],
                [(0, 0, 1, M3, 0, 1), (0, 5, 5, 0.5 * LN2, 0, 1)],
                [(0, 0, 1, M3, 1, 0b10), (0, 5, 5, 0.5 * LN2, 1, 0b10)]]
    assert_hand(run_hand_case(engine, cfg, init, steps), expected, engine)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_hand_traces_order_and_bias_values(backend):
    """traces(layer): (head, q, k, strength float32, age, recurrence) sorted by (head, q, k) whatever
    the candidates' order; bias(layer) holds M at (h, i, j) and attention adds alpha * M."""
    if backend == "triton" and not INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 (the Triton kernels on CPU)")
    mem = mt.TraceMemory(2, 2, quota=3, retention=0.5, decay=0.5, threshold=0.0, prune_eps=0.0, attn_eps=EPS,
                         window=4, max_seq_len=4)
    _load_exact(mem, 1, [(0, 2, 1, 4.0, 7, 0b0101), (1, 0, 0, 2.0, 0, 0b1111)])
    mem.backend = backend
    # candidates in no particular order; (0,2,1) gets a = 0 (hist 0b1010, r 2) and S = 0 -> decay 2.0,
    # age 8; (1,0,0) is not a candidate: hist 0b1110, r 3, decay 1.0, age 1; new ones (S 2, a 0.5)
    # at M = 0.5 * 2 ln2 = ln2, age 0, r 1
    cands = [(1, 3, 0, 2.0, 0.5), (0, 2, 1, 0.0, 0.0), (0, 0, 3, 2.0, 0.5), (1, 0, 2, 2.0, 0.5)]
    mem.update(1, _cap_of_any(cands, num_heads=2, seq_len=4))
    h, q, k, M, age, r = mem.traces(1)
    assert list(zip(h.tolist(), q.tolist(), k.tolist())) == [(0, 0, 3), (0, 2, 1), (1, 0, 0), (1, 0, 2), (1, 3, 0)]
    assert M.dtype == torch.float32 and h.dtype == q.dtype == k.dtype == age.dtype == r.dtype == torch.int64
    ln2_32 = float(torch.tensor(LN2, dtype=torch.float32))
    assert M.tolist() == [ln2_32, 2.0, 1.0, ln2_32, ln2_32]
    assert age.tolist() == [0, 8, 1, 0, 0] and r.tolist() == [1, 2, 3, 1, 1]
    assert mem.num_traces(1) == 5 and mem.num_traces(0) == 0 and mem.nbytes == 12 * 2 * 2 * 3
    dense = mem.bias(1).to_dense()[:, :4, :]                  # row 4 holds the empty slots (value 0)
    want = torch.zeros(2, 4, 4)
    want[h, q, k] = M
    assert torch.equal(dense, want) and bool((mem.bias(1).to_dense()[:, 4:] == 0).all())
    # attention logits are scale * q k^T + alpha * M
    g = torch.Generator().manual_seed(0)
    qq, kk, vv = (torch.randn(1, 2, 4, 16, generator=g, dtype=torch.float64) for _ in range(3))
    alpha = 0.25
    out = mt.biased_attention(qq, kk, vv, mem.bias(1), alpha=alpha, backend="reference")
    logits = qq @ kk.transpose(-1, -2) / 4.0 + alpha * want.double()
    torch.testing.assert_close(out, torch.softmax(logits, -1) @ vv, rtol=1e-12, atol=1e-12)


def _cap_of_any(cands, *, num_heads, seq_len):
    cols = list(zip(*cands))
    return fake_capture(tuple(list(c) for c in cols), num_heads=num_heads, seq_len=seq_len)


@pytest.mark.xfail(strict=True, reason="update_dense reads float64 maps in float32 (documented): at a boundary "
                                       "the rounding flips a > attn_eps / Sh > threshold against SPEC 4 and the "
                                       "float64 reference; needs float64 candidates in the update (kernels too)")
def test_hand_update_dense_float64_boundaries():
    """SPEC 4 on the caller's float64 values: a == attn_eps (1e-3, not float32-exact) sets no bit,
    so Sh = S ln1 = 0 is not > threshold 0: nothing is inserted (the reference agrees). Read in
    float32, a becomes 1.00000005e-3 > 1e-3 and the edge is inserted."""
    mem = mt.TraceMemory(1, 1, quota=4, threshold=0.0, attn_eps=1e-3, max_seq_len=4)
    S = torch.ones(1, 1, 1, dtype=torch.float64)
    a = torch.full((1, 1, 1), 1e-3, dtype=torch.float64)
    ref = trace_update_dense(mt.reference.empty_state(), S, a, **params_of(mem))
    assert ref["head"].numel() == 0
    mem.update_dense(0, S, a)
    assert mem.num_traces(0) == 0



# ---- issue 28 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("quota,max_seq_len", [(2048, 32), (2048, 2), (40, 3), (5, 1)])
def test_torch_update_quota_over_position_space_keeps_new_traces(quota, max_seq_len):
    """Issue 28.1: with quota > 2^P (P = bit_length(max_seq_len^2 - 1); the default quota 2048
    with max_seq_len <= 32) the torch path's empty-slot keys ran past their slab's key span: the
    keys were no longer sorted, the search missed stored traces and new traces were dropped."""
    T = max_seq_len
    mem = mt.TraceMemory(1, 2, quota=quota, max_seq_len=T)
    mem.backend = "torch"
    S = torch.zeros(2, T, T)
    S[1, T - 1, 0] = 1.0
    mem.update_dense(0, S, torch.ones(2, T, T))
    assert mem.num_traces() == 1
    ref = trace_update_dense(mt.reference.empty_state(), S, torch.ones(2, T, T), **params_of(mem))
    assert_state_equal(mem.reference_state(0), ref)
    # a second step: the stored trace is found (reinforced, not duplicated) and a new one joins it
    S2 = S.clone()
    S2[0, 0, T - 1] = 2.0
    mem.update_dense(0, S2, torch.ones(2, T, T))
    ref = trace_update_dense(ref, S2, torch.ones(2, T, T), **params_of(mem))
    assert_state_equal(mem.reference_state(0), ref)
    assert mem.num_traces() == 2


def test_save_removes_stale_temporaries_of_dead_writers_only(tmp_path):
    """Issue 28: a SIGKILL during save left `<path>.tmp-<pid>` beside the (intact) target. The next
    save removes such files whose writer process is gone, and leaves those of a live process (a
    save in progress there) alone."""
    import subprocess
    import sys

    # a real save killed with SIGKILL while its temporary exists
    target = tmp_path / "m.safetensors"
    mt.TraceMemory(1, 1, quota=4, max_seq_len=4).save(target)
    code = ("import os, signal, sys, memtrace._files as F\n"
            "real = F.os.replace\n"
            "def killed(src, dst):\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "F.os.replace = killed\n"
            "import memtrace as mt\n"
            "mt.TraceMemory(1, 1, quota=4, max_seq_len=4).save(sys.argv[1])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    stale = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert len(stale) == 1, stale
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f"m.safetensors.tmp-{live.pid}").write_bytes(b"in progress")
        (tmp_path / "m.safetensors.tmp-notapid").write_bytes(b"x")
        (tmp_path / "other.safetensors.tmp-1").write_bytes(b"x")
        mem = mt.TraceMemory(1, 1, quota=4, max_seq_len=4)
        mem.save(target)
        left = sorted(p.name for p in tmp_path.iterdir())
        assert stale[0] not in left
        assert f"m.safetensors.tmp-{live.pid}" in left and "m.safetensors.tmp-notapid" in left
        assert "other.safetensors.tmp-1" in left
        mt.TraceMemory.load(target)
    finally:
        live.kill()
        live.wait()


def test_path_none_and_format_version_named():
    """Issue 28: save(None) / load(None) raised os.fspath's TypeError without naming `path`;
    load_state_dict with format_version=tensor([1, 1]) raised without naming the key."""
    mem = mt.TraceMemory(1, 1, quota=4, max_seq_len=4)
    for call in (lambda: mem.save(None), lambda: mt.TraceMemory.load(None), lambda: mem.save(3.5)):
        with pytest.raises(TypeError, match="path"):
            call()
    sd = mem.state_dict()
    for bad in (torch.tensor([1, 1]), torch.tensor(1.0), torch.zeros(0, dtype=torch.long)):
        with pytest.raises(ValueError, match="format_version"):
            mem.load_state_dict(dict(sd, format_version=bad))
    mem.load_state_dict(dict(sd, format_version=torch.tensor(1)))


def test_meta_tensors_are_a_clear_type_error():
    """Issue 28: meta tensors (shape only) reached a RuntimeError / NotImplementedError inside the
    ops; every public entry point that reads tensors says TypeError, naming the argument."""
    meta = torch.device("meta")
    mem = mt.TraceMemory(1, 2, quota=4, max_seq_len=8)
    i = lambda *s: torch.zeros(*s, dtype=torch.int32, device=meta)  # noqa: E731
    f = lambda *s: torch.zeros(*s, device=meta)  # noqa: E731
    z = torch.zeros(3, dtype=torch.long, device=meta)
    q = f(1, 1, 4, 16)
    calls = [
        ("head", lambda: mem.update_edges([0], i(1, 3), i(1, 3), i(1, 3), f(1, 3), f(1, 3))),
        ("salience", lambda: mem.update_dense(0, f(2, 4, 4), f(2, 4, 4))),
        ("capture.edges head", lambda: mem.update(0, fake_capture((i(3), i(3), i(3), f(3), f(3)), num_heads=2,
                                                                  seq_len=4, pad=0))),
        ("strength", lambda: mem.load_state_dict(dict(mem.state_dict(), strength=mem.strength.to(meta)))),
        ("head", lambda: mt.TraceBias.from_coo(z, z, z, f(3), num_heads=1, seq_len_q=4, seq_len_k=4)),
        ("q", lambda: mt.biased_attention(q, q, q, None, backend="reference")),
        ("q", lambda: mt.biased_attention(q.requires_grad_(), q, q, None, capture=mt.SalienceCapture())),
    ]
    for word, call in calls:
        with pytest.raises(TypeError, match=f"{word} is a meta tensor"):
            call()
    for call in (lambda: mt.TraceMemory(1, 1, device="meta"), lambda: mem.to("meta")):
        with pytest.raises(ValueError, match="meta"):
            call()
    assert mem.device.type == "cpu"
