"""Data-parallel managers (SPEC 15) on 2 CPU ranks over gloo: after every step the ranks hold the
same memory, trie and registry, equal to one process that saw both ranks' batches as
micro-batches; ranks that disagree on the config all raise; rank 0 writes the state file."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from manager_helpers import H, TinyModel, assert_same_memory, batch, short_config, token_losses
from safetensors.torch import load_file, save_file

import memtrace as mt
from memtrace import config

WORLD = 2
STEPS = 4


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)


def _routing_config():
    return mt.MemtraceConfig(update_interval=1, warmup_steps=0, phase_starts=(0, None, 0, None))


def _routes(step, rank, n):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randint(-1, 4, (n, 2), generator=g)


def _worker(rank, port, out_dir):
    _init(rank, port)
    try:
        torch.manual_seed(0)
        mgr = mt.Memtrace(2, H, config=short_config(update_interval=2)).distribute()
        model = TinyModel(mgr)
        exchanged = []
        for s in range(STEPS):
            token_losses(model, batch(s, seed=rank)).mean().backward()     # each rank its own batch
            exchanged.append(mgr.step()["exchange_bytes"])
            model.zero_grad()
        mem = mgr.memory()
        save_file({"strength": mem.strength.contiguous(), "meta": mem.meta.contiguous(),
                   "cuts": torch.tensor([c if c is not None else -1.0 for c in mgr.state_dict()["capture_cuts"]]),
                   "exchanged": torch.tensor(exchanged)}, os.path.join(out_dir, f"memory{rank}.safetensors"))
        mgr.save(os.path.join(out_dir, "state.safetensors"))           # rank 0 writes
        dist.barrier()
        back = mt.Memtrace.load(os.path.join(out_dir, "state.safetensors"))
        assert torch.equal(back.memory().strength, mem.strength) and torch.equal(back.memory().meta, mem.meta)

        # beside DDP: the model wrapped, trained; the managers still agree. The reference attention:
        # DDP's gloo backward beside the Triton interpreter's kernels aborts the process (CPU only)
        dmgr = mt.Memtrace(2, H, config=short_config(update_interval=1)).distribute()
        ddp = torch.nn.parallel.DistributedDataParallel(TinyModel(dmgr))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        with config.override(backend="reference"):
            for s in range(2):
                token_losses(ddp, batch(s, seed=rank)).mean().backward()
                opt.step()
                dmgr.step()
                opt.zero_grad()
        both = [torch.empty_like(dmgr.memory().strength) for _ in range(WORLD)]
        dist.all_gather(both, dmgr.memory().strength)
        assert torch.equal(both[0], both[1]) and bool((both[0] >= 0).any())

        # routing: the ranks' paths (different counts per rank, one rank empty at step 1) reach every trie
        rmgr = mt.Memtrace(2, H, num_experts=4, config=_routing_config()).distribute()
        for s in range(3):
            n = 0 if (s == 1 and rank == 1) else 5 + 3 * rank
            if n:
                paths = _routes(s, rank, n)
                rmgr.record_routing(0, paths[:, 0])
                rmgr.record_routing(1, paths[:, 1])
            rmgr.step()
        table = rmgr.tree.to_table()
        save_file({k: v.contiguous() for k, v in table.items()}, os.path.join(out_dir, f"trie{rank}.safetensors"))

        # ranks that disagree on the config: every rank raises
        cfg = short_config(quota_per_head=8 if rank == 0 else 16)
        with pytest.raises(ValueError, match="disagree"):
            mt.Memtrace(2, H, config=cfg).distribute()
    finally:
        dist.destroy_process_group()


def test_ranks_agree_and_match_accumulated_micro_batches(tmp_path):
    mp.spawn(_worker, args=(_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [load_file(str(tmp_path / f"memory{r}.safetensors")) for r in range(WORLD)]
    for key in ("strength", "meta", "cuts"):
        assert torch.equal(ranks[0][key], ranks[1][key]), f"ranks differ in {key}"
    assert ranks[0]["strength"].ge(0).sum() > 0
    assert (ranks[0]["exchanged"][::2] > 0).all()          # capture steps exchanged something

    # one process, both ranks' batches as micro-batches of each step (gradient accumulation)
    torch.manual_seed(0)
    mgr = mt.Memtrace(2, H, config=short_config(update_interval=2))
    model = TinyModel(mgr)
    for s in range(STEPS):
        for r in range(WORLD):
            (token_losses(model, batch(s, seed=r)).mean() / WORLD).backward()
        mgr.step()
        model.zero_grad()

    class _Held:   # the ranks' memory in the shape assert_same_memory reads
        def __init__(self, d):
            self._m = mt.TraceMemory(2, H, quota=mgr.memory().quota, max_seq_len=mgr.memory().max_seq_len)
            self._m.strength.copy_(d["strength"])
            self._m.meta.copy_(d["meta"])

        def memory(self):
            return self._m

    assert_same_memory(_Held(ranks[0]), mgr, rtol=1e-4, atol=1e-6)

    tries = [load_file(str(tmp_path / f"trie{r}.safetensors")) for r in range(WORLD)]
    for key in tries[0]:
        assert torch.equal(tries[0][key], tries[1][key]), f"tries differ in {key}"
    tree = mt.RoutingTree(2, 4, max_depth=2, mode="suffix")
    for s in range(3):
        parts = [_routes(s, r, 0 if (s == 1 and r == 1) else 5 + 3 * r) for r in range(WORLD)]
        tree.update(torch.cat(parts), None, step=s)
    want = tree.to_table()
    for key in want:
        assert torch.equal(want[key], tries[0][key]), f"trie {key} is not the one of all ranks' paths"
