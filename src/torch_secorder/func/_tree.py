"""Pytree helpers shared by the engine: flat vectors <-> parameter pytrees.

The engine's functions take a parameter pytree (usually a dict of tensors).  The
matrix-free algorithms in :mod:`torch_secorder.linalg` work on flat vectors of
length ``n`` (the number of parameter entries).  These helpers convert between
the two without copying more than one concatenation.
"""

from __future__ import annotations

from typing import Any

import optree
import torch
from torch import Tensor

PyTree = Any

__all__ = [
    "PyTree",
    "tree_leaves",
    "tree_map",
    "tree_numel",
    "tree_ravel",
    "tree_unravel",
    "tree_batched_dot",
    "tree_dot",
]


def tree_leaves(tree: PyTree) -> list[Tensor]:
    """The tensors of ``tree`` in a fixed order (optree's)."""
    return optree.tree_leaves(tree, none_is_leaf=False, namespace="torch_secorder")


def tree_map(fn, tree: PyTree, *rest: PyTree) -> PyTree:
    """Apply ``fn`` leafwise to ``tree`` (and the trees of the same structure in ``rest``)."""
    return optree.tree_map(fn, tree, *rest, namespace="torch_secorder")


def tree_numel(tree: PyTree) -> int:
    """Number of scalar entries over all leaves.

    Example:
        >>> import torch
        >>> tree_numel({"w": torch.zeros(2, 3), "b": torch.zeros(3)})
        9
    """
    return sum(leaf.numel() for leaf in tree_leaves(tree))


def tree_ravel(tree: PyTree, batch_dims: int = 0) -> Tensor:
    """Concatenate the leaves into one flat vector (keeping ``batch_dims`` leading dims).

    Example:
        >>> import torch
        >>> tree_ravel({"a": torch.ones(2), "b": torch.zeros(1, 2)})
        tensor([1., 1., 0., 0.])
    """
    leaves = tree_leaves(tree)
    if batch_dims == 0:
        return torch.cat([leaf.reshape(-1) for leaf in leaves])
    lead = leaves[0].shape[:batch_dims]
    return torch.cat([leaf.reshape(*lead, -1) for leaf in leaves], dim=batch_dims)


def tree_unravel(flat: Tensor, like: PyTree) -> PyTree:
    """Split a flat vector (with optional leading batch dims) into the shapes of ``like``.

    Example:
        >>> import torch
        >>> like = {"a": torch.ones(2), "b": torch.zeros(1, 2)}
        >>> tree_unravel(torch.arange(4.0), like)["b"]
        tensor([[2., 3.]])
    """
    leaves, spec = optree.tree_flatten(like, none_is_leaf=False, namespace="torch_secorder")
    lead = flat.shape[:-1]
    pieces = torch.split(flat, [leaf.numel() for leaf in leaves], dim=-1)
    shaped = [piece.reshape((*lead, *leaf.shape)) for piece, leaf in zip(pieces, leaves)]
    return optree.tree_unflatten(spec, shaped)


def tree_dot(a: PyTree, b: PyTree) -> Tensor:
    """Euclidean inner product of two pytrees of the same structure."""
    return sum((x * y).sum() for x, y in zip(tree_leaves(a), tree_leaves(b)))  # type: ignore[return-value]


def tree_batched_dot(a: PyTree, b: PyTree) -> Tensor:
    """Row-wise inner products of two pytrees whose leaves share a leading batch dim."""
    return sum(
        (x * y).reshape(x.shape[0], -1).sum(-1) for x, y in zip(tree_leaves(a), tree_leaves(b))
    )  # type: ignore[return-value]
