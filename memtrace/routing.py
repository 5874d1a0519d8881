"""RoutingTree: the routing-path trie of SPEC 5 on top of the memtrace._C extension.

The trie lives in six 1-D tensors on the tree's device, level by level (csrc/routing_trie.h):
parent int32, expert int16, count int64, reward_sum float64, first_seen int32, last_seen int32,
30 bytes per node, plus one int held per level in `level_sizes`. Inside a level, nodes are sorted
by (parent, expert), so every level is already in canonical order. `update` calls
`torch.ops.memtrace.routing_update` (CPU or CUDA kernel by the tensors' device), which returns new
arrays: the tree swaps them in only after the call succeeded, and validates every input before it.

Statistics (SPEC 5.3) are computed from the arrays with a few vectorised passes per level and
cached until the next update.
"""
from __future__ import annotations

import json
import math

import torch

from . import _validate as V
from ._files import check_path, save_safetensors

__all__ = ["BYTES_PER_NODE", "FORMAT_VERSION", "RoutingTree"]

FORMAT_VERSION = 1
BYTES_PER_NODE = 4 + 2 + 8 + 8 + 4 + 4  # parent, expert, count, reward_sum, first_seen, last_seen
_KEYS = ("parent", "expert", "count", "reward_sum", "first_seen", "last_seen")
_DTYPES = dict(parent=torch.int32, expert=torch.int16, count=torch.int64, reward_sum=torch.float64,
               first_seen=torch.int32, last_seen=torch.int32)
_MODES = ("prefix", "suffix")
_INT64_MAX = 2**63 - 1


_FAKE_REGISTERED = False


def _ops():
    global _FAKE_REGISTERED
    try:
        import memtrace._C  # noqa: F401  (registers torch.ops.memtrace.*)
    except ImportError as exc:  # pragma: no cover - only without a build
        raise ImportError("memtrace._C is not built; run `pip install -e .` in the repository") from exc
    if not _FAKE_REGISTERED:
        _FAKE_REGISTERED = True
        torch.library.register_fake("memtrace::routing_update")(_routing_update_fake)
    return torch.ops.memtrace


def _routing_update_fake(parent, expert, count, reward_sum, first_seen, last_seen, level_sizes, paths, rewards,
                         step, max_depth, num_experts, suffix):
    """Shapes only (FakeTensor / torch.compile): the node count and depth depend on the data."""
    ctx = torch.library.get_ctx()
    n, depth = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    return (parent.new_empty(n), expert.new_empty(n), count.new_empty(n), reward_sum.new_empty(n),
            first_seen.new_empty(n), last_seen.new_empty(n), torch.empty(depth, dtype=torch.int64))


class RoutingTree:
    """Counts, rewards and first/last steps of MoE routing (sub-)paths in a trie (SPEC 5)."""

    def __init__(self, num_layers: int, num_experts: int, max_depth: int = 8, mode: str = "suffix", device=None):
        self.num_layers = V.check_int("num_layers", num_layers, low=1, high=V.MAX_ROUTING_LAYERS)
        self.num_experts = V.check_int("num_experts", num_experts, low=1, high=V.MAX_ROUTING_EXPERTS)
        self.max_depth = V.check_int("max_depth", max_depth, low=1, high=V.MAX_ROUTING_DEPTH)
        self.mode = V.check_choice("mode", mode, _MODES)
        self.device = V.check_device("device", device) if device is not None else torch.device("cpu")
        if self.device.type == "meta":
            raise ValueError("device must hold data: a RoutingTree cannot live on the meta device")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._arrays = {k: torch.zeros(0, dtype=dt, device=self.device) for k, dt in _DTYPES.items()}
        self._level_sizes: list[int] = []
        self._tokens = 0          # tokens recorded, each once (SPEC 5.3 global mean)
        self._reward_total = 0.0  # their summed reward (float64)
        self._step = 0            # step of the latest update
        self._cache: dict = {}

    # ---- update ---------------------------------------------------------------------------------

    def update(self, paths: torch.Tensor, rewards: torch.Tensor | None = None, step: int = 0) -> None:
        """Record paths [N, num_layers] (expert ids, -1 cuts) with rewards [N] (None: 0) at `step`."""
        V.check_routing_paths(paths, num_layers=self.num_layers, num_experts=self.num_experts, device=self.device)
        n = paths.shape[0]
        V.check_routing_rewards(rewards, num_tokens=n, device=self.device)
        step = V.check_routing_step("step", step)
        if self._tokens + n > _INT64_MAX:
            # every node count is at most the token total: refusing here keeps counts from wrapping
            # (the op saturates them; a saturated tree would no longer be consistent)
            raise ValueError(f"paths: recording {n} more tokens would take the tree's token count "
                             f"{self._tokens} past 2^63-1 (int64 counts)")
        paths64 = paths.to(torch.int64).contiguous()
        rewards64 = (torch.zeros(n, dtype=torch.float64, device=self.device) if rewards is None
                     else rewards.to(torch.float64).contiguous())
        out = _ops().routing_update(*(self._arrays[k] for k in _KEYS), self._level_sizes, paths64, rewards64,
                                    step, self.max_depth, self.num_experts, self.mode == "suffix")
        reward_total = self._reward_total + float(rewards64.detach().sum()) if n else self._reward_total
        if not math.isfinite(reward_total) or (n and not bool(torch.isfinite(out[3]).all())):
            # finite rewards whose sums pass float64's range: a tree that save() writes and load() rejects
            raise ValueError("rewards are too large: the trie's reward sums would overflow float64")
        # Nothing above touched the tree: commit only now.
        self._arrays = dict(zip(_KEYS, out[:6]))
        self._level_sizes = [int(x) for x in out[6].tolist()]
        self._tokens += n
        self._reward_total = reward_total
        self._step = step
        self._cache = {}

    # ---- simple properties ----------------------------------------------------------------------

    @property
    def num_nodes(self) -> int:
        return sum(self._level_sizes)

    @property
    def nbytes(self) -> int:
        """Bytes held by the trie: 30 per node plus 8 per level."""
        return sum(t.numel() * t.element_size() for t in self._arrays.values()) + 8 * len(self._level_sizes)

    @property
    def global_mean_reward(self) -> float:
        return self._reward_total / self._tokens if self._tokens else 0.0

    @property
    def num_tokens(self) -> int:
        return self._tokens

    @property
    def step(self) -> int:
        return self._step

    @property
    def depth(self) -> int:
        return len(self._level_sizes)

    def __len__(self) -> int:
        return self.num_nodes

    def __repr__(self) -> str:
        return (f"RoutingTree(num_layers={self.num_layers}, num_experts={self.num_experts}, "
                f"max_depth={self.max_depth}, mode={self.mode!r}, device={self.device}, "
                f"num_nodes={self.num_nodes}, tokens={self._tokens})")

    # ---- derived per-level quantities (cached until the next update) ------------------------------

    def _levels(self) -> list[dict]:
        """Per level: slices of the arrays, start layer, key, node entropy, path entropy."""
        if "levels" in self._cache:
            return self._cache["levels"]
        levels, offset = [], 0
        for size in self._level_sizes:
            lv = {k: t[offset:offset + size] for k, t in self._arrays.items()}
            lv["parent64"] = lv["parent"].to(torch.int64)
            lv["key"] = (lv["parent64"] << 16) | lv["expert"].to(torch.int64)
            levels.append(lv)
            offset += size
        # node_entropy of a node: -sum p ln p over its children, p = child count / sum of children.
        # Level d's children live in level d+1; the roots' children are the depth-1 nodes.
        parent_sizes = [self.num_layers] + self._level_sizes
        node_entropy = []
        for d, size in enumerate(parent_sizes):
            h = torch.zeros(size, dtype=torch.float64, device=self.device)
            if d < len(levels):
                child = levels[d]
                c = child["count"].to(torch.float64)
                total = torch.zeros(size, dtype=torch.float64, device=self.device).index_add_(0, child["parent64"], c)
                p = c / total[child["parent64"]]
                h.index_add_(0, child["parent64"], -p * torch.log(p))
            node_entropy.append(h)
        root_entropy = node_entropy[0]
        for d, lv in enumerate(levels):
            lv["node_entropy"] = node_entropy[d + 1]
            if d == 0:
                lv["start"] = lv["parent64"]
                lv["entropy"] = root_entropy[lv["parent64"]]
            else:
                up = levels[d - 1]
                lv["start"] = up["start"][lv["parent64"]]
                lv["entropy"] = up["entropy"][lv["parent64"]] + up["node_entropy"][lv["parent64"]]
        self._cache["levels"] = levels
        self._cache["root_entropy"] = root_entropy
        return levels

    def _paths_of(self, depth: int, index: torch.Tensor) -> torch.Tensor:
        """Experts [len(index), depth] of the nodes `index` (within level `depth`)."""
        levels = self._levels()
        cols = []
        idx = index
        for d in range(depth - 1, -1, -1):
            lv = levels[d]
            cols.append(lv["expert"][idx].to(torch.int64))
            idx = lv["parent64"][idx]
        return torch.stack(cols[::-1], dim=1) if cols else torch.zeros(len(index), 0, dtype=torch.int64)

    def _find(self, start_layer: int, experts) -> tuple[int, int] | None:
        """(depth, index in level) of the node (start_layer, experts), or None."""
        levels = self._levels()
        if not experts or len(experts) > len(levels):
            return None
        node = start_layer
        for d, e in enumerate(experts):
            key = levels[d]["key"]
            probe = torch.tensor([(node << 16) | e], dtype=torch.int64, device=self.device)
            i = int(torch.searchsorted(key, probe)[0])
            if i >= key.numel() or int(key[i]) != int(probe[0]):
                return None
            node = i
        return len(experts), node

    # ---- queries ----------------------------------------------------------------------------------

    def stats(self, start_layer: int, experts, step: int | None = None) -> dict | None:
        """SPEC 5.3 statistics of motif (start_layer, experts), or None when the trie lacks it."""
        start_layer = V.check_int("start_layer", start_layer, low=0, high=self.num_layers - 1)
        experts = self._check_experts(experts)
        step = self._step if step is None else V.check_routing_step("step", step)
        found = self._find(start_layer, experts)
        if found is None:
            return None
        depth, i = found
        lv = self._levels()[depth - 1]
        count = int(lv["count"][i])
        reward_sum = float(lv["reward_sum"][i])
        first = int(lv["first_seen"][i])
        return {"count": count, "reward_sum": reward_sum,
                "utility": reward_sum / count - self.global_mean_reward,
                "node_entropy": float(lv["node_entropy"][i]), "entropy": float(lv["entropy"][i]),
                "first_seen": first, "last_seen": int(lv["last_seen"][i]), "age": step - first}

    def root_entropy(self, start_layer: int) -> float:
        """node_entropy of the root of `start_layer` (the entropy of the first expert chosen)."""
        start_layer = V.check_int("start_layer", start_layer, low=0, high=self.num_layers - 1)
        self._levels()
        return float(self._cache["root_entropy"][start_layer])

    def _check_experts(self, experts) -> tuple:
        if isinstance(experts, torch.Tensor):
            V.check_not_meta("experts", experts)
            experts = experts.tolist()
        if not isinstance(experts, (list, tuple)):
            raise TypeError(f"experts must be a sequence of ints, got {type(experts).__name__}")
        out = tuple(V.check_int("experts", e, low=0, high=self.num_experts - 1) for e in experts)
        if not 1 <= len(out) <= self.max_depth:
            raise ValueError(f"experts must hold 1 to max_depth={self.max_depth} expert ids, got {len(out)}")
        return out

    def to_table(self) -> dict:
        """Every node, sorted by (start_layer, experts) (SPEC 5.4); identical on CPU and CUDA."""
        levels = self._levels()
        dev, n = self.device, self.num_nodes
        # Preorder positions: subtree sizes bottom-up, then parent position + 1 + earlier siblings.
        sizes = [torch.ones(lv["count"].numel(), dtype=torch.int64, device=dev) for lv in levels]
        for d in range(len(levels) - 1, 0, -1):
            sizes[d - 1].index_add_(0, levels[d]["parent64"], sizes[d])
        pos = []
        for d, lv in enumerate(levels):
            before = torch.cumsum(sizes[d], 0) - sizes[d]  # subtree nodes of earlier nodes in the level
            first_sibling = torch.searchsorted(lv["parent64"], lv["parent64"])
            if d == 0:  # roots are not stored: level 1 in canonical order tiles the whole table
                pos.append(before)
            else:
                pos.append(pos[d - 1][lv["parent64"]] + 1 + before - before[first_sibling])
        table = {"start_layer": torch.empty(n, dtype=torch.int64, device=dev),
                 "depth": torch.empty(n, dtype=torch.int64, device=dev),
                 "experts": torch.full((n, self.max_depth), -1, dtype=torch.int64, device=dev),
                 "count": torch.empty(n, dtype=torch.int64, device=dev),
                 "reward_sum": torch.empty(n, dtype=torch.float64, device=dev),
                 "first_seen": torch.empty(n, dtype=torch.int64, device=dev),
                 "last_seen": torch.empty(n, dtype=torch.int64, device=dev)}
        row_experts = None
        for d, lv in enumerate(levels):
            e = lv["expert"].to(torch.int64).unsqueeze(1)
            row_experts = e if d == 0 else torch.cat([row_experts[lv["parent64"]], e], dim=1)
            p = pos[d]
            table["start_layer"][p] = lv["start"]
            table["depth"][p] = d + 1
            table["experts"][p, :d + 1] = row_experts
            for k in ("count", "reward_sum", "first_seen", "last_seen"):
                table[k][p] = lv[k].to(table[k].dtype)
        return table

    def candidates(self, min_frequency: int = 100, min_utility: float = 0.05, max_entropy: float = 1.0,
                   min_length: int = 3, max_length: int = 8, min_age: int = 0, step: int | None = None,
                   weights=(1.0, 1.0, 1.0, 0.0)) -> list:
        """Motifs passing every SPEC 5.3 criterion, by utility descending, then score, then key."""
        from .crystallize import Motif, check_weights

        min_frequency = V.check_int("min_frequency", min_frequency, low=0)
        min_utility = V.check_float("min_utility", min_utility)
        max_entropy = V.check_float("max_entropy", max_entropy)
        min_length = V.check_int("min_length", min_length, low=1)
        max_length = V.check_int("max_length", max_length, low=1)
        min_age = V.check_int("min_age", min_age)
        step = self._step if step is None else V.check_routing_step("step", step)
        w = check_weights(weights)
        gmr = self.global_mean_reward
        out = []
        for d, lv in enumerate(self._levels()):
            k = d + 1
            if not min_length <= k <= max_length:
                continue
            count = lv["count"]
            utility = lv["reward_sum"] / count.to(torch.float64) - gmr
            age = step - lv["first_seen"].to(torch.int64)
            keep = (count >= min_frequency) & (utility > min_utility) & (lv["entropy"] < max_entropy) & (age >= min_age)
            idx = torch.nonzero(keep).flatten()
            if idx.numel() == 0:
                continue
            c, u, h, a = count[idx].double(), utility[idx], lv["entropy"][idx], age[idx]
            score = w[0] * torch.log(c) + w[1] * u - w[2] * h + w[3] * a.double()
            experts = self._paths_of(k, idx).tolist()
            cols = [x.tolist() for x in (lv["start"][idx], count[idx], u, h, a, score)]
            for s, ex, cnt, uu, hh, aa, sc in zip(cols[0], experts, *cols[1:]):
                out.append(Motif(start_layer=s, experts=tuple(ex), count=cnt, utility=uu, entropy=hh, age=aa,
                                 score=sc))
        out.sort(key=lambda m: (-m.utility, -m.score, m.start_layer, m.experts))
        return out

    # ---- persistence ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        sd = {k: t.detach().cpu().clone() for k, t in self._arrays.items()}
        sd["level_sizes"] = torch.tensor(self._level_sizes, dtype=torch.int64)
        sd["num_tokens"] = torch.tensor([self._tokens], dtype=torch.int64)
        sd["reward_total"] = torch.tensor([self._reward_total], dtype=torch.float64)
        sd["step"] = torch.tensor([self._step], dtype=torch.int64)
        sd["config"] = torch.tensor([FORMAT_VERSION, self.num_layers, self.num_experts, self.max_depth,
                                     _MODES.index(self.mode)], dtype=torch.int64)
        return sd

    def load_state_dict(self, sd: dict) -> None:
        """Replace this tree's contents; everything is checked before anything changes."""
        other = RoutingTree._from_state(sd, device=self.device)
        if (other.num_layers, other.num_experts, other.max_depth, other.mode) != \
                (self.num_layers, self.num_experts, self.max_depth, self.mode):
            raise ValueError("state_dict holds a tree with a different num_layers, num_experts, max_depth or mode")
        self.__dict__.update(other.__dict__)

    def save(self, path) -> None:
        """Write to a safetensors file (tensors + format version + hyper-parameters), atomically
        (see `_files.save_safetensors`)."""
        meta = {"format": "memtrace.RoutingTree", "format_version": str(FORMAT_VERSION),
                "hyper_parameters": json.dumps({"num_layers": self.num_layers, "num_experts": self.num_experts,
                                                "max_depth": self.max_depth, "mode": self.mode})}
        save_safetensors(self.state_dict(), path, meta)

    @classmethod
    def load(cls, path, device=None) -> RoutingTree:
        """Load a tree saved by `save`; a truncated or inconsistent file raises ValueError."""
        from safetensors import safe_open

        path = check_path(path)
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, FileNotFoundError):
            raise
        except Exception as exc:  # safetensors raises its own error types on damaged files
            raise ValueError(f"cannot read a RoutingTree from {path!r}: {exc}") from exc
        if meta.get("format") != "memtrace.RoutingTree":
            raise ValueError(f"{path!r} is not a memtrace RoutingTree file")
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise ValueError(f"unsupported RoutingTree format version {meta.get('format_version')!r}, "
                             f"expected {FORMAT_VERSION}")
        return cls._from_state(sd, device=device)

    @classmethod
    def _from_state(cls, sd: dict, device=None) -> RoutingTree:
        need = set(_KEYS) | {"level_sizes", "num_tokens", "reward_total", "step", "config"}
        if not isinstance(sd, dict):
            raise TypeError(f"state_dict must be a dict of tensors, got {type(sd).__name__}")
        if not need <= set(sd):
            raise ValueError(f"RoutingTree state is missing {sorted(need - set(sd))}")
        for k in sorted(need):
            if not isinstance(sd[k], torch.Tensor):
                raise TypeError(f"RoutingTree state: {k} must be a torch.Tensor, got {type(sd[k]).__name__}")
            V.check_not_meta(f"RoutingTree state: {k}", sd[k])
        cfg = sd["config"]
        if cfg.dtype != torch.int64 or cfg.shape != (5,):
            raise ValueError("RoutingTree state: config must be int64 [5]")
        version, L, E, D, mode = cfg.tolist()
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported RoutingTree format version {version}, expected {FORMAT_VERSION}")
        if mode not in (0, 1):
            raise ValueError(f"RoutingTree state: bad mode {mode}")
        tree = cls(L, E, D, _MODES[mode], device=device)  # validates the hyper-parameters
        arrays = {}
        for k, dt in _DTYPES.items():
            t = sd[k]
            if not isinstance(t, torch.Tensor) or t.dtype != dt or t.dim() != 1:
                raise ValueError(f"RoutingTree state: {k} must be a 1-D {dt} tensor")
            arrays[k] = t
        n = arrays["parent"].numel()
        if any(t.numel() != n for t in arrays.values()):
            raise ValueError("RoutingTree state: the node arrays differ in length")
        sizes_t = sd["level_sizes"]
        if sizes_t.dtype != torch.int64 or sizes_t.dim() != 1 or sizes_t.numel() > D:
            raise ValueError(f"RoutingTree state: level_sizes must be int64 [<= {D}]")
        sizes = sizes_t.tolist()
        if any(s < 1 for s in sizes) or sum(sizes) != n:
            raise ValueError("RoutingTree state: level_sizes must be positive and sum to the number of nodes")
        for name, shape, dt in (("num_tokens", (1,), torch.int64), ("reward_total", (1,), torch.float64),
                                ("step", (1,), torch.int64)):
            if sd[name].dtype != dt or tuple(sd[name].shape) != shape:
                raise ValueError(f"RoutingTree state: {name} must be {dt} {list(shape)}")
        tokens, reward_total, step = int(sd["num_tokens"][0]), float(sd["reward_total"][0]), int(sd["step"][0])
        if tokens < 0 or not math.isfinite(reward_total) or not 0 <= step <= V.MAX_ROUTING_STEP:
            raise ValueError("RoutingTree state: bad num_tokens, reward_total or step")
        _check_structure(arrays, sizes, L, E, tokens)
        tree._arrays = {k: t.to(tree.device).contiguous().clone() for k, t in arrays.items()}
        tree._level_sizes = [int(s) for s in sizes]
        tree._tokens, tree._reward_total, tree._step = tokens, reward_total, step
        return tree

    def to(self, device) -> RoutingTree:
        """A copy of this tree on `device`."""
        return RoutingTree._from_state(self.state_dict(), device=device)


def _sum_by(index: torch.Tensor, values: torch.Tensor, size: int) -> tuple:
    """Sums of non-negative int64 `values` grouped by `index` into `size` bins, as (high, low) with
    sum = high * 2^31 + low, 0 <= low < 2^31: no int64 wrap-around for up to 2^31 values."""
    mask = (1 << 31) - 1
    hi = torch.zeros(size, dtype=torch.int64, device=values.device).index_add_(0, index, values >> 31)
    lo = torch.zeros(size, dtype=torch.int64, device=values.device).index_add_(0, index, values & mask)
    return hi + (lo >> 31), lo & mask


def _exceeds(sums: tuple, limit: torch.Tensor) -> bool:
    """Whether any (high, low) sum of `_sum_by` is larger than the int64 `limit` (>= 0)."""
    hi, lo = sums
    lim_hi, lim_lo = limit >> 31, limit & ((1 << 31) - 1)
    return bool(((hi > lim_hi) | ((hi == lim_hi) & (lo > lim_lo))).any())


def _check_structure(arrays: dict, sizes: list, num_layers: int, num_experts: int, num_tokens: int) -> None:
    """The invariants of csrc/routing_trie.h, so that a loaded tree behaves like a built one."""
    offset, prev_size = 0, num_layers
    prev_count = None
    if any(arrays[k].numel() and int(arrays[k].min()) < 0 for k in ("first_seen", "last_seen")):
        raise ValueError("RoutingTree state: first_seen and last_seen must be steps >= 0")
    for size in sizes:
        par = arrays["parent"][offset:offset + size].to(torch.int64)
        exp = arrays["expert"][offset:offset + size].to(torch.int64)
        cnt = arrays["count"][offset:offset + size]
        if int(par.min()) < 0 or int(par.max()) >= prev_size:
            raise ValueError("RoutingTree state: a parent index is out of range")
        if int(exp.min()) < 0 or int(exp.max()) >= num_experts:
            raise ValueError("RoutingTree state: an expert id is out of range")
        key = (par << 16) | exp
        if size > 1 and not bool((key[1:] > key[:-1]).all()):
            raise ValueError("RoutingTree state: a level is not sorted by (parent, expert) without duplicates")
        if int(cnt.min()) < 1:
            raise ValueError("RoutingTree state: node counts must be >= 1")
        # a node's children together count at most its tokens; a root's (a start layer's) at most
        # num_tokens (each token enters every root at most once). Summed without int64 wrap-around,
        # so counts near 2^63 cannot pass by overflowing (issue 28)
        if prev_count is not None:
            if _exceeds(_sum_by(par, cnt, prev_count.numel()), prev_count):
                raise ValueError("RoutingTree state: children count more tokens than their parent")
        else:
            limit = torch.full((num_layers,), num_tokens, dtype=torch.int64, device=cnt.device)
            if _exceeds(_sum_by(par, cnt, num_layers), limit):
                raise ValueError(f"RoutingTree state: node counts exceed num_tokens={num_tokens}")
        if not bool(torch.isfinite(arrays["reward_sum"][offset:offset + size]).all()):
            raise ValueError("RoutingTree state: reward_sum holds NaN or Inf")
        prev_count, prev_size = cnt, size
        offset += size
