"""memtrace.experiment.router_ablation (issue 26 point 4): the locality stream, Precision@k, the
semantic arm as a linear top-k gate, where the state comes from, weights chosen on validation,
the JSON (atomic), the CLI flag and the report section. Tiny sizes: seconds on CPU."""
import json
import os

import pytest
import torch

from memtrace import cli
from memtrace.experiment import router_ablation as RA
from memtrace.experiment.report import build_report, load_runs

TASK = RA.LocalityTask()


def test_the_stream_is_deterministic_per_seed_and_split():
    a = RA.make_stream(TASK, 200, seed=3)
    b = RA.make_stream(TASK, 200, seed=3)
    for name in ("units", "queries", "targets"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    other = RA.make_stream(TASK, 200, seed=4)
    validation = RA.make_stream(TASK, 200, seed=3, split="validation")
    assert not torch.equal(a.targets, other.targets) and not torch.equal(a.units, validation.units)
    assert a.queries.shape == (200, TASK.dim) and a.targets.dtype == torch.int64
    assert torch.allclose(a.queries.norm(dim=1), torch.ones(200))
    assert torch.allclose(a.units.norm(dim=1), torch.ones(64))
    # the query is a view of its target: closer to it than to the average unit
    cos = a.queries @ a.units.T
    assert float(cos.gather(1, a.targets[:, None]).mean()) > float(cos.mean()) + 0.2


def _repeat_rate(targets, window=6):
    return sum(int(targets[s] in targets[max(0, s - window):s]) for s in range(1, len(targets))) / (len(targets) - 1)


def test_the_stream_has_temporal_locality():
    local = RA.make_stream(TASK, 2000, seed=0).targets.tolist()
    flat = RA.make_stream(RA.LocalityTask(locality=0.0), 2000, seed=0).targets.tolist()
    # a drawn target sits among the last 6 far more often with a working set than from popularity alone
    assert _repeat_rate(local) > _repeat_rate(flat) + 0.2


def test_precision_at_k_on_a_hand_computed_case():
    selections = torch.tensor([[0, 1, 2], [3, 4, 5], [1, 2, 3], [7, 8, 9]])
    targets = torch.tensor([2, 0, 3, 9])
    assert RA.precision_at_k(selections, targets) == 0.75            # hit, miss, hit, hit
    assert RA.precision_at_k(selections[:, :1], targets) == 0.0
    with pytest.raises(ValueError, match="targets"):
        RA.precision_at_k(selections, targets[:3])
    with pytest.raises(TypeError, match="selections"):
        RA.precision_at_k(selections.float(), targets)


@pytest.mark.parametrize("state_from", RA.STATE_SOURCES)
def test_semantic_only_is_the_linear_top_k_gate(state_from):
    stream = RA.make_stream(TASK, 300, seed=1)
    gate = torch.nn.Linear(TASK.dim, TASK.num_units, bias=False)
    with torch.no_grad():
        gate.weight.copy_(stream.units)
        expected = torch.topk(gate(stream.queries), TASK.k, dim=-1).indices
    got = RA.route_stream(stream, TASK.k, RA.RouterWeights(), state_from)
    assert torch.equal(got.sort(dim=1).values, expected.sort(dim=1).values)


def test_the_state_source_decides_what_recency_remembers():
    stream = RA.make_stream(TASK, 300, seed=2)
    # recency 0.9 with a fast decay outweighs the similarity (alpha 0.1, |cos| <= 1): the unit
    # recorded last step always wins
    w = RA.RouterWeights(beta=0.9, decay=0.5)
    from_targets = RA.route_stream(stream, TASK.k, w, "targets")
    assert torch.equal(from_targets[1:, 0], stream.targets[:-1])
    # from its own picks the router repeats its first selection for ever (the lock-in)
    from_picks = RA.route_stream(stream, TASK.k, w, "selections").sort(dim=1).values
    assert torch.equal(from_picks, from_picks[:1].expand_as(from_picks))
    with pytest.raises(ValueError, match="state_from"):
        RA.route_stream(stream, TASK.k, w, "oracle")


def test_usage_from_targets_counts_the_targets_only():
    stream = RA.make_stream(TASK, 300, seed=5)
    # gamma 0.999: one more use (log1p step >= log(301/300)) outweighs any similarity gap (alpha 0.001 x 2)
    picks = RA.route_stream(stream, TASK.k, RA.RouterWeights(gamma=0.999), "targets")
    counts = torch.zeros(TASK.num_units, dtype=torch.int64)
    for s in range(300):
        assert counts[picks[s, 0]] == counts.max()
        counts[stream.targets[s]] += 1


def test_the_weight_grids_hold_the_seed_weights():
    for arm, w in RA.SEED_WEIGHTS.items():
        assert w in RA.weight_grid(arm)
    assert RA.weight_grid("semantic") == [RA.RouterWeights()]
    assert all(w.beta == 0 for w in RA.weight_grid("frequency"))
    assert all(w.gamma == 0 for w in RA.weight_grid("recency"))
    assert RA.RouterWeights(beta=0.2, gamma=0.1).as_dict() == {"alpha": 0.7, "beta": 0.2, "gamma": 0.1, "decay": 0.1}
    with pytest.raises(ValueError, match="arm"):
        RA.weight_grid("usage")


def test_result_chooses_on_validation_and_is_written_atomically(tmp_path, monkeypatch):
    path, r = RA.write_router_ablation(str(tmp_path), seeds=2, steps=30)
    assert path == str(tmp_path / "router_ablation.json")
    with open(path) as f:
        stored = json.load(f)
    assert {"experiment", "pilot", "claim", "task", "arms", "seeds", "steps", "validation_steps", "metric",
            "selection_rule", "state_sources", "results", "environment", "wall_seconds"} <= set(stored)
    assert stored["pilot"] is True and stored["seeds"] == [0, 1] and stored["arms"] == list(RA.ARMS)
    assert {"torch", "date", "device"} <= set(stored["environment"])
    assert set(stored["results"]) == set(RA.STATE_SOURCES)
    for entry in stored["results"].values():
        assert set(entry["arms"]) == set(RA.ARMS) and set(entry["seed_weights"]) == set(RA.SEED_WEIGHTS)
        for arm, chosen in entry["arms"].items():
            grid = entry["grid"][arm]
            assert len(grid) == len(RA.weight_grid(arm))
            best = max(row["validation_mean"] for row in grid)
            first_best = next(row for row in grid if row["validation_mean"] == best)
            assert chosen["weights"] == first_best["weights"] and chosen["validation_mean"] == best
            assert len(chosen["test_per_seed"]) == 2
            assert chosen["mean"] == pytest.approx(sum(chosen["test_per_seed"]) / 2)
    assert stored["results"]["selections"]["arms"]["semantic"]["gain_over_semantic"] == {"mean": 0.0, "std": 0.0}
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]

    # a write that fails half-way leaves the previous file and no temporary behind
    def broken_fsync(fd):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        RA.write_router_ablation(str(tmp_path), seeds=1, steps=5)
    with open(path) as f:
        assert json.load(f) == stored
    assert os.listdir(tmp_path) == ["router_ablation.json"]


@pytest.mark.parametrize("kwargs,word,exc", [
    (dict(seeds=0), "seeds", ValueError),
    (dict(steps=0), "steps", ValueError),
    (dict(seeds=1.5), "seeds", TypeError),
    (dict(task="big"), "task", TypeError),
    (dict(state_sources=("picks",)), "state_sources", ValueError),
])
def test_bad_arguments_name_themselves(kwargs, word, exc):
    with pytest.raises(exc, match=word):
        RA.run_router_ablation(**kwargs)


def test_bad_task_settings_name_themselves():
    with pytest.raises(ValueError, match="working_set"):
        RA.LocalityTask(working_set=64)
    with pytest.raises(ValueError, match="locality"):
        RA.LocalityTask(locality=1.5)
    with pytest.raises(ValueError, match="split"):
        RA.make_stream(TASK, 10, seed=0, split="train")


def test_cli_flag_writes_the_json_and_the_report_shows_it(tmp_path, capsys):
    md = tmp_path / "EXPERIMENTS.md"
    assert cli.main(["experiment", "--report", "--out", str(tmp_path), "--markdown", str(md)]) == 0
    assert "Missing: no router_ablation.json" in md.read_text()
    assert cli.main(["experiment", "--router-ablation", "--seeds", "1", "--steps", "20", "--out", str(tmp_path)]) == 0
    assert "state from targets: precision@3 semantic" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["EXPERIMENTS.md", "router_ablation.json"]
    runs, sweeps, bad = load_runs(str(tmp_path))
    assert (runs, sweeps, bad) == ([], [], [])                 # not a run file, not an unreadable one
    text = build_report(str(tmp_path))
    section = text.split("## Stateful router (seed: 0.82 -> 0.94)", 1)[1].split("## Missing runs", 1)[0]
    assert "PILOT" in section and "| semantic | " in section and "| full (seed's weights) | " in section
    assert "State from selections" in section and "State from targets" in section
    assert section.index("| semantic |") < section.index("| recency |") < section.index("| full |")


@pytest.mark.parametrize("argv,word", [
    (["--seeds", "0"], "--seeds"),
    (["--seeds", "x"], "--seeds"),
    (["--steps", "0"], "--steps"),
    (["--task", "copy"], "--task"),
    (["--report"], "--report"),
    (["--device", "cuda"], "--device"),
])
def test_cli_bad_input_is_an_argparse_error(argv, word, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["experiment", "--router-ablation", *argv])
    assert exc.value.code == 2
    assert word in capsys.readouterr().err
