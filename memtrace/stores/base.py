"""The store protocol (SPEC 11) and what every backend shares.

A store keeps, per `tag` (the seeds' task_tag; None is "default"), a trace collection and a
motif collection. Each collection is an append-only log of rows in one backend table:

    key      int64  the trace (layer, head, i, j) or the motif (start_layer, experts), packed or hashed
    sync     int64  the sync that wrote the row
    deleted  bool   a tombstone: the key left the memory at this sync
    ...the full state of the trace or motif, and its vector (memtrace.stores.vectors)

The manifest (one JSON document per store, written atomically by the backend) lists, per
collection, its table, the committed sync ids and the shape of what was synced. A collection's
state is, per key, its row of the latest committed sync, unless that row is a tombstone.

- A full sync writes every row into a new table, commits the manifest, then drops the old table.
- An incremental sync (this store object synced the collection before, and the manifest still
  says so) appends only the rows that changed (by key: new or different state) and tombstones
  for removed keys, then commits. Its cost is proportional to what changed.
- A sync first reserves its sync id in the manifest; rows of a sync that did not commit (killed
  midway) carry an id that is never committed, so every load reads the previous complete
  snapshot. When the log holds more than twice the live rows (or 64 incremental syncs), the next
  sync is a full one (compaction).
Nothing is pickled by memtrace: rows are columns of numbers and strings, the manifest is JSON.
(qdrant-client's own local mode stores its points with pickle in SQLite; that is Qdrant's format.)
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .. import _validate as V
from ..crystallize import Motif
from .vectors import MOTIF_DIM, TRACE_DIM, motif_vectors, trace_vectors

__all__ = ["FORMAT_VERSION", "StoreBase", "VectorStore", "missing_extra"]

FORMAT_VERSION = 1
_FORMAT = "memtrace.stores"
_STRUCTURE = ("num_layers", "num_heads", "window", "max_seq_len")
_MAX_INCREMENTS = 64
_TAG_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")

TRACE_FIELDS = {"layer": np.int32, "head": np.int32, "q_idx": np.int32, "k_idx": np.int32,
                "strength": np.float32, "age": np.int64, "hist": np.int64, "step": np.int64}
MOTIF_FIELDS = {"start_layer": np.int32, "length": np.int32, "count": np.int64, "utility": np.float64,
                "entropy": np.float64, "age": np.int64, "score": np.float64, "reward_sum": np.float64,
                "first_seen": np.int64, "last_seen": np.int64, "step": np.int64}


def missing_extra(what: str, package: str, extra: str, exc: BaseException) -> ImportError:
    err = ImportError(f"{what} needs the optional package {package!r}, which is not installed: "
                      f"pip install memtrace[{extra}]  ({type(exc).__name__}: {exc})")
    err.extra = extra
    return err


@runtime_checkable
class VectorStore(Protocol):
    """What mt.stores.LanceDBStore and mt.stores.QdrantStore implement (SPEC 11)."""

    def sync_traces(self, memory, step: int, tag: str | None = None) -> dict: ...
    def load_traces(self, memory, tag: str | None = None, top_k: int | None = None) -> int: ...
    def sync_motifs(self, registry, tree=None, step: int = 0, tag: str | None = None) -> dict: ...
    def load_motifs(self, registry, tag: str | None = None) -> int: ...
    def similar_traces(self, layer: int, head: int, q_idx: int, k_idx: int, k: int = 10,
                       tag: str | None = None, strength: float | None = None) -> list: ...
    def similar_motifs(self, motif, k: int = 10, tag: str | None = None) -> list: ...


def _tag(tag) -> str:
    if tag is None:
        return "default"
    if not isinstance(tag, str) or not _TAG_RE.match(tag):
        raise ValueError(f"tag must be None or 1 to 64 characters of letters, digits, '_' and '-', got {tag!r}")
    return tag


def _motif_key(start_layer: int, experts) -> int:
    text = f"{int(start_layer)}:" + ",".join(str(int(e)) for e in experts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _latest(cols: dict) -> np.ndarray:
    """Indices of the live rows: per key the row of the highest sync, unless it is a tombstone."""
    key, sync = cols["key"], cols["sync"]
    if key.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((sync, key))
    ks = key[order]
    last = np.ones(ks.shape[0], dtype=bool)
    last[:-1] = ks[1:] != ks[:-1]
    pick = order[last]
    return pick[~cols["deleted"][pick].astype(bool)]


class StoreBase:
    """Shared logic; a backend provides the table primitives below (`_create`, `_append`, `_scan`,
    `_search`, `_drop`, `_tables`, `_read_manifest`, `_write_manifest`)."""

    trace_dim = TRACE_DIM
    motif_dim = MOTIF_DIM

    def __init__(self, trace_dim: int = TRACE_DIM, motif_dim: int = MOTIF_DIM):
        self.trace_dim = V.check_int("trace_dim", trace_dim, low=16)
        self.motif_dim = V.check_int("motif_dim", motif_dim, low=2)
        if self.trace_dim % 16:
            raise ValueError(f"trace_dim must be a multiple of 16, got {trace_dim}")
        self._baseline = {}     # collection -> (table, last committed sync, keys, fields) of this object's last sync
        self._live_cache = {}

    # ---- backend primitives -------------------------------------------------------------------------
    def _create(self, table: str, dim: int, metric: str) -> None: raise NotImplementedError
    def _append(self, table, row_ids, vectors, columns) -> None: raise NotImplementedError
    def _scan(self, table, columns, syncs) -> dict: raise NotImplementedError
    def _search(self, table, vector, limit, syncs, metric) -> tuple: raise NotImplementedError
    def _drop(self, table) -> None: raise NotImplementedError
    def _tables(self) -> list: raise NotImplementedError
    def _read_manifest(self) -> dict | None: raise NotImplementedError
    def _write_manifest(self, manifest: dict) -> None: raise NotImplementedError
    def nbytes(self) -> int: raise NotImplementedError

    # ---- manifest ---------------------------------------------------------------------------------
    def manifest(self) -> dict:
        m = self._read_manifest()
        if m is None:
            return {"format": _FORMAT, "format_version": FORMAT_VERSION, "collections": {}}
        if m.get("format") != _FORMAT or m.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"this store holds format {m.get('format')!r} version {m.get('format_version')!r}; "
                             f"this memtrace reads {_FORMAT} version {FORMAT_VERSION}")
        return m

    def info(self, kind: str = "traces", tag: str | None = None) -> dict | None:
        """The manifest entry of a collection ('traces' or 'motifs'), or None when never synced."""
        return self.manifest()["collections"].get(f"{kind}/{_tag(tag)}")

    def _no_sync(self, kind, tag) -> str:
        """What to say when tag `tag` of `kind` was never committed: the tags that were."""
        tags = sorted(n.split("/", 1)[1] for n, e in self.manifest()["collections"].items()
                      if n.startswith(f"{kind}/") and e.get("committed"))
        have = f"its {kind} tags: {', '.join(map(repr, tags))}" if tags else f"it holds no {kind} yet"
        return f"this store holds no committed {kind} sync for tag {tag!r} (tag=None means 'default'); {have}"

    # ---- the generic log sync ----------------------------------------------------------------------
    def _sync(self, kind, tag, keys, fields, vectors_of, entry_extra, metric, dim) -> dict:
        """Write the state (sorted unique `keys`, `fields` columns) of collection kind/tag."""
        name = f"{kind}/{tag}"
        man = self.manifest()
        entry = man["collections"].get(name)
        base = self._baseline.get(name)
        incremental = (entry is not None and base is not None and base[0] == entry["table"]
                       and base[1] == entry["committed"][-1] and len(entry["committed"]) < _MAX_INCREMENTS
                       and entry.get("dim") == dim)
        sync_id = 1 if entry is None else int(entry["next_sync"])
        # reserve the sync id: rows written by an attempt that never commits keep an uncommitted id
        reserved = dict(entry) if entry is not None else {"table": None, "committed": [], "rows": 0, "live": 0}
        reserved["next_sync"] = sync_id + 1
        man["collections"][name] = reserved
        self._write_manifest(man)
        n = keys.shape[0]
        if incremental:
            _, old_keys, old_fields = base[1:]
            pos = np.searchsorted(old_keys, keys)
            pos_c = np.minimum(pos, max(old_keys.shape[0] - 1, 0))
            found = (old_keys.shape[0] > 0) & (old_keys[pos_c] == keys) if old_keys.shape[0] else np.zeros(n, bool)
            same = found.copy()
            for f, col in fields.items():
                if f != "step" and old_keys.shape[0]:
                    same &= _bits(col) == _bits(old_fields[f][pos_c])
            changed = np.nonzero(~same)[0]
            gone = np.ones(old_keys.shape[0], dtype=bool)
            gone[pos_c[found]] = False
            removed = old_keys[gone]
            if entry["rows"] + changed.shape[0] + removed.shape[0] > 2 * max(n, 1) + 1024:
                incremental = False
        if not incremental:
            table = f"{kind}_{tag}_s{sync_id}"
            self._create(table, dim, metric)
            self._write_rows(table, 0, sync_id, keys, fields, np.arange(n), None, vectors_of)
            rows, written = n, n
        else:
            table = entry["table"]
            written = changed.shape[0] + removed.shape[0]
            self._write_rows(table, entry["rows"], sync_id, keys, fields, changed, removed, vectors_of)
            rows = entry["rows"] + written
        committed = ([] if not incremental else list(entry["committed"])) + [sync_id]
        new_entry = {"table": table, "committed": committed, "next_sync": sync_id + 1, "rows": rows, "live": n,
                     "dim": dim, "metric": metric, **entry_extra}
        man["collections"][name] = new_entry
        self._write_manifest(man)
        # old tables (the previous generation, orphans of interrupted full syncs) go after the commit
        prefix = f"{kind}_{tag}_s"
        for t in self._tables():
            if t.startswith(prefix) and t != table:
                self._drop(t)
        self._baseline[name] = (table, sync_id, keys.copy(), {f: c.copy() for f, c in fields.items()})
        self._live_cache.pop(name, None)
        return {"sync": sync_id, "full": not incremental, "written": int(written), "live": int(n), "table": table}

    def _write_rows(self, table, first_row, sync_id, keys, fields, idx, removed, vectors_of, chunk=262144):
        total = idx.shape[0] + (0 if removed is None else removed.shape[0])
        row = first_row
        for lo in range(0, idx.shape[0], chunk):
            sel = idx[lo:lo + chunk]
            cols = {"key": keys[sel], "sync": np.full(sel.shape[0], sync_id, np.int64),
                    "deleted": np.zeros(sel.shape[0], dtype=bool)}
            cols.update({f: c[sel] for f, c in fields.items()})
            vec = vectors_of(cols)
            self._append(table, np.arange(row, row + sel.shape[0], dtype=np.int64), vec, cols)
            row += sel.shape[0]
        if removed is not None and removed.shape[0]:
            m = removed.shape[0]
            cols = {"key": removed, "sync": np.full(m, sync_id, np.int64), "deleted": np.ones(m, dtype=bool)}
            cols.update({f: np.zeros(m, dtype=c.dtype) if c.dtype != object else np.full(m, "", dtype=object)
                         for f, c in fields.items()})
            vec = np.zeros((m, self._dim_of(table)), dtype=np.float32)
            vec[:, 0] = 1.0      # a tombstone's vector: never searched as live, but a valid direction
            self._append(table, np.arange(row, row + m, dtype=np.int64), vec, cols)
            row += m
        assert row == first_row + total

    def _dim_of(self, table):
        return self.trace_dim if table.startswith("traces_") else self.motif_dim

    def _live(self, kind, tag, columns):
        """(entry, live rows' columns) of a collection, None when never synced."""
        entry = self.info(kind, tag)
        if entry is None or not entry["committed"]:
            return entry, None
        cols = self._scan(entry["table"], ["key", "sync", "deleted", *columns], entry["committed"])
        pick = _latest(cols)
        return entry, {c: np.asarray(cols[c])[pick] for c in columns + ["key", "sync"]}

    def _live_keys(self, kind, tag, extra=()):
        name = f"{kind}/{tag}"
        entry = self.info(kind, tag)
        if entry is None:
            return None, None
        ck = (entry["table"], tuple(entry["committed"]))
        hit = self._live_cache.get(name)
        if hit is None or hit[0] != ck:
            _, cols = self._live(kind, tag, list(extra))
            hit = self._live_cache[name] = (ck, cols)
        return entry, hit[1]

    # ---- traces -------------------------------------------------------------------------------------
    def sync_traces(self, memory, step: int, tag: str | None = None) -> dict:
        """Upsert every stored trace of `memory` with its full state (layer, head, q_idx, k_idx,
        strength, age, history bits, step, tag) and its vector. Incremental after a first sync by
        this store object: only traces that are new or changed are written, removed ones get a
        tombstone. Returns {"sync", "full", "written", "live", "table"}."""
        from ..memory import TraceMemory
        if not isinstance(memory, TraceMemory):
            raise TypeError(f"memory must be a memtrace.TraceMemory, got {type(memory).__name__}")
        step = V.check_int("step", step, low=0)
        tag = _tag(tag)
        st = memory.strength.detach().cpu()
        mt = memory.meta.detach().cpu()
        valid, q, k, age, hist = memory._decode(st, mt)
        idx = torch.nonzero(valid.reshape(-1)).flatten()
        H, Q, Lsq = memory.num_heads, memory.quota, memory.max_seq_len
        slab = idx // Q
        fields = {"layer": (slab // H).numpy().astype(np.int32), "head": (slab % H).numpy().astype(np.int32),
                  "q_idx": q.reshape(-1)[idx].numpy().astype(np.int32),
                  "k_idx": k.reshape(-1)[idx].numpy().astype(np.int32),
                  "strength": st.reshape(-1)[idx].numpy(), "age": age.reshape(-1)[idx].numpy(),
                  "hist": hist.reshape(-1)[idx].numpy(), "step": np.full(idx.shape[0], step, np.int64),
                  "tag": np.full(idx.shape[0], tag, dtype=object)}
        keys = (slab.numpy() * Lsq + fields["q_idx"].astype(np.int64)) * Lsq + fields["k_idx"]
        # slots are sorted by (head, i, j) per layer: keys come out sorted and unique
        extra = {"kind": "traces", "tag": tag, "step": step, "config": memory.config()}
        dim = self.trace_dim

        def vectors_of(cols):
            return trace_vectors(cols["layer"], cols["head"], cols["q_idx"], cols["k_idx"], cols["strength"], dim)

        return self._sync("traces", tag, keys.astype(np.int64), fields, vectors_of, extra, "l2", dim)

    def load_traces(self, memory, tag: str | None = None, top_k: int | None = None) -> int:
        """Warm-start `memory` from the last committed trace sync of `tag`: its traces replace the
        memory's (rates and other hyper-parameters stay the memory's own). top_k keeps the top_k
        strongest traces in all; the memory's per-head quota keeps the strongest of a head (ties:
        the smaller (i, j)), as the update's eviction does. Returns the number of traces loaded.
        A store written for another shape (num_layers, num_heads, window, max_seq_len) raises
        ValueError; a tag never synced raises KeyError."""
        from ..memory import EMPTY_STRENGTH, TraceMemory
        if not isinstance(memory, TraceMemory):
            raise TypeError(f"memory must be a memtrace.TraceMemory, got {type(memory).__name__}")
        tag = _tag(tag)
        if top_k is not None:
            top_k = V.check_int("top_k", top_k, low=0)
        entry, cols = self._live("traces", tag, list(TRACE_FIELDS))
        if entry is None or cols is None:
            raise KeyError(self._no_sync("traces", tag))
        cfg = entry["config"]
        bad = [f"{k}={cfg[k]} (memory: {getattr(memory, k)})" for k in _STRUCTURE if cfg[k] != getattr(memory, k)]
        if bad:
            raise ValueError(f"the store's traces for tag {tag!r} were written for another shape: {', '.join(bad)}")
        L, H, Q, S = memory.num_layers, memory.num_heads, memory.quota, memory.max_seq_len
        slab = cols["layer"].astype(np.int64) * H + cols["head"]
        pos = cols["q_idx"].astype(np.int64) * S + cols["k_idx"]
        strength = cols["strength"].astype(np.float32)
        keep = np.ones(slab.shape[0], dtype=bool)
        if top_k is not None and top_k < slab.shape[0]:
            order = np.lexsort((pos, slab, -strength.astype(np.float64)))
            keep[:] = False
            keep[order[:top_k]] = True
        # per-slab quota: strongest first (ties: smaller position)
        order = np.lexsort((pos, -strength.astype(np.float64), slab))
        order = order[keep[order]]
        s_sorted = slab[order]
        first = np.searchsorted(s_sorted, s_sorted, side="left")
        rank = np.arange(order.shape[0]) - first
        order = order[rank < Q]
        # slot order: by position inside each slab
        order = order[np.lexsort((pos[order], slab[order]))]
        s_sorted = slab[order]
        slot = np.arange(order.shape[0]) - np.searchsorted(s_sorted, s_sorted, side="left")
        flat = s_sorted * Q + slot
        age = np.minimum(cols["age"][order].astype(np.int64), memory.age_max)
        meta_vals = (pos[order] << memory.pos_shift) | (age << memory.window) | cols["hist"][order].astype(np.int64)
        st = torch.full((L * H * Q,), EMPTY_STRENGTH, dtype=torch.float32)
        mt = torch.zeros(L * H * Q, dtype=torch.int64)
        st[torch.from_numpy(flat)] = torch.from_numpy(strength[order].copy())
        mt[torch.from_numpy(flat)] = torch.from_numpy(meta_vals)
        memory.load_state_dict({"format_version": 1, "config": memory.config(),
                                "strength": st.view(L, H, Q), "meta": mt.view(L, H, Q)})
        return int(order.shape[0])

    def similar_traces(self, layer: int, head: int, q_idx: int, k_idx: int, k: int = 10,
                       tag: str | None = None, strength: float | None = None) -> list:
        """The k stored traces nearest (Euclidean, see memtrace.stores.vectors) to the trace at
        (layer, head, q_idx, k_idx) with `strength` (default: its stored strength, else the median
        stored strength). A list of dicts (layer, head, q_idx, k_idx, strength, age, hist, step,
        distance), nearest first."""
        for name, v in (("layer", layer), ("head", head), ("q_idx", q_idx), ("k_idx", k_idx)):
            V.check_int(name, v, low=0)
        k = V.check_int("k", k, low=1)
        tag = _tag(tag)
        entry, live = self._live_keys("traces", tag, extra=("strength",))
        if entry is None:
            warnings.warn(self._no_sync("traces", tag) + ": no similar traces", stacklevel=2)
        if entry is None or live is None or live["key"].shape[0] == 0:
            return []
        S = entry["config"]["max_seq_len"]
        H = entry["config"]["num_heads"]
        if strength is None:
            key = ((layer * H + head) * S + q_idx) * S + k_idx
            i = np.nonzero(live["key"] == key)[0]
            strength = float(live["strength"][i[0]]) if i.shape[0] else float(np.median(live["strength"]))
        strength = V.check_float("strength", strength, low=0.0)
        vec = trace_vectors([layer], [head], [q_idx], [k_idx], [strength], entry["dim"])[0]
        return [dict(r, distance=d) for r, d in self._search_live(entry, live, vec, k, "l2",
                                                                  list(TRACE_FIELDS))]

    def _search_live(self, entry, live, vec, k, metric, columns):
        """Search, over-fetching until k live rows are found (superseded rows are skipped)."""
        order = np.argsort(live["key"], kind="stable")
        lk, ls = live["key"][order], live["sync"][order]
        limit = k * 2 + 8
        while True:
            cols, dist = self._search(entry["table"], vec, limit, entry["committed"], metric)
            n = cols["key"].shape[0]
            pos = np.minimum(np.searchsorted(lk, cols["key"]), max(lk.shape[0] - 1, 0))
            ok = (lk[pos] == cols["key"]) & (ls[pos] == cols["sync"]) & ~cols["deleted"].astype(bool)
            hits = np.nonzero(ok)[0][:k]
            if hits.shape[0] >= k or n < limit:
                break
            limit *= 4
        out = []
        for i in hits:
            out.append(({c: _py(cols[c][i]) for c in columns}, float(dist[i])))
        return out

    # ---- motifs -------------------------------------------------------------------------------------
    def sync_motifs(self, registry, tree=None, step: int = 0, tag: str | None = None) -> dict:
        """Upsert the registry's motifs with their statistics (count, utility, entropy, age,
        score; reward_sum, first_seen, last_seen from `tree` when given, else NaN / -1), the
        registry's parameters in the manifest; incremental as sync_traces."""
        from ..crystallize import MotifRegistry
        if not isinstance(registry, MotifRegistry):
            raise TypeError(f"registry must be a memtrace.MotifRegistry, got {type(registry).__name__}")
        step = V.check_int("step", step, low=0)
        tag = _tag(tag)
        motifs = sorted(registry.motifs, key=lambda m: _motif_key(m.start_layer, m.experts))
        n = len(motifs)
        fields = {f: np.zeros(n, dtype=dt) for f, dt in MOTIF_FIELDS.items()}
        fields["experts"] = np.array([",".join(str(e) for e in m.experts) for m in motifs] or [], dtype=object)
        for i, m in enumerate(motifs):
            st = tree.stats(m.start_layer, m.experts) if tree is not None else None
            for f in ("start_layer", "count", "utility", "entropy", "age", "score"):
                fields[f][i] = getattr(m, f)
            fields["length"][i] = m.length
            fields["reward_sum"][i] = st["reward_sum"] if st else np.nan
            fields["first_seen"][i] = st["first_seen"] if st else -1
            fields["last_seen"][i] = st["last_seen"] if st else -1
            fields["step"][i] = step
        fields["tag"] = np.full(n, tag, dtype=object)
        keys = np.array([_motif_key(m.start_layer, m.experts) for m in motifs], dtype=np.int64)
        if np.unique(keys).shape[0] != n:   # pragma: no cover - a 63-bit hash collision
            raise RuntimeError("two motifs hash to the same key")
        extra = {"kind": "motifs", "tag": tag, "step": step,
                 "registry": {"max_motifs": registry.max_motifs, "weights": list(registry.weights),
                              "threshold": registry.threshold}}
        dim = self.motif_dim

        def vectors_of(cols):
            return motif_vectors([(s, tuple(int(e) for e in x.split(","))) for s, x in
                                  zip(cols["start_layer"].tolist(), cols["experts"].tolist())], dim)

        return self._sync("motifs", tag, keys, fields, vectors_of, extra, "cosine", dim)

    def load_motifs(self, registry, tag: str | None = None) -> int:
        """Replace `registry` (its parameters and motifs) by the last committed motif sync of `tag`;
        returns the number of motifs. KeyError when the tag was never synced."""
        from ..crystallize import MotifRegistry
        if not isinstance(registry, MotifRegistry):
            raise TypeError(f"registry must be a memtrace.MotifRegistry, got {type(registry).__name__}")
        tag = _tag(tag)
        entry, cols = self._live("motifs", tag, list(MOTIF_FIELDS) + ["experts"])
        if entry is None or cols is None:
            raise KeyError(self._no_sync("motifs", tag))
        motifs = [_motif_row(cols, i) for i in range(cols["key"].shape[0])]
        sd = dict(entry["registry"], motifs=[{"start_layer": m.start_layer, "experts": list(m.experts),
                                              "count": m.count, "utility": m.utility, "entropy": m.entropy,
                                              "age": m.age, "score": m.score} for m in motifs])
        registry.load_state_dict(sd)
        return len(motifs)

    def similar_motifs(self, motif, k: int = 10, tag: str | None = None) -> list:
        """The k stored motifs most similar (cosine of motif vectors) to `motif` (a Motif or a
        (start_layer, experts) pair): a list of (Motif, similarity), most similar first."""
        key = motif.key if isinstance(motif, Motif) else tuple(motif) if isinstance(motif, (tuple, list)) else ()
        if len(key) != 2 or not isinstance(key[1], (tuple, list)) or not key[1]:
            raise TypeError(f"motif must be a memtrace.Motif or a (start_layer, experts) pair with at least one "
                            f"expert, got {motif!r}")
        start, experts = V.check_int("start_layer", key[0], low=0), key[1]
        experts = tuple(V.check_int("experts", e, low=0) for e in experts)
        k = V.check_int("k", k, low=1)
        tag = _tag(tag)
        entry, live = self._live_keys("motifs", tag)
        if entry is None:
            warnings.warn(self._no_sync("motifs", tag) + ": no similar motifs", stacklevel=2)
        if entry is None or live is None or live["key"].shape[0] == 0:
            return []
        vec = motif_vectors([(start, experts)], entry["dim"])[0]
        rows = self._search_live(entry, live, vec, k, "cosine", list(MOTIF_FIELDS) + ["experts"])
        return [(_motif_row({c: np.array([v]) for c, v in r.items()}, 0), 1.0 - d) for r, d in rows]


def _bits(a: np.ndarray) -> np.ndarray:
    """Values compared bit for bit (floats by their bits: -0.0 != 0.0, NaN == NaN)."""
    if a.dtype == np.float32:
        return a.view(np.int32)
    if a.dtype == np.float64:
        return a.view(np.int64)
    return a


def empty_columns(columns) -> dict:
    kinds = {"key": np.int64, "sync": np.int64, "deleted": bool, "experts": object, "tag": object,
             **TRACE_FIELDS, **MOTIF_FIELDS}
    return {c: np.zeros(0, dtype=kinds.get(c, np.float64)) for c in columns}


def column_dtype(column):
    return empty_columns([column])[column].dtype


def _py(x):
    return x.item() if hasattr(x, "item") else x


def _motif_row(cols, i) -> Motif:
    return Motif(int(cols["start_layer"][i]), tuple(int(e) for e in str(cols["experts"][i]).split(",")),
                 int(cols["count"][i]), float(cols["utility"][i]), float(cols["entropy"][i]), int(cols["age"][i]),
                 float(cols["score"][i]))


def dumps(manifest: dict) -> str:
    return json.dumps(manifest, sort_keys=True)
