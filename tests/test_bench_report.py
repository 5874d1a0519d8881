"""benchmarks/report.py (no GPU needed): BENCHMARKS.md and README.md's block are built from the result
files only, and every number in their tables is one of the files' numbers (rounded, x100 for a
percentage, /1e6 or /1e9 for a rate)."""
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import report  # noqa: E402

NUMBER = re.compile(r"(?<![A-Za-z_\d.])[-+]?\d+(?:\.\d+)?")   # not inside a word such as bf16 or B4


def numbers_of(doc):
    """Every number in a JSON document (dates and version strings excluded)."""
    if isinstance(doc, bool):
        return []
    if isinstance(doc, (int, float)):
        return [float(doc)]
    if isinstance(doc, dict):
        return [x for v in doc.values() for x in numbers_of(v)]
    if isinstance(doc, (list, tuple)):
        return [x for v in doc for x in numbers_of(v)]
    return []


def table_numbers(text):
    """(token, value) of every number in the body rows of the markdown tables in `text`."""
    out = []
    for line in text.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = line.strip("|").split("|")
        if all(not NUMBER.search(c) for c in cells):
            continue
        for token in NUMBER.findall(line):
            out.append(token)
    return out


def from_inputs(token, values):
    digits = len(token.split(".")[1]) if "." in token else 0
    x = float(token)
    tol = 0.5 * 10 ** -digits + 1e-9
    return any(abs(f - x) <= tol for v in values for f in (v, v * 100, v / 1e6, v / 1e9))


def check_all_from(text, docs):
    values = [x for d in docs for x in numbers_of(d)]
    tokens = table_numbers(text)
    assert tokens, "no table numbers found"
    missing = [t for t in tokens if not from_inputs(t, values)]
    assert not missing, f"numbers not in the result files: {missing[:20]}"


# ---- on the committed latest/ files --------------------------------------------------------------

def test_committed_latest_builds_and_every_number_is_from_a_file():
    latest = report.load_latest()
    assert set(latest) == set(report.FAMILIES)
    docs = [doc for _, doc in latest.values()]
    md = report.build_benchmarks_md(latest)
    for family in ("Biased attention", "Salience capture", "Trace-memory update", "Routing trie",
                   "TraceBias index build"):
        assert f"## {family}" in md
    assert "docs/perf-log.md" in md
    check_all_from(md, docs)
    block = report.readme_block(latest)
    assert block.startswith(report.START) and block.endswith(report.END)
    check_all_from(block, docs)


def test_committed_files_are_up_to_date():
    latest = report.load_latest()
    assert (ROOT / "BENCHMARKS.md").read_text() == report.build_benchmarks_md(latest)
    readme = (ROOT / "README.md").read_text()
    assert report.replace_block(readme, report.readme_block(latest)) == readme


# ---- on a small synthetic file -------------------------------------------------------------------

SHAPE = {"B": 3, "Hq": 6, "Hkv": 6, "T": 512, "D": 96, "causal": False, "dtype": "bf16"}
ENV = {"device": "Test GPU", "torch": "9.9", "triton": "8.8", "cuda": "7.7", "memtrace": "0.0.1",
       "date": "2030-01-02T03:04:05"}


def synthetic_attention():
    rows = [dict(SHAPE, impl="memtrace[triton] no bias", fwd_ms=1.234, fwd_tflops=111.7, fwdbwd_ms=4.321,
                 fwdbwd_tflops=97.3, peak_mib=301.4),
            dict(SHAPE, impl="memtrace[triton]", traces=2048, pattern="random", fwd_ms=1.3, fwd_tflops=104.2,
                 fwdbwd_ms=4.6, fwdbwd_tflops=91.9, peak_mib=303.9),
            dict(SHAPE, impl="memtrace[auto]", traces=2048, pattern="random", auto_choice="cudnn", fwd_ms=1.1,
                 fwd_tflops=123.4, fwdbwd_ms=4.0, fwdbwd_tflops=105.6, peak_mib=222.2),
            dict(SHAPE, impl="sdpa_cudnn", fwd_ms=0.9, fwd_tflops=150.5, fwdbwd_ms=3.7, fwdbwd_tflops=117.3,
                 peak_mib=201.0),
            dict(SHAPE, impl="flex_dense_bias", traces=2048, pattern="random", fwd_ms=1.6, fwd_tflops=84.8,
                 fwdbwd_ms=6.0, fwdbwd_tflops=70.7, peak_mib=777.7),
            dict(SHAPE, impl="memtrace[flash_attn]", traces=2048, pattern="random", error="not importable"),
            dict(SHAPE, impl="overhead[triton]", traces=2048, pattern="random", fwd_overhead=0.0437,
                 fwd_overhead_range=[0.0123, 0.0789], fwdbwd_overhead=0.0911, fwdbwd_overhead_range=[0.05, 0.13]),
            dict(SHAPE, impl="overhead[auto]", traces=2048, pattern="random", fwd_overhead=0.0612,
                 fwd_overhead_range=[0.03, 0.07], fwdbwd_overhead=0.0833, fwdbwd_overhead_range=[0.06, 0.09],
                 fwd_vs_sdpa_cudnn=0.9123, fwdbwd_vs_sdpa_cudnn=0.8766)]
    import bench_attention
    bench_attention.add_ratios(rows)
    return {"benchmark": "attention", "env": ENV, "quick": False, "rows": rows}


def synthetic_routing():
    row = {"mode": "prefix", "num_experts": 8, "N": 7000, "L": 12, "max_depth": 12, "path_steps": 84000,
           "python_tokens": 100, "python_steps_per_s": 345678.0, "cpu_seconds": 0.01, "cpu_steps_per_s": 8.4e6,
           "cpu_vs_python": 24.3, "num_nodes": 999, "bytes_per_node": 30.0, "cuda_steps_per_s": 1.23e9,
           "cuda_vs_cpu": 146.4, "cuda_vs_python": 3558.2, "cuda_table_equals_cpu": True}
    return {"env": ENV, "results": [row]}


@pytest.fixture
def synthetic_dir(tmp_path):
    (tmp_path / "attention_test.json").write_text(json.dumps(synthetic_attention()))
    (tmp_path / "routing_test.json").write_text(json.dumps(synthetic_routing()))
    return tmp_path


def test_synthetic_numbers_all_come_from_the_input(synthetic_dir):
    latest = report.load_latest(synthetic_dir)
    docs = [doc for _, doc in latest.values()]
    md = report.build_benchmarks_md(latest)
    check_all_from(md, docs)
    assert "| memtrace[triton] | 2048 | 104 | 92 | 1.23× | 1.30× |" in md     # 104.2 / 84.8, 91.9 / 70.7
    assert "+4.4% (+1.2% .. +7.9%)" in md
    assert "Test GPU, torch 9.9, triton 8.8, CUDA 7.7, memtrace 0.0.1; measured 2030-01-02T03:04:05" in md
    assert "memtrace[flash_attn]: not importable" in md
    assert "| prefix | 8 | 7000 | 12 | 12 | 0.35 M | 8.40 M | 1.23 G |" in md
    block = report.readme_block(latest)
    check_all_from(block, docs)
    assert "0.912× / 0.877×" in block
    assert "+4.4% / +9.1%" not in block       # the headline needs the 16384 row too: none here


def test_a_changed_input_changes_the_output(synthetic_dir):
    before = report.build_benchmarks_md(report.load_latest(synthetic_dir))
    doc = synthetic_attention()
    doc["rows"][1]["fwd_tflops"] = 555.5
    (synthetic_dir / "attention_test.json").write_text(json.dumps(doc))
    after = report.build_benchmarks_md(report.load_latest(synthetic_dir))
    assert before != after and "| memtrace[triton] | 2048 | 556 |" in after


def test_replace_block():
    text = f"intro\n{report.START}\nold\n{report.END}\ntail\n"
    assert report.replace_block(text, f"{report.START}\nnew\n{report.END}") == \
        f"intro\n{report.START}\nnew\n{report.END}\ntail\n"
    assert report.replace_block("no block\n", "B").endswith("no block\n\nB\n")
