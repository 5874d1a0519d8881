"""Pictures of the memory (SPEC 12): matplotlib figures (PNG), a plotly Sankey (HTML) and a
self-contained HTML page; `memtrace viz` on the command line. matplotlib and plotly are the
optional extra `memtrace[viz]`."""
from .plots import (
                    experiment_curves,
                    memory_history,
                    motif_activations,
                    motif_graph,
                    routing_flow,
                    routing_sankey,
                    routing_transitions,
                    trace_heatmap,
)
from .report import load_state, save_png, write_report

__all__ = ["experiment_curves", "load_state", "memory_history", "motif_activations", "motif_graph", "routing_flow",
           "routing_sankey", "routing_transitions", "save_png", "trace_heatmap", "write_report"]
