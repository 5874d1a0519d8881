"""Seeded synthetic tasks for the ablation experiment (issue 29, SPEC 10), generated on the fly.

Every task returns a `Batch`:
    input_ids  int64 [B, T]
    labels     int64 [B, T], Hugging Face convention (aligned with input_ids; the model at position
               p predicts labels[:, p + 1]); -100 where a position is not scored
    edges      int64 [B, E, 2] (query, key) pairs, -1 padded, or None: the *useful edges* of each
               example. The query is the position that predicts a scored token (target position
               - 1), the key the position that holds the token to produce. Attending from each
               query exactly to its key and copying the key's token solves the task
               (`answer_from_edges`, which the tests use as the oracle).

Token ids: 0 FILL (unscored filler), 1 SEP (delimiter), 2 QRY (query marker), the rest is the
content vocabulary (tasks split it where they need two kinds of tokens).

Tasks (T = sequence length, n = copied span):
    copy            [x_1..x_n] SEP [x_1..x_n] FILL..., n drawn per example in [T/4, (T-1)/2]: the
                    query at position n + j predicts x_{j+1}, at key j, so key = query - n: the
                    offset changes with n between examples.
    fixed_copy      the same with n = (T-1) // 2 for every example: the useful edges sit at the
                    same absolute (query, key) positions in every example, the honest best case
                    for traces, which are indexed by absolute position.
    fixed_copy_gap  its harm control: [x_1..x_n] FILL*g SEP [x_1..x_n] FILL..., n fixed
                    (= (T-1-G) // 2 with G = gap_max) and g drawn per example in [0, G], so the
                    query-key offset (n + g) moves between examples (a sliding prefix would keep
                    the offset; a gap does not).
    induction       random content tokens with m trigger tokens A_k (a reserved part of the
                    vocabulary, never in the background) each placed twice: "A_k B_k" in the
                    first half, "A_k" alone in the second half; the label after the second A_k is
                    B_k (... A B ... A -> B). Useful edge: the second A_k -> the position of B_k.
    recall          associative recall: K pairs "k_i v_i" (keys and values from two disjoint parts
                    of the vocabulary, keys distinct), SEP, then queries "k v" whose v is scored:
                    useful edge: the query key's position -> the position of its value in the pairs.

`useful_edge_set(task, ...)` is the union of the useful (query, key) pairs over many sampled
examples with the frequency of each: the position-indexed best case the oracle bias uses, and the
set against which the experiment measures the share of stored traces on useful edges.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .names import TASKS

__all__ = ["FILL", "QRY", "SEP", "TASKS", "Batch", "TaskSpec", "answer_from_edges", "make_batch",
           "useful_edge_set", "chance_share"]

FILL, SEP, QRY = 0, 1, 2
FIRST_CONTENT = 3
MIN_LEN = 16
MAX_LEN = 16384


@dataclass(frozen=True)
class TaskSpec:
    """A task's shape: name, vocabulary size, sequence length, batch size, and its knobs."""
    name: str
    vocab_size: int = 64
    seq_len: int = 256
    batch_size: int = 32
    gap_max: int | None = None        # fixed_copy_gap: largest gap (default T // 8)
    num_triggers: int | None = None   # induction: trigger pairs per example (default max(1, T // 32))
    num_pairs: int | None = None      # recall: key-value pairs (default min(keys, (T - 1) // 3))

    def __post_init__(self):
        if self.name not in TASKS:
            raise ValueError(f"unknown task {self.name!r}; known: {', '.join(TASKS)}")
        if not isinstance(self.seq_len, int) or not MIN_LEN <= self.seq_len <= MAX_LEN:
            raise ValueError(f"seq_len must be an int in [{MIN_LEN}, {MAX_LEN}], got {self.seq_len!r}")
        if not isinstance(self.vocab_size, int) or self.vocab_size < FIRST_CONTENT + 8:
            raise ValueError(f"vocab_size must be an int >= {FIRST_CONTENT + 8}, got {self.vocab_size!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")

    @property
    def content(self) -> int:
        return self.vocab_size - FIRST_CONTENT

    def gap(self) -> int:
        return self.gap_max if self.gap_max is not None else max(1, self.seq_len // 8)

    def to_dict(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "gap_max": self.gap(), "num_triggers": self.triggers(),
                "num_pairs": self.pairs()}

    def triggers(self) -> int:
        return self.num_triggers if self.num_triggers is not None else max(1, self.seq_len // 32)

    def pairs(self) -> int:
        keys = self.content // 2
        return self.num_pairs if self.num_pairs is not None else max(1, min(keys, (self.seq_len - 1) // 3))


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    edges: torch.Tensor | None

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.labels.to(device),
                     None if self.edges is None else self.edges.to(device))


def _rand(g, low, high, shape):
    return torch.randint(low, high, shape, generator=g)


def _copy_rows(spec, g, lengths, gaps):
    B, T = spec.batch_size, spec.seq_len
    ids = torch.full((B, T), FILL, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    n_max = int(lengths.max())
    edges = torch.full((B, n_max, 2), -1, dtype=torch.long)
    body = _rand(g, FIRST_CONTENT, spec.vocab_size, (B, n_max))
    for b in range(B):
        n, gap = int(lengths[b]), int(gaps[b])
        x = body[b, :n]
        ids[b, :n] = x
        sep = n + gap
        ids[b, sep] = SEP
        ids[b, sep + 1:sep + 1 + n] = x
        labels[b, sep + 1:sep + 1 + n] = x
        q = torch.arange(sep, sep + n)
        edges[b, :n, 0] = q
        edges[b, :n, 1] = torch.arange(n)
    return Batch(ids, labels, edges)


def _copy(spec, g):
    T, B = spec.seq_len, spec.batch_size
    lengths = _rand(g, max(1, T // 4), (T - 1) // 2 + 1, (B,))
    return _copy_rows(spec, g, lengths, torch.zeros(B, dtype=torch.long))


def _fixed_copy(spec, g):
    B = spec.batch_size
    n = (spec.seq_len - 1) // 2
    return _copy_rows(spec, g, torch.full((B,), n, dtype=torch.long), torch.zeros(B, dtype=torch.long))


def _fixed_copy_gap(spec, g):
    B, G = spec.batch_size, spec.gap()
    n = (spec.seq_len - 1 - G) // 2
    if n < 1:
        raise ValueError(f"fixed_copy_gap: gap_max={G} leaves no room to copy in seq_len={spec.seq_len}")
    return _copy_rows(spec, g, torch.full((B,), n, dtype=torch.long), _rand(g, 0, G + 1, (B,)))


def _induction(spec, g):
    B, T, V = spec.batch_size, spec.seq_len, spec.vocab_size
    m = spec.triggers()
    n_trig = max(m, spec.content // 4)          # the reserved trigger part of the vocabulary
    trig_lo, bg_lo = FIRST_CONTENT, FIRST_CONTENT + n_trig
    if V - bg_lo < 4:
        raise ValueError(f"induction: vocab_size {V} is too small for {n_trig} trigger tokens")
    half = T // 2
    slots1, slots2 = (half - 1) // 2, (T - half - 1) // 2
    if m > min(slots1, slots2):
        raise ValueError(f"induction: {m} triggers do not fit seq_len {T}")
    ids = _rand(g, bg_lo, V, (B, T))
    labels = torch.full((B, T), -100, dtype=torch.long)
    edges = torch.full((B, m, 2), -1, dtype=torch.long)
    for b in range(B):
        trig = torch.randperm(n_trig, generator=g)[:m] + trig_lo
        # "A B" on even slots of the first half, the second "A" on even slots of the second half,
        # so no pair overlaps another and every second A is followed by a free position
        first = torch.randperm(slots1, generator=g)[:m] * 2
        second = half + torch.randperm(slots2, generator=g)[:m] * 2
        ids[b, first] = trig
        ids[b, second] = trig
        target = ids[b, first + 1]
        ids[b, second + 1] = target
        labels[b, second + 1] = target
        edges[b, :, 0] = second
        edges[b, :, 1] = first + 1
    return Batch(ids, labels, edges)


def _recall(spec, g):
    B, T = spec.batch_size, spec.seq_len
    K = spec.pairs()
    half = spec.content // 2
    key_lo, val_lo = FIRST_CONTENT, FIRST_CONTENT + half
    if K > half:
        raise ValueError(f"recall: {K} pairs need {K} distinct keys, the vocabulary has {half}")
    n_q = (T - 2 * K - 1) // 2
    if n_q < 1:
        raise ValueError(f"recall: {K} pairs leave no room for a query in seq_len {T}")
    ids = torch.full((B, T), FILL, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    edges = torch.full((B, n_q, 2), -1, dtype=torch.long)
    for b in range(B):
        keys = torch.randperm(half, generator=g)[:K] + key_lo
        vals = _rand(g, val_lo, spec.vocab_size, (K,))
        ids[b, 0:2 * K:2] = keys
        ids[b, 1:2 * K:2] = vals
        ids[b, 2 * K] = SEP
        which = _rand(g, 0, K, (n_q,))
        start = 2 * K + 1
        qpos = start + 2 * torch.arange(n_q)
        ids[b, qpos] = keys[which]
        ids[b, qpos + 1] = vals[which]
        labels[b, qpos + 1] = vals[which]
        edges[b, :, 0] = qpos
        edges[b, :, 1] = 2 * which + 1
    return Batch(ids, labels, edges)


_MAKERS = {"copy": _copy, "fixed_copy": _fixed_copy, "fixed_copy_gap": _fixed_copy_gap,
           "induction": _induction, "recall": _recall}


def make_batch(spec: TaskSpec, generator: torch.Generator) -> Batch:
    """One batch of `spec`'s task drawn from `generator` (a CPU torch.Generator): the same
    generator state gives the same batch."""
    if not isinstance(spec, TaskSpec):
        raise TypeError(f"spec must be a TaskSpec, got {type(spec).__name__}")
    return _MAKERS[spec.name](spec, generator)


def answer_from_edges(batch: Batch) -> torch.Tensor:
    """What a model that attends exactly on the useful edges and copies the attended token
    predicts: [B, T] with the prediction for labels[:, p] at p (-100 elsewhere)."""
    ids, edges = batch.input_ids, batch.edges
    out = torch.full_like(ids, -100)
    for b in range(ids.shape[0]):
        live = edges[b, :, 0] >= 0
        q, k = edges[b, live, 0], edges[b, live, 1]
        out[b, q + 1] = ids[b, k]
    return out


def useful_edge_set(spec: TaskSpec, seed: int, examples: int = 512) -> dict:
    """{(query, key): frequency in [0, 1]} over `examples` examples drawn with `seed` (the
    position-indexed picture of the useful edges; 1.0 everywhere for fixed-layout tasks)."""
    g = torch.Generator().manual_seed(seed)
    counts: dict = {}
    seen = 0
    one = TaskSpec(spec.name, spec.vocab_size, spec.seq_len, min(spec.batch_size, 64), spec.gap_max,
                   spec.num_triggers, spec.num_pairs)
    while seen < examples:
        batch = make_batch(one, g)
        for b in range(batch.input_ids.shape[0]):
            if seen >= examples:
                break
            e = batch.edges[b]
            e = e[e[:, 0] >= 0]
            for q, k in set(map(tuple, e.tolist())):
                counts[(q, k)] = counts.get((q, k), 0) + 1
            seen += 1
    return {key: c / seen for key, c in counts.items()}


def chance_share(edge_set: dict, seq_len: int) -> float:
    """The share of causal (query, key) pairs (key <= query < seq_len) that are in edge_set:
    what a uniformly random stored edge would score."""
    total = seq_len * (seq_len + 1) // 2
    return sum(1 for (q, k) in edge_set if 0 <= k <= q < seq_len) / total
