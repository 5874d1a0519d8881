"""mt.Memtrace on CUDA (issue 24 point 4): no host sync on a step that neither captures nor records
routing, and the manager's captures store traces on the Triton path."""
import pytest
import torch
import torch.nn.functional as F

import memtrace as mt

H, D, T, B = 4, 64, 128, 2


def _qkv(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            for _ in range(3)]


def _step(mgr, seed):
    q, k, v = _qkv(seed)
    out = mgr.attention(0, q, k, v)
    out = mgr.attention(1, out, k, v)
    loss = F.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32)) + mgr.aux_loss()
    loss.backward()
    return mgr.step()


def test_manager_stores_traces_and_non_capture_step_does_not_sync():
    cfg = mt.MemtraceConfig(update_interval=2, warmup_steps=0, phase_starts=(0, 1, None, None),
                            quota_per_head=256)
    mgr = mt.Memtrace(2, H, config=cfg, device="cuda")
    _step(mgr, 0)                                   # capture
    assert mgr.memory().num_traces(0) > 0 and mgr.memory().num_traces(1) > 0
    assert not mgr.plan.capture and mgr.plan.bias
    _step(mgr, 1)                                   # warm-up of the biased non-capture path
    _step(mgr, 2)                                   # capture
    assert not mgr.plan.capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        metrics = _step(mgr, 3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert metrics["step"] == 3 and metrics["phase"] == "trace_biased"
    assert mgr.alpha(0).device.type == "cuda"


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_calibration_on_cuda(reduction):
    cfg = mt.MemtraceConfig(update_interval=1, warmup_steps=0, phase_starts=(0, None, None, None))
    mgr = mt.Memtrace(1, H, config=cfg, device="cuda")
    q, k, v = _qkv(5)
    out = mgr.attention(0, q, k, v)
    loss = out.float().square()
    (loss.mean() if reduction == "mean" else loss.sum()).backward()
    mgr.step()
    assert mgr.memory().num_traces() > 0


def test_device_cuda_means_the_current_device():
    """device="cuda" and tensors made on it ("cuda:0") are the same device to the manager: routing
    from a model on the GPU is recorded (it was refused: cuda:0 != cuda)."""
    cfg = mt.MemtraceConfig(update_interval=1, warmup_steps=0, phase_starts=(0, None, 0, None))
    mgr = mt.Memtrace(2, H, num_experts=4, config=cfg, device="cuda")
    assert mgr.device == torch.device("cuda", torch.cuda.current_device())
    experts = torch.randint(0, 4, (B, T), device="cuda")
    mgr.record_routing(0, experts)
    mgr.record_routing(1, experts)
    mt.RoutingTree(2, 4, device="cuda").update(experts.reshape(-1, 1).repeat(1, 2))
