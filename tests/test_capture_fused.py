"""The fused salience capture (issue 4): the Triton backward's dQ kernel bounds the salience per
(head, query row, key segment), and the fill rescores only the segments that pass. Checked in the
interpreter against the float64 oracle, against the unfused fill, and the bound itself.
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _helpers import DEV, check_capture, entry_mask, make_bias, make_tensors, oracle_salience, quantile_threshold

import memtrace as mt
from memtrace import attention as attn_mod
from memtrace import reference as R
from memtrace.backends.base import may_cancel
from memtrace.capture import SalienceCapture

K = pytest.importorskip("memtrace.kernels.attention")
bound_format = pytest.importorskip("memtrace.kernels.salience.bound")
KC = pytest.importorskip("memtrace.kernels.attention.config")


def capture_through_attention(q, k, v, do, bias, causal, threshold, *, capacity=1 << 17, alpha=1.0,
                              scale=None, backend="triton"):
    cap = SalienceCapture(threshold=threshold, capacity=capacity)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out = mt.biased_attention(qq, kk, vv, bias, causal=causal, alpha=alpha, scale=scale, capture=cap,
                              backend=backend)
    out.backward(do)
    return cap, (qq.grad, kk.grad, vv.grad)


CASES = [
    # B, Hq, Hkv, Tq, Tk, D, dtype, causal, bias entries, quantile of S for the threshold
    (2, 2, 2, 37, 53, 16, torch.float32, False, 0, 0.9),
    (1, 4, 2, 40, 40, 32, torch.float16, True, 40, 0.95),     # GQA, causal, square
    (3, 2, 1, 50, 29, 16, torch.float16, True, 60, 0.8),      # causal with Tq > Tk: masked rows
    (2, 3, 1, 21, 70, 16, torch.float32, True, 60, 0.97),     # causal with Tq < Tk
    (4, 2, 2, 64, 64, 16, torch.float32, False, 80, 0.99),    # sparse: most segments pruned
    (6, 2, 1, 33, 47, 16, torch.float32, True, 20, 0.95),     # B6: 16-bit fields of the bound
]


@pytest.mark.parametrize("B,Hq,Hkv,Tq,Tk,D,dtype,causal,n_bias,quant", CASES)
def test_fused_parity(memtrace_env, monkeypatch, B, Hq, Hkv, Tq, Tk, D, dtype, causal, n_bias, quant):
    memtrace_env.set("MEMTRACE_CAPTURE_FUSED", "1")
    q, k, v, do = make_tensors(B, Hq, Hkv, Tq, Tk, D, dtype, seed=Tq * 11 + Tk + B)
    bias = make_bias(Hq, Tq + 3, Tk + 7, n_bias, seed=Tk)[0] if n_bias else None
    S, a = oracle_salience(q, k, v, do, bias, causal)[2:]
    threshold = quantile_threshold(S, quant)
    cap, grads = capture_through_attention(q, k, v, do, bias, causal, threshold)
    check_capture(cap, S, a, bias, threshold, dtype)
    assert not bool(cap.stats["overflow"]) and bool(cap.stats["exact"])
    # the same capture without the fused bound (every tile scored): the same edges
    memtrace_env.set("MEMTRACE_CAPTURE_FUSED", "0")
    ref, ref_grads = capture_through_attention(q, k, v, do, bias, causal, threshold)
    n = int(cap.num_edges)
    assert n == int(ref.num_edges)
    for got, want in zip(cap.edges[:3], ref.edges[:3]):
        assert torch.equal(got[:n], want[:n])
    for got, want in zip(grads, ref_grads):        # the bound does not touch the gradients
        assert torch.equal(got, want)


def test_fused_overflow_keeps_strongest(memtrace_env, monkeypatch):
    """Threshold 0 and a small capacity: the fused pass overflows and the overflow passes (every
    tile, since the fused pass records no tile maxima) keep the strongest."""
    memtrace_env.set("MEMTRACE_CAPTURE_FUSED", "1")
    q, k, v, do = make_tensors(2, 2, 1, 33, 45, 16, torch.float32, seed=5)
    bias = make_bias(2, 33, 45, 30, seed=5)[0]
    S, a = oracle_salience(q, k, v, do, bias, True)[2:]
    cap, _ = capture_through_attention(q, k, v, do, bias, True, 0.0, capacity=100)
    assert bool(cap.stats["overflow"]) and int(cap.num_edges) == 100
    check_capture(cap, S, a, bias, 0.0, torch.float32)
    h, i, j = (t.long() for t in cap.edges[:3])
    kept = S[h, i, j]
    dropped = S.clone()
    dropped[h, i, j] = -1.0
    dropped[entry_mask(bias, S)] = -1.0
    assert kept.min() >= dropped.max() * (1 - 1e-5)


def test_fused_cancelling_rows(memtrace_env, monkeypatch):
    """Large negative biases make rows cancel: the backward recomputes them on a slow path whose P
    the dQ loops never see, so their bound must be +inf (every segment rescored)."""
    memtrace_env.set("MEMTRACE_CAPTURE_FUSED", "1")
    B, Hq, T, D = 2, 2, 24, 16
    q, k, v, do = make_tensors(B, Hq, Hq, T, T, D, torch.float32, seed=9)
    g = torch.Generator().manual_seed(9)
    heads = torch.arange(Hq).repeat_interleave(T)
    rows = torch.arange(T).repeat(Hq)
    # Strong edges turned off by a -12 bias: each row's largest logit.
    s = torch.einsum("bhid,bhjd->bhij", q.double().cpu(), k.double().cpu()) / math.sqrt(D)
    cols = s[0].argmax(-1).flatten()
    vals = torch.full((Hq * T,), -12.0) + 0.1 * torch.rand(Hq * T, generator=g)
    bias = mt.TraceBias.from_coo(heads.to(DEV), rows.to(DEV), cols.to(DEV), vals.to(DEV), num_heads=Hq,
                                 seq_len_q=T, seq_len_k=T)
    assert may_cancel(bias, 1.0)
    S, a = oracle_salience(q, k, v, do, bias, False)[2:]
    threshold = quantile_threshold(S, 0.9)
    cap, _ = capture_through_attention(q, k, v, do, bias, False, threshold)
    check_capture(cap, S, a, bias, threshold, torch.float32)


def _oracle_field_max(q, k, v, do, lse, causal, fields):
    """float64 [B, Hq, Tq, words, fields]: max over each field's keys of P * |dP| per batch element
    (field f of a word: its keys j with (j // 2) % fields == f, see kernels/attention/bwd.py _dq_tiles)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    seg = K.CAPTURE_SEG
    nb = -(-Tk // seg)
    g = Hq // Hkv
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    P = torch.exp(torch.einsum("bhid,bhjd->bhij", q.double(), kk) / math.sqrt(D) - lse.double()[..., None])
    if causal:
        keep = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
        P = torch.where(keep, P, torch.zeros_like(P))
    x = P * torch.einsum("bhid,bhjd->bhij", do.double(), vv).abs()
    x = torch.nn.functional.pad(x, (0, nb * seg - Tk))
    return x.view(B, Hq, Tq, nb, seg // (2 * fields), fields, 2).amax(-1).amax(-2)


@pytest.mark.parametrize("B,min_levels", [(3, None), (1, None), (6, None), (2, 300), (2, 70000)])
def test_bound_fields_against_the_oracle(monkeypatch, B, min_levels):
    """flash_bwd's capture bound words against the float64 oracle, in each field width (8 bits
    for B <= 5, 16 above; min_levels forces 16 or 32 bits): every field holds
    sum_b ceil(min(K / t * max P*|dP|, K * B)) (within one level per batch element for the
    float32 rounding), so a field passes wherever the oracle's mean_b max reaches t."""
    if min_levels is not None:
        monkeypatch.setattr(bound_format, "CAPTURE_MIN_LEVELS", min_levels)
    bits, levels = K.capture_bound_format(B)
    fields = 32 // bits
    Hq, Hkv, Tq, Tk, D = 2, 1, 30, 41, 16
    q, k, v, do = make_tensors(B, Hq, Hkv, Tq, Tk, D, torch.float32, seed=3 + B)
    for causal in (False, True):
        out, lse = R.attention_with_lse(q.double(), k.double(), v.double(), None, causal=causal)
        m = _oracle_field_max(q, k, v, do, lse, causal, fields)
        t = float(m.mean(0).flatten().quantile(0.7))        # some fields pass, most do not
        words = torch.zeros(Hq, m.shape[3], Tq, dtype=torch.int32, device=DEV)
        K.flash_bwd(q, k, v, out.float(), lse.float(), do, causal=causal, scale=1 / math.sqrt(D), alpha=1.0,
                    need_dvalues=False, capture_bound=K.CaptureBound(words, t))
        got = K.capture_bound_fields(words, B).cpu()                        # [Hq, words, Tq, fields]
        want = torch.ceil((m * levels / t).clamp(max=levels * B)).sum(0).permute(0, 2, 1, 3)
        assert (got - want).abs().max() <= B
        mean_max = m.mean(0).permute(0, 2, 1, 3)
        passing = got >= levels * B
        assert passing[mean_max >= t * (1 + 1e-5)].all()
        assert not passing[want < levels * B - B].any()
        assert 0 < passing.sum() < passing.numel()
        assert torch.equal(K.capture_bound_passing(words, B).cpu(), passing.any(-1))


def test_bound_format():
    assert K.capture_bound_format(1) == (8, 255) and K.capture_bound_format(4) == (8, 15)
    assert K.capture_bound_format(5) == (8, 10) and K.capture_bound_format(6) == (16, 1820)
    assert K.capture_bound_format(90) == (16, 8) and K.capture_bound_format(91)[0] == 32
    for B in (1, 4, 6, 91, 1000):     # B programs of at most K * B each never carry out of a field
        bits, levels = K.capture_bound_format(B)
        assert levels * B * B <= K.CAPTURE_FIELD_MAX[bits] and levels >= K.CAPTURE_MIN_LEVELS
        word = torch.tensor([K.capture_all_pass_word(B)], dtype=torch.int32)
        assert (K.capture_bound_fields(word, B) == levels * B).all() and K.capture_bound_passing(word, B).all()
    for bad in (0, -1, 2.0, 10**6):
        with pytest.raises(ValueError, match="batch"):
            K.capture_bound_format(bad)


def test_bound_shape_is_checked():
    q, k, v, do = make_tensors(1, 2, 2, 8, 8, 16, torch.float32, seed=1)
    out, lse = R.attention_with_lse(q.double(), k.double(), v.double(), None, causal=False)
    args = (q, k, v, out.float(), lse.float(), do)
    kw = dict(causal=False, scale=0.25, alpha=1.0, need_dvalues=False)
    with pytest.raises(ValueError, match="capture_bound.words"):
        K.flash_bwd(*args, **kw, capture_bound=K.CaptureBound(torch.zeros(2, 1, 7, dtype=torch.int32, device=DEV), 0.1))
    good = torch.zeros(2, 1, 8, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="capture_bound.words"):
        K.flash_bwd(*args, **kw, capture_bound=K.CaptureBound(good.float(), 0.1))
    for bad in (None, 0.0, float("nan"), float("inf"), "0.1"):
        with pytest.raises(ValueError, match="capture_bound.threshold"):
            K.flash_bwd(*args, **kw, capture_bound=K.CaptureBound(good, bad))
    with pytest.raises(TypeError, match="capture_bound"):
        K.flash_bwd(*args, **kw, capture_bound=good)
    with pytest.raises(TypeError, match="after_dq"):
        K.flash_bwd(*args, **kw, capture_bound=K.CaptureBound(good, 0.1, after_dq=3))


def test_after_dq_runs_before_dk_dv_exist():
    """flash_bwd hands the filled words to after_dq and drops its own references before it
    allocates dK and dV (the capture rescores there, and the bound's memory is free again)."""
    q, k, v, do = make_tensors(2, 2, 1, 20, 20, 16, torch.float32, seed=8)
    out, lse = R.attention_with_lse(q.double(), k.double(), v.double(), None, causal=False)
    seen = {}
    words = torch.zeros(2, -(-20 // K.CAPTURE_SEG), 20, dtype=torch.int32, device=DEV)
    bound = K.CaptureBound(words, 1e-3, after_dq=lambda w: seen.update(words=w))
    del words
    dq, dk, dv, _ = K.flash_bwd(q, k, v, out.float(), lse.float(), do, causal=False, scale=0.25, alpha=1.0,
                                need_dvalues=False, capture_bound=bound)
    assert bound.words is None and seen["words"].dtype == torch.int32 and seen["words"].any()
    ref = K.flash_bwd(q, k, v, out.float(), lse.float(), do, causal=False, scale=0.25, alpha=1.0,
                      need_dvalues=False)
    for got, want in zip((dq, dk, dv), ref[:3]):       # the bound changes no gradient
        assert torch.equal(got, want)


def test_fused_mode_env(memtrace_env, monkeypatch):
    q, k = make_tensors(1, 2, 2, 16, 16, 16, torch.float32, seed=2)[:2]
    cap = SalienceCapture(0.1)
    memtrace_env.set("MEMTRACE_CAPTURE_FUSED", "0")
    assert cap.fused_bound(q, k) is None
    memtrace_env.set("MEMTRACE_CAPTURE_FUSED", "1")
    fused = cap.fused_bound(q, k)
    bound, t = fused.words, fused.threshold
    assert bound.shape == (2, -(-16 // K.CAPTURE_SEG), 16) and bound.dtype == torch.int32
    assert not bound.any() and 0.1 * (1 - 1 / 32) < t < 0.1 and not fused.scored
    assert SalienceCapture(0.0).fused_bound(q, k) is None     # every row would pass: unfused
    with pytest.raises(ValueError, match="MEMTRACE_CAPTURE_FUSED"):
        memtrace_env.set("MEMTRACE_CAPTURE_FUSED", "sometimes")
    # auto: the bound (4 bytes per row and segment) may be at most half of q's bytes
    memtrace_env.set("MEMTRACE_CAPTURE_FUSED", "auto")
    small_q = make_tensors(1, 2, 2, 16, 2048, 16, torch.float32, seed=2)
    assert cap.fused_bound(small_q[0], small_q[1]) is None
    wide = make_tensors(8, 2, 2, 16, 16, 64, torch.float32, seed=2)
    assert cap.fused_bound(wide[0], wide[1]) is not None


def test_auto_takes_triton_for_a_fused_capture(memtrace_env, monkeypatch):
    memtrace_env.set("MEMTRACE_CAPTURE_FUSED", "1")
    memtrace_env.unset("MEMTRACE_BACKEND")
    q, k, v = make_tensors(1, 2, 2, 16, 16, 16, torch.float32, seed=4)[:3]
    cap = SalienceCapture(0.1)
    assert attn_mod._prefers_triton(q, k, v, None, False, cap)
    memtrace_env.set("MEMTRACE_CAPTURE_FUSED", "0")
    assert not attn_mod._prefers_triton(q, k, v, None, False, cap)
    memtrace_env.set("MEMTRACE_CAPTURE_FUSED", "1")
    memtrace_env.set("MEMTRACE_BACKEND", "reference")
    assert not attn_mod._prefers_triton(q, k, v, None, False, cap)


def test_capture_supported_follows_the_dq_configs(monkeypatch):
    """The fused bound needs a dq config whose key block is the segment; float32 at D=128 has none
    that fits the H100's shared memory (the capture then scores every tile instead)."""
    K.capture_supported.cache_clear()          # answers cached under the interpreter's configs
    monkeypatch.setattr(KC, "INTERPRET", False)
    monkeypatch.setattr(KC, "CAPTURE_SEG", 64)
    monkeypatch.setattr(KC, "bwd_configs", lambda kind: [
        KC._config(8, 2, BLOCK_M=128, BLOCK_N=64, USE_DESC=False),
        KC._config(4, 3, BLOCK_M=64, BLOCK_N=64, USE_DESC=False),
        KC._config(4, 3, BLOCK_M=128, BLOCK_N=32, USE_DESC=False)])
    try:
        assert K.capture_supported(128, 2) and K.capture_supported(64, 4)
        assert not K.capture_supported(128, 4)
        assert not K.capture_supported(256, 2)
    finally:
        K.capture_supported.cache_clear()      # not to leave these answers to later tests


@pytest.mark.parametrize("num_heads,Tq,Tk", [(2, 50, 70), (40, 40000, 40000)])   # int32 / int64 keys
def test_edge_rows_sort_and_merge(num_heads, Tq, Tk):
    """The fill's glue on int32 [5, capacity + 1] edge rows: _sort_edges orders the valid edges by
    (head, q, k) and zeroes the rest, _merge_staging moves the strongest staged edges (ties to the
    smaller key) behind the winners only on overflow; with keys past int32 (H*Tq*Tk >= 2^31) too."""
    from memtrace import capture as C
    cap, n = 12, 9

    def rows_of(m, seed):
        gg = torch.Generator().manual_seed(seed)
        r = torch.zeros(5, cap + 1, dtype=torch.int32)
        r[0, :m] = torch.randint(0, num_heads, (m,), generator=gg, dtype=torch.int32)
        r[1, :m] = torch.randint(0, Tq, (m,), generator=gg, dtype=torch.int32)
        r[2, :m] = torch.randint(0, Tk, (m,), generator=gg, dtype=torch.int32)
        r[3, :m] = torch.randint(1, 5, (m,), generator=gg).float().view(torch.int32)   # ties in S
        r[4, :m] = torch.rand(m, generator=gg).view(torch.int32)
        r[:, m:] = 12345                                                            # garbage past the count
        return r

    rows = rows_of(n, 1)
    narrow = C._narrow_keys(num_heads, Tq, Tk)
    h, i, j, S, a = C._sort_edges(rows, torch.tensor(n), cap, Tq, Tk, narrow)
    key = (h[:n].long() * Tq + i[:n].long()) * Tk + j[:n].long()
    want = ((rows[0, :n].long() * Tq + rows[1, :n].long()) * Tk + rows[2, :n].long()).sort().values
    assert torch.equal(key, want) and torch.all(key[1:] >= key[:-1])
    assert all(torch.all(t[n:] == 0) for t in (h, i, j, S, a))
    assert S.dtype == torch.float32 and torch.equal(S[:n].sort().values, rows[3, :n].view(torch.float32).sort().values)
    # overflow: 5 winners already placed, 9 staged, room for 7 more
    out = rows_of(5, 2)
    stg = rows_of(n, 3)
    before = out.clone()
    C._merge_staging(out, stg, torch.tensor(5), torch.tensor(n), torch.tensor(False), cap, Tq, Tk, narrow)
    assert torch.equal(out[:, :cap], before[:, :cap]), "no overflow: nothing moves"
    C._merge_staging(out, stg, torch.tensor(5), torch.tensor(n), torch.tensor(True), cap, Tq, Tk, narrow)
    sk = (stg[0, :n].long() * Tq + stg[1, :n].long()) * Tk + stg[2, :n].long()
    order = sorted(range(n), key=lambda e: (-float(stg[3, e].view(torch.float32)), int(sk[e])))[:cap - 5]
    assert torch.equal(out[:, 5:cap], stg[:, order])
    assert torch.equal(out[:, :5], before[:, :5])


def test_fill_glue_is_shared_and_outputs_are_copies(monkeypatch):
    """Captures of one (device, capacity) share the fill's buffers and glue; a later fill leaves an
    earlier capture's results alone; a few glues are kept, the oldest dropped."""
    from memtrace import capture as C
    monkeypatch.setattr(C, "_GLUE_CACHE", {})
    q, k, v, do = make_tensors(2, 2, 2, 24, 40, 16, torch.float32, seed=12)
    S, a = oracle_salience(q, k, v, do, None, False)[2:]
    caps = []
    for quant in (0.9, 0.97):
        threshold = quantile_threshold(S, quant)
        cap, _ = capture_through_attention(q, k, v, do, None, False, threshold, capacity=512)
        caps.append((cap, threshold, [t.clone() for t in cap.edges]))
    assert len(C._GLUE_CACHE) == 1
    for cap, threshold, edges in caps:
        check_capture(cap, S, a, None, threshold, torch.float32)
        assert all(torch.equal(x, y) for x, y in zip(cap.edges, edges))
    assert int(caps[0][0].num_edges) > int(caps[1][0].num_edges)
    monkeypatch.setattr(C, "_GLUE_CACHE_SIZE", 2)
    for capacity in (100, 200, 300):
        C._fill_glue(q.device, capacity, True)
    assert [key[2] for key in C._GLUE_CACHE] == [200, 300]
