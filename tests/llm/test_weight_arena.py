"""weight_arena: a model's large weights moved onto one huge-page-advised block, values, sharing and small tensors
kept as they were."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ladle.llm.weight_arena import MIN_BYTES, weights_on_huge_pages

pytestmark = pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists(),
                                reason="this kernel has no transparent huge pages")


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1024, 512)  # 2 MiB: moved
        self.head = nn.Linear(512, 1024, bias=False)
        self.head.weight = self.embed.weight  # tied: one Parameter in two modules
        self.register_buffer("tiles", torch.randn(300, 1024), persistent=False)  # moved
        self.register_buffer("bf16", torch.randn(1024, 1024).to(torch.bfloat16), persistent=False)  # moved
        self.norm = nn.Parameter(torch.ones(512))  # small: stays
        self.register_buffer("strided", torch.randn(1024, 1024).t(), persistent=False)  # not contiguous: stays


def advised(address: int) -> bool:
    """Whether the mapping holding `address` was advised for huge pages ('hg' in its VmFlags)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and line.startswith("VmFlags"):
                return "hg" in line.split()
    return False


def test_large_weights_move_into_one_advised_block_with_their_values() -> None:
    torch.manual_seed(0)
    model = Tied()
    before = {name: t.clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    embed_param, norm_ptr, strided_ptr = model.embed.weight, model.norm.data_ptr(), model.strided.data_ptr()

    moved = weights_on_huge_pages(model)

    big = [model.embed.weight, model.tiles, model.bf16]
    assert moved >= sum(t.nbytes for t in big)
    assert len({t.untyped_storage().data_ptr() for t in big}) == 1  # one block
    assert all(t.data_ptr() % 4096 == 0 for t in big)  # each on a page of its own
    assert advised(model.tiles.data_ptr())
    # the tied weight is still one Parameter, moved once
    assert model.embed.weight is embed_param and model.head.weight is embed_param
    # small or strided tensors stay where they were
    assert model.norm.data_ptr() == norm_ptr and model.strided.data_ptr() == strided_ptr
    after = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and after[name].shape == tensor.shape
        assert torch.equal(after[name], tensor), name
    x = torch.randn(3, 512)
    assert torch.equal(model.head(x), x @ before["embed.weight"].t())


def test_nothing_qualifying_moves_nothing() -> None:
    model = nn.Linear(16, 16)
    assert model.weight.nbytes < MIN_BYTES
    ptr = model.weight.data_ptr()
    assert weights_on_huge_pages(model) == 0 and model.weight.data_ptr() == ptr
