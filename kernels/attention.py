"""Flash attention in Triton with the sparse trace-bias correction fused into the epilogues.

    logits = scale * q k^T + alpha * M     (M a memtrace.bias.TraceBias; causal bottom-right)
    out = softmax(logits) v,  lse = logsumexp(logits)  (natural log; -inf and out 0 when masked)

The dense loops never look at the bias (a tile loop with bias work inside fell from 478 to 251
TFLOP/s): the forward runs plain flash attention over its row block, then folds in the entries of
those rows with the exact identity of kernels/correction.py. The backward is the standard flash
backward fed O', LSE' plus the entry terms, in the epilogue of the dQ program (by query block,
also dvalues) and of the dK/dV program (by key block, all GQA heads of the kv head, so no
atomics); with dense biases s and dP there are per-entry row dots of gathered rows and only the
scatter into the block is a (one-hot) dot (BWD_ENTRIES below). When no row can cancel (may_cancel=False, e.g.
non-negative traces) the backward runs no cancelling-row work at all.

Layouts: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] (any strides, unit stride along D is made if
missing), Hq % Hkv == 0, query head h reads kv head h // (Hq // Hkv). D in 16..256 (powers of 2).

Dense tiles come by TMA (host descriptors over the 4-D tensors) or by pointer loads, per autotune
config (USE_DESC): on the H100 TMA lost without a bias and won with many entries
(benchmarks/notes_attention.md, session 6); MEMTRACE_ATTN_TMA=0 / 1 forces one form.

On sm_90, non-causal fp16/bf16 calls with contiguous inputs and Tk % 128 == 0 take another
forward (WS below): a dense kernel whose key loop Triton's Hopper pass warp-specializes (544
against ~470 TFLOP/s), then the bias through correction.correct_fwd, in place; the backward is
the same for both forwards.

Cancellation: where the corrected normaliser 1 + sum w of a row falls under
CANCEL_THRESHOLD ("cancelling" rows), a second launch recomputes those rows with the bias applied
inside the tile loop (skipped when no row can cancel), so out and lse stay accurate; the forward
records the rows in an int8 [B, Hq, Tq] flag tensor (flash_fwd(return_flags=True) returns it).
The backward takes those rows out of the fast path and recomputes them exactly
(kernels/correction.py, "cancelling rows"): the preprocess writes lse2 = +inf on flagged rows,
so the dense loops and the entry epilogues see P = 0 there (the same mechanism that drops fully
masked rows: no new work in any loop), and two slow-path launches (_exact_rows_q_kernel,
_exact_rows_kv_kernel) rebuild their dQ, dvalues and dK/dV terms with the bias inside the tile
loop; programs that see no flagged row exit after reading the flags. Without row_flags the
backward recomputes the flags from LSE' (one extra pass over the entries).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .correction import (
    CANCEL_THRESHOLD,
    INTERPRET,
    LOG2E,
    _block_range,
    _cancel_flags,
    _check_common,
    _dkdv_entries,
    _dkdv_entries_rows,
    _dq_entries,
    _dq_entries_rows,
    _exact_rows,
    _flags_2d,
    _fwd_entries,
    _fwd_prologue,
    _last_dim_contiguous,
    correct_bwd,
    correct_fwd,
    dot_precision,
    recompute_flagged_rows,
)
from .launch import FastLaunch

__all__ = ["flash_bwd", "flash_fwd"]


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, lo, hi,
               offs_m, offs_n, offs_d, Tk, causal_off, qk_scale2, k_desc, v_desc, b, hk,
               CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_PREC: tl.constexpr, USE_DESC: tl.constexpr = False):
    """Online-softmax over key blocks [lo, hi). MASKED: the blocks may hold keys >= Tk or keys
    hidden by causal; otherwise every key is visible to every row and no mask is applied.
    USE_DESC: K/V tiles come by TMA through the [B, Hkv, Tk, D] descriptors k_desc / v_desc at
    (b, hk) instead of pointer loads (TMA fills rows past Tk with zeros)."""
    for n0 in range(lo, hi, BLOCK_N):
        n0 = tl.multiple_of(n0, BLOCK_N)
        cols = n0 + offs_n
        if USE_DESC:   # rows past Tk come back zero, as the masked load's `other`
            k = k_desc.load([b.to(tl.int32), hk.to(tl.int32), n0, 0]).reshape(BLOCK_N, q.shape[1])
        elif MASKED:
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=(cols < Tk)[:, None], other=0.0)
        else:
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if MASKED:
            valid = (cols < Tk)[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + causal_off)
            qk = tl.where(valid, qk * qk_scale2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            p = tl.math.exp2(qk - m_use[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale2)
            m_use = m_new
            p = tl.math.exp2(qk * qk_scale2 - m_use[:, None])
        corr = tl.math.exp2(m_i - m_use)
        l_i = l_i * corr + tl.sum(p, 1)
        acc = acc * corr[:, None]
        if USE_DESC:
            v = v_desc.load([b.to(tl.int32), hk.to(tl.int32), n0, 0]).reshape(BLOCK_N, q.shape[1])
        elif MASKED:
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=(cols < Tk)[:, None], other=0.0)
        else:
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


# MEMTRACE_ATTN_TUNE=0 skips autotuning: the first config that fits (tests, quick runs).
TUNE = os.environ.get("MEMTRACE_ATTN_TUNE", "1") != "0"


def _config_slice():
    """MEMTRACE_ATTN_CONFIG_SLICE="k/n": autotune only every n-th config that fits, from the k-th.
    For compiling ahead (benchmarks/prewarm_attention.py): n processes side by side each compile
    and time their slice and fill Triton's cache, so the real run's autotune compiles nothing."""
    raw = os.environ.get("MEMTRACE_ATTN_CONFIG_SLICE", "").strip()
    if not raw:
        return None
    try:
        k, n = (int(x) for x in raw.split("/"))
    except ValueError:
        k = n = -1
    if not 0 <= k < n:
        raise ValueError(f"MEMTRACE_ATTN_CONFIG_SLICE must be 'k/n' with 0 <= k < n, got {raw!r}")
    return k, n


CONFIG_SLICE = _config_slice()
SMEM_BYTES = 200 * 1024


def _set_desc_blocks(nargs):
    """Autotune pre-hook: the TMA descriptors' block shape follows the config's tile."""
    for name, block in (("KDesc", "BLOCK_N"), ("VDesc", "BLOCK_N"), ("QDesc", "BLOCK_M"), ("DODesc", "BLOCK_M")):
        desc = nargs.get(name)
        if isinstance(desc, TensorDescriptor):
            desc.block_shape = [1, 1, nargs[block], desc.shape[3]]


def _config(num_warps, num_stages, **kwargs):
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages, pre_hook=_set_desc_blocks)


def _fwd_configs():
    if INTERPRET:   # one config (more would be benchmarked); the launch passes USE_DESC
        return [_config(4, 1, BLOCK_M=16, BLOCK_N=16, CHUNK=16, PREFETCH=True)]
    dense = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 4),
             (64, 128, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2)]
    # TMA or pointer loads is a tuning choice: on the H100 (tma_probe_h100_session6.json) TMA lost
    # 7% without a bias and won 11% at 16384 traces/head, with whatever tiles the tuner took
    cfgs = [_config(w, s, BLOCK_M=bm, BLOCK_N=bn, CHUNK=32, PREFETCH=False, USE_DESC=d)
            for d in (True, False) for bm, bn, w, s in (dense[:5] if d else dense)]
    # with a bias: where to issue the first chunk's gathers, and the chunk size
    cfgs += [_config(w, s, BLOCK_M=bm, BLOCK_N=bn, CHUNK=ch, PREFETCH=True, USE_DESC=d)
             for bm, bn, w, s in dense[:5] for ch in (32, 64) for d in (True, False) if not (d and ch == 64)]
    return cfgs


def _elsize(named_args):
    return named_args["Q"].element_size()


def _prune(configs, D, elsize, smem_of):
    """Drop configs whose shared memory (estimated) or registers (D=256) do not fit; without
    tuning keep the first that fits."""
    keep = [c for c in configs if smem_of(c) * elsize <= SMEM_BYTES
            and not (D >= 256 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 64)]
    keep = keep or configs[-1:]
    if not TUNE:
        return keep[:1]
    if CONFIG_SLICE is not None:
        k, n = CONFIG_SLICE
        keep = keep[k::n] or keep[:1]
    return keep


def _prune_tma(configs, desc):
    """TMA configs only when the launch passed descriptors (the autotune key's TMA_OK says so);
    MEMTRACE_ATTN_TMA=0 / 1 keeps only pointer / TMA configs. (The interpreter's single config
    has no USE_DESC: its launches pass it, see _interpret_desc.)"""
    if INTERPRET:
        return configs
    if not isinstance(desc, TensorDescriptor) or TMA == "0":
        keep = [c for c in configs if not c.kwargs["USE_DESC"]]
    elif TMA == "1":
        keep = [c for c in configs if c.kwargs["USE_DESC"]]
    else:
        keep = configs
    return keep


def _interpret_desc(use_desc):
    """Launch kwargs: under the interpreter USE_DESC comes with the launch, not the config."""
    return {"USE_DESC": use_desc} if INTERPRET else {}


def _prune_fwd(configs, named_args, **kwargs):
    D = kwargs["HEAD_DIM"]
    configs = _prune_tma(configs, named_args["KDesc"])
    if not kwargs["HAS_BIAS"]:
        configs = [c for c in configs if not c.kwargs["PREFETCH"]] or configs
    return _prune(configs, D, _elsize(named_args),
                  lambda c: c.kwargs["BLOCK_M"] * D + 2 * c.num_stages * c.kwargs["BLOCK_N"] * D)


@triton.autotune(configs=_fwd_configs(),
                 key=["TQ_KEY", "TK_KEY", "HEAD_DIM", "CAUSAL", "HAS_BIAS", "DOT_PREC", "TMA_OK"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _flash_fwd_kernel(Q, K, V, KDesc, VDesc, Out, Lse, EntryPos, EntryVal, QOffsets, Flags,
                      stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                      stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                      Hq, GROUP, Tq, Tk, TqMax, causal_off, qk_scale2, alpha2, cancel_tol,
                      TQ_KEY, TK_KEY, TMA_OK,
                      HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                      DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      CHUNK: tl.constexpr, PREFETCH: tl.constexpr, USE_DESC: tl.constexpr):
    """Out [B,Hq,Tq,D], Lse [B*Hq, Tq] (natural) of biased attention.

    Grid (cdiv(Tq, BLOCK_M), B*Hq). A program owns rows [m0, m0+BLOCK_M) of (b, h): the key
    blocks every row sees fully run unmasked, the diagonal/tail blocks masked; then the entries of
    those rows are folded in (HAS_BIAS). Flags[bh, i] (int8) = 1 on the rows that cancelled;
    flash_fwd then recomputes them in a launch of their own (correction.recompute_flagged_rows):
    inline, that tile loop had put every biased config at 255 registers with spills (128 rows, 8
    warps: 136 bytes of stack; without it, 199 and none).
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    hk = (h // GROUP).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=(offs_m < Tq)[:, None], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    if CAUSAL:
        hi = tl.maximum(tl.minimum(Tk, m0 + BLOCK_M + causal_off), 0)      # keys any row sees
        full = tl.maximum(tl.minimum(Tk, m0 + 1 + causal_off), 0)         # keys every row sees
    else:
        hi = Tk
        full = Tk
    full = (full // BLOCK_N) * BLOCK_N
    if HAS_BIAS:
        e_lo, e_hi = _block_range(QOffsets, h, m0, tl.minimum(m0 + BLOCK_M, Tq), TqMax)
        if PREFETCH:  # the entries' gathers fly while the dense loop runs
            val0, i0, ok0, kg0, vg0 = _fwd_prologue(
                EntryPos, EntryVal, k_base, v_base, stride_kn, stride_vn, offs_d, e_lo, e_hi, Tq, Tk,
                causal_off, CAUSAL, CHUNK)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, 0, full,
                               offs_m, offs_n, offs_d, Tk, causal_off, qk_scale2, KDesc, VDesc, b, hk,
                               CAUSAL, False, BLOCK_N, DOT_PREC, USE_DESC)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, full, hi,
                               offs_m, offs_n, offs_d, Tk, causal_off, qk_scale2, KDesc, VDesc, b, hk,
                               CAUSAL, True, BLOCK_N, DOT_PREC, USE_DESC)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse2 = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    if HAS_BIAS:
        if not PREFETCH:
            val0, i0, ok0, kg0, vg0 = _fwd_prologue(
                EntryPos, EntryVal, k_base, v_base, stride_kn, stride_vn, offs_d, e_lo, e_hi, Tq, Tk,
                causal_off, CAUSAL, CHUNK)
        den = tl.full([BLOCK_M], 1.0, tl.float32)
        c2 = tl.zeros([BLOCK_M], tl.float32)
        acc, den, c2 = _fwd_entries(acc, den, c2, q, lse2, offs_m, e_lo, e_hi,
                                    val0, i0, ok0, kg0, vg0, EntryPos, EntryVal,
                                    k_base, v_base, stride_kn, stride_vn, offs_d,
                                    Tq, Tk, causal_off, qk_scale2, alpha2, CAUSAL, CHUNK, DOT_PREC)
        # 1 + sum w = den * 2^c2; under the threshold the identity has cancelled
        cancelled = (den < cancel_tol * tl.math.exp2(-c2)) & (offs_m < Tq)
        acc = acc / den[:, None]
        lse2 = lse2 + c2 + tl.math.log2(den)
        tl.store(Flags + bh.to(tl.int64) * Tq + offs_m, cancelled.to(tl.int8), mask=offs_m < Tq)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    l_ptrs = Lse + bh.to(tl.int64) * Tq + offs_m
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m < Tq)[:, None])
    tl.store(l_ptrs, lse2 * 0.6931471805599453, mask=offs_m < Tq)


# Hopper warp specialization of the dense forward (MEMTRACE_ATTN_WS): "auto" runs non-causal
# fp16/bf16 calls with contiguous inputs and Tk a multiple of the key tile through
# _flash_fwd_ws_kernel on sm_90 (then the bias, if any, through the standalone correction); "0"
# never. Triton 3.6's Hopper pass splits the loop into a TMA producer warp and two consumer
# warpgroups of 64 rows each; it fails to compile when any dot follows the specialized loop (a
# masked tail loop or the fused entry epilogue), which is why the bias needs a second launch.
WS = os.environ.get("MEMTRACE_ATTN_WS", "auto").strip() or "auto"
if WS not in ("auto", "0"):
    raise ValueError(f"MEMTRACE_ATTN_WS must be auto or 0, got {WS!r}")
# One config, no autotuner (so the launch takes FastLaunch's short host path). H100, B4 H16 T4096
# D128 bf16 (ws_sweep_h100_session10.json), specialized: 128 x 128 tiles, 4 warps, 2 stages 554
# TFLOP/s; 128 x 64 492; 256 x 64 495; 3 stages gave NaNs; 8 warps are not specialized (431-468,
# as _flash_fwd_kernel's best config, 467).
WS_BLOCK_M, WS_BLOCK_N = 128, 128


@triton.jit
def _flash_fwd_ws_kernel(Q, K, V, Out, Lse, stride_ob, stride_oh, stride_om, B, Hq, Hkv, GROUP, Tq, Tk, qk_scale2,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         WS: tl.constexpr = True):
    """Unbiased, non-causal Out [B,Hq,Tq,D] and Lse [B*Hq, Tq] (natural) with a warp-specialized
    key loop. q, k, v contiguous; their tiles all come by TMA through descriptors made on the
    device (the Hopper pass needs q by TMA too). Tk % BLOCK_N == 0, so no key is masked.
    WS=False (benchmarks/ws_probe.py's sweep) runs the same loop unspecialized."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    # 2-D descriptors over the rows of the contiguous tensors, the same in every program: on the
    # H100 per-(b, h) descriptors gave wrong, run-to-run different outputs, and [B, H, T, D]
    # ones (made on the host or the device) hung. Rows past Tq read the next head's (or TMA's
    # zeros) and are not stored.
    q_desc = tl.make_tensor_descriptor(Q, shape=[B * Hq * Tq, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K, shape=[B * Hkv * Tk, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V, shape=[B * Hkv * Tk, HEAD_DIM], strides=[HEAD_DIM, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    q = q_desc.load([bh * Tq + m0, 0])
    kv_row0 = (b * Hkv + hk) * Tk
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in tl.range(0, Tk, BLOCK_N, warp_specialize=WS):
        k = k_desc.load([kv_row0 + n0, 0])
        qk = tl.dot(q, k.T)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale2)
        p = tl.math.exp2(qk * qk_scale2 - m_new[:, None])
        corr = tl.math.exp2(m_i - m_new)
        acc = acc * corr[:, None]
        v = v_desc.load([kv_row0 + n0, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        l_i = l_i * corr + tl.sum(p, 1)
        m_i = m_new
    acc = acc / l_i[:, None]
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o_ptrs = (Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om
              + offs_d[None, :])
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=(offs_m < Tq)[:, None])
    tl.store(Lse + bh.to(tl.int64) * Tq + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=offs_m < Tq)


_WS_FAST = FastLaunch(_flash_fwd_ws_kernel)


def _torch_scratch(size, alignment, stream):
    """Triton's allocator for the global scratch of descriptors made on the device."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator():
    """Device-side descriptors need an allocator (triton.set_allocator); set ours only where the
    caller has not set one (Triton's default raises at launch)."""
    from triton.runtime import _allocation
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)


@functools.lru_cache(maxsize=None)
def _capability_major(device_index: int) -> int:
    """The compute capability's major number of a CUDA device (asked once: _ws_usable runs on
    every forward)."""
    return torch.cuda.get_device_capability(device_index)[0]


def _ws_usable(q, k, v, causal, D, Tk):
    """The warp-specialized dense forward runs this call (see WS above)."""
    if WS == "0" or INTERPRET or causal or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if D not in (64, 128) or Tk % WS_BLOCK_N != 0 or Tk == 0 or q.shape[2] == 0:
        return False
    if _capability_major(q.device.index if q.device.index is not None else torch.cuda.current_device()) != 9:
        return False
    return all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (q, k, v))


# TMA descriptors for the dense loops' tiles: "auto" (the autotuner picks TMA or pointer loads),
# "0" (pointer loads everywhere), "1" (TMA wherever the tensors allow it)
TMA = os.environ.get("MEMTRACE_ATTN_TMA", "auto").strip() or "auto"
if TMA not in ("auto", "0", "1"):
    raise ValueError(f"MEMTRACE_ATTN_TMA must be auto, 0 or 1, got {TMA!r}")


# The backward's entry epilogues (MEMTRACE_ATTN_BWD_ENTRIES): "rows" computes s and dP per entry
# as row dots of gathered rows and scatters with one (dQ) / two (dK, dV) one-hot dots per chunk;
# "onehot" computes s and dP of every row of the block against the chunk's keys on the tensor
# cores (three / four dots per chunk, BM-fold redundant, but no gathers of the block's own rows).
# "auto" takes rows from ROWS_MIN_DENSITY entries per (head, query row) of the bias: on the H100,
# forward+backward over bias=None, B4 H16 T4096 D128 at 4 entries/row: rows +20% vs onehot +29%
# (entries_probe_h100_session7c.json); at 0.5/row both ~3.5%; B1 H32/8 T16384 causal at 1/row:
# onehot +5.6% vs rows +10.5%, at 0.125/row +3.4% vs +7.8% (entries_probe_shape3_h100_session7.json).
BWD_ENTRIES = os.environ.get("MEMTRACE_ATTN_BWD_ENTRIES", "auto").strip() or "auto"
if BWD_ENTRIES not in ("auto", "onehot", "rows"):
    raise ValueError(f"MEMTRACE_ATTN_BWD_ENTRIES must be auto, onehot or rows, got {BWD_ENTRIES!r}")
ROWS_MIN_DENSITY = 2.0


def _entry_form(bias):
    """1 (rows) or 0 (onehot) for the backward's entry epilogues of a non-empty bias."""
    if BWD_ENTRIES != "auto":
        return int(BWD_ENTRIES == "rows")
    return int(bias.nnz >= ROWS_MIN_DENSITY * bias.num_heads * bias.seq_len_q)


# The backward's entry terms at high density: the fused epilogues run inside the dense kernels'
# programs (1-2 per SM, their registers held by the dense tiles); correct_bwd's standalone kernels
# run many light programs per SM. From BWD_SPLIT_MIN_DENSITY entries per (head, query row)
# flash_bwd runs the dense backward fed (O', LSE') and then correct_bwd, as the cudnn backend does
# (H100, B4 H16 T4096 D128 bf16, benchmarks/notes_attention.md: session 11 split from 2 per row;
# with the key side beside the dense dQ kernel (BWD_OVERLAP, session 13) the split form at 0.5 per
# row ties the fused one non-causal (+6.6% vs +6.8% over the unbiased backward) and beats it
# causal (+7.1% vs +12.6%), so it starts there).
# MEMTRACE_ATTN_BWD_SPLIT: auto (by density), 0 (always fused), 1 (always split, where allowed).
BWD_SPLIT = os.environ.get("MEMTRACE_ATTN_BWD_SPLIT", "auto").strip() or "auto"
if BWD_SPLIT not in ("auto", "0", "1"):
    raise ValueError(f"MEMTRACE_ATTN_BWD_SPLIT must be auto, 0 or 1, got {BWD_SPLIT!r}")
SPLIT_MIN_DENSITY = 2.0          # the forward's switch (FWD_SPLIT)
BWD_SPLIT_MIN_DENSITY = 0.5


# The forward alike (MEMTRACE_ATTN_FWD_SPLIT auto/0/1): from SPLIT_MIN_DENSITY entries per row the
# fused kernel's epilogue (which shares the dense kernel's few programs per SM) costs more than the
# unbiased pass followed by correct_fwd (small programs, many per SM). The warp-specialized
# forward always splits (no dot may follow its loop).
FWD_SPLIT = os.environ.get("MEMTRACE_ATTN_FWD_SPLIT", "auto").strip() or "auto"
if FWD_SPLIT not in ("auto", "0", "1"):
    raise ValueError(f"MEMTRACE_ATTN_FWD_SPLIT must be auto, 0 or 1, got {FWD_SPLIT!r}")


def _split_forward(bias):
    """Whether flash_fwd (unspecialized path) runs the unbiased pass + correct_fwd for this bias."""
    if bias is None or bias.nnz == 0 or FWD_SPLIT == "0":
        return False
    return FWD_SPLIT == "1" or bias.nnz >= SPLIT_MIN_DENSITY * bias.num_heads * bias.seq_len_q


def _split_backward(bias, may_cancel, capture_bound):
    """Whether flash_bwd takes the split form (dense backward + correct_bwd) for this call. Never
    with rows that may cancel (the dense backward fed O', LSE' would amplify its rounding on
    their entries; the fused form recomputes them) nor with a capture bound (the fused dQ kernel
    fills it)."""
    if bias is None or bias.nnz == 0 or may_cancel or capture_bound is not None or BWD_SPLIT == "0":
        return False
    return BWD_SPLIT == "1" or bias.nnz >= BWD_SPLIT_MIN_DENSITY * bias.num_heads * bias.seq_len_q


# The split backward's key-side correction (dK, dV) touches nothing the dense dQ kernel writes.
# So the split backward runs the dense dK/dV kernel first, then the dense dQ kernel on a
# high-priority stream (its blocks take every freed slot first) beside the key-side correction on
# the caller's stream, whose light programs fill what the dQ kernel leaves on each SM; the query
# side follows once dQ exists. Both read the preprocess's delta. On the H100 (B4 H16 T4096 D128
# bf16) this hid 40-50 us of the key side's 150-280 (the autotuned dQ kernel holds most of each
# SM): the backward's overhead at 16384 traces/head went from +15.2% to +14.0%, at 2048 from
# +8.1% to +6.6% (benchmarks/results/bwd_overlap_probe_h100_session13.json).
# MEMTRACE_ATTN_BWD_OVERLAP: auto (on for CUDA tensors), 0 (one stream, same order), 1.
BWD_OVERLAP = os.environ.get("MEMTRACE_ATTN_BWD_OVERLAP", "auto").strip() or "auto"
if BWD_OVERLAP not in ("auto", "0", "1"):
    raise ValueError(f"MEMTRACE_ATTN_BWD_OVERLAP must be auto, 0 or 1, got {BWD_OVERLAP!r}")
_PRIORITY_STREAMS: dict = {}


def _priority_stream(device):
    """A cached highest-priority CUDA stream of `device` (None when BWD_OVERLAP is off, under the
    interpreter or off CUDA)."""
    if BWD_OVERLAP == "0" or INTERPRET or device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PRIORITY_STREAMS:
        _PRIORITY_STREAMS[idx] = torch.cuda.Stream(device=idx, priority=-100)   # clamped to the highest
    return _PRIORITY_STREAMS[idx]


# entries per chunk of the entry epilogues (16 measured no better than 32)
BWD_CHUNK = int(os.environ.get("MEMTRACE_ATTN_BWD_CHUNK", "32"))
# The salience capture's segment width: keys per word of flash_bwd's capture bound, which is the
# dq kernel's key block while capturing (configs with another BLOCK_N are pruned then).
CAPTURE_SEG = 16 if INTERPRET else 64
# Each bound word packs 32 / bits integer fields (one per CAPTURE_SEG * bits / 32 keys); a field's
# largest value, and the fewest levels per threshold that keep the bound tight (below 8 the
# ceilings loosen it a lot: benchmarks/notes_attention.md, session 9).
CAPTURE_FIELD_MAX = {8: 255, 16: 65535, 32: 2**31 - 1}
CAPTURE_MIN_LEVELS = 8


def capture_bound_format(batch: int) -> tuple[int, int]:
    """(bits, levels) of the capture bound's fields for a batch of `batch`: the narrowest field
    (8, 16 or 32 bits: 4, 2 or 1 fields per word, so narrower fields bound shorter key ranges)
    whose levels K = field_max // batch^2 are at least CAPTURE_MIN_LEVELS. Each batch element adds
    at most K * batch to a field, so a field never carries into the next."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    for bits in (8, 16, 32):
        levels = CAPTURE_FIELD_MAX[bits] // (batch * batch)
        if levels >= CAPTURE_MIN_LEVELS:
            return bits, min(levels, 2**20)
    raise ValueError(f"batch {batch} is too large for the capture bound's fields")


def capture_bound_fields(words, batch: int):
    """The fields of flash_bwd's capture bound words, int64 [..., 32 / bits] (for tests and
    benchmarks; the kernels decode them in place)."""
    bits, _ = capture_bound_format(batch)
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, bits, device=words.device)
    return (w[..., None] >> shifts) & ((1 << bits) - 1)


def capture_bound_passing(words, batch: int):
    """bool: the bound words with a field at the limit (the rows the capture rescores)."""
    _, levels = capture_bound_format(batch)
    return (capture_bound_fields(words, batch) >= levels * batch).any(-1)


class CaptureBound:
    """flash_bwd's salience-capture bound (memtrace.capture builds it): `words`, a zeroed int32
    [Hq, cdiv(Tk, CAPTURE_SEG), Tq] tensor, the `threshold` it is filled against, and `after_dq`,
    None or a callable that flash_bwd runs with the filled words between the dQ kernel and the
    dK/dV kernels, after dropping its own references (`words` becomes None): the capture rescores
    its segments there, so the bound's memory is free again before dK and dV are allocated and
    the capture adds nothing to the backward's peak. `scored` is for the callable to set."""

    def __init__(self, words, threshold, after_dq=None):
        self.words, self.threshold, self.after_dq = words, threshold, after_dq
        self.scored = False


def capture_all_pass_word(batch: int) -> int:
    """The bound word whose every field passes (the int32 value, for the rows the bound cannot
    see): each field at the limit levels * batch."""
    bits, levels = capture_bound_format(batch)
    word = 0
    for f in range(32 // bits):
        word |= (levels * batch) << (f * bits)
    return word - 2**32 if word >= 2**31 else word


def _desc_ok(t):
    """TMA needs a 16-byte aligned base and 16-byte aligned strides, unit stride along D."""
    el = t.element_size()
    return (t.stride(3) == 1 and t.data_ptr() % 16 == 0
            and all((s * el) % 16 == 0 for s in t.stride()[:3]))


def _use_desc(*tensors):
    return TMA != "0" and all(_desc_ok(t) for t in tensors)


def _desc4(t):
    """A [B, H, T, D] descriptor; the block shape [1, 1, rows, D] is set per config (_set_desc_blocks)."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, t.shape[3]])


def _len_key(t):
    """Autotune bucket for a sequence length (so every length does not retune)."""
    return 1 << max(0, (int(t) - 1).bit_length())


def flash_fwd(q, k, v, bias=None, entry_values=None, *, causal: bool, scale: float, alpha: float,
              allow_tf32: bool = False, return_flags: bool = False, may_cancel: bool = True):
    """Biased flash attention forward.

    q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D] (fp16/bf16/fp32, same dtype); bias a TraceBias for Hq heads
    (or None), entry_values = bias.entry_values() (float32 [E]). Returns (out [B,Hq,Tq,D] in
    q.dtype, lse [B,Hq,Tq] float32 natural log, -inf on fully masked rows). fp32 inputs use IEEE
    dots unless allow_tf32. return_flags=True returns (out, lse, flags): int8 [B,Hq,Tq], 1 on the
    cancelling rows (for flash_bwd(row_flags=...), which otherwise recomputes them).
    may_cancel=False promises alpha * (every entry value) >= ln(CANCEL_THRESHOLD): no row can
    cancel, so the launch that recomputes cancelled rows is skipped.
    """
    B, Hq, Hkv, Tq, Tk, D = _check_common(q, k, v, bias)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if scale < 0:  # the kernels assume a positive logit scale; fold the sign into q
        q, scale = -q, -scale
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    has_bias = bias is not None and bias.nnz > 0
    if _ws_usable(q, k, v, causal, D, Tk):
        # the dense pass warp-specialized, then the entries by the standalone correction (in place)
        _ensure_allocator()
        _WS_FAST[(triton.cdiv(Tq, WS_BLOCK_M), B * Hq)](
            q, k, v, out, lse, out.stride(0), out.stride(1), out.stride(2), B, Hq, Hkv, Hq // Hkv, Tq, Tk,
            scale * LOG2E, HEAD_DIM=D, BLOCK_M=WS_BLOCK_M, BLOCK_N=WS_BLOCK_N, num_warps=4, num_stages=2)
        if not has_bias:
            return (out, lse, torch.zeros((B, Hq, Tq), dtype=torch.int8, device=q.device)) if return_flags else (out, lse)
        if entry_values is None:
            entry_values = bias.entry_values()
        # flags only when asked for (or needed for the recompute): the window form zeroes them first
        return correct_fwd(q, k, v, out, lse, bias, entry_values, causal=False, scale=scale, alpha=alpha,
                           return_flags=return_flags, may_cancel=may_cancel)
    if has_bias and _split_forward(bias):
        out, lse = flash_fwd(q, k, v, None, causal=causal, scale=scale, alpha=alpha, allow_tf32=allow_tf32)
        if entry_values is None:
            entry_values = bias.entry_values()
        return correct_fwd(q, k, v, out, lse, bias, entry_values, causal=causal, scale=scale, alpha=alpha,
                           allow_tf32=allow_tf32, return_flags=return_flags, may_cancel=may_cancel)
    if has_bias:
        if entry_values is None:
            entry_values = bias.entry_values()
        ep, qo, tq_max = bias.entry_pos, bias.q_offsets, bias.seq_len_q
        flags = torch.empty((B * Hq, Tq), dtype=torch.int8, device=q.device)   # every row written
    else:
        ep = qo = torch.empty(1, dtype=torch.int32, device=q.device)
        flags = torch.zeros((B * Hq, Tq) if return_flags else (1,), dtype=torch.int8, device=q.device)
        entry_values = torch.empty(1, dtype=torch.float32, device=q.device)
        tq_max = 1

    def grid(meta):
        return (triton.cdiv(Tq, meta["BLOCK_M"]), B * Hq)

    use_desc = _use_desc(k, v)
    k_desc, v_desc = (_desc4(t) for t in (k, v)) if use_desc else (k, v)
    _flash_fwd_kernel[grid](
        q, k, v, k_desc, v_desc, out, lse, ep, entry_values, qo, flags,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        Hq, Hq // Hkv, Tq, Tk, tq_max, Tk - Tq, scale * LOG2E, alpha * LOG2E, CANCEL_THRESHOLD,
        _len_key(Tq), _len_key(Tk), int(use_desc),
        HEAD_DIM=D, CAUSAL=bool(causal), HAS_BIAS=has_bias, DOT_PREC=dot_precision(q.dtype, allow_tf32),
        **_interpret_desc(use_desc))
    if has_bias and may_cancel:
        recompute_flagged_rows(q, k, v, out, lse, bias, entry_values, flags, causal=causal, scale=scale,
                               alpha=alpha, prec=dot_precision(q.dtype, allow_tf32))
    if return_flags:
        return out, lse, flags.view(B, Hq, Tq)
    return out, lse


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bwd_pre_kernel(Out, DO, Lse, Delta, Lse2, Flags,
                    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                    stride_lb, stride_lh, stride_lm, Hq, Tq,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HAS_FLAGS: tl.constexpr):
    """Delta = rowsum(dO * O'), Lse2 = LSE' * log2(e) with +inf on fully masked rows (so every
    probability of such a row is exp2(s - inf) = 0 without a mask). Both [B*Hq, Tq] float32.
    HAS_FLAGS: Lse2 = +inf also on the cancelling rows (Flags int8 [B*Hq, Tq] != 0), which drops
    them from the dense loops and the entry epilogues exactly as a fully masked row (P = 0, so
    dS = 0 and no dV term); the exact-row kernels then do their gradient. Masking here, once per
    row, keeps the flag out of the dK/dV inner loop (which reloads dO per query block) and needs
    no masked copy of dO. Grid (cdiv(Tq, BLOCK_M), B*Hq)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = (offs_m < Tq)[:, None]
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :], mask=rows, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :], mask=rows, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse = tl.load(Lse + b * stride_lb + h * stride_lh + offs_m * stride_lm, mask=offs_m < Tq, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    if HAS_FLAGS:
        flag = tl.load(Flags + bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0)
        lse2 = tl.where(flag != 0, float("inf"), lse2)
    tl.store(Delta + bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)
    tl.store(Lse2 + bh.to(tl.int64) * Tq + offs_m, lse2, mask=offs_m < Tq)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                lo, hi, offs_n, offs_mb, offs_d, Tq, causal_off, qk_scale2, q_desc, do_desc, b, h,
                CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
                DOT_PREC: tl.constexpr, USE_DESC: tl.constexpr):
    """dK (unscaled), dV of one key block over query blocks [lo, hi) of one head. MASKED applies
    the causal mask (query rows past Tq need none: their lse2 is +inf and dO 0). USE_DESC: q and
    dO tiles by TMA through [B, Hq, Tq, D] descriptors at (b, h) (rows past Tq read as zeros)."""
    for m0 in range(lo, hi, BLOCK_M):
        m0 = tl.multiple_of(m0, BLOCK_M)
        rows = m0 + offs_mb
        rmask = rows < Tq
        if USE_DESC:
            q = q_desc.load([b.to(tl.int32), h.to(tl.int32), m0, 0]).reshape(BLOCK_M, k.shape[1])
        else:
            q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=rmask[:, None], other=0.0)
        lse2 = tl.load(lse_base + rows, mask=rmask, other=float("inf"))
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)                 # [BN, BM]
        pT = tl.math.exp2(qkT * qk_scale2 - lse2[None, :])
        if MASKED:
            pT = tl.where(rows[None, :] + causal_off >= offs_n[:, None], pT, 0.0)
        if USE_DESC:
            do = do_desc.load([b.to(tl.int32), h.to(tl.int32), m0, 0]).reshape(BLOCK_M, k.shape[1])
        else:
            do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :], mask=rmask[:, None], other=0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        delta = tl.load(delta_base + rows, mask=rmask, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


def _bwd_configs(kind):
    if INTERPRET:
        return [_config(4, 1, BLOCK_M=16, BLOCK_N=16)]
    if kind == "dkdv":
        shapes = [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 4),
                  (64, 128, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2)]
    else:
        shapes = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4),
                  (128, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)]
    return [_config(w, s, BLOCK_M=bm, BLOCK_N=bn, USE_DESC=d) for d in (True, False) for bm, bn, w, s in shapes]


def _prune_dkdv(configs, named_args, **kwargs):
    D = kwargs["HEAD_DIM"]
    configs = _prune_tma(configs, named_args["QDesc"])
    return _prune(configs, D, _elsize(named_args),
                  lambda c: 2 * c.kwargs["BLOCK_N"] * D + 2 * c.num_stages * c.kwargs["BLOCK_M"] * D)


@functools.lru_cache(maxsize=None)     # asked on every capturing call; the answer is fixed per process
def capture_supported(head_dim: int, element_size: int) -> bool:
    """Whether the dq kernel has a config with BLOCK_N == CAPTURE_SEG that fits (the same shared
    memory estimate and D=256 rule as the pruning), i.e. whether flash_bwd can fill a capture
    bound for this head dim and element size (float32 at D=128 cannot: every such config's
    tiles exceed the shared memory)."""
    if INTERPRET:
        return True
    D = head_dim
    for c in _bwd_configs("dq"):
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if bn != CAPTURE_SEG or (D >= 256 and bm * bn > 64 * 64):
            continue
        if (2 * bm * D + 2 * c.num_stages * bn * D) * element_size <= SMEM_BYTES:
            return True
    return False


def _prune_dq(configs, named_args, **kwargs):
    D = kwargs["HEAD_DIM"]
    configs = _prune_tma(configs, named_args["KDesc"])
    if kwargs["CAPTURE"]:    # the capture bound's segments are the dq kernel's key blocks
        configs = [c for c in configs if c.kwargs["BLOCK_N"] == CAPTURE_SEG]
    return _prune(configs, D, _elsize(named_args),
                  lambda c: 2 * c.kwargs["BLOCK_M"] * D + 2 * c.num_stages * c.kwargs["BLOCK_N"] * D)


@triton.autotune(configs=_bwd_configs("dkdv"),
                 key=["TQ_KEY", "TK_KEY", "HEAD_DIM", "CAUSAL", "HAS_BIAS", "DOT_PREC", "TMA_OK", "ENTRY_FORM",
                      "CHUNK"],
                 prune_configs_by={"early_config_prune": _prune_dkdv})
@triton.jit
def _flash_bwd_dkdv_kernel(Q, K, V, DO, QDesc, DODesc, DK, DV, Lse2, Delta,
                           EntryPos, EntryVal, KOrder, KOffsets, QOffsets, Flags,
                           stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                           stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                           stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                           Hq, Hkv, GROUP, Tq, Tk, TqMax, TkMax, causal_off, scale, qk_scale2, alpha2,
                           TQ_KEY, TK_KEY, TMA_OK,
                           HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                           CHUNK: tl.constexpr, DOT_PREC: tl.constexpr, ENTRY_FORM: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_DESC: tl.constexpr):
    """DK, DV [B,Hkv,Tk,D] for keys [n0, n0+BLOCK_N) of (b, kv head).

    Grid (cdiv(Tk, BLOCK_N), B*Hkv). Loops over the GROUP query heads of the kv head and over
    their query blocks (causal: from the first block that sees the keys; masked blocks first),
    then adds the entry terms of each head's entries in this key block (k_order).
    """
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // Hkv).to(tl.int64)
    hk = (bhk % Hkv).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    kmask = (offs_n < Tk)[:, None]
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kmask, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kmask, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if CAUSAL:
        # rows i see key j when i >= j - causal_off
        first = tl.maximum(n0 - causal_off, 0)
        lo = (first // BLOCK_M) * BLOCK_M
        unmasked = tl.maximum(tl.minimum(n0 + BLOCK_N - 1 - causal_off, Tq), 0)
        mid = tl.minimum(tl.cdiv(unmasked, BLOCK_M) * BLOCK_M, tl.maximum(lo, tl.cdiv(Tq, BLOCK_M) * BLOCK_M))
        mid = tl.maximum(mid, lo)
    else:
        lo = 0
        mid = 0
    hi = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = b * Hq + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, Lse2 + bh * Tq, Delta + bh * Tq,
                             stride_qm, stride_dom, lo, mid, offs_n, offs_mb, offs_d, Tq, causal_off,
                             qk_scale2, QDesc, DODesc, b, h, CAUSAL, True, BLOCK_M, DOT_PREC, USE_DESC)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, Lse2 + bh * Tq, Delta + bh * Tq,
                             stride_qm, stride_dom, mid, hi, offs_n, offs_mb, offs_d, Tq, causal_off,
                             qk_scale2, QDesc, DODesc, b, h, CAUSAL, False, BLOCK_M, DOT_PREC, USE_DESC)
    if HAS_BIAS:
        for g in range(GROUP):
            h = hk * GROUP + g
            bh = b * Hq + h
            t_lo, t_hi = _block_range(KOffsets, h, n0, tl.minimum(n0 + BLOCK_N, Tk), TkMax)
            if ENTRY_FORM == 1:
                dk, dv = _dkdv_entries_rows(dk, dv, offs_n, t_lo, t_hi, KOrder, EntryPos, EntryVal,
                                            Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh,
                                            Lse2 + bh * Tq, Delta + bh * Tq, K + b * stride_kb + hk * stride_kh,
                                            V + b * stride_vb + hk * stride_vh, stride_qm, stride_dom,
                                            stride_kn, stride_vn, offs_d, Tq, Tk, causal_off, qk_scale2, alpha2,
                                            CAUSAL, CHUNK, DOT_PREC)
            else:
                dk, dv = _dkdv_entries(dk, dv, k, v, offs_n, t_lo, t_hi, KOrder, EntryPos, EntryVal,
                                       Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh,
                                       Lse2 + bh * Tq, Delta + bh * Tq, stride_qm, stride_dom, 1, offs_d,
                                       Tq, Tk, causal_off, qk_scale2, alpha2, CAUSAL, CHUNK, DOT_PREC, False)
    dk = dk * scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, lo, hi,
              offs_m, offs_n, offs_d, Tk, causal_off, qk_scale2, k_desc, v_desc, b, hk,
              cap_bound, cap_scale, cap_limit, Tq,
              CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
              USE_DESC: tl.constexpr, CAPTURE: tl.constexpr):
    """dQ (unscaled) of one row block over key blocks [lo, hi). Keys past Tk are loaded as zero
    rows, which add nothing to dq; MASKED applies the causal mask. USE_DESC: K/V tiles by TMA
    (as in _fwd_tiles). CAPTURE (the field width in bits, 0 = off): also add, per row, the levels
    ceil(min(cap_scale * max P*|dP|, cap_limit)) of each field's keys into that field of
    cap_bound[key block, row] (the salience capture's segment bound, see flash_bwd)."""
    for n0 in range(lo, hi, BLOCK_N):
        n0 = tl.multiple_of(n0, BLOCK_N)
        cols = n0 + offs_n
        if USE_DESC:
            k = k_desc.load([b.to(tl.int32), hk.to(tl.int32), n0, 0]).reshape(BLOCK_N, q.shape[1])
            v = v_desc.load([b.to(tl.int32), hk.to(tl.int32), n0, 0]).reshape(BLOCK_N, q.shape[1])
        elif MASKED:
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=(cols < Tk)[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=(cols < Tk)[:, None], other=0.0)
        else:
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :])
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        p = tl.math.exp2(qk * qk_scale2 - lse2[:, None])
        if MASKED and CAUSAL:
            p = tl.where(cols[None, :] <= offs_m[:, None] + causal_off, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
        if CAPTURE != 0:
            # Fire-and-forget integer adds (the result is unused): the B programs of (h, rows) sum
            # their batch element's rounded-up field maxima, so a field reaches cap_limit whenever
            # mean_b max_j P*|dP| (>= max_j S) reaches the threshold. NaN and inf clamp to the limit.
            FIELDS: tl.constexpr = 32 // CAPTURE
            sal = p * tl.abs(dp)
            if FIELDS == 1:
                top = tl.max(sal, 1) * cap_scale
                word = tl.ceil(tl.where(top < cap_limit, top, cap_limit)).to(tl.int32)
            else:
                # Field f holds the keys j of the block with (j // 2) % FIELDS == f: in the wgmma
                # accumulator a thread's columns are 8g + 2 * (lane % 4) + {0, 1}, so a field's
                # maximum needs no shuffles (contiguous 16-key fields needed four per row and value,
                # +25% dq time on the H100). The fill rescores a whole block when any field passes,
                # so which keys share a field changes only how tight the bound is.
                top = tl.reshape(sal, [sal.shape[0], BLOCK_N // (2 * FIELDS), FIELDS, 2])
                top = tl.max(tl.max(top, 3), 1) * cap_scale
                level = tl.ceil(tl.where(top < cap_limit, top, cap_limit)).to(tl.int32)
                word = tl.sum(level << (tl.arange(0, FIELDS) * CAPTURE)[None, :], 1)
            tl.atomic_add(cap_bound + (n0 // BLOCK_N) * Tq + offs_m, word, mask=offs_m < Tq, sem="relaxed")
    return dq


@triton.autotune(configs=_bwd_configs("dq"),
                 key=["TQ_KEY", "TK_KEY", "HEAD_DIM", "CAUSAL", "HAS_BIAS", "DOT_PREC", "TMA_OK", "ENTRY_FORM",
                      "CHUNK", "CAPTURE"],
                 prune_configs_by={"early_config_prune": _prune_dq}, reset_to_zero=["CapBound"])
@triton.jit
def _flash_bwd_dq_kernel(Q, K, V, DO, KDesc, VDesc, DQ, Lse2, Delta, DvalPart,
                         EntryPos, EntryVal, QOffsets, CapBound, cap_scale, cap_limit, cap_blocks,
                         stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                         stride_dqb, stride_dqh, stride_dqm,
                         Hq, GROUP, Tq, Tk, TqMax, E, causal_off, scale, qk_scale2, alpha2, alpha,
                         TQ_KEY, TK_KEY, TMA_OK,
                         HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                         CHUNK: tl.constexpr, DOT_PREC: tl.constexpr, NEED_DVAL: tl.constexpr,
                         ENTRY_FORM: tl.constexpr, CAPTURE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_DESC: tl.constexpr):
    """DQ [B,Hq,Tq,D] for rows [m0, m0+BLOCK_M) of (b, h), and DvalPart[b, e] for their entries.

    Grid (cdiv(Tq, BLOCK_M), B*Hq). Dense loop over the visible key blocks (unmasked, then the
    diagonal/tail blocks masked), then the entry terms of the block's entries (entry_pos order).
    CAPTURE (field bits, 0 = off): CapBound int32 [Hq, cap_blocks, Tq] (BLOCK_N == the capture's
    segment width) receives the salience bound of every (row, key block) the loops visit.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    hk = (h // GROUP).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rmask = offs_m < Tq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=rmask[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=rmask[:, None], other=0.0)
    lse2 = tl.load(Lse2 + bh.to(tl.int64) * Tq + offs_m, mask=rmask, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * Tq + offs_m, mask=rmask, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    if CAUSAL:
        hi = tl.maximum(tl.minimum(Tk, m0 + BLOCK_M + causal_off), 0)
        full = tl.maximum(tl.minimum(Tk, m0 + 1 + causal_off), 0)
    else:
        hi = Tk
        full = Tk
    full = (full // BLOCK_N) * BLOCK_N
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    cap_bound = CapBound + h.to(tl.int64) * cap_blocks * Tq
    dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, 0, full,
                   offs_m, offs_n, offs_d, Tk, causal_off, qk_scale2, KDesc, VDesc, b, hk,
                   cap_bound, cap_scale, cap_limit, Tq, CAUSAL, False, BLOCK_N, DOT_PREC, USE_DESC, CAPTURE)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, full, hi,
                   offs_m, offs_n, offs_d, Tk, causal_off, qk_scale2, KDesc, VDesc, b, hk,
                   cap_bound, cap_scale, cap_limit, Tq, CAUSAL, True, BLOCK_N, DOT_PREC, USE_DESC, CAPTURE)
    if HAS_BIAS:
        e_lo, e_hi = _block_range(QOffsets, h, m0, tl.minimum(m0 + BLOCK_M, Tq), TqMax)
        if ENTRY_FORM == 1:
            dq = _dq_entries_rows(dq, offs_m, e_lo, e_hi, EntryPos, EntryVal, DvalPart + b * E,
                                  Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh,
                                  Lse2 + bh.to(tl.int64) * Tq, Delta + bh.to(tl.int64) * Tq, k_base, v_base,
                                  stride_qm, stride_dom, stride_kn, stride_vn, offs_d, Tq, Tk, causal_off,
                                  qk_scale2, alpha2, alpha, CAUSAL, CHUNK, DOT_PREC, NEED_DVAL)
        else:
            dq = _dq_entries(dq, q, do, lse2, delta, offs_m, e_lo, e_hi, EntryPos, EntryVal, DvalPart + b * E,
                             k_base, v_base, stride_kn, stride_vn, offs_d, Tq, Tk, causal_off,
                             qk_scale2, alpha2, alpha, CAUSAL, CHUNK, DOT_PREC, NEED_DVAL)
    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=rmask[:, None])


def flash_bwd(q, k, v, out, lse, dout, bias=None, entry_values=None, *, causal: bool, scale: float,
              alpha: float, need_dvalues: bool, allow_tf32: bool = False, chunk: int | None = None, row_flags=None,
              may_cancel: bool = True, capture_bound: CaptureBound | None = None, beside_dq=None):
    """Backward of flash_fwd: (dq, dk, dv, dvalues).

    out, lse are flash_fwd's results (biased O', natural LSE'); dout [B,Hq,Tq,D]. dq has q's
    shape, dk/dv k's shape (GQA heads summed), all in the inputs' dtype; dvalues float32 [E]
    (per sorted entry, alpha * sum_b of the logit gradient; duplicate followers 0) when
    need_dvalues, else None. row_flags: the cancelling rows from flash_fwd(return_flags=True)
    (int8/bool [B,Hq,Tq]); when None and there is a bias they are recomputed from lse (one pass
    over the entries). Launches: preprocess (delta, lse2; +inf on flagged rows), dQ by query
    block, dK/dV by key block (the entry terms in each epilogue), then with a bias the exact
    backward of the flagged rows (by query block, by key block; idle programs exit at once).
    may_cancel=False makes flash_fwd's promise (alpha * every entry value >= ln(CANCEL_THRESHOLD),
    so no row can cancel): the flags pass, their masking and the exact-row launches are skipped
    (at B4 H16 T4096 D128 they took ~110 us of a ~4.6 ms forward+backward at 2048 traces/head,
    ~180 us at 16384; benchmarks/results/profile_attention_h100_session4.json). With
    may_cancel=False, no capture_bound and a dense bias (_split_backward) the entry terms come
    from correct_bwd after an unbiased pass instead of the fused epilogues.

    capture_bound: None, or a CaptureBound whose words the dQ kernel fills, for the salience
    capture (memtrace.capture), against its threshold t > 0; then its after_dq runs, then the
    dK/dV kernel (dQ runs first so that the bound is gone before dK/dV exist). With
    (bits, K) = capture_bound_format(B), word [h, n, i] packs 32 / bits fields, field f for the
    keys j of segment n with (j // 2) % (32 / bits) == f, each holding
        sum_b ceil(min(K / t * max_j P[b,h,i,j] * |dP[b,h,i,j]|, K * B))    (j: the field's keys)
    which reaches K * B whenever mean_b max_j P*|dP| >= t, so whenever some edge there that is not
    a bias entry has salience S >= t. Rows the cancelling-row path recomputes (their P is 0 in the
    dense loops) get every field at K * B. Cost: a row max per field and one fire-and-forget
    integer atomic add per row and tile; the capture then rescores only the words with a passing
    field (a float bound of the whole segment let 2-4x more rows through at B4 on random data).

    beside_dq (internal, the split form; bias=None and no capture only): a callable
    f(delta, dk, dv) launched on the caller's stream right after the dK/dV kernel, which then runs
    BEFORE the dQ kernel; the dQ kernel runs meanwhile on a high-priority stream
    (_priority_stream), joined before return. delta: the preprocess's float32 [B*Hq, Tq], which
    then also takes the place of dvalues in the result: (dq, dk, dv, delta).
    """
    B, Hq, Hkv, Tq, Tk, D = _check_common(q, k, v, bias)
    if beside_dq is not None and (bias is not None or capture_bound is not None):
        raise ValueError("beside_dq needs bias=None and no capture_bound")
    if _split_backward(bias, may_cancel, capture_bound):
        ev = bias.entry_values() if entry_values is None else entry_values
        kw = dict(causal=causal, scale=scale, alpha=alpha, allow_tf32=allow_tf32)

        def key_side(delta, dk, dv):     # beside the dense dQ kernel (BWD_OVERLAP)
            correct_bwd(q, k, v, out, lse, dout, bias, ev, None, dk, dv, need_dvalues=False, delta=delta,
                        parts="kv", **kw)
        dq, dk, dv, delta = flash_bwd(q, k, v, out, lse, dout, None, need_dvalues=False, chunk=chunk,
                                      beside_dq=key_side, **kw)
        return correct_bwd(q, k, v, out, lse, dout, bias, ev, dq, dk, dv, need_dvalues=need_dvalues,
                           delta=delta, parts="q", **kw)
    q, k, v, out, dout = (_last_dim_contiguous(t) for t in (q, k, v, out, dout))
    sign = 1.0
    if scale < 0:
        q, scale, sign = -q, -scale, -1.0
    prec = dot_precision(q.dtype, allow_tf32)
    dev = q.device
    chunk = BWD_CHUNK if chunk is None else chunk
    has_bias = bias is not None and bias.nnz > 0
    E = bias.nnz if bias is not None else 0
    if has_bias:
        if entry_values is None:
            entry_values = bias.entry_values()
        ep, ko, kof, qo = bias.entry_pos, bias.k_order, bias.k_offsets, bias.q_offsets
        tq_max, tk_max = bias.seq_len_q, bias.seq_len_k
        if not may_cancel:
            row_flags = torch.empty(1, dtype=torch.int8, device=dev)
        elif row_flags is None:
            row_flags = _cancel_flags(q, k, lse, bias, entry_values, causal=causal, scale=scale, alpha=alpha,
                                      prec=prec)
        else:
            row_flags = _flags_2d(row_flags, B, Hq, Tq)
        flags = torch.zeros(1, dtype=torch.int32, device=dev)
    else:
        ep = ko = kof = qo = flags = torch.empty(1, dtype=torch.int32, device=dev)
        entry_values = torch.empty(1, dtype=torch.float32, device=dev)
        tq_max = tk_max = 1
        row_flags = torch.empty(1, dtype=torch.int8, device=dev)
    capture = capture_bound is not None
    cap_bits, cap_scale, cap_limit = 0, 1.0, 1.0
    if capture:
        if not isinstance(capture_bound, CaptureBound):
            raise TypeError(f"capture_bound must be a CaptureBound or None, got {type(capture_bound).__name__}")
        want = (Hq, triton.cdiv(Tk, CAPTURE_SEG), Tq)
        w = capture_bound.words
        if (not isinstance(w, torch.Tensor) or tuple(w.shape) != want or w.dtype != torch.int32
                or not w.is_contiguous() or w.device != dev):
            got = f"{w.dtype} {tuple(w.shape)} on {w.device}" if isinstance(w, torch.Tensor) else repr(w)
            raise ValueError(f"capture_bound.words must be a contiguous int32 tensor of shape {want} on {dev}, "
                             f"got {got}")
        t = capture_bound.threshold
        if not isinstance(t, (int, float)) or not (1e-30 < t < float("inf")):
            raise ValueError(f"capture_bound.threshold must be a finite float > 1e-30, got {t!r}")
        if capture_bound.after_dq is not None and not callable(capture_bound.after_dq):
            raise TypeError("capture_bound.after_dq must be callable or None")
        cap_bits, levels = capture_bound_format(B)
        cap_scale, cap_limit = levels / float(t), float(levels * B)
        del w
    delta = torch.empty((B * Hq, Tq), dtype=torch.float32, device=dev)
    lse2 = torch.empty((B * Hq, Tq), dtype=torch.float32, device=dev)
    pre_bm = 64 if D <= 128 else 32
    _bwd_pre_kernel[(triton.cdiv(Tq, pre_bm), B * Hq)](
        out, dout, lse, delta, lse2, row_flags,
        out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2), Hq, Tq, HEAD_DIM=D, BLOCK_M=pre_bm,
        HAS_FLAGS=has_bias and may_cancel,
        num_warps=4)
    need_dval = bool(need_dvalues) and has_bias
    dval_part = torch.zeros((B, E) if need_dval else (1, 1), dtype=torch.float32, device=dev)
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    use_desc = _use_desc(q, k, v, dout)
    q_desc, k_desc, v_desc, do_desc = ((_desc4(t) for t in (q, k, v, dout)) if use_desc else (q, k, v, dout))
    common = dict(HEAD_DIM=D, CAUSAL=bool(causal), HAS_BIAS=has_bias, CHUNK=chunk, DOT_PREC=prec,
                  ENTRY_FORM=_entry_form(bias) if has_bias else 0,
                  **_interpret_desc(use_desc))
    def launch_dq():
        cap_words = capture_bound.words if capture else torch.empty(1, dtype=torch.int32, device=dev)
        _flash_bwd_dq_kernel[lambda meta: (triton.cdiv(Tq, meta["BLOCK_M"]), B * Hq)](
            q, k, v, dout, k_desc, v_desc, dq, lse2, delta, dval_part, ep, entry_values, qo,
            cap_words, cap_scale, cap_limit, triton.cdiv(Tk, CAPTURE_SEG),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            Hq, Hq // Hkv, Tq, Tk, tq_max, E, Tk - Tq, scale * sign, scale * LOG2E, alpha * LOG2E, alpha,
            _len_key(Tq), _len_key(Tk), int(use_desc), NEED_DVAL=need_dval, CAPTURE=cap_bits, **common)

    def launch_dkdv(dk, dv):
        _flash_bwd_dkdv_kernel[lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), B * Hkv)](
            q, k, v, dout, q_desc, do_desc, dk, dv, lse2, delta, ep, entry_values, ko, kof, qo, flags,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            Hq, Hkv, Hq // Hkv, Tq, Tk, tq_max, tk_max, Tk - Tq, scale, scale * LOG2E, alpha * LOG2E,
            _len_key(Tq), _len_key(Tk), int(use_desc), **common)

    if beside_dq is not None:
        dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
        dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
        launch_dkdv(dk, dv)
        side = _priority_stream(dev)
        if side is None:
            beside_dq(delta, dk, dv)
            launch_dq()
        else:
            # every tensor the side stream touches was made on the caller's stream, which waits for
            # the side stream below, before any of them can be freed and reused
            main = torch.cuda.current_stream(dev)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                launch_dq()
            beside_dq(delta, dk, dv)
            main.wait_stream(side)
        return dq, dk, dv, delta
    launch_dq()
    if capture:
        if has_bias and may_cancel:
            # the cancelling rows' P was 0 in the loops: no bound, so every segment of theirs is rescored
            flagged = row_flags.view(B, Hq, Tq).ne(0).any(0)
            capture_bound.words.masked_fill_(flagged[:, None, :], capture_all_pass_word(B))
        if capture_bound.after_dq is not None:
            words, capture_bound.words = capture_bound.words, None
            capture_bound.after_dq(words)
            del words        # the bound's memory is free (stream-ordered) for dK and dV
    dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
    dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
    launch_dkdv(dk, dv)
    if has_bias and may_cancel:  # the cancelling rows, excluded above (lse2 = +inf), done exactly
        _exact_rows(q, k, v, out, lse, dout, bias, entry_values, dq, dk, dv, row_flags,
                    dval_part if need_dval else None, causal=causal, scale=scale, dq_scale=scale * sign,
                    alpha=alpha, prec=prec)
    # with q negated (negative scale), dk = scale' dS (-q) is already right; dq's scale carries the sign
    if not need_dvalues:
        return dq, dk, dv, None
    dvals = dval_part.sum(0) if need_dval else torch.zeros(E, dtype=torch.float32, device=dev)
    return dq, dk, dv, dvals
