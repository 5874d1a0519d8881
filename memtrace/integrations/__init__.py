"""memtrace.integrations: memtrace inside other libraries' models (SPEC 9).

- `memtrace.integrations.hf`: Hugging Face transformers (>= 5.17): `attach(model, mgr)` routes the
  model's attention through a `memtrace.Memtrace` manager, `MemtraceCallback` / `MemtraceTrainer`
  for `transformers.Trainer`, `save_memtrace` / `load_memtrace` beside `save_pretrained`.
  Needs the optional extra: `pip install memtrace[hf]`.
- `memtrace.integrations.moe`: the routers and experts of mixture-of-experts blocks (Mixtral,
  Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-style), used by `hf.attach`.

Submodules load on first use: importing memtrace (or this package) never imports transformers.
"""
from importlib import import_module

_SUBMODULES = ("hf", "moe")

__all__ = list(_SUBMODULES)


def __getattr__(name):
    if name not in _SUBMODULES:
        raise AttributeError(f"module 'memtrace.integrations' has no attribute {name!r}")
    value = import_module(f"memtrace.integrations.{name}")
    globals()[name] = value
    return value


def __dir__():
    return __all__
