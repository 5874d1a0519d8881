"""Vector stores (SPEC 11, issue 25), CPU: a full sync of the seeds' trace budget (32 layers x 32
heads x 2048 = 2,097,152 traces) into LanceDB and back, an incremental sync of 1% and 10% changed
traces, bytes on disk; Qdrant's local mode on a part of the budget by default (--qdrant-layers,
--qdrant-heads: qdrant-client's local mode is pure Python, point by point, and grows its arrays one
point at a time, so its time per trace rises with the collection).
Each load is checked bitwise against the memory.

    python benchmarks/bench_stores.py [--quick] [--json PATH] [--qdrant-layers N] [--qdrant-heads N] [--only STORE]

`--qdrant-layers 32 --qdrant-heads 32` puts the whole budget through Qdrant too (about 45 minutes here);
`--only qdrant-local` skips LanceDB.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

import memtrace as mt


def full_memory(layers=32, heads=32, quota=2048, max_seq_len=4096, seed=0):
    """Every slot filled: distinct sorted positions per slab, random strengths, ages and histories."""
    mem = mt.TraceMemory(layers, heads, quota=quota, max_seq_len=max_seq_len)
    g = torch.Generator().manual_seed(seed)
    shape = (layers, heads, quota)
    stride = max_seq_len * max_seq_len // quota
    pos = torch.arange(quota, dtype=torch.int64) * stride + torch.randint(0, stride, shape, generator=g)
    age = torch.randint(0, 1000, shape, generator=g)
    hist = torch.randint(1, 1 << mem.window, shape, generator=g)
    mem.meta = (pos << mem.pos_shift) | (age << mem.window) | hist
    mem.strength = torch.rand(shape, generator=g) + 1e-3
    return mem


def touch(mem, fraction, seed):
    """Change the strength of `fraction` of the slots (what a partial update does)."""
    g = torch.Generator().manual_seed(seed)
    sel = torch.rand(mem.strength.shape, generator=g) < fraction
    mem.strength = torch.where(sel, mem.strength * 0.5, mem.strength)
    return int(sel.sum())


def run_store(name, make, mem, fractions, root):
    path = os.path.join(root, name)
    store = make(path)
    n = mem.num_traces()
    row = {"store": name, "traces": n}
    t0 = time.perf_counter()
    out = store.sync_traces(mem, step=1)
    row["full_sync_s"] = time.perf_counter() - t0
    row["full_sync_traces_per_s"] = n / row["full_sync_s"]
    assert out["full"] and out["written"] == n
    row["bytes_on_disk_after_full"] = store.nbytes()
    back = mt.TraceMemory(mem.num_layers, mem.num_heads, quota=mem.quota, max_seq_len=mem.max_seq_len)
    t0 = time.perf_counter()
    loaded = store.load_traces(back)
    row["load_s"] = time.perf_counter() - t0
    row["load_traces_per_s"] = loaded / row["load_s"]
    row["load_bitwise_equal"] = bool(torch.equal(back.strength, mem.strength) and torch.equal(back.meta, mem.meta))
    del back
    row["incremental"] = []
    for i, frac in enumerate(fractions):
        changed = touch(mem, frac, seed=10 + i)
        t0 = time.perf_counter()
        out = store.sync_traces(mem, step=2 + i)
        dt = time.perf_counter() - t0
        row["incremental"].append({"changed_fraction": frac, "changed": changed, "written": out["written"],
                                   "full": out["full"], "sync_s": dt, "changed_per_s": changed / dt if dt else None})
    back = mt.TraceMemory(mem.num_layers, mem.num_heads, quota=mem.quota, max_seq_len=mem.max_seq_len)
    t0 = time.perf_counter()
    store.load_traces(back)
    row["load_after_incremental_s"] = time.perf_counter() - t0
    row["load_after_incremental_bitwise_equal"] = bool(torch.equal(back.strength, mem.strength)
                                                       and torch.equal(back.meta, mem.meta))
    row["bytes_on_disk_final"] = store.nbytes()
    h, q, k = 3, int(mem.traces(0)[1][100]), int(mem.traces(0)[2][100])
    t0 = time.perf_counter()
    store.similar_traces(0, h, q, k, k=10)
    row["similar_traces_first_s"] = time.perf_counter() - t0   # includes loading the live-row index
    t0 = time.perf_counter()
    store.similar_traces(0, h, q, k, k=10)
    row["similar_traces_s"] = time.perf_counter() - t0
    store.close()
    shutil.rmtree(path, ignore_errors=True)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="4 layers x 4 heads x 256 traces")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--qdrant-layers", type=int, default=1, help="layers synced into Qdrant")
    p.add_argument("--qdrant-heads", type=int, default=4, help="heads per layer synced into Qdrant")
    p.add_argument("--only", choices=("lancedb", "qdrant-local"), default=None, help="one store only")
    p.add_argument("--dir", default=None, help="scratch folder, made if missing (default: a temporary one)")
    args = p.parse_args(argv)
    if args.dir is not None:
        os.makedirs(args.dir, exist_ok=True)
    from memtrace.stores import LanceDBStore, QdrantStore
    dims = (4, 4, 256) if args.quick else (32, 32, 2048)
    root = tempfile.mkdtemp(prefix="bench_stores_", dir=args.dir)
    results = []
    try:
        mem = full_memory(*dims)
        print(f"memory: {mem.num_traces():,} traces ({dims[0]} layers x {dims[1]} heads x {dims[2]})", flush=True)
        if args.only in (None, "lancedb"):
            results.append(run_store("lancedb", LanceDBStore, mem, (0.01, 0.1), root))
            print(json.dumps(results[-1], indent=1), flush=True)
        if args.only in (None, "qdrant-local"):
            qmem = full_memory(min(args.qdrant_layers, dims[0]), min(args.qdrant_heads, dims[1]), dims[2])
            results.append(run_store("qdrant-local", lambda path: QdrantStore(path=path), qmem, (0.01,), root))
            print(json.dumps(results[-1], indent=1), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    from importlib.metadata import version

    import lancedb
    import qdrant_client  # noqa: F401
    doc = {
        "benchmark": "stores", "device": "cpu", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "lancedb": lancedb.__version__,
                    "qdrant_client": version("qdrant-client"), "pyarrow": version("pyarrow")},
        "contention": "taken on a 2-core machine shared with other engineers' jobs: numbers are under contention "
                      "and noisy (expect them lower than on an idle machine)",
        "budget": {"layers": dims[0], "heads": dims[1], "quota": dims[2], "traces": dims[0] * dims[1] * dims[2]},
        "notes": [f"LanceDB: full budget. Qdrant local mode: {args.qdrant_layers} layer(s) x {args.qdrant_heads} heads "
                  "of the same layout (its local mode is pure Python, point by point; a Qdrant server is not "
                  "measured).",
                  "full_sync_s includes the vectors (128-d, numpy) and writing; load_s reads, resolves the log "
                  "and rebuilds the TraceMemory; incremental syncs write changed traces only."],
        "results": results,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")
    return doc


if __name__ == "__main__":
    main()
