"""The experiment's models: a small Mixtral-style MoE transformer and the same dense (Llama) model.

`build_model(ModelSpec, seed)` returns an `ExperimentModel` (an nn.Module around a transformers
`MixtralForCausalLM` or `LlamaForCausalLM`, random init from `torch.manual_seed(seed)`, so two
arms of one seed start from bitwise the same weights); memtrace is attached to `.lm` through
`memtrace.integrations.hf.attach` by the runner.

Positions (`ModelSpec.position`):
    "rope"     the family's rotary embedding (transformers' default).
    "nope"     no position encoding at all: transformers 5.17 has no config switch that turns
               RoPE off in Llama/Mixtral (`rope_parameters` only picks a RoPE variant), so the
               model's `rotary_emb` module is replaced by one that returns cos = 1, sin = 0,
               which makes `apply_rotary_pos_emb` the identity (q and k unchanged). The causal
               mask is then the only source of order (NoPE, Kazemnejad et al. 2023).
    "learned"  "nope" plus a learned absolute position embedding added to the token embeddings
               (GPT-2 style), passed as `inputs_embeds`. Absolute positions are explicit here,
               relative offsets are not (with RoPE it is the other way round).
    GPT-2 / GPT-NeoX themselves were not used: one family per arm pair keeps the dense and the
    MoE models identical but for the MLP, and the three position schemes identical but for the
    position code.

FLOPs (`forward_flops_per_token`): the analytic forward count per token of a length-T causal
sequence, 2 x multiply-adds: attention projections 2 d (2 d + 2 d_kv), scores and values
2 x 2 d (T + 1) / 2 (the causal average), the MLP 2 x 3 d I (dense) or the router 2 d E plus
top_k gated experts 2 x 3 d I (MoE), and the LM head 2 d V. Training is about 3x that.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["POSITIONS", "ExperimentModel", "ModelSpec", "build_model", "forward_flops_per_token"]

POSITIONS = ("rope", "nope", "learned")
KINDS = ("moe", "dense")


@dataclass(frozen=True)
class ModelSpec:
    """Model shape. kind "moe" (Mixtral: num_experts, top_k) or "dense" (Llama, same sizes)."""
    kind: str = "moe"
    layers: int = 4
    d_model: int = 256
    heads: int = 8
    ffn: int = 512
    num_experts: int = 8
    top_k: int = 2
    vocab_size: int = 64
    max_len: int = 256
    position: str = "rope"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"model kind must be one of {KINDS}, got {self.kind!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} must be a multiple of heads {self.heads}")
        if self.kind == "moe" and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def to_dict(self) -> dict:
        return asdict(self)


class _NoRotary(nn.Module):
    """Stands in for a model's rotary embedding: cos = 1, sin = 0 (apply_rotary_pos_emb = identity)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x, position_ids):
        shape = (*position_ids.shape, self.head_dim)
        return (torch.ones(shape, dtype=x.dtype, device=x.device), torch.zeros(shape, dtype=x.dtype, device=x.device))


class ExperimentModel(nn.Module):
    """`forward(input_ids) -> logits [B, T, V]`; `.lm` is the transformers model (attach to it)."""

    def __init__(self, spec: ModelSpec, lm: nn.Module):
        super().__init__()
        self.spec = spec
        self.lm = lm
        self.pos = nn.Embedding(spec.max_len, spec.d_model) if spec.position == "learned" else None
        if self.pos is not None:
            nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, input_ids):
        if self.pos is None:
            return self.lm(input_ids=input_ids).logits
        emb = self.lm.get_input_embeddings()(input_ids)
        emb = emb + self.pos(torch.arange(input_ids.shape[1], device=input_ids.device)).unsqueeze(0)
        return self.lm(inputs_embeds=emb).logits


def build_model(spec: ModelSpec, seed: int, device="cpu", dtype=torch.float32) -> ExperimentModel:
    """The model of `spec`, initialised from `torch.manual_seed(seed)` (same seed: same weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
    common = dict(hidden_size=spec.d_model, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                  num_key_value_heads=spec.heads, intermediate_size=spec.ffn, vocab_size=spec.vocab_size,
                  max_position_embeddings=max(spec.max_len, 16), attention_dropout=0.0, tie_word_embeddings=False,
                  attn_implementation="sdpa", pad_token_id=None, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    if spec.kind == "moe":
        cfg = MixtralConfig(num_local_experts=spec.num_experts, num_experts_per_tok=spec.top_k,
                            router_jitter_noise=0.0, output_router_logits=False, sliding_window=None, **common)
        lm = MixtralForCausalLM(cfg)
    else:
        lm = LlamaForCausalLM(LlamaConfig(**common))
    if spec.position != "rope":
        lm.model.rotary_emb = _NoRotary(spec.head_dim)
    model = ExperimentModel(spec, lm)
    return model.to(device=device, dtype=dtype)


def forward_flops_per_token(spec: ModelSpec, seq_len: int) -> float:
    """Analytic forward FLOPs per token (see the module docstring)."""
    d, L = spec.d_model, spec.layers
    attn = 2 * d * (2 * d + 2 * d) + 2 * 2 * d * (seq_len + 1) / 2
    if spec.kind == "moe":
        mlp = 2 * d * spec.num_experts + spec.top_k * 2 * 3 * d * spec.ffn
    else:
        mlp = 2 * 3 * d * spec.ffn
    return float(L * (attn + mlp) + 2 * d * spec.vocab_size)
