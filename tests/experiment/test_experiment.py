"""memtrace.experiment (issue 29): tasks, paired seeds, every arm's JSON, the report, bad input.
Tiny CPU runs: a 2-layer d 32 model, T 32, a few steps per arm (the pipeline, not the science)."""
import json
import os
from dataclasses import replace

import pytest
import torch

pytest.importorskip("transformers")

from memtrace import cli  # noqa: E402
from memtrace.experiment import ARMS, TASKS  # noqa: E402
from memtrace.experiment.models import ModelSpec, build_model  # noqa: E402
from memtrace.experiment.plan import plan_configs  # noqa: E402
from memtrace.experiment.report import build_report  # noqa: E402
from memtrace.experiment.runner import RunConfig, run_name, run_one  # noqa: E402
from memtrace.experiment.tasks import TaskSpec, answer_from_edges, make_batch, useful_edge_set  # noqa: E402


@pytest.fixture(autouse=True)
def _fast_cpu_path(memtrace_settings):
    """The reference attention and the torch trace update: CI runs under TRITON_INTERPRET=1, where
    the Triton path on CPU is the interpreter (minutes for these runs); the pipeline is the subject."""
    memtrace_settings(backend="reference", update_backend="torch")


TINY = dict(kind="moe", layers=2, d_model=32, heads=2, ffn=64, num_experts=4, top_k=2)


def tiny_run(tmp_path, arm, task="fixed_copy", seed=0, steps=2, **kw):
    cfg = RunConfig(task=task, arm=arm, seed=seed, steps=steps, batch_size=4, seq_len=32, vocab_size=32,
                    model=dict(TINY), eval_interval=1, eval_batches=1, out=str(tmp_path), pilot=True,
                    requested={"arms": [arm], "seeds": [seed]}, **kw)
    return cfg, run_one(cfg)


@pytest.mark.parametrize("task", TASKS)
def test_tasks_are_deterministic_and_the_useful_edges_solve_them(task):
    spec = TaskSpec(task, vocab_size=32, seq_len=32, batch_size=6)
    a = make_batch(spec, torch.Generator().manual_seed(3))
    b = make_batch(spec, torch.Generator().manual_seed(3))
    c = make_batch(spec, torch.Generator().manual_seed(4))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels) and torch.equal(a.edges, b.edges)
    assert not torch.equal(a.input_ids, c.input_ids)
    scored = a.labels != -100
    assert scored.any() and not scored[:, 0].any()
    # labels are the input tokens where scored
    assert torch.equal(a.labels[scored], a.input_ids[scored])
    # attending exactly on the useful edges and copying the key's token gives every label, and
    # every scored position has exactly one useful edge
    answer = answer_from_edges(a)
    assert torch.equal(answer != -100, scored)
    assert torch.equal(answer[scored], a.labels[scored])
    live = a.edges[..., 0] >= 0
    assert bool((a.edges[..., 1][live] <= a.edges[..., 0][live]).all())       # causal: key <= query


def test_fixed_layout_edges_are_fixed_and_the_gap_control_moves_the_offset():
    fixed = useful_edge_set(TaskSpec("fixed_copy", vocab_size=32, seq_len=32), seed=0, examples=64)
    assert set(fixed.values()) == {1.0}
    n = (32 - 1) // 2
    assert set(fixed) == {(n + j, j) for j in range(n)}                        # key = query - n
    gap = TaskSpec("fixed_copy_gap", vocab_size=32, seq_len=32, batch_size=64)
    batch = make_batch(gap, torch.Generator().manual_seed(0))
    offsets = {int(q - k) for row in batch.edges for q, k in row.tolist() if q >= 0}
    assert len(offsets) > 1
    per_example = [{int(q - k) for q, k in row.tolist() if q >= 0} for row in batch.edges]
    assert all(len(o) == 1 for o in per_example)                              # one offset per example


def test_paired_seeds_share_initial_weights_and_batches():
    spec = ModelSpec(**TINY, vocab_size=32, max_len=32)
    m1, m2, m3 = build_model(spec, 5), build_model(spec, 5), build_model(spec, 6)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)
    dense = build_model(ModelSpec(**dict(TINY, kind="dense"), vocab_size=32, max_len=32), 5)
    assert "lm.model.layers.0.mlp.gate_proj.weight" in dense.state_dict()


def test_every_arm_writes_a_complete_json_and_pairs_its_data(tmp_path):
    curves = {}
    for arm in ARMS:
        cfg, path = tiny_run(tmp_path, arm)
        assert os.path.basename(path) == f"fixed_copy__moe-rope-T32__{arm}__s0.json"
        with open(path) as f:
            r = json.load(f)
        assert r["arm"] == arm and r["pilot"] is True and r["note"].startswith("PILOT")
        assert [p["step"] for p in r["curves"]] == [0, 1, 2]
        s = r["summary"]
        for key in ("final_acc", "final_loss", "steps_to_90", "steps_to_99", "wall_time_per_step", "flops_per_token",
                    "model_flops_per_token", "peak_memory_bytes"):
            assert key in s
        assert s["model_flops_per_token"] > 0 and s["wall_time_per_step"] > 0
        env = r["environment"]
        assert env["device"] == "cpu" and env["torch"] and env["transformers"] and env["date"]
        curves[arm] = r["curves"][0]["loss"]
        if arm in ("traces", "both"):
            assert s["trace_count"] > 0 and s["useful_share"] is not None and s["useful_chance"] > 0
        if arm in ("crystallization", "both", "distilled"):
            assert r["config"]["memtrace"]["phase_starts"][2] is not None and s["motif_count"] is not None
        assert (r["config"]["distill"] is not None) == (arm == "distilled")
        if arm in ("oracle", "random"):
            ref = r["config"]["reference_bias"]
            assert ref["entries_per_head"] == 15 and ref["useful_share"] == (1.0 if arm == "oracle" else 0.0)
    # same init and held-out data: the step-0 evaluation is the same for every arm (memtrace with no
    # traces computes what sdpa computes, to float32 rounding)
    assert max(curves.values()) - min(curves.values()) < 1e-4
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def test_distilled_arm_pilot_through_the_runner(tmp_path):
    """The distilled arm of the tiny plan (its model) through the runner: motifs held, distilled after
    distill_steps, their later layers skipped and counted in the FLOPs. Loose discovery thresholds,
    so that a random tiny model holds motifs within 10 steps (the pipeline, not the science)."""
    cfg = next(c for c in plan_configs("tiny", out=str(tmp_path)) if c.arm == "distilled")
    loose = {"min_frequency": 1, "min_utility": -1000.0, "max_entropy": 100.0, "distill_fraction": 0.2}
    cfg = replace(cfg, steps=10, eval_interval=5, overrides=loose)
    with open(run_one(cfg)) as f:
        r = json.load(f)
    assert r["config"]["distill"] == {"distill_steps": 2, "distill_lr": 1e-3}
    moe, s = r["moe"], r["summary"]
    assert moe["mode"] == "distill" and moe["motifs_distilled"] >= 1
    assert moe["tokens_skipped"] > 0 and moe["tokens_distilled"] > 0
    assert s["motifs_distilled"] >= 1 and "motifs_distilling" in r["curves"][-1]
    assert 0 < s["flops_saving_share"] < 1 and s["flops_per_token"] < s["model_flops_per_token"]
    text = build_report(str(tmp_path))
    assert "| distilled | 1 |" in text and "distilled)" in text
    assert "held chains distilled into one expert" in text


def test_report_builds_tables_and_names_missing_runs(tmp_path):
    tiny_run(tmp_path, "baseline", seed=0, steps=2)
    cfg, _ = tiny_run(tmp_path, "traces", seed=0, steps=2)
    # a table (non-pilot) run that asked for two seeds, of which one exists
    table = RunConfig(**{**cfg.__dict__, "arm": "baseline", "pilot": False, "tag": "t",
                         "requested": {"arms": ["baseline"], "seeds": [0, 1]}})
    run_one(table)
    (tmp_path / "broken.json").write_text("{not json")
    text = build_report(str(tmp_path), fig_dir=str(tmp_path / "figs"))
    assert "## Pilot runs (CPU, tiny, not the table)" in text and "| traces | 1 |" in text
    assert "fixed_copy__moe-rope-T32__baseline__t__s1 (requested by" in text
    assert "copy__moe-rope-T256__both__s4 (gpu25 plan)" in text
    assert "broken.json" in text
    assert "not measured" in text
    assert any(n.endswith(".png") for n in os.listdir(tmp_path / "figs"))


def test_cli_report_and_plan(tmp_path, capsys):
    tiny_run(tmp_path, "baseline")
    md = tmp_path / "EXPERIMENTS.md"
    assert cli.main(["experiment", "--report", "--out", str(tmp_path), "--markdown", str(md)]) == 0
    assert md.read_text().startswith("# EXPERIMENTS")
    assert cli.main(["experiment", "--plan", "gpu25", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "call 3" in out and "total" in out
    gpu = plan_configs("gpu25")
    assert len({run_name(c) for c in gpu}) == len(gpu)            # no two runs share a file
    assert {c.arm for c in gpu} == set(ARMS)


def test_cli_runs_a_tiny_experiment(tmp_path, capsys):
    argv = ["experiment", "--task", "copy", "--arms", "baseline,crystallization", "--seeds", "1", "--steps", "2",
            "--device", "cpu", "--seq-len", "32", "--batch", "2", "--vocab", "32", "--layers", "2", "--d-model", "32",
            "--heads", "2", "--ffn", "64", "--experts", "4", "--eval-batches", "1", "--lr", "1e-3",
            "--set", "bias_strength=1.0", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    names = sorted(os.listdir(tmp_path))
    assert names == ["copy__moe-rope-T32__baseline__s0.json", "copy__moe-rope-T32__crystallization__s0.json"]


@pytest.mark.parametrize("argv,word", [
    (["--task", "nope"], "--task"),
    (["--task", "copy", "--arms", "baseline,nope"], "--arms"),
    (["--task", "copy", "--steps", "0"], "--steps"),
    (["--task", "copy", "--seeds", "0"], "--seeds"),
    (["--task", "copy", "--seeds", "x"], "--seeds"),
    (["--task", "copy", "--lr", "-1"], "--lr"),
    (["--task", "copy", "--model", "dense", "--arms", "both"], "--arms"),
    (["--task", "copy", "--model", "dense", "--arms", "distilled"], "--arms"),
    (["--task", "copy", "--arms", "distilled", "--set", "distill_fraction=0", "--device", "cpu"], "distill_fraction"),
    (["--task", "copy", "--arms", "distilled", "--set", "distill_lr=-1", "--device", "cpu"], "distill_lr"),
    (["--task", "copy", "--set", "no_such_knob=1", "--device", "cpu"], "no_such_knob"),
    (["--arms", "baseline", "--device", "cpu"], "--task"),
])
def test_bad_input_is_an_argparse_error(argv, word, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["experiment", *argv])
    assert exc.value.code == 2
    assert word in capsys.readouterr().err


def test_crystallization_arms_admit_motifs_up_to_one_uniform_expert_choice():
    """With num_experts, the path-entropy limit is ln(num_experts) (the config's 1.0 admitted no
    motif in a pilot); an explicit max_entropy override wins; without num_experts the config's."""
    import math

    from memtrace.experiment.arms import arm_config
    cfg, _ = arm_config("crystallization", 100, num_layers=4, seq_len=32, num_experts=8)
    assert math.isclose(cfg.max_entropy, math.log(8))
    cfg, _ = arm_config("both", 100, num_layers=4, seq_len=32, num_experts=8, overrides={"max_entropy": 1.0})
    assert cfg.max_entropy == 1.0
    cfg, _ = arm_config("crystallization", 100, num_layers=4, seq_len=32)
    assert cfg.max_entropy == 1.0
