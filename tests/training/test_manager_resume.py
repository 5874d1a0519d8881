"""mt.Memtrace persistence (SPEC 9, issue 24 point 5): resume is bitwise, bad files change nothing."""
import pytest
import torch
from manager_helpers import H, TinyModel, batch, short_config, token_losses

import memtrace as mt

E = 3


def _config():
    return short_config(phase_starts=(0, 2, 3, 5), min_frequency=2, min_age=0, min_utility=-10.0, max_entropy=10.0,
                        motif_min_length=2, update_interval=2, prune_interval=3)


def _run(mgr, model, opt, steps):
    metrics = []
    for _ in range(steps):
        step = mgr.step_count
        x = batch(step)
        tl = token_losses(model, x)
        g = torch.Generator().manual_seed(step)
        for layer in range(2):
            mgr.record_routing(layer, torch.randint(0, E, (x.shape[0], x.shape[1] - 1), generator=g))
        (tl.mean() + mgr.aux_loss()).backward()
        opt.step()
        metrics.append(mgr.step(token_loss=tl.detach()))
        opt.zero_grad()
    return metrics


def _fresh():
    mgr = mt.Memtrace(2, H, num_experts=E, config=_config())
    model = TinyModel(mgr)
    return mgr, model, torch.optim.SGD(model.parameters(), lr=0.05)


def test_resume_is_bitwise(reference_attention, tmp_path):
    N = 4
    a, ma, oa = _fresh()
    ref = _run(a, ma, oa, 2 * N)

    b, mb, ob = _fresh()
    _run(b, mb, ob, N)
    b.save(tmp_path / "mgr.safetensors")
    torch.save({"model": mb.state_dict(), "opt": ob.state_dict()}, tmp_path / "model.pt")

    c = mt.Memtrace.load(tmp_path / "mgr.safetensors")
    mc = TinyModel(c)
    oc = torch.optim.SGD(mc.parameters(), lr=0.05)
    saved = torch.load(tmp_path / "model.pt")
    mc.load_state_dict(saved["model"])
    oc.load_state_dict(saved["opt"])
    assert c.step_count == N and c.metrics() == b.metrics()
    rest = _run(c, mc, oc, N)

    assert a.memory().num_traces() > 0 and len(a.registry) > 0 and a.tree.num_tokens > 0
    assert torch.equal(a.memory().strength, c.memory().strength)
    assert torch.equal(a.memory().meta, c.memory().meta)
    ta, tc = a.tree.to_table(), c.tree.to_table()
    assert ta.keys() == tc.keys() and all(torch.equal(ta[k], tc[k]) for k in ta)
    assert a.registry.state_dict() == c.registry.state_dict()
    assert ref[N:] == rest
    assert torch.equal(a.alpha(0), c.alpha(0))


def test_state_dict_round_trip_in_memory():
    a, ma, oa = _fresh()
    _run(a, ma, oa, 3)
    b = mt.Memtrace(2, H, num_experts=E, config=short_config())
    b.load_state_dict(a.state_dict())
    assert b.config == a.config and b.step_count == 3 and b.phase == a.phase
    assert torch.equal(b.memory().strength, a.memory().strength)


def test_load_for_another_shape_changes_nothing(tmp_path):
    a, ma, oa = _fresh()
    _run(a, ma, oa, 3)
    path = tmp_path / "a.safetensors"
    a.save(path)
    for other in (mt.Memtrace(3, H, num_experts=E, config=_config()),
                  mt.Memtrace(2, H + 1, num_experts=E, config=_config()),
                  mt.Memtrace(2, H, num_experts=E + 1, config=_config()),
                  mt.Memtrace(2, H, config=_config())):
        before = (other.memory().strength.clone(), other.step_count, other.config)
        with pytest.raises(ValueError):
            other.load_file(path)
        assert torch.equal(other.memory().strength, before[0]) and other.step_count == 0
        assert other.config == before[2]
    # same shape, a different memory structure (quota): refused, nothing half-loaded
    other = mt.Memtrace(2, H, num_experts=E, config=_config())
    sd = a.state_dict()
    sd["config"] = dict(sd["config"], quota_per_head=5)
    with pytest.raises(ValueError):
        other.load_state_dict(sd)
    assert other.config == _config() and other.step_count == 0 and other.tree.num_tokens == 0


def test_bad_files(tmp_path):
    a, ma, oa = _fresh()
    _run(a, ma, oa, 2)
    path = tmp_path / "a.safetensors"
    a.save(path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        mt.Memtrace.load(tmp_path / "cut.safetensors")
    a.memory().save(tmp_path / "mem.safetensors")
    with pytest.raises(ValueError, match="not a Memtrace"):
        mt.Memtrace.load(tmp_path / "mem.safetensors")
