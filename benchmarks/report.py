"""Rebuild BENCHMARKS.md from benchmarks/results/latest/*.json, and README.md's benchmark block.

    python benchmarks/report.py             # writes BENCHMARKS.md
    python benchmarks/report.py --readme    # also rewrites README.md between <!-- bench:start --> and
                                            # <!-- bench:end --> (the headline numbers)
    python benchmarks/report.py --check     # writes nothing; exit 1 if either file is out of date

Every figure printed comes from a JSON file in latest/ (formatted: ms, TFLOP/s, ratios as held,
fractions as percentages, rates in M or G); nothing is computed here. A file is named
<family>_<device>.json (attention_h100.json); the families known below get their own section, any
other file is listed. The history (every session, decision and probe) is in docs/perf-log.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LATEST = ROOT / "benchmarks" / "results" / "latest"
FAMILIES = ("attention", "capture", "update", "routing", "bias", "cms", "stores")
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


# ---- loading ------------------------------------------------------------------------------------

def load_latest(directory=LATEST) -> dict:
    """{family: (file name, document)} for every <family>_<device>.json in `directory`."""
    out = {}
    for path in sorted(Path(directory).glob("*.json")):
        family = path.stem.split("_")[0]
        out[family] = (path.name, json.loads(path.read_text()))
    return out


def meta(doc: dict) -> dict:
    """device, versions and date of a result file, wherever its suite put them."""
    src = doc.get("env") or doc
    return {k: src.get(k) for k in ("device", "torch", "triton", "cuda", "memtrace", "date")}


def meta_line(m: dict) -> str:
    parts = [m.get("device") or "?", f"torch {m.get('torch')}", f"triton {m.get('triton')}"]
    if m.get("cuda"):
        parts.append(f"CUDA {m['cuda']}")
    if m.get("memtrace"):
        parts.append(f"memtrace {m['memtrace']}")
    return ", ".join(parts) + f"; measured {m.get('date')}"


# ---- formatting (the only transforms applied to a number: rounding, x100 for %, /1e6, /1e9) ------

def num(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def pct(x):
    return "-" if x is None else f"{x * 100:+.1f}%"


def times(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}×"


def rate(x):
    if x is None:
        return "-"
    return f"{x / 1e9:.2f} G" if x >= 1e9 else f"{x / 1e6:.2f} M"


def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


# ---- attention ----------------------------------------------------------------------------------

SHAPE_KEYS = ("B", "Hq", "Hkv", "T", "D", "causal")


def shape_label(B, Hq, Hkv, T, D, causal):
    heads = f"H{Hq}" if Hq == Hkv else f"H{Hq}/{Hkv}"
    return f"B{B} {heads} T{T} D{D} {'causal' if causal else 'non-causal'}"


def attention_groups(doc):
    """[(shape tuple, rows, meta)] in file order; meta from the part the shape came from."""
    parts = {tuple(s): p["env"] for p in doc.get("parts", []) for s in p["shapes"]}
    groups = {}
    for r in doc["rows"]:
        groups.setdefault(tuple(r[k] for k in SHAPE_KEYS), []).append(r)
    return [(key, rows, meta({"env": parts.get(key, doc.get("env", {}))})) for key, rows in groups.items()]


def _attention_row(r):
    ra = r.get("ratios", {})
    return [r["impl"] + (f" → {r['auto_choice']}" if r.get("auto_choice") else ""), r.get("traces") or "",
            num(r.get("fwd_tflops"), 0), num(r.get("fwdbwd_tflops"), 0),
            times(ra.get("fwd_vs_flex_dense_bias")), times(ra.get("fwdbwd_vs_flex_dense_bias")),
            times(ra.get("fwd_vs_sdpa_cudnn")), times(ra.get("fwdbwd_vs_sdpa_cudnn")), num(r.get("peak_mib"), 0)]


def section_attention(name, doc):
    out = ["## Biased attention", "",
           (f"`{name}`: `bench_attention.py`, one process per part. TFLOP/s count 4·B·Hq·T²·D for the "
           "forward and 3.5× that for forward+backward, halved when causal; medians of do_bench. "
           "Ratios are TFLOP/s over the peer's in the same process (Flex+bias: FlexAttention with a "
           "dense [H, T, T] bias score_mod; cuDNN: SDPA cuDNN without a bias). Peak: memory above "
           "the inputs, the bias included. Rows with random traces and without a bias are shown; "
           "clustered traces and every time in ms are in the JSON. Each shape's rows come from one process; "
           "when the parts were measured on different dates, the kernels may differ between them "
           "(docs/perf-log.md says what changed when)."), ""]
    for key, rows, m in attention_groups(doc):
        out += [f"### {shape_label(*key)}, {rows[0].get('dtype')}", "", meta_line(m), ""]
        shown = [r for r in rows if not r.get("error") and not r["impl"].startswith("overhead[")
                 and r.get("pattern") in (None, "random")]
        out += table(["impl", "traces/head", "fwd TFLOP/s", "fwd+bwd TFLOP/s", "fwd vs Flex+bias",
                      "f+b vs Flex+bias", "fwd vs cuDNN", "f+b vs cuDNN", "peak MiB"],
                     [_attention_row(r) for r in shown])
        inter = [r for r in rows if r["impl"].startswith("overhead[") and not r.get("error")]
        if inter:
            out += [("Overhead over bias=None of the same backend, the two timed back to back in 5 rounds "
                    "(median, range); and auto's speed against SDPA cuDNN without a bias, also back to back:"), ""]
            cells = []
            for r in inter:
                row = [r["impl"][len("overhead["):-1], r.get("traces")]
                for ph in ("fwd", "fwdbwd"):
                    lo, hi = r.get(f"{ph}_overhead_range", (None, None))
                    row.append(f"{pct(r.get(ph + '_overhead'))} ({pct(lo)} .. {pct(hi)})")
                row += [times(r.get("fwd_vs_sdpa_cudnn"), 3), times(r.get("fwdbwd_vs_sdpa_cudnn"), 3)]
                cells.append(row)
            out += table(["backend", "traces/head", "fwd overhead", "fwd+bwd overhead", "fwd vs cuDNN",
                          "f+b vs cuDNN"], cells)
        failed = {}
        for r in rows:
            if r.get("error"):
                failed.setdefault(r["error"].split(" (")[0][:120], set()).add(r["impl"])
        out += [f"Did not run: {', '.join(sorted(impls))}: {why}." for why, impls in failed.items()]
        out += [""] if failed else []
    return out


# ---- capture ------------------------------------------------------------------------------------

CAPTURE_ROWS = [("base_triton", "Triton fwd+bwd, no capture"), ("capture_triton_fused", "… with the fused capture"),
                ("capture_triton_unfused", "… with the unfused capture"), ("base_mt", "auto fwd+bwd, no capture"),
                ("capture_mt", "auto with capture"), ("base_sdpa", "SDPA flash fwd+bwd (peer)"),
                ("capture_sdpa", "SDPA flash + capture fill"), ("fill", "capture fill alone"),
                ("eager", "seeds' eager capture (peer)")]
CAPTURE_RATIOS = [("fused_capture_over_base_triton_paired", "fused capture / none, median of 7 interleaved pairs"),
                  ("fused_capture_over_base_triton", "fused capture / none, single runs"),
                  ("mem_fused_capture_over_base_triton", "peak memory, fused capture / none"),
                  ("unfused_capture_over_base_triton", "unfused capture / none"),
                  ("eager_over_capture_triton_fused", "eager capture / our whole capturing step"),
                  ("eager_over_fused_capture_extra", "eager capture / the capture's extra time")]


def section_capture(name, doc):
    res = doc.get("results", [])
    label = [f"B{r['shape']['B']}" for r in res]
    out = ["## Salience capture", "", f"`{name}`: `bench_capture.py`. " + meta_line(meta(doc)), "",
           "bf16, non-causal; " + ", ".join(f"B{r['shape']['B']} H{r['shape']['H']} T{r['shape']['T']} "
                                          f"D{r['shape']['D']}" for r in res)
           + "; the threshold keeps about `capacity` edges. Medians of do_bench; peak memory above the inputs.",
           ""]
    out += table(["step"] + [f"{b} ms" for b in label] + [f"{b} peak MiB" for b in label],
                 [[text] + [num(r["ms"].get(key), 3) for r in res] + [num(r["peak_mib"].get(key), 1) for r in res]
                  for key, text in CAPTURE_ROWS if any(key in r["ms"] for r in res)])
    targets = doc.get("targets", {})
    out += table(["ratio"] + label,
                 [[text] + [times(r["ratios"].get(key)) for r in res]
                  for key, text in CAPTURE_RATIOS if any(key in r["ratios"] for r in res)])
    if targets:
        out += ["Targets (issue 4): capture / none ≤ " + times(targets.get("capture_over_base")) + ", memory ≤ "
                + times(targets.get("mem_capture_over_base")) + ", eager / capture ≥ "
                + times(targets.get("eager_over_capture"), 0) + ".", ""]
    return out


# ---- trace-memory update ------------------------------------------------------------------------

UPDATE_ROWS = [("memtrace_batched", "memtrace, all layers in one call (eager)"),
               ("memtrace_graph", "the same call replayed in a CUDA graph"),
               ("memtrace_per_layer", "memtrace, one call per layer"),
               ("memtrace_torch", "memtrace's PyTorch path on the GPU"),
               ("peer_pytorch", "plain-PyTorch update (peer)")]


def section_update(name, doc):
    res, w = doc["results"], doc.get("workload", {})
    out = ["## Trace-memory update", "", f"`{name}`: `bench_update.py`. " + meta_line(meta(doc)), "",
           (f"{w.get('layers')} layers × {w.get('heads')} heads × quota {w.get('quota')} "
           f"({w.get('trace_slots')} slots), {w.get('candidates_total')} candidates in one update. GPU time from "
           "CUDA events around the call (launch gaps included), median; host: wall time with a final sync."), ""]
    ratios = doc.get("ratios", {})
    out += table(["update", "GPU ms", "min ms", "host ms", "peer / this"],
                 [[text, num(res[k]["ms"], 3), num(res[k].get("min_ms"), 3), num(res[k].get("host_ms"), 3),
                   times(ratios.get(f"peer_pytorch / {k}"), 1)] for k, text in UPDATE_ROWS if k in res])
    agree, target = doc.get("agree", {}), doc.get("target", {})
    out += [(f"Same kept set as the peer: {agree.get('same_kept_set')} ({agree.get('kept_memtrace')} traces); "
            f"graph replay equals the eager call: {doc.get('graph_matches_eager')}. Target "
            f"{num(target.get('issue4_ms'), 1)} ms: eager {'met' if target.get('met') else 'missed'}, in a graph "
            f"{'met' if target.get('met_in_graph') else 'missed'}."), ""]
    return out


# ---- routing trie -------------------------------------------------------------------------------

def section_routing(name, doc):
    rows = doc["results"]
    out = ["## Routing trie", "", f"`{name}`: `bench_routing.py`. " + meta_line(meta(doc)), "",
           ("Path-steps per second (one node visit of an insertion); prefix mode inserts whole paths, suffix "
           "mode every start layer up to max_depth. CPU: one thread. The seeds' Python trie runs on a slice "
           "of the tokens."), ""]
    out += table(["mode", "experts", "tokens", "layers", "max depth", "Python trie", "memtrace CPU", "memtrace CUDA",
                  "CPU / Python", "CUDA / CPU", "CUDA == CPU", "bytes/node"],
                 [[r["mode"], r["num_experts"], r["N"], r["L"], r["max_depth"], rate(r.get("python_steps_per_s")),
                   rate(r.get("cpu_steps_per_s")), rate(r.get("cuda_steps_per_s")), times(r.get("cpu_vs_python"), 1),
                   times(r.get("cuda_vs_cpu"), 1), r.get("cuda_table_equals_cpu", "-"),
                   num(r.get("bytes_per_node"), 1)] for r in rows])
    return out


# ---- TraceBias index ----------------------------------------------------------------------------

def section_bias(name, doc):
    rows = doc.get("rows", [])
    out = ["## TraceBias index build", "", f"`{name}`: `bench_bias.py`. " + meta_line(meta(doc)), "",
           ("Uniform random (i, j) per head; do_bench medians. The peer is the old torch-op build of the same "
           "index (bit-identical output)."), ""]
    out += table(["heads × entries/head", "T", "Triton build ms", "torch-op build ms", "speedup",
                  "from_coo ms", "kernels Triton / torch", "bytes/entry"],
                 [[f"{r['heads']} × {r['entries_per_head']}", r["T"], num(r["build_triton_ms"], 3),
                   num(r["build_torch_ms"], 3), times(r["speedup"], 1), num(r["from_coo_ms"], 3),
                   f"{r.get('gpu_kernels_triton')} / {r.get('gpu_kernels_torch')}", num(r["bytes_per_entry"], 1)]
                  for r in rows])
    if "target_ms" in doc:
        out += [(f"Target: under {num(doc['target_ms'], 1)} ms at the first size: "
                f"{'met' if doc.get('target_met') else 'missed'}."), ""]
    return out


def section_stores(name, doc):
    rows = doc.get("results", [])
    machine = doc.get("machine", {})
    out = ["## Stores: syncing and loading trace memories", "",
           (f"`{name}`: `bench_stores.py` on {doc.get('device', '?')} ({machine.get('cpus', '?')} cores, torch "
            f"{machine.get('torch', '?')}, lancedb {machine.get('lancedb', '?')}, qdrant-client "
            f"{machine.get('qdrant_client', '?')}). {doc.get('contention', '')}"), ""]
    out += table(["store", "traces", "full sync s", "traces/s", "load s", "bitwise equal", "GB on disk",
                  "incremental syncs (changed: s)"],
                 [[r["store"], r["traces"], num(r["full_sync_s"], 1), num(r["full_sync_traces_per_s"], 0),
                   num(r["load_s"], 1), "yes" if r.get("load_bitwise_equal") else "no",
                   num(r["bytes_on_disk_after_full"] / 1e9, 2),
                   "; ".join(f"{i['changed']}: {num(i['sync_s'], 1)}" for i in r.get("incremental", []))]
                  for r in rows])
    out += [f"- {note}" for note in doc.get("notes", [])] + [""]
    return out


def section_cms(name, doc):
    w = doc.get("workload", {})
    out = ["## CMS memory and StatefulRouter", "", f"`{name}`: `bench_cms.py`. " + meta_line(meta(doc)), "",
           (f"CMSMemory: B {w.get('B')}, T {w.get('T')}, levels (slots, dim, rate) {w.get('levels')}, d_model "
            f"{w.get('d_model')}, d_key {w.get('d_key')}; the byte bound is the scan's forward+backward bytes at "
            "the H100's HBM rate."), ""]
    out += table(["backend", "mode", "fwd ms", "fwd+bwd ms", "peak MiB", "scan GB/s", "bound ms", "over bound",
                  "speed-up over eager"],
                 [[r["backend"], r["mode"], num(r["fwd_ms"], 1), num(r["fwd_bwd_ms"], 1), num(r.get("peak_mib"), 0),
                   num(r.get("scan_gbs"), 1), num(r.get("bound_ms"), 1), times(r.get("over_bound"), 1),
                   times(r.get("speedup_over_eager_fwd_bwd"))] for r in doc.get("rows", [])])
    router = doc.get("router", [])
    if router:
        out += ["StatefulRouter as an MoE gate (fused route) against a linear top-k gate, forward:", ""]
        out += table(["experts", "k", "tokens", "d_model", "linear gate ms", "stateful ms", "stateful / linear",
                      "bound ms", "over bound"],
                     [[r["units"], r["k"], r["tokens"], r["d_model"], num(r["linear_gate_ms"], 4),
                       num(r["stateful_ms"], 4), times(r["ratio"]), num(r.get("route_bound_ms"), 4),
                       times(r.get("over_bound"), 1)] for r in router])
    return out


SECTIONS = {"attention": section_attention, "capture": section_capture, "update": section_update,
            "routing": section_routing, "bias": section_bias, "cms": section_cms,
            "stores": section_stores}


def build_benchmarks_md(latest: dict) -> str:
    out = ["# memtrace benchmarks", "",
           "<!-- Generated by `python benchmarks/report.py` from benchmarks/results/latest/*.json: do not edit. -->",
           "", ("Today's numbers: the newest complete run of each benchmark family, one file each in "
           "`benchmarks/results/latest/`. Every figure below is read from those files. What each benchmark "
           "measures and how to run it: [benchmarks/README.md](benchmarks/README.md). The history (every "
           "session, decision and probe, with its numbers) is in [docs/perf-log.md](docs/perf-log.md); older "
           "result files are in `benchmarks/results/archive/`."), ""]
    for family in FAMILIES:
        if family in latest:
            out += SECTIONS[family](*latest[family])
    others = [name for fam, (name, _) in latest.items() if fam not in SECTIONS]
    if others:
        out += ["## Other result files", ""] + [f"- `{n}`" for n in others] + [""]
    return "\n".join(out).rstrip() + "\n"


# ---- README block -------------------------------------------------------------------------------

def _find(rows, **want):
    return next((r for r in rows if all(r.get(k) == v for k, v in want.items()) and not r.get("error")), None)


def headline_rows(latest: dict) -> list:
    """[(what, memtrace, peer)] for README.md: the issue shapes' headline figures."""
    out = []
    if "attention" in latest:
        rows = latest["attention"][1]["rows"]
        first = next((r for r in rows if not r["causal"]), rows[0])   # the file's first shape: the issue's
        key = {k: first[k] for k in SHAPE_KEYS}
        label = shape_label(*key.values())
        tri = _find(rows, impl="memtrace[triton]", traces=2048, pattern="random", **key)
        auto = _find(rows, impl="memtrace[auto]", traces=2048, pattern="random", **key)
        flex = _find(rows, impl="flex_dense_bias", **key)
        cud = _find(rows, impl="sdpa_cudnn", **key)
        if tri and flex:
            ra = tri.get("ratios", {})
            out.append((f"attention `triton`, {first['dtype']} {label}, 2048 random traces/head: fwd / fwd+bwd TFLOP/s "
                        "(over FlexAttention + dense bias)",
                        (f"{num(tri['fwd_tflops'], 0)} / {num(tri['fwdbwd_tflops'], 0)} "
                        f"({times(ra.get('fwd_vs_flex_dense_bias'))} / {times(ra.get('fwdbwd_vs_flex_dense_bias'))})"),
                        f"FlexAttention + dense bias {num(flex['fwd_tflops'], 0)} / {num(flex['fwdbwd_tflops'], 0)}"))
        paired = _find(rows, impl="overhead[auto]", traces=2048, **key) or {}
        if auto and cud:
            out.append((("attention `auto` (cuDNN + sparse correction), same shape: fwd / fwd+bwd TFLOP/s "
                        "(speed against SDPA cuDNN without a bias, timed back to back)"),
                        (f"{num(auto['fwd_tflops'], 0)} / {num(auto['fwdbwd_tflops'], 0)} "
                        f"({times(paired.get('fwd_vs_sdpa_cudnn'), 3)} / "
                        f"{times(paired.get('fwdbwd_vs_sdpa_cudnn'), 3)})"),
                        f"SDPA cuDNN without bias {num(cud['fwd_tflops'], 0)} / {num(cud['fwdbwd_tflops'], 0)}"))
        over = [_find(rows, impl="overhead[triton]", traces=n, **key) for n in (2048, 16384)]
        if all(over):
            out.append((("attention `triton`, same shape: time over bias=None, fwd / fwd+bwd, 2048 and 16384 "
                        "traces/head (back to back, median of 5)"),
                        "; ".join(f"{pct(o.get('fwd_overhead'))} / {pct(o.get('fwdbwd_overhead'))}" for o in over),
                        ""))
    if "capture" in latest:
        res = latest["capture"][1]["results"]
        out.append(("salience capture: fwd+bwd with / without, " + " / ".join(f"B{r['shape']['B']}" for r in res)
                    + " H16 T4096 D128 (paired median); peak memory",
                    " / ".join(times(r["ratios"].get("fused_capture_over_base_triton_paired")) for r in res)
                    + "; memory " + " / ".join(times(r["ratios"].get("mem_fused_capture_over_base_triton"))
                                                for r in res),
                    "seeds' eager capture " + " / ".join(f"{num(r['ms'].get('eager'), 1)} ms" for r in res)))
    if "update" in latest:
        doc = latest["update"][1]
        res = doc["results"]
        w = doc.get("workload", {})
        graph = f", {num(res['memtrace_graph']['ms'], 3)} ms in a CUDA graph" if "memtrace_graph" in res else ""
        out.append(((f"trace-memory update, {w.get('layers')} layers × {w.get('heads')} heads × {w.get('quota')}, "
                    f"{w.get('candidates_total')} candidates"),
                    f"{num(res['memtrace_batched']['ms'], 3)} ms eager{graph}",
                    f"plain PyTorch {num(res['peer_pytorch']['ms'], 3)} ms"))
    if "routing" in latest:
        r = _find(latest["routing"][1]["results"], mode="prefix", num_experts=8)
        if r:
            out.append(((f"routing trie, {r['N']} tokens × {r['L']} layers, prefix, {r['num_experts']} experts: "
                        "path-steps/s"),
                        f"CUDA {rate(r.get('cuda_steps_per_s'))}, CPU {rate(r.get('cpu_steps_per_s'))}",
                        f"seeds' Python trie {rate(r.get('python_steps_per_s'))}"))
    return out


def readme_block(latest: dict) -> str:
    dates = sorted({str(meta(doc).get("date"))[:10] for _, doc in latest.values()})
    devices = sorted({str(meta(doc).get("device")) for _, doc in latest.values()})
    lines = [START,
             "<!-- Generated by `python benchmarks/report.py --readme` from benchmarks/results/latest/: "
             "do not edit. -->",
             "", (f"{', '.join(devices)}; runs of {', '.join(dates)}; medians, peers timed in the same process. "
             "All tables: [BENCHMARKS.md](BENCHMARKS.md)."), ""]
    lines += table(["what", "memtrace", "peer, same run"], headline_rows(latest))
    return "\n".join(lines).rstrip() + "\n" + END


def replace_block(text: str, block: str) -> str:
    """`text` with its START ... END block replaced by `block` (appended if it has none)."""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        return head + block + rest.split(END, 1)[1]
    return text.rstrip() + "\n\n" + block + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", action="store_true", help="also rewrite README.md's benchmark block")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is out of date")
    ap.add_argument("--latest", default=str(LATEST), help="the directory of result files")
    args = ap.parse_args(argv)
    latest = load_latest(args.latest)
    targets = {ROOT / "BENCHMARKS.md": build_benchmarks_md(latest)}
    readme = ROOT / "README.md"
    if args.readme or args.check:
        targets[readme] = replace_block(readme.read_text(), readme_block(latest))
    stale = []
    for path, text in targets.items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path.name)
        if not args.check:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if args.check and stale:
        print(f"out of date: {', '.join(stale)} (run python benchmarks/report.py --readme)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
