"""memtrace.losses: the auxiliary losses of training with memory (SPEC 9).

    trace_attention_mass(q, k, lse, bias, *, scale, alpha, causal)  per-head attention share on stored traces
    trace_utilization_loss(masses)          -(1/LH) sum of those shares        (trace.py)
    crystal_stability_loss(router_probs, motifs, *, min_utility)   (1/N) sum H(pi) 1[U(pi) > U_min]  (crystal.py)
    load_balance_loss(router_logits, *, top_k, mask)               Switch-style E sum_e f_e P_e      (balance.py)
    EWC(params, weight)                      diagonal-Fisher elastic weight consolidation            (ewc.py)

Each returns the unweighted term; the manager multiplies by the config's *_loss_weight (EWC's
lambda is its `weight`). Float64 references live in memtrace.reference.losses.
"""
from .balance import load_balance_loss
from .crystal import crystal_stability_loss, motif_entropies
from .ewc import EWC
from .trace import trace_attention_mass, trace_utilisation_loss, trace_utilization_loss

__all__ = ["EWC", "crystal_stability_loss", "load_balance_loss", "motif_entropies", "trace_attention_mass",
           "trace_utilisation_loss", "trace_utilization_loss"]
