"""mt.viz and `memtrace viz` (SPEC 12): each picture from small synthetic state, PNG size and
content, empty and bad inputs, the CLI, and the HTML page in a real headless browser."""
import io
import os
import shutil

import numpy as np
import pytest
import torch

import memtrace as mt

pytest.importorskip("matplotlib")
from memtrace import viz  # noqa: E402
from memtrace.cli import main as cli_main  # noqa: E402


def small_memory(empty=False):
    mem = mt.TraceMemory(2, 2, quota=32, max_seq_len=48)
    if not empty:
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            S = torch.rand(2, 48, 48, generator=g)
            mem.update_dense(0, S * (S > 0.9), torch.rand(2, 48, 48, generator=g))
    return mem


def small_routing():
    tree = mt.RoutingTree(4, 6, max_depth=4)
    g = torch.Generator().manual_seed(1)
    base = torch.tensor([[1, 2, 3, 4], [0, 2, 3, 5]])
    paths = torch.cat([base[torch.randint(0, 2, (300,), generator=g)], torch.randint(0, 6, (100, 4), generator=g)])
    rewards = torch.rand(400, generator=g)
    rewards[:300] += 1
    tree.update(paths, rewards, step=10)
    reg = mt.MotifRegistry()
    reg.consider(tree, step=10, min_frequency=10, min_utility=0.0, max_entropy=5.0, min_length=2, max_length=4)
    return tree, reg


METRICS = [{"step": s, "last_capture_step": s - s % 2, "trace_count": 10 * s, "trace_coverage": 0.01 * s,
            "trace_stability": 0.5, "salience_histogram": {"edges": [0.1, 1.0, 10.0], "counts": [3, 5, 2, 1]}}
           for s in range(1, 9)]
RUNS = {"baseline/0": {"step": [0, 10, 20], "loss": [3.0, 2.0, 1.5], "accuracy": [0.1, 0.3, 0.4]},
        "traces/0": {"step": [0, 10, 20], "loss": [3.0, 1.8, 1.2], "accuracy": [0.1, 0.35, 0.5]}}


def png_pixels(fig):
    import matplotlib.image as mpimg
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return mpimg.imread(buf, format="png")


def texts(fig):
    return " ".join(t.get_text() for ax in fig.axes for t in ax.texts) + " " + " ".join(
        ax.get_title() for ax in fig.axes)


def not_blank(img):
    return float(img[..., :3].std()) > 0.02


@pytest.mark.parametrize("name", ["heatmap", "history", "flow", "graph", "activations", "experiment"])
def test_each_picture_builds(name):
    tree, reg = small_routing()
    fig = {"heatmap": lambda: viz.trace_heatmap(small_memory(), 0),
           "history": lambda: viz.memory_history(METRICS),
           "flow": lambda: viz.routing_flow(tree, reg),
           "graph": lambda: viz.motif_graph(reg, tree),
           "activations": lambda: viz.motif_activations({"copy": reg, "recall": mt.MotifRegistry()}),
           "experiment": lambda: viz.experiment_curves(RUNS)}[name]()
    img = png_pixels(fig)
    w, h = fig.get_size_inches() * fig.dpi
    assert img.shape[:2] == (round(h), round(w))
    assert not_blank(img)


def test_heatmap_panels_and_held_links():
    fig = viz.trace_heatmap(small_memory(), 0, heads=[1], fields=("strength", "age"))
    assert len([ax for ax in fig.axes if ax.get_title().startswith("L0 H1")]) == 2
    tree, reg = small_routing()
    tr = viz.routing_transitions(tree, reg)
    assert sum(tr["held"]) > 0 and all(c > 0 for c in tr["count"])
    pytest.importorskip("plotly")
    fig = viz.routing_sankey(tree, reg)
    link = fig.data[0].link
    assert len(link.value) == len(tr["count"]) and any("held motif" in h for h in link.customdata)


def test_empty_inputs_say_so():
    assert "no traces" in texts(viz.trace_heatmap(small_memory(empty=True), 1))
    assert "no trace metrics" in texts(viz.memory_history([]))
    empty_tree = mt.RoutingTree(3, 4)
    assert "no routing" in texts(viz.routing_flow(empty_tree))
    assert "no motifs" in texts(viz.motif_graph(mt.MotifRegistry()))
    assert "no motifs" in texts(viz.motif_activations(mt.MotifRegistry()))
    assert not_blank(png_pixels(viz.trace_heatmap(small_memory(empty=True), 1)))


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="layer"):
        viz.trace_heatmap(small_memory(), 2)
    with pytest.raises(ValueError, match="heads"):
        viz.trace_heatmap(small_memory(), 0, heads=[5])
    with pytest.raises(ValueError, match="fields"):
        viz.trace_heatmap(small_memory(), 0, fields=("colour",))
    with pytest.raises(TypeError, match="memory"):
        viz.trace_heatmap("x", 0)
    with pytest.raises(TypeError, match="tree"):
        viz.routing_flow(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        viz.save_png(viz.memory_history([]), str(tmp_path / "missing" / "a.png"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        viz.write_report(str(tmp_path / "missing" / "out"), memory=small_memory())


def manager_file(tmp_path):
    cfg = mt.MemtraceConfig(update_interval=1, warmup_steps=0, phase_starts=(0, 1, None, None), quota_per_head=8,
                            max_seq_len=12, salience_threshold=0.01)
    mgr = mt.Memtrace(2, 2, num_experts=4, config=cfg)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        loss = 0
        for layer in range(2):
            q, k, v = (torch.randn(1, 2, 12, 16, generator=g, requires_grad=True) for _ in range(3))
            loss = loss + (mgr.attention(layer, q, k, v) ** 2).sum()
        loss.backward()
        mgr.step()
    path = str(tmp_path / "state.safetensors")
    mgr.save(path)
    return path


def test_cli_viz(tmp_path, capsys):
    state = manager_file(tmp_path)
    out = tmp_path / "pics"
    assert cli_main(["viz", state, "--out", str(out)]) == 0
    names = set(os.listdir(out))
    assert {"traces_layer0.png", "traces_layer1.png", "history.png", "index.html"} <= names
    assert cli_main(["viz", "traces", state, "-o", str(tmp_path / "only")]) == 0
    assert "history.png" not in os.listdir(tmp_path / "only")
    assert cli_main(["viz", state, "--out", str(tmp_path / "no" / "such")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["viz", str(tmp_path / "nope.safetensors"), "--out", str(out)]) == 2
    assert cli_main(["viz", "experiment", state, "--out", str(out)]) == 2


def _chromium():
    for exe in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(exe)
        if path:
            return path
    return None


def test_html_opens_in_a_headless_browser(tmp_path):
    """The page (PNGs and plotly.js inlined) loads in Debian's chromium with no console error and
    renders a non-blank screenshot, the Sankey's SVG included."""
    pytest.importorskip("plotly")
    sync_api = pytest.importorskip("playwright.sync_api")
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's)")
    tree, reg = small_routing()
    written = viz.write_report(str(tmp_path / "out"), memory=small_memory(), tree=tree, registry=reg,
                               metrics_log=METRICS, runs=RUNS)
    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto("file://" + written["index"])
        page.wait_for_selector("#routing-sankey .sankey", timeout=20000)
        assert page.locator("img").count() >= 5
        assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        shot = page.screenshot(full_page=False)
        browser.close()
    assert errors == []
    import matplotlib.image as mpimg
    img = mpimg.imread(io.BytesIO(shot), format="png")
    assert img.shape[0] == 900 and not_blank(img)
    assert np.isfinite(img).all()
