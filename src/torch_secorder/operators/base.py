r"""The base of the curvature operators: parameters, the data loop, products, views.

A :class:`CurvatureOperator` is a symmetric :math:`n \times n` matrix over the
parameters it was given (``params``; default: every parameter of the model that
requires grad, in the order of ``model.named_parameters()``), for the loss over a
whole data set (see :mod:`torch_secorder.operators._data` for the weighting).  A
subclass says what one batch contributes (:meth:`CurvatureOperator._batch_matmat`,
:meth:`CurvatureOperator._batch_diagonal`); :meth:`CurvatureOperator._over_data`,
the one data loop, weights the batches and sums.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder.operators._data import Batches, FunctionBatches, loss_reduction
from torch_secorder.operators._distributed import (
    all_reduce_checked,
    resolve_group,
    shard_counts,
    unwrap_model,
)
from torch_secorder.operators._function import FunctionSource
from torch_secorder.problems._inputs import check_chunk_size, check_module

__all__ = ["CurvatureOperator"]

#: Seconds the loop over batches must run before its progress bar appears.
PROGRESS_DELAY_S = 3.0


def _select_names(named: list[tuple[str, Tensor]], params: Any) -> list[str]:
    """Names of the parameters ``params`` designates, in the model's order."""
    if params is None:
        names = [name for name, p in named if p.requires_grad]
        if not names:
            raise ValueError("no parameter of model requires grad: nothing to differentiate")
        return names
    items = [params] if isinstance(params, (str, Tensor)) else list(params)
    if not items:
        raise ValueError("params must name at least one parameter, got an empty sequence")
    by_name = dict(named)
    chosen = set()
    for i, item in enumerate(items):
        if isinstance(item, str):
            if item not in by_name:
                raise ValueError(
                    f"params[{i}] = {item!r} is not a parameter of model; its parameters are "
                    f"{list(by_name)}"
                )
            chosen.add(item)
        elif isinstance(item, Tensor):
            match = [name for name, p in named if p is item]
            if not match:
                raise ValueError(f"params[{i}] is a tensor that is not a parameter of model")
            chosen.add(match[0])
        else:
            raise TypeError(
                f"params[{i}] must be a parameter name or a parameter tensor, got "
                f"{type(item).__name__}"
            )
    for name in chosen:
        if not by_name[name].requires_grad:
            raise ValueError(f"params: parameter {name!r} does not require grad")
    return [name for name, _ in named if name in chosen]


def _with_batch_index(exc: Exception, index: int) -> Exception:
    """``exc`` with its message prefixed by the batch it came from."""
    if exc.args and isinstance(exc.args[0], str) and not exc.args[0].startswith("batch "):
        exc.args = (f"batch {index} of data: {exc.args[0]}", *exc.args[1:])
    return exc


class CurvatureOperator:
    r"""A curvature matrix of a model's loss over a data set, as a linear operator.

    Args:
        model: The network.
        loss_fn: ``loss_fn(model(inputs), targets)`` returning a scalar per batch.
        data: One ``(inputs, targets)`` batch or a re-iterable of batches (a list, a
            ``DataLoader``); a tuple ``inputs`` is unpacked into positional arguments.
        params: Parameter names or parameter tensors of ``model`` (default: all that
            require grad).  The operator's rows follow ``model.named_parameters()``.
        reduction: ``"mean"`` or ``"sum"``: how ``loss_fn`` reduces a batch, for a
            loss that does not say (see :func:`~torch_secorder.operators._data.loss_reduction`).
        chunk_size: Vectors per batched product (peak memory is about ``chunk_size``
            products of one batch; default: the engine's budget of ``2**24`` tangent
            entries, or 8 vectors on the CPU graph route).
        progress: Show a progress bar over the batches for passes longer than a few seconds.
        group: Data parallelism (see :doc:`/distributed`): ``None`` (the default
            process group when :mod:`torch.distributed` is initialised, else none),
            ``False`` (this process's data alone), or a
            ``torch.distributed.ProcessGroup``.  With a group, ``data`` is this rank's
            shard, the operator is that of the union of the ranks' shards, and every
            product, diagonal and trace is a collective that all ranks of the group call
            with the same vectors.  A ``DistributedDataParallel`` model is unwrapped
            (its ``.module`` is used; its hooks never fire).
    """

    #: What the operator is, for messages.
    label = "curvature"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        data: Any,
        params: Any = None,
        *,
        reduction: str | None = None,
        chunk_size: int | None = None,
        progress: bool = False,
        group: Any = None,
    ):
        model = unwrap_model(model)
        check_module(model)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        named = list(model.named_parameters())
        if not named:
            raise ValueError("model has no parameters: nothing to differentiate")
        self.model = model
        self.loss_fn = loss_fn
        #: The pure function and its parameters (``from_function`` operators), else ``None``.
        self.function: FunctionSource | None = None
        self._attach(
            _select_names(named, params),
            lambda: Batches(data),
            loss_fn,
            reduction=reduction,
            chunk_size=chunk_size,
            progress=progress,
            group=group,
        )

    @classmethod
    def _of_function(
        cls,
        source: FunctionSource,
        loss_fn: Callable[..., Tensor] | None,
        data: Any,
        *,
        batch_size: Callable[[Any], int] | None,
        reduction: str | None,
        chunk_size: int | None,
        progress: bool,
        group: Any,
    ) -> Any:
        """An operator of the pure function ``source.f`` (see ``from_function``).

        ``loss_fn``: the GGN's loss of the output (``None`` for the Hessian).  The
        reduction is read off ``loss_fn`` (or ``f``) as for the model form.
        """
        op = cls.__new__(cls)
        op.model = None
        op.loss_fn = loss_fn
        op.function = source
        op._attach(
            source.names,
            lambda: FunctionBatches(data, batch_size),
            loss_fn if loss_fn is not None else source.f,
            reduction=reduction,
            chunk_size=chunk_size,
            progress=progress,
            group=group,
        )
        return op

    def _attach(
        self,
        names: list[str],
        make_batches: Callable[[], Batches],
        loss_fn: Callable[..., Tensor],
        *,
        reduction: str | None,
        chunk_size: int | None,
        progress: bool,
        group: Any,
    ) -> None:
        """The parameters ``names``, the data, the group and the weighting (both forms)."""
        check_chunk_size(chunk_size)
        self.group = resolve_group(group)
        self.names = names
        self.chunk_size = chunk_size
        self.progress = progress
        like = dict(self._named_tensors())[self.names[0]]
        error: Exception | None = None
        try:  # this rank's shard: with a group, a failure must reach every rank
            self.batches = make_batches()
            if self.batches.device is not None and self.batches.device != like.device:
                raise ValueError(
                    f"data is on {self.batches.device}, but the parameters are on {like.device}"
                )
        except Exception as exc:
            if self.group is None:
                raise
            error = exc
        #: Samples and batches of the whole data set (of every rank, with a group).
        #: With a group, ``batch_offset`` numbers this rank's batches after those of the
        #: lower ranks (the index a batch has in the union of the shards).
        self.total_samples, self.total_batches, self.batch_offset = (
            (self.batches.num_samples, self.batches.num_batches, 0)
            if self.group is None
            else shard_counts(
                self.group, error, getattr(self, "batches", None), self.shape[0], like
            )
        )
        self.reduction = loss_reduction(loss_fn, reduction, self.total_batches)

    # ------------------------------------------------------------------ description

    @property
    def params(self) -> list[Tensor]:
        """The parameters the operator acts on, in its order."""
        by_name = dict(self._named_tensors())
        return [by_name[name] for name in self.names]

    def _named_tensors(self) -> list[tuple[str, Tensor]]:
        """``(name, tensor)`` of the model's parameters, or of the function's ``params``."""
        if self.function is not None:
            return self.function.named()
        return list(self.model.named_parameters())

    @property
    def shape(self) -> tuple[int, int]:
        n = sum(p.numel() for p in self.params)
        return (n, n)

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def num_samples(self) -> int:
        """:math:`N`, the samples of the data set (of every rank's shard, with a group)."""
        return self.total_samples

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, "
            f"batches={self.total_batches}, samples={self.num_samples}, "
            f"reduction={self.reduction!r})"
        )

    def block(self, names: Sequence[str] | str) -> CurvatureOperator:
        """The same operator restricted to the parameters ``names`` (its diagonal block)."""
        items = [names] if isinstance(names, str) else list(names)
        outside = [n for n in items if n not in self.names]
        if outside:
            raise ValueError(
                f"names {outside} are not parameters of this operator; it has {self.names}"
            )
        if not items:
            raise ValueError("names must hold at least one parameter name")
        restricted = copy.copy(self)
        restricted.names = [n for n in self.names if n in set(items)]
        return restricted

    # ------------------------------------------------------------------ the data loop

    def _over_data(
        self,
        per_batch: Callable[[int, Any, Tensor], Tensor],
        desc: str,
        same: Tensor | None = None,
    ) -> Tensor:
        r""":math:`\sum_b w_b\, \text{per\_batch}(b, \text{inputs}_b, \text{targets}_b)`.

        The one loop over the data: :math:`w_b = N_b / N` for ``"mean"``, 1 for
        ``"sum"`` (and for a single batch).  An error raised on a batch names it.
        With a process group (:attr:`group`), the loop runs over this rank's shard,
        :math:`N` counts the samples of all ranks, and one all-reduce adds the ranks'
        sums; ``same`` (the vectors of a product) must be equal on every rank, and a
        rank that raises makes every rank raise
        (see :mod:`torch_secorder.operators._distributed`).
        """

        def local_sum() -> Tensor:
            total: Tensor | None = None
            bar = None
            if self.progress and (self.group is None or self.group.rank() == 0):
                try:
                    from tqdm.auto import tqdm

                    bar = tqdm(total=self.batches.num_batches, desc=desc, delay=PROGRESS_DELAY_S)
                except ImportError:  # pragma: no cover - tqdm is a dependency
                    bar = None
            try:
                for index, inputs, targets, size in self.batches.sized():
                    try:  # the index in the union of the shards (a seed per batch)
                        value = per_batch(self.batch_offset + index, inputs, targets)
                    except (ValueError, TypeError, RuntimeError) as exc:
                        raise _with_batch_index(exc, index) from None
                    if self.reduction == "mean" and self.total_batches > 1:
                        value = value * (size / self.total_samples)
                    total = value if total is None else total + value
                    if bar is not None:
                        bar.update(1)
            finally:
                if bar is not None:
                    bar.close()
            assert total is not None  # Batches refuses empty data
            return total

        if self.group is None:
            return local_sum()
        return all_reduce_checked(self.group, local_sum, same=same, device=self.device, what=desc)

    # ------------------------------------------------------------------ per batch

    def _batch_matmat(self, index: int, inputs: Any, targets: Tensor, V: Tensor) -> Tensor:
        """Batch ``index``'s matrix on rows: ``(k, n) -> (k, n)``."""
        raise NotImplementedError

    def _batch_diagonal(self, index: int, inputs: Any, targets: Tensor) -> Tensor:
        """Batch ``index``'s exact diagonal, flat ``(n,)``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ products

    def _check_block(self, X: Tensor, name: str, rows: bool) -> Tensor:
        if not isinstance(X, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(X).__name__}")
        n = self.shape[0]
        size = X.shape[-1] if rows else X.shape[0]
        if X.ndim not in (1, 2) or size != n:
            expected = "(k, n)" if rows else "(n,) or (n, k)"
            raise ValueError(
                f"{name} must have shape {expected} with n = {n}, got {tuple(X.shape)}"
            )
        if X.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {X.dtype}, but the operator has {self.dtype}")
        if X.device != self.device:
            raise ValueError(f"{name} is on {X.device}, but the operator is on {self.device}")
        return X

    def matmat(self, V: Tensor) -> Tensor:
        """``V -> V A`` on a ``(k, n)`` batch of rows: the form :mod:`torch_secorder.linalg` takes.

        Every estimator and solver there runs on an operator ``A`` as
        ``estimator(A.matmat, A.shape[0], ..., dtype=A.dtype, device=A.device)``.
        """
        self._check_block(V, "V", rows=True)
        if V.ndim == 1:
            return self.matmat(V.unsqueeze(0))[0]
        if V.shape[0] == 0:
            return V.clone()
        return self._over_data(
            lambda b, x, y: self._batch_matmat(b, x, y, V), f"{self.label} products", same=V
        )

    def __matmul__(self, X: Tensor) -> Tensor:
        """``A @ X`` for a vector ``(n,)`` or a block of columns ``(n, k)``."""
        self._check_block(X, "X", rows=False)
        if X.ndim == 1:
            return self.matmat(X.unsqueeze(0))[0]
        return self.matmat(X.T.contiguous()).T

    def diagonal(self) -> Tensor:
        """The exact diagonal, flat ``(n,)``, through the fast diagonal routes batch by batch."""
        return self._over_data(self._batch_diagonal, f"{self.label} diagonal")

    def trace(self) -> Tensor:
        """The exact trace: the sum of :meth:`diagonal` (a 0-dim tensor)."""
        return self.diagonal().sum()

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """A flat ``(n,)`` vector as one tensor per parameter of the operator."""
        out, start = [], 0
        for p in self.params:
            out.append(flat[start : start + p.numel()].reshape(p.shape))
            start += p.numel()
        return out

    def to_scipy(self, dtype: Any = None) -> Any:
        """The operator as a :class:`scipy.sparse.linalg.LinearOperator` (NumPy vectors).

        Args:
            dtype: The NumPy dtype of the operator (default: that of the parameters,
                ``float64`` or ``float32``); vectors are converted to the parameters'
                dtype for the products and back.
        """
        try:
            import numpy as np
            from scipy.sparse.linalg import LinearOperator
        except ImportError as exc:
            raise ImportError("to_scipy() needs scipy (and numpy): pip install scipy") from exc
        if dtype is None:
            dtype = {torch.float64: np.float64, torch.float32: np.float32}.get(self.dtype)
            if dtype is None:
                raise TypeError(
                    f"to_scipy() supports float32 and float64 operators, got {self.dtype}; "
                    "pass dtype= to convert"
                )

        def apply(X: Any) -> Any:
            block = torch.as_tensor(np.asarray(X), dtype=self.dtype, device=self.device)
            return (self @ block).detach().cpu().numpy().astype(dtype, copy=False)

        def apply_matvec(x: Any) -> Any:
            return apply(np.asarray(x).reshape(-1))

        return LinearOperator(
            self.shape,
            matvec=apply_matvec,
            rmatvec=apply_matvec,
            matmat=apply,
            rmatmat=apply,
            dtype=dtype,
        )
