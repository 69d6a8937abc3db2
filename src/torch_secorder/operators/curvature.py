r"""The four curvature operators: Hessian, GGN, empirical Fisher, Fisher.

For the loss over the data set :math:`L(\theta) = \sum_b w_b L_b(\theta)` (batch
weights :math:`w_b = N_b/N` for ``reduction="mean"``, 1 for ``"sum"``), with
:math:`z_b = f(x_b; \theta)` the model's output on batch :math:`b`,
:math:`J_b = \partial z_b / \partial \theta` and per-sample gradients :math:`g_i`:

* :class:`HessianOperator`: :math:`H = \sum_b w_b \nabla^2_\theta L_b`;
* :class:`GGNOperator`: :math:`G = \sum_b w_b J_b^\top \nabla^2_{z} L_b\, J_b`;
* :class:`EmpiricalFisherOperator`: :math:`F_{\mathrm{emp}} = \frac1N \sum_i g_i g_i^\top`
  (``"mean"``; :math:`\sum_i g_i g_i^\top` for ``"sum"``), :math:`g_i` the gradient of
  ``loss_fn`` on sample :math:`i` alone (a batch of one);
* :class:`FisherOperator`: the type-2 Fisher of the likelihood that ``loss_fn`` is the
  negative log of (cross-entropy: categorical; MSE: Gaussian), which equals the GGN of
  that loss (see :mod:`torch_secorder.approximations.fisher_diagonal`).

Each batch goes through the engine (:func:`~torch_secorder.problems._problem.module_problem`
and its products, :func:`~torch_secorder.core.hvp.problem_ggn_matmat`, the functions
of :mod:`torch_secorder.problems._fisher`), so the user's state is kept, the
operator reroutes and the graph fallback apply, and a batch's forward pass is shared
by all the vectors of a chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder._chunks import chunk_entries, static_chunk_size
from torch_secorder.func._tree import tree_ravel, tree_unravel
from torch_secorder.linalg.trace import chunk_ranges
from torch_secorder.operators._cache import DEFAULT_CACHE_BATCHES, GraphCache
from torch_secorder.operators._function import (
    FunctionSource,
    function_per_sample_grads,
    function_problem,
)
from torch_secorder.operators.base import CurvatureOperator
from torch_secorder.problems._batch_checks import check_batch_device
from torch_secorder.problems._fisher import _rows as fisher_rows
from torch_secorder.problems._fisher import empirical_sq_sum
from torch_secorder.problems._ggn import problem_ggn_diagonal, problem_ggn_matmat
from torch_secorder.problems._hessian_diagonal import active_hessian_diagonal, draws_random
from torch_secorder.problems._inputs import check_generator, check_num_samples
from torch_secorder.problems._problem import GRAPH_BATCH, model_output_problem, module_problem

__all__ = ["EmpiricalFisherOperator", "FisherOperator", "GGNOperator", "HessianOperator"]


class _GraphCaching(CurvatureOperator):
    """Keeps each batch's autograd graph across products (see :mod:`._cache`)."""

    _cache: GraphCache

    def __init__(self, *args: Any, cache_batches: int = DEFAULT_CACHE_BATCHES, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if isinstance(cache_batches, bool) or not isinstance(cache_batches, int):
            raise TypeError(f"cache_batches must be an int, got {type(cache_batches).__name__}")
        if cache_batches < 0:
            raise ValueError(f"cache_batches must be >= 0, got {cache_batches}")
        self._cache = GraphCache(cache_batches)

    def matmat(self, V: Tensor) -> Tensor:
        self._cache.begin()  # the model's state is checked once per pass
        return super().matmat(V)

    def block(self, names: Any) -> Any:
        restricted = super().block(names)
        restricted._cache = GraphCache(self._cache.capacity)  # its own graphs
        return restricted

    def diagonal(self) -> Tensor:
        self._cache.begin()  # the model's state is checked once per pass
        return super().diagonal()

    def _caching(self) -> GraphCache | None:
        """The cache, for a model operator with room (``from_function`` ones keep none)."""
        return self._cache if self.function is None and self._cache.capacity > 0 else None

    def _product_key(self) -> Any:
        """What a kept product is of (the parameters, the route, the chunk)."""
        raise NotImplementedError

    def _batch_problem(self, inputs: Any, targets: Any) -> Any:
        """The batch's problem (a context manager), read by :meth:`_problem_diagonal`."""
        raise NotImplementedError

    def _problem_diagonal(self, problem: Any, targets: Any) -> Tensor:
        """The exact diagonal, flat, of the batch's problem (its own random draws)."""
        raise NotImplementedError

    def _batch_diagonal(self, index: int, inputs: Any, targets: Any) -> Tensor:
        with self._batch_problem(inputs, targets) as problem:
            if not problem.active:
                return torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
            if self._caching() is None or not draws_random(problem):
                return self._problem_diagonal(problem, targets)
        kept = self._kept_diagonal(index, inputs, targets)  # the products' own masks
        if kept is not None:
            return kept
        with self._batch_problem(inputs, targets) as problem:
            return self._problem_diagonal(problem, targets)

    def _kept_diagonal(self, index: int, inputs: Any, targets: Any) -> Tensor | None:
        r"""Batch ``index``'s diagonal as :math:`e_i^\top A_b e_i` through its kept products.

        For a batch whose evaluation draws random numbers (dropout in training
        mode): the diagonal of the very matrix the products use, with the dropout
        masks the batch's kept graph holds (kept now if no product came before).  One
        product per entry, ``chunk_size`` (or the device's chunk) at a time, each a
        backward pass on the kept graph: the cost of the one-hot sweep that such a
        batch takes anyway.  ``None`` where the batch's graph is not kept (no room,
        or a route that keeps none): the caller then draws its own masks.
        """
        cache = self._caching()
        if cache is None:
            return None
        n = self.shape[0]
        step = self.chunk_size or static_chunk_size(n, n, self.device)
        diag = torch.empty(n, dtype=self.dtype, device=self.device)
        for a, b in chunk_ranges(n, step):
            rows = torch.arange(b - a, device=self.device)
            E = torch.zeros(b - a, n, dtype=self.dtype, device=self.device)
            E[rows, rows + a] = 1
            diag[a:b] = self._batch_matmat(index, inputs, targets, E)[rows, rows + a]
            if (
                a == 0
                and cache.lookup(self.model, self._product_key(), index, inputs, targets) is None
            ):
                return None
        return diag

    def _kept_product(
        self, key: Any, index: int, inputs: Any, targets: Any, V: Tensor
    ) -> Tensor | None:
        """``V`` times batch ``index``'s matrix on its kept graph, or ``None`` if none is kept."""
        cache = self._caching()
        if cache is None:
            return None
        product = cache.lookup(self.model, key, index, inputs, targets)
        if product is None:
            return None
        # Backward passes on a kept graph write nothing of the user's but what autograd
        # could touch (.grad), kept here.
        params = list(self.model.parameters())
        grads = [p.grad for p in params]
        try:
            return product(V)
        finally:
            for p, g in zip(params, grads, strict=True):
                p.grad = g


class HessianOperator(_GraphCaching):
    r"""The Hessian of the loss over a data set, :math:`H = \sum_b w_b \nabla^2 L_b`.

    Products: per batch, the engine's batched Hessian-vector products
    (:meth:`~torch_secorder.problems._problem.LossProblem.matmat`, by ``strategy``).
    Diagonal: per batch, the exact fast routes
    (:func:`~torch_secorder.core.hessian_diagonal.active_hessian_diagonal`).

    On the autograd-graph routes (the CPU's ``"auto"``), the first product keeps each
    batch's gradient graph for the later ones (at most ``cache_batches`` batches; see
    :mod:`torch_secorder.operators._cache` for the memory it holds): a later product
    runs one backward pass per batch, at the parameters' current values (a change of
    the model's parameters, buffers or modes, or of a batch, rebuilds), with the
    dropout masks of the first product (the operator is one fixed symmetric matrix).
    The model form only (``from_function`` operators rebuild every batch).

    Args:
        strategy: How a batch's products are batched (see
            :data:`torch_secorder.problems._problem.STRATEGIES`).
        cache_batches: Batches whose gradient graph is kept across products
            (default 16; 0 keeps none: every product rebuilds every batch and draws
            fresh random masks).
        **kwargs: See :class:`~torch_secorder.operators.base.CurvatureOperator`.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
        >>> y = torch.zeros(3, 1, dtype=torch.float64)
        >>> data = [(x[:2], y[:2]), (x[2:], y[2:])]  # batches of 2 and 1 samples
        >>> H = HessianOperator(model, torch.nn.MSELoss(), data)
        >>> H.shape, H.num_samples
        ((2, 2), 3)
        >>> H @ torch.eye(2, dtype=torch.float64)  # (2/3) x^T x over all 3 samples
        tensor([[1.3333, 0.6667],
                [0.6667, 1.3333]], dtype=torch.float64)
        >>> H.trace()
        tensor(2.6667, dtype=torch.float64)
    """

    label = "Hessian"

    def __init__(self, *args: Any, strategy: str = "auto", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.strategy = strategy

    @classmethod
    def from_function(
        cls,
        f: Callable[[Any, Any], Tensor],
        params: Any,
        data: Any,
        *,
        reduction: str | None = None,
        batch_size: Callable[[Any], int] | None = None,
        strategy: str = "auto",
        chunk_size: int | None = None,
        progress: bool = False,
        group: Any = None,
    ) -> HessianOperator:
        r"""The Hessian over ``data`` of a pure loss ``f(params, batch)``.

        The loss over the data set is :math:`L(\theta) = \sum_b w_b f(\theta, b)`
        with :math:`w_b = N_b / N` for ``reduction="mean"`` (``f`` returns the
        *mean* over the samples of its batch: :math:`L` is then the mean over all
        :math:`N = \sum_b N_b` samples, a short last batch included) and
        :math:`w_b = 1` for ``"sum"`` (``f`` returns the sum).  :math:`N_b` is
        ``batch_size(batch)``, by default the leading dimension of the batch's first
        tensor (:func:`~torch_secorder.operators._data.batch_size_of`).

        Args:
            f: ``f(params, batch) -> scalar``, pure: a function of its arguments only,
                without random draws, that ``torch.func`` can transform (where it
                cannot, the products take the autograd graph).
            params: The point: a dict of tensors (rows in the dict's order, names its
                keys) or any pytree of floating tensors (rows in
                :func:`optree.tree_leaves` order, names the dotted paths, e.g. ``"0"``).
                The tensors are read, never differentiated or written.
            data: One batch (a tensor, a dict, or a tuple ``(inputs, targets)`` of
                tensors) or a re-iterable of batches of any structure (a list, a
                ``DataLoader``; a list is always a list of batches, so ``[x1, x2]`` is
                two batches); ``f`` gets each batch as it is.
            reduction: ``"mean"`` or ``"sum"`` (above); needed for several batches.
            batch_size: ``batch_size(batch) -> int``, :math:`N_b`.
            strategy: As for the model form (:data:`torch_secorder.problems._problem.STRATEGIES`).
            chunk_size, progress, group: As for the model form.

        Example:
            >>> import torch
            >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
            >>> f = lambda p, batch: ((batch @ p["w"]) ** 2).mean()  # a batch's mean
            >>> H = HessianOperator.from_function(
            ...     f, {"w": torch.zeros(2, dtype=torch.float64)}, [x[:2], x[2:]], reduction="mean"
            ... )
            >>> H @ torch.eye(2, dtype=torch.float64)  # (2/3) x^T x over all 3 samples
            tensor([[1.3333, 0.6667],
                    [0.6667, 1.3333]], dtype=torch.float64)
            >>> H.diagonal(), H.block("w").trace()
            (tensor([1.3333, 1.3333], dtype=torch.float64), tensor(2.6667, dtype=torch.float64))
        """
        op = cls._of_function(
            FunctionSource(f, params),
            None,
            data,
            batch_size=batch_size,
            reduction=reduction,
            chunk_size=chunk_size,
            progress=progress,
            group=group,
        )
        op.strategy = strategy
        op._cache = GraphCache(0)  # (its products rebuild every batch)
        return op

    def _batch_problem(self, inputs: Any, targets: Any) -> Any:
        if self.function is not None:  # inputs: the batch of f
            return function_problem(self.function, inputs, self.names)
        return module_problem(self.model, self.loss_fn, inputs, targets, only=self.names)

    def _product_key(self) -> Any:
        return (tuple(self.names), self.strategy, self.chunk_size)

    def _batch_matmat(self, index: int, inputs: Any, targets: Tensor, V: Tensor) -> Tensor:
        key = self._product_key()
        kept = self._kept_product(key, index, inputs, targets, V)
        if kept is not None:
            return kept
        cache = self._caching()
        with self._batch_problem(inputs, targets) as problem:
            if not problem.active:
                return torch.zeros_like(V)
            product = problem.matmat(self.strategy, self.chunk_size)
            result = product(V)
            # Only the autograd-graph routes keep what a later product needs outside
            # the problem (the vmap route re-evaluates the model in it).
            if cache is not None and problem.resolve_strategy(self.strategy) != "vmap":
                cache.store(self.model, key, index, inputs, targets, product)
            return result

    def _problem_diagonal(self, problem: Any, targets: Any) -> Tensor:
        return tree_ravel(list(active_hessian_diagonal(problem, self.chunk_size, False)))


class GGNOperator(_GraphCaching):
    r"""The generalised Gauss-Newton matrix :math:`G = \sum_b w_b J_b^\top \nabla_z^2 L_b J_b`.

    Products: per batch, :func:`~torch_secorder.core.hvp.problem_ggn_matmat`, the
    package's one GGN product (a chunk of vectors per vectorised forward pass, or all
    of them on one autograd graph where ``torch.func`` refuses the model).  Diagonal:
    per batch, :func:`~torch_secorder.approximations.gauss_newton.problem_ggn_diagonal`
    on the operator's parameters only (the exact fast routes of
    :func:`torch_secorder.func.ggn_diagonal`; columns of :math:`J` for a model that
    draws random numbers; the autograd graph where ``torch.func`` refuses it), as
    :func:`~torch_secorder.approximations.gauss_newton_matrix_approximation`.

    The first product keeps each batch's output graph for the later ones, which then
    run three batched backward passes per batch and no forward pass (``cache_batches``,
    default 16, 0 for none; model form only; see :class:`HessianOperator` and
    :mod:`torch_secorder.operators._cache`).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
        >>> y = torch.zeros(3, 1, dtype=torch.float64)
        >>> data = [(x[:2], y[:2]), (x[2:], y[2:])]
        >>> G = GGNOperator(model, torch.nn.MSELoss(reduction="sum"), data)
        >>> G.diagonal()
        tensor([4., 4.], dtype=torch.float64)
    """

    label = "GGN"

    @classmethod
    def from_function(
        cls,
        f: Callable[[Any, Any], Any],
        loss: Callable[[Any, Any], Tensor],
        params: Any,
        data: Any,
        *,
        reduction: str | None = None,
        batch_size: Callable[[Any], int] | None = None,
        chunk_size: int | None = None,
        progress: bool = False,
        group: Any = None,
    ) -> GGNOperator:
        r"""The GGN over ``data`` of a pure output ``f(params, batch)`` and ``loss(output, batch)``.

        :math:`G = \sum_b w_b J_b^\top \nabla^2_z \ell_b J_b` with :math:`z_b =
        f(\theta, b)`, :math:`J_b = \partial z_b / \partial\theta` and
        :math:`\ell_b(z) = \text{loss}(z, b)`; the weights :math:`w_b` and
        ``params``, ``data``, ``reduction``, ``batch_size`` are as in
        :meth:`HessianOperator.from_function` (``loss`` returns the mean or the sum
        over the batch's samples).

        Example:
            >>> import torch
            >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
            >>> f = lambda p, batch: torch.tanh(batch @ p["w"])
            >>> loss = lambda z, batch: (z**2).sum()
            >>> G = GGNOperator.from_function(
            ...     f, loss, {"w": torch.zeros(2, dtype=torch.float64)}, [x[:2], x[2:]],
            ...     reduction="sum",
            ... )
            >>> G.diagonal()  # 2 sum_i x_i**2 (tanh'(0) = 1)
            tensor([4., 4.], dtype=torch.float64)
        """
        if not callable(loss):
            raise TypeError(f"loss must be callable, got {type(loss).__name__}")
        op = cls._of_function(
            FunctionSource(f, params),
            loss,
            data,
            batch_size=batch_size,
            reduction=reduction,
            chunk_size=chunk_size,
            progress=progress,
            group=group,
        )
        op._cache = GraphCache(0)  # (its products rebuild every batch)
        return op

    def _batch_problem(self, inputs: Any, targets: Any) -> Any:
        """Batch's output as a problem of the operator's parameters (both forms)."""
        if self.function is not None:  # inputs (and targets): the batch of f
            return function_problem(self.function, inputs, self.names, loss=self.loss_fn)
        check_batch_device([p for _, p in self.model.named_parameters()], targets=targets)
        return model_output_problem(self.model, inputs, False, only=self.names)

    def _product_key(self) -> Any:
        return (tuple(self.names), "ggn", self.chunk_size)

    def _batch_matmat(self, index: int, inputs: Any, targets: Tensor, V: Tensor) -> Tensor:
        key = self._product_key()
        kept = self._kept_product(key, index, inputs, targets, V)
        if kept is not None:
            return kept
        cache = self._caching()
        with self._batch_problem(inputs, targets) as problem:
            if cache is None or not problem.active or problem.graph_refused():
                return problem_ggn_matmat(problem, self.loss_fn, targets, V, self.chunk_size)
            # The product on one autograd graph of the batch (the route of models that
            # torch.func refuses), kept for the later products.
            rows = problem.graph_ggn_rows_fn(self.loss_fn, targets)
            like = list(problem.primals)

            step = self.chunk_size or GRAPH_BATCH

            def product(W: Tensor) -> Tensor:
                return torch.cat(
                    [
                        tree_ravel(rows(list(tree_unravel(W[a:b], like))), batch_dims=1)
                        for a, b in chunk_ranges(W.shape[0], step)
                    ]
                )

            result = product(V)
            cache.store(self.model, key, index, inputs, targets, product)
            return result

    def _problem_diagonal(self, problem: Any, targets: Any) -> Tensor:
        diag = problem_ggn_diagonal(problem, self.loss_fn, targets, chunk_size=self.chunk_size)
        return tree_ravel(diag)


class EmpiricalFisherOperator(CurvatureOperator):
    r"""The empirical Fisher :math:`\frac1N \sum_i g_i g_i^\top` over the data set.

    :math:`g_i` is the gradient of ``loss_fn`` on sample :math:`i` alone (a batch of
    one), computed by :func:`~torch_secorder.problems._fisher.empirical_sq_sum`'s
    vmapped per-sample gradients, ``chunk_size`` samples at a time; ``"sum"``
    reduction: :math:`\sum_i g_i g_i^\top`.  The model must treat samples
    independently (no training-mode batch norm).  The reduction must be known
    (``loss_fn``'s own, or ``reduction=``), also for one batch.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(1, 1, bias=False).double()
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(0.0)
        >>> x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
        >>> y = torch.ones(2, 1, dtype=torch.float64)
        >>> F = EmpiricalFisherOperator(model, torch.nn.MSELoss(), [(x[:1], y[:1]), (x[1:], y[1:])])
        >>> F.diagonal()  # g_i = -2, -4: mean of squares 10
        tensor([10.], dtype=torch.float64)
    """

    label = "empirical Fisher"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._check_reduction()

    def _check_reduction(self) -> None:
        if self.reduction is None:
            raise ValueError(
                "the empirical Fisher needs the loss's reduction ('mean' divides by N): "
                "pass reduction='mean' or reduction='sum'"
            )

    @classmethod
    def from_function(
        cls,
        f: Callable[[Any, Any], Tensor],
        params: Any,
        data: Any,
        *,
        reduction: str | None = None,
        batch_size: Callable[[Any], int] | None = None,
        chunk_size: int | None = None,
        progress: bool = False,
        group: Any = None,
    ) -> EmpiricalFisherOperator:
        r"""The empirical Fisher over ``data`` of a pure loss ``f(params, batch)``.

        :math:`F_{\mathrm{emp}} = \frac1N \sum_i g_i g_i^\top` (``"mean"``;
        :math:`\sum_i g_i g_i^\top` for ``"sum"``) with :math:`g_i =
        \nabla_\theta f(\theta, b_i)`, ``f`` on sample :math:`i` alone: the batch with
        every tensor whose leading dimension is :math:`N_b` cut to the slice
        ``[i:i+1]`` (other leaves passed whole; see
        :func:`~torch_secorder.operators._function.function_per_sample_grads`).
        ``params``, ``data``, ``reduction`` (needed, also for one batch) and
        ``batch_size`` are as in :meth:`HessianOperator.from_function`.

        Example:
            >>> import torch
            >>> x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
            >>> f = lambda p, batch: ((batch @ p["w"] - 1.0) ** 2).mean()
            >>> F = EmpiricalFisherOperator.from_function(
            ...     f, {"w": torch.zeros(1, dtype=torch.float64)}, [x[:1], x[1:]], reduction="mean"
            ... )
            >>> F.diagonal()  # g_i = -2, -4: mean of squares 10
            tensor([10.], dtype=torch.float64)
        """
        op = cls._of_function(
            FunctionSource(f, params),
            None,
            data,
            batch_size=batch_size,
            reduction=reduction,
            chunk_size=chunk_size,
            progress=progress,
            group=group,
        )
        op._check_reduction()
        return op

    def _per_sample(
        self, index: int, inputs: Any, targets: Any, on_chunk: Callable[[dict[str, Tensor]], None]
    ) -> float:
        """Per-sample gradients of the batch to ``on_chunk``; returns the batch's scale."""
        if self.function is not None:  # inputs: the batch of f
            n = self.batches.size_of(inputs, index)
            function_per_sample_grads(
                self.function, inputs, n, self.names, self.chunk_size, on_chunk
            )
        else:
            _, n = empirical_sq_sum(
                self.model, self.loss_fn, inputs, targets, self.chunk_size, on_chunk
            )
        return 1.0 / n if self.reduction == "mean" else 1.0

    def _rows(self, grads: dict[str, Tensor]) -> Tensor:
        """``(samples, n)``: a chunk's per-sample gradients of the operator's parameters."""
        return torch.cat([grads[name].reshape(grads[name].shape[0], -1) for name in self.names], 1)

    def _batch_matmat(self, index: int, inputs: Any, targets: Tensor, V: Tensor) -> Tensor:
        parts: list[Tensor] = []

        def on_chunk(grads: dict[str, Tensor]) -> None:
            G = self._rows(grads)
            parts.append((V @ G.T) @ G)

        scale = self._per_sample(index, inputs, targets, on_chunk)
        return sum(parts[1:], parts[0]) * scale

    def _batch_diagonal(self, index: int, inputs: Any, targets: Tensor) -> Tensor:
        parts: list[Tensor] = []

        def on_chunk(grads: dict[str, Tensor]) -> None:
            parts.append(self._rows(grads).square().sum(0))

        scale = self._per_sample(index, inputs, targets, on_chunk)
        return sum(parts[1:], parts[0]) * scale


#: Loss classes and functions whose negative log-likelihood the Fisher knows.
_LIKELIHOODS: dict[Any, str] = {
    nn.CrossEntropyLoss: "ce",
    nn.MSELoss: "mse",
    nn.functional.cross_entropy: "ce",
    nn.functional.mse_loss: "mse",
}


def _likelihood(loss_fn: Any) -> str:
    kind = _LIKELIHOODS.get(type(loss_fn)) or _LIKELIHOODS.get(loss_fn)
    if kind is None:
        raise ValueError(
            "FisherOperator needs a loss that is a negative log-likelihood: nn.CrossEntropyLoss / "
            "F.cross_entropy (categorical) or nn.MSELoss / F.mse_loss (Gaussian), got "
            f"{loss_fn!r}; for any other loss use GGNOperator"
        )
    if kind == "ce" and isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0.0:
            raise ValueError(
                "FisherOperator: a cross-entropy with class weights or label smoothing is not "
                "a categorical negative log-likelihood; use GGNOperator"
            )
    return kind


class FisherOperator(GGNOperator):
    r"""The type-2 Fisher :math:`\sum_b w_b J_b^\top \Lambda_b J_b` of the model's likelihood.

    :math:`\Lambda_b` is the Hessian of the negative log-likelihood with respect to
    the outputs, which does not depend on the targets for the categorical
    (``nn.CrossEntropyLoss``) and Gaussian (``nn.MSELoss``) likelihoods: the Fisher
    equals the GGN of that loss, and without ``num_samples`` it is computed exactly,
    as :class:`GGNOperator`.

    With ``num_samples=m``, the Monte Carlo Fisher of
    :mod:`~torch_secorder.problems._fisher`: per sample :math:`i`, ``m``
    output vectors :math:`u_{ir}` with :math:`\mathbb{E}\sum_r u_{ir}u_{ir}^\top =
    \Lambda_i` (labels drawn from the model's categorical distribution, or Gaussian
    noise), and :math:`F = c \sum_{i,r} (J_i^\top u_{ir})(J_i^\top u_{ir})^\top`,
    an unbiased estimate of the Fisher that is itself a fixed positive semi-definite
    matrix: the draws of batch :math:`b` come from a generator seeded with
    ``seed + b``, ``seed`` drawn once from ``generator`` (or the global RNG) when the
    operator is built, so every product and the diagonal see the same draws.  This
    needs the batches in the same order on every pass (a ``DataLoader`` without
    shuffling).  ``chunk_size`` counts samples per batched backward pass.

    Args:
        num_samples: ``None`` (exact) or the labels drawn per sample.
        generator: Source of the seed (Monte Carlo only).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 3).double()
        >>> x = torch.randn(5, 2, dtype=torch.float64)
        >>> y = torch.randint(0, 3, (5,))
        >>> F = FisherOperator(model, torch.nn.CrossEntropyLoss(), [(x[:3], y[:3]), (x[3:], y[3:])])
        >>> G = GGNOperator(model, torch.nn.CrossEntropyLoss(), (x, y))
        >>> bool(torch.allclose(F.diagonal(), G.diagonal()))
        True
        >>> mc = FisherOperator(model, torch.nn.CrossEntropyLoss(), (x, y), num_samples=2,
        ...                     generator=torch.Generator().manual_seed(0))
        >>> dense = mc @ torch.eye(9, dtype=torch.float64)
        >>> bool(torch.allclose(mc.diagonal(), torch.diagonal(dense)))
        True
    """

    label = "Fisher"

    @classmethod
    def from_function(cls, *args: Any, **kwargs: Any) -> FisherOperator:
        """Not available: the Fisher needs the likelihood a loss module names.

        For a pure function, :meth:`GGNOperator.from_function` with the
        cross-entropy or MSE as ``loss`` is the exact type-2 Fisher (it equals the GGN).
        """
        raise TypeError(
            "FisherOperator.from_function is not available: for a pure f use "
            "GGNOperator.from_function with a cross-entropy or MSE loss, which is the exact "
            "type-2 Fisher of that likelihood"
        )

    def __init__(
        self,
        *args: Any,
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.likelihood = _likelihood(self.loss_fn)
        if self.reduction is None:
            self.reduction = "mean"  # F.cross_entropy / F.mse_loss default
        if num_samples is not None:
            check_num_samples(num_samples)
        check_generator(generator, self.device)
        self.num_samples_per_input = num_samples
        self._seed = (
            None
            if num_samples is None
            else int(torch.randint(0, 2**62, (1,), generator=generator, device=self.device))
        )

    def _mc_rows(self, index: int, inputs: Any, fn: Callable[[Tensor], None]) -> None:
        r"""Feed ``fn`` the rows :math:`\sqrt{c}\, J_i^\top u_{ir}` of batch ``index`` in chunks."""
        assert self._seed is not None
        generator = torch.Generator(device=self.device).manual_seed(self._seed + index)
        with model_output_problem(self.model, inputs, False, only=self.names) as problem:
            if not problem.active:
                return
            out, vjp_fn = torch.func.vjp(problem.pure, problem.primals)
            out = out.detach()
            if self.likelihood == "ce" and out.ndim != 2:
                raise ValueError(
                    "FisherOperator with num_samples: the model's outputs must be (batch, "
                    f"classes) logits for cross-entropy, got shape {tuple(out.shape)}"
                )
            make, per = fisher_rows(
                out, self.likelihood, self.num_samples_per_input, generator, False
            )
            n = out.shape[0]
            d = out.numel() // n
            scale = 1.0
            if self.reduction == "mean":
                scale = 1.0 / n if self.likelihood == "ce" else 1.0 / (n * d)
            step = self.chunk_size or max(
                1, chunk_entries(self.device) // max(1, per * out.numel() + self.shape[0])
            )
            pulled = torch.func.vmap(vjp_fn)
            for start, stop in chunk_ranges(n, step):
                rows = make(start, stop).reshape(-1, *out.shape)
                fn(tree_ravel(list(pulled(rows)[0]), batch_dims=1) * scale**0.5)

    def _batch_matmat(self, index: int, inputs: Any, targets: Tensor, V: Tensor) -> Tensor:
        if self.num_samples_per_input is None:
            return super()._batch_matmat(index, inputs, targets, V)
        total = torch.zeros_like(V)

        def add(R: Tensor) -> None:
            nonlocal total
            total = total + (V @ R.T) @ R

        self._mc_rows(index, inputs, add)
        return total

    def _batch_diagonal(self, index: int, inputs: Any, targets: Tensor) -> Tensor:
        if self.num_samples_per_input is None:
            return super()._batch_diagonal(index, inputs, targets)
        total = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)

        def add(R: Tensor) -> None:
            nonlocal total
            total = total + (R**2).sum(0)

        self._mc_rows(index, inputs, add)
        return total
