r"""The data an operator is defined over: batches, their sizes, and the loss's reduction.

``data`` is one ``(inputs, targets)`` batch or a re-iterable collection of them (a
list, a :class:`torch.utils.data.DataLoader`).  :class:`Batches` checks every batch
(a pair; tensors; one dtype and one device for all batches), counts the samples
:math:`N = \sum_b N_b` (from the length of a ``DataLoader``'s sampler where the
loader batches them itself, else in a first pass), and yields the batches.

The loss over the data set, for batches :math:`b` of :math:`N_b` samples with batch
losses :math:`L_b` (``loss_fn(model(inputs_b), targets_b)``):

.. math::
    L = \sum_b \frac{N_b}{N} L_b \quad (\text{reduction "mean"}), \qquad
    L = \sum_b L_b \quad (\text{reduction "sum"}).

For ``"mean"`` this is the mean over all samples of the data set, a short last batch
included (each batch's mean weighted by its size).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Batches", "FunctionBatches", "batch_size_of", "loss_reduction"]

REDUCTIONS = ("mean", "sum")


def _declared_reduction(loss_fn: Callable) -> str | None:
    """The reduction ``loss_fn`` declares, or ``None`` when it declares none."""
    value = getattr(loss_fn, "reduction", None)
    if isinstance(value, str):
        return value
    if isinstance(loss_fn, functools.partial):
        if isinstance(loss_fn.keywords.get("reduction"), str):
            return loss_fn.keywords["reduction"]
        loss_fn = loss_fn.func
    try:
        parameter = inspect.signature(loss_fn).parameters.get("reduction")
    except (TypeError, ValueError):
        return None
    if parameter is not None and isinstance(parameter.default, str):
        return parameter.default
    return None


def loss_reduction(loss_fn: Callable, reduction: str | None, num_batches: int) -> str | None:
    """The reduction of ``loss_fn`` over a batch: ``"mean"``, ``"sum"``, or ``None``.

    The rule: a loss module's ``.reduction`` attribute (``nn.MSELoss()``,
    ``nn.CrossEntropyLoss(reduction="sum")``); a ``functools.partial`` with a
    ``reduction=`` keyword; the default of a ``reduction`` parameter of a plain
    function (``torch.nn.functional.mse_loss``: ``"mean"``); else the ``reduction``
    argument of the operator.  A declared reduction and a different ``reduction``
    argument raise.  ``None`` (not known) is accepted for a single batch only
    (its weight is 1 either way); several batches need the reduction to weight them.
    """
    declared = _declared_reduction(loss_fn)
    if reduction is not None and reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if declared is not None and reduction is not None and declared != reduction:
        raise ValueError(
            f"reduction={reduction!r} contradicts the loss_fn's own reduction {declared!r}"
        )
    value = reduction if reduction is not None else declared
    if value is not None and value not in REDUCTIONS:
        raise ValueError(
            f"loss_fn must reduce each batch to a scalar by 'mean' or 'sum', got "
            f"reduction {value!r}"
        )
    if value is None and num_batches > 1:
        raise ValueError(
            "loss_fn declares no reduction (no .reduction attribute, no reduction= parameter) "
            f"and data has {num_batches} batches: pass reduction='mean' (loss_fn averages over "
            "the samples of a batch) or reduction='sum' (it sums them) to weight the batches"
        )
    if (
        value == "mean"
        and num_batches > 1
        and isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss))
        and loss_fn.weight is not None
    ):
        raise ValueError(
            "loss_fn has class weights and reduction 'mean': a batch's loss is divided by the "
            "sum of its samples' weights, not by its size, so batches cannot be weighted by "
            "size; use reduction='sum' (and divide by the total weight yourself)"
        )
    return value


def _is_inputs(value: Any) -> bool:
    return isinstance(value, Tensor) or (
        isinstance(value, tuple) and bool(value) and all(isinstance(v, Tensor) for v in value)
    )


def _is_batch(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and _is_inputs(data[0])
        and isinstance(data[1], Tensor)
    )


def _tensors(inputs: Any, targets: Tensor) -> list[Tensor]:
    return [*(inputs if isinstance(inputs, tuple) else (inputs,)), targets]


def _unpack(batch: Any, index: int) -> tuple[Any, Tensor, int]:
    """``(inputs, targets, size)`` of batch ``index``; a clear error for anything else."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"batch {index} of data must be a pair (inputs, targets), got "
            f"{type(batch).__name__}"
            + (f" of length {len(batch)}" if hasattr(batch, "__len__") else "")
        )
    inputs, targets = batch
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    if not _is_inputs(inputs) or not isinstance(targets, Tensor):
        raise TypeError(
            f"batch {index} of data must hold tensors (inputs: a tensor or a tuple of tensors; "
            f"targets: a tensor), got ({type(inputs).__name__}, {type(targets).__name__})"
        )
    first = inputs[0] if isinstance(inputs, tuple) else inputs
    if first.ndim < 1 or first.shape[0] == 0:
        raise ValueError(
            f"batch {index} of data has no samples: inputs of shape {tuple(first.shape)} "
            "(the batch dimension comes first)"
        )
    return inputs, targets, int(first.shape[0])


def _loader_counts(data: Any) -> tuple[int, int] | None:
    """``(N, batches)`` of a map-style ``DataLoader`` without a pass, else ``None``.

    Only for the loader's own batching (a ``BatchSampler`` keeping the last short
    batch, no custom ``collate_fn`` that could change the batch size): ``N`` is
    the length of its sampler (``len(dataset)`` for sequential and shuffled
    sampling).  Anything else is counted in a first pass.
    """
    from torch.utils.data import BatchSampler, DataLoader
    from torch.utils.data.dataloader import default_collate

    if not isinstance(data, DataLoader) or not isinstance(data.batch_sampler, BatchSampler):
        return None
    if data.batch_sampler.drop_last or data.collate_fn is not default_collate:
        return None
    try:
        return len(data.batch_sampler.sampler), len(data)
    except TypeError:  # an iterable-style dataset or sampler without a length
        return None


class Batches:
    """The batches of ``data``, checked and counted (see the module doc).

    Attributes:
        num_samples: :math:`N`, the samples of all batches.
        num_batches: The number of batches.
        dtype: The dtype of the (first) floating input tensor, ``None`` if none.
        device: The device of the batches.
    """

    def __init__(self, data: Any):
        if self._is_one_batch(data):
            self._source: Any = [tuple(data) if isinstance(data, list) else data]
        else:
            try:
                iterator = iter(data)
            except TypeError:
                raise TypeError(
                    "data must be an (inputs, targets) batch or an iterable of such batches "
                    f"(a list, a DataLoader), got {type(data).__name__}"
                ) from None
            if iterator is data:
                raise TypeError(
                    "data must be re-iterable (a list or a DataLoader): the operator passes "
                    f"over it once per product; got a one-shot {type(data).__name__}"
                )
            self._source = data
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None
        self._expected: int | None = None
        counted = self._loader_counts()
        if counted is not None:  # no pass over the data needed to count
            self.num_samples, self.num_batches = counted
        else:
            self.num_samples = 0
            self.num_batches = 0
            for _index, _inputs, _targets, size in self.sized():
                self.num_samples += size
                self.num_batches += 1
        if self.num_batches == 0 or self.num_samples == 0:
            raise ValueError("data is empty: it yielded no batch")
        self._expected = self.num_samples

    def _is_one_batch(self, data: Any) -> bool:
        return _is_batch(data)

    def _loader_counts(self) -> tuple[int, int] | None:
        return _loader_counts(self._source)

    def _check_alike(self, index: int, inputs: Any, targets: Tensor) -> None:
        self._check_tensors(index, _tensors(inputs, targets))

    def _check_tensors(self, index: int, tensors: list[Tensor]) -> None:
        """One device and one floating dtype for the tensors of all batches."""
        if not tensors:
            return
        floating = [t for t in tensors if t.is_floating_point()]
        dtype = floating[0].dtype if floating else None
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise ValueError(
                f"batch {index} of data mixes devices: {sorted(str(d) for d in devices)}"
            )
        device = devices.pop()
        if self.device is None:
            self.device, self.dtype = device, dtype
            return
        if device != self.device:
            raise ValueError(
                f"batch {index} of data is on {device}, but the earlier batches are on "
                f"{self.device}: all batches must be on one device"
            )
        if dtype is not None and self.dtype is not None and dtype != self.dtype:
            raise ValueError(
                f"batch {index} of data has dtype {dtype}, but the earlier batches have "
                f"{self.dtype}: all batches must have one dtype"
            )

    def sized(self) -> Iterator[tuple[int, Any, Tensor, int]]:
        """Yield ``(index, inputs, targets, size)`` for every batch, checked.

        The sizes must add up to :attr:`num_samples` where it was read from the
        loader without a pass (an error otherwise, at the end of the pass).
        """
        total = 0
        for index, batch in enumerate(self._source):
            inputs, targets, size = _unpack(batch, index)
            self._check_alike(index, inputs, targets)
            total += size
            yield index, inputs, targets, size
        if self._expected is not None and total != self._expected:
            raise ValueError(
                f"data yielded {total} samples, but {self.num_samples} were counted when the "
                "operator was built (the loader changed size?)"
            )


def batch_size_of(batch: Any, index: int) -> int:
    """:math:`N_b` of a batch of a pure ``f(params, batch)``: the leading dimension of its
    first tensor (in the order of :func:`optree.tree_leaves`: a tuple's first entry, a
    dict's first key in sorted order).

    Example:
        >>> import torch
        >>> batch_size_of((torch.zeros(3, 2), torch.zeros(3)), 0)
        3
    """
    tensors = [t for t in _tensor_leaves(batch)]
    if not tensors:
        raise ValueError(
            f"batch {index} of data holds no tensor to count its samples: pass "
            "batch_size= (a function of the batch returning its number of samples)"
        )
    if tensors[0].ndim < 1:
        raise ValueError(
            f"batch {index} of data: its first tensor is a scalar, so its samples cannot be "
            "counted from a leading dimension; pass batch_size= (a function of the batch)"
        )
    return int(tensors[0].shape[0])


def _tensor_leaves(batch: Any) -> list[Tensor]:
    import optree

    leaves = optree.tree_leaves(batch, none_is_leaf=False, namespace="torch_secorder")
    return [leaf for leaf in leaves if isinstance(leaf, Tensor)]


def _is_function_batch(data: Any) -> bool:
    """One batch, not a collection: a tensor, a dict, or a tuple ``(inputs, targets)``.

    A list is always a collection of batches (``[x1, x2]``: two batches).
    """
    return isinstance(data, (Tensor, dict)) or (isinstance(data, tuple) and _is_batch(data))


class FunctionBatches(Batches):
    """The batches of a pure ``f(params, batch)``: any pytree per batch (see :class:`Batches`).

    ``data`` is one batch (a tensor, a dict, or a tuple ``(inputs, targets)`` of
    tensors) or a re-iterable of batches of any structure (a list is always a list
    of batches: ``[x1, x2]`` is two batches); each batch is handed to
    ``f`` as it is.  :math:`N_b` is ``batch_size(batch)``, by default
    :func:`batch_size_of`.  :meth:`sized` yields ``(index, batch, batch, size)``: the
    batch stands for both the inputs and the targets of the data loop.
    """

    def __init__(self, data: Any, batch_size: Callable[[Any], int] | None = None):
        if batch_size is not None and not callable(batch_size):
            raise TypeError(
                f"batch_size must be a function of a batch returning its number of samples, "
                f"got {type(batch_size).__name__}"
            )
        self._batch_size = batch_size
        super().__init__(data)

    def _is_one_batch(self, data: Any) -> bool:
        return _is_function_batch(data)

    def _loader_counts(self) -> tuple[int, int] | None:
        # A batch_size function may count samples otherwise than the sampler does.
        return None if self._batch_size is not None else _loader_counts(self._source)

    def size_of(self, batch: Any, index: int) -> int:
        """:math:`N_b` of batch ``index`` (``batch_size(batch)``, checked)."""
        if self._batch_size is None:
            return batch_size_of(batch, index)
        size = self._batch_size(batch)
        if isinstance(size, Tensor) and size.numel() == 1:
            size = int(size)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(
                f"batch_size(batch {index} of data) must be a positive int, got {size!r}"
            )
        return size

    def sized(self) -> Iterator[tuple[int, Any, Any, int]]:
        total = 0
        for index, batch in enumerate(self._source):
            size = self.size_of(batch, index)
            self._check_tensors(index, _tensor_leaves(batch))
            total += size
            yield index, batch, batch, size
        if self._expected is not None and total != self._expected:
            raise ValueError(
                f"data yielded {total} samples, but {self.num_samples} were counted when the "
                "operator was built (the loader changed size?)"
            )
