"""QdrantStore: Qdrant as the backend (`pip install memtrace[qdrant]`): qdrant-client's local mode
(`path=`, no server; the default is an in-memory database) or a server (`url=`); see base.py."""
from __future__ import annotations

import json
import os
import sqlite3

import numpy as np

from .._files import check_path
from .base import MOTIF_FIELDS, TRACE_FIELDS, StoreBase, column_dtype, empty_columns, missing_extra

__all__ = ["QdrantStore"]

_MANIFEST = "memtrace_manifest"
_BATCH = 4096
_PAGE = 10000
# local mode sorts every id of the collection for each scroll page: few, large pages
_LOCAL_PAGE = 262144


class QdrantStore(StoreBase):
    """Traces and motifs in Qdrant collections: local mode in folder `path` (created when
    missing), in memory when neither `path` nor `url` is given, or the server at `url`."""

    def __init__(self, path=None, url=None, *, api_key=None, trace_dim: int = 128, motif_dim: int = 256):
        try:
            from qdrant_client import QdrantClient, models
        except ImportError as exc:
            raise missing_extra("QdrantStore", "qdrant-client", "qdrant", exc) from exc
        super().__init__(trace_dim, motif_dim)
        if path is not None and url is not None:
            raise ValueError("give QdrantStore a path (local mode) or a url (a server), not both")
        self._m = models
        self.path, self.url = None, url
        if url is not None:
            if not isinstance(url, str):
                raise TypeError(f"url must be a str, got {type(url).__name__}")
            self._client = QdrantClient(url=url, api_key=api_key)
        elif path is not None:
            path = check_path(path)
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise FileNotFoundError(f"cannot open a QdrantStore at {path}: directory {parent} does not exist"
                                        " (create it first: os.makedirs)")
            self.path = path
            self._client = QdrantClient(path=path)
        else:
            self._client = QdrantClient(location=":memory:")

    def __repr__(self) -> str:
        where = f"url={self.url!r}" if self.url else f"path={self.path!r}"
        return f"QdrantStore({where})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- primitives ---------------------------------------------------------------------------------
    def _tables(self) -> list:
        return [c.name for c in self._client.get_collections().collections]

    def _create(self, table, dim, metric) -> None:
        m = self._m
        if table in self._tables():
            self._client.delete_collection(table)
        dist = m.Distance.EUCLID if metric == "l2" else m.Distance.COSINE
        self._client.create_collection(table, vectors_config=m.VectorParams(size=dim, distance=dist))

    def _local_sqlite(self, table):
        """The sqlite connection under a local-mode collection, or None (a server, in memory, or a
        qdrant-client whose local mode is laid out otherwise: then its own settings stay)."""
        if self.path is None:
            return None
        collection = getattr(getattr(self._client, "_client", None), "collections", {}).get(table)
        conn = getattr(getattr(collection, "storage", None), "storage", None)
        return conn if isinstance(conn, sqlite3.Connection) else None

    def _fast_writes(self, table) -> None:
        # local mode commits (and fsyncs) once per point: 8 of every 9 seconds of a sync. In WAL mode
        # with synchronous=NORMAL a commit no longer waits for the disk and an application crash
        # still loses nothing committed; an OS crash could lose the newest commits, so
        # `_write_manifest` first checkpoints the data to disk (a manifest never names lost rows).
        conn = self._local_sqlite(table)
        if conn is not None:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")

    def _append(self, table, row_ids, vectors, columns) -> None:
        self._fast_writes(table)
        names = list(columns)
        lists = [columns[c].tolist() for c in names]
        ids = row_ids.tolist()
        for lo in range(0, len(ids), _BATCH):
            hi = lo + _BATCH
            payloads = [dict(zip(names, vals)) for vals in zip(*(col[lo:hi] for col in lists))]
            self._client.upsert(table, points=self._m.Batch(ids=ids[lo:hi], vectors=vectors[lo:hi].tolist(),
                                                            payloads=payloads), wait=True)

    def _sync_filter(self, syncs):
        m = self._m
        return m.Filter(must=[m.FieldCondition(key="sync", match=m.MatchAny(any=[int(s) for s in syncs]))])

    def _scan(self, table, columns, syncs) -> dict:
        if table not in self._tables():
            return empty_columns(columns)
        out = {c: [] for c in columns}
        offset = None
        # a server filters with its payload index; the local mode re-tests every point of the
        # collection on each filtered page and sorts every id for each page (quadratic: a 2.1M-trace
        # load did not end in 15 minutes), so there few large pages come unfiltered and the syncs
        # are picked here
        local = self.url is None
        wanted = {int(s) for s in syncs}
        fields = list(dict.fromkeys([*columns, "sync"]))
        where = None if local else self._sync_filter(syncs)
        while True:
            points, offset = self._client.scroll(table, scroll_filter=where, limit=_LOCAL_PAGE if local else _PAGE,
                                                 offset=offset, with_payload=fields, with_vectors=False)
            for p in points:
                if local and int(p.payload["sync"]) not in wanted:
                    continue
                for c in columns:
                    out[c].append(p.payload[c])
            if offset is None:
                break
        return {c: np.array(v, dtype=column_dtype(c)) for c, v in out.items()}

    def _search(self, table, vector, limit, syncs, metric) -> tuple:
        fields = TRACE_FIELDS if table.startswith("traces_") else {**MOTIF_FIELDS, "experts": object}
        cols = ["key", "sync", "deleted", "tag", *fields]
        if table not in self._tables():
            return empty_columns(cols), np.zeros(0)
        res = self._client.query_points(table, query=np.asarray(vector, dtype=np.float32).tolist(), limit=limit,
                                        query_filter=self._sync_filter(syncs), with_payload=True).points
        out = {c: np.array([p.payload[c] for p in res], dtype=column_dtype(c)) for c in cols}
        score = np.array([p.score for p in res], dtype=np.float64)
        return out, (score if metric == "l2" else 1.0 - score)   # Qdrant: Euclidean distance / cosine

    def _drop(self, table) -> None:
        self._client.delete_collection(table)

    def _read_manifest(self):
        if _MANIFEST not in self._tables():
            return None
        pts = self._client.retrieve(_MANIFEST, ids=[0], with_payload=True)
        if not pts:
            return None
        return json.loads(pts[0].payload["json"])

    def _write_manifest(self, manifest) -> None:
        m = self._m
        tables = self._tables()
        for table in tables:
            conn = self._local_sqlite(table) if table != _MANIFEST else None
            if conn is not None:
                conn.execute("PRAGMA wal_checkpoint(FULL)")
        if _MANIFEST not in tables:
            self._client.create_collection(_MANIFEST, vectors_config=m.VectorParams(size=1, distance=m.Distance.DOT))
        self._client.upsert(_MANIFEST, points=[m.PointStruct(id=0, vector=[1.0],
                                                             payload={"json": json.dumps(manifest, sort_keys=True)})],
                            wait=True)

    def nbytes(self) -> int | None:
        """Bytes on disk under the local-mode folder (None for a server or in memory)."""
        if self.path is None:
            return None
        total = 0
        for root, _, files in os.walk(self.path):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total
