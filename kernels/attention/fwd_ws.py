"""The warp-specialized dense forward (Hopper) and when it runs.

Hopper warp specialization of the dense forward (settings attn_ws): "auto" runs non-causal
fp16/bf16 calls with contiguous inputs and Tk a multiple of the key tile through
_flash_fwd_ws_kernel on sm_90 (then the bias, if any, through the standalone correction); "0"
never. Triton 3.6's Hopper pass splits the loop into a TMA producer warp and two consumer
warpgroups of 64 rows each; it fails to compile when any dot follows the specialized loop (a
masked tail loop or the fused entry epilogue), which is why the bias needs a second launch.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import settings
from .._common import INTERPRET, LOG2E
from ..launch import FastLaunch

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
    WS=False (the warp-specialization probe, docs/perf-log.md) runs the same loop unspecialized."""
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


def ensure_allocator():
    """Device-side descriptors need an allocator (triton.set_allocator); set ours only where the
    caller has not set one (Triton's default raises at launch)."""
    from triton.runtime import _allocation
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)


@functools.cache
def _capability_major(device_index: int) -> int:
    """The compute capability's major number of a CUDA device (asked once: ws_usable runs on
    every forward)."""
    return torch.cuda.get_device_capability(device_index)[0]


def ws_usable(q, k, v, causal, D, Tk):
    """The warp-specialized dense forward runs this call (see the module docstring)."""
    if (settings.current().attn_ws == "0" or INTERPRET or causal or not q.is_cuda
            or q.dtype not in (torch.float16, torch.bfloat16)):
        return False
    if D not in (64, 128) or Tk % WS_BLOCK_N != 0 or Tk == 0 or q.shape[2] == 0:
        return False
    if _capability_major(q.device.index if q.device.index is not None else torch.cuda.current_device()) != 9:
        return False
    return all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (q, k, v))



def flash_fwd_ws(q, k, v, out, lse, *, scale):
    """The unbiased dense forward into out, lse (natural) with the warp-specialized kernel
    (ws_usable(...) must hold)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    ensure_allocator()
    _WS_FAST[(triton.cdiv(Tq, WS_BLOCK_M), B * Hq)](
        q, k, v, out, lse, out.stride(0), out.stride(1), out.stride(2), B, Hq, Hkv, Hq // Hkv, Tq, Tk,
        scale * LOG2E, HEAD_DIM=D, BLOCK_M=WS_BLOCK_M, BLOCK_N=WS_BLOCK_N, num_warps=4, num_stages=2)
