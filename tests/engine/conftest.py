"""Small real checkpoints (written by our own writer) for engine tests."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from workers.model.presets import load_preset
from workers.model.writer import random_state_dict, write_checkpoint

VOCAB = 1024


def _write(path, *, fp8: bool, seed: int):
    cfg = dataclasses.replace(load_preset("tiny"), vocab_size=VOCAB)
    write_checkpoint(path, cfg, random_state_dict(cfg, seed=seed), fp8=fp8)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("tiny"), fp8=False, seed=1)


@pytest.fixture(scope="session")
def tiny_fp8_ckpt(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("tiny-fp8"), fp8=True, seed=2)


def prompt(n: int, seed: int = 0) -> tuple[int, ...]:
    return tuple(torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist())


@torch.inference_mode()
def reference_greedy(model, prompt_ids, n: int) -> list[int]:
    """Plain argmax decoding with a full recompute each step (the model's reference path)."""
    ids = list(prompt_ids)
    for _ in range(n):
        ids.append(int(model.logits(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt_ids) :]
