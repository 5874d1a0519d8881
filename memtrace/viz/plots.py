"""The pictures of SPEC 12 as matplotlib figures (Agg; PNG) and a plotly Sankey (HTML).

Every function takes small in-memory objects (TraceMemory, RoutingTree, MotifRegistry, lists of
metrics dicts) and returns a figure; an empty input gives a figure that says so ("no traces")
rather than raising. Bad arguments (a layer out of range, a wrong type) raise with a message
naming the argument.
"""
from __future__ import annotations

import math

import numpy as np

from .. import _validate as V

__all__ = ["experiment_curves", "memory_history", "motif_activations", "motif_graph", "routing_flow",
           "routing_sankey", "routing_transitions", "trace_heatmap"]

_FIELDS = ("strength", "age", "recurrence")


def _plt():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("memtrace.viz needs matplotlib: pip install memtrace[viz]") from exc
    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "cairo") and \
            not matplotlib.rcParams.get("interactive", False):
        matplotlib.use("Agg")
    from matplotlib.figure import Figure
    return Figure


def _empty(fig, ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=14, color="0.35", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


# ---- traces ---------------------------------------------------------------------------------------

def trace_heatmap(memory, layer: int, heads=None, fields=_FIELDS, max_bins: int = 128, max_heads: int = 8):
    """Panels of one layer's traces: a row per head (`heads`, default the first `max_heads`), a
    column per field (strength, age, recurrence = set bits of the history), query position down,
    key position across. Positions are binned to at most `max_bins` per axis (a bin shows the
    strongest trace's strength, the youngest age, the highest recurrence of its traces)."""
    from ..memory import TraceMemory
    Figure = _plt()
    if not isinstance(memory, TraceMemory):
        raise TypeError(f"memory must be a memtrace.TraceMemory, got {type(memory).__name__}")
    layer = V.check_int("layer", layer, low=0, high=memory.num_layers - 1)
    if heads is None:
        heads = list(range(min(memory.num_heads, max_heads)))
    heads = [V.check_int("heads", h, low=0, high=memory.num_heads - 1) for h in heads]
    fields = tuple(fields)
    bad = [f for f in fields if f not in _FIELDS]
    if bad or not fields:
        raise ValueError(f"fields must be a non-empty subset of {_FIELDS}, got {fields!r}")
    max_bins = V.check_int("max_bins", max_bins, low=1)
    head, q, k, s, age, rec = (t.cpu().numpy() for t in memory.traces(layer))
    fig = Figure(figsize=(3.2 * len(fields) + 0.6, 2.9 * max(len(heads), 1) + 0.5), dpi=100)
    if head.shape[0] == 0 or not heads:
        ax = fig.add_subplot(1, 1, 1)
        ax.set_title(f"layer {layer}")
        return _empty(fig, ax, f"no traces in layer {layer}")
    extent = int(max(q.max(), k.max())) + 1
    bins = min(extent, max_bins)
    scale = bins / extent
    values = {"strength": (s, np.fmax, "viridis"), "age": (age.astype(np.float64), np.fmin, "magma_r"),
              "recurrence": (rec.astype(np.float64), np.fmax, "cividis")}
    axes = fig.subplots(len(heads), len(fields), squeeze=False)
    for r, h in enumerate(heads):
        sel = head == h
        qi = np.minimum((q[sel] * scale).astype(np.int64), bins - 1)
        ki = np.minimum((k[sel] * scale).astype(np.int64), bins - 1)
        for c, f in enumerate(fields):
            ax = axes[r][c]
            val, reduce, cmap = values[f]
            grid = np.full((bins, bins), np.nan)
            if sel.any():
                flat = np.full(bins * bins, np.nan)
                reduce.at(flat, qi * bins + ki, val[sel])
                grid = flat.reshape(bins, bins)
            im = ax.imshow(grid, cmap=cmap, interpolation="nearest", origin="upper",
                           extent=(0, extent, extent, 0))
            if not sel.any():
                ax.text(0.5, 0.5, "no traces", ha="center", va="center", color="0.4", transform=ax.transAxes)
            else:
                fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            ax.set_title(f"L{layer} H{h}: {f}", fontsize=9)
            if c == 0:
                ax.set_ylabel("query i")
            if r == len(heads) - 1:
                ax.set_xlabel("key j")
    shown = "" if len(heads) == memory.num_heads else \
        f" ({'head' if len(heads) == 1 else 'heads'} {', '.join(map(str, heads))} of {memory.num_heads} shown)"
    fig.suptitle(f"trace memory, layer {layer}: {head.shape[0]} traces{shown}", fontsize=11)
    fig.tight_layout()
    return fig


def _phase_starts(metrics_log) -> list:
    """[(first step, phase label)] of the phases the metrics log passes through, in order."""
    out = []
    for m in metrics_log:
        if isinstance(m, dict) and isinstance(m.get("step"), int) and m.get("phase") is not None:
            label = str(m["phase"])
            if not out or out[-1][1] != label:
                out.append((m["step"], label))
    return out


def memory_history(metrics_log):
    """Trace memory over training from the manager's metrics (a list of `mgr.step()` dicts):
    trace count (with the quota), coverage, stability and the salience histogram of the last
    capture. When the log holds every step's "phase", dashed lines mark where each phase begins."""
    Figure = _plt()
    if not isinstance(metrics_log, (list, tuple)):
        raise TypeError(f"metrics_log must be a list of metrics dicts, got {type(metrics_log).__name__}")
    rows = [m for m in metrics_log if isinstance(m, dict) and "trace_count" in m]
    fig = Figure(figsize=(10, 6.5), dpi=100)
    if not rows:
        ax = fig.add_subplot(1, 1, 1)
        return _empty(fig, ax, "no trace metrics (no capture step yet)")
    seen, pts = set(), []
    for m in rows:       # one point per capture (metrics repeat until the next capture)
        key = m.get("last_capture_step", m.get("step"))
        if key not in seen:
            seen.add(key)
            pts.append(m)
    x = [m.get("last_capture_step", m.get("step", i)) for i, m in enumerate(pts)]
    phases = _phase_starts(metrics_log)
    axes = fig.subplots(2, 2)
    for ax, key, label in ((axes[0][0], "trace_count", "traces stored"), (axes[0][1], "trace_coverage",
                                                                          "coverage (attention mass on traces)"),
                           (axes[1][0], "trace_stability", "stability (Jaccard between updates)")):
        ax.plot(x, [m.get(key, float("nan")) for m in pts], marker="o", ms=3)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        if len(phases) > 1:
            ax.set_xlim(min(phases[0][0], x[0]), max(m["step"] for m in metrics_log
                                                     if isinstance(m, dict) and isinstance(m.get("step"), int)))
            for start, name in phases[1:]:
                ax.axvline(start, color="0.45", ls="--", lw=0.8, zorder=0)
                if ax is axes[0][0]:
                    ax.text(start, 0.03, " " + name.replace("_", " "), rotation=90, fontsize=8, color="0.3",
                            ha="right", va="bottom", transform=ax.get_xaxis_transform())
    quota = pts[-1].get("bytes_quota")
    if quota:
        axes[0][0].axhline(quota / 12, color="tab:red", ls=":", lw=1.0)
        axes[0][0].text(0.01, quota / 12, "quota", color="tab:red", fontsize=8, ha="left", va="bottom",
                        transform=axes[0][0].get_yaxis_transform())
        axes[0][0].set_ylim(0, quota / 12 * 1.15)
    ax = axes[1][1]
    hist = pts[-1].get("salience_histogram")
    if hist and hist.get("counts"):
        edges = list(hist["edges"])
        labels = [f"<{edges[0]:g}"] + [f"{a:g}-{b:g}" for a, b in zip(edges[:-1], edges[1:])] + [f">{edges[-1]:g}"]
        ax.bar(range(len(hist["counts"])), hist["counts"], color="tab:orange")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels[:len(hist["counts"])], rotation=45, fontsize=7)
        ax.set_title(f"normalised salience at step {x[-1]}", fontsize=10)
    else:
        _empty(fig, ax, "no salience histogram")
    fig.tight_layout()
    return fig


# ---- routing --------------------------------------------------------------------------------------

def routing_transitions(tree, registry=None, max_links: int = 200) -> dict:
    """Expert transitions (layer l, expert a) -> (l + 1, expert b) with their token counts, from
    the trie's depth-2 nodes (SPEC 5.4 table), the `max_links` most frequent; `held` marks those
    inside a held motif. dict of lists: layer, src, dst, count, utility, entropy, held."""
    from ..routing import RoutingTree
    if not isinstance(tree, RoutingTree):
        raise TypeError(f"tree must be a memtrace.RoutingTree, got {type(tree).__name__}")
    max_links = V.check_int("max_links", max_links, low=1)
    out = {k: [] for k in ("layer", "src", "dst", "count", "utility", "entropy", "held")}
    if tree.num_nodes == 0:
        return out
    t = {k: v.cpu() for k, v in tree.to_table().items()}
    sel = np.nonzero((t["depth"] == 2).numpy())[0]
    if sel.shape[0] == 0:
        return out
    counts = t["count"].numpy()[sel]
    sel = sel[np.argsort(-counts, kind="stable")[:max_links]]
    held = set()
    for m in (registry.motifs if registry is not None else []):
        for i in range(len(m.experts) - 1):
            held.add((m.start_layer + i, m.experts[i], m.experts[i + 1]))
    gmr = tree.global_mean_reward
    for i in sel.tolist():
        layer, a, b = int(t["start_layer"][i]), int(t["experts"][i, 0]), int(t["experts"][i, 1])
        count = int(t["count"][i])
        st = tree.stats(layer, (a, b))
        out["layer"].append(layer)
        out["src"].append(a)
        out["dst"].append(b)
        out["count"].append(count)
        out["utility"].append(float(t["reward_sum"][i]) / count - gmr)
        out["entropy"].append(st["entropy"] if st else float("nan"))
        out["held"].append((layer, a, b) in held)
    return out


def routing_sankey(tree, registry=None, max_links: int = 200):
    """An interactive Sankey (plotly Figure; .write_html) of expert transitions across layers:
    nodes 'L<layer> E<expert>', link width = tokens, held motifs' links in red, hover shows
    count, utility and entropy. Needs plotly (pip install memtrace[viz])."""
    try:
        import plotly.graph_objects as go
    except ImportError as exc:
        raise ImportError("routing_sankey needs plotly: pip install memtrace[viz]") from exc
    tr = routing_transitions(tree, registry, max_links)
    if not tr["count"]:
        fig = go.Figure()
        fig.add_annotation(text="no routing recorded", showarrow=False, font={"size": 18})
        fig.update_layout(title="routing flow", xaxis={"visible": False}, yaxis={"visible": False})
        return fig
    nodes = sorted({(lay, a) for lay, a in zip(tr["layer"], tr["src"])}
                   | {(lay + 1, b) for lay, b in zip(tr["layer"], tr["dst"])})
    index = {n: i for i, n in enumerate(nodes)}
    L = max(n[0] for n in nodes) + 1
    colors = ["rgba(214,39,40,0.75)" if h else "rgba(120,120,160,0.35)" for h in tr["held"]]
    hover = [f"L{lay} E{a} -> L{lay + 1} E{b}<br>tokens {c}<br>utility {u:.4g}<br>path entropy {h:.3g}"
             + ("<br><b>held motif</b>" if held else "")
             for lay, a, b, c, u, h, held in zip(tr["layer"], tr["src"], tr["dst"], tr["count"], tr["utility"],
                                                 tr["entropy"], tr["held"])]
    fig = go.Figure(go.Sankey(
        arrangement="snap",
        node={"label": [f"L{lay} E{e}" for lay, e in nodes], "pad": 8, "thickness": 14,
              "x": [0.02 + 0.96 * lay / max(L - 1, 1) for lay, _ in nodes], "y": [None] * len(nodes)},
        link={"source": [index[(lay, a)] for lay, a in zip(tr["layer"], tr["src"])],
              "target": [index[(lay + 1, b)] for lay, b in zip(tr["layer"], tr["dst"])],
              "value": tr["count"], "color": colors, "customdata": hover,
              "hovertemplate": "%{customdata}<extra></extra>"}))
    fig.update_traces(node_x=None, node_y=None)
    fig.update_layout(title=f"routing flow: {len(tr['count'])} expert transitions (red: held motifs)",
                      font={"size": 11}, height=520)
    return fig


def routing_flow(tree, registry=None, max_links: int = 200):
    """The static (PNG) fallback of routing_sankey: experts as nodes in a column per layer, a line
    per transition with width by tokens, held motifs in red."""
    Figure = _plt()
    tr = routing_transitions(tree, registry, max_links)
    fig = Figure(figsize=(10, 5.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title("routing flow across layers (line width: tokens; red: held motifs)")
    if not tr["count"]:
        return _empty(fig, ax, "no routing recorded")
    E = max(max(tr["src"]), max(tr["dst"])) + 1
    cmax = max(tr["count"])
    for lay, a, b, c, held in sorted(zip(tr["layer"], tr["src"], tr["dst"], tr["count"], tr["held"]),
                                     key=lambda r: r[4]):
        ax.plot([lay, lay + 1], [a, b], color="tab:red" if held else "tab:blue",
                lw=0.5 + 6.0 * c / cmax, alpha=0.85 if held else 0.35, solid_capstyle="round")
    nodes = {(lay, a) for lay, a in zip(tr["layer"], tr["src"])} | {(lay + 1, b) for lay, b in
                                                                    zip(tr["layer"], tr["dst"])}
    ax.scatter([n[0] for n in nodes], [n[1] for n in nodes], s=30, color="0.2", zorder=3)
    L = max(tr["layer"]) + 2
    ax.set_xlabel("layer")
    ax.set_ylabel("expert")
    ax.set_xticks(range(L) if L <= 32 else np.linspace(0, L - 1, 9).astype(int))
    ax.set_yticks(range(E) if E <= 32 else np.linspace(0, E - 1, 9).astype(int))
    ax.grid(alpha=0.2)
    fig.tight_layout()
    return fig


# ---- motifs ---------------------------------------------------------------------------------------

def _motifs_of(registry):
    from ..crystallize import MotifRegistry
    if not isinstance(registry, MotifRegistry):
        raise TypeError(f"registry must be a memtrace.MotifRegistry, got {type(registry).__name__}")
    return registry.motifs


def motif_graph(registry, tree=None, max_motifs: int = 64, min_shared: int = 2):
    """Held motifs as nodes (x: start layer, size: count, colour: utility, diverging at 0 when
    utilities of both signs occur), laid out per start layer in rows of three by utility (best at
    the top), each labelled with its expert chain. Edges: prefix relations (solid: same start, one
    chain a prefix of the other) and shared steps (dotted: at least `min_shared` times the same
    expert at the same layer; width grows with the number shared). `tree`, when given, refreshes
    count and utility from it."""
    Figure = _plt()
    motifs = _motifs_of(registry)[:V.check_int("max_motifs", max_motifs, low=1)]
    min_shared = V.check_int("min_shared", min_shared, low=1)
    fig = Figure(figsize=(10, 6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(f"motif graph: {len(motifs)} held motifs (size: tokens, colour: utility; solid: prefix, "
                 f"dotted: {min_shared}+ shared steps)", fontsize=10)
    if not motifs:
        return _empty(fig, ax, "no motifs")
    stats = []
    for m in motifs:
        st = tree.stats(m.start_layer, m.experts) if tree is not None else None
        stats.append((st["count"], st["utility"]) if st else (m.count, m.utility))
    # rank by the utility the colour shows (the tree's, when given, may differ from the registry's)
    order = sorted(range(len(motifs)), key=lambda i: -stats[i][1])
    motifs, stats = [motifs[i] for i in order], [stats[i] for i in order]
    by_start = {}
    pos = []
    for m in motifs:
        r = by_start.get(m.start_layer, 0)
        by_start[m.start_layer] = r + 1
        pos.append((m.start_layer + 0.28 * (r % 3), r // 3))
    steps = [{(m.start_layer + t, e) for t, e in enumerate(m.experts)} for m in motifs]
    for i, a in enumerate(motifs):
        for j in range(i + 1, len(motifs)):
            b = motifs[j]
            short, long_ = (a, b) if a.length <= b.length else (b, a)
            prefix = short.start_layer == long_.start_layer and long_.experts[:short.length] == short.experts
            shared = len(steps[i] & steps[j])
            if prefix or shared >= min_shared:
                ax.plot([pos[i][0], pos[j][0]], [pos[i][1], pos[j][1]], color="0.25" if prefix else "0.6",
                        ls="-" if prefix else ":", lw=1.6 if prefix else 0.3 * shared, zorder=1)
    counts = np.array([c for c, _ in stats], dtype=np.float64)
    util = np.array([u for _, u in stats], dtype=np.float64)
    sizes = 40 + 400 * np.sqrt(counts / max(counts.max(), 1.0))
    norm = None
    if util.min() < 0 < util.max():
        from matplotlib.colors import TwoSlopeNorm
        norm = TwoSlopeNorm(vcenter=0.0, vmin=util.min(), vmax=util.max())
    sc = ax.scatter([p[0] for p in pos], [p[1] for p in pos], s=sizes, c=util, cmap="coolwarm", norm=norm,
                    zorder=2, edgecolors="k", linewidths=0.5)
    for m, p, size in zip(motifs, pos, sizes):
        ax.annotate("-".join(map(str, m.experts)), p, xytext=(math.sqrt(size) / 2 + 2, 0), textcoords="offset points",
                    fontsize=8, ha="left", va="center", zorder=3)
    fig.colorbar(sc, ax=ax, label="utility (mean reward over the global mean)")
    layers = sorted(by_start)
    ax.set_xticks([lay + 0.14 * (min(by_start[lay], 3) - 1) for lay in layers])
    ax.set_xticklabels([f"L{lay}" for lay in layers])
    ax.set_xlim(min(layers) - 0.25, max(layers) + 0.95)
    ax.set_xlabel("start layer")
    ax.set_yticks([])
    ax.set_ylabel("rank by utility within the start layer (best at the top)")
    ax.set_ylim(max(p[1] for p in pos) + 0.7, -0.7)
    fig.tight_layout()
    return fig


def _tree_count(tree, m) -> int:
    """Tokens of `tree` whose path follows motif m (0 where the tree cannot hold it)."""
    fits = (m.start_layer + m.length <= tree.num_layers and m.length <= tree.max_depth
            and max(m.experts) < tree.num_experts)
    st = tree.stats(m.start_layer, m.experts) if fits else None
    return st["count"] if st else 0


def motif_activations(registries, max_motifs: int = 40, trees=None):
    """The seeds' motif activation heatmap: a row per task (a dict task -> MotifRegistry, or one
    registry), a column per motif, colour = log10(1 + count) of the motif in that task.

    With `trees` (a dict task -> RoutingTree, the routing recorded on each task), `registries` is
    one MotifRegistry: its held motifs are the columns, a row per tree, and a cell counts the
    tokens whose path in that tree follows the motif's chain (0 where the tree lacks it)."""
    from ..routing import RoutingTree
    Figure = _plt()
    if trees is not None:
        if not isinstance(trees, dict) or not all(isinstance(t, RoutingTree) for t in trees.values()):
            raise TypeError("trees must be a dict task -> memtrace.RoutingTree")
        motifs = _motifs_of(registries)
        tasks = list(trees)
        per = {t: {m.key: _tree_count(tree, m) for m in motifs} for t, tree in trees.items()}
    else:
        if not isinstance(registries, dict):
            registries = {"run": registries}
        tasks = list(registries)
        per = {t: {m.key: m.count for m in _motifs_of(r)} for t, r in registries.items()}
    keys = sorted({k for d in per.values() for k in d}, key=lambda k: -sum(d.get(k, 0) for d in per.values()))
    keys = keys[:V.check_int("max_motifs", max_motifs, low=1)]
    fig = Figure(figsize=(max(6, 0.28 * len(keys) + 2.5), 1.0 + 0.45 * max(len(tasks), 1) + 1.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title("motif activations: tokens whose route follows each held motif, per task (log10(1 + tokens))"
                 if trees is not None else "motif activations (log10(1 + tokens))", fontsize=10)
    if not keys:
        return _empty(fig, ax, "no motifs")
    grid = np.array([[math.log10(1 + per[t].get(k, 0)) for k in keys] for t in tasks])
    im = ax.imshow(grid, aspect="auto", cmap="YlGnBu")
    ax.set_yticks(range(len(tasks)))
    ax.set_yticklabels(tasks)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"L{s}:{'-'.join(map(str, e))}" for s, e in keys], rotation=90, fontsize=7)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


# ---- experiments ----------------------------------------------------------------------------------

def experiment_curves(runs, metrics=("loss", "accuracy"), title=None):
    """Curves of experiment runs: `runs` maps a run name (arm/seed) to a dict with "step" and
    one list per metric (or a list of such dicts with a "name"). A panel per metric; `title`, when
    given, above them."""
    Figure = _plt()
    if isinstance(runs, (list, tuple)):
        runs = {str(r.get("name", i)): r for i, r in enumerate(runs)}
    if not isinstance(runs, dict):
        raise TypeError(f"runs must be a dict name -> curves or a list of run dicts, got {type(runs).__name__}")
    metrics = [m for m in metrics if any(m in r for r in runs.values())] or list(metrics)
    fig = Figure(figsize=(5 * len(metrics), 4), dpi=100)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        drawn = 0
        for name, r in runs.items():
            ys = r.get(metric)
            if not ys:
                continue
            xs = r.get("step") or list(range(len(ys)))
            # a line style per run as well as a colour: curves that coincide stay visible
            ax.plot(xs[:len(ys)], ys, label=name, lw=1.4, ls=("-", "--", "-.", ":")[drawn % 4])
            drawn += 1
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
        else:
            _empty(fig, ax, f"no {metric} curves")
    if title:
        fig.suptitle(str(title), fontsize=10)
    fig.tight_layout()
    return fig
