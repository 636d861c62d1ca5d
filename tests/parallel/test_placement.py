"""Placement plans: contiguous and load-balanced with redundant experts, the even split of an
expert's tokens among its replicas, and clear errors for plans that cannot work."""

from __future__ import annotations

import pytest
import torch

from workers.parallel import ExpertPlacement, LayerPlacement, PlacementError


def test_contiguous_gives_each_rank_a_block_of_experts():
    plan = ExpertPlacement.contiguous(8, 4)
    assert plan.layer(5).rank_experts == ((0, 1), (2, 3), (4, 5), (6, 7))
    holds = plan.holds(2)
    assert [e for e in range(8) if holds(3, e)] == [4, 5]
    rank, slot = plan.layer(1).route(torch.tensor([[0, 7], [5, 2]]))
    assert rank.tolist() == [0, 3, 2, 1] and slot.tolist() == [0, 1, 1, 0]


@pytest.mark.parametrize(
    "n_experts, ep_size, redundant, message",
    [
        (8, 3, 0, r"8 routed experts \+ 0 redundant do not split evenly over ep_size 3; .* \(redundant=1 would\)"),
        (8, 16, 0, "ep_size 16 is larger than the number of routed experts \\(8\\)"),
        (8, 4, 2, "redundant=4 would"),
        (8, 2, 9, "redundant 9 is too many"),
        (8, 0, 0, "ep_size must be ≥ 1"),
    ],
    ids=["not-divisible", "more-ranks-than-experts", "redundant-not-divisible", "too-redundant", "zero-ranks"],
)
def test_impossible_plans_are_clear_errors(n_experts, ep_size, redundant, message):
    with pytest.raises(PlacementError, match=message):
        ExpertPlacement.balanced(None, n_experts, ep_size, redundant=redundant)
    if redundant == 0:
        with pytest.raises(PlacementError, match=message):
            ExpertPlacement.contiguous(n_experts, ep_size)


def test_hand_written_plans_are_checked():
    with pytest.raises(PlacementError, match="experts \\[3\\] are held by no rank"):
        LayerPlacement(4, ((0, 1), (2,)))
    with pytest.raises(PlacementError, match="ascending without repeats"):
        LayerPlacement(4, ((0, 0, 1), (2, 3)))
    with pytest.raises(PlacementError, match="shape \\[8\\]"):
        ExpertPlacement.balanced(torch.ones(7), 8, 2)


def test_balanced_plan_replicates_hot_experts_and_evens_rank_load():
    load = torch.tensor([400.0, 10, 10, 10, 300, 10, 10, 10])
    plan = ExpertPlacement.balanced({3: load}, 8, 4, redundant=4)
    layer = plan.layer(3)
    assert all(len(experts) == 3 for experts in layer.rank_experts)  # (8 + 4) / 4 slots everywhere
    assert len(layer.replicas(0)) >= 2 and len(layer.replicas(4)) >= 2  # the hot ones got copies
    assert len({r for r, _ in layer.replicas(0)}) == len(layer.replicas(0))  # on distinct ranks
    before = ExpertPlacement.contiguous(8, 4).layer(3).rank_load(load)
    after = layer.rank_load(load)
    assert after.sum() == pytest.approx(load.sum())
    assert (after.max() / after.mean()) < (before.max() / before.mean())
    assert plan.layer(1) == plan.default  # layers without statistics: uniform


def test_replicas_split_an_experts_tokens_evenly_and_deterministically():
    plan = LayerPlacement(4, ((0, 1), (0, 2), (0, 3)))  # expert 0 on every rank
    ids = torch.stack([torch.zeros(30, dtype=torch.long), torch.arange(30) % 3 + 1], dim=1)
    rank, slot = plan.route(ids, src_rank=1)
    to_zero = rank.view(30, 2)[:, 0]
    assert torch.bincount(to_zero, minlength=3).tolist() == [10, 10, 10]
    assert (slot.view(30, 2)[:, 0] == 0).all()
    again, _ = plan.route(ids, src_rank=1)
    assert torch.equal(rank, again)
    # the other experts have one copy each: their owner, always
    assert (rank.view(30, 2)[:, 1] == (ids[:, 1] - 1)).all()


def test_placement_round_trips_through_json():
    plan = ExpertPlacement.balanced({1: torch.arange(8.0), 2: torch.ones(8)}, 8, 2, redundant=2)
    assert ExpertPlacement.from_json(plan.to_json()) == plan
    with pytest.raises(PlacementError, match="not an expert placement"):
        ExpertPlacement.from_json("{}")
