"""mt.stores (SPEC 11): LanceDB and Qdrant (local mode) behind one protocol, one suite for both."""
import sys
import warnings

import numpy as np
import pytest
import torch

import memtrace as mt
import memtrace.stores as stores
from memtrace.stores import StoreSettings, motif_vectors, trace_vectors

pytest.importorskip("lancedb")
pytest.importorskip("qdrant_client")

L, H, Q, T = 2, 3, 16, 40


def make_memory(seed=0, updates=4, quota=Q):
    g = torch.Generator().manual_seed(seed)
    mem = mt.TraceMemory(L, H, quota=quota, max_seq_len=T, window=8)
    for _ in range(updates):
        for layer in range(L):
            S = torch.rand(H, T, T, generator=g)
            mem.update_dense(layer, S * (S > 0.93) * 3, torch.rand(H, T, T, generator=g))
    return mem


def open_store(kind, path):
    return stores.LanceDBStore(path) if kind == "lancedb" else stores.QdrantStore(path=path)


@pytest.fixture(params=["lancedb", "qdrant"])
def store(request, tmp_path):
    s = open_store(request.param, str(tmp_path / "db"))
    s.kind = request.param
    yield s
    s.close()


def same(a, b):
    return torch.equal(a.strength, b.strength) and torch.equal(a.meta, b.meta)


def test_protocol(store):
    assert isinstance(store, stores.VectorStore)


def test_round_trip_is_exact(store):
    mem = make_memory()
    assert mem.num_traces() > 20 and int(mem.meta.max()) > 0
    out = store.sync_traces(mem, step=7, tag="qa")
    assert out["full"] and out["live"] == mem.num_traces()
    fresh = mt.TraceMemory(L, H, quota=Q, max_seq_len=T, window=8)
    assert store.load_traces(fresh, tag="qa") == mem.num_traces()
    assert same(fresh, mem)
    assert store.info("traces", "qa")["step"] == 7
    with pytest.raises(KeyError):
        store.load_traces(fresh, tag="other")


def test_an_unknown_tag_names_the_tags_there_are(store):
    mem = make_memory()
    store.sync_traces(mem, step=1, tag="qa")
    with pytest.raises(KeyError, match="tag 'default'.*'qa'"):
        store.load_traces(mt.TraceMemory(L, H, quota=Q, max_seq_len=T, window=8))
    with pytest.raises(KeyError, match="holds no motifs yet"):
        store.load_motifs(mt.MotifRegistry(max_motifs=4), tag="qa")
    with pytest.warns(UserWarning, match="traces tags: 'qa'"):
        assert store.similar_traces(0, 0, 1, 0, k=2) == []
    head, q_idx, k_idx = (int(t[0]) for t in mem.traces(0)[:3])
    assert len(store.similar_traces(0, head, q_idx, k_idx, k=2, tag="qa")) == 2


@pytest.mark.parametrize("kind", ["lancedb", "qdrant"])
def test_viz_reads_a_store_folder(kind, tmp_path, capsys):
    from memtrace.cli import main as cli_main
    from memtrace.viz import load_state
    path = str(tmp_path / "db")
    mem = make_memory()

    def sync(m, tag):
        with open_store(kind, path) as s:       # Qdrant's local mode: one client per folder at a time
            s.sync_traces(m, step=1, tag=tag)

    sync(mem, "qa")
    assert same(load_state(path)["memory"], mem)              # the only tag
    sync(make_memory(seed=5), "other")
    with pytest.raises(ValueError, match="several tags"):
        load_state(path)
    assert same(load_state(path, tag="qa")["memory"], mem)
    with pytest.raises(KeyError, match="'other', 'qa'"):
        load_state(path, tag="nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a memtrace store"):
        load_state(str(tmp_path / "plain"))
    if kind == "qdrant":
        with open_store(kind, path):
            with pytest.raises(ValueError, match="close it first"):
                load_state(path, tag="qa")
    pytest.importorskip("matplotlib")
    assert cli_main(["viz", "traces", path, "--tag", "qa", "--out", str(tmp_path / "pics")]) == 0
    assert (tmp_path / "pics" / "traces_layer0.png").stat().st_size > 0
    assert cli_main(["viz", path, "--tag", "nope", "--out", str(tmp_path / "pics2")]) == 2
    assert "its traces tags: 'other', 'qa'" in capsys.readouterr().err


def test_incremental_sync_writes_only_changes(store, tmp_path):
    mem = make_memory()
    store.sync_traces(mem, step=1)
    again = store.sync_traces(mem, step=2)            # nothing changed
    assert not again["full"] and again["written"] == 0
    g = torch.Generator().manual_seed(5)
    S = torch.rand(H, T, T, generator=g)
    mem.update_dense(1, S * (S > 0.97) * 3, torch.rand(H, T, T, generator=g))   # layer 1 only
    out = store.sync_traces(mem, step=3)
    layer1 = mem.num_traces(1)
    assert not out["full"] and 0 < out["written"] <= layer1 + Q * H
    fresh = mt.TraceMemory(L, H, quota=Q, max_seq_len=T, window=8)
    store.load_traces(fresh)
    assert same(fresh, mem)
    # a new store object on the same folder has no baseline: a full sync, same state
    store.close()
    other = open_store(store.kind, store.path)
    assert other.sync_traces(mem, step=4)["full"]
    fresh = mt.TraceMemory(L, H, quota=Q, max_seq_len=T, window=8)
    other.load_traces(fresh)
    assert same(fresh, mem)
    other.close()


def test_interrupted_sync_keeps_the_last_snapshot(store, monkeypatch):
    mem = make_memory()
    store.sync_traces(mem, step=1)
    before = (mem.strength.clone(), mem.meta.clone())
    mem2 = make_memory(seed=3)
    calls = []
    real = store._append

    def boom(*a, **k):
        calls.append(1)
        real(*a, **k)
        raise KeyboardInterrupt("killed midway")

    monkeypatch.setattr(store, "_append", boom)
    with pytest.raises(KeyboardInterrupt):
        store.sync_traces(mem2, step=2)
    monkeypatch.setattr(store, "_append", real)
    assert calls
    fresh = mt.TraceMemory(L, H, quota=Q, max_seq_len=T, window=8)
    store.load_traces(fresh)
    assert torch.equal(fresh.strength, before[0]) and torch.equal(fresh.meta, before[1])
    store.sync_traces(mem2, step=3)
    store.load_traces(fresh)
    assert same(fresh, mem2)


def test_qdrant_local_writes_without_per_point_fsync_and_checkpoints_before_commit(tmp_path):
    # local mode's own setting fsyncs each point; the store switches its data collections to WAL and
    # moves every written page into the database file before the manifest names the sync
    store = stores.QdrantStore(path=str(tmp_path / "db"))
    mem = make_memory()
    table = store.sync_traces(mem, step=1)["table"]
    conn = store._local_sqlite(table)
    assert conn is not None, "qdrant-client's local layout changed: QdrantStore._local_sqlite finds no sqlite"
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    busy, frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert busy == 0 and frames == done
    assert store._local_sqlite("memtrace_manifest").execute("PRAGMA journal_mode").fetchone()[0] != "wal"
    store.close()
    again = stores.QdrantStore(path=str(tmp_path / "db"))
    fresh = mt.TraceMemory(L, H, quota=Q, max_seq_len=T, window=8)
    again.load_traces(fresh)
    again.close()
    assert same(fresh, mem)


def test_shape_mismatch_top_k_and_quota(store):
    mem = make_memory()
    store.sync_traces(mem, step=1)
    with pytest.raises(ValueError, match="num_heads"):
        store.load_traces(mt.TraceMemory(L, H + 1, quota=Q, max_seq_len=T, window=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        store.load_traces(mt.TraceMemory(L, H, quota=Q, max_seq_len=T + 1, window=8))
    small = mt.TraceMemory(L, H, quota=2, max_seq_len=T, window=8)
    n = store.load_traces(small)
    assert n == small.num_traces() <= L * H * 2
    top = mt.TraceMemory(L, H, quota=Q, max_seq_len=T, window=8)
    assert store.load_traces(top, top_k=5) == 5
    kept = torch.sort(top.strength[top.strength >= 0]).values
    assert torch.equal(kept, torch.sort(mem.strength.reshape(-1)).values[-5:])


def test_similar_traces(store):
    mem = make_memory()
    store.sync_traces(mem, step=1)
    h, q, k, s, _, _ = mem.traces(1)
    for n in (0, len(h) // 2, len(h) - 1):
        res = store.similar_traces(1, int(h[n]), int(q[n]), int(k[n]), k=3)
        assert len(res) == 3
        top = res[0]
        assert (top["layer"], top["head"], top["q_idx"], top["k_idx"]) == (1, int(h[n]), int(q[n]), int(k[n]))
        assert top["distance"] == pytest.approx(0.0, abs=1e-6)
        assert res[1]["distance"] >= top["distance"]
    # superseded rows are never returned: after an update, results hold the current state
    g = torch.Generator().manual_seed(9)
    S = torch.rand(H, T, T, generator=g)
    mem.update_dense(1, S * (S > 0.9) * 3, torch.rand(H, T, T, generator=g))
    store.sync_traces(mem, step=2)
    h, q, k, s, age, _ = mem.traces(1)
    res = store.similar_traces(1, int(h[0]), int(q[0]), int(k[0]), k=1)[0]
    assert res["strength"] == float(s[0]) and res["age"] == int(age[0])
    assert store.similar_traces(0, 0, 0, 0, k=2, tag="never") == []


def make_registry():
    tree = mt.RoutingTree(4, 6, max_depth=4)
    g = torch.Generator().manual_seed(1)
    base = torch.tensor([[1, 2, 3, 4], [0, 2, 3, 5], [5, 5, 0, 1]])
    paths = torch.cat([base[torch.randint(0, 3, (300,), generator=g)], torch.randint(0, 6, (100, 4), generator=g)])
    rewards = torch.rand(400, generator=g)
    rewards[:300] += 1
    tree.update(paths, rewards, step=10)
    reg = mt.MotifRegistry(max_motifs=64, threshold=-5.0)
    reg.consider(tree, step=10, min_frequency=10, min_utility=0.0, max_entropy=5.0, min_length=2, max_length=4)
    return reg, tree


def test_motifs_round_trip_and_similarity(store):
    reg, tree = make_registry()
    assert len(reg) > 5
    store.sync_motifs(reg, tree, step=10, tag="t")
    other = mt.MotifRegistry()
    assert store.load_motifs(other, tag="t") == len(reg)
    assert other.state_dict() == reg.state_dict()
    assert not store.sync_motifs(reg, tree, step=11, tag="t")["written"]
    m = reg.motifs[0]
    res = store.similar_motifs(m, k=len(reg), tag="t")
    assert res[0][0].key == m.key and res[0][1] == pytest.approx(1.0, abs=1e-5)
    sims = {r.key: s for r, s in res}
    steps = {(m.start_layer + t, e) for t, e in enumerate(m.experts)}
    sharing = [k for k in sims if k != m.key and steps & {(k[0] + t, e) for t, e in enumerate(k[1])}]
    disjoint = [k for k in sims if not steps & {(k[0] + t, e) for t, e in enumerate(k[1])}]
    assert sharing and disjoint
    assert min(sims[k] for k in sharing) > max(sims[k] for k in disjoint)


def test_vectors_are_deterministic_and_documented():
    v = trace_vectors([0, 1], [2, 2], [5, 5], [3, 3], [1.0, 0.5])
    assert v.shape == (2, 128) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), [1.0, 0.5], rtol=1e-5)
    assert np.array_equal(v, trace_vectors([0, 1], [2, 2], [5, 5], [3, 3], [1.0, 0.5]))
    near = trace_vectors([0], [2], [6], [4], [1.0])[0]
    far = trace_vectors([0], [2], [30], [1], [1.0])[0]
    assert np.linalg.norm(v[0] - near) < np.linalg.norm(v[0] - far)
    a, b, c = motif_vectors([(0, (1, 2, 3)), (0, (1, 2)), (0, (4, 5, 0))])
    assert a @ b > a @ c and abs(a @ b - 2 / 6 ** 0.5) < 0.25
    with pytest.raises(ValueError, match="dim"):
        trace_vectors([0], [0], [0], [0], [1.0], dim=20)


def test_bad_input(store, tmp_path):
    mem = make_memory(updates=1)
    with pytest.raises(ValueError, match="tag"):
        store.sync_traces(mem, step=1, tag="no spaces")
    with pytest.raises(TypeError, match="memory"):
        store.sync_traces("not a memory", step=1)
    with pytest.raises(ValueError, match="step"):
        store.sync_traces(mem, step=-1)
    with pytest.raises(TypeError, match="registry"):
        store.sync_motifs(mem)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_store(store.kind, str(tmp_path / "missing" / "db"))
    empty = mt.TraceMemory(L, H, quota=Q, max_seq_len=T, window=8)
    assert store.sync_traces(empty, step=1, tag="empty")["live"] == 0
    assert store.load_traces(make_memory(updates=1), tag="empty") == 0


@pytest.mark.parametrize("cls,module,extra", [("LanceDBStore", "lancedb", "lancedb"),
                                              ("QdrantStore", "qdrant_client", "qdrant")])
def test_missing_extra_names_it(monkeypatch, tmp_path, cls, module, extra):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=rf"memtrace\[{extra}\]"):
        getattr(stores, cls)(str(tmp_path / "db")) if cls == "LanceDBStore" else stores.QdrantStore(
            path=str(tmp_path / "db"))


def test_settings_from_seed_dict():
    seed = {"memory": {"vector_store": {"backend": "lancedb", "lancedb": {"path": "artifacts/memory/lancedb"}},
                       "persistent_traces": {"persist_to_vector_store": True, "trace_sync_interval": 1000,
                                             "embedding_dim": 128, "warm_start": False, "task_tag": None},
                       "semantic_crystallization": {"persist_motifs": False, "motif_embedding_dim": 256}}}
    s = StoreSettings.from_seed_dict(seed)
    assert (s.persist_to_vector_store, s.path, s.trace_sync_interval, s.persist_motifs) == \
        (True, "artifacts/memory/lancedb", 1000, False)
    assert StoreSettings.from_dict(s.to_dict()) == s
    assert mt.MemtraceConfig.from_seed_dict(seed) == mt.MemtraceConfig()     # the same dict feeds both
    q = StoreSettings.from_seed_dict({"vector_store": {"backend": "qdrant", "qdrant": {"host": "h", "port": 1}}})
    assert q.url == "http://h:1"
    with pytest.raises(ValueError, match="backend"):
        StoreSettings(backend="faiss")
    with pytest.raises(ValueError, match="trace_sync_interval"):
        StoreSettings(trace_sync_interval=0)


# ---- the manager ------------------------------------------------------------------------------

def run_steps(mgr, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        loss = 0
        for layer in range(mgr.num_layers):
            q, k, v = (torch.randn(1, mgr.num_heads, 12, 16, generator=g, requires_grad=True) for _ in range(3))
            loss = loss + (mgr.attention(layer, q, k, v) ** 2).sum()
        loss.backward()
        mgr.step()


def manager():
    cfg = mt.MemtraceConfig(update_interval=1, warmup_steps=0, phase_starts=(0, 2, None, None),
                            quota_per_head=8, max_seq_len=12, salience_threshold=0.01)
    return mt.Memtrace(2, 2, config=cfg)


@pytest.mark.parametrize("backend", ["lancedb", "qdrant"])
def test_manager_syncs_and_warm_starts(tmp_path, backend):
    settings = StoreSettings(persist_to_vector_store=True, backend=backend, path=str(tmp_path / "db"),
                             trace_sync_interval=2, task_tag="copy")
    mgr = manager()
    store = mgr.persist_to(settings)
    run_steps(mgr, 4)
    assert mgr.memory().num_traces() > 0
    assert store.info("traces", "copy")["step"] == 4 and mgr.metrics()["store_sync"]["traces"] >= 2
    store.close()
    fresh = manager()
    s2 = fresh.persist_to(StoreSettings(**{**settings.to_dict(), "warm_start": True}))
    assert same(fresh.memory(), mgr.memory())
    assert float(fresh.alpha(0)) == float(mgr.alpha(0))
    run_steps(fresh, 1)
    s2.close()


def test_manager_without_the_package_keeps_going(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lancedb", None)
    mgr = manager()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert mgr.persist_to(StoreSettings(persist_to_vector_store=True, path=str(tmp_path / "db"))) is None
    assert any("memtrace[lancedb]" in str(w.message) for w in caught)
    run_steps(mgr, 2)
    mgr.save(str(tmp_path / "state.safetensors"))
    with pytest.raises(RuntimeError, match="persist_to"):
        mgr.sync_store()
