"""CMSMemory: the Continuous Memory System (SPEC 13, seed cms-memory-update-rule.md sections 2-4).

L+1 levels, fastest first, each with memory M [N_l, d_l], keys K [N_l, d_k], usage u [N_l] and a
decay d_l (d_0 > d_1 > ... > d_L, each in (0, 1)). For t = 1..T:

read   q_t = W_q [s_{t-1}; e_t] + b          alpha_l = softmax(K_l q_t / sqrt(d_k))   c_l = alpha_l^T M_l
       beta = softmax(W_beta [c_0; ...; c_L] + b)         c_t = sum_l beta_l U_l c_l          (output)
write  z_l = tanh(Z_l [s_t; c_{l-1}; e_t] + b)  (no c_{-1})   g_l = sigmoid(w_g . z_l + b)
       v_l = V_l z_l   k_l = K_l z_l   w_l = content | lru | hybrid addressing (usage tracked)
       M_l = (1 - d_l) M_l + g_l w_l v_l^T ,  K_l = (1 - d_l) K_l + g_l w_l k_l^T

e_t is the input x_t; s_t is the seed's fast state: `fast_state` [B, T, d_fast] when given, else x
itself. The read at step t sees the state after step t-1. Every quantity that does not depend on a
level's own state is computed for all t at once (batched GEMMs); the per-level time loop runs in
kernels/cms.py (backend "triton") or as the eager loop of memtrace.reference.cms (backend "torch").
The state goes in and comes out (CMSState), so chunks of a sequence chain exactly.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .. import _validate as V
from ..reference import cms as R

__all__ = ["CMSMemory", "CMSState"]


class CMSState(NamedTuple):
    """Per level (tuples, fastest first): memory [B, N, d], keys [B, N, d_k], usage [B, N]; and
    fast [B, d_fast], the last fast state (the next chunk's s_{t-1})."""
    memory: tuple
    keys: tuple
    usage: tuple
    fast: torch.Tensor


def _check_levels(levels):
    if isinstance(levels, (str, bytes)) or not hasattr(levels, "__len__") or len(levels) < 1:
        raise ValueError("levels must be a non-empty list of (slots, dim, decay) tuples")
    out = []
    for i, lv in enumerate(levels):
        if not hasattr(lv, "__len__") or len(lv) != 3:
            raise ValueError(f"levels[{i}] must be a (slots, dim, decay) tuple, got {lv!r}")
        n = V.check_int(f"levels[{i}] slots", lv[0], low=1)
        d = V.check_int(f"levels[{i}] dim", lv[1], low=1)
        decay = V.check_float(f"levels[{i}] decay", lv[2])
        if not 0.0 < decay < 1.0:
            raise ValueError(f"levels[{i}] decay must be in (0, 1), got {decay}")
        if out and decay >= out[-1][2]:
            raise ValueError(f"levels decays must decrease from the fastest level to the slowest "
                             f"(d_0 > d_1 > ...), got levels[{i - 1}] decay {out[-1][2]} <= levels[{i}] decay {decay}")
        out.append((n, d, decay))
    return tuple(out)


class _ScanTriton(torch.autograd.Function):
    """One level's time loop on kernels/cms.py: outputs (c, M, K, u); u is not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, g, M, K, u, decay, mode, hybrid):
        from ..kernels import cms as KC
        dt = torch.float64 if M.dtype == torch.float64 else torch.float32
        args = [t.detach().to(dt).contiguous() for t in (q, k, v, g, M, K, u)]
        chunk = KC.default_chunk(q.shape[1]) if ctx.needs_input_grad[:6].count(True) else 0
        c, M1, K1, u1, ck = KC.cms_scan_fwd(*args, decay, mode, hybrid, chunk=chunk)
        if chunk:
            ctx.save_for_backward(*args[:4], *ck)
        ctx.conf = (decay, mode, hybrid, chunk, [t.dtype for t in (q, k, v, g, M, K)])
        ctx.mark_non_differentiable(u1)
        return c, M1, K1, u1

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dc, dM, dK, du):
        from ..kernels import cms as KC
        decay, mode, hybrid, chunk, dtypes = ctx.conf
        q, k, v, g, ckm, ckk, cku = ctx.saved_tensors
        B, T, _ = q.shape
        N, D, DK = ckm.shape[2], ckm.shape[3], q.shape[2]
        z = lambda t, *shape: torch.zeros(*shape, dtype=q.dtype, device=q.device) if t is None \
            else t.to(q.dtype).contiguous()
        grads = KC.cms_scan_bwd(q, k, v, g, (ckm, ckk, cku), z(dc, B, T, D), z(dM, B, N, D), z(dK, B, N, DK),
                                decay, mode, hybrid, chunk=chunk)
        grads = [gr.to(dt) for gr, dt in zip(grads, dtypes)]
        return (*grads, None, None, None, None)


class CMSMemory(nn.Module):
    """`CMSMemory(d_model, levels, d_key, addressing="content", d_context=None)`; `forward(x [B, T, d_model],
    state=None, *, fast_state=None) -> (context [B, T, d_context], CMSState)`.

    levels: [(slots N_l, dim d_l, decay d_l), ...] fastest first (decays strictly decreasing, in (0, 1)).
    addressing: "content" (softmax over keys), "lru" (the least-used slot) or "hybrid"
    (hybrid_weight * content + (1 - hybrid_weight) * lru). d_event: width of the event signal z
    (default d_key); d_fast: width of the fast state (default d_model). backend: "auto" (Triton on
    CUDA, the eager loop elsewhere), "triton" or "torch".
    """

    def __init__(self, d_model: int, levels, d_key: int, addressing: str = "content", d_context: int | None = None,
                 *, d_event: int | None = None, d_fast: int | None = None, hybrid_weight: float = 0.5,
                 backend: str = "auto"):
        super().__init__()
        self.d_model = V.check_int("d_model", d_model, low=1)
        self.levels = _check_levels(levels)
        self.d_key = V.check_int("d_key", d_key, low=1)
        self.addressing = V.check_choice("addressing", addressing, R.MODES)
        self.d_context = V.check_int("d_context", d_model if d_context is None else d_context, low=1)
        self.d_event = V.check_int("d_event", d_key if d_event is None else d_event, low=1)
        self.d_fast = V.check_int("d_fast", d_model if d_fast is None else d_fast, low=1)
        self.hybrid_weight = V.check_rate("hybrid_weight", hybrid_weight)
        self.backend = V.check_choice("backend", backend, ("auto", "triton", "torch"))
        dims = [d for _, d, _ in self.levels]
        self.query = nn.Linear(self.d_fast + d_model, d_key)
        self.events = nn.ModuleList(
            nn.Linear(self.d_fast + (dims[i - 1] if i else 0) + d_model, self.d_event) for i in range(len(dims)))
        self.gates = nn.ModuleList(nn.Linear(self.d_event, 1) for _ in dims)
        self.values = nn.ModuleList(nn.Linear(self.d_event, d, bias=False) for d in dims)
        self.keys = nn.ModuleList(nn.Linear(self.d_event, d_key, bias=False) for _ in dims)
        # distinct initial keys: with equal keys content addressing writes every slot alike forever
        self.init_keys = nn.ParameterList(nn.Parameter(torch.randn(n, d_key)) for n, _, _ in self.levels)
        self.mix = nn.Linear(sum(dims), len(dims))
        self.projs = nn.ModuleList(nn.Linear(d, self.d_context, bias=False) for d in dims)

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def initial_state(self, batch: int, *, dtype=None, device=None) -> CMSState:
        """M = 0, K = the learned initial keys, u = 0, fast = 0."""
        p = {f"init_keys.{i}": k for i, k in enumerate(self.init_keys)}
        return CMSState(*R.cms_initial_state(p, self.levels, batch, self.d_fast, dtype=dtype, device=device))

    def _check_input(self, x, state, fast_state):
        V.check_tensor("x", x, ndim=3, floating=True)
        if x.shape[-1] != self.d_model or x.shape[1] < 1:
            raise ValueError(f"x must have shape [B, T >= 1, {self.d_model}], got {tuple(x.shape)}")
        B, T = x.shape[:2]
        if fast_state is not None:
            V.check_tensor("fast_state", fast_state, ndim=3, floating=True)
            V.check_same_device(x=x, fast_state=fast_state)
            if tuple(fast_state.shape) != (B, T, self.d_fast):
                raise ValueError(f"fast_state must have shape {(B, T, self.d_fast)}, got {tuple(fast_state.shape)}")
        if state is None:
            return
        if not isinstance(state, tuple) or len(state) != 4:
            raise ValueError("state must be the CMSState (memory, keys, usage, fast) a previous call returned")
        L = self.num_levels
        for name, part in zip(("memory", "keys", "usage"), state[:3]):
            if not isinstance(part, (tuple, list)) or len(part) != L:
                raise ValueError(f"state.{name} must hold {L} tensors (one per level), "
                                 f"got {len(part) if hasattr(part, '__len__') else type(part).__name__}")
        for i, (n, d, _) in enumerate(self.levels):
            for name, t, shape in (("memory", state[0][i], (B, n, d)),
                                   ("keys", state[1][i], (B, n, self.d_key)), ("usage", state[2][i], (B, n))):
                V.check_tensor(f"state.{name}[{i}]", t, floating=True)
                V.check_same_device(x=x, **{f"state.{name}[{i}]": t})
                if tuple(t.shape) != shape:
                    raise ValueError(f"state.{name}[{i}] must have shape {shape}, got {tuple(t.shape)}")
        V.check_tensor("state.fast", state[3], floating=True)
        if tuple(state[3].shape) != (B, self.d_fast):
            raise ValueError(f"state.fast must have shape {(B, self.d_fast)}, got {tuple(state[3].shape)}")

    def _use_triton(self, x) -> bool:
        return self.backend == "triton" or (self.backend == "auto" and x.is_cuda)

    def _scan(self, x, q, k, v, g, M, K, u, decay):
        if self._use_triton(x):
            return _ScanTriton.apply(q, k, v, g, M, K, u, decay, self.addressing, self.hybrid_weight)
        return R.cms_scan(q, k, v, g, M, K, u, decay, self.addressing, self.hybrid_weight)

    def forward(self, x, state: CMSState | None = None, *, fast_state=None):
        self._check_input(x, state, fast_state)
        B = x.shape[0]
        s = x if fast_state is None else fast_state
        if state is None:
            state = self.initial_state(B, dtype=x.dtype, device=x.device)
        mem, keys, usage, fast = state
        q = self.query(torch.cat([torch.cat([fast[:, None].to(s.dtype), s[:, :-1]], 1), x], -1))
        ctx, out = [], ([], [], [])
        for i, (_, _, decay) in enumerate(self.levels):
            z = torch.tanh(self.events[i](torch.cat([s, x] if i == 0 else [s, ctx[-1], x], -1)))
            g = torch.sigmoid(self.gates[i](z)).squeeze(-1)
            c, M, K, u = self._scan(x, q, self.keys[i](z), self.values[i](z), g, mem[i], keys[i], usage[i], decay)
            ctx.append(c.to(x.dtype))
            for lst, val in zip(out, (M, K, u)):
                lst.append(val)
        beta = torch.softmax(self.mix(torch.cat(ctx, -1)), -1)
        context = sum(beta[..., i:i + 1] * proj(c) for i, (proj, c) in enumerate(zip(self.projs, ctx)))
        return context, CMSState(tuple(out[0]), tuple(out[1]), tuple(out[2]), s[:, -1])

    def norm_bound(self, level: int, m0_norm: float, v_max: float) -> float:
        """Seed Theorem 1 for one level: ||M_t||_F <= max(||M_0||_F, V_max sqrt(N) / d)."""
        n, _, decay = self.levels[level]
        return R.cms_norm_bound(m0_norm, v_max, n, decay)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, levels={list(self.levels)}, d_key={self.d_key}, "
                f"addressing={self.addressing!r}, d_context={self.d_context}, backend={self.backend!r}")

