r"""Hessian-vector products of a pure loss ``f(params) -> scalar``, forward-over-reverse.

.. math::
    H v = \frac{\partial}{\partial \varepsilon} \nabla f(\theta + \varepsilon v)
    \Big|_{\varepsilon = 0},

computed as ``jvp(grad(f), (params,), (v,))``: one forward pass and one
reverse pass carrying tangents, about the cost of two gradients.  Many vectors
are handled by ``vmap`` over the vector argument, in chunks, so the memory is
that of ``chunk_size`` HVPs.  The loss runs under
:class:`~torch_secorder.func._fixes.DifferentiableOpsMode`, so ``F.mse_loss`` and
``scaled_dot_product_attention`` (transformers) work as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from torch_secorder._checks import check_chunk_size
from torch_secorder._chunks import CPU_CHUNK_ELEMENTS, static_chunk_size
from torch_secorder.func._fixes import differentiable
from torch_secorder.func._tree import PyTree, tree_numel, tree_ravel, tree_unravel

__all__ = ["hvp", "hvp_batched", "hessian_matmat", "default_chunk_size"]

#: Entries of the tangent batch (``chunk_size * n``) aimed at by the default chunk on the
#: CPU (the policy: :mod:`torch_secorder._chunks`).
DEFAULT_CHUNK_ELEMENTS = CPU_CHUNK_ELEMENTS


def default_chunk_size(num_vectors: int, dim: int, device: torch.device | None = None) -> int:
    """The policy's chunk size for ``num_vectors`` vectors of ``dim`` entries on ``device``.

    On the CPU the tangent batch stays near 2**24 entries (64 MiB in float32); on
    CUDA the chunk comes from the free memory (:func:`torch_secorder._chunks.static_chunk_size`).
    The peak memory of a chunked, vmapped HVP is about ``chunk_size`` times that of
    one HVP (activations and their tangents), plus the tangent batch itself.
    """
    return static_chunk_size(num_vectors, dim, device)


def hvp(f: Callable[[PyTree], Tensor], params: PyTree, v: PyTree) -> PyTree:
    r"""Hessian-vector product :math:`H v` of a scalar function of a pytree.

    Args:
        f: Pure function of ``params`` returning a scalar tensor.
        params: The point :math:`\theta` (a pytree of tensors, e.g. a dict).
        v: The vector, a pytree shaped like ``params``.

    Returns:
        :math:`\nabla^2 f(\theta) v`, shaped like ``params``.

    Example:
        >>> import torch
        >>> f = lambda p: (p["x"] ** 3).sum()
        >>> hvp(f, {"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([1.0, 1.0])})
        {'x': tensor([ 6., 12.])}
    """
    return jvp(grad(differentiable(f)), (params,), (v,))[1]


def hvp_batched(
    f: Callable[[PyTree], Tensor],
    params: PyTree,
    V: PyTree,
    chunk_size: int | None = None,
) -> PyTree:
    r"""Hessian-vector products with a batch of vectors, vmapped in chunks.

    Args:
        f: Pure function of ``params`` returning a scalar tensor.
        params: The point :math:`\theta`.
        V: Pytree shaped like ``params`` with one extra leading dimension ``k`` on
            every leaf: the ``k`` vectors.
        chunk_size: Vectors per vmapped call (``None``: all ``k`` at once). Peak
            memory is about ``chunk_size`` HVPs.

    Returns:
        :math:`H v_i` for each ``i``, stacked like ``V``.

    Example:
        >>> import torch
        >>> f = lambda p: (p["x"] ** 2).sum()
        >>> V = {"x": torch.eye(2)}
        >>> hvp_batched(f, {"x": torch.tensor([1.0, 2.0])}, V)["x"]
        tensor([[2., 0.],
                [0., 2.]])
    """
    check_chunk_size(chunk_size)
    return vmap(lambda v: hvp(f, params, v), chunk_size=chunk_size, randomness="same")(V)


def hessian_matmat(
    f: Callable[[PyTree], Tensor], params: PyTree, chunk_size: int | None = None
) -> Callable[[Tensor], Tensor]:
    """The Hessian of ``f`` at ``params`` as a matmat on flat ``(k, n)`` batches.

    This is the bridge to :mod:`torch_secorder.linalg`, whose algorithms take any
    ``V -> V H`` on rows of length ``n = tree_numel(params)``.

    Example:
        >>> import torch
        >>> f = lambda p: (p["x"] ** 2).sum() * p["y"].sum()
        >>> mm = hessian_matmat(f, {"x": torch.ones(1), "y": torch.ones(1)})
        >>> mm(torch.eye(2))
        tensor([[2., 2.],
                [2., 0.]])
    """
    check_chunk_size(chunk_size)

    def matmat(flat: Tensor) -> Tensor:
        V = tree_unravel(flat, params)
        return tree_ravel(hvp_batched(f, params, V, chunk_size=chunk_size), batch_dims=1)

    matmat.dim = tree_numel(params)  # type: ignore[attr-defined]
    return matmat
