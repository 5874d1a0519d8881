"""The `memtrace` command (also `python -m memtrace`).

    memtrace bench  [--quick] [--only attention,capture,...] [--json-dir DIR] [--markdown PATH] [--list]
        Runs the benchmark scripts benchmarks/bench_<family>.py (every file of that name is a
        family, so a new op family only adds its script; each has main(argv) taking --json and
        --quick). Without a CUDA device it says so and runs small CPU timings (Triton interpreter).
    memtrace parity [--trials N] [--seed S] [--backends a,b] [--max-len T]
        Random shapes against the float64 reference for every backend that can run here; prints
        the worst relative errors per backend and quantity, and exits 1 if any exceeds SPEC 7.
    memtrace experiment --task T [--arms ...] [--seeds N] [--steps N] [--device cpu|cuda] | --plan P | --report
        The ablation experiment of issue 29 (memtrace/experiment/README.md).
    memtrace viz [traces|history|routing|motifs|experiment] INPUT --out DIR
        Pictures (SPEC 12) of a Memtrace / TraceMemory / RoutingTree state file or a JSON metrics
        log / experiment runs: PNGs, routing.html and a self-contained index.html in DIR (all
        pictures the input allows, or the one kind named).

The benchmarks are not an installed package: they are found next to the package in a source
checkout (the editable install), or in the directory named by MEMTRACE_BENCHMARKS_DIR.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from .config import triton_interpreter

# Families in the order `bench` runs them; other bench_*.py files found are run after these.
KNOWN_FAMILIES = ("attention", "capture", "update", "routing")
TOLERANCE = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 1e-2, "float64": 1e-7}
SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


# ---- bench --------------------------------------------------------------------------------------

def benchmarks_dir() -> Path | None:
    from .config import settings
    env = settings().benchmarks_dir
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parent.parent / "benchmarks", Path.cwd() / "benchmarks"]
    for path in candidates:
        if path.is_dir() and any(path.glob("bench_*.py")):
            return path
    return None


def bench_families(directory: Path) -> dict:
    """{family: script path} for every benchmarks/bench_<family>.py, known families first."""
    found = {p.stem[len("bench_"):]: p for p in sorted(directory.glob("bench_*.py"))}
    ordered = {name: found[name] for name in KNOWN_FAMILIES if name in found}
    ordered.update({name: path for name, path in found.items() if name not in ordered})
    return ordered


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"memtrace_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # scripts may import their neighbours
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def cmd_bench(args) -> int:
    import torch
    directory = benchmarks_dir()
    if directory is None:
        print("memtrace bench: no benchmarks/ directory found (set MEMTRACE_BENCHMARKS_DIR to a checkout's "
              "benchmarks/)", file=sys.stderr)
        return 2
    families = bench_families(directory)
    if args.list:
        for name, path in families.items():
            print(f"{name:<12} {path}")
        return 0
    wanted = [f.strip() for f in args.only.split(",")] if args.only else list(families)
    unknown = [f for f in wanted if f not in families]
    if unknown:
        print(f"memtrace bench: unknown famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
              f"known: {', '.join(families)}", file=sys.stderr)
        return 2
    if args.json_dir and os.path.exists(args.json_dir) and not os.path.isdir(args.json_dir):
        print(f"memtrace bench: --json-dir {args.json_dir} exists and is not a directory", file=sys.stderr)
        return 2
    quick = args.quick
    if not torch.cuda.is_available():
        print("memtrace bench: no CUDA device found; running small CPU timings instead "
              "(Triton interpreter, TRITON_INTERPRET=1). These are not GPU numbers.")
        os.environ.setdefault("TRITON_INTERPRET", "1")
        quick = True
    status = 0
    for name in wanted:
        argv = ["--quick"] if quick else []
        if args.json_dir:
            os.makedirs(args.json_dir, exist_ok=True)
            argv += ["--json", os.path.join(args.json_dir, f"{name}.json")]
        if args.markdown and name == "attention":
            argv += ["--markdown", args.markdown]
        print(f"== {name}: {families[name].name} {' '.join(argv)}", flush=True)
        try:
            _load_script(families[name]).main(argv)
        except SystemExit as exc:  # argparse in a script
            if exc.code not in (0, None):
                status = 1
        except Exception as exc:
            print(f"memtrace bench: {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            status = 1
    return status


# ---- parity -------------------------------------------------------------------------------------

def _oracle(q, k, v, coo, dout, causal, alpha):
    """float64 reference (out, dq, dk, dv, dvalue) through autograd on a dense bias."""
    import torch

    import memtrace as mt
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    head, q_idx, k_idx, value = coo
    val64 = value.detach().double().requires_grad_(True)
    dense = mt.reference.dense_bias(head, q_idx, k_idx, val64, q.shape[1], q.shape[2], k.shape[2])
    out = mt.reference.attention(q64, k64, v64, dense, causal=causal, alpha=alpha)
    grads = torch.autograd.grad(out, (q64, k64, v64, val64), dout.double())
    return (out, *grads)


def _random_case(rng, device, max_len, dtypes):
    Hkv = int(rng.choice([1, 2, 4]))
    Hq = Hkv * int(rng.choice([1, 2]))
    case = dict(B=int(rng.integers(1, 3)), Hq=Hq, Hkv=Hkv, Tq=int(rng.integers(1, max_len + 1)),
                Tk=int(rng.integers(1, max_len + 1)), D=int(rng.choice([16, 32, 64, 128])),
                causal=bool(rng.integers(0, 2)), dtype=str(rng.choice(dtypes)),
                alpha=float(rng.choice([1.0, 0.5, 2.0])))
    case["entries"] = int(rng.integers(0, 4 * max(case["Tq"], case["Tk"]) + 1))
    return case


def _inputs(case, device, seed):
    import torch

    import memtrace as mt
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, case["dtype"])
    B, Hq, Hkv, Tq, Tk, D = (case[n] for n in ("B", "Hq", "Hkv", "Tq", "Tk", "D"))
    q = torch.randn(B, Hq, Tq, D, device=device, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Tk, D, device=device, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Tk, D, device=device, generator=g).to(dtype)
    n = case["entries"]
    head = torch.randint(0, Hq, (n,), device=device, generator=g)
    q_idx = torch.randint(0, Tq + 2, (n,), device=device, generator=g)
    k_idx = torch.randint(0, Tk + 2, (n,), device=device, generator=g)
    # signed values that keep alpha * (merged) bias above ln(1/4) for every backend to take them
    value = (torch.rand(n, device=device, generator=g) * 2.0 - 0.25) / case["alpha"]
    bias = mt.TraceBias.from_coo(head, q_idx, k_idx, value, num_heads=Hq, seq_len_q=Tq + 2, seq_len_k=Tk + 2)
    dout = torch.randn(B, Hq, Tq, D, device=device, generator=g).to(dtype)
    return q, k, v, bias, (head, q_idx, k_idx, value), dout


def cmd_parity(args) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    import memtrace as mt
    from memtrace import attention as A
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        dtypes = ["float32", "float16"] if triton_interpreter() else ["float32", "float64"]
    else:
        dtypes = ["bfloat16", "float16", "float32"]
    max_len = args.max_len or (300 if device == "cuda" else 24)
    rng = np.random.default_rng(args.seed)
    only = [b.strip() for b in args.backends.split(",")] if args.backends else None
    unknown = [b for b in only or () if b not in A.BACKENDS or b == "auto"]
    if unknown:
        print(f"memtrace parity: unknown backend{'' if len(unknown) == 1 else 's'} {', '.join(map(repr, unknown))}; "
              f"known: {', '.join(b for b in A.BACKENDS if b != 'auto')}", file=sys.stderr)
        return 2
    worst: dict = {}   # backend -> {quantity: (err, case)}
    counts: dict = {}
    failures = []
    print(f"memtrace parity on {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "")
          + f": {args.trials} random cases, every backend that can run them, against the float64 reference")
    for trial in tqdm(range(args.trials), desc="parity", unit="case"):
        case = _random_case(rng, device, max_len, dtypes)
        q, k, v, bias, coo, dout = _inputs(case, device, args.seed * 100003 + trial)
        want = _oracle(q, k, v, coo, dout, case["causal"], case["alpha"])
        names = A.available_backends(q, k, v, bias, causal=case["causal"])
        for name in names:
            if only and name not in only:
                continue
            qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            value = bias.value.detach().clone().requires_grad_(True)
            b = mt.TraceBias(bias.head, bias.q_idx, bias.k_idx, value, num_heads=bias.num_heads,
                             seq_len_q=bias.seq_len_q, seq_len_k=bias.seq_len_k,
                             _index=(bias.entry_pos, bias.src_entry, bias.k_order, bias.q_offsets, bias.k_offsets))
            try:
                out = mt.biased_attention(qq, kk, vv, b, causal=case["causal"], alpha=case["alpha"], backend=name)
                out.backward(dout)
                got = (out, qq.grad, kk.grad, vv.grad, value.grad)
            except Exception as exc:
                failures.append((name, case, f"{type(exc).__name__}: {exc}"))
                continue
            counts[name] = counts.get(name, 0) + 1
            tol = TOLERANCE[case["dtype"]]
            for quantity, a, ref in zip(("out", "dq", "dk", "dv", "dvalue"), got, want):
                if ref.numel() == 0:
                    continue
                if a is None:
                    a = torch.zeros_like(ref)
                a64 = a.detach().double()
                norm = ref.norm().item()
                # gradients that vanish in exact arithmetic (one key, one-hot rows) are compared
                # absolutely, at an RMS of 0.1 (typical gradients here have RMS 0.1 to 1)
                floor = (0.1 if quantity != "out" else 1e-6) * (ref.numel() ** 0.5)
                err = float("inf") if not torch.isfinite(a64).all() else \
                    (a64 - ref).norm().item() / max(norm, floor)
                ratio = err / tol
                slot = worst.setdefault(name, {})
                if quantity not in slot or ratio > slot[quantity][0] / TOLERANCE[slot[quantity][1]["dtype"]]:
                    slot[quantity] = (err, case)
                if err > tol:
                    failures.append((name, case, f"{quantity} rel err {err:.3g} > {tol:g}"))
    print()
    print(f"{'backend':<12} {'cases':>5}  " + "  ".join(f"{q:>22}" for q in ("out", "dq", "dk", "dv", "dvalue")))
    for name, slot in worst.items():
        cells = []
        for quantity in ("out", "dq", "dk", "dv", "dvalue"):
            if quantity in slot:
                err, case = slot[quantity]
                cells.append(f"{err:9.2e} ({SHORT[case['dtype']]}/{TOLERANCE[case['dtype']]:.0e})")
            else:
                cells.append(f"{'-':>22}")
        print(f"{name:<12} {counts.get(name, 0):>5}  " + "  ".join(f"{c:>22}" for c in cells))
    print("\nworst case per backend (the largest error relative to its dtype's tolerance):")
    for name, slot in worst.items():
        quantity, (err, case) = max(slot.items(), key=lambda kv: kv[1][0] / TOLERANCE[kv[1][1]["dtype"]])
        print(f"  {name:<12} {quantity:<6} {err:.3g}  {_describe(case)}")
    if failures:
        print(f"\n{len(failures)} failure(s):")
        for name, case, why in failures[:20]:
            print(f"  {name:<12} {why}  {_describe(case)}")
        return 1
    # a pass needs comparisons: no case compared at all, or a backend asked for by --backends that
    # could not run a single case here (e.g. cudnn without cuDNN), proves nothing (issue 28)
    idle = [b for b in only or () if not counts.get(b)]
    if not counts or idle:
        names = ", ".join(idle) if idle else "any backend"
        print(f"memtrace parity: compared no case for {names} on {device} ({args.trials} random cases): "
              f"{'it is' if len(idle) == 1 else 'they are'} not available for these inputs here, so "
              "nothing was checked", file=sys.stderr)
        return 1
    print("\nall within SPEC 7 tolerances")
    return 0


def _describe(case):
    return (f"B={case['B']} Hq={case['Hq']} Hkv={case['Hkv']} Tq={case['Tq']} Tk={case['Tk']} D={case['D']} "
            f"causal={case['causal']} {case['dtype']} alpha={case['alpha']} entries={case['entries']}")


# ---- viz ----------------------------------------------------------------------------------------

VIZ_KINDS = ("traces", "history", "routing", "motifs", "experiment")


def cmd_viz(args) -> int:
    words = args.inputs
    kind = None
    if len(words) == 2 and words[0] in VIZ_KINDS:
        kind, words = words[0], words[1:]
    if len(words) != 1:
        print(f"memtrace viz: give one input file, optionally after a kind ({', '.join(VIZ_KINDS)})",
              file=sys.stderr)
        return 2
    try:
        from memtrace.viz import load_state, write_report
        state = load_state(words[0], tag=args.tag)
        wanted = {"traces": ("memory",), "history": ("metrics_log",), "routing": ("tree", "registry"),
                  "motifs": ("registry", "tree"), "experiment": ("runs",)}
        if kind is not None:
            if wanted[kind][0] not in state or state[wanted[kind][0]] is None:
                print(f"memtrace viz: {words[0]} holds nothing for '{kind}'", file=sys.stderr)
                return 2
            state = {k: v for k, v in state.items() if k in wanted[kind]}
            if kind == "motifs":       # the motif pictures only (the tree refreshes their statistics)
                state = {"registry": state["registry"]}
        written = write_report(args.out, **state)
    except (OSError, ValueError, TypeError, ImportError, KeyError) as exc:
        print(f"memtrace viz: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}", file=sys.stderr)
        return 2
    for name, path in written.items():
        print(f"{name:<20} {path}")
    return 0


# ---- entry point --------------------------------------------------------------------------------

def _int_in(low, high=None):
    """An argparse type: an int in [low, high] (a bad value is an argparse error, not a traceback)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an int in [{low}, {'inf' if high is None else high}], "
                                             f"got {value}")
        return value
    parse.__name__ = "int"
    return parse


def build_parser():
    parser = argparse.ArgumentParser(prog="memtrace", description="memtrace: benchmarks, parity checks, the experiment")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run the benchmark scripts (benchmarks/bench_*.py)")
    bench.add_argument("--quick", action="store_true", help="a short subset of each benchmark")
    bench.add_argument("--only", metavar="FAMILIES", help="comma-separated families (see --list)")
    bench.add_argument("--list", action="store_true", help="list the benchmark families and exit")
    bench.add_argument("--json-dir", metavar="DIR", help="write DIR/<family>.json for each family")
    bench.add_argument("--markdown", metavar="PATH", help="the attention table as markdown (BENCHMARKS.md)")
    bench.set_defaults(func=cmd_bench)
    parity = sub.add_parser("parity", help="random shapes against the float64 reference, every backend")
    parity.add_argument("--trials", type=_int_in(1), default=40)
    parity.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0)
    parity.add_argument("--backends", metavar="NAMES", help="comma-separated backends (default: all that run)")
    parity.add_argument("--max-len", type=_int_in(1, 65535), default=None,
                        help="longest sequence (default 300 on CUDA, 24 on CPU)")
    parity.set_defaults(func=cmd_parity)
    viz = sub.add_parser("viz", help="pictures of a state file: PNGs and a self-contained HTML page")
    viz.add_argument("inputs", nargs="+", metavar="[KIND] INPUT",
                     help=f"optional kind ({', '.join(VIZ_KINDS)}) and the input file (or a store folder)")
    viz.add_argument("--out", "-o", required=True, metavar="DIR", help="output folder (created; its parent must exist)")
    viz.add_argument("--tag", default=None, help="a store folder's trace tag (default: its only one)")
    viz.set_defaults(func=cmd_viz)
    from .experiment.command import add_parser as add_experiment_parser  # the experiment (issue 29)
    add_experiment_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
