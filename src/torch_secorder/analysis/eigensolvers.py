r"""Top eigenvalues and eigenvectors of a Hessian or any symmetric matrix-vector product.

Thin wrappers, with torch-secorder 0.0.1's signatures, around the model-free solvers
of :mod:`torch_secorder.linalg.eigen`:

* :func:`power_iteration`: block power iteration with Rayleigh-Ritz and deflation;
* :func:`lanczos` (alias :func:`lanczos_iteration`): Lanczos with full
  reorthogonalisation;
* :func:`model_eigenvalues` (alias :func:`estimate_eigenvalues`): either of them
  on the Hessian of a model's loss on one batch or over a data set, whose
  products come from the engine; ``loss_fn(outputs, targets)`` as everywhere in
  the library, or 0.0.1's ``loss_fn(model, data, target)``.

By default the eigenvalues of largest magnitude are returned, as in 0.0.1, in
decreasing :math:`|\lambda|`.  The keyword ``which`` selects others: ``"LA"``
(largest algebraic, decreasing) or ``"SA"`` (smallest algebraic, increasing: the
most negative curvature).  Both solvers stop when every wanted Ritz pair
:math:`(\theta, y)` has :math:`\|A y - \theta y\| \le \mathrm{tol}\cdot|\theta|`
(see :mod:`torch_secorder.linalg.eigen`), or after ``num_iterations``.

Every function takes the keyword ``return_info=True`` to return a third item, an
:class:`EigenInfo` with the residual norm :math:`\|A y - \theta y\|` of each
returned pair, whether it met the tolerance, and the number of products used.
Without it, a run that stops on ``num_iterations`` before every pair met the
tolerance warns (``RuntimeWarning``) instead of returning the pairs silently.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from torch_secorder.analysis._model_hessian import model_hessian
from torch_secorder.linalg.eigen import CRITERIA, EigenResult, lanczos_eigsh, subspace_iteration
from torch_secorder.problems._inputs import (
    NO_BATCH,
    check_chunk_size,
    check_module,
    check_positive_int,
)

__all__ = [
    "EigenInfo",
    "estimate_eigenvalues",
    "lanczos",
    "lanczos_iteration",
    "model_eigenvalues",
    "power_iteration",
]

METHODS = ("lanczos", "power_iteration")


class EigenInfo(NamedTuple):
    """How well the returned eigenpairs are known (the third item with ``return_info=True``).

    Attributes:
        residuals: ``(k,)`` residual norms :math:`\\|A y - \\theta y\\|` of the
            returned pairs (``y`` of unit norm), in the order of the eigenvalues.
        converged: ``(k,)`` bool, whether each pair met the tolerance.
        matvecs: Products with the matrix used (vectors; a block of ``b`` counts ``b``).
    """

    residuals: Tensor
    converged: Tensor
    matvecs: int


class _Counted:
    """A batched product ``V -> V A`` that counts the vectors it multiplies."""

    def __init__(self, matmat: Callable[[Tensor], Tensor]) -> None:
        self.matmat = matmat
        self.count = 0

    def __call__(self, V: Tensor) -> Tensor:
        self.count += V.shape[0]
        return self.matmat(V)


def _finish(
    name: str,
    res: EigenResult,
    matvecs: int,
    tol: float,
    return_info: bool,
    *items: Any,
    criterion: str = "residual",
) -> tuple:
    """``items`` plus an :class:`EigenInfo` if asked, else a warning when not converged."""
    info = EigenInfo(res.residuals, res.converged, matvecs)
    if return_info:
        return (*items, info)
    if not bool(res.converged.all()):
        missing = int((~res.converged).sum())
        what = "relative residual" if criterion == "residual" else "relative eigenvalue error"
        warnings.warn(
            f"{name}: {missing} of {res.converged.shape[0]} eigenpairs did not reach the "
            f"{what} tol={tol} within num_iterations (largest residual "
            f"{float(res.residuals.max()):.3g}); raise num_iterations or pass "
            "return_info=True to get the residuals and converged flags",
            RuntimeWarning,
            stacklevel=3,
        )
    return items


def _default_device(device: torch.device | str | None) -> torch.device:
    if device is None:  # 0.0.1's default
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def power_iteration(
    matrix_vector_product: Callable[[Tensor], Tensor],
    dim: int,
    num_iterations: int = 100,
    num_vectors: int = 1,
    tol: float = 1e-6,
    device: torch.device | str | None = None,
    *,
    which: str = "LM",
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    return_info: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, EigenInfo]:
    r"""Top ``num_vectors`` eigenpairs of a symmetric matrix by block power iteration.

    The block of ``num_vectors`` vectors is multiplied by :math:`A`, rotated to the
    Ritz vectors of :math:`X A X^\top`, and converged vectors are locked and
    projected out of the rest (deflation).  See
    :func:`~torch_secorder.linalg.eigen.subspace_iteration`.

    Args:
        matrix_vector_product: :math:`V \mapsto A V` on a ``(dim, b)`` matrix of
            column vectors (as in 0.0.1; a ``(dim,)`` result is accepted for
            ``b = 1``).
        dim: Size of the matrix.
        num_iterations: Largest number of block products.
        num_vectors: Number of eigenpairs.
        tol: Relative residual tolerance.
        device: Device of the vectors (default: CUDA if available, else CPU, as 0.0.1).
        which: ``"LM"`` (largest magnitude, default, as 0.0.1), ``"LA"``
            (largest algebraic) or ``"SA"`` (smallest algebraic).
        dtype: Dtype of the vectors (default: torch's default dtype).
        generator: Source of the random start.
        return_info: Also return an :class:`EigenInfo` (residuals, converged
            flags, products used).

    Returns:
        ``(eigenvalues, eigenvectors)``: ``(num_vectors,)`` and ``(dim, num_vectors)``
        (one eigenvector per column, orthonormal); with ``return_info=True``,
        ``(eigenvalues, eigenvectors, info)``.

    Differences from 0.0.1: stops on the residuals of the Ritz pairs rather than
    on the change of the eigenvalues; the eigenvectors are Ritz vectors of the
    block (0.0.1 returned ``A^t X`` orthonormalised, without the final rotation);
    ``which``, ``dtype``, ``generator``, ``return_info`` are new; a run that ends
    on ``num_iterations`` unconverged warns.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([1.0, -4.0, 2.0], dtype=torch.float64))
        >>> vals, vecs = power_iteration(lambda V: A @ V, 3, 500, 2, tol=1e-10,
        ...                              device="cpu", dtype=torch.float64)
        >>> [round(float(v), 6) for v in vals], tuple(vecs.shape)
        ([-4.0, 2.0], (3, 2))
    """
    check_positive_int(num_iterations, "num_iterations")
    check_positive_int(num_vectors, "num_vectors")
    if not callable(matrix_vector_product):
        raise TypeError(
            f"matrix_vector_product must be callable, got {type(matrix_vector_product).__name__}"
        )

    def matmat(V: Tensor) -> Tensor:
        out = matrix_vector_product(V.T)
        if isinstance(out, Tensor) and out.shape == (V.shape[1],) and V.shape[0] == 1:
            out = out[:, None]
        return out.T if isinstance(out, Tensor) and out.ndim == 2 else out

    counted = _Counted(matmat)
    res = subspace_iteration(
        counted,
        dim,
        num_vectors,
        which=which,
        max_iter=num_iterations,
        tol=tol,
        dtype=dtype,
        device=_default_device(device),
        generator=generator,
    )
    return _finish(
        "power_iteration", res, counted.count, tol, return_info, res.eigenvalues, res.eigenvectors.T
    )


def lanczos(
    matrix_vector_product: Callable[[Tensor], Tensor],
    dim: int,
    num_iterations: int = 100,
    num_vectors: int = 1,
    tol: float = 1e-6,
    device: torch.device | str | None = None,
    *,
    which: str = "LM",
    dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    return_info: bool = False,
    criterion: str = "residual",
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, EigenInfo]:
    r"""Top ``num_vectors`` eigenpairs of a symmetric matrix by Lanczos (full reorthogonalisation).

    See :func:`~torch_secorder.linalg.eigen.lanczos_eigsh`.

    Args:
        matrix_vector_product: :math:`v \mapsto A v` on a ``(dim,)`` vector (as 0.0.1).
        dim: Size of the matrix.
        num_iterations: Largest Krylov dimension (matrix-vector products).
        num_vectors: Number of eigenpairs.
        tol: Relative residual tolerance of the Ritz pairs.
        device: Device of the vectors (default: CUDA if available, else CPU, as 0.0.1).
        which: ``"LM"`` (largest magnitude, default, as 0.0.1), ``"LA"``
            (largest algebraic) or ``"SA"`` (smallest algebraic).
        dtype: Dtype of the vectors (default: torch's default dtype).
        generator: Source of the random start vector.
        return_info: Also return an :class:`EigenInfo` (residuals, converged
            flags, products used).
        criterion: What ``tol`` bounds: ``"residual"`` (the relative residual of
            each pair) or ``"eigenvalue"`` (each eigenvalue's relative error, by the
            Kato-Temple bound; fewer products when only the values matter). See
            :func:`~torch_secorder.linalg.eigen.lanczos_eigsh`.

    Returns:
        ``(eigenvalues, eigenvectors)``: ``(num_vectors,)`` and ``(dim, num_vectors)``;
        with ``return_info=True``, ``(eigenvalues, eigenvectors, info)``.

    Differences from 0.0.1: 0.0.1 did not reorthogonalise (spurious copies of
    converged eigenvalues), always ran ``num_iterations`` steps unless the
    recurrence broke down (``tol`` was that threshold), sorted by algebraic value
    although it promised the largest, and failed for ``num_iterations=1``.
    ``tol`` now bounds the relative residuals; ``num_iterations`` bounds the
    products (the basis is restarted thickly, see
    :func:`~torch_secorder.linalg.eigen.lanczos_eigsh`); a run that ends on it
    unconverged warns.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([1.0, -4.0, 2.0], dtype=torch.float64))
        >>> vals, vecs = lanczos(lambda v: A @ v, 3, num_vectors=2, device="cpu",
        ...                      dtype=torch.float64)
        >>> [round(float(v), 10) for v in vals]
        [-4.0, 2.0]
        >>> vals, _ = lanczos(lambda v: A @ v, 3, device="cpu", dtype=torch.float64, which="LA")
        >>> round(float(vals[0]), 10)
        2.0
        >>> vals, vecs, info = lanczos(lambda v: A @ v, 3, device="cpu", dtype=torch.float64,
        ...                            return_info=True)
        >>> bool(info.converged.all()), bool(info.residuals.max() < 1e-12)
        (True, True)
        >>> vals, _ = lanczos(lambda v: A @ v, 3, device="cpu", dtype=torch.float64,
        ...                   which="LA", criterion="eigenvalue")
        >>> round(float(vals[0]), 10)
        2.0
    """
    check_positive_int(num_iterations, "num_iterations")
    check_positive_int(num_vectors, "num_vectors")
    if not callable(matrix_vector_product):
        raise TypeError(
            f"matrix_vector_product must be callable, got {type(matrix_vector_product).__name__}"
        )

    def matmat(V: Tensor) -> Tensor:
        return torch.stack([matrix_vector_product(v) for v in V])

    counted = _Counted(matmat)
    res = lanczos_eigsh(
        counted,
        dim,
        num_vectors,
        which=which,
        max_iter=num_iterations,
        tol=tol,
        dtype=dtype,
        device=_default_device(device),
        generator=generator,
        criterion=criterion,
    )
    return _finish(
        "lanczos",
        res,
        counted.count,
        tol,
        return_info,
        res.eigenvalues,
        res.eigenvectors.T,
        criterion=criterion,
    )


#: 0.0.1's other name for :func:`lanczos`.
lanczos_iteration = lanczos


def model_eigenvalues(
    model: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Any,
    target: Any = NO_BATCH,
    num_eigenvalues: int = 1,
    method: str = "lanczos",
    num_iterations: int = 100,
    tol: float = 1e-6,
    device: torch.device | str | None = None,
    *,
    which: str = "LM",
    generator: torch.Generator | None = None,
    strategy: str = "auto",
    reduction: str | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
    return_info: bool = False,
    group: Any = None,
    criterion: str = "residual",
) -> tuple[Tensor, list[list[Tensor]]] | tuple[Tensor, list[list[Tensor]], EigenInfo]:
    r"""Extreme eigenpairs of the Hessian of a model's loss w.r.t. its parameters.

    The Hessian is never formed: the solver uses Hessian-vector products from the
    engine (the one model-level problem,
    :meth:`~torch_secorder.problems._problem.LossProblem.matmat`, or a
    :class:`~torch_secorder.operators.HessianOperator` over a data set).  Nothing of
    the model changes (parameters, ``.grad``, ``requires_grad``, training flags,
    buffers), also on error; in training mode dropout uses one fixed mask.

    ``loss_fn`` may follow either convention; which one is read from its signature,
    never by calling it:

    * the library's, ``loss_fn(outputs, targets)`` (``nn.MSELoss()``,
      ``F.cross_entropy``, any callable that takes two positional arguments, or
      either two or three): the loss is ``loss_fn(model(data), target)``, as in
      :func:`~torch_secorder.core.hessian_trace.model_hessian_trace`;
    * torch-secorder 0.0.1's, ``loss_fn(model, data, target)`` (exactly three
      positional arguments): the loss is that call.

    Over a data set, omit ``target``: ``data`` is then one ``(inputs, targets)``
    batch or an iterable of batches (a ``DataLoader``), the loss is the mean over
    all samples (batches weighted by their size) for a mean loss, or their sum for a
    summed one (see :mod:`torch_secorder.operators`; ``reduction=`` for a plain
    function that does not declare it), and ``loss_fn`` must be of the library's
    convention.  Each product is a pass over the data, with a progress bar over the
    batches for passes longer than a few seconds (``progress=False`` hides it).

    Args:
        model: The network; its parameters are the variables.  Parameters that
            do not require grad are held fixed (zero entries in the eigenvectors).
        loss_fn: ``loss_fn(outputs, targets)`` or ``loss_fn(model, data, target)``,
            returning a scalar.
        data: The model's input (one batch, with ``target``), or the data set
            (``target`` omitted).
        target: The targets of the batch ``data``; omitted for a data set.
        num_eigenvalues: Number of eigenpairs.
        method: ``"lanczos"`` or ``"power_iteration"``.
        num_iterations: Largest number of products (Lanczos) or block products
            (power iteration).
        tol: Relative residual tolerance.
        device: Device of the returned tensors (default: the parameters').
        which: ``"LM"`` (largest magnitude, default, as 0.0.1), ``"LA"`` or
            ``"SA"`` (most negative curvature).
        generator: Source of the random start (on the parameters' device).
        strategy: How Hessian products are computed (see
            :data:`torch_secorder.problems._problem.STRATEGIES`).
        reduction: ``"mean"`` or ``"sum"``, the data set form only, for a loss that
            does not declare its reduction.
        chunk_size: Vectors per batched Hessian-vector product.
        progress: Progress bars over the batches of a data set.
        return_info: Also return an :class:`EigenInfo`: the residual norms
            :math:`\|H y - \theta y\|` of the pairs (over all parameters,
            ``y`` of unit norm), their converged flags, and the Hessian-vector
            products used (each a pass over the data set in the data set form).
        group: The data set form only: ``data`` is this rank's shard and the
            Hessian that of the union of the ranks' shards, the same result on every
            rank (the random start drawn alike: ``generator`` seeded identically, or
            ``None`` for rank 0's seed); see :doc:`/distributed`.
        criterion: ``method="lanczos"`` only: what ``tol`` bounds, ``"residual"``
            (each pair's relative residual) or ``"eigenvalue"`` (each eigenvalue's
            relative error by the Kato-Temple bound :math:`\|r\|^2/\delta`, see
            :func:`~torch_secorder.linalg.eigen.lanczos_eigsh`): for sharpness, the
            eigenvalue to ``tol`` at fewer products.

    Returns:
        ``(eigenvalues, eigenvectors)``: a ``(num_eigenvalues,)`` tensor and a
        list of ``num_eigenvalues`` eigenvectors, each a list of tensors shaped
        like ``model.parameters()``; with ``return_info=True``,
        ``(eigenvalues, eigenvectors, info)``.  Without it, a run that ends on
        ``num_iterations`` before every pair met ``tol`` warns (``RuntimeWarning``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``loss_fn`` is not callable or
            takes neither two nor three positional arguments; a loss of 0.0.1's
            convention without ``target``.
        ValueError: unknown ``method`` or ``which``, bad counts, a loss that does
            not depend on the parameters.

    Differences from 0.0.1: ``loss_fn(outputs, targets)`` is accepted (0.0.1 took
    only ``loss_fn(model, data, target)``), and so is a data set in place of one
    batch; ``target`` may be omitted for that.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, 1.0]]))
        >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 1)
        >>> loss = lambda m, x, y: ((m(x) - y) ** 2).sum()  # 0.0.1's convention
        >>> vals, vecs = model_eigenvalues(model, loss, x, y, 2)
        >>> [round(float(v), 4) for v in vals], len(vecs), vecs[0][0].shape
        ([8.0, 2.0], 2, torch.Size([1, 2]))
        >>> sse = torch.nn.MSELoss(reduction="sum")  # the library's convention
        >>> vals, vecs, info = model_eigenvalues(model, sse, x, y, 1, return_info=True)
        >>> round(float(vals[0]), 4), bool(info.converged[0]), info.matvecs
        (8.0, True, 2)
        >>> vals, _ = model_eigenvalues(model, sse, x, y, 1, tol=1e-8, criterion="eigenvalue")
        >>> round(float(vals[0]), 4)  # the eigenvalue to 1e-8, by the Kato-Temple bound
        8.0
        >>> batches = [(x[:1], y[:1]), (x[1:], y[1:])]  # a data set: target omitted
        >>> vals, _ = model_eigenvalues(model, sse, batches, num_eigenvalues=2)
        >>> [round(float(v), 4) for v in vals]
        [8.0, 2.0]
    """
    check_module(model)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_positive_int(num_eigenvalues, "num_eigenvalues")
    check_positive_int(num_iterations, "num_iterations")
    check_chunk_size(chunk_size)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if criterion != "residual" and method.lower() != "lanczos":
        raise ValueError(
            f"criterion={criterion!r} needs method='lanczos' (power iteration stops on the "
            f"residual), got method={method!r}"
        )
    options = {"criterion": criterion} if method.lower() == "lanczos" else {}
    with model_hessian(
        model,
        loss_fn,
        data,
        target,
        name="model_eigenvalues",
        reduction=reduction,
        chunk_size=chunk_size,
        strategy=strategy,
        progress=progress,
        group=group,
    ) as H:
        solver = lanczos_eigsh if method.lower() == "lanczos" else subspace_iteration
        counted = _Counted(H.matmat)
        res: EigenResult = solver(
            counted,
            H.dim,
            num_eigenvalues,
            which=which,
            max_iter=num_iterations,
            tol=tol,
            dtype=H.dtype,
            device=H.device,
            generator=H.shared(generator),
            **options,
        )
        vectors = [H.as_params(row) for row in res.eigenvectors]
    values = res.eigenvalues
    if device is not None:
        values = values.to(device)
        vectors = [[t.to(device) for t in vec] for vec in vectors]
        res = res._replace(residuals=res.residuals.to(device), converged=res.converged.to(device))
    method_name = "power_iteration" if method.lower() == "power_iteration" else "lanczos"
    return _finish(
        method_name, res, counted.count, tol, return_info, values, vectors, criterion=criterion
    )


#: 0.0.1's other name for :func:`model_eigenvalues`.
estimate_eigenvalues = model_eigenvalues
