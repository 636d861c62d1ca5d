"""Expert placement: which EP rank holds which routed experts, per MoE layer.

A plan maps each layer's E routed experts onto ``ep_size`` ranks. ``contiguous`` gives rank r experts
``[r·E/ep, (r+1)·E/ep)``; ``balanced`` packs experts by observed load and adds ``redundant`` extra
copies of the hottest ones (DeepSeek's EPLB idea: V3 serves with 32 redundant experts), so that every
rank gets about the same number of tokens. An expert with several replicas has its tokens split among
them deterministically (``LayerPlacement.route``).

Shape legend: N tokens, k experts per token, E routed experts, R ranks (``ep_size``), S local slots.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import torch


class PlacementError(ValueError):
    """A placement plan that cannot work (the message says why and what would)."""


@dataclass(frozen=True)
class LayerPlacement:
    """One MoE layer's plan: ``rank_experts[r]`` = the experts rank r holds, ascending; rank r's local
    slot s holds expert ``rank_experts[r][s]``. Every expert is held by at least one rank, and a rank
    holds an expert at most once."""

    n_experts: int
    rank_experts: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        held: set[int] = set()
        for rank, experts in enumerate(self.rank_experts):
            if len(set(experts)) != len(experts) or list(experts) != sorted(experts):
                raise PlacementError(f"rank {rank}: experts {list(experts)} must be ascending without repeats")
            if not experts:
                raise PlacementError(f"rank {rank} holds no expert")
            bad = [e for e in experts if not 0 <= e < self.n_experts]
            if bad:
                raise PlacementError(f"rank {rank}: expert ids {bad} are outside [0, {self.n_experts})")
            held.update(experts)
        missing = sorted(set(range(self.n_experts)) - held)
        if missing:
            raise PlacementError(f"experts {missing} are held by no rank")

    @property
    def ep_size(self) -> int:
        return len(self.rank_experts)

    @property
    def slots_per_rank(self) -> int:
        return max(len(experts) for experts in self.rank_experts)

    @property
    def redundant(self) -> int:
        """Replicas beyond one per expert."""
        return sum(len(experts) for experts in self.rank_experts) - self.n_experts

    def replicas(self, expert: int) -> tuple[tuple[int, int], ...]:
        """(rank, local slot) of every copy of ``expert``, ranks ascending."""
        return tuple((r, experts.index(expert)) for r, experts in enumerate(self.rank_experts) if expert in experts)

    @cached_property
    def _tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """replica count [E], replica rank [E, max replicas], replica slot [E, max replicas]."""
        reps = [self.replicas(e) for e in range(self.n_experts)]
        width = max(len(r) for r in reps)
        count = torch.tensor([len(r) for r in reps], dtype=torch.long)
        rank = torch.tensor([[r[min(j, len(r) - 1)][0] for j in range(width)] for r in reps], dtype=torch.long)
        slot = torch.tensor([[r[min(j, len(r) - 1)][1] for j in range(width)] for r in reps], dtype=torch.long)
        return count, rank, slot

    def __getstate__(self) -> dict:
        return {"n_experts": self.n_experts, "rank_experts": self.rank_experts}  # not the cached tables

    @cached_property
    def _device_tables(self) -> dict[torch.device, tuple[torch.Tensor, ...]]:
        return {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The tables on ``device``, copied there once (no host→device copy per forward)."""
        if device not in self._device_tables:
            self._device_tables[device] = tuple(t.to(device) for t in self._tables)
        return self._device_tables[device]

    def route(self, ids: torch.Tensor, src_rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each (token, expert) assignment goes: ids Long [N, k] → (rank, local slot), Long [N·k]
        each, in ``ids.flatten()`` order.

        An expert with c replicas sends its j-th assignment (in token order) to replica
        ``(j + src_rank) mod c``: an even split, the same on every run, and offset per source rank so
        that many sources do not all start on the first replica.
        """
        count, rank, slot = self._on(ids.device)
        flat = ids.flatten()
        if rank.shape[1] == 1:
            return rank[flat, 0], slot[flat, 0]
        sorted_ids, perm = flat.sort(stable=True)
        first = torch.searchsorted(sorted_ids, sorted_ids)  # start of each expert's run
        ordinal = torch.empty_like(flat)
        ordinal[perm] = torch.arange(flat.numel(), device=flat.device) - first
        j = (ordinal + src_rank) % count[flat]
        return rank[flat, j], slot[flat, j]

    def rank_load(self, expert_load: torch.Tensor) -> torch.Tensor:
        """Expected tokens per rank, float [R], for expert loads [E] split evenly among replicas."""
        count = self._tables[0].to(torch.float64)
        per_replica = expert_load.to(torch.float64).cpu() / count
        return torch.tensor([float(per_replica[list(experts)].sum()) for experts in self.rank_experts])


@dataclass(frozen=True)
class ExpertPlacement:
    """The plan of a whole model: a ``LayerPlacement`` per MoE layer (layers not listed in ``layers``
    use ``default``). Layer indices are ``Block.layer`` (MTP blocks: ``num_hidden_layers + j``)."""

    ep_size: int
    n_experts: int
    default: LayerPlacement
    layers: Mapping[int, LayerPlacement] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for which, plan in [("default", self.default), *self.layers.items()]:
            if plan.ep_size != self.ep_size or plan.n_experts != self.n_experts:
                raise PlacementError(
                    f"layer {which}: plan for {plan.ep_size} ranks × {plan.n_experts} experts in a placement of "
                    f"{self.ep_size} ranks × {self.n_experts} experts"
                )

    def layer(self, layer: int) -> LayerPlacement:
        return self.layers.get(layer, self.default)

    @property
    def max_slots(self) -> int:
        """The most experts any rank holds in any layer."""
        return max(p.slots_per_rank for p in [self.default, *self.layers.values()])

    def holds(self, rank: int) -> Callable[[int, int], bool]:
        """``(layer, expert) → bool``: whether ``rank`` holds that expert (``load_model(experts=...)``)."""
        if not 0 <= rank < self.ep_size:
            raise PlacementError(f"rank {rank} is outside [0, {self.ep_size})")
        sets: dict[int | None, frozenset[int]] = {i: frozenset(p.rank_experts[rank]) for i, p in self.layers.items()}
        sets[None] = frozenset(self.default.rank_experts[rank])
        return lambda layer, expert: expert in sets.get(layer, sets[None])

    @classmethod
    def contiguous(cls, n_experts: int, ep_size: int) -> "ExpertPlacement":
        """Rank r holds experts ``[r·E/ep, (r+1)·E/ep)`` in every layer."""
        _check(n_experts, ep_size, 0)
        per = n_experts // ep_size
        plan = LayerPlacement(n_experts, tuple(tuple(range(r * per, (r + 1) * per)) for r in range(ep_size)))
        return cls(ep_size, n_experts, plan)

    @classmethod
    def balanced(
        cls,
        load: torch.Tensor | Mapping[int, torch.Tensor] | None,
        n_experts: int,
        ep_size: int,
        *,
        redundant: int = 0,
    ) -> "ExpertPlacement":
        """A plan balanced by observed per-expert load.

        Args:
            load: tokens per expert, [E] (every layer) or ``{layer: [E]}`` (``ExpertLoad.counts()``);
                None or layers not given: uniform load.
            n_experts: E.
            ep_size: ranks.
            redundant: extra expert copies in each layer; ``n_experts + redundant`` must be a multiple
                of ``ep_size``. Copies go to the experts with the most load per copy.
        """
        _check(n_experts, ep_size, redundant)
        uniform = _balance(torch.ones(n_experts), ep_size, redundant)
        if load is None:
            return cls(ep_size, n_experts, uniform)
        if isinstance(load, torch.Tensor):
            return cls(ep_size, n_experts, _balance(_as_load(load, n_experts, "load"), ep_size, redundant))
        layers = {int(i): _balance(_as_load(t, n_experts, f"load[{i}]"), ep_size, redundant) for i, t in load.items()}
        return cls(ep_size, n_experts, uniform, layers)

    def to_json(self) -> str:
        doc = {
            "ep_size": self.ep_size, "n_experts": self.n_experts,
            "default": [list(e) for e in self.default.rank_experts],
            "layers": {str(i): [list(e) for e in p.rank_experts] for i, p in sorted(self.layers.items())},
        }
        return json.dumps(doc)

    @classmethod
    def from_json(cls, text: str) -> "ExpertPlacement":
        try:
            doc = json.loads(text)
            n = int(doc["n_experts"])

            def plan(ranks: list) -> LayerPlacement:
                return LayerPlacement(n, tuple(tuple(int(e) for e in experts) for experts in ranks))

            layers = {int(i): plan(p) for i, p in doc.get("layers", {}).items()}
            return cls(int(doc["ep_size"]), n, plan(doc["default"]), layers)
        except (ValueError, KeyError, TypeError) as e:
            raise PlacementError(f"not an expert placement ({e})") from None


def _check(n_experts: int, ep_size: int, redundant: int) -> None:
    if ep_size < 1:
        raise PlacementError(f"ep_size must be ≥ 1, got {ep_size}")
    if ep_size > n_experts:
        raise PlacementError(
            f"ep_size {ep_size} is larger than the number of routed experts ({n_experts}): every rank must "
            f"hold at least one expert; use ep_size ≤ {n_experts}"
        )
    if redundant < 0:
        raise PlacementError(f"redundant must be ≥ 0, got {redundant}")
    if redundant > n_experts * (ep_size - 1):
        raise PlacementError(
            f"redundant {redundant} is too many: {n_experts} experts on {ep_size} ranks can have at most "
            f"{n_experts * (ep_size - 1)} extra copies (one per rank)"
        )
    if (n_experts + redundant) % ep_size:
        need = -(n_experts + redundant) % ep_size
        hint = "add redundant experts" if redundant == 0 else "change redundant"
        raise PlacementError(
            f"{n_experts} routed experts + {redundant} redundant do not split evenly over ep_size {ep_size}; use "
            f"an ep_size that divides {n_experts + redundant}, or {hint} (redundant={redundant + need} would)"
        )


def _as_load(t: torch.Tensor, n_experts: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(t).to(torch.float64).cpu()
    if t.shape != (n_experts,):
        raise PlacementError(f"{what}: expected one load per expert, shape [{n_experts}], got {list(t.shape)}")
    if bool((t < 0).any()):
        raise PlacementError(f"{what}: loads must be ≥ 0")
    return t


def _balance(load: torch.Tensor, ep_size: int, redundant: int) -> LayerPlacement:
    """Replicate the experts with the most load per copy, then pack copies onto ranks (largest first,
    each onto the least-loaded rank with a free slot that does not hold it yet)."""
    n = load.numel()
    copies = [1] * n
    for _ in range(redundant):
        e = max((e for e in range(n) if copies[e] < ep_size), key=lambda e: (load[e].item() / copies[e], -e))
        copies[e] += 1
    slots = (n + redundant) // ep_size
    replicas = sorted(((load[e].item() / copies[e], e) for e in range(n) for _ in range(copies[e])), key=lambda r: (-r[0], r[1]))
    held: list[list[int]] = [[] for _ in range(ep_size)]
    rank_load = [0.0] * ep_size
    for share, e in replicas:
        free = [r for r in range(ep_size) if len(held[r]) < slots and e not in held[r]]
        if not free:  # the only free slots are on ranks that hold e: swap e with a copy elsewhere
            r_free = next(r for r in range(ep_size) if len(held[r]) < slots)
            r_swap, moved = next((r, f) for r in range(ep_size) if e not in held[r] for f in held[r] if f not in held[r_free])
            held[r_swap].remove(moved)
            held[r_free].append(moved)
            moved_share = load[moved].item() / copies[moved]
            rank_load[r_swap] -= moved_share
            rank_load[r_free] += moved_share
            free = [r_swap]
        r = min(free, key=lambda r: (rank_load[r], r))
        held[r].append(e)
        rank_load[r] += share
    return LayerPlacement(n, tuple(tuple(sorted(h)) for h in held))
