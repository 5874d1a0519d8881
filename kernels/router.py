"""mt.nn.StatefulRouter's route as two launches: the fused route kernel and a one-program state update.

Design
------
The router (SPEC 14, reference: memtrace/reference/stateful_router.py) scores token q against unit u as

    R(q, u) = alpha q.e_u + beta exp(-decay (t - t_last(u))) [t_last(u) >= 0] + gamma log(1 + n_act(u))
              [+ balance importance(u) (1 - n_act(u) / max(1, max_i n_act(i)))]

then takes the top-k per token and a softmax over the selected scores. Everything after q.e_u is one
number per unit, so the whole route is one GEMM [N, D] x [D, U] with a per-column epilogue.

`_route_kernel` (grid: one program per BLOCK_M tokens) accumulates x_blk @ units^T in fp32 with
tl.dot over BLOCK_D columns at a time (units cast to x's dtype first, as the PyTorch path does),
computes the per-unit state term from the state buffers (t, t_last, n_act, importance: read in the
kernel, so the host never reads t), selects k times the row maximum, the first (lowest) unit index
attaining it, masks it to -inf, and stores the indices (int64), the softmax weights over the k
selected scores (x's dtype), and, when the state is to be updated, adds the block's per-unit
selection counts to an int32 counts buffer with one atomic per (program, selected unit).
`_update_kernel` (one program) turns the counts into the new state: t_last(u) = t where selected,
n_act += counts, the selection entropy and its alert, t += 1, and zeroes the counts for the next
call (the buffer is zero between calls: no memset launch).

Scores are fp32 whatever x's dtype: the PyTorch path rounds R to x's dtype op by op, so at fp16 /
bf16 the two can pick different units where scores are within that rounding of each other. Exact
ties go to the lowest unit index here (torch.topk promises no order among ties). log(1 + n) stands
in for log1p(n): n_act holds counts, for which 1 + n is exact in fp32 below 2^24.

Counts (the benchmark's bound): N = 16384 tokens, D = 1024, U = 64 units, k = 2, bf16
-------------------------------------------------------------------------------------
HBM bytes: x 2 N D = 33,554,432 (32 MiB); units 2 U D = 131,072 once (each program re-reads them
from L2: N / BLOCK_M x 128 KiB = 32 MiB of L2 traffic at BLOCK_M 64); indices 8 N k = 262,144;
weights 2 N k = 65,536; state and counts < 1 KiB. Total ~34.0 MB: 10.1 us at the H100 SXM's 3.35
TB/s, ~11 us at the ~90% a streaming kernel reaches. FLOPs: 2 N D U = 2.15 GFLOP of GEMM (2.2 us at
989 dense bf16 TFLOPS; U = 8 pads to 16 columns, the tile minimum, and stays far under the
bandwidth time) plus ~4 k N U for the selection. So the route is bound by reading x once: ~10 us
at every U in 8..64. The linear top-k gate reads the same 32 MiB in its GEMM and then launches
topk, gather and softmax over the [N, U] logits (4 kernels); the fused route is 2 launches (this
kernel + the ~2-3 us one-program update), so it should sit under the gate, not at 1.1x of it.
`route_counts` returns these numbers.

Limits: U <= MAX_UNITS (the [BLOCK_M, U] score tile lives in registers), k <= MAX_K (the selection
is unrolled k times), N k < 2^31 (int32 counts); x fp16, bf16 or fp32. Outside them
StatefulRouter takes its PyTorch path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import settings
from ._common import INTERPRET, dot_precision
from .launch import FastLaunch

MAX_UNITS = 256
MAX_K = 16
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# (BLOCK_M, BLOCK_D, num_warps, num_stages) on the GPU, a first guess for the H100 (not yet swept);
# settings router_config overrides it (MEMTRACE_ROUTER_CONFIG).
ROUTE_CONFIG = (64, 128, 4, 3)
SMEM_BUDGET = 160 * 1024    # the x and units tiles of all stages (the H100 has 227 KiB per block)


@triton.jit
def _state_term(t_ptr, t_last_ptr, n_act_ptr, imp_ptr, u, um, beta, gamma, decay, balance,
                HAS_BETA: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BAL: tl.constexpr):
    """The per-unit part of R [BU] (fp32; 0 on padded units)."""
    term = tl.zeros(u.shape, dtype=tl.float32)
    if HAS_BETA:
        last = tl.load(t_last_ptr + u, mask=um, other=-1)
        age = (tl.load(t_ptr) - last).to(tl.float32)
        term += beta * tl.where(last >= 0, tl.exp(-decay * age), 0.0)
    if HAS_GAMMA or HAS_BAL:
        n = tl.load(n_act_ptr + u, mask=um, other=0.0).to(tl.float32)
        if HAS_GAMMA:
            term += gamma * tl.log(1.0 + n)
        if HAS_BAL:
            imp = tl.load(imp_ptr + u, mask=um, other=0.0).to(tl.float32)
            term += balance * imp * (1.0 - n / tl.maximum(tl.max(n, 0), 1.0))
    return term


@triton.jit
def _route_kernel(x_ptr, u_ptr, t_ptr, t_last_ptr, n_act_ptr, imp_ptr, idx_ptr, w_ptr, counts_ptr,
                  N, U, D, sxm, sxd, sum_, sud, alpha, beta, gamma, decay, balance,
                  K: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr, BU: tl.constexpr,
                  BLOCK_D: tl.constexpr, HAS_BETA: tl.constexpr, HAS_GAMMA: tl.constexpr,
                  HAS_BAL: tl.constexpr, COUNT: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < N
    u = tl.arange(0, BU)
    um = u < U
    d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BU), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dm = (d0 + d) < D
        xb = tl.load(x_ptr + rows[:, None] * sxm + (d0 + d)[None, :] * sxd, mask=rm[:, None] & dm[None, :], other=0.0)
        ub = tl.load(u_ptr + u[:, None] * sum_ + (d0 + d)[None, :] * sud, mask=um[:, None] & dm[None, :], other=0.0)
        acc = tl.dot(xb, tl.trans(ub.to(xb.dtype)), acc, input_precision=DOT_PREC)
    term = _state_term(t_ptr, t_last_ptr, n_act_ptr, imp_ptr, u, um, beta, gamma, decay, balance,
                       HAS_BETA, HAS_GAMMA, HAS_BAL)
    s = tl.where(um[None, :], alpha * acc + term[None, :], float("-inf"))
    kc = tl.arange(0, KP)
    sel_idx = tl.zeros((BLOCK_M, KP), dtype=tl.int64)
    sel_e = tl.zeros((BLOCK_M, KP), dtype=tl.float32)
    cnt = tl.zeros((BU,), dtype=tl.int32)
    top = tl.max(s, 1)
    for j in tl.static_range(K):
        m = tl.max(s, 1)
        # first index at the maximum: ties go to the lowest unit; the clamp keeps a NaN row in range
        i = tl.minimum(tl.min(tl.where(s == m[:, None], u[None, :], BU), 1), U - 1)
        hit = u[None, :] == i[:, None]
        s = tl.where(hit, float("-inf"), s)
        sel_idx = tl.where(kc[None, :] == j, i[:, None].to(tl.int64), sel_idx)
        sel_e = tl.where(kc[None, :] == j, tl.exp(m - top)[:, None], sel_e)
        if COUNT:
            cnt += tl.sum((hit & rm[:, None]).to(tl.int32), 0)
    w = sel_e / tl.sum(sel_e, 1)[:, None]
    off = rows[:, None] * K + kc[None, :]
    om = rm[:, None] & (kc[None, :] < K)
    tl.store(idx_ptr + off, sel_idx, mask=om)
    tl.store(w_ptr + off, w.to(w_ptr.dtype.element_ty), mask=om)
    if COUNT:
        tl.atomic_add(counts_ptr + u, cnt, mask=um & (cnt > 0))


@triton.jit
def _update_kernel(counts_ptr, t_ptr, t_last_ptr, n_act_ptr, ent_ptr, alert_ptr, threshold, U,
                   HAS_THRESHOLD: tl.constexpr, BU: tl.constexpr):
    u = tl.arange(0, BU)
    um = u < U
    c = tl.load(counts_ptr + u, mask=um, other=0)
    t = tl.load(t_ptr)
    last = tl.load(t_last_ptr + u, mask=um, other=-1)
    tl.store(t_last_ptr + u, tl.where(c > 0, t, last), mask=um)
    n = tl.load(n_act_ptr + u, mask=um, other=0.0)
    tl.store(n_act_ptr + u, n + c.to(n.dtype), mask=um)
    p = c.to(tl.float32) / tl.maximum(tl.sum(c, 0), 1).to(tl.float32)
    h = -tl.sum(p * tl.log(tl.maximum(p, 1e-30)), 0)
    tl.store(ent_ptr, h.to(ent_ptr.dtype.element_ty))
    if HAS_THRESHOLD:
        tl.store(alert_ptr, (h < threshold).to(tl.uint8))
    tl.store(t_ptr, t + 1)
    tl.store(counts_ptr + u, tl.zeros_like(c), mask=um)      # zero for the next call


# both launch on every router call: skip Triton's per-call dispatch after the first (kernels/launch.py)
_ROUTE = FastLaunch(_route_kernel)
_UPDATE = FastLaunch(_update_kernel)


def supports(x, units, k) -> bool:
    """Whether the kernels take this call (else the PyTorch path): the limits in the module docstring."""
    return (x.dtype in DTYPES and units.dtype in DTYPES and units.shape[0] <= MAX_UNITS and k <= MAX_K
            and x.shape[0] * k < 2**31)


def _config():
    if INTERPRET:
        return 16, 16, 1, 1
    return settings.current().router_config or ROUTE_CONFIG


def route(x, units, t, t_last, n_act, importance, k, counts=None, *, alpha=1.0, beta=0.0, gamma=0.0, decay=0.1,
          balance=0.0):
    """(weights [N, k] in x's dtype, indices [N, k] int64) of the route of x [N, D] over units [U, D]
    (any strides) with the state t (int64 0-d), t_last (int64 [U]), n_act, importance ([U], float).
    counts: int32 [U], zero on entry, or None: the selection counts are added to it."""
    N, D = x.shape
    U = units.shape[0]
    block_m, block_d, num_warps, num_stages = _config()
    BU = max(16, triton.next_power_of_2(U))
    block_d = min(block_d, max(16, triton.next_power_of_2(D)))
    elem = max(x.element_size(), units.element_size())
    if BU >= 128:
        num_warps = max(num_warps, 8)   # the [BLOCK_M, BU] score tile over more threads (4 warps spill at 256)
    while block_d > 16 and num_stages * (block_m + BU) * block_d * elem > SMEM_BUDGET:
        block_d //= 2           # many units: narrower column blocks keep the pipelined tiles in shared memory
    idx = torch.empty(N, k, dtype=torch.int64, device=x.device)
    w = torch.empty(N, k, dtype=x.dtype, device=x.device)
    count = counts is not None
    prec = dot_precision(x.dtype, torch.get_float32_matmul_precision() != "highest")
    _ROUTE[(max(1, triton.cdiv(N, block_m)),)](
        x, units, t, t_last, n_act, importance, idx, w, counts if count else idx,
        N, U, D, x.stride(0), x.stride(1), units.stride(0), units.stride(1),
        float(alpha), float(beta), float(gamma), float(decay), float(balance),
        K=k, KP=triton.next_power_of_2(k), BLOCK_M=block_m, BU=BU, BLOCK_D=block_d,
        HAS_BETA=bool(beta), HAS_GAMMA=bool(gamma), HAS_BAL=bool(balance), COUNT=count, DOT_PREC=prec,
        num_warps=num_warps, num_stages=num_stages)
    return w, idx


def update_state(counts, t, t_last, n_act, selection_entropy, entropy_alert, threshold=None):
    """Apply route's counts to the state in place (t_last, n_act, selection_entropy, entropy_alert
    when threshold is not None, t += 1) and zero the counts."""
    U = counts.shape[0]
    _UPDATE[(1,)](counts, t, t_last, n_act, selection_entropy, entropy_alert.view(torch.uint8),
                  0.0 if threshold is None else float(threshold), U,
                  HAS_THRESHOLD=threshold is not None, BU=max(16, triton.next_power_of_2(U)),
                  num_warps=1 if INTERPRET else 4)


def route_counts(N, D, U, k, elem=2, block_m=ROUTE_CONFIG[0]):
    """{'flops', 'bytes', 'l2_bytes'} of one route (module docstring): HBM bytes, and the units'
    re-reads from L2."""
    return {"flops": 2 * N * D * U + 4 * k * N * U,
            "bytes": elem * N * D + elem * U * D + 8 * N * k + elem * N * k + 4 * 4 * U,
            "l2_bytes": -(-N // block_m) * elem * U * D}
