"""The CMS time loop (SPEC 13) as one Triton program per (batch row) of one level, forward and backward.

Design
------
Per level the module computes every per-step input that does not depend on the level's own state
with batched GEMMs outside the loop (query q_t [dk], write key k_t [dk], write value v_t [d], gate
g_t), so the loop itself is a pure scan over the state (reference: memtrace/reference/cms.py):

    alpha = softmax(K q * s)   c = alpha^T M   w = softmax(K k * s) | onehot(argmin u) | mix
    M = a M + g w v^T          K = a K + g w k^T       u = a u + alpha + g w      (a = 1 - decay)

One program owns one batch row of one level (grid (B,)) and holds M [N, d], K [N, dk] and u [N]
in registers for all T steps: HBM sees the state once in, once out, plus the per-step vectors.
Every reduction is over slots or columns inside the program (tl.sum/max/argmin over registers; no
tl.dot: the per-step products are matrix-vector and the update is rank 1).

Forward (`cms_scan_fwd`): when `chunk` > 0 it also stores the state at the start of every chunk of
`chunk` steps (checkpoints, [B, ceil(T/chunk), ...]).
Backward (`cms_scan_bwd`): reverse over chunks; per chunk it recomputes the chunk's pre-step states
from its checkpoint into a per-program scratch [B, chunk, ...] (global memory, L2-resident), then
walks the chunk backwards with dM [N, d], dK [N, dk] in registers. The backward of one step:

    dM_prev = a dM + alpha dc^T                          dalpha = M dc
    dw = g (dM v + dK k)   dg = w . (dM v + dK k)        dv = g dM^T w     dk = g dK^T w
    content: dsw = w (dw - w.dw) (x h for hybrid): dK_prev += s dsw k^T, dk += s K^T dsw
    dsr = alpha (dalpha - alpha.dalpha): dK_prev += a dK + s dsr q^T, dq = s K^T dsr

(argmin is piecewise constant: no gradient through the usage; u is bookkeeping).
Memory: checkpoints B ceil(T/C) N (d + dk + 1) + scratch B C N (d + dk + 1) words; with C ~ sqrt(T)
that is ~2 sqrt(T) states per row, against the T saved states of the eager loop's autograd.

Counts (per batch row, per level, per step; fp32 words w = 4 bytes)
------------------------------------------------------------------
FLOPs, forward: scores K q and K k 4 N dk; read alpha^T M 2 N d; softmaxes ~10 N;
update M 4 N d (a M + (g w) v^T: 1 mul + 1 fma per element + the g w scale), update K 4 N dk.
    F_fwd ~ N (8 dk + 6 d + 10)
Backward: recompute the forward step (F_fwd, once in the chunk replay) + the step backward
(dM v, dK k 2 N (d + dk); dM^T w, dK^T w 2 N (d + dk); M dc 2 N d; K^T dsr, K^T dsw 4 N dk;
dM, dK updates 4 N d + 6 N dk) ~ N (10 d + 16 dk), plus the scores again: F_bwd ~ F_fwd + N (10 d + 20 dk).
HBM bytes (the bound the benchmark compares against), per batch row and level over T steps:
    forward  : T (2 dk + 2 d + 1) w   (q, k, v, g in; c out)  +  2 N (d + dk + 1) w  (state in and out)
               + ceil(T/C) N (d + dk + 1) w (checkpoints)
    backward : T (2 dk + 2 d + 1) w  (q, k, v, g, dc in)  + T (2 dk + d + 1) w  (dq, dk, dv, dg out)
               + ceil(T/C) N (d + dk + 1) w (checkpoints in) + 2 T N (d + dk + 1) w (scratch write + read)
               + 4 N (d + dk) w (dM_T, dK_T in; dM_0, dK_0 out)
The scratch traffic dominates the backward (it stays in L2 when B C N (d + dk) w fits in 50 MB);
`scan_counts` returns these numbers for the benchmark.

Limits
------
The register file of one SM holds 64 K words. The state is on chip when N (d + dk + 1) stays under
~16 K words forward and ~8 K backward (it also carries dM, dK): the seed's (64, 64) level with dk 64
fits both ways; (256, 128) fits forward at 16 warps only and spills backward; (1024, 256) (320 K
words, 1.3 MB) spills to local memory (L1/L2) in both: correct, not on chip. Holding the big levels
on chip needs the slots split over several programs with a per-step cross-program reduction of the
two softmaxes (thread-block clusters / DSMEM: not expressible in Triton here) or bf16 state; left
for the GPU session to measure against this design.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRET

MODES = {"content": 0, "lru": 1, "hybrid": 2}


@triton.jit
def _layout(N, D, DK, BN: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr):
    """Slot / column / key-column indices, their masks and the state's element offsets."""
    n = tl.arange(0, BN)
    d = tl.arange(0, BD)
    j = tl.arange(0, BK)
    nm, dm, jm = n < N, d < D, j < DK
    return (n, d, j, nm, dm, jm, nm[:, None] & dm[None, :], nm[:, None] & jm[None, :],
            n[:, None] * D + d[None, :], n[:, None] * DK + j[None, :])


@triton.jit
def _load_step(q_ptr, k_ptr, v_ptr, g_ptr, row, j, jm, d, dm, D, DK):
    """Step row's q, k [dk], v [d] and g."""
    qt = tl.load(q_ptr + row * DK + j, mask=jm, other=0.0)
    kt = tl.load(k_ptr + row * DK + j, mask=jm, other=0.0)
    vt = tl.load(v_ptr + row * D + d, mask=dm, other=0.0)
    return qt, kt, vt, tl.load(g_ptr + row)


@triton.jit
def _store_state(m_ptr, k_ptr, u_ptr, idx, M, K, u, N, D, DK, n, nm, md, mk, off_m, off_k):
    """Store one (M, K, u) at index idx of [.., N, D] / [.., N, DK] / [.., N] buffers."""
    tl.store(m_ptr + idx * N * D + off_m, M, mask=md)
    tl.store(k_ptr + idx * N * DK + off_k, K, mask=mk)
    tl.store(u_ptr + idx * N + n, u, mask=nm)


@triton.jit
def _load_state(m_ptr, k_ptr, u_ptr, idx, N, D, DK, n, nm, md, mk, off_m, off_k):
    M = tl.load(m_ptr + idx * N * D + off_m, mask=md, other=0.0)
    K = tl.load(k_ptr + idx * N * DK + off_k, mask=mk, other=0.0)
    return M, K, tl.load(u_ptr + idx * N + n, mask=nm, other=0.0)


@triton.jit
def _write(M, K, u, alpha, gw, vt, kt, a):
    """The jump map: M = a M + (g w) v^T, K = a K + (g w) k^T, u = a u + alpha + g w."""
    return a * M + gw[:, None] * vt[None, :], a * K + gw[:, None] * kt[None, :], a * u + alpha + gw


@triton.jit
def _lru_weights(u, nm, n):
    """one_hot(argmin u) over the real slots (ties: lowest slot)."""
    idx = tl.argmin(tl.where(nm, u, float("inf")), 0)
    return tl.where(n == idx, 1.0, 0.0)


@triton.jit
def _softmax_slots(s, nm):
    s = tl.where(nm, s, float("-inf"))
    p = tl.exp(s - tl.max(s, 0))
    return p / tl.sum(p, 0)


@triton.jit
def _step_weights(M, K, u, qt, kt, nm, n, scale, hybrid, MODE: tl.constexpr):
    """(alpha, w, w_content): read weights, write weights and the content part of w."""
    alpha = _softmax_slots(tl.sum(K * qt[None, :], 1) * scale, nm)
    if MODE == 1:
        wc = alpha * 0.0
        w = _lru_weights(u, nm, n)
    else:
        wc = _softmax_slots(tl.sum(K * kt[None, :], 1) * scale, nm)
        if MODE == 2:
            w = hybrid * wc + (1.0 - hybrid) * _lru_weights(u, nm, n)
        else:
            w = wc
    return alpha, w, wc


@triton.jit
def _cms_scan_fwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, m_ptr, kk_ptr, u_ptr, c_ptr,
                         ckm_ptr, ckk_ptr, cku_ptr,
                         p_ptr, T, N, D, DK, n_chunks, chunk,
                         MODE: tl.constexpr, SAVE: tl.constexpr,
                         BN: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr):
    # m_ptr, kk_ptr, u_ptr: the initial state on entry, the final state on exit (in place)
    b = tl.program_id(0).to(tl.int64)
    n, d, j, nm, dm, jm, md, mk, off_m, off_k = _layout(N, D, DK, BN, BD, BK)
    M, K, u = _load_state(m_ptr, kk_ptr, u_ptr, b, N, D, DK, n, nm, md, mk, off_m, off_k)
    decay, scale, hybrid = tl.load(p_ptr), tl.load(p_ptr + 1), tl.load(p_ptr + 2)   # in the state's dtype
    a = 1.0 - decay
    for t in range(0, T):
        if SAVE:
            if t % chunk == 0:
                ci = b * n_chunks + t // chunk
                _store_state(ckm_ptr, ckk_ptr, cku_ptr, ci, M, K, u, N, D, DK, n, nm, md, mk, off_m, off_k)
        row = b * T + t
        qt, kt, vt, gt = _load_step(q_ptr, k_ptr, v_ptr, g_ptr, row, j, jm, d, dm, D, DK)
        alpha, w, wc = _step_weights(M, K, u, qt, kt, nm, n, scale, hybrid, MODE)
        tl.store(c_ptr + row * D + d, tl.sum(alpha[:, None] * M, 0), mask=dm)
        M, K, u = _write(M, K, u, alpha, gt * w, vt, kt, a)
    _store_state(m_ptr, kk_ptr, u_ptr, b, M, K, u, N, D, DK, n, nm, md, mk, off_m, off_k)


@triton.jit
def _cms_scan_bwd_kernel(q_ptr, k_ptr, v_ptr, g_ptr, ckm_ptr, ckk_ptr, cku_ptr, sm_ptr, sk_ptr, su_ptr,
                         dc_ptr, dm_ptr, dkk_ptr, dq_ptr, dk_ptr, dv_ptr, dg_ptr,
                         p_ptr, T, N, D, DK, n_chunks, chunk,
                         MODE: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr):
    # dm_ptr, dkk_ptr: the gradient of the final state on entry, of the initial state on exit
    b = tl.program_id(0).to(tl.int64)
    n, d, j, nm, dm, jm, md, mk, off_m, off_k = _layout(N, D, DK, BN, BD, BK)
    dM = tl.load(dm_ptr + b * N * D + off_m, mask=md, other=0.0)
    dK = tl.load(dkk_ptr + b * N * DK + off_k, mask=mk, other=0.0)
    decay, scale, hybrid = tl.load(p_ptr), tl.load(p_ptr + 1), tl.load(p_ptr + 2)   # in the state's dtype
    a = 1.0 - decay
    for cr in range(0, n_chunks):
        ci = n_chunks - 1 - cr
        t0 = ci * chunk
        t1 = tl.minimum(t0 + chunk, T)
        cb = b * n_chunks + ci
        M, K, u = _load_state(ckm_ptr, ckk_ptr, cku_ptr, cb, N, D, DK, n, nm, md, mk, off_m, off_k)
        for t in range(t0, t1):          # replay: the pre-step states of the chunk into the scratch
            sb = b * chunk + (t - t0)
            _store_state(sm_ptr, sk_ptr, su_ptr, sb, M, K, u, N, D, DK, n, nm, md, mk, off_m, off_k)
            row = b * T + t
            qt, kt, vt, gt = _load_step(q_ptr, k_ptr, v_ptr, g_ptr, row, j, jm, d, dm, D, DK)
            alpha, w, wc = _step_weights(M, K, u, qt, kt, nm, n, scale, hybrid, MODE)
            M, K, u = _write(M, K, u, alpha, gt * w, vt, kt, a)
        for tr in range(0, t1 - t0):      # reverse through the chunk
            t = t1 - 1 - tr
            sb = b * chunk + (t - t0)
            M, K, u = _load_state(sm_ptr, sk_ptr, su_ptr, sb, N, D, DK, n, nm, md, mk, off_m, off_k)
            row = b * T + t
            qt, kt, vt, gt = _load_step(q_ptr, k_ptr, v_ptr, g_ptr, row, j, jm, d, dm, D, DK)
            dct = tl.load(dc_ptr + row * D + d, mask=dm, other=0.0)
            alpha, w, wc = _step_weights(M, K, u, qt, kt, nm, n, scale, hybrid, MODE)
            dMv = tl.sum(dM * vt[None, :], 1)
            dKk = tl.sum(dK * kt[None, :], 1)
            tl.store(dg_ptr + row, tl.sum(w * (dMv + dKk), 0))
            tl.store(dv_ptr + row * D + d, gt * tl.sum(w[:, None] * dM, 0), mask=dm)
            dkt = gt * tl.sum(w[:, None] * dK, 0)
            dalpha = tl.sum(M * dct[None, :], 1)
            dsr = alpha * (dalpha - tl.sum(alpha * dalpha, 0))
            tl.store(dq_ptr + row * DK + j, scale * tl.sum(dsr[:, None] * K, 0), mask=jm)
            dK_prev = a * dK + scale * dsr[:, None] * qt[None, :]
            if MODE != 1:
                dwc = gt * (dMv + dKk)
                if MODE == 2:
                    dwc = hybrid * dwc
                dsw = wc * (dwc - tl.sum(wc * dwc, 0))
                dkt += scale * tl.sum(dsw[:, None] * K, 0)
                dK_prev += scale * dsw[:, None] * kt[None, :]
            tl.store(dk_ptr + row * DK + j, dkt, mask=jm)
            dM = a * dM + alpha[:, None] * dct[None, :]
            dK = dK_prev
    tl.store(dm_ptr + b * N * D + off_m, dM, mask=md)
    tl.store(dkk_ptr + b * N * DK + off_k, dK, mask=mk)


def _params(decay, DK, hybrid, like):
    """[decay, 1/sqrt(dk), hybrid] in the state's dtype (a Python float argument would be fp32)."""
    return torch.tensor([float(decay), DK ** -0.5, float(hybrid)], dtype=like.dtype, device=like.device)


def _blocks(N, D, DK):
    return triton.next_power_of_2(N), triton.next_power_of_2(D), triton.next_power_of_2(DK)


def _num_warps(words):
    """Warps for a program carrying `words` state words: enough threads to keep them in registers."""
    if INTERPRET:
        return 1
    return 4 if words <= 4096 else 8 if words <= 16384 else 16


def default_chunk(T: int) -> int:
    """The checkpoint interval: ~sqrt(T) (checkpoints + scratch ~ 2 sqrt(T) states per row)."""
    return max(1, int(math.ceil(math.sqrt(T))))


def cms_scan_fwd(q, k, v, g, M, K, u, decay: float, mode: str = "content", hybrid: float = 0.5,
                 chunk: int = 0):
    """One level's T steps. q, k [B, T, dk], v [B, T, d], g [B, T]; M [B, N, d], K [B, N, dk],
    u [B, N] (all contiguous, one float dtype: float32, or float64 under the interpreter / for
    gradcheck). Returns (c [B, T, d], M, K, u, checkpoints or None); M, K, u are new tensors.
    chunk > 0 stores the checkpoints the backward needs."""
    B, T, DK = q.shape
    N, D = M.shape[1], M.shape[2]
    c = torch.empty(B, T, D, dtype=M.dtype, device=M.device)
    M, K, u = M.clone(), K.clone(), u.clone()
    save = chunk > 0
    n_chunks = triton.cdiv(T, chunk) if save else 1
    if save:
        ck = (torch.empty(B, n_chunks, N, D, dtype=M.dtype, device=M.device),
              torch.empty(B, n_chunks, N, DK, dtype=M.dtype, device=M.device),
              torch.empty(B, n_chunks, N, dtype=M.dtype, device=M.device))
    else:
        ck = (M, K, u)          # never written (SAVE=False)
    BN, BD, BK = _blocks(N, D, DK)
    _cms_scan_fwd_kernel[(B,)](q, k, v, g, M, K, u, c, *ck, _params(decay, DK, hybrid, M),
                               T, N, D, DK, n_chunks, max(chunk, 1), MODE=MODES[mode], SAVE=save,
                               BN=BN, BD=BD, BK=BK, num_warps=_num_warps(BN * (BD + BK)))
    return c, M, K, u, (ck if save else None)


def cms_scan_bwd(q, k, v, g, checkpoints, dc, dM, dK, decay: float, mode: str = "content",
                 hybrid: float = 0.5, chunk: int = 1):
    """Gradients of one level's scan: (dq, dk, dv, dg, dM_0, dK_0) from dc [B, T, d] and the
    gradients dM, dK of the final state (zeros when unused). checkpoints: cms_scan_fwd's."""
    B, T, DK = q.shape
    ckm, ckk, cku = checkpoints
    N, D = ckm.shape[2], ckm.shape[3]
    n_chunks = ckm.shape[1]
    dt, dev = ckm.dtype, ckm.device
    scratch = (torch.empty(B, chunk, N, D, dtype=dt, device=dev), torch.empty(B, chunk, N, DK, dtype=dt, device=dev),
               torch.empty(B, chunk, N, dtype=dt, device=dev))
    dM, dK = dM.clone(), dK.clone()
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    dv, dg = torch.empty_like(v), torch.empty_like(g)
    BN, BD, BK = _blocks(N, D, DK)
    _cms_scan_bwd_kernel[(B,)](q, k, v, g, ckm, ckk, cku, *scratch, dc, dM, dK, dq, dk, dv, dg,
                               _params(decay, DK, hybrid, ckm), T, N, D, DK, n_chunks, chunk,
                               MODE=MODES[mode], BN=BN, BD=BD, BK=BK, num_warps=_num_warps(2 * BN * (BD + BK)))
    return dq, dk, dv, dg, dM, dK


def scan_counts(B, T, N, D, DK, chunk=None, word=4):
    """{'flops_fwd', 'flops_bwd', 'bytes_fwd', 'bytes_bwd'} of one level's scan (module docstring)."""
    C = chunk or default_chunk(T)
    nc = -(-T // C)
    state = N * (D + DK + 1)
    f_fwd = N * (8 * DK + 6 * D + 10)
    f_bwd = f_fwd + N * (10 * D + 20 * DK)
    b_fwd = T * (2 * DK + 2 * D + 1) + 2 * state + nc * state
    b_bwd = T * (2 * DK + 2 * D + 1) + T * (2 * DK + D + 1) + nc * state + 2 * T * state + 4 * N * (D + DK)
    return {"flops_fwd": B * T * f_fwd, "flops_bwd": B * T * f_bwd,
            "bytes_fwd": B * b_fwd * word, "bytes_bwd": B * b_bwd * word}
