"""Paged storage: one contiguous region per block across layers; step writes and block reads."""

from __future__ import annotations

import torch

from kvstore.paged import BlockLayout, PagedKVStorage
from workers.model.config import ModelConfig
from workers.model.indexer import IndexKeys, ue8m0_quantize
from workers.model.step import StepBatch, read_batch_rows, read_rows
from workers.model.step_attention import write_step

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=2,
    first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
    topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
    index_n_heads=2, index_head_dim=16, index_topk=8,
)


def _layout(index_dtype=torch.float32):
    return BlockLayout(num_layers=2, block_size=4, latent_dim=CFG.latent_dim, latent_dtype=torch.float32,
                       index_dim=CFG.index_head_dim, index_dtype=index_dtype)


def test_step_writes_land_in_scattered_blocks_and_read_back_in_order():
    storage = PagedKVStorage(_layout(), num_blocks=8)
    tables = [[5, 2, 7], [1, 6]]  # scattered blocks; sequences of 10 and 7 tokens, written in two steps
    latent = torch.randn(2, 10, CFG.latent_dim)
    keys = IndexKeys(torch.randn(2, 10, CFG.index_head_dim), torch.rand(2, 10) + 0.5)
    for layer in range(2):
        for lo, hi in ((0, 6), (6, 10)):
            n = [hi - lo, min(hi, 7) - lo]
            batch = StepBatch.build(tables, n, [hi, min(hi, 7)], 0, 4)
            rows = torch.cat([latent[0, lo:hi], latent[1, lo : lo + n[1]]])
            ks = IndexKeys(torch.cat([keys.values[0, lo:hi], keys.values[1, lo : lo + n[1]]]),
                           torch.cat([keys.scale[0, lo:hi], keys.scale[1, lo : lo + n[1]]]))
            write_step(storage, layer, batch, rows * (layer + 1), ks)
    for layer in range(2):
        for seq, length in ((0, 10), (1, 7)):
            table = torch.tensor(tables[seq])
            assert torch.equal(read_rows(storage.latent(layer), table, length), latent[seq, :length] * (layer + 1))
            assert torch.equal(read_rows(storage.index_k(layer), table, length), keys.values[seq, :length])
            assert torch.equal(read_rows(storage.index_scale(layer), table, length), keys.scale[seq, :length])
        both = read_batch_rows(storage.latent(layer), torch.tensor([[5, 2, 7], [1, 6, 0]]), 10)
        assert torch.equal(both[1, :7], latent[1, :7] * (layer + 1))


def test_a_block_is_one_contiguous_region_across_layers():
    storage = PagedKVStorage(_layout(torch.float8_e4m3fn), num_blocks=3)
    batch = StepBatch.build([[1]], [4], [4], 0, 4)
    lat = torch.randn(4, CFG.latent_dim)
    k8, scale = ue8m0_quantize(torch.randn(4, CFG.index_head_dim))
    for layer in range(2):
        write_step(storage, layer, batch, lat * (layer + 1), IndexKeys(k8, scale))
    data = storage.read_blocks([1])
    assert data.shape == (1, storage.layout.bytes_per_block)
    assert not storage.buffer[0].any() and not storage.buffer[2].any()  # nothing written elsewhere
    other = PagedKVStorage(_layout(torch.float8_e4m3fn), num_blocks=3)
    other.write_blocks([2], data)  # one region moves every layer's latents, keys and scales
    for layer in range(2):
        table = torch.tensor([2])
        assert torch.equal(read_rows(other.latent(layer), table, 4), lat * (layer + 1))
        moved = IndexKeys(read_rows(other.index_k(layer), table, 4), read_rows(other.index_scale(layer), table, 4))
        assert torch.equal(moved.dequantize(), IndexKeys(k8, scale).dequantize())
