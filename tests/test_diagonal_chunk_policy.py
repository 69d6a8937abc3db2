"""The fast diagonal's columns follow the device chunk policy (issue 12).

The graph route reads its budget of column entries from
:func:`torch_secorder._chunks.chunk_entries` of the loss value's device and walks its
columns in chunks that fit it.  On the CPU the budget is
:attr:`~torch_secorder._chunks.ChunkPolicy.cpu_elements`; on CUDA it comes from the
free memory, read here through a stubbed :data:`~torch_secorder._chunks.memory_reader`
(as in tests/test_chunk_policy.py).  Whatever the budget, the numbers equal the dense
float64 Hessian's and GGN's diagonals.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from diagonal_settings import (
    Built,
    dense_ggn_diagonal,
    dense_hessian_diagonal,
    ours_ggn_diagonal,
    ours_hessian_diagonal,
    ours_plan,
    tanh_resnet,
)
from torch import nn

import torch_secorder.func._graph as graph
from torch_secorder import _chunks
from torch_secorder._chunks import chunk_policy

DT = torch.float64
CUDA = torch.device("cuda", 0)


class FreeMemory:
    """A CUDA card with ``free`` bytes free (only ``free`` is read by ``chunk_entries``)."""

    def __init__(self, free: int):
        self.free_bytes = free

    def free(self, device):
        return self.free_bytes


def _problem(n: int = 2) -> Built:
    torch.manual_seed(0)
    model = tanh_resnet(width=2, blocks=1, size=4, classes=3).to(DT).eval()
    x = torch.randn(n, 3, 4, 4, dtype=DT)
    return Built(model, nn.CrossEntropyLoss(), x, torch.randint(0, 3, (n,)))


@pytest.fixture
def walks(monkeypatch):
    """The number of columns of every chunk the graph route walks."""
    sizes: list[int] = []
    walk = graph._Backprop._walk

    def spy(self, start, inclusive, cols, sign, *rest):
        if sign.shape[0] <= self._chunk():
            sizes.append(sign.shape[0])
        return walk(self, start, inclusive, cols, sign, *rest)

    monkeypatch.setattr(graph._Backprop, "_walk", spy)
    return sizes


def _largest_tensor(built: Built) -> int:
    """Entries of the largest tensor the graph route's walks carry columns at."""
    found: list[int] = []
    largest = graph._Backprop._largest

    def spy(self):
        found.append(largest(self))
        return found[-1]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(graph._Backprop, "_largest", spy)
        ours_hessian_diagonal(built)
    return max(found)


def test_cpu_budget_sets_the_columns_per_walk(monkeypatch, walks):
    built = _problem()
    assert set(ours_plan(built).values()) == {"graph"}
    expected_h, expected_g = dense_hessian_diagonal(built), dense_ggn_diagonal(built)
    largest = _largest_tensor(built)
    ours_hessian_diagonal(built)
    default = max(walks)
    for entries in (1, 3 * largest, 10 * largest):
        walks.clear()
        monkeypatch.setattr(chunk_policy, "cpu_elements", entries)
        assert_close(ours_hessian_diagonal(built), expected_h)
        assert walks and max(walks) <= max(1, entries // largest)
        assert_close(ours_ggn_diagonal(built), expected_g)
    assert default > 10  # the default budget: every column of an origin at once


def test_cuda_budget_comes_from_the_free_memory(monkeypatch, walks):
    """The budget is ``chunk_entries`` of the value's device; with a CUDA reading of
    ``free`` bytes it is ``free * memory_fraction / bytes_per_entry_estimate``."""
    built = _problem()
    expected = dense_hessian_diagonal(built)
    largest = _largest_tensor(built)
    free = int(5 * largest * chunk_policy.bytes_per_entry_estimate / chunk_policy.memory_fraction)
    monkeypatch.setattr(_chunks, "memory_reader", FreeMemory(free))
    asked: list[torch.device] = []
    walks.clear()

    def as_if_on_cuda(device):
        asked.append(torch.device(device))
        return _chunks.chunk_entries(CUDA)

    monkeypatch.setattr(graph, "chunk_entries", as_if_on_cuda)
    assert _chunks.chunk_entries(CUDA) == 5 * largest
    assert_close(ours_hessian_diagonal(built), expected)
    assert asked and all(d == built.inputs.device for d in asked)
    assert walks and max(walks) <= 5


def test_explicit_budget_and_chunk_size_win(walks):
    built = _problem()
    expected = dense_hessian_diagonal(built)
    assert_close(ours_hessian_diagonal(built, chunk_size=2), expected)
    assert walks and max(walks) <= 2
