"""The attention benchmark's bookkeeping (no GPU needed): the interleaved overhead, ratios and the
markdown table."""
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_attention as BA  # noqa: E402

SHAPE = dict(B=1, Hq=2, Hkv=2, T=64, D=32, causal=False, dtype="bf16")


def test_interleaved_overhead_is_the_median_round():
    times = itertools.cycle([1.0, 1.05, 2.0, 2.2, 1.0, 1.02, 4.0, 4.4, 1.0, 1.5])   # base, biased, ...
    tick = iter(times)
    med, lo, hi = BA.interleaved_overhead(lambda: next(tick), lambda: next(tick), rounds=5)
    assert abs(med - 0.10) < 1e-12 and abs(lo - 0.02) < 1e-12 and abs(hi - 0.5) < 1e-12


def test_ratios_and_markdown():
    rows = [dict(SHAPE, impl="memtrace[triton] no bias", fwd_ms=1.0, fwd_tflops=100.0, fwdbwd_ms=3.0,
                 fwdbwd_tflops=90.0),
            dict(SHAPE, impl="memtrace[triton]", traces=2048, pattern="random", fwd_ms=1.1, fwd_tflops=91.0,
                 fwdbwd_ms=3.3, fwdbwd_tflops=82.0),
            dict(SHAPE, impl="sdpa_cudnn", fwd_ms=0.8, fwd_tflops=125.0, fwdbwd_ms=2.5, fwdbwd_tflops=108.0),
            dict(SHAPE, impl="overhead[triton]", traces=2048, pattern="random", fwd_overhead=0.04,
                 fwd_overhead_range=[0.01, 0.09], fwdbwd_overhead=0.12, fwdbwd_overhead_range=[0.1, 0.2]),
            dict(SHAPE, impl="overhead[auto]", traces=16384, pattern="random", error="ValueError: no")]
    BA.add_ratios(rows)
    biased = rows[1]
    assert abs(biased["ratios"]["fwd_vs_sdpa_cudnn"] - 91.0 / 125.0) < 1e-12
    assert abs(biased["overhead_vs_no_bias"]["fwd"] - 0.1) < 1e-12
    assert "ratios" not in rows[3]                      # interleaved rows are not memtrace timing rows
    md = BA.markdown(rows, {"device": "test"})
    assert "| triton | 2048 | random | +4.0% (+1.0% .. +9.0%) | +12.0% (+10.0% .. +20.0%) |" in md
    assert "| auto | 16384 | random | ValueError: no | ValueError: no |" in md
    assert "overhead[" not in md.split("Overhead over bias=None")[0]   # not in the timing table
