"""Compile every Triton kernel of kernels/ for an H100 (sm_90) on the CPU, through ptxas.

The interpreter (TRITON_INTERPRET=1) never runs Triton's compiler frontend, so a kernel can pass
every CPU parity test and still fail to compile on the GPU (e.g. a variable whose block shape
differs between the two branches of an `if`). This test runs the real launchers (flash_fwd,
flash_bwd, correct_fwd, ..., build_index, trace_update_slabs, the salience capture) with CPU
tensors in a separate Python process WITHOUT TRITON_INTERPRET, where each kernel launch is
replaced by `triton.compile(..., target=GPUTarget("cuda", 90, 32))`: the launchers' own
arguments and constexprs go through the binder a GPU launch uses (dtypes, divisibility-by-16
attributes), the kernel goes source -> TTIR -> TTGIR -> LLVM IR -> PTX -> cubin (Triton's
bundled ptxas), and nothing runs. Autotuned kernels compile the
first config left after their pruning (what settings attn_tune=False launches), not every config.
Shared memory is checked against the H100's 227 KB per block (a launch-time error otherwise).

Why a subprocess: with TRITON_INTERPRET=1 set when triton was imported, every @triton.jit
function (triton.language's own helpers included) is an InterpretedFunction, and the compiler
reads the knob while it runs; a fresh interpreter without the variable sees JITFunctions.

Manual use (e.g. to try a kernel file before it is committed):
    python tests/kernels/test_kernels_compile.py [--kernel-file trace_update=/tmp/x.py] [--case NAME ...]
prints one line per case and exits 1 if any failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/: _sm90 (also in the worker process)
from _sm90 import _install_compile_only_launch, _probe  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORKERS = 2                 # processes the cases are split over (CI has 2 cores)
TIMEOUT_S = 300

# case name -> the launchers it calls (see _run_case); bf16, D = 128, GQA (Hq = 4, Hkv = 2)
CASES = [
    "attention-dense", "attention-dense-causal", "attention-bias", "attention-bias-causal", "attention-ws",
    "correction-bias", "correction-bias-causal",
    "salience-capture", "salience-capture-bias", "salience-fused", "salience-fused-bias-causal",
    "trace-update",
    "bias-index", "bias-index-key64", "bias-index-sort", "bias-index-sort-key64", "bias-index-chunk2048",
]


# ---- worker: runs in a fresh interpreter without TRITON_INTERPRET -------------------------------

def _replace_kernel_file(name, path):
    """Load `path` as memtrace.kernels.<name> (for trying a kernel file that is not committed)."""
    import importlib.util

    import memtrace.kernels as pkg
    full = f"memtrace.kernels.{name}"
    spec = importlib.util.spec_from_file_location(full, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[full] = mod
    spec.loader.exec_module(mod)
    setattr(pkg, name, mod)


def _run_case(case):
    import importlib
    import types

    import torch

    from memtrace.bias import TraceBias

    K = {n: importlib.import_module(f"memtrace.kernels.{n}")
         for n in ("attention", "attention.fwd_ws", "salience", "trace_update", "bias_index")}
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, D, dt = 2, 4, 2, int(os.environ.get("MEMTRACE_COMPILE_T", "256")), 128, torch.bfloat16
    q = torch.randn(B, Hq, T, D, generator=g).to(dt)
    k = torch.randn(B, Hkv, T, D, generator=g).to(dt)
    v = torch.randn(B, Hkv, T, D, generator=g).to(dt)
    do = torch.randn(B, Hq, T, D, generator=g).to(dt)
    n = 64
    bias = TraceBias.from_coo(torch.randint(0, Hq, (n,), generator=g), torch.randint(0, T, (n,), generator=g),
                              torch.randint(0, T, (n,), generator=g), torch.randn(n, generator=g),
                              num_heads=Hq, seq_len_q=T, seq_len_k=T)
    ev = bias.entry_values()
    causal = case.endswith("-causal")
    kw = {"causal": causal, "scale": D ** -0.5, "alpha": 1.0}

    if case == "attention-ws":
        # the warp-specialized dense forward (sm_90 only, so forced here) and its correction launch
        ka = K["attention"]
        K["attention.fwd_ws"].ws_usable = lambda *args: True
        ka.flash_fwd(q, k, v, None, **{**kw, "causal": False})
        ka.flash_fwd(q, k, v, bias, **{**kw, "causal": False}, return_flags=True)
    elif case.startswith("attention-"):
        ka = K["attention"]
        b = bias if "-bias" in case else None
        out, lse = ka.flash_fwd(q, k, v, b, **kw)
        ka.flash_bwd(q, k, v, out, lse, do, b, **kw, need_dvalues=b is not None)
        if b is not None:   # the flags-returning forward and the backward that takes them
            out, lse, flags = ka.flash_fwd(q, k, v, b, **kw, return_flags=True)
            ka.flash_bwd(q, k, v, out, lse, do, b, **kw, need_dvalues=True, row_flags=flags)
    elif case.startswith("correction-"):
        kc = K["attention"]
        out, lse = torch.zeros_like(q), torch.zeros(B, Hq, T)
        out, lse, flags = kc.correct_fwd(q, k, v, out, lse, bias, ev, **kw, return_flags=True)
        kc.correct_fwd(q, k, v, out, lse, bias, ev, **kw)
        # both forms, each with the hand-carried (stages=0) and the pipelined entry loop
        for form, stages in (("rows", 0), ("rows", 2), ("window", 0), ("window", 2)):
            kc.correct_fwd(q, k, v, out, lse, bias, ev, **kw, form=form, stages=stages)
        kc.correct_fwd(q, k, v, out, lse, bias, ev, **kw, form="rows", block_m=16, chunk=32, num_warps=2,
                       stages=2)   # the rows form's default
        grads = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        kc.correct_bwd(q, k, v, out, lse, do, bias, ev, *grads, **kw, need_dvalues=True)
        for q_form in ("rows", "window"):   # the query-side launch in both forms
            kc.correct_bwd(q, k, v, out, lse, do, bias, ev, *grads, **kw, need_dvalues=True, q_form=q_form)
        # the key-side window form (no GQA) and the query side reading a given delta
        kv1 = k.repeat_interleave(Hq // Hkv, 1)
        grads1 = torch.zeros_like(q), torch.zeros_like(kv1), torch.zeros_like(kv1)
        kc.correct_bwd(q, kv1, kv1, out, lse, do, bias, ev, *grads1, **kw, need_dvalues=True, kv_form="window",
                       delta=torch.zeros(B * Hq, T))
        kc.correct_bwd(q, k, v, out, lse, do, bias, ev, *grads, **kw, need_dvalues=True, row_flags=flags)
        kc.cancelling_rows(q, k, lse, bias, ev, **kw)
        kc.exact_rows_bwd(q, k, v, out, lse, do, bias, ev, *grads, flags, **kw,
                          dval_part=torch.zeros(B, bias.nnz))
    elif case.startswith("salience-fused"):
        from memtrace import capture
        ka = K["attention"]
        b = bias if "-bias" in case else None
        cap = types.SimpleNamespace(capacity=4096, threshold=1e-3)
        out, lse = ka.flash_fwd(q, k, v, b, **kw)
        bound = ka.CaptureBound(torch.zeros(Hq, T // ka.CAPTURE_SEG, T, dtype=torch.int32), 1e-3)
        ka.flash_bwd(q, k, v, out, lse, do, b, **kw, need_dvalues=False, capture_bound=bound)
        capture._fill_triton(cap, q, k, v, lse, do, b, ev if b is not None else None, causal, D ** -0.5, 1.0,
                             bound)
    elif case.startswith("salience-"):
        from memtrace import capture
        capture._CONFIG_OVERRIDE = capture._CUDA_CONFIGS[D]    # the CUDA tiles, not the interpreter's
        cap = types.SimpleNamespace(capacity=4096, threshold=1e-3)
        lse = torch.zeros(B, Hq, T)
        b = bias if case.endswith("-bias") else None
        capture._fill_triton(cap, q, k, v, lse, do, b, ev if b is not None else None, True, D ** -0.5, 1.0)
    elif case == "trace-update":
        from memtrace.memory import TraceMemory
        mem = TraceMemory(num_layers=2, num_heads=Hq, device="cpu")          # quota 2048 (the default)
        C = 300
        head = torch.randint(0, Hq, (B, C), generator=g, dtype=torch.int32)
        qi = torch.randint(0, T, (B, C), generator=g, dtype=torch.int32)
        kj = torch.randint(0, T, (B, C), generator=g, dtype=torch.int32)
        S, a = torch.rand(B, C, generator=g), torch.rand(B, C, generator=g)
        slot = torch.zeros(B, Hq, mem.quota)
        K["trace_update"].trace_update_slabs(mem.strength, mem.meta, [0, 1], head, qi, kj, S, a,
                                             torch.full((B,), C, dtype=torch.int32), slot, slot.clone(),
                                             torch.tensor([True, False]), **mem._params())
    elif case.startswith("bias-index"):
        # default: the chunk-sort path (small index); -sort: the torch.sort path (large indexes);
        # -chunk2048: the largest chunk tl.sort (32 heads x 2048 entries, the benchmark's shape)
        H, Tq, Tk = (8, 32768, 32768) if case.endswith("key64") else (Hq, T, T)   # key64: H*Tq*Tk >= 2^31
        n = 1000
        if case.endswith("chunk2048"):
            H, n = 32, 32 * 2048
        cols = [torch.randint(0, m, (n,), generator=g, dtype=torch.int32) for m in (H, Tq, Tk)]
        K["bias_index"].build_index(*cols, H, Tq, Tk, method="sort" if "-sort" in case else None)
    else:
        raise KeyError(case)


def _worker(cases, kernel_files):
    """{'skip': reason} or {'cases': {case: {'ok', 'error', 'kernels', 'seconds'}}}."""
    os.environ.pop("TRITON_INTERPRET", None)
    reason = _probe()
    if reason is not None:
        return {"skip": reason}
    for spec in kernel_files:
        name, path = spec.split("=", 1)
        _replace_kernel_file(name, path)
    log = []
    _install_compile_only_launch(log)
    results = {}
    for case in cases:
        del log[:]
        t0 = time.perf_counter()
        try:
            _run_case(case)
            ok, error = True, None
        except Exception as e:  # noqa: BLE001 - reported per case
            ok, error = False, f"{type(e).__name__}: {e}"
        results[case] = {"ok": ok, "error": error, "kernels": list(log),
                         "seconds": round(time.perf_counter() - t0, 2)}
    return {"cases": results}


def _main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", action="append", help=f"one of {CASES} (default: all)")
    p.add_argument("--kernel-file", action="append", default=[], metavar="NAME=PATH",
                   help="use PATH as memtrace.kernels.NAME")
    p.add_argument("--json", help="write the report here instead of printing a summary")
    args = p.parse_args(argv)
    report = _worker(args.case or CASES, args.kernel_file)
    if args.json:
        Path(args.json).write_text(json.dumps(report))
        return 0
    if "skip" in report:
        print("SKIP:", report["skip"])
        return 0
    for case, r in report["cases"].items():
        names = ", ".join(sorted({x["kernel"] for x in r["kernels"]}))
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {case} ({r['seconds']} s): {names}")
        for x in r["kernels"]:
            print(f"      {x['kernel']:<32} warps {x['num_warps']} stages {x['num_stages']} smem {x['shared']:>6}"
                  f" regs {x.get('regs', '?')} stack {x.get('stack_bytes', '?')}")
        if not r["ok"]:
            print("     ", r["error"].replace("\n", "\n      "))
    return 0 if all(r["ok"] for r in report["cases"].values()) else 1


# ---- pytest side --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("triton")
    tmp = tmp_path_factory.mktemp("compile_h100")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")        # compile for real, not from a warm cache
    procs = []
    try:
        for w in range(WORKERS):
            out, log = tmp / f"report{w}.json", tmp / f"worker{w}.log"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--json", str(out)]
            for case in CASES[w::WORKERS]:
                cmd += ["--case", case]
            with open(log, "w") as f:
                proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
            procs.append((proc, out, log))
        merged = {"cases": {}}
        for proc, out, log in procs:
            try:
                rc = proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"compile worker ran past {TIMEOUT_S} s")
            if rc != 0 or not out.exists():
                pytest.fail(f"compile worker exited with {rc}:\n{log.read_text()[-4000:]}")
            part = json.loads(out.read_text())
            if "skip" in part:
                pytest.skip(part["skip"])
            merged["cases"].update(part["cases"])
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return merged


@pytest.mark.parametrize("case", CASES)
def test_kernels_compile_for_h100(report, case):
    r = report["cases"][case]
    assert r["ok"], f"{case}: {r['error']}"
    assert r["kernels"], f"{case}: no kernel was launched"
    for x in r["kernels"]:
        assert "cubin" in x["stages"], x


def test_every_kernel_is_compiled(report):
    """Each @triton.jit kernel that a launcher launches appears in some case (helpers are inlined)."""
    compiled = {x["kernel"] for r in report["cases"].values() for x in r["kernels"]}
    launched = set()
    for path in sorted((REPO / "kernels").rglob("*.py")):
        if path.name == "cms.py":      # compiled for sm_90 by tests/nn/test_cms.py (its own compile test)
            continue
        launched |= set(re.findall(r"\b(_\w+_kernel)\[", path.read_text()))
    assert launched, "found no kernel launches in kernels/"
    assert launched <= compiled, f"never compiled: {sorted(launched - compiled)}"


if __name__ == "__main__":
    sys.exit(_main())
