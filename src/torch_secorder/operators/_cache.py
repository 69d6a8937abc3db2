r"""The Hessian and GGN operators' per-batch cache: a batch's autograd graph, kept across products.

Without a cache every product :math:`A V` rebuilds, for every batch, the engine's
problem object (:func:`~torch_secorder.problems._problem.module_problem`): a checking
forward pass with its random draws recorded, the user's state saved and restored,
the loss checked, then a ``create_graph`` gradient and one backward pass per
vector.  Everything but the last backward passes is the same in every product, so
:class:`GraphCache` keeps, per batch, after the first product: for the Hessian on
the autograd-graph routes (``"graph"``, ``"graph_batched"``: the CPU's ``"auto"``)
the gradient with its ``create_graph`` graph; for the GGN (and the exact Fisher)
the output's graph with :math:`J^\top u` and the loss's output gradient
(:meth:`~torch_secorder.problems._problem.LossProblem.graph_ggn_rows_fn`).  Later
products run only backward passes on them (``chunk_size`` or 8 vectors at a time).

**What it holds.**  Per cached batch: that autograd graph (about the memory of a
forward and a backward pass with ``create_graph``, that is, the activations of the
batch about twice) and references to the batch's tensors;
for the whole cache, one copy of the parameters and buffers (to detect changes).
At most ``cache_batches`` batches are cached (the first ones of a pass); the others
are computed as without a cache.  ``cache_batches=0`` turns the cache off.  On a
CUDA device the kept graphs may also take at most
:attr:`~torch_secorder._chunks.ChunkPolicy.memory_fraction` of the memory that was
free when the first one was kept (read through
:data:`~torch_secorder._chunks.memory_reader`): a batch whose graph would leave less
free is computed without keeping it.

**Exactness.**  The cache stands for the operator at the parameters' current
values: before a batch's cached graph is used, the model's parameters (the very
objects, their values, ``requires_grad``), buffers (objects and values) and
training modes are compared with those the graph was built at, and the batch's
tensors with the cached batch (values; a ``DataLoader`` yields new tensors every
pass, a shuffling one other samples).  Any difference drops the whole cache and
the batch is rebuilt.  Values are compared, not version counters, so a write
through ``.data`` is seen too.

**Random draws.**  A cached batch keeps the dropout masks of its first product:
every later product of the operator sees the same masks (the operator is one fixed
symmetric matrix) and draws nothing from the global RNG.  Without the cache each
product draws fresh masks, and so does every batch beyond ``cache_batches``: in
training mode with dropout the operator is one fixed matrix only when all its
batches are kept.  :meth:`~torch_secorder.operators.base.CurvatureOperator.diagonal`
and ``trace`` of a batch that draws random numbers read the same masks: its
diagonal is :math:`e_i^\top A_b e_i` through the kept graph (kept then if no
product came first), one backward pass per entry in chunks, the cost of the
one-hot sweep such a batch takes anyway; a batch that is not kept draws its own.
Batches without random draws take the fast exact diagonal routes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder import _chunks

__all__ = ["GraphCache", "DEFAULT_CACHE_BATCHES"]

#: Batches whose gradient graph the Hessian operator keeps by default.
DEFAULT_CACHE_BATCHES = 16


def _tensors_of(inputs: Any, targets: Any) -> list[Tensor]:
    return [*(inputs if isinstance(inputs, tuple) else (inputs,)), targets]


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    return bool(torch.equal(a, b))


class _ModelState:
    """The model's parameters, buffers and training modes at one moment (copies)."""

    def __init__(self, model: nn.Module) -> None:
        self.params = [(name, p, p.requires_grad) for name, p in model.named_parameters()]
        # The kept graphs saved these tensors: an in-place write (even one that restores
        # the values) makes their backward raise, so versions are compared too.
        self.versions = [t._version for t in (*self._tensors(model),)]
        self.param_values = [p.detach().clone() for _, p, _ in self.params]
        self.buffers = list(model.named_buffers())
        self.buffer_values = [b.detach().clone() for _, b in self.buffers]
        self.training = [m.training for m in model.modules()]

    @staticmethod
    def _tensors(model: nn.Module) -> list[Tensor]:
        return [*model.parameters(), *model.buffers()]

    def matches(self, model: nn.Module) -> bool:
        params = list(model.named_parameters())
        if len(params) != len(self.params):
            return False
        for (name, p), (name0, p0, flag0) in zip(params, self.params, strict=True):
            if name != name0 or p is not p0 or p.requires_grad != flag0:
                return False
        buffers = list(model.named_buffers())
        if len(buffers) != len(self.buffers) or any(
            name != name0 or b is not b0
            for (name, b), (name0, b0) in zip(buffers, self.buffers, strict=True)
        ):
            return False
        if [m.training for m in model.modules()] != self.training:
            return False
        if [t._version for t in self._tensors(model)] != self.versions:
            return False
        return all(
            _same_tensor(p.detach(), saved)
            for (_, p, _), saved in zip(self.params, self.param_values, strict=True)
        ) and all(
            _same_tensor(b.detach(), saved)
            for (_, b), saved in zip(self.buffers, self.buffer_values, strict=True)
        )


class GraphCache:
    """Per batch index, a product ``V -> V H_b`` on the batch's kept gradient graph.

    Args:
        capacity: The most batches kept (0: none).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._state: _ModelState | None = None
        self._key: Any = None
        self._verified = False
        #: CUDA: the free memory when the first graph was kept (the reserve's base)
        self._free_at_start: int | None = None
        #: index -> (the batch's tensors, their versions, the product)
        self._entries: dict[int, tuple[list[Tensor], list[int], Callable[[Tensor], Tensor]]] = {}

    def begin(self) -> None:
        """A new pass over the data: the model's state is compared again at its first lookup."""
        self._verified = False

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every kept graph and the state they were built at."""
        self._entries = {}
        self._state = None
        self._key = None
        self._free_at_start = None

    def _room_on(self, device: torch.device | None) -> bool:
        """Whether one more kept graph fits: always off CUDA; on CUDA while the kept
        graphs take at most ``memory_fraction`` of the memory free at the first one."""
        if not _chunks._is_cuda(device):
            return True
        free = _chunks.memory_reader.free(device)
        if self._free_at_start is None:
            # the first graph is allocated already: what was free before it is about
            # what is free now plus one graph; the first reading is the base either way
            self._free_at_start = free
            return True
        used = self._free_at_start - free
        return used <= _chunks.chunk_policy.memory_fraction * self._free_at_start

    def lookup(
        self, model: nn.Module, key: Any, index: int, inputs: Any, targets: Any
    ) -> Callable[[Tensor], Tensor] | None:
        """The kept product of batch ``index``, or ``None`` (then :meth:`store` may keep one).

        ``key`` says what the products are of (the operator's parameters, route, chunk);
        a different key, or a model that differs from the state the graphs were built
        at, drops the cache.
        """
        if self.capacity <= 0:
            return None
        if self._state is not None and not self._verified:
            if key != self._key or not self._state.matches(model):
                self.clear()
            self._verified = True
        entry = self._entries.get(index)
        if entry is None:
            return None
        tensors = _tensors_of(inputs, targets)
        cached, versions, product = entry
        if (
            len(tensors) != len(cached)
            or not all(_same_tensor(a, b) for a, b in zip(tensors, cached, strict=True))
            or [t._version for t in cached] != versions
        ):
            del self._entries[index]  # another batch at this index (a shuffling loader)
            return None
        return product

    def store(
        self,
        model: nn.Module,
        key: Any,
        index: int,
        inputs: Any,
        targets: Any,
        product: Callable[[Tensor], Tensor],
    ) -> None:
        """Keep ``product`` for batch ``index`` while there is room."""
        if self.capacity <= 0:
            return
        if index not in self._entries and len(self._entries) >= self.capacity:
            return
        if self._state is None:
            self._state = _ModelState(model)
            self._key = key
            self._verified = True
        tensors = _tensors_of(inputs, targets)
        if index not in self._entries and not self._room_on(tensors[0].device if tensors else None):
            return
        self._entries[index] = (tensors, [t._version for t in tensors], product)
