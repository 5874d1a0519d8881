"""A tiny hand-written 2-layer attention model on mt.nn.TraceAttention, and a loop step, shared by
the manager tests."""
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import memtrace as mt

VOCAB, H, D, T = 11, 2, 16, 16


class TinyModel(nn.Module):
    def __init__(self, mgr, layers=2, ckpt=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(VOCAB, H * D)
        self.qkv = nn.ModuleList(nn.Linear(H * D, 3 * H * D) for _ in range(layers))
        self.att = nn.ModuleList(mt.nn.TraceAttention(mgr, i) for i in range(layers))
        self.out = nn.Linear(H * D, VOCAB)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.ckpt = ckpt

    def forward(self, x, key_padding_mask=None):
        h = self.emb(x)
        B, Tn, _ = h.shape
        for qkv, att in zip(self.qkv, self.att):
            q, k, v = qkv(h).view(B, Tn, 3, H, D).permute(2, 0, 3, 1, 4)
            if self.ckpt:
                o = checkpoint(lambda q, k, v, att=att: att(q, k, v, key_padding_mask=key_padding_mask), q, k, v,
                               use_reentrant=False)
            else:
                o = att(q, k, v, key_padding_mask=key_padding_mask)
            h = h + o.transpose(1, 2).reshape(B, Tn, -1)
        return self.out(h)


def token_losses(model, x):
    logits = model(x)
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1), reduction="none")


def batch(step, B=2, Tn=T, seed=0):
    g = torch.Generator().manual_seed(1000 * seed + step)
    return torch.randint(0, VOCAB, (B, Tn), generator=g)


def short_config(**kw):
    """Defaults except a short schedule: captures from step 0 every 2 steps, bias from step 2."""
    base = dict(update_interval=2, warmup_steps=0, phase_starts=(0, 2, None, None))
    base.update(kw)
    return mt.MemtraceConfig(**base)


def memory_state(mgr):
    mem = mgr.memory()
    return mem.strength.clone(), mem.meta.clone()


def assert_same_memory(a, b, rtol=1e-5, atol=1e-7):
    """Same stored traces (positions, ages, histories) and strengths within tolerance."""
    (sa, ma), (sb, mb) = memory_state(a), memory_state(b)
    assert torch.equal(sa >= 0, sb >= 0)
    assert torch.equal(ma, mb)
    torch.testing.assert_close(sa, sb, rtol=rtol, atol=atol)
