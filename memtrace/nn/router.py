"""StatefulRouter: the stateful mixture-of-memories router (SPEC 14, seed mixture-of-memories.md).

    R(q, u) = alpha sim(q, u) + beta exp(-lambda (t - t_last(u))) + gamma log(1 + n_act(u))

sim is the dot product of q with the unit's learned embedding (a linear gate's weight row; or the
rows of `units=` given to forward, e.g. a CMS level's keys). Top-k of R, softmax weights over the
selected. The state lives in buffers on the module's device: `t` (the step, int64, +1 per call),
`t_last` (int64, -1 = never selected) and `n_act` (float counts); they are updated after each call
with tensor ops only (no .item(), no host sync). With beta = gamma = 0 (and no options) it is the
linear top-k gate (the seed's Theorem 1).

Options (seed "Novel routing strategies"): `balance` (load-balancing boost
balance * importance(u) * (1 - n_act(u) / max n_act), `importance` a buffer of ones), `dropout`
(training only: unit u is left out of a token's selection with probability
dropout * n_act(u) / max n_act, so the much-used units make room for others), `num_domains`
(hierarchical: a domain router picks `domain_k` of num_domains contiguous groups of units, the
unit router picks the top-k inside them; a unit's score adds its domain's score), and
`entropy_threshold` (the selection-entropy monitor: `selection_entropy` holds H of the last call's
selection frequencies, `entropy_alert` whether it fell under the threshold; `check_entropy()` reads
them on the host and warns).

Backends (`backend=`): "auto" (the fused Triton route of kernels/router.py for CUDA inputs, the
PyTorch path elsewhere), "triton" (the fused route wherever it applies; on the CPU through the
Triton interpreter) or "torch". The fused route is the MoE-gate case: no domains, no dropout while
training, x and units fp16 / bf16 / fp32, at most kernels.router.MAX_UNITS units and MAX_K picks;
any other call takes the PyTorch path. It is two launches (route + state update) against the
PyTorch path's ~25 (issue 26): one kernel computes the scores, the top-k (exact ties: the lowest unit index),
the softmax weights and the per-unit counts; a one-program kernel applies the counts to the state.
Its scores are fp32 whatever x's dtype (the PyTorch path rounds them to x's dtype), so at fp16 /
bf16 the two paths may pick differently among units whose scores lie within that rounding. Under
autograd its weights are differentiable in x and units (first order: `_FusedRoute`).
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .. import _validate as V
from .. import config

__all__ = ["StatefulRouter"]

BACKENDS = ("auto", "triton", "torch")


class _FusedRoute(torch.autograd.Function):
    """The fused route with weights differentiable in x and units. Backward: dR on the selected
    (softmax backward) scattered into a dense G [N, U], then dx = alpha G units, dunits = alpha G^T x
    (the two GEMMs a linear gate's backward does); the state terms carry no gradient."""

    @staticmethod
    def forward(ctx, x, units, state, counts, k, params):
        from ..kernels import router as KR
        w, idx = KR.route(x, units, *state, k, counts, **params)
        ctx.save_for_backward(x, units, w, idx)
        ctx.alpha = params["alpha"]
        ctx.mark_non_differentiable(idx)
        return w, idx

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dw, _didx):
        x, units, w, idx = ctx.saved_tensors
        wf, dwf = w.float(), dw.float()
        g = wf * (dwf - (wf * dwf).sum(-1, keepdim=True))
        # scatter_add: rows of idx are distinct, but add stays right even if a NaN row repeated one
        G = torch.zeros(x.shape[0], units.shape[0], dtype=x.dtype, device=x.device).scatter_add_(
            1, idx, (ctx.alpha * g).to(x.dtype))
        dx = G @ units.to(x.dtype) if ctx.needs_input_grad[0] else None
        du = (G.T @ x).to(units.dtype) if ctx.needs_input_grad[1] else None
        return dx, du, None, None, None, None


class StatefulRouter(nn.Module):
    """`StatefulRouter(d_model, num_units, k, alpha=1.0, beta=0.0, gamma=0.0, decay=0.1, ...)`;
    `router(x [N, d_model], units=None) -> (weights [N, k], indices [N, k] int64)`."""

    def __init__(self, d_model: int, num_units: int, k: int, alpha: float = 1.0, beta: float = 0.0,
                 gamma: float = 0.0, decay: float = 0.1, *, balance: float = 0.0, dropout: float = 0.0,
                 num_domains: int | None = None, domain_k: int = 1, entropy_threshold: float | None = None,
                 update_state: bool = True, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.d_model = V.check_int("d_model", d_model, low=1)
        self.num_units = V.check_int("num_units", num_units, low=1)
        self.k = V.check_int("k", k, low=1, high=num_units)
        self.alpha = V.check_float("alpha", alpha)
        self.beta = V.check_float("beta", beta)
        self.gamma = V.check_float("gamma", gamma)
        self.decay = V.check_float("decay", decay, low=0.0)
        self.balance = V.check_float("balance", balance)
        self.dropout = V.check_float("dropout", dropout, low=0.0, high=1.0)
        self.update_state = V.check_bool("update_state", update_state)
        self.backend = V.check_choice("backend", backend, BACKENDS)
        self.entropy_threshold = (None if entropy_threshold is None
                                  else V.check_float("entropy_threshold", entropy_threshold, low=0.0))
        kw = {"device": device, "dtype": dtype}
        self.units = nn.Parameter(torch.randn(num_units, d_model, **kw) / math.sqrt(d_model))
        self.num_domains = None
        if num_domains is not None:
            self.num_domains = V.check_int("num_domains", num_domains, low=1, high=num_units)
            if num_units % self.num_domains:
                raise ValueError(f"num_domains must divide num_units ({num_units}), got {num_domains}")
            self.domain_k = V.check_int("domain_k", domain_k, low=1, high=self.num_domains)
            if k > self.domain_k * (num_units // self.num_domains):
                raise ValueError(f"k ({k}) must be <= domain_k * units per domain "
                                 f"({self.domain_k} * {num_units // self.num_domains})")
            self.domain_router = nn.Linear(d_model, self.num_domains, bias=False, **kw)
            self.register_buffer("domains", torch.arange(num_units, device=device) // (num_units // self.num_domains))
        self.register_buffer("t", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("t_last", torch.full((num_units,), -1, dtype=torch.int64, device=device))
        self.register_buffer("n_act", torch.zeros(num_units, device=device))
        self.register_buffer("importance", torch.ones(num_units, device=device))
        self.register_buffer("selection_entropy", torch.zeros((), device=device))
        self.register_buffer("entropy_alert", torch.zeros((), dtype=torch.bool, device=device))
        # the fused route's per-unit selection counts: zero between calls (its update kernel clears them)
        self.register_buffer("route_counts", torch.zeros(num_units, dtype=torch.int32, device=device),
                             persistent=False)

    def reset_state(self) -> None:
        """Forget the history: t = 0, every unit never selected."""
        with torch.no_grad():
            self.t.zero_()
            self.t_last.fill_(-1)
            self.n_act.zero_()
            self.selection_entropy.zero_()
            self.entropy_alert.zero_()

    def scores(self, x, units=None):
        """R [N, U] (with the load-balancing boost; before domains and dropout)."""
        units = self.units if units is None else units
        R = self.alpha * (x @ units.T.to(x.dtype))
        if self.beta:
            recency = torch.exp((self.t_last - self.t).to(x.dtype) * self.decay)
            R = R + self.beta * torch.where(self.t_last >= 0, recency, torch.zeros_like(recency))
        if self.gamma:
            R = R + self.gamma * torch.log1p(self.n_act.to(x.dtype))
        if self.balance:
            n_act = self.n_act.to(x.dtype)
            share = n_act / n_act.max().clamp_min(1.0)
            R = R + self.balance * self.importance.to(x.dtype) * (1.0 - share)
        return R

    def forward(self, x, units=None):
        V.check_tensor("x", x, ndim=2, floating=True)
        if x.shape[1] != self.d_model:
            raise ValueError(f"x must have shape [N, {self.d_model}], got {tuple(x.shape)}")
        if units is not None:
            V.check_tensor("units", units, ndim=2, floating=True)
            V.check_same_device(x=x, units=units)
            if tuple(units.shape) != (self.num_units, self.d_model):
                raise ValueError(f"units must have shape {(self.num_units, self.d_model)}, got {tuple(units.shape)}")
        if self._use_fused(x, units):
            return self._route_fused(x, units)
        R = self.scores(x, units)
        key = R
        if self.num_domains is not None:
            dom = self.domain_router(x)                                         # [N, n_domains]
            top = torch.topk(dom, self.domain_k, dim=-1).indices
            allowed = (self.domains[None, :, None] == top[:, None, :]).any(-1)
            R = R + dom[:, self.domains]
            key = torch.where(allowed, R, float("-inf"))
        if self.training and self.dropout > 0:
            share = self.n_act / self.n_act.max().clamp_min(1.0)
            drop = torch.rand(x.shape[0], self.num_units, device=x.device) < self.dropout * share
            key = torch.where(drop, float("-inf"), key)
        idx = torch.topk(key.detach(), self.k, dim=-1).indices
        weights = torch.softmax(R.gather(1, idx), dim=-1)
        if self.update_state:
            self._update(idx)
        return weights, idx

    def _use_fused(self, x, units) -> bool:
        if self.backend == "torch" or (self.backend == "auto" and not x.is_cuda):
            return False
        if self.num_domains is not None or (self.training and self.dropout > 0) or x.device != self.t.device:
            return False
        from ..kernels import router as KR
        return KR.supports(x, self.units if units is None else units, self.k)

    def _route_fused(self, x, units):
        from ..kernels import router as KR
        config.settings()           # the kernel knobs come from the environment's parse
        units = self.units if units is None else units
        counts = self.route_counts if self.update_state else None
        state = (self.t, self.t_last, self.n_act, self.importance)
        params = {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma, "decay": self.decay,
                  "balance": self.balance}
        try:
            if torch.is_grad_enabled() and (x.requires_grad or units.requires_grad):
                w, idx = _FusedRoute.apply(x, units, state, counts, self.k, params)
            else:
                w, idx = KR.route(x, units, *state, self.k, counts, **params)
            if counts is not None:
                KR.update_state(counts, self.t, self.t_last, self.n_act, self.selection_entropy,
                                self.entropy_alert, self.entropy_threshold)
        except BaseException:
            self.route_counts.zero_()      # the update did not run: it did not clear the counts
            raise
        return w, idx

    @torch.no_grad()
    def _update(self, idx) -> None:
        flat = idx.reshape(-1)
        # not bincount: on CUDA it reads the largest index on the host to size its output
        counts = torch.zeros(self.num_units, dtype=torch.long, device=idx.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        self.t_last.copy_(torch.where(counts > 0, self.t, self.t_last))
        self.n_act.add_(counts.to(self.n_act.dtype))
        p = counts.to(torch.float32) / counts.sum().clamp_min(1)
        self.selection_entropy.copy_(-(p * torch.log(p.clamp_min(1e-30))).sum())
        if self.entropy_threshold is not None:
            self.entropy_alert.copy_(self.selection_entropy < self.entropy_threshold)
        self.t.add_(1)

    def check_entropy(self) -> float:
        """The last selection entropy on the host (one sync); warns when under entropy_threshold."""
        h = float(self.selection_entropy)
        if self.entropy_threshold is not None and h < self.entropy_threshold:
            warnings.warn(f"StatefulRouter selection entropy {h:.3f} < entropy_threshold "
                          f"{self.entropy_threshold} (routing may be collapsing onto few units)", stacklevel=2)
        return h

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_units={self.num_units}, k={self.k}, alpha={self.alpha}, "
                f"beta={self.beta}, gamma={self.gamma}, decay={self.decay}, backend={self.backend!r}")
