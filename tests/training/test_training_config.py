"""MemtraceConfig (SPEC 9): defaults, validation, dict round trips, the seeds' layout."""
import dataclasses
import json

import pytest

import memtrace as mt
from memtrace.training import MemtraceConfig

SPEC_DEFAULTS = dict(quota_per_head=2048, salience_threshold=0.05, retention_rate=0.95, decay_rate=0.98,
                     prune_eps=1e-4, attn_eps=1e-3, window=16, max_seq_len=4096, bias_strength=0.1,
                     update_interval=100, warmup_steps=1000, min_frequency=100, min_utility=0.05, max_entropy=1.0,
                     min_age=500, max_motifs=512, motif_min_length=3, motif_max_length=8, prune_interval=1000,
                     trace_loss_weight=0.005, crystal_loss_weight=0.002, balance_loss_weight=0.01, ewc_weight=0.0,
                     total_steps=None, phase_fractions=(0.2, 0.3, 0.7, 0.85), phase_starts=None)


def test_fields_and_defaults_are_specs():
    cfg = MemtraceConfig()
    assert cfg.to_dict() == SPEC_DEFAULTS
    assert list(cfg.to_dict()) == list(SPEC_DEFAULTS)


@pytest.mark.parametrize("cfg", [
    MemtraceConfig(),
    MemtraceConfig(total_steps=12345, phase_fractions=(0.0, None, 0.5, 1.0), warmup_steps=0),
    MemtraceConfig(phase_starts=(10, 10, None, 400), quota_per_head=1, retention_rate=0.0, decay_rate=1.0),
])
def test_round_trip(cfg):
    d = cfg.to_dict()
    assert MemtraceConfig.from_dict(d) == cfg
    via_json = MemtraceConfig.from_dict(json.loads(json.dumps(d)))
    assert via_json == cfg
    assert isinstance(via_json.phase_fractions, tuple)
    assert via_json.phase_starts is None or isinstance(via_json.phase_starts, tuple)


def test_normalises_types():
    import numpy as np
    cfg = MemtraceConfig(quota_per_head=np.int64(64), retention_rate=0, phase_fractions=[0, 0.5, 1, 1])
    assert type(cfg.quota_per_head) is int and type(cfg.retention_rate) is float
    assert cfg.phase_fractions == (0.0, 0.5, 1.0, 1.0) and all(type(f) is float for f in cfg.phase_fractions)
    json.dumps(cfg.to_dict())


def test_from_dict_unknown_and_type():
    with pytest.raises(ValueError, match="quota_per_hed"):
        MemtraceConfig.from_dict({"quota_per_hed": 3})
    with pytest.raises(TypeError, match="dict"):
        MemtraceConfig.from_dict([("quota_per_head", 3)])
    assert MemtraceConfig.from_dict({"window": 8}).window == 8


def test_frozen_and_replace_validates():
    cfg = MemtraceConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.window = 3
    assert dataclasses.replace(cfg, window=3).window == 3
    with pytest.raises(ValueError, match="window"):
        dataclasses.replace(cfg, window=33)


@pytest.mark.parametrize("field,value,exc", [
    ("quota_per_head", 0, ValueError), ("quota_per_head", (1 << 20) + 1, ValueError),
    ("quota_per_head", 2.0, TypeError), ("quota_per_head", True, TypeError),
    ("salience_threshold", -0.1, ValueError), ("salience_threshold", float("nan"), ValueError),
    ("retention_rate", 1.0, ValueError), ("retention_rate", -0.01, ValueError), ("retention_rate", "0.9", TypeError),
    ("decay_rate", 1.01, ValueError), ("prune_eps", -1e-9, ValueError), ("attn_eps", float("inf"), ValueError),
    ("window", 0, ValueError), ("window", 33, ValueError), ("max_seq_len", 0, ValueError),
    ("max_seq_len", 65536, ValueError), ("bias_strength", -0.1, ValueError), ("update_interval", 0, ValueError),
    ("warmup_steps", -1, ValueError), ("min_frequency", -1, ValueError), ("min_utility", None, TypeError),
    ("max_entropy", -0.5, ValueError), ("min_age", -1, ValueError), ("max_motifs", 0, ValueError),
    ("motif_min_length", 0, ValueError), ("motif_max_length", 256, ValueError), ("prune_interval", 0, ValueError),
    ("trace_loss_weight", -1.0, ValueError), ("crystal_loss_weight", -1e-3, ValueError),
    ("balance_loss_weight", float("inf"), ValueError), ("ewc_weight", -2.0, ValueError),
    ("total_steps", 0, ValueError), ("total_steps", 10.0, TypeError),
    ("phase_fractions", (0.2, 0.3, 0.7), ValueError), ("phase_fractions", (0.2, 0.3, 0.7, 1.5), ValueError),
    ("phase_fractions", (0.3, 0.2, 0.7, 0.8), ValueError), ("phase_fractions", (0.3, None, 0.2, 0.8), ValueError),
    ("phase_fractions", "0.2", TypeError), ("phase_fractions", None, TypeError),
    ("phase_starts", (0, 1, 2), ValueError), ("phase_starts", (5, 4, None, None), ValueError),
    ("phase_starts", (None, 10, 5, None), ValueError), ("phase_starts", (0, 1.5, 2, 3), TypeError),
    ("phase_starts", (-1, 1, 2, 3), ValueError),
])
def test_rejects(field, value, exc):
    with pytest.raises(exc, match=field):
        MemtraceConfig(**{field: value})


def test_motif_lengths_ordered():
    with pytest.raises(ValueError, match="motif_min_length"):
        MemtraceConfig(motif_min_length=5, motif_max_length=4)
    assert MemtraceConfig(motif_min_length=4, motif_max_length=4).motif_max_length == 4


def test_accepts_what_the_constructors_accept_and_they_accept_it():
    cfg = MemtraceConfig(quota_per_head=7, salience_threshold=0.0, retention_rate=0.0, decay_rate=1.0, prune_eps=0.0,
                         attn_eps=0.0, window=32, max_seq_len=65535, min_frequency=0, min_utility=-1.0, max_entropy=0.0,
                         min_age=0, max_motifs=1, motif_min_length=1, motif_max_length=255)
    mt.TraceMemory(2, 2, quota=cfg.quota_per_head, retention=cfg.retention_rate, decay=cfg.decay_rate,
                   threshold=cfg.salience_threshold, prune_eps=cfg.prune_eps, attn_eps=cfg.attn_eps,
                   window=cfg.window, max_seq_len=cfg.max_seq_len)
    tree = mt.RoutingTree(4, 3, max_depth=cfg.motif_max_length)
    tree.candidates(min_frequency=cfg.min_frequency, min_utility=cfg.min_utility, max_entropy=cfg.max_entropy,
                    min_length=cfg.motif_min_length, max_length=cfg.motif_max_length, min_age=cfg.min_age)
    mt.MotifRegistry(max_motifs=cfg.max_motifs)
    d = MemtraceConfig()
    mt.TraceMemory(1, 1, quota=d.quota_per_head, retention=d.retention_rate, decay=d.decay_rate,
                   threshold=d.salience_threshold, prune_eps=d.prune_eps, attn_eps=d.attn_eps, window=d.window,
                   max_seq_len=d.max_seq_len)


def test_quota_bound_is_memorys():
    from memtrace.memory import MAX_QUOTA
    MemtraceConfig(quota_per_head=MAX_QUOTA)
    with pytest.raises(ValueError):
        mt.TraceMemory(1, 1, quota=MAX_QUOTA + 1)
    with pytest.raises(ValueError):
        MemtraceConfig(quota_per_head=MAX_QUOTA + 1)


SEED = {  # seeds/semantic-crystallization-plan.md, "Hyperparameters"
    "persistent_traces": {"enabled": True, "sparsity": 0.001, "quota_per_head": 2048, "salience_threshold": 0.05,
                          "retention_rate": 0.95, "decay_rate": 0.98, "bias_strength": 0.1, "update_interval": 100,
                          "warmup_steps": 1000},
    "semantic_crystallization": {"enabled": True, "min_frequency": 100, "min_utility": 0.05, "max_entropy": 1.0,
                                 "min_age": 500, "max_motifs": 512, "motif_min_length": 3, "motif_max_length": 8,
                                 "prune_interval": 1000},
    "loss_weights": {"task": 1.0, "load_balance": 0.01, "trace_utilization": 0.005, "crystallization": 0.002},
}


def test_seed_layout_gives_the_defaults():
    assert MemtraceConfig.from_seed_dict(SEED) == MemtraceConfig()
    wrapped = {"memory": {"vector_store": {"backend": "qdrant"}, **SEED}}
    assert MemtraceConfig.from_seed_dict(wrapped) == MemtraceConfig()
    assert MemtraceConfig.from_seed_dict({}) == MemtraceConfig()


def test_seed_values_and_flat_keys():
    cfg = MemtraceConfig.from_seed_dict({
        "persistent_traces": {"quota_per_head": 4096, "bias_strength": 0.2, "update_interval": 50,
                              "persist_to_vector_store": True, "embedding_dim": 128},
        "semantic_crystallization": {"min_frequency": 50, "max_motifs": 1024, "motif_max_length": 12,
                                     "persist_motifs": False},
        "loss_weights": {"load_balance": 0.02, "ewc": 0.5},
        "total_steps": 1000})
    assert (cfg.quota_per_head, cfg.bias_strength, cfg.update_interval) == (4096, 0.2, 50)
    assert (cfg.min_frequency, cfg.max_motifs, cfg.motif_max_length) == (50, 1024, 12)
    assert (cfg.balance_loss_weight, cfg.ewc_weight, cfg.total_steps) == (0.02, 0.5, 1000)


def test_seed_enabled_switches_phases():
    cfg = MemtraceConfig.from_seed_dict({"persistent_traces": {"enabled": False}})
    assert cfg.phase_fractions == (None, None, 0.7, 0.85)
    cfg = MemtraceConfig.from_seed_dict({"semantic_crystallization": {"enabled": False},
                                         "phase_starts": [1, 2, 3, 4]})
    assert cfg.phase_fractions == (0.2, 0.3, None, None) and cfg.phase_starts == (1, 2, None, None)


@pytest.mark.parametrize("d,exc,match", [
    ({"persistent_traces": {"quota": 5}}, ValueError, "quota"),
    ({"semantic_crystallization": {"window": 5}}, ValueError, "window"),
    ({"loss_weights": {"trace": 0.1}}, ValueError, "trace"),
    ({"loss_weights": {"task": 2.0}}, ValueError, "task"),
    ({"traces": {}}, ValueError, "traces"),
    ({"persistent_traces": {"enabled": "yes"}}, TypeError, "enabled"),
    ({"persistent_traces": []}, TypeError, "persistent_traces"),
    ({"memory": {}, "total_steps": 3}, ValueError, "memory"),
    ({"persistent_traces": {"window": 4}, "window": 5}, ValueError, "twice"),
    ({"persistent_traces": {"decay_rate": 2.0}}, ValueError, "decay_rate"),
    ("x", TypeError, "dict"),
])
def test_seed_layout_rejects(d, exc, match):
    with pytest.raises(exc, match=match):
        MemtraceConfig.from_seed_dict(d)
