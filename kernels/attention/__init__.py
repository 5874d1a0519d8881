"""Flash attention in Triton with the sparse trace-bias correction fused into the epilogues.

Modules: fwd.py (flash_fwd), fwd_ws.py (the warp-specialized dense forward), bwd.py (flash_bwd),
entries.py (the per-entry @triton.jit helpers, the correction identity), correct_fwd.py /
correct_bwd.py (the standalone correction after any dense attention), cancel.py (the cancelling
rows), config.py (autotune configs, pruning, heuristics), checks.py (input checks).

    logits = scale * q k^T + alpha * M     (M a memtrace.bias.TraceBias; causal bottom-right)
    out = softmax(logits) v,  lse = logsumexp(logits)  (natural log; -inf and out 0 when masked)

The dense loops never look at the bias (a tile loop with bias work inside fell from 478 to 251
TFLOP/s): the forward runs plain flash attention over its row block, then folds in the entries of
those rows with the exact identity of entries.py. The backward is the standard flash
backward fed O', LSE' plus the entry terms, in the epilogue of the dQ program (by query block,
also dvalues) and of the dK/dV program (by key block, all GQA heads of the kv head, so no
atomics); with dense biases s and dP there are per-entry row dots of gathered rows and only the
scatter into the block is a (one-hot) dot (settings attn_bwd_entries, config.entry_form). When no
row can cancel (may_cancel=False, e.g. non-negative traces) the backward runs no cancelling-row
work at all.

Layouts: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] (any strides, unit stride along D is made if
missing), Hq % Hkv == 0, query head h reads kv head h // (Hq // Hkv). D in 16..256 (powers of 2).

Dense tiles come by TMA (host descriptors over the 4-D tensors) or by pointer loads, per autotune
config (USE_DESC): on the H100 TMA lost without a bias and won with many entries
(docs/perf-log.md, session 6); settings attn_tma "0" / "1" forces one form.

On sm_90, non-causal fp16/bf16 calls with contiguous inputs and Tk % 128 == 0 take another
forward (fwd_ws.py): a dense kernel whose key loop Triton's Hopper pass warp-specializes (544
against ~470 TFLOP/s), then the bias through correct_fwd, in place; the backward is
the same for both forwards.

Cancellation: where the corrected normaliser 1 + sum w of a row falls under
CANCEL_THRESHOLD ("cancelling" rows), a second launch recomputes those rows with the bias applied
inside the tile loop (skipped when no row can cancel), so out and lse stay accurate; the forward
records the rows in an int8 [B, Hq, Tq] flag tensor (flash_fwd(return_flags=True) returns it).
The backward takes those rows out of the fast path and recomputes them exactly
(cancel.py): the preprocess writes lse2 = +inf on flagged rows,
so the dense loops and the entry epilogues see P = 0 there (the same mechanism that drops fully
masked rows: no new work in any loop), and two slow-path launches (_exact_rows_q_kernel,
_exact_rows_kv_kernel) rebuild their dQ, dvalues and dK/dV terms with the bias inside the tile
loop; programs that see no flagged row exit after reading the flags. Without row_flags the
backward recomputes the flags from LSE' (one extra pass over the entries).

Key padding masks (flash_fwd / flash_bwd(key_padding_mask=bool or int8 [B, Tk], nonzero =
attend)): every kernel on the fused path has a constexpr HAS_MASK variant (the unmasked kernels
are unchanged: same code, one unused pointer argument). Forward and dQ run every key block through
their masked loop with the mask loaded per key block; dK/dV run unmasked and store 0 on masked
keys (their P is 0 in every row; a block with no key left skips its loops); every entry helper
drops entries on masked keys (entries.entry_ok), so they add nothing and get zero d values; the
cancelling-row kernels (cancel.py, correct_fwd's recompute) and the capture bound honour the mask.
Masked calls never take the warp-specialized forward or the split forms (correct_fwd /
correct_bwd take no mask). A row with no key left gives out 0, lse -inf, zero gradients.
"""
from .._common import dot_precision
from ..salience.bound import (
    CAPTURE_FIELD_MAX,
    CAPTURE_MIN_LEVELS,
    CAPTURE_SEG,
    CaptureBound,
    capture_all_pass_word,
    capture_bound_fields,
    capture_bound_format,
    capture_bound_passing,
)
from .bwd import flash_bwd
from .cancel import cancelling_rows, exact_rows_bwd, mask_dout, mask_lse
from .checks import SUPPORTED_HEAD_DIMS, key_mask_2d
from .config import capture_supported
from .correct_bwd import correct_bwd
from .correct_fwd import correct_fwd, recompute_flagged_rows
from .entries import CANCEL_THRESHOLD
from .fwd import flash_fwd

__all__ = [
    "CANCEL_THRESHOLD", "CAPTURE_FIELD_MAX", "CAPTURE_MIN_LEVELS", "CAPTURE_SEG", "SUPPORTED_HEAD_DIMS",
    "CaptureBound", "cancelling_rows", "capture_all_pass_word", "capture_bound_fields", "capture_bound_format",
    "capture_bound_passing", "capture_supported", "correct_bwd", "correct_fwd", "dot_precision", "exact_rows_bwd",
    "flash_bwd", "flash_fwd", "key_mask_2d", "mask_dout", "mask_lse", "recompute_flagged_rows",
]
