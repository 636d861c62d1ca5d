"""Feed-forward parts: the SwiGLU MLP (dense layers, experts), the noaux_tc Gate, and the MoE.

Shape legend: N tokens (batch·sequence flattened), E routed experts, k experts per token, G groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers import kernels

from .config import ModelConfig


class MLP(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) ⊙ w3 x)``. x: [..., dim] → [..., dim]."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class AbsentExpert(nn.Module):
    """Stands in for a routed expert this process does not hold: loaded with an ``experts`` filter
    (``load_model``), or held by another expert-parallel rank. No weights; calling it is an error."""

    def __init__(self, layer: int, expert: int) -> None:
        super().__init__()
        self.layer, self.expert = layer, expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            f"expert {self.expert} of layer {self.layer} is not held by this process (the model was loaded "
            "with an experts filter): run it through workers.parallel, which sends tokens to the rank holding it"
        )

    def extra_repr(self) -> str:
        return f"layer={self.layer}, expert={self.expert}"


class Gate(nn.Module):
    """DeepSeek-V3's auxiliary-loss-free router (``noaux_tc``).

    ``s = sigmoid(x W_gᵀ)`` in float32; the correction ``bias`` steers *selection* only: groups are
    ranked by the sum of their top-2 biased scores, the best ``topk_group`` groups are kept, and the
    top-k biased scores among them pick the experts. Weights are the *unbiased* scores of the chosen
    experts, normalized to sum 1 (when ``norm_topk_prob``) and multiplied by ``routed_scaling_factor``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.topk = config.num_experts_per_tok
        self.n_groups = config.n_group
        self.topk_groups = config.topk_group
        self.normalize = config.norm_topk_prob
        self.route_scale = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(self.n_experts, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, dim] → (weights float32 [N, k], expert ids Long [N, k])."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        biased = scores + self.bias.float()
        if self.n_groups > 1:
            grouped = biased.view(-1, self.n_groups, self.n_experts // self.n_groups)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
            keep = group_scores.topk(self.topk_groups, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            biased = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
        ids = biased.topk(self.topk, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, ids


class MoE(nn.Module):
    """Routed experts plus always-on shared experts. x: [..., dim] → [..., dim].

    Routed experts run grouped: one GEMM per active expert over its tokens (``routed``, the reference).
    On CUDA, once ``workers.kernels.moe.stack_experts`` has set ``stacked`` (the engine does), they run
    as the fused Triton kernel instead: no host sync, a fixed launch sequence a CUDA graph can capture.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim, inter = config.hidden_size, config.moe_intermediate_size
        self.gate = Gate(config)
        self.experts = nn.ModuleList(MLP(dim, inter) for _ in range(config.n_routed_experts))
        self.shared_experts = MLP(dim, inter * config.n_shared_experts) if config.n_shared_experts else None
        self.stacked = None  # workers.kernels.moe.StackedExperts: views of the experts' weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.gate(x)
        if self.stacked is not None and kernels.available(x):
            from workers.kernels.moe import fused_moe

            out = fused_moe(x, weights, ids, self.stacked)
        else:
            out = self.routed(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)

    def routed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x: [N, dim], weights float32 [N, k], ids Long [N, k] → Σ_i w_i · E_{ids_i}(x), [N, dim].

        Tokens are grouped by expert (one stable sort), so each active expert runs one GEMM over a
        contiguous slice; contributions are summed per token in ascending expert order.
        """
        n, k = ids.shape
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        token = order // k
        xs = x[token]
        ys = torch.empty_like(xs)
        start = 0
        for e, count in enumerate(counts):
            if count:
                ys[start : start + count] = self.experts[e](xs[start : start + count])
                start += count
        out = torch.zeros_like(x, dtype=torch.float32)
        return out.index_add_(0, token, ys.float() * weights.flatten()[order, None]).to(x.dtype)
