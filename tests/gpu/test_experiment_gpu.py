"""The experiment's shapes on CUDA: float32, head dim 32, T 256, 8 heads, 2048 traces a head.

The kernel against the float64 oracle, then a whole training step's parameter gradients through
the manager (trace loss included), Triton against the reference backend. Written when the traces
arm stalled on the H100 (session 17). The cause turned out to be the trace loss's gradient, not a
kernel, and it stalled on the CPU too. These tests keep the compiled path at these settings covered.
"""
import pytest
import torch
import torch.nn.functional as F
from _helpers import rel_err

import memtrace as mt
from memtrace import config as mt_config
from memtrace.experiment.models import ModelSpec, build_model
from memtrace.experiment.tasks import TaskSpec, make_batch
from memtrace.integrations import hf

B, H, T, D, PER_HEAD = 4, 8, 256, 32, 2048


def _causal_bias(seed):
    g = torch.Generator().manual_seed(seed)
    qi = torch.randint(0, T, (H * PER_HEAD,), generator=g)
    kj = (torch.rand(H * PER_HEAD, generator=g) * (qi + 1).float()).long()
    head = torch.arange(H).repeat_interleave(PER_HEAD)
    value = torch.rand(H * PER_HEAD, generator=g)
    return head, qi, kj, value


@pytest.mark.parametrize("alpha_kind", ["tensor", "float"])
@pytest.mark.parametrize("overlap", ["0", "1"])
def test_triton_fp32_at_the_experiment_shape(alpha_kind, overlap):
    head, qi, kj, value = _causal_bias(1)
    g = torch.Generator().manual_seed(2)
    q, k, v, dout = (torch.randn(B, H, T, D, generator=g) for _ in range(4))
    alpha64 = 0.1 / float(value.max())

    def run(dtype, device, backend, alpha):
        bias = mt.TraceBias(head.to(device), qi.to(device), kj.to(device), value.to(device, dtype),
                            num_heads=H, seq_len_q=T, seq_len_k=T)
        qq, kk, vv = (t.to(device, dtype).requires_grad_() for t in (q, k, v))
        out = mt.biased_attention(qq, kk, vv, bias, causal=True, alpha=alpha, backend=backend)
        out.backward(dout.to(device, dtype))
        return [t.detach().double().cpu() for t in (out, qq.grad, kk.grad, vv.grad)]

    want = run(torch.float64, "cpu", "reference", alpha64)
    alpha = torch.tensor(alpha64, device="cuda") if alpha_kind == "tensor" else alpha64
    with mt_config.override(attn_bwd_overlap=overlap):
        got = run(torch.float32, "cuda", "triton", alpha)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert rel_err(a, b) < 1e-4, f"{name}: {rel_err(a, b):.3g}"


def _loss(model, mgr, ids, labels):
    logits = model(ids)[:, :-1].float()          # next-token loss, as the experiment's runner scores it
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    return loss + mgr.aux_loss().to(loss.device)


def test_biased_training_step_gradients_match_the_reference_backend():
    """The experiment's model (4 layers, d 256, 8 heads, Mixtral MoE, RoPE) attached to a manager:
    step 0 captures (traces stored), step 1 attends with the trace bias (no capture). Step 1's
    parameter gradients under the Triton backend equal those under the reference backend."""
    model = build_model(ModelSpec(), seed=0, device="cuda")
    cfg = mt.MemtraceConfig(update_interval=2, warmup_steps=0, phase_starts=(0, 1, None, None),
                            quota_per_head=PER_HEAD, max_seq_len=T)
    mgr = mt.Memtrace(4, H, num_experts=8, config=cfg, device="cuda")
    handle = hf.attach(model.lm, mgr)
    try:
        gen = torch.Generator().manual_seed(3)
        spec = TaskSpec("copy", seq_len=T, batch_size=8)
        batch = make_batch(spec, gen)
        _loss(model, mgr, batch.input_ids.cuda(), batch.labels.cuda()).backward()
        model.zero_grad(set_to_none=True)
        mgr.step()
        assert mgr.memory().num_traces() > 0
        assert mgr.plan.bias and not mgr.plan.capture
        batch = make_batch(spec, gen)
        grads = {}
        for backend in ("reference", "triton"):
            with mt_config.override(backend=backend):
                _loss(model, mgr, batch.input_ids.cuda(), batch.labels.cuda()).backward()
            grads[backend] = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters()
                              if p.grad is not None}
            model.zero_grad(set_to_none=True)
        assert grads["reference"].keys() == grads["triton"].keys()
        worst = max(((rel_err(grads["triton"][n], grads["reference"][n], 1e-8), n) for n in grads["reference"]))
        assert worst[0] < 1e-3, f"{worst[1]}: {worst[0]:.3g}"
    finally:
        handle.detach()
