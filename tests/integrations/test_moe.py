"""memtrace.integrations.moe on tiny random transformers MoE models (CPU, no downloads): block discovery,
routing records against independent argmax, padding, bitwise-unchanged logits, crystallized motifs
running inside the model (carried tokens, router rows skipped, frozen experts, FLOPs), detach, views."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from memtrace.crystallize import CompositeExpert, FusedExpertView, Motif  # noqa: E402
from memtrace.integrations.moe import attach_routers, find_moe_blocks  # noqa: E402

COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=61,
              attn_implementation="eager")
DEEPSEEK = dict(intermediate_size=64, moe_intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2,
                n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
                qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_shared_experts=1, num_key_value_heads=4)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=64, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                       num_experts=4, num_experts_per_tok=2, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=64, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                       head_dim=8, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=64, num_experts=4, num_experts_per_tok=2, eos_token_id=None)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(DEEPSEEK)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(DEEPSEEK, topk_method="group_limited_greedy")),
}
MOE_LAYERS = {f: [1, 2] if f.startswith("deepseek") else [0, 1, 2] for f in FAMILIES}


def tiny(family, seed=0):
    cfg_name, model_name, kw = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **kw})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    if family == "deepseek_v3":  # a non-zero correction bias, so that the choice differs from the weights
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(4) * 0.3)
    return model


class StubMgr:
    """What attach_routers needs from mt.Memtrace: record_routing (and held_motifs for refresh)."""

    def __init__(self, num_layers=3):
        self.num_layers, self.calls, self.motifs, self.flops = num_layers, [], [], []

    def record_routing(self, layer, expert_idx, probs=None, carried=None):
        self.calls.append((layer, expert_idx.clone(), None if probs is None else probs.detach().clone(),
                           None if carried is None else carried.clone()))

    def held_motifs(self):
        return list(self.motifs)

    def add_flops_saved(self, flops, tokens):
        self.flops.append((flops, tokens))


def inputs(B=2, T=7, pad=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :pad] = 0  # left padding on row 1
    return ids, mask


def independent_top1(family, gate, x):
    """Top-1 expert per token from the router weight alone (no memtrace code)."""
    logits = x.reshape(-1, x.shape[-1]).float() @ gate.weight.float().T
    if not family.startswith("deepseek"):
        return logits.argmax(-1)
    E, G, TG = 4, 2, 1
    if family == "deepseek_v3":
        s = logits.sigmoid()
        choice = s + gate.e_score_correction_bias
        gs = choice.view(-1, G, E // G).topk(2, -1)[0].sum(-1)
    else:
        s = logits.softmax(-1)
        choice = s
        gs = choice.view(-1, G, E // G).max(-1).values
    keep = torch.zeros_like(gs).scatter_(1, gs.topk(TG, -1)[1], 1).repeat_interleave(E // G, 1).bool()
    idx = choice.masked_fill(~keep, -math.inf).topk(2, -1)[1]
    return idx.gather(1, s.gather(1, idx).argmax(-1, keepdim=True)).squeeze(1)


def gate_inputs(model, scan):
    """Capture each router's input during one forward (plain forward pre-hooks)."""
    seen = {}
    hooks = [b.gate.register_forward_pre_hook(lambda m, a, layer=b.layer: seen.__setitem__(layer, a[0].detach()))
             for b in scan]
    return seen, hooks


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_find_blocks_layers_rule_and_layout(family):
    model = tiny(family)
    scan = find_moe_blocks(model)
    assert [b.layer for b in scan] == MOE_LAYERS[family] and not scan.skipped
    for b in scan:
        assert b.module is model.model.layers[b.layer].mlp and b.gate is b.module.gate
        assert b.experts is b.module.experts and b.num_experts == 4 and b.top_k == 2
        assert b.layout["has_gate"] and not b.layout["is_transposed"] and b.layout["intermediate"] == 64
    rule = scan[0].rule
    want = {"mixtral": ("softmax", "topk", True), "qwen2_moe": ("softmax", "topk", False),
            "qwen3_moe": ("softmax", "topk", True), "olmoe": ("softmax", "topk", False),
            "deepseek_v3": ("sigmoid", "group_limited_bias", True),
            "deepseek_v2": ("softmax", "group_limited_greedy", False)}[family]
    assert (rule.scoring, rule.selection, rule.normalize) == want
    assert f"layer {scan[0].layer}" in scan.describe()
    # the rule read from the attributes reproduces the router's own (weights, indices)
    x = torch.randn(11, 32)
    logits, w, idx = scan[0].gate(x)
    rw, ridx = scan[0].rule.select(logits, getattr(scan[0].gate, "e_score_correction_bias", None))
    order = torch.sort(w.float(), dim=-1, descending=True, stable=True)[1]
    torch.testing.assert_close(rw, w.float().gather(1, order), rtol=1e-6, atol=1e-6)
    assert torch.equal(ridx, idx.gather(1, order))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_records_independent_top1_padding_and_bitwise_logits(family):
    model = tiny(family)
    ids, mask = inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    mgr = StubMgr()
    handle = attach_routers(model, mgr)
    seen, hooks = gate_inputs(model, handle.blocks)
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
    for h in hooks:
        h.remove()
    assert torch.equal(out, ref)  # hooks change nothing
    assert [c[0] for c in mgr.calls] == MOE_LAYERS[family]
    real = mask.reshape(-1).bool()
    for layer, top1, probs, carried in mgr.calls:
        gate = model.model.layers[layer].mlp.gate
        want = independent_top1(family, gate, seen[layer])
        assert top1.shape == (14,) and carried is None
        assert torch.equal(top1[real], want[real]) and bool((top1[~real] == -1).all())
        assert probs.shape == (14, 4) and torch.allclose(probs.sum(-1), torch.ones(14))
    # the mask given explicitly wins over the one read from model(...)
    mgr.calls.clear()
    with handle.attention_mask(torch.ones(2, 7)), torch.no_grad():
        model(ids, attention_mask=mask)
    assert all(bool((c[1] >= 0).all()) for c in mgr.calls)
    handle.detach()
    handle.detach()  # idempotent
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, ref)
    for b in handle.blocks:
        assert not b.gate._forward_hooks and "forward" not in b.gate.__dict__
    assert not model._forward_pre_hooks


def test_unknown_moe_like_modules_are_skipped_and_refused():
    class OldStyleMoE(torch.nn.Module):  # transformers 4.x layout: Linear gate, list of expert MLPs
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(8, 4, bias=False)
            self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"mlp": OldStyleMoE()}) for _ in range(2))

    net = Net()
    scan = find_moe_blocks(net)
    assert len(scan) == 0 and len(scan.skipped) == 2
    assert "plain nn.Linear" in scan.describe() and "layers.0.mlp" in scan.describe()
    with pytest.raises(ValueError, match="cannot read the MoE blocks"):
        attach_routers(net, StubMgr())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=61))
    h = attach_routers(dense, StubMgr())  # no MoE: nothing to hook, no error
    assert len(h.blocks) == 0
    h.detach()


# ------------------------------------------------------------------------------------------------
def _manual_expert(experts, e, x):
    gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ experts.down_proj[e].T


def layer0_top1(model, ids, mask):
    """(top-1 expert of every token at the first MoE block [N], non-padding mask [N], the most
    frequent top-1 among real tokens): where the tests' motifs start."""
    scan = find_moe_blocks(model)
    seen, hooks = gate_inputs(model, scan)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    top0 = independent_top1("mixtral", scan[0].gate, seen[0])
    real = mask.reshape(-1).bool()
    return top0, real, int(torch.mode(top0[real]).values)


def test_mixtral_motif_runs_inside_the_model(monkeypatch):
    model = tiny("mixtral")
    ids, mask = inputs(B=3, T=9, pad=3)
    N = ids.numel()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    # layer-0 top-1 of every token; the motif starts at the most frequent one
    top0, real, a = layer0_top1(model, ids, mask)
    scan = find_moe_blocks(model)
    b, c = (a + 1) % 4, (a + 2) % 4
    carried = (top0 == a) & real
    n_car = int(carried.sum())
    assert 0 < n_car < N

    rows = {}
    cls = type(scan[0].gate)
    orig_forward = cls.forward

    def counting(self, hidden_states):
        rows.setdefault(id(self), []).append(hidden_states.reshape(-1, 32).shape[0])
        return orig_forward(self, hidden_states)

    monkeypatch.setattr(cls, "forward", counting)
    mgr = StubMgr()
    handle = attach_routers(model, mgr)
    motif = Motif(0, (a, b, c), count=100, utility=1.0, entropy=0.1, age=10, score=1.0)
    assert handle.apply_motifs([motif]) == [(0, (a, b, c))]

    ins, outs = {}, {}
    hk = []
    for blk in scan:
        hk.append(blk.module.register_forward_pre_hook(lambda m, a_, layer=blk.layer: ins.__setitem__(layer, a_[0])))
        hk.append(blk.module.register_forward_hook(lambda m, a_, o, layer=blk.layer: outs.__setitem__(layer, o)))
    model.train()  # jitter 0, no dropout: train mode for the gradient check
    logits = model(ids, attention_mask=mask).logits
    for h in hk:
        h.remove()
    # the router saw all N rows at layer 0, only the free ones at layers 1 and 2
    assert [rows[id(blk.gate)] for blk in scan] == [[N], [N - n_car], [N - n_car]]
    # layer 1 and 2 outputs: carried tokens through b and c (weight 1: Mixtral renormalises), the
    # others through the router and the block's own experts, computed by hand
    with torch.no_grad():
        for layer, e in ((1, b), (2, c)):
            blk = handle.by_layer[layer]
            x = ins[layer].reshape(N, 32)
            want = torch.empty(N, 32)
            want[carried] = _manual_expert(blk.experts, e, x[carried])
            free = ~carried
            _, w, idx = orig_forward(blk.gate, x[free])
            want[free] = type(blk.experts).forward(blk.experts, x[free], idx, w)
            torch.testing.assert_close(outs[layer].reshape(N, 32), want, rtol=1e-5, atol=1e-5)
    # recorded: layer 1 and 2 record the motif's expert for carried tokens, with the carried mask
    rec = {c_[0]: c_ for c_ in mgr.calls}
    assert torch.equal(rec[1][1][carried], torch.full((n_car,), b)) and torch.equal(rec[1][3], carried)
    assert torch.equal(rec[2][1][carried], torch.full((n_car,), c)) and rec[0][3] is None
    assert torch.equal(rec[1][2][carried], torch.nn.functional.one_hot(torch.full((n_car,), b), 4).float())
    # FLOPs: per carried token and carried layer, the router (2 H E) and the second expert (2*3*H*I)
    per = 2 * 32 * 4 + (2 - 1) * 2 * 3 * 32 * 64
    assert handle.flops_saved == 2 * n_car * per and handle.tokens_carried == 2 * n_car
    assert sum(f for f, _ in mgr.flops) == handle.flops_saved and sum(t for _, t in mgr.flops) == N
    assert handle.metrics()["tokens_seen"] == N and handle.metrics()["flops_saved_per_token"] == 2 * n_car * per / N
    # frozen experts: a at layer 0, b at 1, c at 2 get a zero gradient; the others learn
    logits.float().pow(2).mean().backward()
    for layer, e in ((0, a), (1, b), (2, c)):
        ex = model.model.layers[layer].mlp.experts
        for t in (ex.gate_up_proj, ex.down_proj):
            assert bool((t.grad[e] == 0).all())
            others = [o for o in range(4) if o != e]
            assert bool(t.grad[others].abs().sum() > 0)
    model.zero_grad()
    # detach restores everything bitwise
    model.eval()
    handle.detach()
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, ref)
    for blk in scan:
        for mod in (blk.gate, blk.experts):
            assert "forward" not in mod.__dict__ and not mod._forward_hooks
    out = model(ids, attention_mask=mask).logits
    out.float().pow(2).mean().backward()
    assert bool(model.model.layers[1].mlp.experts.gate_up_proj.grad[b].abs().sum() > 0)  # unfrozen


def test_refresh_follows_the_manager_and_pins_frozen_slices():
    model = tiny("mixtral")
    ids, mask = inputs()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    mgr = StubMgr()
    handle = attach_routers(model, mgr)
    assert handle.refresh() == [] and "forward" not in handle.blocks[0].gate.__dict__
    mgr.motifs = [Motif(0, (0, 1, 2), 50, 0.5, 0.1, 3, 1.0), Motif(0, (0, 3), 40, 0.4, 0.1, 3, 1.0),
                  Motif(1, (2, 3, 0), 50, 0.5, 0.1, 3, 1.0), Motif(2, (1,), 50, 0.5, 0.1, 3, 1.0)]
    assert handle.refresh() == [(0, (0, 1, 2))]  # (0, (0, 3)) is shadowed, (1, ...) runs past layer 2
    assert {k for k, _ in handle.skipped_motifs} == {(0, (0, 3)), (1, (2, 3, 0)), (2, (1,))}
    assert "forward" in handle.blocks[0].gate.__dict__
    # an optimizer step moves a frozen slice (momentum / weight decay): refresh writes it back
    ex = model.model.layers[1].mlp.experts
    before = ex.down_proj[1].detach().clone()
    with torch.no_grad():
        ex.down_proj.add_(0.5)
    handle.refresh()
    assert torch.equal(ex.down_proj[1], before) and not torch.equal(ex.down_proj[0], before)
    mgr.motifs = []  # revalidate dropped it: unfrozen, original forwards back
    assert handle.refresh() == []
    with torch.no_grad():  # undo the simulated step (slice 1 was pinned, so it did not move)
        ex.down_proj.sub_(0.5)
        ex.down_proj[1].copy_(before)
    for blk in handle.blocks:
        assert "forward" not in blk.gate.__dict__ and "forward" not in blk.experts.__dict__
        assert not blk.experts.gate_up_proj._backward_hooks
    handle.detach()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "mixtral"])
def test_motifs_run_in_other_families(family):
    model = tiny(family)
    ids, mask = inputs(B=3, T=9, pad=3)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    mgr = StubMgr()
    handle = attach_routers(model, mgr)
    s = MOE_LAYERS[family][0]
    with torch.no_grad():
        model(ids, attention_mask=mask)
    top = mgr.calls[0][1]
    a = int(torch.mode(top[top >= 0]).values)
    n_car = int((top == a).sum())
    mgr.calls.clear()
    handle.apply_motifs([(s, (a, 3 - a % 4) if s == 1 else (a, 1, 2))])
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    layers_carried = 1 if s == 1 else 2
    blk = handle.blocks[0]
    per = blk.router_flops + blk.expert_flops
    assert handle.flops_saved == layers_carried * n_car * per
    assert int(mgr.calls[1][3].sum()) == n_car
    handle.detach()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, ref)


def test_checkpointed_recompute_records_once_and_reproduces_the_carry():
    model = tiny("mixtral")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids, mask = inputs()
    mgr = StubMgr()
    handle = attach_routers(model, mgr)
    handle.apply_motifs([(0, (1, 2, 3)), (0, (0, 3, 1)), (0, (2, 0, 1)), (0, (3, 1, 0))])
    out = model(ids, attention_mask=mask).logits
    n_calls, flops = len(mgr.calls), handle.flops_saved
    out.float().pow(2).mean().backward()
    assert n_calls == 3 and len(mgr.calls) == 3 and handle.flops_saved == flops > 0
    g = model.model.layers[1].mlp.experts.gate_up_proj.grad
    assert g is not None and torch.isfinite(g).all()
    handle.detach()


# ------------------------------------------------------------------------------------------------
def test_fused_expert_views_share_storage_and_composite_expert_accepts_them():
    model = tiny("mixtral")
    layers = [model.model.layers[i].mlp.experts for i in range(3)]
    ex = layers[1]
    view = FusedExpertView(ex, 2)
    for name in ("gate_up_proj", "down_proj"):
        fused, part = getattr(ex, name), view.tensor(name)
        lo = fused.data_ptr()
        hi = lo + fused.numel() * fused.element_size()
        assert lo <= part.data_ptr() < hi and part.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert list(view.parameters()) == [] and view.is_view
    x = torch.randn(5, 32)
    torch.testing.assert_close(view(x), _manual_expert(ex, 2, x), rtol=0, atol=0)
    # bitwise equal to the fused module's own eager loop for one expert at weight 1
    idx = torch.full((5, 1), 2)
    assert torch.equal(view(x), type(ex).forward(ex, x, idx, torch.ones(5, 1)))
    live = CompositeExpert(layers, (0, (1, 2, 3)), frozen=False)
    assert list(live.parameters()) == []
    h = x
    for layer, e in enumerate((1, 2, 3)):
        h = _manual_expert(layers[layer], e, h)
    torch.testing.assert_close(live(x), h, rtol=1e-6, atol=1e-6)
    frozen = CompositeExpert(layers, Motif(0, (1, 2, 3), 1, 0.0, 0.0, 0, 0.0))
    per_expert = ex.gate_up_proj[0].numel() + ex.down_proj[0].numel()
    assert sum(p.numel() for p in frozen.parameters()) == 3 * per_expert  # the chain only, not 12 experts
    assert all(not p.requires_grad for p in frozen.parameters())
    torch.testing.assert_close(frozen(x), h, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        layers[1].down_proj.mul_(2.0)  # training moves the live experts: the frozen copy stays
    torch.testing.assert_close(frozen(x), h, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        CompositeExpert(layers, (0, (4,)))
    with pytest.raises(TypeError, match=r"experts_per_layer\[0\]"):
        CompositeExpert([torch.nn.Linear(8, 8)], (0, (0,)))


def test_frozen_slices_stay_put_under_adamw():
    model = tiny("mixtral")
    model.train()
    ids, mask = inputs()
    handle = attach_routers(model, StubMgr())
    handle.apply_motifs([(0, (1, 2, 3))])
    ex = [model.model.layers[i].mlp.experts for i in range(3)]
    before = [(e.gate_up_proj.detach().clone(), e.down_proj.detach().clone()) for e in ex]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        model(ids, attention_mask=mask).logits.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for layer, e in enumerate((1, 2, 3)):
        for t, t0 in zip((ex[layer].gate_up_proj, ex[layer].down_proj), before[layer]):
            assert torch.equal(t[e], t0[e])  # momentum and weight decay did not move the frozen expert
            assert not torch.equal(t[(e + 1) % 4], t0[(e + 1) % 4])
    handle.detach()
    model(ids, attention_mask=mask).logits.float().pow(2).mean().backward()
    opt.step()  # no hook left behind: the expert moves again
    assert not torch.equal(ex[0].gate_up_proj[1], before[0][0][1])


def test_with_the_memtrace_manager_step_unfreezes():
    import memtrace as mt
    from memtrace.training import MemtraceConfig

    model = tiny("mixtral")
    model.train()
    ids, mask = inputs()
    cfg = MemtraceConfig(phase_starts=(None, None, 0, 0), prune_interval=1, min_utility=0.05)
    mgr = mt.Memtrace(3, 4, num_experts=4, config=cfg)
    mgr.registry.load_state_dict({"max_motifs": 512, "weights": [1.0, 1.0, 1.0, 0.0], "threshold": None,
                                  "motifs": [dict(start_layer=0, experts=[1, 2, 3], count=200, utility=1.0,
                                                  entropy=0.1, age=600, score=5.0)]})
    assert [m.key for m in mgr.held_motifs()] == [(0, (1, 2, 3))]
    handle = attach_routers(model, mgr)
    out = model(ids, attention_mask=mask)
    assert handle.held_motifs == [(0, (1, 2, 3))]  # followed the manager at the forward
    (out.logits.float().pow(2).mean() + mgr.aux_loss()).backward()
    mgr.step()        # step 0: consider keeps it
    out = model(ids, attention_mask=mask)
    out.logits.float().pow(2).mean().backward()
    mgr.step(token_loss=torch.zeros(14))   # step 1: revalidate drops it (the trie never rewarded it)
    assert mgr.held_motifs() == []
    per_token = handle.flops_saved / handle.tokens_executing
    assert handle.flops_saved > 0 and mgr.metrics()["flops_saved_per_token"] == pytest.approx(per_token)
    model(ids, attention_mask=mask)
    assert handle.held_motifs == [] and "forward" not in handle.blocks[0].gate.__dict__
    assert not model.model.layers[1].mlp.experts.gate_up_proj._backward_hooks
    handle.detach()


# ------------------------------------------------------------------------------------------------
# Distilled motifs (module docstring, section 4)
def _motif_setup(mode="distill", **kw):
    """A tiny Mixtral, its layer-0 top-1 per token and a 3-layer motif from the most frequent one."""
    model = tiny("mixtral")
    ids, mask = inputs(B=3, T=9, pad=3)
    top0, real, a = layer0_top1(model, ids, mask)
    motif = (0, (a, (a + 1) % 4, (a + 2) % 4))
    in_motif = (top0 == a) & real
    assert 0 < int(in_motif.sum()) < ids.numel()
    mgr = StubMgr()
    handle = attach_routers(model, mgr, mode=mode, **kw)
    assert handle.apply_motifs([motif]) == [motif]
    return model, ids, mask, mgr, handle, motif, in_motif


def _block_io(model, handle, ids, mask):
    """Each MoE block's input and output [N, H] in one forward (no grad)."""
    ins, outs, hk = {}, {}, []
    for blk in handle.blocks:
        hk.append(blk.module.register_forward_pre_hook(
            lambda m, a, layer=blk.layer: ins.__setitem__(layer, a[0].detach().reshape(-1, 32))))
        hk.append(blk.module.register_forward_hook(
            lambda m, a, o, layer=blk.layer: outs.__setitem__(layer, o.detach().reshape(-1, 32))))
    with torch.no_grad():
        model(ids, attention_mask=mask)
    for h in hk:
        h.remove()
    return ins, outs


def test_distillation_fits_the_chains_summed_contribution():
    model, ids, mask, mgr, handle, motif, in_motif = _motif_setup(distill_steps=40, distill_lr=1e-2)
    model.train()    # pairs are collected from training-mode forwards
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ins, outs = _block_io(model, handle, ids, mask)
    # the target by hand: the block outputs of the motif's tokens summed over its three layers
    # (Mixtral has no shared expert: block output = experts output; weight 1: renormalised)
    target = sum(outs[layer][in_motif] for layer in range(3))
    d = handle.distilled_expert(motif)
    assert isinstance(d, FusedExpertView) and not d.is_view and all(p.requires_grad for p in d.parameters())
    assert not any(p is q for p in d.parameters() for q in model.parameters())   # not the model's
    x0 = ins[0][in_motif]
    with torch.no_grad():
        want0 = torch.nn.functional.mse_loss(_manual_expert(handle.by_layer[0].experts, motif[1][0], x0), target)
    losses = [handle.distill_step()[motif]]
    assert losses[0] == pytest.approx(float(want0), rel=1e-4)   # D starts as a copy of e_s
    assert handle.distill_status()[motif]["rows"] == int(in_motif.sum())
    for _ in range(39):
        with torch.no_grad():
            model(ids, attention_mask=mask)
        losses.append(handle.distill_step()[motif])
    assert losses[-1] < 0.1 * losses[0]
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(d(x0), target)
    assert float(after) < 0.1 * float(want0)
    st = handle.distill_status()[motif]
    assert st["steps"] == 40 and st["distilled"] and not any(p.requires_grad for p in d.parameters())
    assert not d.training
    # the user's model did not move (forwards without backward, D's optimizer holds D only)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # distilled: nothing is collected any more
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert handle.distill_step() == {}
    # eval forwards collect nothing: a distilling motif gets no step from them
    model2, ids2, mask2, _, h2, motif2, _ = _motif_setup()
    model2.eval()
    with torch.no_grad():
        model2(ids2, attention_mask=mask2)
    assert h2.distill_step() == {} and h2.distill_status()[motif2]["steps"] == 0
    handle.detach()
    h2.detach()


def test_distilled_motif_skips_router_and_experts_and_counts_flops(monkeypatch):
    rows = {"gate": [], "experts": [], "view": 0, "owned": 0}
    gate_cls = type(find_moe_blocks(tiny("mixtral"))[0].gate)
    exp_cls = type(find_moe_blocks(tiny("mixtral"))[0].experts)
    g_fwd, e_fwd, v_fwd = gate_cls.forward, exp_cls.forward, FusedExpertView.forward

    def gate_counting(self, hidden_states):
        rows["gate"].append(hidden_states.reshape(-1, 32).shape[0])
        return g_fwd(self, hidden_states)

    def experts_counting(self, hidden_states, *args, **kwargs):
        rows["experts"].append(hidden_states.shape[0])
        return e_fwd(self, hidden_states, *args, **kwargs)

    def view_counting(self, x):
        rows["view" if self.is_view else "owned"] += x.shape[0]
        return v_fwd(self, x)

    monkeypatch.setattr(gate_cls, "forward", gate_counting)
    monkeypatch.setattr(exp_cls, "forward", experts_counting)
    monkeypatch.setattr(FusedExpertView, "forward", view_counting)
    model, ids, mask, mgr, handle, motif, in_motif = _motif_setup()
    model.eval()
    ins, _ = _block_io(model, handle, ids, mask)
    N, n = ids.numel(), int(in_motif.sum())
    blocks = handle.blocks

    def run_blocks():
        for k in rows:
            rows[k] = [] if isinstance(rows[k], list) else 0
        with handle.attention_mask(mask), torch.no_grad():
            return [blk.module(ins[blk.layer].reshape(3, 9, 32)).reshape(N, 32) for blk in blocks]

    carried = run_blocks()            # distilling: carry mode
    assert rows == {"gate": [N, N - n, N - n], "experts": [N, N - n, N - n], "view": 2 * n, "owned": 0}
    d = handle.distilled_expert(motif)
    with torch.no_grad():             # make D differ from e_s, so that its use is visible
        d.down_proj.mul_(-3.0)
    assert handle.finish_distillation([motif]) == [motif]
    flops0, m0 = handle.flops_saved, len(mgr.flops)
    out = run_blocks()
    # the router skips the motif tokens at layers 1 and 2; the experts module runs only the other
    # tokens at every layer; no expert view runs; D runs once per motif token at layer 0
    assert rows == {"gate": [N, N - n, N - n], "experts": [N - n, N - n, N - n], "view": 0, "owned": n}
    free = ~in_motif
    for layer in range(3):
        torch.testing.assert_close(out[layer][free], carried[layer][free], rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(out[0][in_motif], d(ins[0][in_motif]), rtol=1e-6, atol=1e-9)  # weight ~1
    assert bool((out[1][in_motif] == 0).all()) and bool((out[2][in_motif] == 0).all())
    # FLOPs by hand: layer 0: top_k experts minus D per token; layers 1, 2: router + top_k experts
    R, X, k = 2 * 32 * 4, 2 * 3 * 32 * 64, 2
    want = n * (k - 1) * X + 2 * n * (R + k * X)
    assert handle.flops_saved - flops0 == want
    assert sum(f for f, _ in mgr.flops[m0:]) == want
    met = handle.metrics()
    assert met["tokens_skipped"] == 2 * n and met["tokens_distilled"] == n and met["motifs_distilled"] == 1
    # records: the motif's experts for its tokens at layers 1 and 2, as in carry mode
    rec = {c[0]: c for c in mgr.calls[-3:]}
    assert torch.equal(rec[1][1][in_motif], torch.full((n,), motif[1][1])) and torch.equal(rec[2][3], in_motif)
    handle.detach()


def test_default_mode_is_carry_and_distilling_runs_bitwise_as_carry():
    model, ids, mask, mgr, handle, motif, _ = _motif_setup(mode="carry")
    model.train()
    assert handle.mode == "carry" and handle.distilled_expert(motif) is None and handle.distill_status() == {}
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    assert handle.distill_step() == {} and handle.metrics()["tokens_skipped"] == 0
    handle.set_mode("distill")
    assert handle.held_motifs == [motif] and handle.distilled_expert(motif) is not None
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, ref)
    assert handle.distill_step()[motif] > 0           # it collected meanwhile
    handle.finish_distillation()
    with torch.no_grad():
        assert not torch.equal(model(ids, attention_mask=mask).logits, ref)
    handle.set_mode("carry")                          # back: D dropped, carry execution bitwise
    assert handle.distilled_expert(motif) is None and handle.held_motifs == [motif]
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, ref)
    handle.detach()


def test_distill_bad_input_names_the_argument():
    model = tiny("mixtral")
    for kw, exc, word in ((dict(mode="fast"), ValueError, "mode"), (dict(mode=None), ValueError, "mode"),
                          (dict(distill_steps=0), ValueError, "distill_steps"),
                          (dict(distill_steps="3"), TypeError, "distill_steps"),
                          (dict(distill_lr=0.0), ValueError, "distill_lr"),
                          (dict(distill_lr=float("nan")), ValueError, "distill_lr")):
        with pytest.raises(exc, match=word):
            attach_routers(model, StubMgr(), **kw)
        assert not model._forward_pre_hooks      # refused before anything was attached
    handle = attach_routers(model, StubMgr())
    handle.apply_motifs([(0, (1, 2, 3))])
    with pytest.raises(ValueError, match="mode"):
        handle.set_mode("distilled")
    with pytest.raises(ValueError, match="distill_steps"):
        handle.set_mode("distill", distill_steps=-1)
    assert handle.mode == "carry" and handle.distill_status() == {}   # unchanged on error
    with pytest.raises(ValueError, match="motifs"):
        handle.finish_distillation([(0, (1, 2, 3))])                   # carry mode
    handle.set_mode("distill")
    with pytest.raises(ValueError, match="motifs"):
        handle.finish_distillation([(0, (2, 3, 1))])                   # not held
    handle.detach()
    with pytest.raises(RuntimeError, match="detached"):
        handle.distill_step()


def test_distilled_detach_restores_everything_and_checkpointing_collects_once():
    model, ids, mask, mgr, handle, motif, in_motif = _motif_setup(distill_steps=2)
    handle.detach()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    model.gradient_checkpointing_enable()             # transformers' default: non-reentrant
    model.train()
    mgr = StubMgr()
    handle = attach_routers(model, mgr, mode="distill", distill_steps=2)
    handle.apply_motifs([motif])
    n = int(in_motif.sum())
    model(ids, attention_mask=mask).logits.float().pow(2).mean().backward()
    handle.distill_step()
    assert handle.distill_status()[motif]["rows"] == n          # the recompute collected nothing
    model(ids, attention_mask=mask).logits.float().pow(2).mean().backward()
    assert handle.distill_step() and handle.distill_status()[motif]["distilled"]
    model.zero_grad()
    out = model(ids, attention_mask=mask).logits
    flops = handle.flops_saved
    out.float().pow(2).mean().backward()
    assert handle.flops_saved == flops > 0 and handle.metrics()["tokens_distilled"] == n
    g = model.model.layers[0].self_attn.q_proj.weight.grad   # gradient flows through D's input
    assert g is not None and torch.isfinite(g).all() and bool(g.abs().sum() > 0)
    d = handle.distilled_expert(motif)
    assert all(p.grad is None for p in d.parameters())      # frozen
    model.zero_grad()
    model.gradient_checkpointing_disable()
    model.eval()
    handle.detach()
    assert handle.distill_status() == {} and handle.distilled_expert(motif) is None
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, ref)
    for blk in handle.blocks:
        for mod in (blk.gate, blk.experts):
            assert "forward" not in mod.__dict__ and not mod._forward_hooks
        assert not blk.experts.gate_up_proj._backward_hooks
    assert not model._forward_pre_hooks


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "mixtral"])
def test_distill_mode_runs_in_other_families(family):
    model = tiny(family)
    model.train()
    ids, mask = inputs(B=3, T=9, pad=3)
    mgr = StubMgr()
    handle = attach_routers(model, mgr, mode="distill", distill_steps=1)
    s = MOE_LAYERS[family][0]
    with torch.no_grad():
        model(ids, attention_mask=mask)
    top = mgr.calls[0][1]
    a = int(torch.mode(top[top >= 0]).values)
    n = int((top == a).sum())
    motif = (s, (a, 3 - a % 4)) if s == 1 else (s, (a, 1, 2))
    handle.apply_motifs([motif])
    with torch.no_grad():
        model(ids, attention_mask=mask)
    loss = handle.distill_step()[motif]
    st = handle.distill_status()[motif]
    assert math.isfinite(loss) and st["rows"] == n and st["distilled"]        # distill_steps=1
    flops = handle.flops_saved
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    blk = handle.blocks[0]
    skipped = len(motif[1]) - 1
    assert handle.flops_saved - flops == n * (blk.expert_flops + skipped * (blk.router_flops + 2 * blk.expert_flops))
    handle.detach()
