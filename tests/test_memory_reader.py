"""The CUDA memory reading of the chunk policy, on the CPU with torch.cuda's readings faked.

``MemoryReader.free``: the driver's free memory plus the caching allocator's reserved
but unallocated blocks, capped by a per-process memory fraction.
"""

from __future__ import annotations

import pytest
import torch

from torch_secorder import _chunks

GiB = 2**30


@pytest.fixture
def fake_card(monkeypatch):
    """A 16 GiB card: set ``state`` to what the driver and the allocator report."""
    state = {"free": 10 * GiB, "total": 16 * GiB, "allocated": 2 * GiB, "reserved": 5 * GiB}
    state["share"] = 1.0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (state["free"], state["total"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: state["reserved"])
    monkeypatch.setattr(
        torch.cuda, "get_per_process_memory_fraction", lambda d=None: state["share"], raising=False
    )
    return state


def test_free_counts_the_allocators_cached_blocks(fake_card):
    cuda = torch.device("cuda", 0)
    # 10 GiB free on the card, and 3 GiB reserved by PyTorch but not allocated
    assert _chunks.MemoryReader().free(cuda) == 13 * GiB
    fake_card["reserved"] = fake_card["allocated"]  # nothing cached
    assert _chunks.MemoryReader().free(cuda) == 10 * GiB


def test_free_respects_a_per_process_memory_fraction(fake_card):
    cuda = torch.device("cuda", 0)
    fake_card["share"] = 0.25  # 4 GiB of the 16 allowed, 2 GiB allocated: 2 GiB left
    assert _chunks.MemoryReader().free(cuda) == 2 * GiB
    fake_card["allocated"] = fake_card["reserved"] = 5 * GiB  # over the cap: nothing left
    assert _chunks.MemoryReader().free(cuda) == 0
    fake_card["share"] = 1.0
    assert _chunks.MemoryReader().free(cuda) == 10 * GiB


def test_chunks_follow_the_reading(fake_card, monkeypatch):
    monkeypatch.setattr(_chunks, "memory_reader", _chunks.MemoryReader())
    cuda = torch.device("cuda", 0)
    policy = _chunks.chunk_policy
    expected = int(13 * GiB * policy.memory_fraction // policy.bytes_per_entry_estimate)
    assert _chunks.chunk_entries(cuda) == expected
    fake_card["share"] = 0.25
    expected = int(2 * GiB * policy.memory_fraction // policy.bytes_per_entry_estimate)
    assert _chunks.chunk_entries(cuda) == expected
