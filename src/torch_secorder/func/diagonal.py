r"""The exact Hessian diagonal and trace of a pure loss, by a chunked basis sweep.

For each leaf :math:`\theta_\ell` of the parameter pytree, the diagonal of the
block :math:`\nabla^2_{\theta_\ell} f` is read off HVPs with the one-hot basis
vectors :math:`e_i` of that leaf, :math:`H_{ii} = e_i^\top H e_i`.  Only the leaf
being swept carries tangents, the vectors are vmapped ``chunk_size`` at a time,
and no ``n x n`` matrix is ever formed: the memory is that of ``chunk_size``
HVPs.  The cost is one HVP per parameter entry; :mod:`torch_secorder.func.fast_diagonal`
is far cheaper where the model's layers allow it.
"""

from __future__ import annotations

from collections.abc import Callable

import optree
import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from torch_secorder._checks import check_chunk_size
from torch_secorder._chunks import ChunkSchedule
from torch_secorder.func._fixes import differentiable
from torch_secorder.func._tree import PyTree, tree_leaves
from torch_secorder.linalg.progress import progress_bar

__all__ = ["hessian_diagonal", "hessian_trace", "leaf_hessian_diagonal"]


def _replace_leaf(params: PyTree, index: int, value: Tensor) -> PyTree:
    leaves, spec = optree.tree_flatten(params, none_is_leaf=False, namespace="torch_secorder")
    leaves = list(leaves)
    leaves[index] = value
    return optree.tree_unflatten(spec, leaves)


def basis_sweep_diagonal(
    product: Callable[[Tensor], Tensor],
    leaf: Tensor,
    chunk_size: int | None,
    progress: bool = False,
    desc: str = "diagonal sweep",
) -> Tensor:
    r"""Diagonal :math:`e_i^\top A e_i` of a linear map on tensors shaped like ``leaf``.

    ``product(v) = A v`` is vmapped over ``chunk_size`` one-hot basis vectors at a
    time; memory is that of ``chunk_size`` products, never an ``n x n`` matrix.
    ``chunk_size=None`` takes the device's chunk policy
    (:class:`~torch_secorder._chunks.ChunkSchedule`: on CUDA the first chunk
    measures the peak memory of a product and sizes the others from the free memory).

    Example:
        >>> import torch
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> basis_sweep_diagonal(lambda v: A @ v, torch.zeros(2), chunk_size=1)
        tensor([2., 3.])
    """
    numel = leaf.numel()
    batched = vmap(product, randomness="same")
    pieces = []
    schedule = ChunkSchedule(numel, chunk_size, leaf.device, dim=numel)
    for start, stop in progress_bar(schedule, enabled=progress, desc=desc):
        rows = torch.arange(stop - start, device=leaf.device)
        basis = torch.zeros(stop - start, numel, dtype=leaf.dtype, device=leaf.device)
        basis[rows, rows + start] = 1.0
        products = batched(basis.reshape(stop - start, *leaf.shape)).reshape(stop - start, numel)
        pieces.append(products[rows, rows + start])
    return torch.cat(pieces).reshape(leaf.shape)


def leaf_hessian_diagonal(
    f: Callable[[PyTree], Tensor],
    params: PyTree,
    index: int,
    chunk_size: int | None = None,
    progress: bool = False,
) -> Tensor:
    """Exact diagonal of the Hessian block of leaf number ``index`` (optree order).

    Args:
        f: Pure scalar function of ``params``.
        params: The point.
        index: Which leaf (in :func:`~torch_secorder.func._tree.tree_leaves` order).
        chunk_size: Basis vectors per vmapped call.
        progress: Show a progress bar for long sweeps.

    Returns:
        A tensor shaped like that leaf.
    """
    check_chunk_size(chunk_size)
    leaf = tree_leaves(params)[index]

    @differentiable
    def f_leaf(x: Tensor) -> Tensor:
        return f(_replace_leaf(params, index, x))

    def hvp_leaf(v: Tensor) -> Tensor:
        return jvp(grad(f_leaf), (leaf,), (v,))[1]

    return basis_sweep_diagonal(hvp_leaf, leaf, chunk_size, progress, "Hessian diagonal sweep")


def hessian_diagonal(
    f: Callable[[PyTree], Tensor],
    params: PyTree,
    chunk_size: int | None = None,
    progress: bool = False,
) -> PyTree:
    r"""Exact diagonal :math:`\operatorname{diag}(\nabla^2 f(\theta))`, shaped like ``params``.

    Args:
        f: Pure function of ``params`` returning a scalar tensor.
        params: The point :math:`\theta` (pytree of tensors).
        chunk_size: Basis vectors per vmapped HVP call (default: about ``2**24 / n_leaf``
            tangent entries, at most 1024). Peak memory: ``chunk_size`` HVPs.
        progress: Show a progress bar when the sweep lasts more than a few seconds.

    Returns:
        A pytree shaped like ``params``.

    Example:
        >>> import torch
        >>> f = lambda p: (p["w"] ** 2).sum() * p["b"].sum() + p["b"].pow(3).sum()
        >>> hessian_diagonal(f, {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0])})
        {'w': tensor([6., 6.]), 'b': tensor([18.])}
    """
    check_chunk_size(chunk_size)
    leaves, spec = optree.tree_flatten(params, none_is_leaf=False, namespace="torch_secorder")
    diag = [
        leaf_hessian_diagonal(f, params, i, chunk_size=chunk_size, progress=progress)
        for i in range(len(leaves))
    ]
    return optree.tree_unflatten(spec, diag)


def hessian_trace(
    f: Callable[[PyTree], Tensor],
    params: PyTree,
    chunk_size: int | None = None,
    progress: bool = False,
) -> Tensor:
    r"""Exact :math:`\operatorname{tr}(\nabla^2 f(\theta)) = \sum_i H_{ii}`.

    Sums :func:`hessian_diagonal`; same cost and memory.

    Example:
        >>> import torch
        >>> hessian_trace(lambda p: (p["x"] ** 2).sum(), {"x": torch.ones(3)})
        tensor(6.)
    """
    check_chunk_size(chunk_size)
    return sum(d.sum() for d in tree_leaves(hessian_diagonal(f, params, chunk_size, progress)))
