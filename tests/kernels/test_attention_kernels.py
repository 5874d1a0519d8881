"""Interpreter parity of kernels/attention/ (fused and standalone correction) against the float64 oracle.

Runs on the CPU under TRITON_INTERPRET=1 (set below when no GPU is present). Shapes are tiny: the
interpreter is slow. fp16 and fp32 only (the interpreter cannot do a bf16 tl.dot).
"""
import contextlib
import functools
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _helpers import DEV, TOL, expected_dvalues, make_bias, make_tensors, oracle_kernels, rel_err  # noqa: E402
from memtrace.kernels import attention as ka  # noqa: E402
from memtrace.kernels import settings  # noqa: E402
from memtrace.kernels.attention import config as kcfg  # noqa: E402

from memtrace.bias import TraceBias  # noqa: E402

# ||a - b|| / ||b||, with ||b|| floored at 0.05 * sqrt(numel) so that an exactly-zero oracle
# (a single visible key has zero gradient) is compared in absolute terms
rel = functools.partial(rel_err, rms_floor=0.05)


@pytest.fixture
def knobs():
    """knobs(**changes): kernel settings for the rest of the test (settings.override, undone at teardown)."""
    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(settings.override(**changes))


CASES = [
    # B, Hq, Hkv, Tq, Tk, D, causal, n_entries, Tq_max, Tk_max
    (1, 2, 2, 19, 23, 16, False, 40, 19, 23),
    (2, 4, 2, 21, 9, 32, True, 50, 30, 12),     # Tq > Tk: fully masked rows; bias built bigger
    (1, 2, 1, 7, 33, 16, True, 30, 7, 40),      # Tq < Tk, GQA 2:1, entries past Tk
    (1, 1, 1, 1, 1, 16, False, 3, 1, 1),
    (2, 2, 2, 33, 33, 16, True, 0, 33, 33),     # empty bias
    (1, 1, 1, 20, 24, 16, True, 300, 20, 24),   # dense entries: many chunks per block (pipelining)
]


@pytest.mark.parametrize("form", ["onehot", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_flash_fwd_bwd_matches_oracle(case, dtype, form, knobs):
    """Forward and backward against the float64 oracle, with both forms of the backward's entry
    epilogues (settings attn_bwd_entries)."""
    knobs(attn_bwd_entries=form)
    B, Hq, Hkv, Tq, Tk, D, causal, n, Tq_max, Tk_max = case
    scale, alpha = 1.0 / math.sqrt(D), 0.7
    q, k, v, do = make_tensors(B, Hq, Hkv, Tq, Tk, D, dtype, seed=n + Tq)
    bias, coo = make_bias(Hq, Tq_max, Tk_max, n, seed=Tk, scale_vals=2.0)
    ev = bias.entry_values()
    out, lse = ka.flash_fwd(q, k, v, bias, ev, causal=causal, scale=scale, alpha=alpha)
    r_out, r_lse, r_dq, r_dk, r_dv, r_db = oracle_kernels(q, k, v, do, coo, Hq, causal, scale, alpha)
    tol = TOL[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert rel(out, r_out) < tol
    finite = torch.isfinite(r_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert rel(lse.cpu()[finite], r_lse[finite]) < 1e-5
    dq, dk, dv, dvals = ka.flash_bwd(q, k, v, out, lse, do, bias, ev, causal=causal, scale=scale,
                                     alpha=alpha, need_dvalues=True)
    for got, want in ((dq, r_dq), (dk, r_dk), (dv, r_dv)):
        assert got.dtype == dtype and got.shape == want.shape
        assert not torch.isnan(got).any()
        assert rel(got, want) < tol
    want_dv = expected_dvalues(bias, r_db)
    assert dvals.shape == (bias.nnz,)
    if bias.nnz:
        assert rel(dvals.cpu(), want_dv) < tol


def test_backward_entry_form_follows_density(knobs):
    """attn_bwd_entries="auto": the per-entry (rows) epilogues from ROWS_MIN_DENSITY entries per
    (head, query row) of the bias, the one-hot ones below; an explicit setting wins."""
    sparse, _ = make_bias(2, 10, 12, 30, seed=1)          # 1.5 per row
    dense_, _ = make_bias(2, 10, 12, 40, seed=2)          # 2.0 per row
    knobs(attn_bwd_entries="auto")
    assert (kcfg.entry_form(sparse), kcfg.entry_form(dense_)) == (0, 1)
    knobs(attn_bwd_entries="rows")
    assert kcfg.entry_form(sparse) == 1
    knobs(attn_bwd_entries="onehot")
    assert kcfg.entry_form(dense_) == 0


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[5]])
def test_flash_bwd_without_possible_cancellation_skips_nothing_it_needs(case, knobs):
    """may_cancel=False (alpha * every value >= ln(CANCEL_THRESHOLD), what the op passes for
    non-negative traces) skips the flags pass and the exact-row launches: the gradients must be
    bitwise those of the full path, and both must match the oracle (the fused form: the split
    one, which such calls may take, is test_flash_bwd_split_form_matches_oracle's)."""
    knobs(attn_bwd_split="0")
    B, Hq, Hkv, Tq, Tk, D, causal, n, Tq_max, Tk_max = case
    scale, alpha = 1.0 / math.sqrt(D), 0.9
    q, k, v, do = make_tensors(B, Hq, Hkv, Tq, Tk, D, torch.float32, seed=3 + n)
    bias, (h, i, j, val) = make_bias(Hq, Tq_max, Tk_max, n, seed=5 + n, scale_vals=2.0)
    bias, coo = make_bias(Hq, Tq_max, Tk_max, 0, seed=0, extra=(h, i, j, val.abs() - 0.4))   # duplicates add
    ev = bias.entry_values()
    assert alpha * float(ev.min()) >= math.log(ka.CANCEL_THRESHOLD)
    out, lse = ka.flash_fwd(q, k, v, bias, ev, causal=causal, scale=scale, alpha=alpha, may_cancel=False)
    full = ka.flash_bwd(q, k, v, out, lse, do, bias, ev, causal=causal, scale=scale, alpha=alpha,
                        need_dvalues=True)
    fast = ka.flash_bwd(q, k, v, out, lse, do, bias, ev, causal=causal, scale=scale, alpha=alpha,
                        need_dvalues=True, may_cancel=False)
    for a, b in zip(full, fast):
        assert torch.equal(a, b)
    r = oracle_kernels(q, k, v, do, coo, Hq, causal, scale, alpha)
    for got, want in zip(fast[:3], r[2:5]):
        assert rel(got, want) < TOL[torch.float32]
    assert rel(fast[3].cpu(), expected_dvalues(bias, r[5])) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[5]])
def test_flash_bwd_split_form_matches_oracle(case, dtype, knobs):
    """flash_bwd's split form (an unbiased pass fed O', LSE', then correct_bwd) against the
    oracle and the fused form, GQA and causal included, negative logit scale too."""
    knobs(attn_bwd_split="1")
    B, Hq, Hkv, Tq, Tk, D, causal, n, Tq_max, Tk_max = case
    alpha = 0.8
    q, k, v, do = make_tensors(B, Hq, Hkv, Tq, Tk, D, dtype, seed=17 + n)
    bias, (h, i, j, val) = make_bias(Hq, Tq_max, Tk_max, n, seed=19 + n, scale_vals=2.0)
    bias, coo = make_bias(Hq, Tq_max, Tk_max, 0, seed=0, extra=(h, i, j, val.abs() - 0.3))
    ev = bias.entry_values()
    assert alpha * float(ev.min()) >= math.log(ka.CANCEL_THRESHOLD)
    for scale in (1.0 / math.sqrt(D), -0.5 / math.sqrt(D)):
        out, lse = ka.flash_fwd(q, k, v, bias, ev, causal=causal, scale=scale, alpha=alpha, may_cancel=False)
        split = ka.flash_bwd(q, k, v, out, lse, do, bias, ev, causal=causal, scale=scale, alpha=alpha,
                             need_dvalues=True, may_cancel=False)
        knobs(attn_bwd_split="0")
        fused = ka.flash_bwd(q, k, v, out, lse, do, bias, ev, causal=causal, scale=scale, alpha=alpha,
                             need_dvalues=True, may_cancel=False)
        knobs(attn_bwd_split="1")
        r = oracle_kernels(q, k, v, do, coo, Hq, causal, scale, alpha)
        for got, other, want in zip(split[:3], fused[:3], r[2:5]):
            assert got.dtype == dtype and got.shape == want.shape
            assert rel(got, want) < TOL[dtype]
            assert rel(got, other.float()) < 2 * TOL[dtype]
        assert rel(split[3].cpu(), expected_dvalues(bias, r[5])) < TOL[dtype]


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[5]])
def test_flash_fwd_split_form_matches_oracle(case, knobs):
    """flash_fwd's split form (the unbiased pass, then correct_fwd) against the fused form and the
    oracle, with large negative biases (cancelling rows recomputed) and flags returned."""
    B, Hq, Hkv, Tq, Tk, D, causal, n, Tq_max, Tk_max = case
    q, k, v, do = make_tensors(B, Hq, Hkv, Tq, Tk, D, torch.float32, seed=23 + n)
    bias, coo = make_bias(Hq, Tq_max, Tk_max, n, seed=29 + n, scale_vals=4.0)
    ev = bias.entry_values()
    kw = {"causal": causal, "scale": -0.7 / math.sqrt(D), "alpha": 1.5, "return_flags": True}
    knobs(attn_fwd_split="1")
    split = ka.flash_fwd(q, k, v, bias, ev, **kw)
    knobs(attn_fwd_split="0")
    fused = ka.flash_fwd(q, k, v, bias, ev, **kw)
    r_out, r_lse = oracle_kernels(q, k, v, do, coo, Hq, causal, kw["scale"], kw["alpha"])[:2]
    assert rel(split[0], r_out) < TOL[torch.float32] and rel(split[0], fused[0]) < TOL[torch.float32]
    finite = torch.isfinite(r_lse)
    assert rel(split[1].cpu()[finite], r_lse[finite]) < 1e-5
    assert torch.equal(split[2], fused[2])


def test_forward_split_follows_density(knobs):
    sparse, _ = make_bias(2, 10, 12, 30, seed=1)          # 1.5 per row
    dense_, _ = make_bias(2, 10, 12, 40, seed=2)          # 2.0 per row
    knobs(attn_fwd_split="auto")
    assert (kcfg.split_forward(sparse), kcfg.split_forward(dense_), kcfg.split_forward(None)) == (False, True, False)
    knobs(attn_fwd_split="1")
    assert kcfg.split_forward(sparse)
    knobs(attn_fwd_split="0")
    assert not kcfg.split_forward(dense_)


def test_backward_split_follows_density_and_safety(knobs):
    """attn_bwd_split="auto" splits from BWD_SPLIT_MIN_DENSITY (0.5) entries per (head, query row), never
    when a row may cancel or a capture bound is passed; 0 and 1 force it (within those limits)."""
    sparse, _ = make_bias(2, 10, 12, 9, seed=1)           # 0.45 per row
    dense_, _ = make_bias(2, 10, 12, 10, seed=2)          # 0.5 per row
    bound = object()
    knobs(attn_bwd_split="auto")
    assert (kcfg.split_backward(sparse, False, None), kcfg.split_backward(dense_, False, None)) == (False, True)
    assert not kcfg.split_backward(dense_, True, None)
    assert not kcfg.split_backward(dense_, False, bound)
    assert not kcfg.split_backward(None, False, None)
    knobs(attn_bwd_split="1")
    assert kcfg.split_backward(sparse, False, None) and not kcfg.split_backward(sparse, True, None)
    knobs(attn_bwd_split="0")
    assert not kcfg.split_backward(dense_, False, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES[:3])
def test_correction_after_dense_matches_oracle(case, dtype):
    """correct_fwd on the unbiased (out, lse); correct_bwd on a dense backward fed (O', LSE')."""
    B, Hq, Hkv, Tq, Tk, D, causal, n, Tq_max, Tk_max = case
    scale, alpha = 1.0 / math.sqrt(D), 1.3
    q, k, v, do = make_tensors(B, Hq, Hkv, Tq, Tk, D, dtype, seed=7 + n)
    bias, coo = make_bias(Hq, Tq_max, Tk_max, n, seed=11 + n, scale_vals=2.0)
    ev = bias.entry_values()
    out0, lse0 = ka.flash_fwd(q, k, v, None, causal=causal, scale=scale, alpha=alpha)
    out, lse = ka.correct_fwd(q, k, v, out0, lse0, bias, ev, causal=causal, scale=scale, alpha=alpha)
    assert out.data_ptr() == out0.data_ptr()  # in place
    r_out, r_lse, r_dq, r_dk, r_dv, r_db = oracle_kernels(q, k, v, do, coo, Hq, causal, scale, alpha)
    tol = TOL[dtype]
    assert rel(out, r_out) < tol
    finite = torch.isfinite(r_lse)
    assert rel(lse.cpu()[finite], r_lse[finite]) < 1e-5
    dq, dk, dv, _ = ka.flash_bwd(q, k, v, out, lse, do, None, causal=causal, scale=scale, alpha=alpha,
                                 need_dvalues=False)
    dq, dk, dv, dvals = ka.correct_bwd(q, k, v, out, lse, do, bias, ev, dq, dk, dv, causal=causal,
                                       scale=scale, alpha=alpha, need_dvalues=True)
    for got, want in ((dq, r_dq), (dk, r_dk), (dv, r_dv)):
        assert rel(got, want) < tol
    assert rel(dvals.cpu(), expected_dvalues(bias, r_db)) < tol


@pytest.mark.parametrize("stages", [1, 3])
@pytest.mark.parametrize("case", [CASES[1], CASES[5]])
def test_correct_fwd_pipelined_loop(case, stages):
    """The forward correction's plain (compiler-pipelined) entry loop gives the hand-carried
    loop's result and the oracle's, with 16-entry chunks so a block runs several."""
    B, Hq, Hkv, Tq, Tk, D, causal, n, Tq_max, Tk_max = case
    scale, alpha = 1.0 / math.sqrt(D), 0.7
    q, k, v, do = make_tensors(B, Hq, Hkv, Tq, Tk, D, torch.float32, seed=41 + n)
    bias, coo = make_bias(Hq, Tq_max, Tk_max, n, seed=43 + n, scale_vals=1.5)
    ev = bias.entry_values()
    out0, lse0 = ka.flash_fwd(q, k, v, None, causal=causal, scale=scale, alpha=alpha)
    kw = {"causal": causal, "scale": scale, "alpha": alpha, "inplace": False, "block_m": 16, "chunk": 16}
    base = ka.correct_fwd(q, k, v, out0, lse0, bias, ev, **kw, stages=0)
    got = ka.correct_fwd(q, k, v, out0, lse0, bias, ev, **kw, stages=stages)
    assert torch.allclose(got[0], base[0], atol=1e-6, rtol=1e-6)
    assert torch.allclose(got[1], base[1], atol=1e-6, rtol=1e-6, equal_nan=True)
    r_out = oracle_kernels(q, k, v, do, coo, Hq, causal, scale, alpha)[0]
    assert rel(got[0], r_out) < TOL[torch.float32]


@pytest.mark.parametrize("case", [c for c in CASES if c[7] > 0])
def test_correct_fwd_window_form(case):
    """The window form (programs own the rows that start in a window of sorted entries) gives
    the rows form's outputs and cancelling flags, in launch order and reversed, with windows
    smaller than a row's entries (the dense case) and windows that end mid-row."""
    B, Hq, Hkv, Tq, Tk, D, causal, n, Tq_max, Tk_max = case
    scale, alpha = 1.0 / math.sqrt(D), -0.8
    q, k, v, do = make_tensors(B, Hq, Hkv, Tq, Tk, D, torch.float32, seed=51 + n)
    bias, coo = make_bias(Hq, Tq_max, Tk_max, n, seed=53 + n, scale_vals=2.0)
    ev = bias.entry_values()
    out0, lse0 = ka.flash_fwd(q, k, v, None, causal=causal, scale=scale, alpha=alpha)
    kw = {"causal": causal, "scale": scale, "alpha": alpha, "inplace": False, "chunk": 16, "return_flags": True}
    base = ka.correct_fwd(q, k, v, out0, lse0, bias, ev, **kw, block_m=16, form="rows")
    for window, stages, reverse in ((16, 0, False), (16, 2, True), (32, 3, None)):
        got = ka.correct_fwd(q, k, v, out0, lse0, bias, ev, **kw, block_m=window, stages=stages, form="window",
                             reverse=reverse)
        assert torch.allclose(got[0], base[0], atol=1e-6, rtol=1e-6)
        assert torch.allclose(got[1], base[1], atol=1e-6, rtol=1e-6, equal_nan=True)
        assert torch.equal(got[2], base[2])
    r_out = oracle_kernels(q, k, v, do, coo, Hq, causal, scale, alpha)[0]
    assert rel(got[0], r_out) < TOL[torch.float32]


def biased_pass_and_dense_grads(case, seed, alpha):
    """fp32 inputs and a bias (values scaled by 1.5) for `case`, the biased forward (out, lse) and
    a dense backward fed them: what correct_bwd's tests add the entry terms to."""
    B, Hq, Hkv, Tq, Tk, D, causal, n, Tq_max, Tk_max = case
    scale = 1.0 / math.sqrt(D)
    q, k, v, do = make_tensors(B, Hq, Hkv, Tq, Tk, D, torch.float32, seed=seed)
    bias, coo = make_bias(Hq, Tq_max, Tk_max, n, seed=seed + 6, scale_vals=1.5)
    ev = bias.entry_values()
    out, lse = ka.flash_fwd(q, k, v, bias, ev, causal=causal, scale=scale, alpha=alpha)
    dense = ka.flash_bwd(q, k, v, out, lse, do, None, causal=causal, scale=scale, alpha=alpha, need_dvalues=False)
    return q, k, v, do, bias, coo, ev, out, lse, dense


@pytest.mark.parametrize("case", [c for c in CASES if c[7] > 0])
def test_correct_bwd_window_form(case):
    """correct_bwd's launches by windows of entries (the query side; the key side where there is
    no GQA) give the rows forms' dq, dk, dv and dvalues (duplicates included) and the oracle's,
    with windows smaller than a row's or a key's entries."""
    B, Hq, Hkv, Tq, Tk, D, causal, n, Tq_max, Tk_max = case
    scale, alpha = 1.0 / math.sqrt(D), 0.9
    q, k, v, do, bias, coo, ev, out, lse, dense = biased_pass_and_dense_grads(case, 61 + n, alpha)

    def run(**kw):
        grads = [t.clone() for t in dense[:3]]
        return ka.correct_bwd(q, k, v, out, lse, do, bias, ev, *grads, causal=causal, scale=scale, alpha=alpha,
                              need_dvalues=True, **kw)
    base = run(q_form="rows", kv_form="rows")
    r = oracle_kernels(q, k, v, do, coo, Hq, causal, scale, alpha)
    kv_forms = ("rows", "window") if Hq == Hkv else ("rows",)
    for window in (16, 32):
        for kv_form in kv_forms:
            got = run(q_form="window", q_window=window, kv_form=kv_form, kv_window=window)
            for a, want in zip(got, base):
                assert torch.allclose(a, want, atol=1e-5, rtol=1e-5)
        got = run(q_form="rows", kv_form=kv_forms[-1], kv_window=window)
        for a, want in zip(got, base):
            assert torch.allclose(a, want, atol=1e-5, rtol=1e-5)
    for a, want in zip(got[:3], r[2:5]):
        assert rel(a, want) < TOL[torch.float32]
    assert rel(got[3].cpu(), expected_dvalues(bias, r[5])) < TOL[torch.float32]


@pytest.mark.parametrize("case", [CASES[1], CASES[2]])
def test_correct_bwd_parts_with_given_delta(case):
    """correct_bwd split in its two launches ("kv" first, as the split backward runs it beside the
    dense dQ kernel, then "q"), both reading a given delta, matches the one call that computes
    delta itself, in both query-side forms; bad delta / parts are refused before any launch."""
    B, Hq, Hkv, Tq, Tk, D, causal, n, Tq_max, Tk_max = case
    scale, alpha = 1.0 / math.sqrt(D), 0.7
    q, k, v, do, bias, _, ev, out, lse, dense = biased_pass_and_dense_grads(case, 71 + n, alpha)
    delta = (do.double() * out.double()).sum(-1).float().reshape(B * Hq, Tq).contiguous()
    kw = {"causal": causal, "scale": scale, "alpha": alpha}
    for q_form in ("rows", "window"):
        grads = [t.clone() for t in dense[:3]]
        want = ka.correct_bwd(q, k, v, out, lse, do, bias, ev, *grads, need_dvalues=True, q_form=q_form, **kw)
        dq, dk, dv = (t.clone() for t in dense[:3])
        none = ka.correct_bwd(q, k, v, out, lse, do, bias, ev, None, dk, dv, need_dvalues=True, delta=delta,
                              parts="kv", **kw)
        assert none[0] is None and none[3] is None
        got = ka.correct_bwd(q, k, v, out, lse, do, bias, ev, dq, dk, dv, need_dvalues=True, delta=delta.clone(),
                             parts="q", q_form=q_form, **kw)
        for a, b in zip(got, want):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    dq, dk, dv = (t.clone() for t in dense[:3])
    for bad, match in ((dict(parts="kv"), "needs delta"), (dict(parts="dq"), "parts"),
                       (dict(delta=delta.double()), "delta"), (dict(delta=delta[:, :-1]), "delta"),
                       (dict(kv_form="cols"), "kv_form"), (dict(q_form="cols"), "q_form"),
                       (dict(kv_form="window"), "GQA") if Hq != Hkv else (dict(parts="x"), "parts"),
                       (dict(parts="q", row_flags=torch.zeros(B, Hq, Tq, dtype=torch.int8)), "row_flags"),
                       (dict(row_pdp=torch.zeros(B * Hq, Tq, device=q.device)), "row_pdp")):
        with pytest.raises(ValueError, match=match):
            ka.correct_bwd(q, k, v, out, lse, do, bias, ev, dq, dk, dv, need_dvalues=True, **kw, **bad)
    for a, b in zip((dq, dk, dv), dense[:3]):
        assert torch.equal(a, b)


def test_correct_fwd_picks_window_form_when_sparse():
    assert kcfg.fwd_config(128, 0.5)[0] == "window" and kcfg.fwd_config(128, 1.5)[0] == "rows"
    assert kcfg.fwd_config(256, 0.5)[0] == "rows"
    assert kcfg.bwd_q_config(128, 0.5)[0] == "window" and kcfg.bwd_q_config(128, 1.0)[0] == "rows"
    assert kcfg.bwd_kv_config(128, 0.5, 1)[0] == "window" and kcfg.bwd_kv_config(128, 0.5, 2)[0] == "rows"
    assert kcfg.bwd_kv_config(128, 1.0, 1)[0] == "rows" and kcfg.bwd_kv_config(256, 0.5, 1)[0] == "rows"
    q = torch.zeros(1, 1, 4, 16, device=DEV)
    bias, _ = make_bias(1, 4, 4, 3, seed=0)
    with pytest.raises(ValueError, match="form"):
        ka.correct_fwd(q, q, q, q.clone(), torch.zeros(1, 1, 4, device=DEV), bias, bias.entry_values(),
                       causal=False, scale=1.0, alpha=1.0, form="cols")


@pytest.mark.parametrize("big", [40.0, -40.0])
def test_large_biases(big):
    """Large positive biases (no overflow in the shifted frame) and large negative ones on
    random edges; fp32."""
    B, Hq, Hkv, Tq, Tk, D = 1, 2, 2, 17, 20, 16
    q, k, v, do = make_tensors(B, Hq, Hkv, Tq, Tk, D, torch.float32, seed=3)
    bias, coo = make_bias(Hq, Tq, Tk, 60, seed=5, scale_vals=1.0)
    h, i, j, val = coo
    val = torch.full_like(val, big) * torch.rand(val.shape, generator=torch.Generator().manual_seed(1))
    bias = TraceBias.from_coo(h.to(DEV), i.to(DEV), j.to(DEV), val.to(DEV), num_heads=Hq, seq_len_q=Tq, seq_len_k=Tk)
    coo = (h, i, j, val)
    ev = bias.entry_values()
    out, lse = ka.flash_fwd(q, k, v, bias, ev, causal=False, scale=0.25, alpha=1.0)
    r_out, r_lse, r_dq, r_dk, r_dv, r_db = oracle_kernels(q, k, v, do, coo, Hq, False, 0.25, 1.0)
    assert rel(out, r_out) < 1e-5 and rel(lse.cpu(), r_lse) < 1e-5
    dq, dk, dv, dvals = ka.flash_bwd(q, k, v, out, lse, do, bias, ev, causal=False, scale=0.25, alpha=1.0,
                                     need_dvalues=True)
    for got, want in ((dq, r_dq), (dk, r_dk), (dv, r_dv)):
        assert rel(got, want) < 1e-5
    assert rel(dvals.cpu(), expected_dvalues(bias, r_db)) < 1e-5


def test_cancellation_forward_falls_back():
    """Entries on each row's dominant edge with a bias of -30: 1 + sum w ~ 1e-6, the identity
    cancels; the fused forward must recompute those blocks exactly."""
    B, Hq, Tq, Tk, D = 1, 1, 16, 16, 16
    g = torch.Generator().manual_seed(0)
    k = torch.randn(B, Hq, Tk, D, generator=g)
    q = 4.0 * k[:, :, torch.arange(Tq) % Tk] + 0.1 * torch.randn(B, Hq, Tq, D, generator=g)
    v = torch.randn(B, Hq, Tk, D, generator=g)
    do = torch.randn(B, Hq, Tq, D, generator=g)
    i = torch.arange(Tq)
    coo = (torch.zeros_like(i), i, i % Tk, torch.full((Tq,), -30.0))
    q, k, v, do = (t.to(DEV) for t in (q, k, v, do))
    bias = TraceBias.from_coo(*(t.to(DEV) for t in coo), num_heads=1, seq_len_q=Tq, seq_len_k=Tk)
    out, lse = ka.flash_fwd(q, k, v, bias, bias.entry_values(), causal=False, scale=1.0, alpha=1.0)
    r_out, r_lse, *_ = oracle_kernels(q, k, v, do, coo, 1, False, 1.0, 1.0)
    assert rel(out, r_out) < 1e-5 and rel(lse.cpu(), r_lse) < 1e-5


def test_cancellation_standalone_correction_falls_back():
    B, Hq, Tq, Tk, D = 1, 1, 16, 16, 16
    g = torch.Generator().manual_seed(1)
    k = torch.randn(B, Hq, Tk, D, generator=g)
    q = 4.0 * k + 0.1 * torch.randn(B, Hq, Tq, D, generator=g)
    v = torch.randn(B, Hq, Tk, D, generator=g)
    i = torch.arange(0, Tq, 2)   # every other row cancels; the others hold no entry
    coo = (torch.zeros_like(i), i, i, torch.full(i.shape, -30.0))
    q, k, v = (t.to(DEV) for t in (q, k, v))
    bias = TraceBias.from_coo(*(t.to(DEV) for t in coo), num_heads=1, seq_len_q=Tq, seq_len_k=Tk)
    out0, lse0 = ka.flash_fwd(q, k, v, None, causal=True, scale=1.0, alpha=1.0)
    out, lse = ka.correct_fwd(q, k, v, out0, lse0, bias, bias.entry_values(), causal=True, scale=1.0, alpha=1.0)
    r_out, r_lse, *_ = oracle_kernels(q, k, v, v, coo, 1, True, 1.0, 1.0)
    assert rel(out, r_out) < 1e-5 and rel(lse.cpu(), r_lse) < 1e-5


# -- cancelling rows: the backward's exact slow path --------------------------------------------
def cancel_inputs(B, Hq, Hkv, Tq, Tk, D, dtype, flagged, seed, n_random=30, big=-30.0):
    """Keys orthogonal (Tk <= D) with |k_j|^2 = D; row i of every query head is 12/D times its
    bottom-right diagonal key i + Tk - Tq (visible under causal) plus noise, so with scale
    1/sqrt(D) it puts logit ~12 there and ~0 elsewhere: almost all its mass. The rows in `flagged`
    get a bias of `big` on that edge: 1 + sum w ~ Tk e^-12, they cancel, and the dense form of
    the backward would see P = exp(s - LSE') ~ e^12 / Tk on the edge. Plus `n_random` random
    entries (spread 2, a duplicate) that may land anywhere."""
    assert Tk <= D
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(B * Hkv, D, D, generator=g))[0]        # orthonormal columns
    k = basis.transpose(1, 2)[:, :Tk].reshape(B, Hkv, Tk, D) * math.sqrt(D)
    off = Tk - Tq
    src = (torch.arange(Tq) + off).clamp(0, Tk - 1)
    q = (12.0 / math.sqrt(D)) * k.repeat_interleave(Hq // Hkv, dim=1)[:, :, src]
    q = q + 0.1 * torch.randn(B, Hq, Tq, D, generator=g)
    v = torch.randn(B, Hkv, Tk, D, generator=g)
    do = torch.randn(B, Hq, Tq, D, generator=g)
    rows = torch.tensor([i for i in flagged if 0 <= i + off < Tk], dtype=torch.long)
    hh = torch.arange(Hq).repeat_interleave(len(rows))
    ii = rows.repeat(Hq)
    extra = (hh, ii, ii + off, torch.full(hh.shape, big))
    bias, coo = make_bias(Hq, Tq, Tk, n_random, seed=seed + 1, scale_vals=2.0, extra=extra)
    want = torch.zeros(B, Hq, Tq, dtype=torch.int8)
    want[:, :, rows] = 1
    return [t.to(dtype).to(DEV) for t in (q, k, v, do)], bias, coo, want


CANCEL_CASES = [
    # B, Hq, Hkv, Tq, Tk, D, causal, flagged rows, scale sign
    (1, 2, 2, 19, 23, 32, False, [1, 4, 7, 10, 13], 1.0),        # mixed within block 0; block 1 clean
    (2, 4, 2, 21, 30, 32, True, [0, 5, 6, 17, 20], 1.0),         # GQA 2:1, causal Tq < Tk
    (1, 2, 1, 24, 13, 16, True, [12, 15, 16, 23], -1.0),         # Tq > Tk: fully masked rows; scale < 0
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CANCEL_CASES)
def test_cancelling_rows_backward_fused(case, dtype):
    """flash_fwd flags the cancelling rows; flash_bwd (flags passed, or recomputed from LSE')
    gives the exact gradients there (the dense + correction form loses ~e^10 there)."""
    B, Hq, Hkv, Tq, Tk, D, causal, flagged, sign = case
    (q, k, v, do), bias, coo, want_flags = cancel_inputs(B, Hq, Hkv, Tq, Tk, D, dtype, flagged, seed=Tq)
    scale, alpha = sign / math.sqrt(D), 1.0
    if sign < 0:
        q = -q
    ev = bias.entry_values()
    out, lse, flags = ka.flash_fwd(q, k, v, bias, ev, causal=causal, scale=scale, alpha=alpha, return_flags=True)
    assert flags.shape == (B, Hq, Tq) and flags.dtype == torch.int8
    # the planted rows, and maybe rows where a random entry pushed a dominant edge down too
    assert (flags.cpu() >= want_flags).all() and flags.sum() < 2 * want_flags.sum()
    recomputed = ka.cancelling_rows(q, k, lse, bias, ev, causal=causal, scale=scale, alpha=alpha)
    assert torch.equal(recomputed.cpu(), flags.cpu())
    r_out, r_lse, r_dq, r_dk, r_dv, r_db = oracle_kernels(q, k, v, do, coo, Hq, causal, scale, alpha)
    tol = TOL[dtype]
    assert rel(out, r_out) < tol
    want_dvals = expected_dvalues(bias, r_db)
    for row_flags in (flags, None):
        dq, dk, dv, dvals = ka.flash_bwd(q, k, v, out, lse, do, bias, ev, causal=causal, scale=scale,
                                         alpha=alpha, need_dvalues=True, row_flags=row_flags)
        for name, got, want in (("dq", dq, r_dq), ("dk", dk, r_dk), ("dv", dv, r_dv)):
            assert torch.isfinite(got).all(), name
            assert rel(got, want) < tol, (name, rel(got, want))
        assert rel(dvals.cpu(), want_dvals) < tol
    # rows the flags point at are where the fast form fails: their dq must be right on its own
    sel = want_flags.bool()
    assert rel(dq.cpu()[sel], r_dq[sel]) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CANCEL_CASES[1:])
def test_cancelling_rows_backward_standalone(case, dtype):
    """The op layer's recipe after a dense backend: correct_fwd(return_flags) -> dense backward fed
    mask_lse(lse', flags) -> correct_bwd(row_flags=flags)."""
    B, Hq, Hkv, Tq, Tk, D, causal, flagged, sign = case
    (q, k, v, do), bias, coo, want_flags = cancel_inputs(B, Hq, Hkv, Tq, Tk, D, dtype, flagged, seed=5 + Tq)
    scale, alpha = sign / math.sqrt(D), 1.0
    if sign < 0:
        q = -q
    ev = bias.entry_values()
    out0, lse0 = ka.flash_fwd(q, k, v, None, causal=causal, scale=scale, alpha=alpha)
    out, lse, flags = ka.correct_fwd(q, k, v, out0, lse0, bias, ev, causal=causal, scale=scale, alpha=alpha,
                                     return_flags=True)
    assert (flags.cpu() >= want_flags).all()
    r_out, r_lse, r_dq, r_dk, r_dv, r_db = oracle_kernels(q, k, v, do, coo, Hq, causal, scale, alpha)
    tol = TOL[dtype]
    assert rel(out, r_out) < tol
    variants = [(ka.mask_lse(lse, flags), do)]
    if dtype == torch.float32:  # dO masking alone: fp16 would hold P = exp(s - LSE') > 65504 there
        variants.append((lse, ka.mask_dout(do, flags)))
    for lse_dense, do_dense in variants:
        dq, dk, dv, _ = ka.flash_bwd(q, k, v, out, lse_dense, do_dense, None, causal=causal, scale=scale,
                                     alpha=alpha, need_dvalues=False)
        dq, dk, dv, dvals = ka.correct_bwd(q, k, v, out, lse, do, bias, ev, dq, dk, dv, causal=causal,
                                           scale=scale, alpha=alpha, need_dvalues=True, row_flags=flags)
        for name, got, want in (("dq", dq, r_dq), ("dk", dk, r_dk), ("dv", dv, r_dv)):
            assert rel(got, want) < tol, (name, rel(got, want))
        assert rel(dvals.cpu(), expected_dvalues(bias, r_db)) < tol


def test_no_cancelling_rows_flags_are_zero():
    """Ordinary biases flag nothing, in the forwards and from LSE'."""
    B, Hq, Hkv, Tq, Tk, D, causal, n, Tq_max, Tk_max = CASES[0]
    q, k, v, do = make_tensors(B, Hq, Hkv, Tq, Tk, D, torch.float32, seed=2)
    bias, _ = make_bias(Hq, Tq_max, Tk_max, n, seed=3, scale_vals=0.5)
    ev = bias.entry_values()
    out, lse, flags = ka.flash_fwd(q, k, v, bias, ev, causal=causal, scale=0.25, alpha=1.0, return_flags=True)
    assert flags.sum() == 0
    assert ka.cancelling_rows(q, k, lse, bias, ev, causal=causal, scale=0.25, alpha=1.0).sum() == 0
    _, _, flags0 = ka.flash_fwd(q, k, v, None, causal=causal, scale=0.25, alpha=1.0, return_flags=True)
    assert flags0.shape == (B, Hq, Tq) and flags0.sum() == 0


def test_autotune_config_slice(knobs):
    """attn_config_slice (k, n) (compiling ahead in n processes) keeps every n-th config that fits
    from the k-th; n slices together cover every config once; bad values name the setting."""
    import triton
    knobs(attn_config_slice=(1, 3))
    assert settings.current().attn_config_slice == (1, 3)
    for bad in ((3, 3), "x", (1, 0), (-1, 2)):
        with pytest.raises(ValueError, match="attn_config_slice"):
            settings.configure(settings.KernelSettings(attn_config_slice=bad))
    assert settings.current().attn_config_slice == (1, 3)      # a rejected value changes nothing
    configs = [triton.Config({"BLOCK_M": 16 * (i + 1), "BLOCK_N": 16}, num_warps=4, num_stages=1) for i in range(7)]
    knobs(attn_tune=True)
    parts = []
    for k in range(3):
        knobs(attn_config_slice=(k, 3))
        parts.append(kcfg._prune(configs, 64, 2, lambda c: 0))
    assert sorted((c.kwargs["BLOCK_M"] for p in parts for c in p)) == [c.kwargs["BLOCK_M"] for c in configs]
    knobs(attn_config_slice=None)
    assert kcfg._prune(configs, 64, 2, lambda c: 0) == configs


@pytest.mark.parametrize("tma", ["0", "1"])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[5]])
def test_flash_pointer_and_tma_paths_match_oracle(case, tma, knobs):
    """The dense loops' tiles by pointer loads (attn_tma="0") and by TMA descriptors
    (=1; rows past Tq / Tk come back as zeros): both match the oracle, masked rows included."""
    knobs(attn_tma=tma)
    B, Hq, Hkv, Tq, Tk, D, causal, n, Tq_max, Tk_max = case
    scale, alpha = 1.0 / math.sqrt(D), 0.7
    q, k, v, do = make_tensors(B, Hq, Hkv, Tq, Tk, D, torch.float16, seed=n + Tq + 1)
    assert kcfg.use_tma(q, k, v, do) == (tma == "1")
    bias, coo = make_bias(Hq, Tq_max, Tk_max, n, seed=Tk + 1, scale_vals=2.0)
    ev = bias.entry_values()
    out, lse = ka.flash_fwd(q, k, v, bias, ev, causal=causal, scale=scale, alpha=alpha)
    dq, dk, dv, _ = ka.flash_bwd(q, k, v, out, lse, do, bias, ev, causal=causal, scale=scale, alpha=alpha,
                                 need_dvalues=False)
    r_out, _, r_dq, r_dk, r_dv, _ = oracle_kernels(q, k, v, do, coo, Hq, causal, scale, alpha)
    for got, want in ((out, r_out), (dq, r_dq), (dk, r_dk), (dv, r_dv)):
        assert rel(got, want) < TOL[torch.float16]


def test_tma_config_pruning(monkeypatch, knobs):
    """TMA configs run only with descriptors; attn_tma "0" / "1" / "auto" keeps pointer / TMA /
    both kinds (the interpreter then runs the first)."""
    import triton
    from triton.tools.tensor_descriptor import TensorDescriptor
    configs = [triton.Config({"USE_DESC": d, "BLOCK_M": m}, num_warps=4, num_stages=1)
               for d in (True, False) for m in (16, 32)]
    desc = TensorDescriptor(torch.zeros(1, 1, 16, 16), [1, 1, 16, 16], [256, 256, 16, 1], [1, 1, 16, 16])
    plain = torch.zeros(1)
    monkeypatch.setattr(kcfg, "INTERPRET", False)
    for mode, with_desc, want in (("auto", True, [True, True, False, False]), ("1", True, [True, True]),
                                  ("0", True, [False, False]), ("auto", False, [False, False]),
                                  ("1", False, [False, False])):
        knobs(attn_tma=mode)
        kept = kcfg._prune_tma(configs, desc if with_desc else plain)
        assert [c.kwargs["USE_DESC"] for c in kept] == want, (mode, with_desc)
