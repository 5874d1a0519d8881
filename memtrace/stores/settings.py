"""StoreSettings: the seeds' vector-store keys (persist_to_vector_store, trace_sync_interval,
embedding_dim, warm_start, task_tag, persist_motifs, motif_embedding_dim, and the `vector_store`
block), validated, and `open_store` to build the store they name.

They live beside MemtraceConfig rather than in it: MemtraceConfig's fields are SPEC 9's list, and
its from_seed_dict ignores these keys, which StoreSettings.from_seed_dict reads from the same dict.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from .. import _validate as V
from .base import _tag

__all__ = ["StoreSettings", "open_store"]

_BACKENDS = ("lancedb", "qdrant")


@dataclass(frozen=True)
class StoreSettings:
    """persist_to_vector_store: sync while training; backend 'lancedb' (default) or 'qdrant';
    path: the database folder (LanceDB, Qdrant local mode); url: a Qdrant server; trace_sync_interval
    (int >= 1): steps between syncs; warm_start: load traces (and motifs) when the manager
    attaches the store; task_tag: the tag synced and loaded; persist_motifs: sync the registry too."""

    persist_to_vector_store: bool = False
    backend: str = "lancedb"
    path: str | None = None
    url: str | None = None
    trace_sync_interval: int = 1000
    embedding_dim: int = 128
    warm_start: bool = False
    task_tag: str | None = None
    persist_motifs: bool = True
    motif_embedding_dim: int = 256

    def __post_init__(self):
        V.check_bool("persist_to_vector_store", self.persist_to_vector_store)
        V.check_bool("warm_start", self.warm_start)
        V.check_bool("persist_motifs", self.persist_motifs)
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")
        for name in ("path", "url"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise TypeError(f"{name} must be a str or None, got {type(v).__name__}")
        if self.backend == "lancedb" and self.url is not None:
            raise ValueError("url is for backend 'qdrant'; LanceDB takes a path")
        V.check_int("trace_sync_interval", self.trace_sync_interval, low=1)
        V.check_int("embedding_dim", self.embedding_dim, low=16)
        if self.embedding_dim % 16:
            raise ValueError(f"embedding_dim must be a multiple of 16, got {self.embedding_dim}")
        V.check_int("motif_embedding_dim", self.motif_embedding_dim, low=2)
        _tag(self.task_tag)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d) -> StoreSettings:
        return V.dataclass_from_dict(cls, d, "settings")

    @classmethod
    def from_seed_dict(cls, d) -> StoreSettings:
        """The vector-store keys of the seeds' layout (the dict MemtraceConfig.from_seed_dict takes):
        memory.vector_store.{backend, lancedb.path, qdrant.{host, port} or url},
        persistent_traces.{persist_to_vector_store, trace_sync_interval, embedding_dim, warm_start,
        task_tag}, semantic_crystallization.{persist_motifs, motif_embedding_dim}. Backend
        'disabled' turns persistence off. Other keys are MemtraceConfig's and are not read here."""
        if not isinstance(d, dict):
            raise TypeError(f"seed config must be a dict, got {type(d).__name__}")
        d = d.get("memory", d)
        out = {}
        vs = d.get("vector_store") or {}
        backend = vs.get("backend")
        disabled = backend == "disabled"
        if backend is not None and not disabled:
            out["backend"] = backend
        if out.get("backend", "lancedb") == "lancedb" and "path" in (vs.get("lancedb") or {}):
            out["path"] = vs["lancedb"]["path"]
        q = vs.get("qdrant") or {}
        if out.get("backend") == "qdrant":
            if "url" in q:
                out["url"] = q["url"]
            elif "host" in q:
                out["url"] = f"http://{q['host']}:{q.get('port', 6333)}"
            elif "path" in q:
                out["path"] = q["path"]
        pt = d.get("persistent_traces") or {}
        for k in ("persist_to_vector_store", "trace_sync_interval", "embedding_dim", "warm_start", "task_tag"):
            if k in pt:
                out[k] = pt[k]
        sc = d.get("semantic_crystallization") or {}
        for k in ("persist_motifs", "motif_embedding_dim"):
            if k in sc:
                out[k] = sc[k]
        if disabled:
            out["persist_to_vector_store"] = False
        return cls(**out)


def open_store(settings: StoreSettings):
    """The store `settings` name (ImportError naming the extra when its package is missing)."""
    if not isinstance(settings, StoreSettings):
        raise TypeError(f"settings must be a StoreSettings, got {type(settings).__name__}")
    if settings.backend == "lancedb":
        from .lancedb_store import LanceDBStore
        if settings.path is None:
            raise ValueError("backend 'lancedb' needs a path (the database folder)")
        return LanceDBStore(settings.path, trace_dim=settings.embedding_dim,
                            motif_dim=settings.motif_embedding_dim)
    from .qdrant_store import QdrantStore
    return QdrantStore(path=settings.path, url=settings.url, trace_dim=settings.embedding_dim,
                       motif_dim=settings.motif_embedding_dim)
