"""Expert parallelism around the single-device model (``workers.model`` stays parallelism-free).

- ``placement``: which rank holds which routed experts (contiguous, or balanced by load with redundant
  copies of hot experts).
- ``group``: the process group and its all-to-all, with timeouts (gloo on CPU, NCCL on GPU).
- ``expert_parallel``: ``parallelize(model, placement, group)`` swaps each MoE layer's routed-expert
  computation for a dispatch → local experts → combine exchange; per-expert load statistics.
- ``rank``: one rank's start-up (load only its experts, join the group) and the expert-server loop.
"""

from workers.parallel.expert_parallel import ExpertLoad, ExpertParallel, ExpertParallelMoE, parallelize
from workers.parallel.group import EPGroup, ExpertParallelError
from workers.parallel.placement import ExpertPlacement, LayerPlacement, PlacementError
from workers.parallel.rank import RankSpec, run_expert_server, serve_rank, start_rank

__all__ = [
    "EPGroup", "ExpertLoad", "ExpertParallel", "ExpertParallelError", "ExpertParallelMoE", "ExpertPlacement",
    "LayerPlacement", "PlacementError", "RankSpec", "parallelize", "run_expert_server", "serve_rank", "start_rank",
]
