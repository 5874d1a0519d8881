"""Helpers shared by the test modules, each defined once (fixtures live in conftest.py).

`from _helpers import ...` works from every folder under tests/: pyproject.toml's
[tool.pytest.ini_options] puts tests/ on sys.path (pythonpath = ["tests"]).

- TOL: the SPEC 7 tolerance table (relative error against the float64 oracle, by dtype).
- rel_err: the relative error those tolerances bound.
- factories: make_inputs (the op's q, k, v, TraceBias, COO), make_tensors (q, k, v, dO),
  make_bias (TraceBias and its COO), fake_capture (a SalienceCapture-like edge buffer).
- oracles, float64 through memtrace.reference: oracle_attention (op outputs and gradients),
  oracle_kernels (out, lse, gradients, dense bias gradient), oracle_salience (out, lse, S, a).
- checks shared by several modules: check_capture, assert_state_equal, assert_index_equal, ...
"""
import importlib
import math
import os
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

import memtrace as mt
from memtrace import attention as A
from memtrace import reference as R
from memtrace.backends import base as backend_base

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# ---- SPEC 7 tolerances --------------------------------------------------------------------------

# Relative error (rel_err) against the float64 oracle. One table: the copies in the test modules
# all agreed where they overlapped (attention: all four dtypes; kernels, capture: fp32 / fp16;
# gpu: fp32 / fp16 / bf16). Bias values and their gradients are float32 whatever q's dtype.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2, torch.float64: 1e-7}


def interpreting():
    """TRITON_INTERPRET=1 now (read at each call: some modules set it when no GPU is present)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def rel_err(a, b, rms_floor=0.0, *, norm_floor=0.0):
    """||a - b|| / ||b|| in float64 on the CPU; a must be finite.

    rms_floor: tensors whose RMS is under it are compared absolutely at that scale (gradients that
    are ~0 in exact arithmetic; the kernel tests use 0.05). norm_floor: a floor on ||b|| itself
    (1e-30: an all-zero oracle makes any difference fail). With neither and b == 0: ||a - b||."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.isfinite(a).all(), "non-finite values"
    denom = max(b.norm().item(), rms_floor * math.sqrt(max(b.numel(), 1)), norm_floor)
    return ((a - b).norm() / denom).item() if denom > 0 else (a - b).norm().item()


# ---- input factories ----------------------------------------------------------------------------

def make_inputs(B, Hq, Hkv, Tq, Tk, D, dtype=torch.float32, *, n=24, seed=0, extra_len=3, value_scale=1.0,
                requires_grad=True, duplicates=True, out_of_range=True):
    """For memtrace.biased_attention: q, k, v and a TraceBias built for (Tq + extra_len,
    Tk + extra_len) with duplicates and entries past the call's lengths; returns
    (q, k, v, bias, coo), on the CPU."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype)
    Lq, Lk = Tq + extra_len, Tk + extra_len
    head = torch.randint(0, Hq, (n,), generator=g)
    q_idx = torch.randint(0, Lq if out_of_range else Tq, (n,), generator=g)
    k_idx = torch.randint(0, Lk if out_of_range else Tk, (n,), generator=g)
    if duplicates and n >= 6:
        head[-3:], q_idx[-3:], k_idx[-3:] = head[0], q_idx[0] % Tq, k_idx[0] % Tk
        q_idx[0], k_idx[0] = q_idx[0] % Tq, k_idx[0] % Tk
    # values in [-1, 2): signed, but above ln(CANCEL_THRESHOLD) so every backend takes them
    value = (value_scale * (3 * torch.rand(n, generator=g) - 1)).requires_grad_(requires_grad)
    bias = mt.TraceBias.from_coo(head, q_idx, k_idx, value, num_heads=Hq, seq_len_q=Lq, seq_len_k=Lk)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, bias, (head, q_idx, k_idx, value)


def make_tensors(B, Hq, Hkv, Tq, Tk, D, dtype, seed, qk_mult=1.0):
    """For the kernels and the capture: (q, k, v, dO) on DEV, q and k scaled by qk_mult."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, Tq, D, generator=g) * qk_mult).to(dtype).to(DEV)
    k = (torch.randn(B, Hkv, Tk, D, generator=g) * qk_mult).to(dtype).to(DEV)
    v = torch.randn(B, Hkv, Tk, D, generator=g).to(dtype).to(DEV)
    do = torch.randn(B, Hq, Tq, D, generator=g).to(dtype).to(DEV)
    return q, k, v, do


def make_bias(Hq, Tq_max, Tk_max, n, seed, *, scale_vals=1.0, dups=True, extra=None):
    """A TraceBias of n random entries (values randn * scale_vals; the last two repeat the first
    position when dups and n >= 4) plus the `extra` (h, i, j, val) entries, on DEV; returns
    (bias, coo) with coo on the CPU."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(0, Hq, (n,), generator=g)
    i = torch.randint(0, Tq_max, (n,), generator=g)
    j = torch.randint(0, Tk_max, (n,), generator=g)
    val = torch.randn(n, generator=g) * scale_vals
    if dups and n >= 4:
        h[-2:], i[-2:], j[-2:] = h[0], i[0], j[0]
    if extra is not None:
        eh, ei, ej, ev = extra
        h, i, j, val = torch.cat([h, eh]), torch.cat([i, ei]), torch.cat([j, ej]), torch.cat([val, ev])
    b = mt.TraceBias.from_coo(h.to(DEV), i.to(DEV), j.to(DEV), val.to(DEV), num_heads=Hq,
                              seq_len_q=Tq_max, seq_len_k=Tk_max)
    return b, (h, i, j, val)


# ---- float64 oracles (memtrace.reference) -------------------------------------------------------

def oracle_attention(q, k, v, coo, dout, *, causal, scale=None, alpha=1.0):
    """The op's outputs: (out, dq, dk, dv, dvalue) through plain autograd on a dense bias;
    dvalue is None without coo."""
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    dense = None
    val64 = None
    if coo is not None:
        head, q_idx, k_idx, value = coo
        val64 = value.detach().double().requires_grad_(True)
        dense = R.dense_bias(head, q_idx, k_idx, val64, q.shape[1], q.shape[2], k.shape[2])
    out = R.attention(q64, k64, v64, dense, causal=causal, scale=scale, alpha=alpha)
    inputs = [q64, k64, v64] + ([val64] if val64 is not None else [])
    grads = torch.autograd.grad(out, inputs, dout.double(), allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(inputs, grads)]
    return (out, *grads) if val64 is not None else (out, *grads, None)


def oracle_kernels(q, k, v, do, coo, Hq, causal, scale, alpha):
    """The kernels' outputs, on the CPU: out, lse, dq, dk, dv and the dense bias gradient
    [Hq, Tq, Tk] (alpha * sum_b dS)."""
    Tq, Tk = q.shape[2], k.shape[2]
    qd, kd, vd = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    if coo is None:
        dense = torch.zeros(Hq, Tq, Tk, dtype=torch.float64)
    else:
        h, i, j, val = coo
        dense = R.dense_bias(h, i, j, val, Hq, Tq, Tk)
    dense.requires_grad_()
    out, lse = R.attention_with_lse(qd, kd, vd, dense, causal=causal, scale=scale, alpha=alpha)
    out.backward(do.double().cpu())
    return out.detach(), lse.detach(), qd.grad, kd.grad, vd.grad, dense.grad


def expected_dvalues(bias, dense_grad):
    """dvalues per sorted entry: the dense gradient at the entry for leaders inside the call's
    (Tq, Tk), 0 for duplicate followers and entries outside."""
    eh, ei, ej = (t.cpu() for t in bias.entry_coords())
    Hq, Tq, Tk = dense_grad.shape
    inside = (ei < Tq) & (ej < Tk)
    out = torch.zeros(bias.nnz, dtype=torch.float64)
    out[inside] = dense_grad[eh[inside], ei[inside], ej[inside]]
    pos = bias.entry_pos.cpu()
    follower = torch.zeros(bias.nnz, dtype=torch.bool)
    if bias.nnz > 1:
        follower[1:] = (pos[1:] == pos[:-1]) & (eh[1:] == eh[:-1])
    out[follower] = 0
    return out


def oracle_salience(q, k, v, do, bias, causal, scale=None, alpha=1.0):
    """(out, lse, S, a) in float64 from the same inputs (SPEC 3)."""
    Hq, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    dense = None
    if bias is not None:
        dense = R.dense_bias(bias.head, bias.q_idx, bias.k_idx, bias.value, Hq, Tq, Tk)
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, do))
    out, lse = R.attention_with_lse(q64, k64, v64, dense, causal=causal, scale=scale, alpha=alpha)
    S, a = R.salience(q64, k64, v64, do64, dense, causal=causal, scale=scale, alpha=alpha)
    return out, lse, S, a


# ---- the attention op ---------------------------------------------------------------------------

def run_and_grad(q, k, v, bias, dout, **kw):
    """mt.biased_attention forward and backward: (out, dq, dk, dv, dvalue or None)."""
    for t in (q, k, v):
        t.grad = None
    if bias is not None and bias.value.requires_grad:
        bias.value.grad = None
    out = mt.biased_attention(q, k, v, bias, **kw)
    out.backward(dout)
    dval = bias.value.grad if bias is not None and bias.value.requires_grad else None
    return out, q.grad, k.grad, v.grad, dval


class CorrectedReferenceBackend(backend_base.CorrectedDenseBackend):
    """CPU stand-in for "cudnn"/"flash": unbiased reference attention + kernels/attention/correct_*.py
    (runs under the Triton interpreter), exercising the corrected-dense code path of the op."""

    name = "corrected_cpu"
    dtypes = (torch.float16, torch.float32)

    def not_supported_reasons(self, call):
        if not interpreting():
            return ["needs TRITON_INTERPRET=1"]
        err = backend_base.attention_kernels()[1]
        return [err] if err else self.correction_reasons(call)

    def dense_forward(self, q, k, v, *, causal, scale):
        return A.get_backend("reference").forward(q, k, v, None, None, causal=causal, scale=scale, alpha=1.0)

    def dense_backward(self, q, k, v, out, lse, dout, *, causal, scale):
        # the dense backward "fed O', LSE'": P = exp(s - LSE'), D = rowsum(dO * O')
        from memtrace.reference.attention import _expand_kv, logits_of
        Hq, Hkv = q.shape[1], k.shape[1]
        qd, kd, vd, od, dod = (t.double() for t in (q, k, v, out, dout))
        s = logits_of(qd, kd, None, causal=causal, scale=scale)
        lse_d = lse.double()
        lse_safe = torch.where(torch.isfinite(lse_d), lse_d, torch.zeros_like(lse_d))
        p = torch.exp(s - lse_safe[..., None])
        p = torch.where(torch.isfinite(lse_d)[..., None], p, torch.zeros_like(p))
        ve, ke = _expand_kv(vd, Hq), _expand_kv(kd, Hq)
        dp = dod @ ve.transpose(-1, -2)
        ds = p * (dp - (dod * od).sum(-1, keepdim=True))
        dq = scale * ds @ ke
        group = lambda t: t.reshape(t.shape[0], Hkv, Hq // Hkv, *t.shape[2:]).sum(2)  # noqa: E731
        dk = group(scale * ds.transpose(-1, -2) @ qd)
        dv = group(p.transpose(-1, -2) @ dod)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ---- salience capture ---------------------------------------------------------------------------

MARGIN = 1e-4     # relative band around the threshold where float32 rounding may decide


def entry_mask(bias, S):
    """[H, Tq, Tk] bool: the positions of bias entries inside S."""
    mask = torch.zeros_like(S, dtype=torch.bool)
    if bias is not None:
        Tq, Tk = S.shape[1], S.shape[2]
        inside = (bias.q_idx < Tq) & (bias.k_idx < Tk)
        mask[bias.head[inside], bias.q_idx[inside], bias.k_idx[inside]] = True
    return mask


def quantile_threshold(S, q):
    return float(torch.quantile(S.flatten().float().cpu(), q))


def check_capture(cap, S, a, bias, threshold, dtype):
    """Edges: unique, sorted, no bias entry, values match, exactly the reference's threshold set
    (outside a MARGIN band); bias scores match at every COO entry."""
    rel = lambda got, ref: rel_err(got, ref, norm_floor=1e-30)  # noqa: E731
    n = int(cap.num_edges)
    assert cap.num_edges.dtype == torch.int32 and cap.num_edges.dim() == 0
    assert 0 <= n <= cap.capacity
    for t in cap.edges:
        assert t.shape == (cap.capacity,)
        assert torch.all(t[n:] == 0), "slots past num_edges must be zero"
    assert [t.dtype for t in cap.edges] == [torch.int32] * 3 + [torch.float32] * 2
    h, i, j = (t[:n].long() for t in cap.edges[:3])
    s, aa = cap.edges[3][:n], cap.edges[4][:n]
    Tq, Tk = S.shape[1], S.shape[2]
    key = (h * Tq + i) * Tk + j
    assert torch.all(key[1:] > key[:-1]), "edges must be unique and sorted by (head, q, k)"
    ent = entry_mask(bias, S)
    assert not ent[h, i, j].any(), "bias entries belong to bias_scores, not to the edges"
    if n:
        assert rel(s, S[h, i, j]) < TOL[dtype]
        assert rel(aa, a[h, i, j]) < TOL[dtype]
    assert torch.isfinite(s).all() and torch.isfinite(aa).all()
    emitted = torch.zeros_like(ent)
    emitted[h, i, j] = True
    sure_in = (S > threshold * (1 + MARGIN) + 1e-9) & ~ent
    sure_out = (S <= threshold * (1 - MARGIN)) | ent
    if not bool(cap.stats["overflow"]):
        assert torch.all(emitted[sure_in]), "an edge over the threshold is missing"
        lo = int(sure_in.sum())
        hi = int(((S > threshold * (1 - MARGIN)) & ~ent).sum())
        assert lo <= int(cap.stats["num_candidates"]) <= hi
    assert not torch.any(emitted & sure_out), "an edge at or under the threshold was emitted"
    if bias is None:
        assert cap.bias_scores is None
    else:
        bS, ba = cap.bias_scores
        assert bS.shape == (bias.nnz,) and ba.shape == (bias.nnz,)
        inside = (bias.q_idx < Tq) & (bias.k_idx < Tk)
        hh, ii, jj = bias.head, bias.q_idx.clamp(max=Tq - 1), bias.k_idx.clamp(max=Tk - 1)
        zero = torch.zeros((), dtype=S.dtype, device=S.device)
        refS = torch.where(inside, S[hh, ii, jj], zero)
        refa = torch.where(inside, a[hh, ii, jj], zero)
        if refS.abs().sum() > 0:
            assert rel(bS, refS) < TOL[dtype]
            assert rel(ba, refa) < TOL[dtype]
        assert torch.all(bS[~inside] == 0) and torch.all(ba[~inside] == 0)
        assert torch.isfinite(bS).all() and torch.isfinite(ba).all()


# ---- TraceMemory --------------------------------------------------------------------------------

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
    """A TraceMemory's update parameters, as memtrace.reference.trace_update takes them."""
    return dict(quota=mem.quota, retention=mem.retention, decay=mem.decay, threshold=mem.threshold,
                prune_eps=mem.prune_eps, attn_eps=mem.attn_eps, window=mem.window)


def assert_state_equal(got, ref, msg=""):
    """Two memory states: positions, ages and histories equal, strengths to 1e-6 relative."""
    for key in ("head", "q_idx", "k_idx", "age", "hist"):
        assert torch.equal(got[key], ref[key]), f"{msg} {key}: {got[key].tolist()} != {ref[key].tolist()}"
    torch.testing.assert_close(got["strength"], ref["strength"], rtol=1e-6, atol=0, msg=msg)


def candidates_of(S, a, coords):
    """Candidate edges (h, i, j, S, a) at the sorted, unique coords of dense S and a."""
    coords = sorted(set(coords))
    if not coords:
        z = torch.zeros(0, dtype=torch.long)
        return z, z, z, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    h, i, j = (torch.tensor(c, dtype=torch.long) for c in zip(*coords))
    return h, i, j, S[h, i, j].double(), a[h, i, j].double()


# ---- kernels/bias_index.py ----------------------------------------------------------------------

def bias_index_module():
    """kernels/bias_index; on the CPU its kernels are made interpreted ones by importing the
    module with TRITON_INTERPRET=1, set only for that import (setting it for the whole session
    would change what other test modules see)."""
    name = "memtrace.kernels.bias_index"
    if DEV == "cuda":
        return importlib.import_module(name)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        mod = importlib.import_module(name)
        if type(mod._keys_kernel).__name__ != "InterpretedFunction":
            mod = importlib.reload(mod)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    assert type(mod._keys_kernel).__name__ == "InterpretedFunction"
    return mod


INDEX_FIELDS = ("entry_pos", "src_entry", "k_order", "q_offsets", "k_offsets")


def assert_index_equal(got, want):
    """Two bias indexes (build_index's five int32 tensors), field by field, bit for bit."""
    for name, a, b in zip(INDEX_FIELDS, got, want):
        assert a.dtype == b.dtype == torch.int32, name
        assert a.device == b.device, name
        assert a.shape == b.shape, name
        assert torch.equal(a, b), name


# ---- kernels/launch.py --------------------------------------------------------------------------

def launch_probe_py(X, Y, n, m, f, flag, NONE, BLOCK: tl.constexpr):
    """A small kernel of every argument kind FastLaunch keys on (pointer, ints, float, bool, None)."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0)
    tl.store(Y + offs, x * f + m, mask=offs < n)


launch_probe = triton.jit(launch_probe_py)      # interpreted under TRITON_INTERPRET=1

