"""Salience capture kernels (SPEC 3): S = mean_b P*|dP| and a = mean_b P, without a Tq x Tk buffer.

tiles.py (every edge that is not a bias entry, tile by tile: PASS 0 / 1 / 2), segments.py (PASS 0
from the segment bound the Triton backward filled), entries.py (the bias entries, exactly),
emit.py (compaction into the edge buffer), bound.py (the segment bound's format, re-exported by
memtrace.kernels.attention with flash_bwd, which fills it).
"""
from .entries import launch_entries
from .segments import SEGMENT_CONFIG, launch_segments
from .tiles import HIST_BINS, HIST_SHIFT, INDEX_TILE, LAST_COMPILED, launch_tiles

__all__ = ["HIST_BINS", "HIST_SHIFT", "INDEX_TILE", "LAST_COMPILED", "SEGMENT_CONFIG", "launch_entries",
           "launch_segments", "launch_tiles"]
