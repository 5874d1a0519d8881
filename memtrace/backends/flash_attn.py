"""The "flash_attn" backend: the optional flash-attn package for the dense part, then the
standalone sparse correction."""
from __future__ import annotations

import torch

from .base import CorrectedDenseBackend, cuda_capability, lse_to_bht


class FlashAttnBackend(CorrectedDenseBackend):
    """The flash-attn package (optional). Layout [B, T, H, D]; bottom-right causal; GQA."""

    name = "flash_attn"
    max_head_dim = 256
    supports_causal_unequal = True
    _api = None

    @classmethod
    def _load(cls):
        if cls._api is None:
            try:
                import inspect

                from flash_attn import flash_attn_interface as fai
                fwd, bwd = fai._flash_attn_forward, fai._flash_attn_backward
                fwd_params = set(inspect.signature(fwd).parameters)
                bwd_params = set(inspect.signature(bwd).parameters)
                need_fwd = {"q", "k", "v", "dropout_p", "softmax_scale", "causal"}
                need_bwd = {"dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv", "dropout_p",
                            "softmax_scale", "causal"}
                if not need_fwd <= fwd_params or not need_bwd <= bwd_params:
                    cls._api = (None, "flash-attn's _flash_attn_forward/_backward have a signature memtrace "
                                      "does not know")
                else:
                    cls._api = ((fwd, fwd_params, bwd, bwd_params), None)
            except Exception as exc:
                cls._api = (None, f"the flash-attn package is not importable ({type(exc).__name__}: {exc})")
        return cls._api

    def _dense_reasons(self, call):
        err = self._load()[1]
        if err:
            return [err]
        if cuda_capability(call.device) < (8, 0):
            return ["flash-attn needs compute capability 8.0 or newer"]
        return []

    @staticmethod
    def _window_kwargs(params):
        if "window_size_left" in params:
            return {"window_size_left": -1, "window_size_right": -1}
        if "window_size" in params:
            return {"window_size": (-1, -1)}
        return {}

    def dense_forward(self, q, k, v, *, causal, scale):
        fwd, params = self._load()[0][:2]
        kwargs = self._window_kwargs(params)
        for name, value in (("softcap", 0.0), ("alibi_slopes", None), ("return_softmax", False)):
            if name in params:
                kwargs[name] = value
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        qt, kt, vt = (t if t.stride(-1) == 1 else t.contiguous() for t in (qt, kt, vt))
        res = fwd(qt, kt, vt, dropout_p=0.0, softmax_scale=scale, causal=causal, **kwargs)
        # 2.7+: (out, lse, S_dmask, rng_state); 2.4-2.6: (out, q, k, v, out_padded, lse, S_dmask, rng_state)
        out, lse = (res[0], res[1]) if len(res) == 4 else (res[0], res[5])
        return out.transpose(1, 2), lse_to_bht(lse, q.shape[:3])

    def dense_backward(self, q, k, v, out, lse, dout, *, causal, scale):
        bwd, params = self._load()[0][2:]
        kwargs = self._window_kwargs(params)
        for name, value in (("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("rng_state", None)):
            if name in params:
                kwargs[name] = value
        qt, kt, vt, ot, dot = (t.transpose(1, 2) for t in (q, k, v, out, dout))
        qt, kt, vt, ot, dot = (t.contiguous() for t in (qt, kt, vt, ot, dot))
        dq, dk, dv = torch.empty_like(qt), torch.empty_like(kt), torch.empty_like(vt)
        bwd(dot, qt, kt, vt, ot, lse.contiguous(), dq, dk, dv, dropout_p=0.0, softmax_scale=scale, causal=causal,
            **kwargs)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
