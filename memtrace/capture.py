"""SalienceCapture: the salience S and mean attention a of SPEC 3, filled by the backward pass.

    P[b,h,i,j]  = biased softmax probabilities of the forward pass
    dP[b,h,i,j] = dO[b,h,i,:] . V[b,h//g,j,:]
    S[h,i,j]    = mean_b P*|dP|            a[h,i,j] = mean_b P

What a filled capture holds (everything on the inputs' device, nothing of size Tq x Tk):

``edges``        (head int32, q_idx int32, k_idx int32, S float32, a float32), each [capacity]:
                 the threshold edges, i.e. every edge with S > threshold that is NOT an entry of
                 the bias passed, unique, sorted by (head, q_idx, k_idx); slots past
                 ``num_edges`` are zero. Bias entries are never listed here: they are scored
                 exactly in ``bias_scores`` (so the memory's rule "an edge's score is its bias
                 score if it is a bias entry, else its threshold-edge value" sees one value per
                 edge).
``num_edges``    int32 0-d device tensor, the number of valid leading slots.
``bias_scores``  (S float32 [nnz], a float32 [nnz]) aligned with the bias's COO (user) order
                 (duplicates get the score of their merged entry; entries outside the call's
                 (Tq, Tk) or masked by causal get 0), or None without a bias.
``stats``        dict of device tensors: num_candidates (int64, edges over the threshold before
                 truncation), overflow (bool, num_candidates > capacity), kept_min_salience
                 (float32, the smallest kept S, 0 when nothing is kept), exact (bool, see below).

Overflow guarantee. When more than ``capacity`` edges exceed the threshold, the capture keeps the
``capacity`` strongest: every kept edge has S >= every dropped edge's S, ties at the cut broken
towards the smaller (head, q_idx, k_idx). This is exact as long as the candidates that fall into
the histogram bin of the cut (a bin spans < 1/16 relative: float bits 30..19) fit in the
``capacity``-slot staging buffer; stats["exact"] says so. Otherwise the cut is still within that
bin: every kept S >= every dropped S / (1 + 1/16).

Fused with the Triton backward (memtrace.biased_attention with backend "triton", which "auto"
takes for capturing calls): the backward's dQ kernel, which has P and dP of every tile anyway,
bounds the salience of each (head, query row, 64-key block) in an int32 word of 1-4 integer fields
(kernels.attention.capture_bound_format: 8-bit fields for a batch of at most 5; each field sums
over the batch the rounded-up levels of max P*|dP| over its keys, so it reaches its limit whenever
some edge there that is not a bias entry can have S > threshold). flash_bwd runs dQ before dK/dV
and hands the filled words to `score_segments` before dK and dV are allocated: PASS 0 below becomes
a segment kernel (a program per (block, head) compacts the rows with a passing field and scores
only their edges, exactly, as the tile kernels do), and the bound's memory is free again before
dK/dV take theirs. Random data at B2 / B4 H16 T4096 let 5.6% / 15% of the rows through. Used while
the threshold is > 1e-30, the bound is at most half of q's bytes and a dQ tile of 64 keys fits
(not float32 at D=128, nor D=256); MEMTRACE_CAPTURE_FUSED=0 / 1 forces it off / on. Everything after
PASS 0 is shared.

The buffers the kernels write and the glue after them (staging merge, sort, stats) belong to a
`_FillGlue` shared by every capture of one (device, stream, capacity): 7.5 MiB at the default
capacity, kept between fills; on CUDA the glue is one CUDA-graph replay (MEMTRACE_CAPTURE_GRAPH=0:
eager torch ops), and each fill takes copies of its outputs.

How (CUDA, or the Triton interpreter on the CPU with TRITON_INTERPRET=1): one fused pass
(kernels/salience/tiles.py) computes S and a tile by tile with the batch loop inside (q/k/v/dO through
TMA descriptors when their rows are contiguous), appends the candidates to the buffer (one atomic
per tile), counts them and records each tile's largest S. Only on overflow (decided on the device:
the later kernels exit at once otherwise, the host never syncs) two more passes recompute the
tiles that can hold winners: one builds a 4096-bin histogram of the candidates' float bits, which
gives the bin of the cut; the next writes the candidates above that bin directly and those inside
it to a staging buffer, whose strongest are then picked by a sort. So a fill that fits costs one
pass and an overflowing fill three. Bias entries are scored by a separate gather kernel,
O(entries x batch x head_dim). Without CUDA and without the interpreter the dense float64
reference (memtrace.reference.salience) fills the same fields.
"""
from __future__ import annotations

import functools
import math

import torch

from . import _validate as V
from .config import settings as _settings
from .config import triton_interpreter as _triton_interpreter

__all__ = ["DEFAULT_CAPACITY", "SalienceCapture"]

DEFAULT_CAPACITY = 1 << 17
LOG2E = 1.4426950408889634
_INT64_MAX = torch.iinfo(torch.int64).max

# Tile configuration (BLOCK_M, BLOCK_N, num_warps, num_stages, per_tile) per head dim on CUDA; not
# autotuned on purpose: the kernel appends with atomics, so timing reruns would corrupt the
# counters, and every pass of one fill must use the same tiles (tile_max is indexed by tile).
# per_tile 0: the streaming kernel (a program walks its key tiles in one pipelined loop); 1: a
# program per BLOCK_M x BLOCK_N tile (slower on the H100, kept for the overflow passes' kernel).
_CUDA_CONFIGS = {16: (128, 64, 4, 3, 0), 32: (128, 64, 4, 3, 0), 64: (128, 64, 4, 3, 0),
                 128: (128, 64, 8, 2, 0), 256: (64, 64, 8, 1, 0)}
_INTERPRETER_CONFIG = (32, 32, 4, 1, 0)
_CONFIG_OVERRIDE = None      # set by benchmarks / tests to try other tiles
# The 4096-bin histogram inside the main pass costs registers (ptxas: 255 regs and ~4 KB of spills
# per thread at 128x64 tiles against ~0.3 KB without), so by default it runs as its own pass, only
# on overflow (the device-side check makes it a no-op launch otherwise).
_HIST_IN_MAIN = False


# How a streamed tile appends its candidates (memtrace.config: capture_emit, default 512): N > 0,
# one atomic per candidate when the tile has at most N (else one atomic per tile and a tile-wide
# scan); 0, always the latter. Measured on the H100 (docs/perf-log.md; a third way, one atomic per
# row and a scan along it, spilled and was slower). capture_segment_emit makes the same choice for
# the fused fill's segment kernel: both modes take the same time there, and the ranked one spills
# at 128-row chunks.
_USE_DESC = True             # TMA descriptors for q/k/v/dO when their rows are contiguous (else pointers)


# The fused path (memtrace.biased_attention with the Triton backend): the backward's dQ kernel
# bounds each (head, row, 64-key segment) in an int32 word of 1-4 fields, and the fill rescores
# only the segments whose word has a passing field. "auto" takes it while the bound (4 bytes per
# row and segment) is at most half of q's bytes; MEMTRACE_CAPTURE_FUSED=1 / 0 forces it on / off.
# Not below a threshold of 1e-30 (every row passes such a bound: the unfused fill is faster).
_FUSED_MAX_BOUND_OVER_Q = 0.5
_FUSED_MIN_THRESHOLD = 1e-30
# The bound is filled against threshold * (1 - 1/64): the dQ kernel's P*|dP| and the rescoring's
# differ by float32 rounding, far below that margin.
_BOUND_MARGIN = 1.0 / 64


def _fused_mode() -> str:
    return _settings().capture_fused


def _use_interpreter() -> bool:
    return _triton_interpreter()


class SalienceCapture:
    """Collects salience edges during the backward of `memtrace.biased_attention(..., capture=)`.

    threshold: edges with S > threshold are kept (a finite float >= 0).
    capacity:  the size of the bounded edge buffer; on overflow the strongest are kept.
    """

    def __init__(self, threshold: float = 0.0, capacity: int = DEFAULT_CAPACITY):
        self.threshold = threshold
        self.capacity = V.check_capture_capacity(capacity)
        self._clear()

    # -- parameters --------------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value) -> None:
        self._threshold = V.check_capture_threshold(value)

    def _clear(self) -> None:
        self._edges = None
        self._num_edges = None
        self._bias_scores = None
        self._stats = None
        self.bias = None
        self.num_heads = None
        self.seq_len_q = None
        self.seq_len_k = None

    # -- results -----------------------------------------------------------------------------------
    @property
    def filled(self) -> bool:
        return self._edges is not None

    def _need_filled(self):
        if self._edges is None:
            raise RuntimeError("SalienceCapture has not been filled yet: pass it as capture= to "
                               "memtrace.biased_attention and back-propagate the output")

    @property
    def edges(self):
        self._need_filled()
        return self._edges

    @property
    def num_edges(self) -> torch.Tensor:
        self._need_filled()
        return self._num_edges

    @property
    def bias_scores(self):
        self._need_filled()
        return self._bias_scores

    @property
    def stats(self) -> dict:
        self._need_filled()
        return self._stats

    def valid_edges(self):
        """The valid edges as (head, q_idx, k_idx, S, a), trimmed (one host sync; not for hot loops)."""
        n = int(self.num_edges)
        return tuple(t[:n] for t in self.edges)

    def __repr__(self) -> str:
        state = "filled" if self.filled else "empty"
        return f"SalienceCapture(threshold={self.threshold}, capacity={self.capacity}, {state})"

    # -- filling (called by the attention backward) -------------------------------------------------
    def _bound_shape(self, q, k):
        """The segment bound's shape for this call when the fused fill applies, else None."""
        mode = _fused_mode()
        if mode == "0" or not (q.is_cuda or (_use_interpreter() and q.dtype != torch.float64)):
            return None
        if not self.threshold > _FUSED_MIN_THRESHOLD:
            return None
        from memtrace.kernels.attention import CAPTURE_SEG, capture_supported
        if not capture_supported(q.shape[-1], q.element_size()):
            return None
        shape = (q.shape[1], -(-k.shape[2] // CAPTURE_SEG), q.shape[2])
        if mode == "auto" and 4 * math.prod(shape) > _FUSED_MAX_BOUND_OVER_Q * q.numel() * q.element_size():
            return None
        return shape

    def fused_bound_applies(self, q, k) -> bool:
        return self._bound_shape(q, k) is not None

    def fused_bound(self, q, k):
        """A kernels.attention.CaptureBound (zeroed int32 words, the threshold to fill them against)
        for the Triton backward when the fused fill applies to this call, else None."""
        shape = self._bound_shape(q, k)
        if shape is None:
            return None
        from memtrace.kernels.attention import CaptureBound
        return CaptureBound(torch.zeros(shape, dtype=torch.int32, device=q.device), _bound_threshold(self.threshold))

    @torch.no_grad()
    def score_segments(self, q, k, v, lse, dout, bias, words, *, causal, scale, bound, key_padding_mask=None):
        """The fused fill's PASS 0, for flash_bwd's after_dq: rescore the segments that the filled
        bound `words` lets through, into the shared glue (the `fill` that follows, given `bound`,
        does the rest); `words` is not kept."""
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        _score_segments(self, q, k, v, lse, dout, bias, causal, scale, words, _kernel_mask(key_padding_mask))
        bound.scored = True

    @torch.no_grad()
    def fill(self, q, k, v, out, lse, dout, bias, entry_values, *, causal=False, scale=None, alpha=1.0,
              bound=None, key_padding_mask=None):
        """Fill from the backward's tensors. out / lse: the BIASED forward output and natural-log
        log-sum-exp (float32 [B, Hq, Tq], -inf on fully masked rows); dout: the output gradient;
        bias: TraceBias or None; entry_values: bias.entry_values() or None; bound: the
        CaptureBound of `fused_bound` that the Triton backward filled (and whose segments its
        after_dq may have scored already, see `score_segments`); None: every tile is scored.
        alpha: a float or a 0-d tensor (used on the device, no sync). key_padding_mask: None or
        bool [B, Tk] (True = attend): P = 0 on masked keys, so an edge (h, i, j) whose key is masked
        in every batch element scores S = a = 0 and is never listed; a bias entry there scores 0."""
        V.check_capture_fill_inputs(q, k, v, lse, dout, bias)
        B, Hq, Tq, D = q.shape
        Tk = k.shape[2]
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        if not isinstance(alpha, torch.Tensor):
            alpha = float(alpha)
        if key_padding_mask is not None:
            V.check_key_padding_mask(key_padding_mask, q, k)
        if bias is not None and entry_values is None:
            entry_values = bias.entry_values()
        if q.is_cuda or (_use_interpreter() and q.dtype != torch.float64):
            if q.is_cuda:
                with torch.cuda.device(q.device):
                    result = _fill_triton(self, q, k, v, lse, dout, bias, entry_values, causal, scale, alpha,
                                          bound, key_padding_mask)
            else:
                result = _fill_triton(self, q, k, v, lse, dout, bias, entry_values, causal, scale, alpha, bound,
                                      key_padding_mask)
        else:
            result = _fill_dense(self, q, k, v, dout, bias, causal, scale, alpha, key_padding_mask)
        self._edges, self._num_edges, self._bias_scores, self._stats = result
        self.bias = bias
        self.num_heads, self.seq_len_q, self.seq_len_k = Hq, Tq, Tk


# ---- shared helpers ------------------------------------------------------------------------------

def _narrow_keys(num_heads, Tq, Tk) -> bool:
    """Whether every (head, q, k) key fits an int32 (a radix sort of 4-byte keys takes about half
    the time of 8-byte ones)."""
    return num_heads * Tq * Tk < 2**31 - 1


def _edge_keys(h, i, j, live, Tq, Tk, narrow):
    """(head, q, k) as one sortable integer, the largest value where not `live`: int32 when
    `narrow` (see _narrow_keys), else int64. Tq, Tk: ints or 0-d integer tensors."""
    if narrow:
        key = (h * Tq + i) * Tk + j
        return torch.where(live, key, torch.full_like(key, 2**31 - 1))
    key = (h.long() * Tq + i.long()) * Tk + j.long()
    return torch.where(live, key, torch.full_like(key, _INT64_MAX))


def _bound_threshold(threshold: float) -> float:
    """The threshold that the fused bound is filled and read against (see _BOUND_MARGIN)."""
    return _kernel_threshold(threshold) * (1.0 - _BOUND_MARGIN)


def _edge_rows(rows):
    """(h, i, j int32, S, a float32) views of an int32 [5, n] edge buffer (S and a as float bits)."""
    return rows[0], rows[1], rows[2], rows[3].view(torch.float32), rows[4].view(torch.float32)


def _sorted_rows(rows, num_edges, capacity, Tq, Tk, narrow):
    """The first `num_edges` edges of `rows` (int32 [5, >= capacity]: h, i, j and the bits of S, a)
    ordered by (head, q, k), the rest zero, as a new int32 [5, capacity] tensor (device-only; the
    five rows move together, so each step is one op whatever the number of fields)."""
    rows = rows[:, :capacity]
    slot = torch.arange(capacity, device=rows.device)
    valid = slot < num_edges
    _, perm = torch.sort(_edge_keys(rows[0], rows[1], rows[2], valid, Tq, Tk, narrow))
    return torch.where(valid, rows[:, perm], 0)


def _sort_edges(rows, num_edges, capacity, Tq, Tk, narrow):
    """_sorted_rows as (h, i, j, S, a)."""
    return _edge_rows(_sorted_rows(rows, num_edges, capacity, Tq, Tk, narrow))


def _kept_min(S, num_edges):
    """The smallest S of the first num_edges slots (0 when there are none)."""
    slot = torch.arange(S.shape[0], device=S.device)
    kept = torch.where(slot < num_edges, S, torch.full_like(S, float("inf"))).min() if S.numel() else \
        torch.tensor(float("inf"), device=S.device)
    return torch.where(num_edges > 0, kept, torch.zeros_like(kept))


def _make_stats(edges, num_edges, num_candidates, capacity, exact):
    return {"num_candidates": num_candidates, "overflow": num_candidates > capacity,
            "kept_min_salience": _kept_min(edges[3], num_edges), "exact": exact}


# ---- Triton path (CUDA or interpreter) ------------------------------------------------------------

# The glue after the fill's kernels runs as a CUDA graph (config capture_graph; False: eager ops).
_GLUE_CACHE: dict = {}
_GLUE_CACHE_SIZE = 8


class _FillGlue:
    """The buffers that a fill's kernels write and the device-side glue after them, shared by every
    capture of one (device, stream, capacity, key width): fills on one stream run in order, and
    each takes copies of the glue's outputs.

    Buffers: one int64 scratch (counters: candidates, winners, staged; then the histogram), and
    int32 [5, capacity + 1] edge rows and staged rows (h, i, j and the bits of S and a, so that a
    gather or scatter moves all five fields at once; slots past a count are never read unmasked).
    Glue: merge the strongest staged edges on overflow, sort the edges by (head, q, k), the stats.
    On CUDA it is captured once into a CUDA graph and replayed: its ~60 small torch ops took
    ~1 ms of host time a fill on the H100 machine's host, more than their GPU time, and bounded a
    capturing step. Tq and Tk reach it as device scalars, so one graph serves every length."""

    def __init__(self, device, capacity, narrow):
        from memtrace.kernels.salience import HIST_BINS

        self.capacity, self.narrow = capacity, narrow
        self.scratch = torch.zeros(3 + HIST_BINS // 2, dtype=torch.int64, device=device)
        self.cnt = self.scratch[:3]
        self.hist = self.scratch[3:].view(torch.int32)
        self.out_rows = torch.empty((5, capacity + 1), dtype=torch.int32, device=device)
        self.stg_rows = torch.empty_like(self.out_rows)
        self.out, self.staging = _edge_rows(self.out_rows), _edge_rows(self.stg_rows)
        self.dims = torch.zeros(2, dtype=torch.int64, device=device)
        self._dims_now = None
        self._graph = None
        self._static = None
        self._all_tiles = None

    def all_tiles(self, n_tiles):
        """Tile maxima of +inf for n_tiles tiles (read only: the overflow passes then visit every
        tile), kept for the next fill of the same tiles."""
        if self._all_tiles is None or self._all_tiles.numel() != n_tiles:
            self._all_tiles = torch.full((n_tiles,), float("inf"), dtype=torch.float32, device=self.scratch.device)
        return self._all_tiles

    def begin(self, Tq, Tk):
        """Before the kernels: zero the counters and histogram, set the lengths."""
        self.scratch.zero_()
        if self._dims_now != (Tq, Tk):
            self.dims[0].fill_(Tq)
            self.dims[1].fill_(Tk)
            self._dims_now = (Tq, Tk)

    def _body(self):
        cap, cnt = self.capacity, self.cnt
        Tq, Tk = self.dims[0], self.dims[1]
        overflow = cnt[0] > cap
        _merge_staging(self.out_rows, self.stg_rows, cnt[1], cnt[2].clamp(max=cap), overflow, cap, Tq, Tk,
                       self.narrow)
        num_edges = torch.clamp(cnt[0], max=cap).to(torch.int32)
        rows = _sorted_rows(self.out_rows, num_edges, cap, Tq, Tk, self.narrow)
        exact = ~overflow | (cnt[2] <= cap)
        return rows, num_edges, cnt[0].clone(), overflow, _kept_min(rows[3].view(torch.float32), num_edges), exact

    def finish(self):
        """After the kernels: (edges, num_edges, stats), tensors of their own."""
        if not (_settings().capture_graph and self.scratch.is_cuda) or torch.cuda.is_current_stream_capturing():
            outs = self._body()          # eager (also inside a caller's own graph capture)
        else:
            if self._graph is None:
                self._capture()
            self._graph.replay()
            outs = [t.clone() for t in self._static]
        rows, num_edges, num_candidates, overflow, kept, exact = outs
        stats = {"num_candidates": num_candidates, "overflow": overflow, "kept_min_salience": kept,
                 "exact": exact}
        return _edge_rows(rows), num_edges, stats

    def _capture(self):
        stream = torch.cuda.current_stream(self.scratch.device)
        side = torch.cuda.Stream(self.scratch.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            self._body()             # warm-up before capture (the merge is idempotent)
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            static = self._body()
        stream.wait_stream(side)
        self._graph, self._static = graph, static


def _fill_glue(device, capacity, narrow) -> _FillGlue:
    """The shared _FillGlue for this device, current stream, capacity and key width (a few are
    kept; the oldest is dropped)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    key = (str(device), stream, capacity, narrow)
    glue = _GLUE_CACHE.pop(key, None)
    if glue is None:
        glue = _FillGlue(device, capacity, narrow)
        while len(_GLUE_CACHE) >= _GLUE_CACHE_SIZE:
            _GLUE_CACHE.pop(next(iter(_GLUE_CACHE)))
    _GLUE_CACHE[key] = glue            # most recent last
    return glue


# float32 inputs: the tiles above need more shared memory than the H100 has at D >= 128 (sm_90
# compile: 262 KB at D=128); these fit (197 KB).
_CUDA_CONFIGS_FP32 = {128: (64, 64, 8, 2, 0), 256: (32, 64, 4, 1, 0)}


def _config(D, device, element_size=2):
    if _CONFIG_OVERRIDE is not None:
        return _CONFIG_OVERRIDE
    if device.type == "cuda":
        if element_size == 4 and D in _CUDA_CONFIGS_FP32:
            return _CUDA_CONFIGS_FP32[D]
        return _CUDA_CONFIGS[D]
    return _INTERPRETER_CONFIG


def _entry_tiles(bias, Hq, Tq, Tk, index_tile):
    """Sorted bias entries bucketed by (head, i // 128, j // 128) index tiles, for the tile
    kernel's 'is this edge an entry' test: (offsets int32 [tiles+1], i int32, j int32, tm, tn)."""
    h, i, j = bias.entry_coords()
    tiles_m = -(-Tq // index_tile)
    tiles_n = -(-Tk // index_tile)
    n_tiles = Hq * tiles_m * tiles_n
    inside = (i < Tq) & (j < Tk)
    tile = (h * tiles_m + i // index_tile) * tiles_n + j // index_tile
    tile = torch.where(inside, tile, torch.full_like(tile, n_tiles))
    tile_sorted, perm = torch.sort(tile, stable=True)
    offsets = torch.searchsorted(tile_sorted, torch.arange(n_tiles + 1, device=h.device)).to(torch.int32)
    return offsets, i[perm].to(torch.int32), j[perm].to(torch.int32), tiles_m, tiles_n


@functools.lru_cache(maxsize=64)       # on every fill: a few CPU tensor ops of host time
def _kernel_threshold(threshold: float) -> float:
    """The threshold as the kernels must receive it. Triton passes a Python float as float32, and
    round-to-nearest can move it up onto an S value just above it (2 - 1e-12 -> 2.0f): an edge
    with S = 2.0 > threshold would then be dropped. The largest float32 <= threshold keeps the
    float32 test `S > t32` identical to `S > threshold` for every float32 S."""
    t32 = torch.tensor(threshold, dtype=torch.float32)
    if float(t32) > threshold:
        t32 = torch.nextafter(t32, torch.tensor(float("-inf"), dtype=torch.float32))
    return float(t32)


def _kernel_mask(key_padding_mask):
    """The key padding mask as the salience kernels read it (int8 [B, Tk] contiguous), or None."""
    if key_padding_mask is None:
        return None
    from memtrace.kernels.attention import key_mask_2d
    return key_mask_2d(key_padding_mask, key_padding_mask.shape[0], key_padding_mask.shape[1],
                       key_padding_mask.device)


def _score_segments(cap, q, k, v, lse, dout, bias, causal, scale, words, kmask=None):
    """PASS 0 of a fused fill from the filled bound words (see `_salience_segment_kernel`): reset
    the shared glue's counters and rescore the segments that pass. The backward's dots ran in IEEE
    float32 for float32 inputs (flash_bwd's default); the rescoring uses the same, so that the
    bound holds for the values it produces."""
    from memtrace.kernels import salience as K
    from memtrace.kernels.attention import CAPTURE_SEG, capture_bound_format

    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    glue = _fill_glue(q.device, cap.capacity, _narrow_keys(Hq, Tq, Tk))
    glue.begin(Tq, Tk)
    bits, levels = capture_bound_format(B)
    K.launch_segments(q, k, v, dout, lse.float(), words, seg=CAPTURE_SEG, bits=bits, bound_limit=levels * B,
                      threshold=_kernel_threshold(cap.threshold), qk_scale=scale * LOG2E,
                      causal_offset=(Tk - Tq) if causal else Tk, bias=bias, cnt=glue.cnt, capacity=cap.capacity,
                      out=glue.out, precision="ieee", sparse_emit=_settings().capture_segment_emit,
                      key_padding_mask=kmask)


def _fill_triton(cap, q, k, v, lse, dout, bias, entry_values, causal, scale, alpha, bound=None,
                 key_padding_mask=None):
    """bound: None (PASS 0 scores every tile) or the fused path's CaptureBound: its segments already
    scored by the backward (bound.scored), or still to score from bound.words. alpha: a float or
    a 0-d tensor; key_padding_mask: None or bool [B, Tk]."""
    kmask = _kernel_mask(key_padding_mask)
    from memtrace.kernels import salience as K

    _, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    device = q.device
    capacity = cap.capacity
    threshold = _kernel_threshold(cap.threshold)
    config = _config(D, device, q.element_size())
    bm, bn = config[0], config[1]
    if q.dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"
    else:
        precision = "ieee"
    qk_scale = scale * LOG2E
    causal_offset = (Tk - Tq) if causal else Tk
    lse = lse.float() if lse.dtype != torch.float32 else lse

    # The kernels write into the shared glue's buffers (see _FillGlue): counters, histogram, edge
    # rows and staged rows; its glue then merges, sorts and counts them.
    glue = _fill_glue(device, capacity, _narrow_keys(Hq, Tq, Tk))
    if bound is not None and not bound.scored:
        words, bound.words = bound.words, None
        _score_segments(cap, q, k, v, lse, dout, bias, causal, scale, words, kmask)
        del words
    elif bound is None:
        glue.begin(Tq, Tk)
    cnt, hist, out, staging = glue.cnt, glue.hist, glue.out, glue.staging
    n_tiles = Hq * (-(-Tq // bm)) * (-(-Tk // bn))
    # The fused PASS 0 does not record tile maxima: +inf sends every tile to the overflow passes.
    tile_max = glue.all_tiles(n_tiles) if bound is not None else \
        torch.full((n_tiles,), -1.0, dtype=torch.float32, device=device)
    entries = None
    if bias is not None and bias.nnz > 0:
        entries = _entry_tiles(bias, Hq, Tq, Tk, K.INDEX_TILE)

    hist_in_main = _HIST_IN_MAIN and config[4] != 0      # the streaming kernel never histograms
    common = dict(threshold=threshold, qk_scale=qk_scale, causal_offset=causal_offset,
                  entries=entries, cnt=cnt, capacity=capacity, out=out, staging=staging,
                  stg_capacity=capacity, tile_max=tile_max, hist=hist, config=config,
                  precision=precision, hist_in_main=hist_in_main, use_desc=_USE_DESC,
                  sparse_emit=_settings().capture_emit, key_padding_mask=kmask)
    if bound is None:
        K.launch_tiles(0, q, k, v, dout, lse, **common)
    # The overflow passes (no-ops without overflow) read through pointers: no descriptors to build,
    # so their launches take FastLaunch's short path.
    overflow_common = {**common, "use_desc": False}
    if not hist_in_main:
        K.launch_tiles(1, q, k, v, dout, lse, **overflow_common)
    K.launch_tiles(2, q, k, v, dout, lse, **overflow_common)   # finds the cut bin in the histogram itself

    edges, num_edges, stats = glue.finish()

    bias_scores = None
    if bias is not None:
        bias_scores = _score_entries_triton(q, k, v, lse, dout, bias, entry_values, scale, alpha,
                                            causal_offset, kmask)
    return edges, num_edges, bias_scores, stats


def _merge_staging(out_rows, stg_rows, winners, staged, overflow, capacity, Tq, Tk, narrow):
    """On overflow: edge slots [winners, capacity) get the strongest staged edges (S descending,
    ties by the smaller (head, q, k)); without overflow nothing moves (all on the device). Both
    buffers are int32 [5, capacity + 1] edge rows (see _fill_triton)."""
    stg = stg_rows[:, :capacity]
    slot = torch.arange(capacity, device=stg.device)
    live = slot < staged
    key = _edge_keys(stg[0], stg[1], stg[2], live, Tq, Tk, narrow)
    if narrow:
        # One sort: S >= 0, so its float bits order like S; descending S in the high 33 bits,
        # the 31-bit edge key below (it runs every fill, overflow or not: two sorts cost ~35 us).
        desc = (0x7FFFFFFF - stg[3].clamp(min=0)).long()
        order = torch.where(live, (desc << 31) | key.long(), torch.full_like(desc, _INT64_MAX))
        perm = torch.sort(order).indices
    else:
        _, by_key = torch.sort(key, stable=True)
        s_by_key = torch.where(live, stg[3].view(torch.float32), -1.0)[by_key]
        _, by_s = torch.sort(s_by_key, descending=True, stable=True)
        perm = by_key[by_s]
    take = slot < torch.minimum((capacity - winners) * overflow, staged)
    dest = torch.where(take, winners + slot, capacity)          # capacity: the dump slot
    out_rows.scatter_(1, dest.expand(5, -1), stg[:, perm])


def _score_entries_triton(q, k, v, lse, dout, bias, entry_values, scale, alpha, causal_offset, kmask=None):
    from memtrace.kernels import salience as K

    values = entry_values.detach().float()
    if isinstance(alpha, torch.Tensor):     # a tensor alpha folded into the values (no host sync)
        values, alpha = values * alpha.detach().float(), 1.0
    h, i, j = bias.entry_coords()
    E = h.shape[0]
    S_sorted = torch.zeros(E, dtype=torch.float32, device=q.device)
    a_sorted = torch.zeros(E, dtype=torch.float32, device=q.device)
    K.launch_entries(q, k, v, dout, lse, h.to(torch.int32), i.to(torch.int32), j.to(torch.int32),
                     values.contiguous(), S_sorted, a_sorted,
                     qk_scale=scale * LOG2E, alpha_log2=alpha * LOG2E, causal_offset=causal_offset,
                     key_padding_mask=kmask)
    src = bias.src_entry.long()
    return S_sorted[src], a_sorted[src]


# ---- dense reference path (CPU without the interpreter, float64) ---------------------------------

def _fill_dense(cap, q, k, v, dout, bias, causal, scale, alpha, key_padding_mask=None):
    from memtrace import reference as R
    from memtrace.reference.attention import _expand_kv, probabilities

    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    device = q.device
    capacity = cap.capacity
    dense_bias = None
    if bias is not None:
        dense_bias = R.dense_bias(bias.head, bias.q_idx, bias.k_idx, bias.value.detach(), Hq, Tq, Tk)
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.detach().double()
    if key_padding_mask is None:
        S, a = R.salience(q.double(), k.double(), v.double(), dout.double(), dense_bias,
                          causal=causal, scale=scale, alpha=alpha)
    else:       # R.salience with the mask: P = 0 on masked keys
        probs = probabilities(q.double(), k.double(), dense_bias, causal=causal, scale=scale, alpha=alpha,
                              key_padding_mask=key_padding_mask)
        dprobs = torch.matmul(dout.double(), _expand_kv(v.double(), Hq).transpose(-1, -2))
        S, a = (probs * dprobs.abs()).mean(dim=0), probs.mean(dim=0)
    cand = S > cap.threshold
    if bias is not None:
        inside = (bias.q_idx < Tq) & (bias.k_idx < Tk)
        is_entry = torch.zeros_like(cand)
        is_entry[bias.head[inside], bias.q_idx[inside], bias.k_idx[inside]] = True
        cand &= ~is_entry
    h, i, j = torch.nonzero(cand, as_tuple=True)          # row-major: sorted by (h, i, j)
    vals = S[h, i, j]
    n_cand = h.shape[0]
    if n_cand > capacity:
        order = torch.sort(-vals, stable=True).indices[:capacity]   # ties: smaller key first
        h, i, j = h[order], i[order], j[order]
    n = min(n_cand, capacity)
    rows = torch.zeros((5, capacity), dtype=torch.int32, device=device)
    buffers = _edge_rows(rows)
    for dst, src in zip(buffers, (h, i, j, S[h, i, j], a[h, i, j])):
        dst[:n] = src.to(dst.dtype)
    num_edges = torch.tensor(n, dtype=torch.int32, device=device)
    edges = _sort_edges(rows, num_edges, capacity, Tq, Tk, _narrow_keys(Hq, Tq, Tk))
    num_candidates = torch.tensor(n_cand, dtype=torch.int64, device=device)
    stats = _make_stats(edges, num_edges, num_candidates, capacity, torch.tensor(True, device=device))
    bias_scores = None
    if bias is not None:
        inside = (bias.q_idx < Tq) & (bias.k_idx < Tk)
        hh = torch.where(inside, bias.head, 0)
        ii = torch.where(inside, bias.q_idx, 0)
        jj = torch.where(inside, bias.k_idx, 0)
        zero = torch.zeros((), dtype=S.dtype, device=device)
        bias_scores = (torch.where(inside, S[hh, ii, jj], zero).float(),
                       torch.where(inside, a[hh, ii, jj], zero).float())
    return edges, num_edges, bias_scores, stats
