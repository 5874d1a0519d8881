"""Salience capture (issue 4): cost of capture on top of attention forward+backward, against the
seeds' eager capture, in one process on one GPU.

Measured per shape (bf16, non-causal, D=128):
  base_sdpa      SDPA flash forward+backward (aten op that also returns the LSE), no capture
  capture_sdpa   the same + SalienceCapture.fill (the capture memtrace's backward runs)
  base_mt        memtrace.biased_attention forward+backward, capture=None   (when it runs here)
  capture_mt     memtrace.biased_attention(..., capture=cap) forward+backward ("auto": the Triton
                 backend when the capture can be fused)
  base_triton / capture_triton_fused / capture_triton_unfused   backend="triton" without a capture,
                 with the fused capture (the backward's dQ kernel bounds the salience per 64-key
                 segment, the fill rescores the segments that pass), with the unfused one
  fill           SalienceCapture.fill alone (out/lse precomputed), threshold regime
  fill_overflow  fill with threshold 0: every edge is a candidate, the buffer overflows and the
                 strongest `capacity` are kept (the seeds' top-k semantics)
  fill_bias      fill with a 2048-entries-per-head TraceBias (scores every entry exactly)
  eager          the seeds' capture: materialise A = softmax(QK^T) (fp32 softmax, bf16 A),
                 retain_grad, backward, S = mean_b A*|dA|, topk(capacity)
Times are medians of triton.testing.do_bench; peak memory is torch.cuda.max_memory_allocated
above the inputs. TFLOP/s: 3.5 * 4*B*H*T^2*D for forward+backward; the capture kernel itself
does 2 matmuls, 4*B*H*T^2*D.

Usage: python benchmarks/bench_capture.py [--json PATH] [--quick]
"""
from __future__ import annotations

import argparse
import math
import sys
import traceback

import _harness
import torch

import memtrace
from memtrace import capture as capture_mod
from memtrace.capture import SalienceCapture

_PREVIOUS_SWEEP = {}
NO_SWEEP = False                  # --no-sweep: the default tile configuration only


def bench(fn, grad_to_none=None, rep=200):
    return _harness.median_ms(fn, warmup=25, rep=rep, grad_to_none=grad_to_none)


def peak_mib(fn, grads=()):
    for t in grads:
        t.grad = None
    with _harness.PeakMemory() as peak:
        fn()
    return peak.mib


def sdpa_fwd(q, k, v, scale):
    """SDPA flash forward through the aten op that also returns the LSE (differentiable)."""
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return res[0], res[1]


def eager_capture(q, k, v, dout, scale, topk):
    """The seeds' capture: materialised attention, retain_grad, S = mean_b A*|dA|, top-k."""
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    logits = torch.matmul(qq, kk.transpose(-1, -2)) * scale
    attn = torch.softmax(logits.float(), dim=-1).to(q.dtype)
    attn.retain_grad()
    out = torch.matmul(attn, vv)
    out.backward(dout)
    S = (attn.float() * attn.grad.float().abs()).mean(0)
    vals, idx = torch.topk(S.flatten(), topk)
    return vals, idx


def run_shape(B, H, T, D, capacity, quick, notes):
    dev = "cuda"
    dt = torch.bfloat16
    torch.manual_seed(0)
    q = torch.randn(B, H, T, D, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(B, H, T, D, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(B, H, T, D, device=dev, dtype=dt, requires_grad=True)
    dout = torch.randn(B, H, T, D, device=dev, dtype=dt)
    scale = 1.0 / math.sqrt(D)
    grads = [q, k, v]
    flops_fb = 3.5 * 4 * B * H * T * T * D
    flops_cap = 4 * B * H * T * T * D
    res = {"shape": {"B": B, "H": H, "T": T, "D": D, "dtype": "bf16", "causal": False}, "capacity": capacity}

    with torch.no_grad():
        out0, lse0 = sdpa_fwd(q, k, v, scale)
    # Threshold regime: the capacity-th strongest S (from an overflowing fill) as the threshold,
    # so the candidates fit the buffer (the intended use: a threshold set from the memory's).
    probe = SalienceCapture(threshold=0.0, capacity=capacity)
    # The first fill builds the glue that every later fill of this capacity shares (buffers and a
    # CUDA graph, memtrace.capture._FillGlue): persistent memory, outside the steps' peaks below.
    capture_mod._GLUE_CACHE.clear()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    probe.fill(q.detach(), k.detach(), v.detach(), out0, lse0, dout, None, None, scale=scale)
    torch.cuda.synchronize()
    held = probe.edges[0].numel() * 20 + 6 * 512      # its edge rows and 6 small tensors
    res["glue_workspace_mib"] = (torch.cuda.memory_allocated() - before - held) / 2**20
    threshold = float(probe.stats["kept_min_salience"])
    res["threshold"] = threshold
    res["probe_num_candidates"] = int(probe.stats["num_candidates"])
    cap = SalienceCapture(threshold=threshold, capacity=capacity)
    cap.fill(q.detach(), k.detach(), v.detach(), out0, lse0, dout, None, None, scale=scale)
    res["fill_num_candidates"] = int(cap.stats["num_candidates"])
    res["fill_num_edges"] = int(cap.num_edges)

    def base_sdpa():
        out, _ = sdpa_fwd(q, k, v, scale)
        out.backward(dout)

    def capture_sdpa():
        out, lse = sdpa_fwd(q, k, v, scale)
        out.backward(dout)
        cap.fill(q.detach(), k.detach(), v.detach(), out.detach(), lse, dout, None, None, scale=scale)

    def fill():
        cap.fill(q.detach(), k.detach(), v.detach(), out0, lse0, dout, None, None, scale=scale)

    over = SalienceCapture(threshold=0.0, capacity=capacity)

    def fill_overflow():
        over.fill(q.detach(), k.detach(), v.detach(), out0, lse0, dout, None, None, scale=scale)

    t = {}
    t["base_sdpa"] = bench(base_sdpa, grads)
    t["capture_sdpa"] = bench(capture_sdpa, grads)
    t["fill"] = bench(fill)
    t["fill_overflow"] = bench(fill_overflow)
    mem = {"base_sdpa": peak_mib(base_sdpa, grads), "capture_sdpa": peak_mib(capture_sdpa, grads)}

    # Tile configurations of the capture kernel: (BLOCK_M, BLOCK_N, warps, stages, per_tile).
    sweep = {}
    # per_tile 0 = the streaming kernel (a program walks its key tiles), 1 = a program per tile.
    configs = [(128, 64, 8, 2, 0), (64, 64, 4, 3, 0), (64, 64, 4, 2, 0), (128, 64, 4, 2, 0),
               (64, 64, 8, 3, 0), (128, 64, 8, 2, 1)]
    if quick:
        configs = configs[:3]
    if NO_SWEEP:
        configs = [capture_mod._config(D, q.device)]
    if _PREVIOUS_SWEEP:               # later shapes: only the 4 fastest of the first shape's sweep
        ranked = sorted((ms, c) for c, ms in _PREVIOUS_SWEEP.items() if isinstance(ms, float))
        configs = [tuple(int(x) for x in c.strip("()").split(",")) for _, c in ranked[:4]] or configs
    for cfg in configs:
        capture_mod._CONFIG_OVERRIDE = cfg
        try:
            sweep[str(cfg)] = bench(fill, rep=100)
        except Exception as exc:  # out of resources etc.
            sweep[str(cfg)] = f"error: {type(exc).__name__}: {str(exc)[:120]}"
        finally:
            capture_mod._CONFIG_OVERRIDE = None
    res["config_sweep_fill_ms"] = sweep
    if not _PREVIOUS_SWEEP:
        _PREVIOUS_SWEEP.update(sweep)
    default_cfg = capture_mod._config(D, q.device)
    timed = {c: ms for c, ms in sweep.items() if isinstance(ms, float)}
    best = min(timed, key=timed.get) if timed else str(default_cfg)
    res["default_config"] = str(default_cfg)
    res["best_config"] = best
    t["fill_default_config"] = t["fill"]
    # Everything below runs with the best configuration of the sweep.
    capture_mod._CONFIG_OVERRIDE = tuple(int(x) for x in best.strip("()").split(","))
    t["fill"] = bench(fill)
    t["fill_overflow"] = bench(fill_overflow)
    t["capture_sdpa"] = bench(capture_sdpa, grads)
    t["base_sdpa"] = bench(base_sdpa, grads)
    mem = {"base_sdpa": peak_mib(base_sdpa, grads), "capture_sdpa": peak_mib(capture_sdpa, grads)}
    from memtrace.kernels import salience as ks
    fill()
    fill_overflow()
    res["tile_kernel_regs_spills"] = {str(k): v for k, v in ks.LAST_COMPILED.items()}

    # A bias: 2048 random entries per head, the fill scores all of them.
    n_per_head = 2048
    g = torch.Generator(device=dev).manual_seed(1)
    bh = torch.arange(H, device=dev).repeat_interleave(n_per_head)
    bi = torch.randint(0, T, (H * n_per_head,), device=dev, generator=g)
    bj = torch.randint(0, T, (H * n_per_head,), device=dev, generator=g)
    bval = torch.rand(H * n_per_head, device=dev, generator=g)
    bias = memtrace.TraceBias.from_coo(bh, bi, bj, bval, num_heads=H, seq_len_q=T, seq_len_k=T)
    ev = bias.entry_values()
    capb = SalienceCapture(threshold=threshold, capacity=capacity)
    t["fill_bias"] = bench(lambda: capb.fill(q.detach(), k.detach(), v.detach(), out0, lse0, dout, bias, ev,
                                              scale=scale))

    # memtrace.biased_attention, when it runs here: "auto" (cuDNN without a capture; with one, the
    # Triton backend and its fused capture), and the Triton backend with the capture fused (the
    # backward bounds the salience per 64-key segment, the fill rescores the segments that pass)
    # or not (MEMTRACE_CAPTURE_FUSED=0: every tile scored after the backward).
    try:
        capm = SalienceCapture(threshold=threshold, capacity=capacity)
        capt = SalienceCapture(threshold=threshold, capacity=capacity)
        capu = SalienceCapture(threshold=threshold, capacity=capacity)

        def base_mt():
            memtrace.biased_attention(q, k, v, scale=scale).backward(dout)

        def capture_mt():
            memtrace.biased_attention(q, k, v, scale=scale, capture=capm).backward(dout)

        def base_triton():
            memtrace.biased_attention(q, k, v, scale=scale, backend="triton").backward(dout)

        def capture_triton_fused():
            memtrace.biased_attention(q, k, v, scale=scale, capture=capt, backend="triton").backward(dout)

        def capture_triton_unfused():
            with memtrace.config.override(capture_fused="0"):
                memtrace.biased_attention(q, k, v, scale=scale, capture=capu, backend="triton").backward(dout)

        runs = {"base_mt": base_mt, "capture_mt": capture_mt, "base_triton": base_triton,
                "capture_triton_fused": capture_triton_fused, "capture_triton_unfused": capture_triton_unfused}
        for fn in runs.values():
            fn()
        torch.cuda.synchronize()
        for name, fn in runs.items():
            stats0 = torch.cuda.memory_stats()
            t[name] = bench(fn, grads)
            stats1 = torch.cuda.memory_stats()
            # cudaMalloc calls during the timing (the caching allocator missing): each one stalls
            res.setdefault("device_allocs_during_timing", {})[name] = (
                stats1.get("num_device_alloc", 0) - stats0.get("num_device_alloc", 0))
        t["capture_triton_fused_again"] = bench(capture_triton_fused, grads)
        for name, fn in runs.items():
            mem[name] = peak_mib(fn, grads)
        # The same ratio from alternating short runs (the GPU's clocks drift by a few % between
        # separate do_bench calls): the median of seven base / fused pairs.
        pairs = [bench(capture_triton_fused, grads, rep=60) / bench(base_triton, grads, rep=60) for _ in range(7)]
        res["fused_over_base_triton_pairs"] = sorted(pairs)
        res["mt_capture_num_edges"] = int(capm.num_edges)
        # The fused and the unfused capture must agree (same edges, values within float32 noise).
        n_f, n_u = int(capt.num_edges), int(capu.num_edges)
        same = n_f == n_u and all(torch.equal(a[:n_f], b[:n_u]) for a, b in zip(capt.edges[:3], capu.edges[:3]))
        s_err = ((capt.edges[3][:n_f] - capu.edges[3][:n_f]).abs().max().item() if same and n_f else None)
        res["fused_vs_unfused"] = {"edges_fused": n_f, "edges_unfused": n_u, "same_edges": same,
                                   "max_abs_S_difference": s_err,
                                   "num_candidates": [int(capt.stats["num_candidates"]),
                                                      int(capu.stats["num_candidates"])]}
        # How much of the (row, 64-key segment) grid the bound lets through.
        from memtrace.kernels import attention as ka
        fused = capt.fused_bound(q, k)
        if fused is not None:
            words = fused.words
            out1, lse1 = ka.flash_fwd(q.detach(), k.detach(), v.detach(), causal=False, scale=scale, alpha=1.0)
            ka.flash_bwd(q.detach(), k.detach(), v.detach(), out1, lse1, dout, causal=False, scale=scale,
                         alpha=1.0, need_dvalues=False, capture_bound=fused)
            res["fused_segments_passing"] = float(ka.capture_bound_passing(words, B).float().mean())
            res["fused_bound_bits"] = ka.capture_bound_format(B)[0]
    except Exception as exc:
        notes.append(f"B{B} H{H} T{T}: memtrace.biased_attention not measured: {type(exc).__name__}: {exc}"[:400])

    # The seeds' eager capture.
    try:
        eager = lambda: eager_capture(q, k, v, dout, scale, capacity)
        eager()
        t["eager"] = bench(eager, rep=100)
        mem["eager"] = peak_mib(eager)
    except torch.cuda.OutOfMemoryError as exc:
        notes.append(f"B{B} H{H} T{T}: eager capture out of memory: {exc}"[:300])
    torch.cuda.empty_cache()

    capture_mod._CONFIG_OVERRIDE = None
    res["ms"] = t
    res["peak_mib"] = mem
    r = {}
    r["capture_over_base_sdpa"] = t["capture_sdpa"] / t["base_sdpa"]
    r["mem_capture_over_base_sdpa"] = mem["capture_sdpa"] / mem["base_sdpa"]
    if "base_mt" in t:
        r["capture_over_base_mt"] = t["capture_mt"] / t["base_mt"]
        r["mem_capture_over_base_mt"] = mem["capture_mt"] / mem["base_mt"]
    if "base_triton" in t:
        r["fused_capture_over_base_triton"] = t["capture_triton_fused"] / t["base_triton"]
        if res.get("fused_over_base_triton_pairs"):
            r["fused_capture_over_base_triton_paired"] = res["fused_over_base_triton_pairs"][3]
        r["unfused_capture_over_base_triton"] = t["capture_triton_unfused"] / t["base_triton"]
        r["mem_fused_capture_over_base_triton"] = mem["capture_triton_fused"] / mem["base_triton"]
        if "eager" in t:
            r["eager_over_capture_triton_fused"] = t["eager"] / t["capture_triton_fused"]
            extra = t["capture_triton_fused"] - t["base_triton"]
            r["eager_over_fused_capture_extra"] = t["eager"] / extra if extra > 0 else float("inf")
    if "eager" in t:
        r["eager_over_fill"] = t["eager"] / t["fill"]
        r["eager_over_fill_overflow"] = t["eager"] / t["fill_overflow"]
        extra = t["capture_sdpa"] - t["base_sdpa"]
        r["eager_over_capture_sdpa_extra"] = t["eager"] / extra if extra > 0 else float("inf")
    res["ratios"] = r
    res["tflops"] = {"base_sdpa": flops_fb / t["base_sdpa"] * 1e-9,
                     "capture_sdpa": flops_fb / t["capture_sdpa"] * 1e-9,
                     "fill_kernel_matmuls": flops_cap / t["fill"] * 1e-9}
    if "base_mt" in t:
        res["tflops"]["base_mt"] = flops_fb / t["base_mt"] * 1e-9
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-sweep", action="store_true", help="time the default capture tiles only")
    ap.add_argument("--batches", default="2,4", help="batch sizes at H16 T4096 D128 (the issue's: 2,4)")
    args = ap.parse_args(argv)
    global NO_SWEEP
    NO_SWEEP = args.no_sweep
    if not torch.cuda.is_available():
        print("bench_capture: no CUDA device; nothing to measure (the CPU tests cover correctness)")
        return 0
    shapes = [(int(b), 16, 4096, 128) for b in args.batches.split(",")]
    if args.quick:
        shapes = [(1, 4, 1024, 64)]
    capacity = 1 << 17
    notes = []
    results = []
    doc = {"benchmark": "bench_capture", **_harness.header(), "quick": args.quick,
           "sparse_emit": memtrace.config.settings().capture_emit,
           "baseline": "SDPA flash fwd+bwd (aten _scaled_dot_product_flash_attention, returns the LSE the "
                       "capture needs); memtrace.biased_attention too where it ran (base_mt / capture_mt)",
           "targets": {"capture_over_base": 1.25, "eager_over_capture": 20, "mem_capture_over_base": 1.1},
           "results": results, "notes": notes}

    def save():
        if args.json:
            _harness.write_json(args.json, doc)

    for B, H, T, D in shapes:
        try:
            r = run_shape(B, H, T, D, capacity, args.quick, notes)
        except Exception:
            traceback.print_exc()
            notes.append(f"B{B} H{H} T{T} D{D} failed: {traceback.format_exc()[-600:]}")
            save()
            continue
        results.append(r)
        save()                     # after every shape: a later timeout keeps what was measured
        s = r["shape"]
        print(f"\n== B{s['B']} H{s['H']} T{s['T']} D{s['D']} bf16, capacity {capacity}, "
              f"threshold {r['threshold']:.3e} ({r['fill_num_candidates']} candidates), "
              f"capture config {r['best_config']} (default {r['default_config']})", flush=True)
        for name, ms in r["ms"].items():
            print(f"  {name:22s} {ms:9.3f} ms   peak {r['peak_mib'].get(name, float('nan')):9.1f} MiB")
        _harness.print_ratios(r["ratios"])
        for name, x in r["tflops"].items():
            print(f"  TFLOP/s {name:26s} {x:8.1f}")
        print(f"  shared fill glue (persistent): {r['glue_workspace_mib']:.1f} MiB; fused segments passing: "
              f"{r.get('fused_segments_passing')}")
        print("  fill config sweep (ms):", r["config_sweep_fill_ms"])
        print("  tile kernel (regs, spills) per pass:", r["tile_kernel_regs_spills"], flush=True)
    for n in notes:
        print("note:", n)
    save()
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
