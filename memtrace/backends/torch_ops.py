"""PyTorch's private attention ops (aten._scaled_dot_product_*), guarded by their schemas: a
backend built on one reports a reason instead of calling an op whose signature changed."""
from __future__ import annotations

import torch

# (argument name, type) of every positional and keyword argument, and the number of returns, as
# memtrace calls them (torch 2.4 .. 2.13 have these).
_TORCH_OP_SCHEMAS = {
    "_scaled_dot_product_cudnn_attention": (
        [("query", "Tensor"), ("key", "Tensor"), ("value", "Tensor"), ("attn_bias", "Optional[Tensor]"),
         ("compute_log_sumexp", "bool"), ("dropout_p", "float"), ("is_causal", "bool"),
         ("return_debug_mask", "bool"), ("scale", "Optional[float]")], 9),
    "_scaled_dot_product_cudnn_attention_backward": (
        [("grad_out", "Tensor"), ("query", "Tensor"), ("key", "Tensor"), ("value", "Tensor"), ("out", "Tensor"),
         ("logsumexp", "Tensor"), ("philox_seed", "Tensor"), ("philox_offset", "Tensor"),
         ("attn_bias", "Tensor"), ("cum_seq_q", "Tensor"), ("cum_seq_k", "Tensor"), ("max_q", "SymInt"),
         ("max_k", "SymInt"), ("dropout_p", "float"), ("is_causal", "bool"), ("scale", "Optional[float]")], 3),
    "_scaled_dot_product_flash_attention": (
        [("query", "Tensor"), ("key", "Tensor"), ("value", "Tensor"), ("dropout_p", "float"),
         ("is_causal", "bool"), ("return_debug_mask", "bool"), ("scale", "Optional[float]")], 9),
    "_scaled_dot_product_flash_attention_backward": (
        [("grad_out", "Tensor"), ("query", "Tensor"), ("key", "Tensor"), ("value", "Tensor"), ("out", "Tensor"),
         ("logsumexp", "Tensor"), ("cum_seq_q", "Tensor"), ("cum_seq_k", "Tensor"), ("max_q", "SymInt"),
         ("max_k", "SymInt"), ("dropout_p", "float"), ("is_causal", "bool"), ("philox_seed", "Tensor"),
         ("philox_offset", "Tensor"), ("scale", "Optional[float]")], 3),
}
_SCHEMA_CHECKS: dict = {}


def torch_op_mismatch(name):
    """None when aten.<name>.default has the schema memtrace was written for, else a reason."""
    if name not in _SCHEMA_CHECKS:
        expected_args, expected_returns = _TORCH_OP_SCHEMAS[name]
        reason = None
        try:
            schema = getattr(torch.ops.aten, name).default._schema
            got = [(a.name, str(a.type)) for a in schema.arguments]
            # SymInt prints as "int" on some versions
            norm = [(n, t.replace("SymInt", "int")) for n, t in got]
            want = [(n, t.replace("SymInt", "int")) for n, t in expected_args]
            if norm != want or len(schema.returns) != expected_returns:
                reason = (f"torch {torch.__version__}: aten.{name} has the signature {schema}, "
                          "which memtrace does not know")
        except Exception as exc:
            reason = f"torch {torch.__version__} has no usable aten.{name} ({type(exc).__name__}: {exc})"
        _SCHEMA_CHECKS[name] = reason
    return _SCHEMA_CHECKS[name]
