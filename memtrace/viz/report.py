"""Load pictures' inputs from files and write PNGs and a self-contained HTML page."""
from __future__ import annotations

import base64
import html
import io
import json
import os

from .._files import check_path
from . import plots

__all__ = ["load_state", "save_png", "write_report"]


def save_png(fig, path, dpi=None) -> str:
    """Write a matplotlib figure as PNG (at `dpi`, default the figure's); a missing folder is a
    clear FileNotFoundError."""
    path = check_path(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path}: directory {folder} does not exist"
                                " (create it first: os.makedirs)")
    fig.savefig(path, format="png", dpi=dpi if dpi is not None else "figure")
    return path


def load_state(path, tag=None) -> dict:
    """memory / tree / registry / metrics_log from a file: a Memtrace state (safetensors), a
    TraceMemory or RoutingTree file, or a JSON metrics log (a list of metrics dicts) or
    experiment runs ({"runs": ...}); or the traces of a store folder (memtrace.stores: LanceDB, or
    Qdrant's local mode) under `tag` (default: its only trace tag)."""
    path = check_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if os.path.isdir(path):
        return {"memory": _store_memory(path, tag)}
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, list):
            return {"metrics_log": data}
        if isinstance(data, dict) and "runs" in data:
            return {"runs": data["runs"]}
        if isinstance(data, dict) and "metrics_log" in data:
            return {"metrics_log": data["metrics_log"]}
        raise ValueError(f"{path}: a JSON input must be a metrics log (a list of dicts) or {{'runs': ...}}")
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            fmt = (f.metadata() or {}).get("format")
    except Exception as exc:
        raise ValueError(f"cannot read {path}: not a memtrace safetensors file ({exc})") from None
    if fmt == "memtrace.Memtrace":
        from ..training.manager import Memtrace
        mgr = Memtrace.load(path)
        log = [mgr.metrics()] if mgr.metrics() else []
        return {"memory": mgr.memory(), "tree": mgr.tree, "registry": mgr.registry, "metrics_log": log}
    if fmt == "memtrace.TraceMemory":
        from ..memory import TraceMemory
        return {"memory": TraceMemory.load(path)}
    if fmt == "memtrace.RoutingTree":
        from ..routing import RoutingTree
        return {"tree": RoutingTree.load(path)}
    raise ValueError(f"{path} is not a memtrace state file (format {fmt!r})")


def _store_memory(path, tag):
    """The TraceMemory synced under `tag` in the store folder `path`, in the shape it was synced."""
    from ..memory import TraceMemory
    from ..stores import LanceDBStore, QdrantStore
    if os.path.isfile(os.path.join(path, "meta.json")) and os.path.isdir(os.path.join(path, "collection")):
        try:
            store = QdrantStore(path=path)
        except RuntimeError as exc:      # local mode locks its folder to one client
            raise ValueError(f"cannot open the Qdrant store {path}: it is open in another client (close it "
                             f"first, or serve it with a Qdrant server): {exc}") from None
    elif any(f.endswith(".lance") or f == "memtrace_manifest.json" for f in os.listdir(path)):
        store = LanceDBStore(path)
    else:
        raise ValueError(f"{path} is a folder but not a memtrace store (LanceDB or Qdrant local mode): "
                         "give a state file, or the folder a store was opened on")
    with store:
        if tag is None:
            tags = sorted(n.split("/", 1)[1] for n, e in store.manifest()["collections"].items()
                          if n.startswith("traces/") and e.get("committed"))
            if len(tags) > 1:
                raise ValueError(f"{path} holds traces under several tags ({', '.join(tags)}): choose one (--tag)")
            tag = tags[0] if tags else None
        entry = store.info("traces", tag)
        if entry is None:
            raise KeyError(store._no_sync("traces", "default" if tag is None else tag))
        memory = TraceMemory(**entry["config"])
        store.load_traces(memory, tag=tag)
    return memory


def _img(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def write_report(out_dir, *, memory=None, tree=None, registry=None, metrics_log=None, runs=None,
                 layers=None, heads=None, html_page: bool = True) -> dict:
    """Every picture the inputs allow, as PNGs in `out_dir` (created when its parent exists), the
    routing Sankey as routing.html (plotly, when installed) and index.html: one self-contained page
    (PNGs inlined, plotly.js inlined). Returns {name: path}."""
    out_dir = check_path(out_dir)
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot write pictures to {out_dir}: directory {parent} does not exist"
                                " (create it first: os.makedirs)")
    os.makedirs(out_dir, exist_ok=True)
    figs, written = [], {}
    if memory is not None:
        for layer in (range(memory.num_layers) if layers is None else layers):
            figs.append((f"traces_layer{layer}", f"Trace heatmaps, layer {layer}",
                         plots.trace_heatmap(memory, layer, heads=heads)))
    if metrics_log is not None:
        figs.append(("history", "Trace memory over training", plots.memory_history(metrics_log)))
    if tree is not None:
        figs.append(("routing", "Routing flow (static)", plots.routing_flow(tree, registry)))
    if registry is not None:
        figs.append(("motifs", "Motif graph", plots.motif_graph(registry, tree)))
        figs.append(("motif_activations", "Motif activations", plots.motif_activations(registry)))
    if runs is not None:
        figs.append(("experiment", "Experiment curves", plots.experiment_curves(runs)))
    sankey_div = None
    if tree is not None:
        try:
            sankey = plots.routing_sankey(tree, registry)
        except ImportError:
            sankey = None
        if sankey is not None:
            written["routing_html"] = os.path.join(out_dir, "routing.html")
            sankey.write_html(written["routing_html"], include_plotlyjs=True, full_html=True)
            if html_page:
                sankey_div = sankey.to_html(include_plotlyjs=True, full_html=False, div_id="routing-sankey")
    sections = []
    for name, title, fig in figs:
        written[name] = save_png(fig, os.path.join(out_dir, f"{name}.png"))
        if html_page:
            sections.append(f'<section id="{name}"><h2>{html.escape(title)}</h2>'
                            f'<img alt="{html.escape(title)}" src="{_img(fig)}"></section>')
    if html_page:
        if sankey_div is not None:
            sections.insert(0, f'<section id="routing-interactive"><h2>Routing flow (interactive)</h2>{sankey_div}'
                               "</section>")
        if not sections:
            sections.append('<section id="empty"><p>nothing to show: no traces, routing or motifs</p></section>')
        page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>memtrace</title>"
                "<style>body{font-family:sans-serif;margin:1.5em;max-width:1200px}img{max-width:100%}"
                "section{margin-bottom:2em}</style></head><body><h1>memtrace</h1>"
                + "".join(sections) + "</body></html>\n")
        written["index"] = os.path.join(out_dir, "index.html")
        with open(written["index"], "w", encoding="utf-8") as f:
            f.write(page)
    return written
