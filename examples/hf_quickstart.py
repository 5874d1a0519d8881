"""A tiny random Llama trains with persistent attention traces (CPU as written, CUDA unchanged)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import memtrace as mt
from memtrace.integrations import hf

device = "cuda" if torch.cuda.is_available() else "cpu"
cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=97)
model = LlamaForCausalLM(cfg).to(device)
mgr = mt.Memtrace(cfg.num_hidden_layers, cfg.num_attention_heads, device=device,
                  config=mt.MemtraceConfig(update_interval=2, warmup_steps=0))   # capture every 2nd step
handle = hf.attach(model, mgr)               # attention, padding mask (and MoE routers) through memtrace
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
for step in range(4):
    ids = torch.randint(0, cfg.vocab_size, (2, 32), device=device)
    loss = model(input_ids=ids, labels=ids).loss + mgr.aux_loss()
    loss.backward()
    opt.step()
    metrics = mgr.step()                     # after backward: stores the captured traces
    opt.zero_grad()
    print(f"step {step} loss {loss.item():.3f} phase {metrics['phase']} traces {mgr.memory().num_traces()}")
handle.detach()                              # the model is plain transformers again
