"""Elastic weight consolidation with a diagonal Fisher (SPEC 9; seeds/semantic-crystallization-plan.md,
"Stability Safeguards"; Kirkpatrick et al. 2017):

    L_EWC = sum_i (lambda / 2) * F_i * (theta_i - theta*_i)^2

F_i is estimated as the running mean of the squared gradient of parameter i over the steps where
`accumulate` is called (the manager calls it on capture steps, after backward: the empirical
Fisher of the training loss). `consolidate()` snapshots theta*, the weights the penalty then
holds the model near, in proportion to how much the loss depended on each of them.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _validate as V

__all__ = ["EWC"]


class EWC:
    """Diagonal-Fisher EWC over a fixed set of named parameters.

    EWC(params, weight=1.0): params is an nn.Module (its parameters that require grad) or an
    iterable of (name, parameter) pairs; weight is lambda >= 0.
      accumulate(model=None)  after backward: F <- F + (grad^2 - F) / n for every tracked
                              parameter (a parameter without .grad counts as a zero gradient);
                              `model` (an nn.Module, looked up by name) defaults to the tracked
                              parameters themselves
      consolidate()           theta* <- the current values (F is kept)
      loss(model=None)        the penalty (0-d tensor, float32 at least); 0 before the first
                              consolidate, still attached to the parameters' graph
      state_dict() / load_state_dict(sd)   tensors only: fisher.<name>, anchor.<name>, count, weight
    """

    def __init__(self, params, weight: float = 1.0):
        self.weight = V.check_float("weight", weight, low=0.0)
        if isinstance(params, nn.Module):
            named = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
        else:
            if isinstance(params, (str, bytes, torch.Tensor)) or not hasattr(params, "__iter__"):
                raise TypeError(f"params must be an nn.Module or an iterable of (name, parameter) pairs, "
                                f"got {type(params).__name__}")
            named = list(params)
        self._params: dict[str, torch.Tensor] = {}
        for i, item in enumerate(named):
            if not isinstance(item, tuple) or len(item) != 2:
                raise TypeError(f"params[{i}] must be a (name, parameter) pair, got {type(item).__name__}")
            name, p = item
            if not isinstance(name, str):
                raise TypeError(f"params[{i}] name must be a str, got {type(name).__name__}")
            V.check_tensor(f"params[{name!r}]", p, floating=True)
            if name in self._params:
                raise ValueError(f"params names must be unique, {name!r} appears twice")
            self._params[name] = p
        self.fisher = {n: torch.zeros_like(p, dtype=_acc_dtype(p), memory_format=torch.contiguous_format)
                       for n, p in self._params.items()}
        self.anchor: dict[str, torch.Tensor] | None = None
        self.count = 0

    @property
    def names(self) -> list[str]:
        return list(self._params)

    def _lookup(self, model) -> dict[str, torch.Tensor]:
        if model is None:
            return self._params
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        found = dict(model.named_parameters())
        missing = [n for n in self._params if n not in found]
        if missing:
            raise ValueError(f"model lacks the tracked parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        for n, p in self._params.items():
            if found[n].shape != p.shape:
                raise ValueError(f"model parameter {n!r} has shape {tuple(found[n].shape)}, tracked {tuple(p.shape)}")
        return {n: found[n] for n in self._params}

    @torch.no_grad()
    def accumulate(self, model=None) -> None:
        """Fold the current gradients into the running-mean Fisher diagonal (call after backward)."""
        params = self._lookup(model)
        self.count += 1
        for n, p in params.items():
            f = self.fisher[n]
            if p.grad is None:
                f.mul_(1.0 - 1.0 / self.count)
            else:
                f.add_((p.grad.to(f.dtype).square() - f) / self.count)

    @torch.no_grad()
    def consolidate(self, model=None) -> None:
        """Snapshot theta* from the current parameter values."""
        self.anchor = {n: p.detach().to(_acc_dtype(p)).clone() for n, p in self._lookup(model).items()}

    def loss(self, model=None) -> torch.Tensor:
        """sum_i weight/2 * F_i * (theta_i - theta*_i)^2 over the tracked parameters."""
        params = self._lookup(model)
        total = None
        for n, p in params.items():
            if self.anchor is None:
                term = p.reshape(-1)[:0].sum().to(_acc_dtype(p))     # 0, attached to p
            else:
                term = (self.fisher[n] * (p.to(self.fisher[n].dtype) - self.anchor[n]).square()).sum()
            total = term if total is None else total + term.to(total.dtype)
        if total is None:
            return torch.zeros(())
        return 0.5 * self.weight * total

    def state_dict(self) -> dict:
        sd = {f"fisher.{n}": f.detach().clone() for n, f in self.fisher.items()}
        if self.anchor is not None:
            sd.update({f"anchor.{n}": a.detach().clone() for n, a in self.anchor.items()})
        sd["count"] = torch.tensor(self.count, dtype=torch.int64)
        sd["weight"] = torch.tensor(self.weight, dtype=torch.float64)
        return sd

    def load_state_dict(self, sd: dict) -> None:
        """Restore a state_dict of an EWC over the same names and shapes; validated in full
        before anything changes (a bad state leaves this object as it was)."""
        if not isinstance(sd, dict):
            raise TypeError(f"state_dict must be a dict, got {type(sd).__name__}")
        expected = {f"fisher.{n}" for n in self._params} | {"count", "weight"}
        anchors = {f"anchor.{n}" for n in self._params}
        keys = set(sd)
        has_anchor = bool(keys & anchors)
        if has_anchor:
            expected |= anchors
        if keys != expected:
            raise ValueError(f"state_dict keys do not match this EWC: missing {sorted(expected - keys)[:5]}, "
                             f"unexpected {sorted(keys - expected)[:5]}")
        for key in keys:
            V.check_tensor(f"state_dict[{key!r}]", sd[key])
        count = sd["count"]
        if count.numel() != 1 or count.dtype.is_floating_point or int(count) < 0:
            raise ValueError("state_dict['count'] must be one integer >= 0")
        weight = V.check_float("state_dict['weight']", float(sd["weight"]) if sd["weight"].numel() == 1 else None,
                               low=0.0)
        for n, p in self._params.items():
            for kind in ("fisher", "anchor") if has_anchor else ("fisher",):
                t = sd[f"{kind}.{n}"]
                if t.shape != p.shape:
                    raise ValueError(f"state_dict['{kind}.{n}'] has shape {tuple(t.shape)}, parameter {tuple(p.shape)}")
                if not t.dtype.is_floating_point:
                    raise TypeError(f"state_dict['{kind}.{n}'] must be floating point, got {t.dtype}")
                V.check_finite(f"state_dict['{kind}.{n}']", t)
        self.fisher = {n: sd[f"fisher.{n}"].to(device=p.device, dtype=_acc_dtype(p), copy=True)
                       for n, p in self._params.items()}
        self.anchor = ({n: sd[f"anchor.{n}"].to(device=p.device, dtype=_acc_dtype(p), copy=True)
                        for n, p in self._params.items()} if has_anchor else None)
        self.count = int(count)
        self.weight = weight


def _acc_dtype(p: torch.Tensor) -> torch.dtype:
    """Fisher and anchors are kept in float32 at least (squared 16-bit gradients underflow)."""
    return torch.promote_types(p.dtype, torch.float32)
