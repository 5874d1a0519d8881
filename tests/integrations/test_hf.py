"""memtrace.integrations.hf: transformers models with a memtrace manager attached (SPEC 9).

Tiny random models built here (no downloads), CPU, float32. With an empty memory the model must
compute what `attn_implementation="sdpa"` computes, within SPEC 7 (float32: 1e-5 relative), with
and without padding, under GQA, in greedy generation (dynamic and static caches); detach restores
the model; a few training steps store traces; the Trainer integration steps, logs, saves, resumes.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _helpers import TOL, rel_err  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import memtrace as mt  # noqa: E402
from memtrace.integrations import hf  # noqa: E402
from memtrace.training import MemtraceConfig  # noqa: E402


def _manager_class():
    try:
        return mt.Memtrace
    except (AttributeError, ImportError):
        return None


def _moe_function(name):
    try:
        from memtrace.integrations import moe
    except ImportError:
        return None
    return getattr(moe, name, None)


Memtrace = _manager_class()
needs_manager = pytest.mark.skipif(Memtrace is None, reason="mt.Memtrace (memtrace/training/manager.py) is missing")
needs_moe = pytest.mark.skipif(_moe_function("attach_routers") is None or _moe_function("find_moe_blocks") is None,
                               reason="memtrace.integrations.moe.attach_routers / find_moe_blocks are missing")

VOCAB = 97
F32 = TOL[torch.float32]


def llama(seed=0, **overrides):
    torch.manual_seed(seed)
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64, attn_implementation="sdpa")
    kw.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kw))


def mixtral(seed=0, **overrides):
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(seed)
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, vocab_size=VOCAB, num_local_experts=4, num_experts_per_tok=2,
              max_position_embeddings=64, attn_implementation="sdpa")
    kw.update(overrides)
    return MixtralForCausalLM(MixtralConfig(**kw))


def manager_for(model, **config):
    cfg = model.config
    mt_config = MemtraceConfig(**config) if config else None
    experts = getattr(cfg, "num_local_experts", None)
    return Memtrace(cfg.num_hidden_layers, cfg.num_attention_heads, num_experts=experts, config=mt_config)


def batch(B=2, T=8, pad=None, seed=1):
    """input_ids [B, T] and attention_mask (None, or 'left' / 'right': row 0 padded by 3)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    if pad is None:
        return ids, None
    mask = torch.ones(B, T, dtype=torch.long)
    if pad == "left":
        mask[0, :3] = 0
    else:
        mask[0, -3:] = 0
    return ids, mask


def forward_and_grads(model, ids, mask):
    """Logits, and parameter gradients of a fixed random weighting of the non-padded logits."""
    model.zero_grad(set_to_none=True)
    logits = model(ids, attention_mask=mask).logits
    keep = torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool()
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
    (logits * w)[keep].sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), keep, grads


def snapshot(model):
    """Everything attach may touch: parameters, buffers, configs' __dict__, hooks, module attributes."""
    configs = [c.__dict__.copy() for c in hf._configs(model)]
    hooks = [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
             for n, m in model.named_modules()]
    attrs = [(n, sorted(m.__dict__)) for n, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [n for n, p in model.named_parameters() if p.requires_grad]
    return configs, hooks, attrs, state, grads


def assert_same_snapshot(a, b):
    assert a[0] == b[0]
    assert a[1] == b[1]
    assert a[2] == b[2]
    assert a[3].keys() == b[3].keys() and all(torch.equal(a[3][k], b[3][k]) for k in a[3])
    assert a[4] == b[4]


def assert_same_state(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


# ---- the optional import ------------------------------------------------------------------------

def _run_python(code):
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(mt.__file__))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_import_memtrace_does_not_import_transformers():
    r = _run_python("import sys, memtrace, memtrace.integrations\n"
                    "assert 'transformers' not in sys.modules, 'transformers imported'\n"
                    "assert 'hf' in dir(memtrace.integrations) and 'integrations' in dir(memtrace)\n")
    assert r.returncode == 0, r.stderr


def test_hf_without_transformers_names_the_extra():
    r = _run_python("import sys; sys.modules['transformers'] = None\n"
                    "import memtrace as mt\n"
                    "try:\n    mt.integrations.hf\nexcept ImportError as e:\n    print(e)\n"
                    "else:\n    raise SystemExit('no ImportError')\n")
    assert r.returncode == 0, r.stderr
    assert "pip install memtrace[hf]" in r.stdout


# ---- the mask function (no manager needed) ------------------------------------------------------

def _mask(**kw):
    from transformers.masking_utils import causal_mask_function
    base = dict(batch_size=2, q_length=4, kv_length=4, q_offset=0, kv_offset=0,
                mask_function=causal_mask_function, attention_mask=None)
    return hf.memtrace_mask(**{**base, **kw})


def test_mask_function_returns_none_without_padding():
    assert _mask() is None
    assert _mask(attention_mask=torch.ones(2, 4, dtype=torch.bool)) is None
    # decode step with a dynamic cache: 1 query at position 6, keys 0..6
    assert _mask(q_length=1, kv_length=7, q_offset=6, attention_mask=torch.ones(2, 7, dtype=torch.bool)) is None


def test_mask_function_returns_the_key_padding_mask():
    am = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    out = _mask(attention_mask=am)
    assert out.dtype == torch.bool and torch.equal(out, am)
    # decode with left padding: the mask grows with the cache
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(_mask(q_length=1, kv_length=5, q_offset=4, attention_mask=am), am)


def test_mask_function_static_cache_cuts_the_empty_slots():
    # StaticCache prefill: 4 queries, 10 slots, offset a tensor -> keys up to the last query only
    am = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    out = _mask(kv_length=10, q_offset=torch.tensor(0), attention_mask=am)
    assert torch.equal(out, am)
    out = _mask(kv_length=10, q_offset=torch.tensor(0))
    assert out.shape == (2, 4) and out.all()
    # decode at position 6 of 10 slots, mask shorter than the cache
    am = torch.ones(2, 7, dtype=torch.bool)
    out = _mask(q_length=1, kv_length=10, q_offset=torch.tensor(6), attention_mask=am)
    assert out.shape == (2, 7) and out.all()


def test_mask_function_refuses_what_it_cannot_express():
    from transformers.masking_utils import (
        and_masks,
        causal_mask_function,
        packed_sequence_mask_function,
        sliding_window_causal_mask_function,
    )
    out = _mask(mask_function=sliding_window_causal_mask_function(3))
    assert isinstance(out, hf.UnsupportedMask) and "sliding" in out.reason
    out = _mask(mask_function=and_masks(causal_mask_function, packed_sequence_mask_function(torch.zeros(2, 4))))
    assert isinstance(out, hf.UnsupportedMask) and "packed" in out.reason
    out = _mask(mask_function=and_masks(causal_mask_function, lambda b, h, q, k: q >= 0))
    assert isinstance(out, hf.UnsupportedMask) and "custom mask function" in out.reason


# ---- parity with sdpa ---------------------------------------------------------------------------

@needs_manager
@pytest.mark.parametrize("pad", [None, "left", "right"])
def test_logits_and_gradients_match_sdpa(pad):
    ref = llama()                                  # GQA: 4 query heads, 2 kv heads
    model = copy.deepcopy(ref)
    ids, mask = batch(pad=pad)
    ref_logits, keep, ref_grads = forward_and_grads(ref, ids, mask)
    with hf.attach(model, manager_for(model)):
        assert model.config._attn_implementation == "memtrace"
        logits, _, grads = forward_and_grads(model, ids, mask)
    assert rel_err(logits[keep], ref_logits[keep]) <= F32
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name], 0.05) <= F32, name


@needs_manager
def test_gradients_match_sdpa_under_gradient_checkpointing():
    ref = llama()
    model = copy.deepcopy(ref)
    for m in (ref, model):
        m.gradient_checkpointing_enable()
        m.train()
    ids, mask = batch(pad="left")
    ref_logits, keep, ref_grads = forward_and_grads(ref, ids, mask)
    with hf.attach(model, manager_for(model)):
        logits, _, grads = forward_and_grads(model, ids, mask)
    assert rel_err(logits[keep], ref_logits[keep]) <= F32
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name], 0.05) <= F32, name


@needs_manager
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_generate_matches_sdpa_with_left_padding(cache):
    model = llama().eval()
    ids, mask = batch(pad="left")
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        with hf.attach(model, manager_for(model)):
            out = model.generate(ids, **kw)
    assert torch.equal(out, ref)


@needs_manager
def test_detach_restores_the_model_bitwise():
    model = llama()
    ids, mask = batch(pad="left")
    before = snapshot(model)
    with torch.no_grad():
        logits_before = model(ids, attention_mask=mask).logits
    handle = hf.attach(model, manager_for(model))
    assert handle.layers == {"model.layers.0.self_attn": 0, "model.layers.1.self_attn": 1}
    with torch.no_grad():
        model(ids, attention_mask=mask)
    handle.detach()
    handle.detach()                                # idempotent
    assert_same_snapshot(snapshot(model), before)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, logits_before)
    hf.attach(model, manager_for(model)).detach()  # attachable again


@needs_manager
def test_unattached_module_with_memtrace_implementation_is_an_error():
    model = llama()
    hf.attach(model, manager_for(model)).detach()  # registers "memtrace"
    model.set_attn_implementation("memtrace")
    with pytest.raises(RuntimeError, match="not attached"):
        model(batch()[0])


# ---- training -----------------------------------------------------------------------------------

def _stored_traces(mgr, num_layers):
    return sum(mgr.memory(layer).num_traces(layer) for layer in range(num_layers))


@needs_manager
def test_training_steps_store_traces_and_bias_the_model():
    """Default phases (an open-ended run: everything on from step 0), a capture at step 0: the
    manager stores traces, and the next forward is biased by them (it differs from sdpa)."""
    ref = llama()
    model = copy.deepcopy(ref)
    mgr = manager_for(model, update_interval=100, warmup_steps=0)
    ids, mask = batch(pad="left")
    with hf.attach(model, mgr):
        loss = model(ids, attention_mask=mask, labels=ids).loss + mgr.aux_loss()
        loss.backward()
        metrics = mgr.step()
        assert _stored_traces(mgr, 2) > 0
        assert isinstance(metrics, dict) and metrics.get("trace_count", 1) > 0
        with torch.no_grad():
            biased = model(ids, attention_mask=mask).logits
    with torch.no_grad():
        plain = ref(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert torch.isfinite(biased[keep]).all()
    assert rel_err(biased[keep], plain[keep]) > 1e-4


@needs_manager
def test_save_and_load_beside_save_pretrained(tmp_path):
    model = llama()
    mgr = manager_for(model, update_interval=1, warmup_steps=0)
    ids, _ = batch()
    with hf.attach(model, mgr):
        model(ids, labels=ids).loss.backward()
        mgr.step()
    model.save_pretrained(tmp_path)
    path = hf.save_memtrace(tmp_path, mgr)
    assert path == os.path.join(tmp_path, hf.MEMTRACE_FILE) and os.path.isfile(path)
    loaded = hf.load_memtrace(tmp_path)
    into = hf.load_memtrace(tmp_path, manager_for(model, update_interval=1, warmup_steps=0))
    for other in (loaded, into):
        assert_same_state(mgr.state_dict(), other.state_dict())
    with pytest.raises(FileNotFoundError, match="memtrace"):
        hf.load_memtrace(tmp_path / "nowhere")


class _ToyData(torch.utils.data.Dataset):
    def __init__(self, n=12, T=8):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(1, VOCAB, (n, T), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


# Trace accumulation from step 2, nothing else: one capture (step 2, stored by its mgr.step) and no
# biased backward, which keeps the Trainer tests quick under TRITON_INTERPRET=1.
TRAINER_CONFIG = dict(phase_starts=(2, None, None, None), update_interval=100, warmup_steps=0)


def _trainer(model, mgr, out_dir, max_steps, trainer_cls=None):
    pytest.importorskip("accelerate")
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-3,
        logging_steps=1, save_strategy="steps", save_steps=3, report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0)
    if trainer_cls is None:
        return hf.MemtraceTrainer(model=model, args=args, train_dataset=_ToyData(), memtrace=mgr)
    return trainer_cls(model=model, args=args, train_dataset=_ToyData(), callbacks=[hf.MemtraceCallback(mgr)])


def _count_steps(mgr, on_step=None):
    """Wrap mgr.step to count its calls (and run on_step() before each)."""
    calls, real = [], mgr.step

    def step(*args, **kwargs):
        if on_step is not None:
            on_step()
        calls.append(mgr.step_count if hasattr(mgr, "step_count") else len(calls))
        return real(*args, **kwargs)

    mgr.step = step
    return calls


@needs_manager
def test_memtrace_trainer_steps_logs_saves_and_resumes(tmp_path):
    model = llama()
    mgr = manager_for(model, **TRAINER_CONFIG)
    calls = _count_steps(mgr)
    with hf.attach(model, mgr):
        trainer = _trainer(model, mgr, tmp_path, 3)
        trainer.train()
    assert len(calls) == 3                         # once per optimizer step
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all("memtrace/phase" in h for h in logged)
    assert [h["memtrace/phase"] for h in logged] == ["foundation", "foundation", "trace_accumulation"]
    assert logged[-1]["memtrace/trace_count"] > 0  # the step-2 capture, logged after its mgr.step
    saved = tmp_path / "checkpoint-3" / hf.MEMTRACE_FILE
    assert saved.is_file()
    stored = _stored_traces(hf.load_memtrace(tmp_path / "checkpoint-3"), 2)
    assert stored == _stored_traces(mgr, 2) > 0
    # resume: a fresh manager gets the checkpoint's state before the 4th step
    model2 = llama()
    mgr2 = manager_for(model2, **TRAINER_CONFIG)
    seen = []
    _count_steps(mgr2, on_step=lambda: seen.append((mgr2.step_count, _stored_traces(mgr2, 2))))
    with hf.attach(model2, mgr2):
        _trainer(model2, mgr2, tmp_path, 4).train(resume_from_checkpoint=True)
    assert seen == [(3, stored)]


@needs_manager
def test_plain_trainer_with_the_callback(tmp_path):
    model = llama()
    mgr = manager_for(model, **TRAINER_CONFIG)
    with hf.attach(model, mgr):
        trainer = _trainer(model, mgr, tmp_path, 3, trainer_cls=transformers.Trainer)
        trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(any(k.startswith("memtrace/") for k in h) for h in logged)
    assert (tmp_path / "checkpoint-3" / hf.MEMTRACE_FILE).is_file()


def test_memtrace_trainer_needs_an_attached_model(tmp_path):
    model = llama()

    class _Mgr:
        def aux_loss(self):
            return torch.zeros(())

    with pytest.raises(ValueError, match="attach the model"):
        hf.MemtraceTrainer(model=model, memtrace=_Mgr())


# ---- mixture of experts -------------------------------------------------------------------------

@needs_manager
@needs_moe
def test_mixtral_logits_match_sdpa_and_routing_is_recorded():
    ref = mixtral()
    model = copy.deepcopy(ref)
    ids, mask = batch(pad="left")
    ref_logits, keep, ref_grads = forward_and_grads(ref, ids, mask)
    before = snapshot(model)
    handle = hf.attach(model, manager_for(model))
    assert handle.routers is not None
    logits, _, grads = forward_and_grads(model, ids, mask)
    handle.detach()
    assert rel_err(logits[keep], ref_logits[keep]) <= F32
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name], 0.05) <= F32, name
    model.zero_grad(set_to_none=True)
    assert_same_snapshot(snapshot(model), before)


# ---- bad input ----------------------------------------------------------------------------------

class _FakeManager:
    """Only for attach's checks, which run before the manager is used."""

    def __init__(self, num_layers=2, num_heads=4):
        self.num_layers, self.num_heads = num_layers, num_heads

    def attention(self, *a, **k):
        raise AssertionError("not called")


def _refused(model, match, mgr=None):
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        hf.attach(model, mgr or _FakeManager(model.config.num_hidden_layers, model.config.num_attention_heads))
    assert_same_snapshot(snapshot(model), before)


def test_refuses_a_model_without_attention_layers():
    from transformers import MambaConfig, MambaForCausalLM
    model = MambaForCausalLM(MambaConfig(hidden_size=16, num_hidden_layers=1, vocab_size=VOCAB, state_size=4))
    before = snapshot(model)
    with pytest.raises(ValueError, match="no attention layers"):
        hf.attach(model, _FakeManager(1, 1))
    assert_same_snapshot(snapshot(model), before)


def test_refuses_attention_dropout():
    _refused(llama(attention_dropout=0.1), "attention dropout 0.1")


def test_refuses_sliding_window():
    _refused(mixtral(sliding_window=4), "sliding-window")


def test_refuses_softcapping():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    cfg = Gemma2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, intermediate_size=128, vocab_size=VOCAB, layer_types=["full_attention"] * 2,
                       attn_logit_softcapping=50.0, attn_implementation="sdpa")
    _refused(Gemma2ForCausalLM(cfg), "soft-caps")


def test_refuses_encoder_decoder():
    from transformers import BartConfig, BartForConditionalGeneration
    cfg = BartConfig(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB,
                     max_position_embeddings=32, attn_implementation="sdpa")
    model = BartForConditionalGeneration(cfg)
    before = snapshot(model)
    with pytest.raises(ValueError, match="cross-attention"):
        hf.attach(model, _FakeManager(1, 4))
    assert_same_snapshot(snapshot(model), before)


def test_refuses_unsupported_head_dim():
    _refused(llama(hidden_size=48, num_attention_heads=4, num_key_value_heads=2), "head dim 12")


def test_refuses_a_manager_of_another_shape():
    _refused(llama(), "manager has 1 layers", _FakeManager(1, 4))
    _refused(llama(), "4 query heads, the manager 8", _FakeManager(2, 8))


def test_refuses_a_second_attach_and_bad_arguments():
    model = llama()
    with pytest.raises(TypeError, match="PreTrainedModel"):
        hf.attach(torch.nn.Linear(2, 2), _FakeManager())
    with pytest.raises(TypeError, match="memtrace.Memtrace"):
        hf.attach(model, object())
    handle = hf.attach(model, _FakeManager())
    try:
        with pytest.raises(ValueError, match="already attached"):
            hf.attach(model, _FakeManager())
    finally:
        handle.detach()


@needs_manager
def test_runtime_refuses_masks_it_cannot_express():
    model = llama()
    ids, _ = batch(B=1, T=6)
    with hf.attach(model, manager_for(model)):
        four_d = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
        with pytest.raises(ValueError, match="2-D attention_mask"):
            model(ids, attention_mask=four_d)
        packed = torch.tensor([[0, 1, 2, 0, 1, 2]])      # two sequences packed in one row, no mask
        with pytest.raises(ValueError, match="packed"):
            model(ids, position_ids=packed, use_cache=False)
        model.train()
        model.model.layers[0].self_attn.attention_dropout = 0.1
        with pytest.raises(ValueError, match="dropout"):
            model(ids)


@pytest.mark.parametrize("num_experts", [None, 8])
def test_moe_model_needs_a_manager_with_its_expert_count(num_experts):
    """A MoE model attached to a manager without (or with another) num_experts is refused at attach,
    with the manager to build, not at the first routed forward; the model stays untouched."""
    model = mixtral()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    with pytest.raises(ValueError, match=r"4 experts.*\n.*mt\.Memtrace\(num_layers=2, num_heads=4, num_experts=4"):
        hf.attach(model, mt.Memtrace(2, 4, num_experts=num_experts))
    assert model.config._attn_implementation == impl
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
