"""The curriculum (memtrace.training.schedule): phase starts, boundaries, cadences, switches."""
import pytest

from memtrace.training import MemtraceConfig, Phase, phase_at, phase_starts, plan_at

P = Phase


def cfg(**kw):
    return MemtraceConfig(**kw)


def test_starts_from_fractions():
    assert phase_starts(cfg(total_steps=10000)) == (2000, 3000, 7000, 8500)
    assert phase_starts(cfg(total_steps=100, phase_fractions=(0.29, 0.3, 0.57, 0.85))) == (29, 30, 57, 85)
    assert phase_starts(cfg(total_steps=7)) == (1, 2, 4, 5)              # floors
    assert phase_starts(cfg(total_steps=10, phase_fractions=(0.0, 0.5, 1.0, 1.0))) == (0, 5, None, None)


def test_phase_starts_win_and_past_end_is_off():
    c = cfg(total_steps=100, phase_starts=(5, 10, 99, 100))
    assert phase_starts(c) == (5, 10, 99, None)
    assert phase_starts(cfg(phase_starts=(5, 10, 10**9, None))) == (5, 10, 10**9, None)


def test_open_ended_all_on_from_zero():
    assert phase_starts(cfg()) == (0, 0, 0, 0)
    assert phase_starts(cfg(phase_fractions=(None, 0.3, None, 0.9))) == (None, 0, None, 0)
    c = cfg()
    assert all(phase_at(c, s) == P.CRYSTALLIZATION for s in (0, 1, 999, 10**7))
    assert [s for s in range(1401) if plan_at(c, s).capture] == [1000, 1100, 1200, 1300, 1400]


@pytest.mark.parametrize("start,phase", [(2000, P.TRACE_ACCUMULATION), (3000, P.TRACE_BIASED),
                                         (7000, P.CRYSTAL_DISCOVERY), (8500, P.CRYSTALLIZATION)])
def test_boundaries(start, phase):
    c = cfg(total_steps=10000)
    assert phase_at(c, start - 1) == Phase(phase - 1)
    assert phase_at(c, start) == phase
    assert phase_at(c, start + 1) == phase


def test_steps_past_the_end_keep_the_last_phase():
    c = cfg(total_steps=1000)
    assert phase_at(c, 999) == phase_at(c, 5000) == P.CRYSTALLIZATION
    assert phase_at(c, 0) == P.FOUNDATION


def test_same_start_later_phase_wins():
    c = cfg(phase_starts=(10, 10, 20, 20))
    assert phase_at(c, 9) == P.FOUNDATION and phase_at(c, 10) == P.TRACE_BIASED and phase_at(c, 20) == P.CRYSTALLIZATION


def test_capture_warmup_relative_to_accumulation_start():
    c = cfg(phase_starts=(100, 500, None, None), warmup_steps=30, update_interval=50)
    caps = [s for s in range(700) if plan_at(c, s).capture]
    assert caps == [130, 180, 230, 280, 330, 380, 430, 480, 530, 580, 630, 680]
    assert plan_at(c, 129).capture is False and plan_at(c, 131).capture is False
    assert all(plan_at(c, s).phase == P.TRACE_ACCUMULATION for s in caps if s < 500)


def test_warmup_longer_than_accumulation_moves_first_capture_later():
    c = cfg(phase_starts=(100, 150, None, None), warmup_steps=100, update_interval=10)
    first = next(s for s in range(1000) if plan_at(c, s).capture)
    assert first == 200 and plan_at(c, first).phase == P.TRACE_BIASED


def test_zero_warmup_and_interval_one():
    c = cfg(phase_starts=(3, None, None, None), warmup_steps=0, update_interval=1)
    assert [plan_at(c, s).capture for s in range(6)] == [False, False, False, True, True, True]


def test_bias_only_from_trace_biased():
    c = cfg(phase_starts=(100, 500, None, None), warmup_steps=0)
    assert not plan_at(c, 499).bias and plan_at(c, 500).bias and plan_at(c, 10**6).bias
    assert not any(plan_at(c, s).record_routing or plan_at(c, s).freeze_motifs for s in (0, 499, 500, 10**6))


def test_accumulation_off_trace_biased_still_captures():
    c = cfg(phase_starts=(None, 200, None, None), warmup_steps=10, update_interval=100)
    assert phase_at(c, 199) == P.FOUNDATION and phase_at(c, 200) == P.TRACE_BIASED
    assert [s for s in range(500) if plan_at(c, s).capture] == [210, 310, 410]


def test_traces_off_nothing_captured():
    c = cfg(phase_starts=(None, None, 100, 200), warmup_steps=0)
    assert not any(plan_at(c, s).capture or plan_at(c, s).bias for s in range(0, 1000, 7))
    assert plan_at(c, 100).record_routing and plan_at(c, 100).phase == P.CRYSTAL_DISCOVERY


def test_crystal_flags():
    c = cfg(phase_starts=(None, None, 1000, 3000), update_interval=100, prune_interval=700)
    p = plan_at(c, 999)
    assert not (p.record_routing or p.consider_motifs or p.revalidate)
    p = plan_at(c, 1000)
    assert p.record_routing and p.consider_motifs and not p.revalidate and not p.freeze_motifs
    assert plan_at(c, 1001).record_routing and not plan_at(c, 1001).consider_motifs
    assert plan_at(c, 1100).consider_motifs
    assert plan_at(c, 1700).revalidate and not plan_at(c, 1700).prune
    assert not plan_at(c, 1699).revalidate and not plan_at(c, 1701).revalidate
    assert not plan_at(c, 2999).freeze_motifs and plan_at(c, 3000).freeze_motifs
    assert plan_at(c, 3100).revalidate and plan_at(c, 3100).prune          # 1000 + 3 * 700
    assert plan_at(c, 3000).phase == P.CRYSTALLIZATION and not plan_at(c, 3000).prune


def test_discovery_off_crystallization_records_routing():
    c = cfg(phase_starts=(None, None, None, 50), prune_interval=25, update_interval=10)
    assert not plan_at(c, 49).record_routing
    p = plan_at(c, 50)
    assert p.record_routing and p.consider_motifs and p.freeze_motifs and not p.revalidate
    assert plan_at(c, 75).prune and plan_at(c, 75).revalidate


def test_everything_off_is_foundation():
    c = cfg(phase_fractions=(None, None, None, None))
    for s in (0, 1000, 10**6):
        p = plan_at(c, s)
        assert p.phase == P.FOUNDATION
        assert not any((p.capture, p.bias, p.record_routing, p.consider_motifs, p.freeze_motifs, p.revalidate, p.prune))


def test_deterministic_and_pure():
    c = cfg(total_steps=5000, warmup_steps=37, update_interval=13, prune_interval=111)
    a = [plan_at(c, s) for s in range(5000)]
    b = [plan_at(MemtraceConfig.from_dict(c.to_dict()), s) for s in range(5000)]
    assert a == b
    phases = [p.phase for p in a]
    assert phases == sorted(phases)                      # phases only advance


def test_tiny_total_steps():
    c = cfg(total_steps=1, warmup_steps=0)
    assert phase_starts(c) == (0, 0, 0, 0) and phase_at(c, 0) == P.CRYSTALLIZATION
    c = cfg(total_steps=3, warmup_steps=0)
    assert phase_starts(c) == (0, 0, 2, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="step"):
        phase_at(cfg(), -1)
    with pytest.raises(TypeError, match="step"):
        plan_at(cfg(), 1.5)
    with pytest.raises(TypeError, match="config"):
        plan_at({"total_steps": 3}, 0)
    with pytest.raises(TypeError, match="config"):
        phase_starts(None)


def test_phase_labels_and_order():
    assert [p.label for p in Phase] == ["foundation", "trace_accumulation", "trace_biased", "crystal_discovery",
                                        "crystallization"]
    assert P.FOUNDATION < P.TRACE_ACCUMULATION < P.TRACE_BIASED < P.CRYSTAL_DISCOVERY < P.CRYSTALLIZATION
