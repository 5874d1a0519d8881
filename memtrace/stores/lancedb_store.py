"""LanceDBStore: the embedded default backend (`pip install memtrace[lancedb]`); see base.py."""
from __future__ import annotations

import json
import os

import numpy as np

from .._files import check_path
from .base import StoreBase, column_dtype, empty_columns, missing_extra

__all__ = ["LanceDBStore"]

_MANIFEST = "memtrace_manifest.json"


class LanceDBStore(StoreBase):
    """Traces and motifs in a LanceDB database folder `path` (created when missing; its parent
    must exist). Vector search is exact (a flat scan: no ANN index is built)."""

    def __init__(self, path, *, trace_dim: int = 128, motif_dim: int = 256):
        try:
            import lancedb
            import pyarrow
        except ImportError as exc:
            raise missing_extra("LanceDBStore", "lancedb", "lancedb", exc) from exc
        super().__init__(trace_dim, motif_dim)
        path = check_path(path)
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"cannot open a LanceDBStore at {path}: directory {parent} does not exist"
                                    " (create it first: os.makedirs)")
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError(f"LanceDBStore path {path} exists and is not a directory")
        os.makedirs(path, exist_ok=True)
        self.path = path
        self._pa = pyarrow
        self._db = lancedb.connect(path)

    def __repr__(self) -> str:
        return f"LanceDBStore({self.path!r})"

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- primitives ---------------------------------------------------------------------------------
    def _tables(self) -> list:
        res = self._db.list_tables()
        names = getattr(res, "tables", res)
        return list(names)

    def _create(self, table, dim, metric) -> None:
        if table in self._tables():
            self._db.drop_table(table)

    def _append(self, table, row_ids, vectors, columns) -> None:
        pa = self._pa
        arrays = {}
        for c, v in columns.items():
            arrays[c] = pa.array(v.tolist(), pa.string()) if v.dtype.kind == "O" else pa.array(v)
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
        arrays["vector"] = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
        data = pa.table(arrays)
        if table in self._tables():
            self._db.open_table(table).add(data)
        else:
            self._db.create_table(table, data=data)

    def _filter(self, syncs) -> str:
        return f"sync IN ({','.join(str(int(s)) for s in syncs)})"

    def _scan(self, table, columns, syncs) -> dict:
        if table not in self._tables():
            return empty_columns(columns)
        t = self._db.open_table(table).search().where(self._filter(syncs)).select(list(columns)).limit(None).to_arrow()
        return {c: _np(t.column(c), c) for c in columns}

    def _search(self, table, vector, limit, syncs, metric) -> tuple:
        cols = ["key", "sync", "deleted", "experts", "tag", *_FIELDS_OF(table)]
        if table not in self._tables():
            return empty_columns(cols), np.zeros(0)
        tbl = self._db.open_table(table)
        have = set(tbl.schema.names)
        cols = [c for c in cols if c in have]
        q = tbl.search(np.asarray(vector, dtype=np.float32), vector_column_name="vector")
        t = q.distance_type(metric).where(self._filter(syncs), prefilter=True).select(cols + ["_distance"])
        t = t.limit(limit).to_arrow()
        dist = t.column("_distance").to_numpy().astype(np.float64)
        if metric == "l2":
            dist = np.sqrt(np.maximum(dist, 0.0))   # LanceDB reports the squared distance
        return {c: _np(t.column(c), c) for c in cols}, dist

    def _drop(self, table) -> None:
        self._db.drop_table(table)

    def _read_manifest(self):
        p = os.path.join(self.path, _MANIFEST)
        if not os.path.exists(p):
            return None
        with open(p, encoding="utf-8") as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p} is not a readable memtrace store manifest: {exc}") from None

    def _write_manifest(self, manifest) -> None:
        p = os.path.join(self.path, _MANIFEST)
        tmp = f"{p}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)

    def nbytes(self) -> int:
        """Bytes on disk under the store's folder."""
        total = 0
        for root, _, files in os.walk(self.path):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total


def _FIELDS_OF(table):
    from .base import MOTIF_FIELDS, TRACE_FIELDS
    return list(TRACE_FIELDS if table.startswith("traces_") else MOTIF_FIELDS)


def _np(col, name):
    dt = column_dtype(name)
    if dt.kind == "O":
        return np.array(col.to_pylist(), dtype=object)
    return col.to_numpy().astype(dt, copy=False)
