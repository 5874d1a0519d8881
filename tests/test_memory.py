"""TraceMemory (SPEC 4): parity with the float64 reference over many random steps, properties,
hand-worked cases, bad input (error raised and state unchanged), persistence."""
import math
import os
import random
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import memtrace as mt
from memtrace.reference import steady_state_strength, trace_update, trace_update_dense

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ---- helpers -------------------------------------------------------------------------------------

def fake_capture(edges, *, num_heads, seq_len, bias=None, bias_scores=None, pad=3):
    """A SalienceCapture-like object: padded edge buffer (garbage past num_edges)."""
    h, i, j, S, a = (torch.as_tensor(t) for t in edges)
    n = h.numel()
    garbage_idx = torch.full((pad,), 10 ** 6, dtype=torch.int32, device=h.device)
    garbage_val = torch.full((pad,), float("nan"), device=h.device)
    return SimpleNamespace(
        edges=(torch.cat([h.int(), garbage_idx]), torch.cat([i.int(), -garbage_idx]), torch.cat([j.int(), garbage_idx]),
               torch.cat([S.float(), garbage_val]), torch.cat([a.float(), garbage_val])),
        num_edges=torch.tensor(n, dtype=torch.int32, device=h.device), bias=bias, bias_scores=bias_scores,
        num_heads=num_heads, seq_len_q=seq_len, seq_len_k=seq_len)


def params_of(mem):
    return dict(quota=mem.quota, retention=mem.retention, decay=mem.decay, threshold=mem.threshold,
                prune_eps=mem.prune_eps, attn_eps=mem.attn_eps, window=mem.window)


def assert_state_equal(got, ref, msg=""):
    for key in ("head", "q_idx", "k_idx", "age", "hist"):
        assert torch.equal(got[key], ref[key]), f"{msg} {key}: {got[key].tolist()} != {ref[key].tolist()}"
    torch.testing.assert_close(got["strength"], ref["strength"], rtol=1e-6, atol=0, msg=msg)


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


def candidates_of(S, a, coords):
    coords = sorted(set(coords))
    if not coords:
        z = torch.zeros(0, dtype=torch.long)
        return z, z, z, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    h, i, j = (torch.tensor(c, dtype=torch.long) for c in zip(*coords))
    return h, i, j, S[h, i, j].double(), a[h, i, j].double()


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
    for step in range(10):
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
    for step in range(8):
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
    # one extra query row (10) holds the empty slots, outside every edge the memory can store
    assert b.nnz == 3 * 4 and (b.seq_len_q, b.seq_len_k, b.num_heads) == (11, 10, 3)
    dense = torch.zeros(3, 11, 10)
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
    yield "bias_scores", lambda: mem.update(0, _good_cap(bias=mem.bias(0), bias_scores=(torch.zeros(3), torch.zeros(3))))
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
def test_triton_kernels_interpreted_many_new_candidates():
    """More new candidates than quota in one head, ties included: the radix select path."""
    kw = dict(quota=4, retention=0.5, window=4, max_seq_len=8)
    tri, ref_mem = mt.TraceMemory(2, 2, **kw), mt.TraceMemory(2, 2, **kw)
    tri.backend = "triton"
    rng = random.Random(2)
    for step in range(3):
        caps = {}
        for layer in (0, 1):
            S, a = random_maps(rng, 2, 6, 0.6, (0.3, 0.3, 1.0, 1.0, 2.0))
            caps[layer] = fake_capture(candidates_of(S, a, nonzero_coords(S, a)), num_heads=2, seq_len=6)
        tri.update_many(caps)
        ref_mem.update_many(caps)
        assert torch.equal(tri.meta, ref_mem.meta)
        torch.testing.assert_close(tri.strength, ref_mem.strength, rtol=1e-6, atol=0)


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (the Triton kernels on CPU)")
def test_triton_kernels_interpreted_many_blocks_odd_heads():
    """Several candidate blocks per layer and a head count that is not a power of two: the match
    kernel's per-block head counts and the group kernel's block shares (one atomic per block and
    head) must place every new trace, as the vectorised torch path does."""
    L, H, Q, T, C = 2, 3, 8, 40, 1300          # C over the kernels' 512-edge blocks: 3 blocks a layer
    kw = dict(num_layers=L, num_heads=H, quota=Q, retention=0.6, decay=0.7, threshold=0.05, prune_eps=0.02,
              window=3, max_seq_len=T)
    tri, ref = mt.TraceMemory(**kw), mt.TraceMemory(**kw)
    tri.backend, ref.backend = "triton", "torch"
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
