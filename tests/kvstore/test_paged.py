"""Paged storage: one contiguous region per block across layers; the paged view is a KVCache."""

from __future__ import annotations

import torch

from kvstore.paged import BlockLayout, PagedKVStorage, PagedKVView
from workers.model.cache import ContiguousKVCache, KVCache
from workers.model.config import ModelConfig
from workers.model.indexer import IndexKeys, ue8m0_quantize

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=2,
    first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
    topk_group=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
    index_n_heads=2, index_head_dim=16, index_topk=8,
)


def _layout(index_dtype=torch.float32):
    return BlockLayout(num_layers=2, block_size=4, latent_dim=CFG.latent_dim, latent_dtype=torch.float32,
                       index_dim=CFG.index_head_dim, index_dtype=index_dtype)


def test_paged_view_equals_contiguous_cache():
    storage = PagedKVStorage(_layout(), num_blocks=8)
    tables = [[5, 2, 7], [1, 6]]  # scattered blocks; sequence lengths 10 and 7
    lens = [10, 7]
    view = PagedKVView(storage, tables, lens)
    assert isinstance(view, KVCache)
    dense = ContiguousKVCache(CFG, 2, 16, num_layers=2)
    pos = torch.tensor([list(range(10)), list(range(7)) + [7, 8, 9]])
    for layer in range(2):
        latent = torch.randn(2, 10, CFG.latent_dim)
        keys = IndexKeys(torch.randn(2, 10, CFG.index_head_dim), torch.rand(2, 10) + 0.5)
        view.write(layer, pos[:, :7], latent[:, :7], IndexKeys(keys.values[:, :7], keys.scale[:, :7]))
        view.write(layer, pos[:1, 7:], latent[:1, 7:], IndexKeys(keys.values[:1, 7:], keys.scale[:1, 7:]))
        dense.write(layer, pos[:, :7], latent[:, :7], IndexKeys(keys.values[:, :7], keys.scale[:, :7]))
        dense.write(layer, pos[:1, 7:], latent[:1, 7:], IndexKeys(keys.values[:1, 7:], keys.scale[:1, 7:]))
    dense.length = torch.tensor(lens)
    for layer in range(2):
        (pk, ppos), (dk, dpos) = view.index_keys(layer), dense.index_keys(layer)
        assert torch.equal(ppos, dpos)
        visible = ppos != torch.iinfo(torch.long).max
        assert torch.equal(pk.values[visible], dk.values[visible]) and torch.equal(pk.scale[visible], dk.scale[visible])
        idx = torch.tensor([[[0, 9, 4]], [[6, 2, 0]]])
        assert torch.equal(view.gather_latents(layer, idx), dense.gather_latents(layer, idx))


def test_a_block_is_one_contiguous_region_across_layers():
    storage = PagedKVStorage(_layout(torch.float8_e4m3fn), num_blocks=3)
    view = PagedKVView(storage, [[1]], [4])
    lat = torch.randn(1, 4, CFG.latent_dim)
    k8, scale = ue8m0_quantize(torch.randn(1, 4, CFG.index_head_dim))
    for layer in range(2):
        view.write(layer, torch.arange(4)[None], lat * (layer + 1), IndexKeys(k8, scale))
    data = storage.read_blocks([1])
    assert data.shape == (1, storage.layout.bytes_per_block)
    assert not storage.buffer[0].any() and not storage.buffer[2].any()  # nothing written elsewhere
    other = PagedKVStorage(_layout(torch.float8_e4m3fn), num_blocks=3)
    other.write_blocks([2], data)  # one region moves every layer's latents, keys and scales
    moved = PagedKVView(other, [[2]], [4])
    for layer in range(2):
        assert torch.equal(moved.latents(layer), lat * (layer + 1))
        keys, _ = moved.index_keys(layer)
        assert torch.equal(keys.dequantize(), IndexKeys(k8, scale).dequantize())
