"""Expert parallelism as a transform of a built single-device model (the model files know nothing of it).

``parallelize(model, placement, group)`` swaps each ``MoE.routed`` (per instance) for an
``ExpertParallelMoE`` that holds only this rank's experts. Gate, shared experts, attention and dense
layers are untouched and run wherever the tokens are. One exchange per MoE layer and forward:

1. header all-to-all: each rank tells each other rank the layer and how many rows it sends per local
   slot (``[op, rows, rows per slot...]``, fixed width, so a waiting rank can receive it);
2. dispatch all-to-all: one row per (token, expert) assignment, sorted by destination rank and slot;
3. the destination runs its experts on the rows it received;
4. combine all-to-all: the results travel back, and the source sums ``w · E(x)`` per token in
   ascending expert order — the reference ``MoE.routed`` order, so EP gives the same numbers.

Who originates tokens is up to the caller: in the serving setup rank 0 runs the engine (the whole model
on every token) and the other ranks ``serve()`` exchanges as expert servers; in a data-parallel setup
every rank runs its own tokens through ``routed`` in lockstep. Both use the same exchange.

Shape legend: N tokens, k experts per token, D hidden, R ranks, S slots (max experts per rank), M rows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

import torch
from torch import nn

from workers.model.model import DeepseekV32
from workers.model.moe import AbsentExpert, MoE

from .group import EPGroup, ExpertParallelError
from .placement import ExpertPlacement, LayerPlacement

log = logging.getLogger(__name__)

# Header ops (a wire code, not a Python value): ≥ 0 is the MoE layer being exchanged.
STOP = -1  # rank 0 is closing the group; expert servers return from serve()
HEARTBEAT = -2  # keeps idle ranks inside the collective timeout
WAIT = -3  # sent by a rank that only serves: it learns the op from the others
_HEAD = 2  # header columns before the per-slot counts: op, rows


class ExpertLoad:
    """Tokens routed to each expert per MoE layer, counted by the rank that owns the tokens (in the
    serving setup rank 0 sees every token). ``counts()`` feeds ``ExpertPlacement.balanced``; per layer
    the counts sum to tokens × experts-per-token."""

    def __init__(self, n_experts: int) -> None:
        self.n_experts = n_experts
        self._counts: dict[int, torch.Tensor] = {}
        self._tokens: dict[int, int] = {}

    def add(self, layer: int, ids: torch.Tensor) -> None:
        """ids: Long [N, k] of one forward's tokens."""
        counts = torch.bincount(ids.flatten(), minlength=self.n_experts)
        self._counts[layer] = counts if layer not in self._counts else self._counts[layer] + counts
        self._tokens[layer] = self._tokens.get(layer, 0) + ids.shape[0]

    def counts(self) -> dict[int, torch.Tensor]:
        """layer → Long [E] (on CPU)."""
        return {layer: c.cpu() for layer, c in sorted(self._counts.items())}

    def tokens(self) -> dict[int, int]:
        """layer → tokens routed through it."""
        return dict(sorted(self._tokens.items()))

    def reset(self) -> None:
        self._counts.clear()
        self._tokens.clear()


class ExpertParallelMoE:
    """The routed experts of one MoE layer on one EP rank. ``routed`` has ``MoE.routed``'s contract.

    Args:
        layer: the layer index (``Block.layer``) all ranks use to name this exchange.
        experts: expert id → module for every expert ``plan`` puts on this rank.
        plan: the layer's placement.
        owner: the ``ExpertParallel`` whose group and exchange this layer uses.
    """

    def __init__(self, layer: int, experts: Mapping[int, nn.Module], plan: LayerPlacement, owner: "ExpertParallel") -> None:
        mine = plan.rank_experts[owner.group.rank]
        if sorted(experts) != list(mine):
            raise ExpertParallelError(f"layer {layer}: rank {owner.group.rank} should hold experts {list(mine)}, got {sorted(experts)}")
        self.layer, self.plan, self.owner = layer, plan, owner
        self.local = [experts[e] for e in mine]  # local slot s → module

    def routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x: [N, D], weights float32 [N, k], ids Long [N, k] → Σ_i w_i · E_{ids_i}(x), [N, D]."""
        group, width = self.owner.group, self.owner.width
        n, k = ids.shape
        self.owner.load.add(self.layer, ids)
        rank, slot = self.plan.route(ids, group.rank)
        key = rank * width + slot
        order = key.argsort(stable=True)  # by destination, then slot, then token
        counts = torch.bincount(key, minlength=group.size * width).view(group.size, width)
        back = self.owner.exchange(self.layer, x[order // k], counts)
        y = torch.empty_like(back)
        y[order] = back
        y = y.view(n, k, x.shape[-1])
        # Sum in ascending expert order from zero, as MoE.routed does: the same float32 additions.
        out = torch.zeros(n, x.shape[-1], dtype=torch.float32, device=x.device)
        rows = torch.arange(n, device=x.device)
        by_expert = ids.argsort(dim=1)
        for j in range(k):
            s = by_expert[:, j]
            out += y[rows, s].float() * weights[rows, s, None]
        return out.to(x.dtype)

    def compute(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Run the local experts on received rows [M, D]; counts Long [R, S] = rows per (source, slot),
        in arrival order → outputs [M, D] in the same order."""
        out = torch.empty_like(rows)
        if rows.shape[0] == 0:
            return out
        width = counts.shape[1]
        slots = torch.arange(width, device=rows.device).repeat(counts.shape[0])
        slot_of_row = torch.repeat_interleave(slots, counts.flatten().to(rows.device))
        for s, n in enumerate(counts.sum(0).tolist()):
            if n == 0:
                continue
            if s >= len(self.local):
                raise ExpertParallelError(f"layer {self.layer}: rank {self.owner.group.rank} has no slot {s}")
            idx = torch.nonzero(slot_of_row == s).squeeze(1)
            out[idx] = self.local[s](rows[idx]).to(out.dtype)
        return out


class ExpertParallel:
    """The expert-parallel MoE layers of one rank, their exchange, and the serving roles.

    Built by ``parallelize`` for a model, or layer by layer with ``add_layer`` (benchmarks).

    Attributes:
        layers: MoE layer index → its ``ExpertParallelMoE``.
        load: per-expert token counts of the tokens this rank routed.
        group: the ``EPGroup`` (traffic counters, ``error`` once broken).
    """

    def __init__(self, placement: ExpertPlacement, group: EPGroup, *, dim: int, dtype: torch.dtype) -> None:
        if placement.ep_size != group.size:
            raise ExpertParallelError(f"placement is for {placement.ep_size} ranks, the group has {group.size}")
        self.placement, self.group = placement, group
        self.dim, self.dtype = dim, dtype
        self.width = placement.max_slots
        self.load = ExpertLoad(placement.n_experts)
        self.layers: dict[int, ExpertParallelMoE] = {}
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def add_layer(self, layer: int, experts: Mapping[int, nn.Module]) -> ExpertParallelMoE:
        """Register layer ``layer`` with this rank's experts (expert id → module, as the plan says)."""
        epm = ExpertParallelMoE(layer, experts, self.placement.layer(layer), self)
        self.layers[layer] = epm
        return epm

    @property
    def error(self) -> str | None:
        return self.group.error

    # ------------------------------------------------------------------ the exchange
    def exchange(self, op: int, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """One exchange (see the module docstring): send ``rows`` [m, D], sorted by destination rank
        and slot with ``counts`` Long [R, S] rows per (rank, slot); return their expert outputs [m, D]
        in the same order. Also serves the rows other ranks send here."""
        return self._exchange(op, rows, counts)[1]

    def _exchange(self, op: int, rows: torch.Tensor, counts: torch.Tensor) -> tuple[int, torch.Tensor]:
        group = self.group
        with group.lock:
            group.check()
            try:
                sent = counts.sum(1)
                header = torch.cat([torch.tensor([[op]] * group.size, device=counts.device), sent[:, None], counts], dim=1)
                got = group.all_to_all(header.to(group.device)).cpu()
                op = self._resolve(op, got[:, 0].tolist())
                self._last = time.monotonic()
                if op < 0:
                    return op, rows
                epm = self.layers.get(op)
                if epm is None:
                    raise group.fail(f"EP rank {group.rank}: asked to exchange layer {op}, which is not an MoE layer here")
                recv_splits, send_splits = got[:, 1].tolist(), sent.tolist()
                received = group.all_to_all(rows, recv_splits, send_splits)
                out = epm.compute(received, got[:, _HEAD:])
                return op, group.all_to_all(out, send_splits, recv_splits)
            except ExpertParallelError:
                raise
            except Exception as e:  # gloo/NCCL: a peer closed its sockets or timed out; or a local bug
                raise group.fail(
                    f"expert-parallel rank {group.rank}/{group.size}: exchange failed ({_first_line(e)}); an EP rank "
                    f"died or hung (or failed), this replica cannot run forwards"
                ) from None

    def _resolve(self, op: int, ops: list[int]) -> int:
        real = {o for o in ops if o != WAIT}
        if len(real) > 1:
            raise self.group.fail(f"EP ranks out of step: ops {ops} in one exchange")
        return real.pop() if real else op

    def _empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.empty(0, self.dim, dtype=self.dtype, device=self.group.device)
        return rows, torch.zeros(self.group.size, self.width, dtype=torch.long, device=self.group.device)

    # ------------------------------------------------------------------ serving roles
    def serve(self) -> None:
        """Expert-server loop (ranks > 0 in the serving setup): serve exchanges until rank 0 sends
        STOP. Raises ExpertParallelError when the group breaks (rank 0 died, a peer hung)."""
        rows, counts = self._empty()
        while True:
            op, _ = self._exchange(WAIT, rows, counts)
            if op == STOP:
                return

    def start_heartbeat(self, interval_s: float | None = None) -> "ExpertParallel":
        """Rank 0: send an empty exchange whenever none ran for ``interval_s`` (default: a quarter of
        the group timeout), so that waiting expert servers never time out while this rank is alive,
        and a dead one is noticed while idle (``error``)."""
        if self.group.size == 1 or self._heartbeat is not None:
            return self
        interval = interval_s or max(0.1, self.group.timeout_s / 4)

        def run() -> None:
            rows, counts = self._empty()
            while not self._stop.wait(interval / 4):
                if time.monotonic() - self._last < interval:
                    continue
                try:
                    self._exchange(HEARTBEAT, rows, counts)
                except ExpertParallelError as e:
                    log.error("%s", e)
                    return

        self._heartbeat = threading.Thread(target=run, name="ep-heartbeat", daemon=True)
        self._heartbeat.start()
        return self

    def close(self, *, stop_servers: bool = True) -> None:
        """Stop the heartbeat, tell the expert servers to return (rank 0), leave the group."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=self.group.timeout_s)
        if stop_servers and self.group.rank == 0 and self.group.size > 1 and self.group.healthy:
            try:
                self._exchange(STOP, *self._empty())
            except ExpertParallelError:
                pass
        self.group.close()

    def stats(self, *, load: bool = True) -> dict:
        """JSON-able: size, health, traffic, and (``load``) the per-layer expert load."""
        t = self.group.traffic
        out = {
            "ep_size": self.group.size, "rank": self.group.rank, "healthy": self.group.healthy,
            "error": self.group.error, "collectives": t.collectives, "bytes_sent": t.bytes_sent,
            "collective_s": round(t.seconds, 6),
        }
        if load:
            out["expert_load"] = {str(layer): c.tolist() for layer, c in self.load.counts().items()}
        return out


def parallelize(model: DeepseekV32, placement: ExpertPlacement, group: EPGroup) -> ExpertParallel:
    """Make ``model``'s MoE layers expert-parallel in place: each keeps only this rank's experts
    (others become ``AbsentExpert``; load the model with ``experts=placement.holds(rank)`` to never
    read them) and its ``routed`` goes through the group. Every rank must call it with the same
    placement."""
    if placement.n_experts != model.config.n_routed_experts:
        raise ExpertParallelError(f"placement is for {placement.n_experts} experts, the model has {model.config.n_routed_experts}")
    ep = ExpertParallel(placement, group, dim=model.config.hidden_size, dtype=model.embed.weight.dtype)
    for block in list(model.layers) + [m.block for m in model.mtp]:
        if not isinstance(block.ffn, MoE):
            continue
        layer, moe = block.layer, block.ffn
        mine = set(placement.layer(layer).rank_experts[group.rank])
        local = {}
        for e in range(len(moe.experts)):
            if e in mine:
                if isinstance(moe.experts[e], AbsentExpert):
                    raise ExpertParallelError(f"rank {group.rank} must hold expert {e} of layer {layer}, but it was not loaded")
                local[e] = moe.experts[e]
            elif not isinstance(moe.experts[e], AbsentExpert):
                moe.experts[e] = AbsentExpert(layer, e)  # another rank's: drop the weights
        moe.routed = ep.add_layer(layer, local).routed  # per instance: MoE.forward calls self.routed
    return ep


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
