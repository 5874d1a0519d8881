"""Deterministic vectors of traces and motifs (SPEC 11; the seeds' embeddings without training).

Trace vectors (dim D, a multiple of 16; default 128)
----------------------------------------------------
u(layer, head, i, j) is the concatenation of four blocks, each of unit norm times 1/2, so that
||u|| = 1:

    layer block  D/4   row `layer` of a fixed seeded table (Gaussian, normalised)
    head block   D/4   row `head` of a second seeded table
    (i, j) block D/4   sinusoidal encodings of the query i (D/8) and the key j (D/8)
    offset block D/4   sinusoidal encoding of the distance i - j

A sinusoidal encoding of p with M frequencies is (sin(p w_m), cos(p w_m)) for
w_m = 10000^(-m / M), m = 0..M-1, divided by sqrt(M). The stored vector is v = strength * u
(the seeds' "scaled by salience").

Similarity of traces is the Euclidean distance between their vectors:
||v1 - v2||^2 = s1^2 + s2^2 - 2 s1 s2 (u1 . u2), where u1 . u2 = (1/4)(layer rows' cosine +
head rows' cosine + (i, j) encodings' cosine + offset encodings' cosine). The table rows of two
different layers (heads) are independent random directions (cosine about +-1/sqrt(D/4)), and the
sinusoidal cosine falls from 1 as positions or offsets move apart (fastest for near positions on
the high frequencies). So two traces are near when they share layer and head, sit at nearby
(i, j) with a similar offset, and have similar strengths; a trace is its own nearest neighbour
(distance 0). Weak traces are near each other whatever their positions (v -> 0 as strength -> 0).

Motif vectors (dim D, default 256)
----------------------------------
Each step of a motif is the pair (start_layer + t, e_t); each pair has a fixed seeded Gaussian
unit vector g(layer, expert). The motif vector is sum_t g(start_layer + t, e_t), normalised to
unit length. The layer in each pair encodes both the start layer and the order.

Similarity of motifs is the cosine of their vectors: about shared / sqrt(len1 * len2), where
`shared` counts the steps (same layer, same expert) they have in common (the Otsuka-Ochiai
coefficient of the two step sets), plus noise of order 1/sqrt(D). A motif and its prefix, or two
motifs sharing experts at the same layers, are closer than motifs with no step in common.

Tables are drawn with numpy's PCG64 from the seed (MEMTRACE_SEED, kind, index), so they are the
same on every machine and version; nothing is learned.
"""
from __future__ import annotations

import functools

import numpy as np

__all__ = ["MOTIF_DIM", "SEED", "TRACE_DIM", "motif_vectors", "trace_vectors"]

SEED = 0x6D656D7472616365  # "memtrace"
TRACE_DIM = 128
MOTIF_DIM = 256
_LAYER, _HEAD, _PAIR = 0, 1, 2


@functools.lru_cache(maxsize=65536)
def _row(kind: int, index: int, dim: int) -> np.ndarray:
    g = np.random.default_rng([SEED & 0xFFFFFFFF, SEED >> 32, kind, int(index), dim])
    v = g.standard_normal(dim)
    return (v / np.linalg.norm(v)).astype(np.float64)


def _table(kind: int, indices: np.ndarray, dim: int) -> np.ndarray:
    """Rows for the distinct values of `indices`, gathered: float64 [N, dim]."""
    uniq, inv = np.unique(indices, return_inverse=True)
    rows = np.stack([_row(kind, int(u), dim) for u in uniq]) if len(uniq) else np.zeros((0, dim))
    return rows[inv.reshape(-1)]


def _sinusoid(p: np.ndarray, width: int) -> np.ndarray:
    """[N, width] encoding of positions p (width even), unit norm per row."""
    m = width // 2
    w = np.power(10000.0, -np.arange(m, dtype=np.float64) / m, dtype=np.float64)
    ang = p.astype(np.float64)[:, None] * w[None, :]
    out = np.empty((p.shape[0], width), dtype=np.float32)
    out[:, 0::2] = np.sin(ang)
    out[:, 1::2] = np.cos(ang)
    out *= np.float32(1.0 / np.sqrt(m))
    return out


def _check_dim(dim, multiple):
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < multiple or dim % multiple:
        raise ValueError(f"dim must be a positive multiple of {multiple}, got {dim!r}")


def trace_vectors(layer, head, q_idx, k_idx, strength, dim: int = TRACE_DIM) -> np.ndarray:
    """float32 [N, dim] vectors of N traces (see the module docstring); inputs are 1-D arrays."""
    _check_dim(dim, 16)
    layer, head = np.asarray(layer, dtype=np.int64), np.asarray(head, dtype=np.int64)
    q, k = np.asarray(q_idx, dtype=np.int64), np.asarray(k_idx, dtype=np.int64)
    s = np.asarray(strength, dtype=np.float32)
    n = layer.shape[0]
    if not all(a.shape == (n,) for a in (head, q, k, s)):
        raise ValueError("layer, head, q_idx, k_idx and strength must be 1-D arrays of one length")
    b = dim // 4
    out = np.empty((n, dim), dtype=np.float32)
    out[:, :b] = _table(_LAYER, layer, b) * 0.5
    out[:, b:2 * b] = _table(_HEAD, head, b) * 0.5
    out[:, 2 * b:2 * b + b // 2] = _sinusoid(q, b // 2) * np.float32(0.5 / np.sqrt(2.0))
    out[:, 2 * b + b // 2:3 * b] = _sinusoid(k, b // 2) * np.float32(0.5 / np.sqrt(2.0))
    out[:, 3 * b:] = _sinusoid(q - k, b) * np.float32(0.5)
    out *= s[:, None]
    return out


def motif_vectors(motifs, dim: int = MOTIF_DIM) -> np.ndarray:
    """float32 [N, dim] unit vectors of motifs given as (start_layer, experts) pairs or Motif objects."""
    _check_dim(dim, 2)
    out = np.zeros((len(motifs), dim), dtype=np.float64)
    for n, m in enumerate(motifs):
        start, experts = (m.start_layer, m.experts) if hasattr(m, "experts") else m
        for t, e in enumerate(experts):
            out[n] += _row(_PAIR, (int(start) + t) * 65536 + int(e), dim)
        norm = np.linalg.norm(out[n])
        if norm > 0:
            out[n] /= norm
    return out.astype(np.float32)
