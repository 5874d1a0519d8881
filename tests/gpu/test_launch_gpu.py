"""kernels/launch.py on CUDA: fast relaunches (tensors passed as addresses) give the results of
Triton's own launch, and a CPU tensor still gets Triton's error instead of a bad address."""
import pytest
import torch
from _helpers import launch_probe
from memtrace.kernels.launch import FastLaunch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_fast_relaunches_match_triton_and_refuse_cpu_tensors():
    launch = FastLaunch(launch_probe)
    base = torch.arange(40, dtype=torch.float32, device="cuda")
    for step in range(12):
        off = step % 3                  # aligned and misaligned starts: separate kinds
        x = base[off:off + 16]
        y = torch.full((16,), -7.0, device="cuda")
        n, m, f = (5, 16)[step % 2], step, (0.5, 2.0)[step % 2]
        launch[(1,)](x, y, n, m, f, True, None, BLOCK=16, num_warps=4)
        want = torch.where(torch.arange(16, device="cuda") < n, x * f + m, torch.tensor(-7.0, device="cuda"))
        assert torch.equal(y, want), step
    assert len(launch._compiled) >= 2
    with pytest.raises(ValueError, match="cpu tensor"):
        launch[(1,)](base[:16], torch.zeros(16), 5, 0, 1.0, True, None, BLOCK=16, num_warps=4)
