"""examples/readme_pictures.py: its drawing part writes the README's six PNGs from tiny state (the
training is what the script itself runs, about 40 s, not a test), and its run-file reader."""
import importlib.util
import json
import os

import pytest
import torch

import memtrace as mt

pytest.importorskip("matplotlib")
import matplotlib.image as mpimg  # noqa: E402
from test_viz import METRICS, RUNS, not_blank, small_memory, small_routing  # noqa: E402  (tests/viz, beside this)

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "readme_pictures.py")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("readme_pictures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_draw_writes_six_readable_pngs(script, tmp_path):
    tree, reg = small_routing()
    other = mt.RoutingTree(4, 6, max_depth=4)
    other.update(torch.randint(0, 6, (200, 4), generator=torch.Generator().manual_seed(2)), step=0)
    log = [dict(m, phase="trace_accumulation" if m["step"] < 5 else "trace_biased", bytes_quota=12 * 128)
           for m in METRICS]
    out = tmp_path / "images"
    written = script.draw(str(out), memory=small_memory(), tree=tree, registry=reg, metrics_log=log,
                          trees={"planted": tree, "random": other}, runs=RUNS, runs_title="tiny runs", layer=0,
                          heads=[0, 1])
    assert [name for name, _, _ in written] == list(script.NAMES)
    assert sorted(os.listdir(out)) == sorted(f"{name}.png" for name in script.NAMES)
    for name, path, (w, h) in written:
        assert os.path.dirname(path) == str(out)
        assert 0 < os.path.getsize(path) < 150 * 1024, name
        img = mpimg.imread(path)
        assert img.shape[:2] == (h, w), name
        assert 300 <= w <= 1400 and 250 <= h <= 900, name     # README-sized at the script's dpi
        assert not_blank(img), name


def _run_file(folder, arm, seed, accs, pilot=False, steps=(0, 10, 20)):
    run = {"task": "fixed_copy", "arm": arm, "seed": seed, "pilot": pilot, "tag": "",
           "config": {"model": {"kind": "moe", "position": "rope"}, "task": {"seq_len": 32}},
           "curves": [{"step": s, "acc": a, "loss": 1.0 - a} for s, a in zip(steps, accs)], "summary": {}}
    with open(os.path.join(folder, f"fixed_copy__moe-rope-T32__{arm}__s{seed}.json"), "w") as f:
        json.dump(run, f)


def test_load_runs_means_each_arm_over_its_seeds(script, tmp_path):
    assert script.load_runs(str(tmp_path)) == (None, None)
    with open(tmp_path / "router_ablation.json", "w") as f:      # a result file without curves: skipped
        json.dump({"experiment": "router_ablation", "results": {}}, f)
    assert script.load_runs(str(tmp_path)) == (None, None)
    _run_file(tmp_path, "baseline", 0, [0.1, 0.5, 0.9])
    _run_file(tmp_path, "baseline", 1, [0.3, 0.7, 0.9])
    _run_file(tmp_path, "traces", 0, [0.2, 0.6, 1.0], pilot=True)
    runs, title = script.load_runs(str(tmp_path))
    assert set(runs) == {"baseline (n=2)", "traces (n=1)"}
    assert runs["baseline (n=2)"]["step"] == [0, 10, 20]
    assert runs["baseline (n=2)"]["accuracy"] == pytest.approx([0.2, 0.6, 0.9])
    assert runs["traces (n=1)"]["loss"] == pytest.approx([0.8, 0.4, 0.0])
    assert "fixed_copy" in title and "PILOT" in title
