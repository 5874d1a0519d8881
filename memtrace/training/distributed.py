"""Data-parallel managers that agree (SPEC 15): every rank of a group holds the same memory, trie
and registry after each step.

Each rank captures salience from its own batch and records routing from its own tokens. At
`step`, before anything changes, the ranks exchange what they captured, and every rank applies
the same deterministic update to the same inputs:

- captures: per layer, each rank's merged capture (its distinct edges with S_norm and a, at most
  the capture's capacity per fill, plus the stored traces' scores) and its weights (W = batch
  size, Zw = batch size * mean salience). The merge is the weighted mean over all samples, as
  gradient accumulation over the same micro-batches would give:
  S_norm = sum_r S_norm_r Zw_r / sum_r Zw_r, a = sum_r a_r W_r / sum_r W_r, summed in rank order
  (each rank lists an edge once, so no two terms of one scatter meet: bitwise reproducible on
  every rank and device). The next capture step's cut is the largest any rank suggests.
  Nothing T x T moves: per layer and rank, 20 bytes per listed edge and 8 per stored trace.
- routing: the ranks' (paths, rewards) are concatenated in rank order before the trie update
  (the same counts and reward sums as their sum).

Collectives only (`torch.distributed.all_gather`): NCCL on GPUs, gloo on CPUs; the tensors are
on the manager's device, which the group's backend must take.
"""
from __future__ import annotations

import hashlib
import json

import torch

from .capture_step import merge_edge_lists

__all__ = ["DataParallel"]


def _dist():
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("Memtrace.distribute needs torch.distributed initialised (init_process_group) first")
    return dist


class DataParallel:
    """The exchange of one manager in one process group (made by `Memtrace.distribute`)."""

    def __init__(self, group, device, fingerprint: dict):
        dist = _dist()
        self.group = group
        self.device = device
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.bytes_last_step = 0
        self._check_agreement(fingerprint)

    def _gather(self, t: torch.Tensor) -> list:
        dist = _dist()
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous(), group=self.group)
        self.bytes_last_step += t.numel() * t.element_size() * self.world
        return out

    def _check_agreement(self, fingerprint: dict) -> None:
        """Every rank raises the same ValueError when the ranks' configs or shapes differ."""
        digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).digest()
        mine = torch.tensor(list(digest), dtype=torch.uint8, device=self.device)
        theirs = self._gather(mine)
        differ = [r for r, t in enumerate(theirs) if not torch.equal(t, theirs[0])]
        if differ:
            raise ValueError(f"the data-parallel ranks' managers disagree: ranks {differ} have another config or "
                             f"model shape than rank 0 (every rank must build the same Memtrace)")

    # -- captures ----------------------------------------------------------------------------------
    def merge_captures(self, captures: dict, num_layers: int, max_seq_len: int) -> dict:
        """{layer: merged} as LayerCapture.merged returns it, the same on every rank, for the
        layers every rank captured; also sets each capture's next_cut to the ranks' largest."""
        layers = sorted(captures)
        local = {lay: captures[lay].merged(max_seq_len) for lay in layers}
        # header: which layers, and how many rows each rank's edge list has
        head = torch.full((2 * num_layers,), -1, dtype=torch.int64, device=self.device)
        for n, lay in enumerate(layers):
            head[n] = lay
            head[num_layers + n] = local[lay][0][0].shape[0]
        heads = self._gather(head)
        if any(not torch.equal(h[:num_layers], heads[0][:num_layers]) for h in heads):
            raise RuntimeError("data-parallel ranks captured different layers in this step; every rank must run "
                               "the same layers forward and backward before step()")
        if not layers:
            return {}
        C = int(max(int(h[num_layers:num_layers + len(layers)].max()) for h in heads))
        nl = len(layers)
        edges = torch.zeros((nl, 5, C), dtype=torch.int32, device=self.device)
        meta = torch.zeros((nl, 4), dtype=torch.float64, device=self.device)
        with_slots = local[layers[0]][2] is not None
        slots = None
        for n, lay in enumerate(layers):
            (h, i, j, S, a), num, slot, _, _ = local[lay]
            c = h.shape[0]
            edges[n, 0, :c], edges[n, 1, :c], edges[n, 2, :c] = h, i, j
            edges[n, 3, :c] = S.float().contiguous().view(torch.int32)
            edges[n, 4, :c] = a.float().contiguous().view(torch.int32)
            W, Zw = captures[lay].weights()
            meta[n] = torch.stack([num.double().reshape(()), torch.tensor(W, dtype=torch.float64, device=self.device),
                                   Zw.double().reshape(()), captures[lay].next_cut.double().reshape(())])
            if with_slots:
                if slots is None:
                    slots = torch.zeros((nl, 2) + tuple(slot[0].shape), dtype=torch.float32, device=self.device)
                slots[n, 0], slots[n, 1] = slot[0].float(), slot[1].float()
        all_edges, all_meta = self._gather(edges), self._gather(meta)
        all_slots = self._gather(slots) if with_slots else None
        out = {}
        for n, lay in enumerate(layers):
            m = torch.stack([am[n] for am in all_meta])                         # [R, 4]
            e = torch.stack([ae[n] for ae in all_edges])                        # [R, 5, C]
            s = None if all_slots is None else torch.stack([a_s[n] for a_s in all_slots])
            merged_edges, num, slot = _merge_ranks(e, m, s, max_seq_len)
            captures[lay].next_cut = m[:, 3].max().float()
            _, _, _, bias, Tq = local[lay]
            out[lay] = (merged_edges, num, slot, bias, Tq)
        return out

    # -- routing -----------------------------------------------------------------------------------
    def gather_paths(self, paths: torch.Tensor, rewards: torch.Tensor):
        """Every rank's (paths [N_r, L], rewards [N_r]) concatenated in rank order."""
        sizes = self._gather(torch.tensor([paths.shape[0]], dtype=torch.int64, device=self.device))
        n_max = int(max(int(s) for s in sizes))
        pad = n_max - paths.shape[0]
        p = torch.cat([paths, paths.new_full((pad, paths.shape[1]), -1)]) if pad else paths
        r = torch.cat([rewards, rewards.new_zeros(pad)]) if pad else rewards
        ps, rs = self._gather(p), self._gather(r)
        return (torch.cat([t[:int(s)] for t, s in zip(ps, sizes)]),
                torch.cat([t[:int(s)] for t, s in zip(rs, sizes)]))


def _merge_ranks(edges, meta, slots, max_seq_len):
    """The ranks' edge lists ([R, 5, C]: h, i, j and the float32 bits of S_norm, a), meta [R, 4]
    (num_edges, W, Zw, next cut) and stored-trace scores ([R, 2, ...] or None) -> one list: the
    weighted mean over all the ranks' samples (see the module docstring)."""
    R = edges.shape[0]
    num, W_r, Zw_r = meta[:, 0].long(), meta[:, 1], meta[:, 2]
    W, Zw = W_r.sum(), Zw_r.sum()
    lists = [((edges[r, 0], edges[r, 1], edges[r, 2], edges[r, 3].contiguous().view(torch.float32),
               edges[r, 4].contiguous().view(torch.float32)), num[r]) for r in range(R)]
    (h, i, j, S, a), count = merge_edge_lists(lists, Zw_r.tolist(), W_r.tolist(), max_seq_len)
    merged = (h, i, j, (S / Zw).float(), (a / W).float())
    slot = None
    if slots is not None:
        S_b = torch.zeros_like(slots[0, 0], dtype=torch.float64)
        a_b = torch.zeros_like(S_b)
        for r in range(R):          # rank order
            S_b = S_b + slots[r, 0].double() * Zw_r[r]
            a_b = a_b + slots[r, 1].double() * W_r[r]
        slot = ((S_b / Zw).float(), (a_b / W).float())
    return merged, count, slot
