"""The masked (key_padding_mask, HAS_MASK) variants of the attention and salience kernels compile
for an H100 (sm_90) through ptxas on the CPU, with test_kernels_compile.py's compile-only launch
(run in a subprocess without TRITON_INTERPRET, as there). The unmasked kernels are that file's."""
import torch


def test_masked_kernels_compile_for_h100(tmp_path):
    """The masked (HAS_MASK) variants of the attention and salience kernels compile for sm_90
    through ptxas, with tests/kernels/test_kernels_compile.py's compile-only launch."""
    import _sm90
    kernels = _sm90.run_compile_worker(__file__, tmp_path)
    compiled = {x["kernel"] for x in kernels if x["constexprs"].get("HAS_MASK") is True}
    want = {"_flash_fwd_kernel", "_flash_bwd_dq_kernel", "_flash_bwd_dkdv_kernel", "_correct_fwd_slow_kernel",
            "_cancel_flags_kernel", "_exact_rows_q_kernel", "_exact_rows_kv_kernel", "_salience_stream_kernel",
            "_salience_tile_kernel", "_salience_segment_kernel", "_salience_entry_kernel"}
    assert want <= compiled, f"masked kernels never compiled: {sorted(want - compiled)}"


def _compile_masked(report_path):
    """The worker of test_masked_kernels_compile_for_h100 (runs without TRITON_INTERPRET)."""
    import types
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # tests/: _sm90
    import _sm90

    def launch():
        from memtrace.kernels import attention as ka

        from memtrace import capture
        from memtrace.bias import TraceBias
        g = torch.Generator().manual_seed(0)
        B, Hq, Hkv, T, D, dt = 2, 4, 2, 256, 128, torch.bfloat16
        q, do = (torch.randn(B, Hq, T, D, generator=g).to(dt) for _ in range(2))
        k, v = (torch.randn(B, Hkv, T, D, generator=g).to(dt) for _ in range(2))
        n = 64
        bias = TraceBias.from_coo(torch.randint(0, Hq, (n,), generator=g), torch.randint(0, T, (n,), generator=g),
                                  torch.randint(0, T, (n,), generator=g), torch.randn(n, generator=g),
                                  num_heads=Hq, seq_len_q=T, seq_len_k=T)
        ev = bias.entry_values()
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[:, :25] = False
        kw = {"causal": True, "scale": D ** -0.5, "alpha": 1.0, "key_padding_mask": mask}
        out, lse = ka.flash_fwd(q, k, v, bias, ev, **kw)      # may_cancel: the recompute launch too
        ka.flash_bwd(q, k, v, out, lse, do, bias, ev, **kw, need_dvalues=True)   # flags, exact rows
        ka.flash_fwd(q, k, v, None, **kw)
        ka.flash_bwd(q, k, v, out, lse, do, None, **kw, need_dvalues=False)
        bound = ka.CaptureBound(torch.zeros(Hq, T // ka.CAPTURE_SEG, T, dtype=torch.int32), 1e-3)
        ka.flash_bwd(q, k, v, out, lse, do, bias, ev, **kw, need_dvalues=False, may_cancel=False,
                     capture_bound=bound)
        cap = types.SimpleNamespace(capacity=4096, threshold=1e-3)
        capture._fill_triton(cap, q, k, v, lse, do, bias, ev, True, D ** -0.5, 1.0, bound, mask)
        capture._CONFIG_OVERRIDE = capture._CUDA_CONFIGS[D]
        capture._fill_triton(cap, q, k, v, lse, do, bias, ev, True, D ** -0.5, 1.0, None, mask)

    _sm90.compile_report(report_path, launch)


if __name__ == "__main__":
    import sys
    _compile_masked(sys.argv[1])


if __name__ == "__main__":
    import sys
    _compile_masked(sys.argv[1])
