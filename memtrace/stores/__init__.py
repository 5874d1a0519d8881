"""Persistence beyond one file (SPEC 11): vector stores for traces and motifs.

    store = mt.stores.LanceDBStore("runs/memory")          # pip install memtrace[lancedb]
    store = mt.stores.QdrantStore(path="runs/qdrant")      # pip install memtrace[qdrant]; url=... for a server
    store.sync_traces(memory, step, tag="qa")              # incremental after the first sync
    store.load_traces(memory, tag="qa", top_k=None)        # warm start: the memory as synced, bit for bit
    store.sync_motifs(registry, tree, step, tag="qa") ; store.load_motifs(registry, tag="qa")
    store.similar_traces(layer, head, q_idx, k_idx, k=10) ; store.similar_motifs(motif, k=10)

The vectors and what their similarity means: memtrace.stores.vectors. The layout (an append-only
log per collection and a manifest of committed syncs): memtrace.stores.base.
"""
from .base import FORMAT_VERSION, StoreBase, VectorStore
from .lancedb_store import LanceDBStore
from .qdrant_store import QdrantStore
from .settings import StoreSettings, open_store
from .vectors import MOTIF_DIM, TRACE_DIM, motif_vectors, trace_vectors

__all__ = ["FORMAT_VERSION", "MOTIF_DIM", "TRACE_DIM", "LanceDBStore", "QdrantStore", "StoreBase", "StoreSettings",
           "VectorStore", "motif_vectors", "open_store", "trace_vectors"]
