"""memtrace.reference: dense, obvious PyTorch for every op, the oracle of all parity tests.

Everything here favours clarity over speed; run it in float64 for parity checks.
"""
from .attention import attention, attention_with_lse, causal_mask, dense_bias, logits_of, probabilities  # noqa: F401
from .cms import cms_initial_state, cms_norm_bound, cms_scan, cms_step, cms_write_weights  # noqa: F401
from .losses import (  # noqa: F401
    crystal_stability_loss,
    ewc_penalty,
    load_balance_loss,
    motif_entropy,
    trace_attention_mass,
    trace_utilization_loss,
)
from .memory import empty_state, steady_state_strength, trace_update, trace_update_dense  # noqa: F401
from .routing import *  # noqa: F401,F403
from .salience import capture_from_dense, salience  # noqa: F401
from .stateful_router import selection_entropy, stateful_route, stateful_scores  # noqa: F401
