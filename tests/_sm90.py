"""Compiling Triton kernels for an H100 (sm_90) without a GPU: the compile-only launch that the
sm_90 compile tests install in a fresh interpreter (see tests/kernels/test_kernels_compile.py)."""
from __future__ import annotations

import os
import re
import subprocess
import time

TARGET = ("cuda", 90, 32)
H100_SMEM = 232448          # cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90 (227 KB)


def _install_compile_only_launch(log):
    """Make `kernel[grid](...)` compile for TARGET and return the CompiledKernel without running."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime import autotuner as rt_autotuner
    from triton.runtime import jit as rt_jit

    target = GPUTarget(*TARGET)
    backend = make_backend(target)
    binders = {}

    def run(self, *args, grid, warmup, **kwargs):
        # JITFunction.run up to the compile: same binder, same specialization, same options
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = binders.get(id(self))
        if binder is None:
            binder = binders[id(self)] = rt_jit.create_function_from_signature(self.signature, self.params,
                                                                               backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization,
                                                                options)
        t0 = time.perf_counter()
        kernel = triton_compile(ASTSource(self, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
        consts = {self.arg_names[k[0]]: (v if isinstance(v, (bool, int, float, str)) else str(v))
                  for k, v in constexprs.items() if len(k) == 1}
        md = kernel.metadata
        dump = os.environ.get("MEMTRACE_COMPILE_DUMP")      # a directory: keep each kernel's TTGIR, PTX, cubin
        if dump:
            os.makedirs(dump, exist_ok=True)
            for stage in ("ttgir", "ptx", "cubin"):
                with open(os.path.join(dump, f"{self.fn.__name__}_{len(log)}.{stage}"),
                          "wb" if stage == "cubin" else "w") as fh:
                    fh.write(kernel.asm[stage])
        log.append({"kernel": self.fn.__name__, "constexprs": consts, "num_warps": md.num_warps,
                    "num_stages": md.num_stages, "shared": md.shared, "stages": sorted(kernel.asm.keys()),
                    "seconds": round(time.perf_counter() - t0, 2), **_resource_usage(kernel)})
        if md.shared > H100_SMEM:
            raise RuntimeError(f"{self.fn.__name__}: {md.shared} bytes of shared memory > {H100_SMEM} (H100)")
        return kernel

    def autotuned_run(self, *args, **kwargs):
        # no benchmarking: the first config that survives the kernel's own pruning
        self.nargs = dict(zip(self.arg_names, args))
        try:
            config = self.prune_configs(kwargs)[0]
            if config.pre_hook is not None:     # e.g. the TMA descriptors' block shapes
                config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
            return self.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            self.nargs = None

    rt_jit.JITFunction.run = run
    rt_autotuner.Autotuner.run = autotuned_run


def _resource_usage(kernel):
    """{'regs': per thread, 'spill_bytes': stores + loads} from the cubin (Triton's bundled
    cuobjdump), or {} when it is not there: a register report without a GPU, for tuning."""
    import shutil
    import tempfile
    from pathlib import Path as P

    import triton
    tool = P(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    tool = str(tool) if tool.exists() else shutil.which("cuobjdump")
    if not tool or "cubin" not in kernel.asm:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(kernel.asm["cubin"])
        fh.flush()
        text = subprocess.run([tool, "--dump-resource-usage", fh.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    spill = re.search(r"STACK:(\d+)", text)
    out = {"regs": int(regs.group(1))} if regs else {}
    if spill:
        out["stack_bytes"] = int(spill.group(1))
    return out


def _probe():
    """None if a trivial kernel compiles to a cubin for TARGET here, else the reason it does not."""
    try:
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        @triton.jit
        def _probe_kernel(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)

        src = ASTSource(_probe_kernel, {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 128})
        kernel = triton.compile(src, target=GPUTarget(*TARGET))
        if "cubin" not in kernel.asm:
            return f"no cubin produced for {TARGET} (stages: {sorted(kernel.asm)})"
    except Exception as e:  # noqa: BLE001 - any failure here means 'cannot compile for the target'
        return f"cannot compile a trivial kernel for {TARGET}: {type(e).__name__}: {e}"
    return None


def compile_report(report_path, launch):
    """Run `launch()` (calls of kernel launchers) with the compile-only launch installed, and write
    {"ok", "error", "kernels"} (or {"skip": reason} when sm_90 cannot be compiled here) as JSON to
    report_path: the body of the sm_90 compile workers."""
    import json
    from pathlib import Path

    reason = _probe()
    if reason is not None:
        Path(report_path).write_text(json.dumps({"skip": reason}))
        return
    log = []
    _install_compile_only_launch(log)
    ok, error = True, None
    try:
        launch()
    except Exception as e:  # noqa: BLE001 - reported to the test
        ok, error = False, f"{type(e).__name__}: {e}"
    Path(report_path).write_text(json.dumps({"ok": ok, "error": error, "kernels": log}))


def run_compile_worker(test_file, tmp_path) -> dict:
    """Run `test_file` as a script (its __main__ calls compile_report) in a fresh interpreter without
    TRITON_INTERPRET and with its own Triton cache; return the report's kernels list. Skips the
    calling test when sm_90 cannot be compiled here; fails it when the worker or a launch failed."""
    import json
    import sys
    from pathlib import Path

    import pytest
    pytest.importorskip("triton")
    test_file = Path(test_file).resolve()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(Path(tmp_path) / "cache")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent), env.get("PYTHONPATH", "")])
    out = Path(tmp_path) / "report.json"
    proc = subprocess.run([sys.executable, str(test_file), str(out)], cwd=Path(__file__).resolve().parents[1],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    if "skip" in report:
        pytest.skip(report["skip"])
    assert report["ok"], report["error"]
    return report["kernels"]
