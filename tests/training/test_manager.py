"""mt.Memtrace (SPEC 9, issue 24): the curriculum, calibration, captures under checkpointing and
gradient accumulation, bad input, the auxiliary losses and the metrics."""
import inspect
import math
import os

import pytest
import torch
from manager_helpers import H, T, TinyModel, assert_same_memory, batch, short_config, token_losses

import memtrace as mt
from memtrace import reference as R

HAS_MASK = "key_padding_mask" in inspect.signature(mt.biased_attention).parameters
needs_mask = pytest.mark.skipif(not HAS_MASK, reason="mt.biased_attention has no key_padding_mask parameter yet")


def _train(mgr, model, steps, *, B=2, reduction="mean", micro=1, opt=None, seed=0):
    for s in range(steps):
        x = batch(s, B=B, seed=seed)
        for part in x.chunk(micro):
            tl = token_losses(model, part)
            loss = tl.sum() if reduction == "sum" else tl.mean()
            ((loss + mgr.aux_loss()) / micro).backward()
        if opt is not None:
            opt.step()
        mgr.step()          # before zero_grad: EWC reads the gradients on capture steps
        if opt is not None:
            opt.zero_grad()


def _fresh(config=None, ckpt=False, layers=2, **kw):
    mgr = mt.Memtrace(layers, H, config=config or short_config(**kw))
    return mgr, TinyModel(mgr, layers=layers, ckpt=ckpt)


def test_exports():
    assert mt.Memtrace is mt.training.Memtrace
    assert mt.MemtraceConfig is mt.training.MemtraceConfig
    assert issubclass(mt.nn.TraceAttention, torch.nn.Module)
    cfg = short_config()
    assert mt.MemtraceConfig.from_dict(cfg.to_dict()) == cfg
    mgr = mt.Memtrace(2, H, config=cfg.to_dict())
    assert mgr.config == cfg and mgr.step_count == 0
    with pytest.raises(TypeError):
        mt.Memtrace(2, H, config=3)
    with pytest.raises(ValueError):
        mt.Memtrace(0, H)
    with pytest.raises(TypeError):
        mt.nn.TraceAttention(object(), 0)
    with pytest.raises(ValueError):
        mt.nn.TraceAttention(mgr, 2)
    assert "layer=1" in repr(mt.nn.TraceAttention(mgr, 1))


def test_manager_owns_one_memory_configured_from_the_config():
    cfg = short_config(quota_per_head=7, retention_rate=0.9, decay_rate=0.5, window=8, max_seq_len=64)
    mgr = mt.Memtrace(3, H, num_experts=4, config=cfg)
    mem = mgr.memory()
    assert (mem.num_layers, mem.num_heads, mem.quota, mem.retention, mem.decay, mem.window, mem.max_seq_len) == \
        (3, H, 7, 0.9, 0.5, 8, 64)
    assert mem.threshold == cfg.salience_threshold
    assert mgr.memory(2) is mem
    assert mgr.tree.num_layers == 3 and mgr.tree.num_experts == 4
    assert mgr.registry.max_motifs == cfg.max_motifs
    assert mt.Memtrace(3, H).tree is None


def test_foundation_phase_records_nothing_and_is_plain_attention():
    mgr, model = _fresh(phase_starts=(None, None, None, None))
    ref_mgr = mt.Memtrace(2, H, config=short_config(phase_starts=(None, None, None, None)))
    x = batch(0)
    out = model(x)
    _train(mgr, model, 3)
    assert mgr.memory().num_traces() == 0 and mgr.phase == mt.training.Phase.FOUNDATION
    q, k, v = torch.randn(3, 1, H, T, 16).unbind(0)
    torch.testing.assert_close(ref_mgr.attention(0, q, k, v), mt.biased_attention(q, k, v, causal=True))
    assert out.shape == (2, T, 11)


def test_curriculum_accumulation_then_bias():
    # captures at 0, 2, 4; the bias from step 4 on
    mgr, model = _fresh(phase_starts=(0, 4, None, None))
    q, k, v = torch.randn(3, 1, H, T, 16).unbind(0)
    plain = mt.biased_attention(q, k, v, causal=True)
    _train(mgr, model, 1)          # step 0: capture, no bias
    assert mgr.memory().num_traces() > 0
    assert mgr.phase == mt.training.Phase.TRACE_ACCUMULATION
    torch.testing.assert_close(mgr.attention(0, q, k, v), plain)    # no bias before trace-biased training
    _train(mgr, model, 3)          # steps 1..3
    assert mgr.phase == mt.training.Phase.TRACE_BIASED and mgr.plan.bias
    biased = mgr.attention(0, q, k, v)
    expect = mt.biased_attention(q, k, v, mgr.memory().bias(0), causal=True, alpha=float(mgr.alpha(0)))
    torch.testing.assert_close(biased, expect)
    assert not torch.allclose(biased, plain)


def test_default_threshold_stores_traces_in_a_few_steps():
    cfg = mt.MemtraceConfig(update_interval=2, warmup_steps=1, total_steps=10)   # every other setting default
    mgr, model = _fresh(config=cfg)
    _train(mgr, model, 4, opt=torch.optim.SGD(model.parameters(), lr=0.05))
    assert mgr.memory().num_traces(0) > 0 and mgr.memory().num_traces(1) > 0
    m = mgr.metrics()
    assert m["trace_count"] == mgr.memory().num_traces() and m["bytes_used"] == 12 * m["trace_count"]


def test_alpha_is_beta_over_max_strength_on_device():
    mgr, model = _fresh(bias_strength=0.2)
    assert float(mgr.alpha(0)) == 0.0            # empty memory: no bias
    _train(mgr, model, 1)
    for layer in range(2):
        a = mgr.alpha(layer)
        assert a.dim() == 0 and a.device == mgr.memory().device
        top = mgr.memory().strength[layer].max()
        assert top > 0
        torch.testing.assert_close(a, 0.2 / top)


def test_calibration_loss_reduction_invariance(reference_attention):
    # the aux loss is added unscaled, so it would weigh differently against a summed task loss
    a, ma = _fresh(trace_loss_weight=0.0)
    b, mb = _fresh(trace_loss_weight=0.0)
    _train(a, ma, 3, reduction="mean")
    _train(b, mb, 3, reduction="sum")
    assert a.memory().num_traces() > 0
    assert_same_memory(a, b, rtol=1e-4, atol=1e-6)


def test_calibration_batch_size_invariance(reference_attention):
    a, ma = _fresh()
    b, mb = _fresh()
    for s in range(3):
        x = batch(s)
        for mgr, model, xb in ((a, ma, x), (b, mb, torch.cat([x, x]))):
            token_losses(model, xb).mean().backward()
            mgr.step()
    assert a.memory().num_traces() > 0
    assert_same_memory(a, b, rtol=1e-4, atol=1e-6)


def test_normalised_salience_has_mean_one():
    from memtrace.training.capture_step import mean_salience
    q, k, v, dout = torch.randn(4, 2, H, 9, 16).unbind(0)
    lse = R.attention_lse(q.double(), k.double(), causal=True) if hasattr(R, "attention_lse") else None
    if lse is None:
        logits = (q.double() @ k.double().transpose(-1, -2)) / 4.0
        logits = logits.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
        lse = torch.logsumexp(logits, -1)
    S, _ = R.salience(q.double(), k.double(), v.double(), dout.double(), None, causal=True, scale=0.25, alpha=1.0)
    total, count, top = mean_salience(q.double(), k.double(), v.double(), lse, dout.double(), None, 1.0,
                                      causal=True, scale=0.25, kth=7)
    torch.testing.assert_close(total, S.sum())
    assert int(count) == H * 45
    torch.testing.assert_close(top, S.reshape(-1).sort(descending=True).values[6])   # every row sampled: exact


def test_capture_cut_keeps_the_strongest_and_stays_under_capacity():
    """With far more edges over the threshold than the capture holds, the cut rises to about
    CROWD_FILL * capacity candidates (no overflow), and what is kept are the strongest edges."""
    from memtrace.training.capture_step import CROWD_FILL, LayerCapture
    seed = int(torch.randint(0, 2**31 - 1, ()))
    g = torch.Generator().manual_seed(seed)
    B, Hh, T, Dd = 2, 3, 40, 16
    q, k, v, dout = (torch.randn(B, Hh, T, Dd, generator=g, dtype=torch.float64) for _ in range(4))
    out, lse = R.attention_with_lse(q, k, v, causal=True)
    capacity = 96
    cap = LayerCapture(threshold=1e-9, capacity=capacity)       # nearly every visible edge passes it
    cap.add(q, k, v, out, lse, dout, None, None, causal=True, scale=Dd ** -0.5, alpha=1.0,
            key_padding_mask=None, extra={})
    (h, i, j, S_norm, _), n, _, _, _ = cap.merged(T)
    n = int(n)
    assert 0.5 * CROWD_FILL * capacity <= n <= capacity, f"seed {seed}: kept {n} of capacity {capacity}"
    S, _ = R.salience(q, k, v, dout, None, causal=True, scale=Dd ** -0.5)
    kept = S[h[:n].long(), i[:n].long(), j[:n].long()]
    strongest = S.reshape(-1).sort(descending=True).values[:n]
    torch.testing.assert_close(kept.sort(descending=True).values, strongest, rtol=1e-6, atol=0)


def test_checkpoint_does_not_double_count():
    # the trace utilisation term is not computed under saved-tensor hooks (checkpointing): off here
    a, ma = _fresh(trace_loss_weight=0.0)
    b, mb = _fresh(ckpt=True, trace_loss_weight=0.0)
    _train(a, ma, 3)
    _train(b, mb, 3)
    assert a.memory().num_traces() > 0
    assert_same_memory(a, b)


def test_gradient_accumulation_is_a_mean_over_micro_batches(reference_attention):
    a, ma = _fresh()
    b, mb = _fresh()
    _train(a, ma, 3, B=4)
    _train(b, mb, 3, B=4, micro=2)
    assert a.memory().num_traces() > 0
    (sa, _), (sb, _) = (a.memory().strength, None), (b.memory().strength, None)
    assert torch.equal(sa >= 0, sb >= 0)
    torch.testing.assert_close(sa, sb, rtol=5e-3, atol=1e-5)


def test_step_without_backward_raises_and_changes_nothing():
    mgr, model = _fresh()
    token_losses(model, batch(0))          # forward on a capture step, no backward
    with pytest.raises(RuntimeError, match="backward"):
        mgr.step()
    assert mgr.step_count == 0 and mgr.memory().num_traces() == 0
    token_losses(model, batch(0)).mean().backward()
    mgr.step()
    assert mgr.step_count == 1 and mgr.memory().num_traces() > 0


def _routing_mgr(**kw):
    cfg = short_config(phase_starts=(None, None, 0, None), **kw)
    return mt.Memtrace(3, H, num_experts=4, config=cfg)


def test_record_routing_bad_input_changes_nothing():
    mgr = _routing_mgr()
    good = torch.tensor([[0, 1, 2], [3, -1, 0]])
    mgr.record_routing(0, good)
    for bad, err in ((torch.tensor([[0, 4, 1]]), ValueError), (torch.tensor([-2, 0]), ValueError),
                     (torch.zeros(2, 2, 2, dtype=torch.long), ValueError), (torch.zeros(6), TypeError),
                     (torch.tensor([0, 1, 2, 3, 0]), ValueError)):       # 5 tokens, layer 0 recorded 6
        with pytest.raises(err):
            mgr.record_routing(1, bad)
    with pytest.raises(ValueError):
        mgr.record_routing(3, good)
    with pytest.raises(ValueError):
        mgr.record_routing(1, good, probs=torch.rand(2, 3, 5))
    assert list(mgr._routes) == [0]
    mgr.record_routing(1, good.flip(0))
    mgr.step(token_loss=torch.rand(2, 3))
    assert mgr.tree.num_tokens == 6
    with pytest.raises(ValueError):
        mt.Memtrace(2, H).record_routing(0, good)


def test_routing_builds_paths_and_motifs():
    mgr = _routing_mgr(min_frequency=2, min_age=0, min_utility=-1.0, max_entropy=10.0, motif_min_length=2,
                       update_interval=1)
    for _ in range(3):
        for layer in (2, 0, 1):          # any layer order
            mgr.record_routing(layer, torch.tensor([layer, layer, 1, -1]))
        mgr.step(token_loss=torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert mgr.tree.num_tokens == 12
    st = mgr.tree.stats(0, (0, 1, 2))
    assert st["count"] == 6
    assert len(mgr.registry) > 0 and mgr.metrics()["motif_count"] == len(mgr.registry)
    assert mgr.held_motifs() == []          # no crystallization phase


def test_held_motifs_and_hook_in_crystallization():
    cfg = short_config(phase_starts=(None, None, 0, 1), min_frequency=1, min_age=0, min_utility=-1.0,
                       max_entropy=10.0, motif_min_length=2, update_interval=1)
    mgr = mt.Memtrace(2, H, num_experts=3, config=cfg)
    seen = []
    mgr.on_motifs_changed(lambda added, removed: seen.append(([m.key for m in added], removed)))
    mgr.record_routing(0, torch.tensor([1, 1]))
    mgr.record_routing(1, torch.tensor([2, 2]))
    mgr.step()
    assert mgr.held_motifs() and seen and ((0, (1, 2)) in seen[0][0])
    assert (0, 1) in mgr.frozen_experts() and (1, 2) in mgr.frozen_experts()
    mgr.add_flops_saved(100.0, tokens=4)
    mgr.step()
    assert mgr.metrics()["flops_saved_per_token"] == 25.0


def test_aux_loss_zero_when_nothing_applies():
    mgr = mt.Memtrace(2, H)
    loss = mgr.aux_loss()
    assert loss.dim() == 0 and float(loss) == 0.0


def test_aux_loss_trace_term_matches_reference():
    mgr, model = _fresh(trace_loss_weight=0.5)
    _train(mgr, model, 2)       # traces stored; step 2 is biased
    q, k, v = (torch.randn(2, H, T, 16, requires_grad=True) for _ in range(3))
    mgr.attention(1, q, k, v)
    loss = mgr.aux_loss()
    bias = mgr.memory().bias(1)
    alpha = float(mgr.alpha(1))
    logits = (q.double() @ k.double().transpose(-1, -2)) / 4.0 + alpha * R.dense_bias(
        bias.head, bias.q_idx, bias.k_idx, bias.value.double(), H, T, T)[:, :T, :T]
    logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(logits, -1)
    mass = R.trace_attention_mass(q.double(), k.double(), lse, bias, scale=0.25, alpha=alpha, causal=True) \
        if hasattr(R, "trace_attention_mass") else None
    if mass is None:
        from memtrace.reference.losses import trace_attention_mass
        mass = trace_attention_mass(q.double(), k.double(), lse, bias, scale=0.25, alpha=alpha, causal=True)
    torch.testing.assert_close(loss.double(), -0.5 * mass.mean(), rtol=1e-4, atol=1e-6)
    loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_aux_loss_balance_and_crystal_terms():
    cfg = short_config(phase_starts=(None, None, 0, 1), min_frequency=1, min_age=0, min_utility=-1.0,
                       max_entropy=10.0, motif_min_length=2, update_interval=1, balance_loss_weight=0.5,
                       crystal_loss_weight=0.25)
    mgr = mt.Memtrace(2, H, num_experts=3, config=cfg)
    logits = [torch.randn(4, 3, requires_grad=True) for _ in range(2)]
    probs = [lg.softmax(-1) for lg in logits]
    for layer in range(2):
        mgr.record_routing(layer, probs[layer].argmax(-1), probs=probs[layer])
    from memtrace.losses import crystal_stability_loss, load_balance_loss
    expect = 0.5 * load_balance_loss(probs, from_logits=False)
    torch.testing.assert_close(mgr.aux_loss(), expect)
    mgr.step(token_loss=-torch.arange(4.0))
    held = mgr.held_motifs()
    assert held
    probs = [lg.softmax(-1) for lg in logits]
    paths = torch.stack([p.argmax(-1) for p in probs], 1)
    for layer in range(2):
        mgr.record_routing(layer, paths[:, layer], probs=probs[layer])
    expect = 0.5 * load_balance_loss(probs, from_logits=False) + 0.25 * crystal_stability_loss(
        probs, held, min_utility=-1.0, paths=paths)
    got = mgr.aux_loss()
    torch.testing.assert_close(got, expect)
    got.backward()
    assert logits[0].grad is not None


def test_ewc_tracked_parameters():
    mgr, model = _fresh(ewc_weight=1.0, phase_starts=(0, 1, None, None))
    mgr.track_parameters(model)
    _train(mgr, model, 2, opt=torch.optim.SGD(model.parameters(), lr=0.1))
    assert mgr._ewc.count == 1 and mgr._ewc.anchor is not None     # Fisher at step 0, anchor at the phase change
    _train(mgr, model, 1, opt=torch.optim.SGD(model.parameters(), lr=0.1))
    loss = mgr.aux_loss()
    assert float(loss.detach()) > 0


def test_metrics_after_capture():
    mgr, model = _fresh()
    _train(mgr, model, 3)
    m = mgr.metrics()
    for key in ("step", "phase", "trace_coverage", "trace_stability", "salience_histogram", "trace_count",
                "bytes_used", "bytes_quota", "motif_count", "motif_mean_utility", "motif_mean_entropy",
                "flops_saved_per_token"):
        assert key in m, key
    assert m["step"] == 2 and m["phase"] == "trace_biased" and m["last_capture_step"] == 2
    assert 0.0 < m["trace_coverage"] <= 1.0 and 0.0 <= m["trace_stability"] <= 1.0
    assert m["bytes_quota"] == mgr.memory().nbytes
    assert sum(m["salience_histogram"]["counts"]) > 0


def test_no_host_sync_on_non_capture_step(monkeypatch):
    """A step that neither captures nor records routing: nothing in memtrace/training or
    memtrace/nn reads a device value (by structure: every such read is intercepted)."""
    mgr, model = _fresh()
    _train(mgr, model, 2)          # traces stored; step 2 ... make the next step a non-capture one
    _train(mgr, model, 1)
    assert not mgr.plan.capture and mgr.plan.bias
    here = (os.sep + os.path.join("memtrace", "training") + os.sep, os.sep + os.path.join("memtrace", "nn") + os.sep)
    calls = []

    def spy(name):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, **kw):
            import sys
            f = sys._getframe(1)
            if any(h in f.f_code.co_filename for h in here):
                calls.append((name, f.f_code.co_filename, f.f_lineno))
            return orig(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, wrapped)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        spy(name)
    x = batch(9)
    (token_losses(model, x).mean() + mgr.aux_loss()).backward()
    mgr.step()
    monkeypatch.undo()
    assert calls == []


@needs_mask
def test_key_padding_mask_path():
    mgr, model = _fresh()
    x = batch(0)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[0, :3] = False
    for _ in range(3):
        tl = token_losses_masked(model, x, mask)
        tl.mean().backward()
        mgr.step()
    assert mgr.memory().num_traces() > 0
    h, qi, kj, *_ = mgr.memory().traces(0)
    assert torch.isfinite(mgr.memory().strength).all()


def token_losses_masked(model, x, mask):
    import torch.nn.functional as F
    logits = model(x, key_padding_mask=mask)
    return F.cross_entropy(logits[:, :-1].reshape(-1, 11), x[:, 1:].reshape(-1), reduction="none")


def test_math_sanity():
    assert math.isclose(math.log(2.0), 0.6931471805599453)


def test_biases_are_built_once_per_memory_update(monkeypatch):
    """The layers' TraceBias objects are rebuilt (and their values checked) when the memory
    changes, on capture steps, and reused by the steps between: no per-step rebuild."""
    mgr, model = _fresh(update_interval=3)
    _train(mgr, model, 3)                       # steps 0 (capture), 1, 2 (bias from step 2)
    assert mgr.memory().num_traces() > 0
    built = []
    real = mt.TraceMemory.bias
    monkeypatch.setattr(mt.TraceMemory, "bias", lambda self, layer: built.append(layer) or real(self, layer))
    _train(mgr, model, 1)                       # step 3: capture, then the update rebuilds each layer's bias
    assert sorted(built) == [0, 1]
    used = [mgr._bias(layer) for layer in (0, 1)]
    _train(mgr, model, 2)                       # steps 4 and 5: biased, no capture, nothing rebuilt
    assert sorted(built) == [0, 1]
    assert [mgr._bias(layer) for layer in (0, 1)] == used


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the fused capture runs on the Triton path")
def test_later_capture_steps_use_the_last_cut_fused_or_not(memtrace_settings):
    """After a layer's first capture step its cut is kept (and saved); the next capture step
    takes it before the backward, so the Triton backward fills the fused bound: the memory is
    the same as with the fused bound forced off (the same cut, every tile rescored)."""
    runs = {}
    for fused in ("0", "1"):
        memtrace_settings(capture_fused=fused)
        mgr, model = _fresh(update_interval=2)
        assert mgr.state_dict()["capture_cuts"] == [None, None]
        _train(mgr, model, 1)                                    # step 0 captures: cuts decided then
        cuts = mgr.state_dict()["capture_cuts"]
        assert all(c is not None and c > 0 for c in cuts)
        _train(mgr, model, 2)                                    # step 2 captures with those cuts
        runs[fused] = mgr
    assert_same_memory(runs["0"], runs["1"], rtol=1e-5, atol=1e-7)
    assert runs["0"].state_dict()["capture_cuts"] == pytest.approx(runs["1"].state_dict()["capture_cuts"], rel=1e-5)


def test_capture_cuts_are_checked_on_load():
    mgr, _ = _fresh()
    sd = mgr.state_dict()
    for bad in ([1.0], [float("nan"), None], [0.0, None], ["x", None]):
        with pytest.raises(ValueError, match="capture_cuts"):
            mgr.load_state_dict({**sd, "capture_cuts": bad})
    mgr.load_state_dict({**sd, "capture_cuts": [2.5, None]})
    assert mgr.state_dict()["capture_cuts"] == [2.5, None]
