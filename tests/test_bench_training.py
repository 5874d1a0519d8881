"""The training benchmark end to end at tiny sizes on the CPU (a smoke test: every row runs and
the JSON holds every row with numbers; the timings themselves mean nothing here)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_training.py"
ROWS = {"llama": ["a", "b", "c", "d", "e"], "mixtral": ["a", "b", "c", "d", "e", "f"]}


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_bench_training_tiny_on_cpu(tmp_path):
    out = tmp_path / "training.json"
    # one thread: on a small shared machine torch's thread pool makes tiny steps 10-100x slower
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--steps", "2", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "bench_training" and doc["device"] == "cpu" and doc["tiny"] is True
    assert doc["steps"] == 2
    found = {(r["model"], r["row"]): r for r in doc["rows"]}
    assert sorted(found) == sorted((m, r) for m, rows in ROWS.items() for r in rows)
    for (model, row), r in found.items():
        assert _number(r["ms"]) or r["ms"] == "OOM", (model, row, r)
        if r["ms"] == "OOM":
            continue
        assert _number(r["ratio"]), (model, row, r)
        if row != "d":
            assert len(r["times_ms"]) == 2 and all(_number(t) for t in r["times_ms"])
        if row in ("b", "c", "d"):
            assert r["met"] in (True, False) and _number(r["target"])
    assert found["llama", "a"]["ratio"] == 1.0
    b, c, d = (found["llama", r]["ms"] for r in "bcd")
    assert abs(d - (99 * b + c) / 100) < 1e-9
    f = found["mixtral", "f"]
    assert _number(f["routing_share"]) and _number(f["routing_direct_share"]) and f["routing_direct_ms"] > 0
    assert "llama" in proc.stdout and "routing share" in proc.stdout      # the table was printed


def test_an_oom_row_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import bench_training as BT
    import torch

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(BT.SeedsCapture, "dense_bias", oom)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert BT.main(["--tiny", "--steps", "1", "--only", "llama", "--json", str(tmp_path / "t.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = {r["row"]: r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}
    assert rows["e"]["ms"] == "OOM" and rows["e"]["error"] == "OOM" and "ratio" not in rows["e"]
    assert _number(rows["d"]["ms"]) and _number(rows["c"]["ratio"])     # the rows around it are intact
