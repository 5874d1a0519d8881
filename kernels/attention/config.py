"""Launch configurations and heuristics of the attention kernels.

The flash kernels' autotune config lists (kept whole in the decorators) and their early-prune
functions, which also apply the knobs that narrow the lists (settings: attn_tune,
attn_config_slice, attn_tma) per call; the TMA descriptor helpers; the density switches between
the fused and split forms and between the entry epilogues' forms; the standalone correction's
and the exact-row kernels' launch configs.
"""
from __future__ import annotations

import functools

import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from .. import settings
from .._common import INTERPRET
from ..salience.bound import CAPTURE_SEG

SMEM_BYTES = 200 * 1024


def _set_desc_blocks(nargs):
    """Autotune pre-hook: the TMA descriptors' block shape follows the config's tile."""
    for name, block in (("KDesc", "BLOCK_N"), ("VDesc", "BLOCK_N"), ("QDesc", "BLOCK_M"), ("DODesc", "BLOCK_M")):
        desc = nargs.get(name)
        if isinstance(desc, TensorDescriptor):
            desc.block_shape = [1, 1, nargs[block], desc.shape[3]]


def _config(num_warps, num_stages, **kwargs):
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages, pre_hook=_set_desc_blocks)



def fwd_configs():
    if INTERPRET:   # one config (more would be benchmarked); the launch passes USE_DESC
        return [_config(4, 1, BLOCK_M=16, BLOCK_N=16, CHUNK=16, PREFETCH=True)]
    dense = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 4),
             (64, 128, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2)]
    # TMA or pointer loads is a tuning choice: on the H100 (docs/perf-log.md, session 6) TMA lost
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
    tuning (settings attn_tune) keep the first that fits; settings attn_config_slice (k, n) keeps
    every n-th from the k-th."""
    keep = [c for c in configs if smem_of(c) * elsize <= SMEM_BYTES
            and not (D >= 256 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 64)]
    keep = keep or configs[-1:]
    knobs = settings.current()
    if not knobs.attn_tune:
        return keep[:1]
    if knobs.attn_config_slice is not None:
        k, n = knobs.attn_config_slice
        keep = keep[k::n] or keep[:1]
    return keep


def _prune_tma(configs, desc):
    """TMA configs only when the launch passed descriptors (the autotune key's TMA_OK says so);
    settings attn_tma "0" / "1" keeps only pointer / TMA configs. (The interpreter's single config
    has no USE_DESC: its launches pass it, see interpret_desc.)"""
    if INTERPRET:
        return configs
    tma = settings.current().attn_tma
    if not isinstance(desc, TensorDescriptor) or tma == "0":
        keep = [c for c in configs if not c.kwargs["USE_DESC"]]
    elif tma == "1":
        keep = [c for c in configs if c.kwargs["USE_DESC"]]
    else:
        keep = configs
    return keep


def interpret_desc(use_desc):
    """Launch kwargs: under the interpreter USE_DESC comes with the launch, not the config."""
    return {"USE_DESC": use_desc} if INTERPRET else {}


def prune_fwd(configs, named_args, **kwargs):
    D = kwargs["HEAD_DIM"]
    configs = _prune_tma(configs, named_args["KDesc"])
    if not kwargs["HAS_BIAS"]:
        configs = [c for c in configs if not c.kwargs["PREFETCH"]] or configs
    return _prune(configs, D, _elsize(named_args),
                  lambda c: c.kwargs["BLOCK_M"] * D + 2 * c.num_stages * c.kwargs["BLOCK_N"] * D)


def _desc_ok(t):
    """TMA needs a 16-byte aligned base and 16-byte aligned strides, unit stride along D."""
    el = t.element_size()
    return (t.stride(3) == 1 and t.data_ptr() % 16 == 0
            and all((s * el) % 16 == 0 for s in t.stride()[:3]))


def use_tma(*tensors):
    return settings.current().attn_tma != "0" and all(_desc_ok(t) for t in tensors)


def desc4(t):
    """A [B, H, T, D] descriptor; the block shape [1, 1, rows, D] is set per config (_set_desc_blocks)."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, t.shape[3]])


def len_key(t):
    """Autotune bucket for a sequence length (so every length does not retune)."""
    return 1 << max(0, (int(t) - 1).bit_length())

def bwd_configs(kind):
    if INTERPRET:
        return [_config(4, 1, BLOCK_M=16, BLOCK_N=16)]
    if kind == "dkdv":
        shapes = [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 4),
                  (64, 128, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2)]
    else:
        shapes = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4),
                  (128, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)]
    return [_config(w, s, BLOCK_M=bm, BLOCK_N=bn, USE_DESC=d) for d in (True, False) for bm, bn, w, s in shapes]


def prune_dkdv(configs, named_args, **kwargs):
    D = kwargs["HEAD_DIM"]
    configs = _prune_tma(configs, named_args["QDesc"])
    return _prune(configs, D, _elsize(named_args),
                  lambda c: 2 * c.kwargs["BLOCK_N"] * D + 2 * c.num_stages * c.kwargs["BLOCK_M"] * D)


@functools.cache     # asked on every capturing call; the answer is fixed per process
def capture_supported(head_dim: int, element_size: int) -> bool:
    """Whether the dq kernel has a config with BLOCK_N == CAPTURE_SEG that fits (the same shared
    memory estimate and D=256 rule as the pruning), i.e. whether flash_bwd can fill a capture
    bound for this head dim and element size (float32 at D=128 cannot: every such config's
    tiles exceed the shared memory)."""
    if INTERPRET:
        return True
    D = head_dim
    for c in bwd_configs("dq"):
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if bn != CAPTURE_SEG or (D >= 256 and bm * bn > 64 * 64):
            continue
        if (2 * bm * D + 2 * c.num_stages * bn * D) * element_size <= SMEM_BYTES:
            return True
    return False


def prune_dq(configs, named_args, **kwargs):
    D = kwargs["HEAD_DIM"]
    configs = _prune_tma(configs, named_args["KDesc"])
    if kwargs["CAPTURE"]:    # the capture bound's segments are the dq kernel's key blocks
        configs = [c for c in configs if c.kwargs["BLOCK_N"] == CAPTURE_SEG]
    return _prune(configs, D, _elsize(named_args),
                  lambda c: 2 * c.kwargs["BLOCK_M"] * D + 2 * c.num_stages * c.kwargs["BLOCK_N"] * D)


# The backward's entry epilogues (settings attn_bwd_entries): "rows" computes s and dP per entry
# as row dots of gathered rows and scatters with one (dQ) / two (dK, dV) one-hot dots per chunk;
# "onehot" computes s and dP of every row of the block against the chunk's keys on the tensor
# cores (three / four dots per chunk, BM-fold redundant, but no gathers of the block's own rows).
# "auto" takes rows from ROWS_MIN_DENSITY entries per (head, query row) of the bias: on the H100,
# forward+backward over bias=None, B4 H16 T4096 D128 at 4 entries/row: rows +20% vs onehot +29%
# (entries_probe_h100_session7c.json); at 0.5/row both ~3.5%; B1 H32/8 T16384 causal at 1/row:
# onehot +5.6% vs rows +10.5%, at 0.125/row +3.4% vs +7.8% (entries_probe_shape3_h100_session7.json).
ROWS_MIN_DENSITY = 2.0


def entry_form(bias):
    """1 (rows) or 0 (onehot) for the backward's entry epilogues of a non-empty bias."""
    form = settings.current().attn_bwd_entries
    if form != "auto":
        return int(form == "rows")
    return int(bias.nnz >= ROWS_MIN_DENSITY * bias.num_heads * bias.index_rows)


# The backward's entry terms at high density: the fused epilogues run inside the dense kernels'
# programs (1-2 per SM, their registers held by the dense tiles); correct_bwd's standalone kernels
# run many light programs per SM. From BWD_SPLIT_MIN_DENSITY entries per (head, query row)
# flash_bwd runs the dense backward fed (O', LSE') and then correct_bwd, as the cudnn backend does
# (H100, B4 H16 T4096 D128 bf16, docs/perf-log.md: session 11 split from 2 per row;
# with the key side beside the dense dQ kernel (attn_bwd_overlap, session 13) the split form at 0.5 per
# row ties the fused one non-causal (+6.6% vs +6.8% over the unbiased backward) and beats it
# causal (+7.1% vs +12.6%), so it starts there).
# Settings attn_bwd_split: auto (by density), 0 (always fused), 1 (always split, where allowed).
SPLIT_MIN_DENSITY = 2.0          # the forward's switch (attn_fwd_split)
BWD_SPLIT_MIN_DENSITY = 0.5


# The forward alike (settings attn_fwd_split auto/0/1): from SPLIT_MIN_DENSITY entries per row the
# fused kernel's epilogue (which shares the dense kernel's few programs per SM) costs more than the
# unbiased pass followed by correct_fwd (small programs, many per SM). The warp-specialized
# forward always splits (no dot may follow its loop).
def split_forward(bias):
    """Whether flash_fwd (unspecialized path) runs the unbiased pass + correct_fwd for this bias."""
    split = settings.current().attn_fwd_split
    if bias is None or bias.nnz == 0 or split == "0":
        return False
    return split == "1" or bias.nnz >= SPLIT_MIN_DENSITY * bias.num_heads * bias.index_rows


def split_backward(bias, may_cancel, capture_bound):
    """Whether flash_bwd takes the split form (dense backward + correct_bwd) for this call. Never
    with rows that may cancel (the dense backward fed O', LSE' would amplify its rounding on
    their entries; the fused form recomputes them) nor with a capture bound (the fused dQ kernel
    fills it)."""
    split = settings.current().attn_bwd_split
    if bias is None or bias.nnz == 0 or may_cancel or capture_bound is not None or split == "0":
        return False
    return split == "1" or bias.nnz >= BWD_SPLIT_MIN_DENSITY * bias.num_heads * bias.index_rows


# ----------------------------------------------------------------------------------------------
# the standalone correction and the exact-row kernels
# ----------------------------------------------------------------------------------------------
def fwd_block(D):
    return 64 if D <= 128 else 32


def fwd_config(D, entries_per_row, form=None):
    """(form, BLOCK_M or WINDOW, CHUNK, num_warps, register cap, STAGES) of the forward correction
    (form None: picked by density).

    The kernel is bound by the latency of its gathers, so what pays is programs in flight: small
    tiles, few warps, a 128-register cap. Timed on the H100 right after cuDNN's forward
    (benchmarks/tune/tune_correction.py, after_dense_us; B4 H16 T4096 D128 bf16, random traces):
    - 4 entries per row (16384/head): rows of 16, chunks of 32, 2 warps, the entry loop pipelined
      over 2 stages (gathers as asynchronous copies into shared memory): 183-189 us, against 236
      at 64 rows / 4 warps / 3 stages (session 11) and 306 uncapped;
    - 0.5 per row (2048/head): most rows of a block hold no entry, so the window form (programs own
      the rows that start in a window of sorted entries) with windows of 16, one warp, 2 stages,
      in reverse launch order (the first programs find what the dense pass wrote last still in
      L2): 59.5-60.4 us, against 63 in order, 69 with windows of 64 and 81.5 for the rows form
      at 64/16/4 (session 11's choice). At 4 per row the window form is slower (~300 us);
    - 0.75 per row: window 79 us, rows 98-106; 1.5 per row: rows 16/32/2 122.5 us, window 127,
      rows 64/16/4 145 (tune_correction_mid_h100_session12.json): the switch sits at 1."""
    if form is None:
        form = "window" if entries_per_row < 1 and D <= 128 else "rows"
    if D > 128:
        return form, 32, 32, 4, None, 0
    if form == "window":
        return form, 16, 16, 1, 128, 2
    return form, 16, 32, 2, 128, 2


def bwd_q_config(D, entries_per_row, form=None):
    """(form, WINDOW, num_warps) of correct_bwd's query-side launch: the window form below one
    entry per row (for the forward's reason, fwd_config), else blocks of block_m rows. H100, B4
    H16 T4096 D128 bf16 (tune_correction_bwd_window_h100_session12.json), the whole correct_bwd:
    2048/head 240 -> 212 us with windows of 16 on 2 warps (1 warp 219, 4 warps 244, windows of
    32-64 232-242); 3072/head 267 -> 257 us."""
    if form is None:
        form = "window" if entries_per_row < 1 and D <= 128 else "rows"
    return form, 16, 2


def bwd_kv_config(D, entries_per_key, group, form=None):
    """(form, WINDOW, num_warps) of correct_bwd's key-side launch: the window form (keys that start
    in a window of k-ordered entries) below one entry per key, as the query side, but only without
    GQA (its programs would share dK/dV rows across the query heads of a kv head); else blocks of
    block_n keys summing every query head of their kv head."""
    if form is None:
        form = "window" if entries_per_key < 1 and D <= 128 and group == 1 else "rows"
    return form, 16, 2


def reg_cap(maxnreg):
    """Launch options capping registers per thread (not understood by the interpreter)."""
    return {"maxnreg": int(maxnreg)} if maxnreg and not INTERPRET else {}


def slow_blocks(D):
    """(q-kernel BLOCK_M, BLOCK_N, kv-kernel BLOCK_M, BLOCK_N, SCAN) of the exact-row kernels.
    Sized for registers, not speed: they run only on blocks holding a cancelling row."""
    if INTERPRET:
        return 16, 16, 16, 16, 64
    if D <= 64:
        return 32, 64, 32, 64, 1024
    if D <= 128:
        return 32, 32, 32, 64, 1024
    return 16, 32, 16, 32, 1024
