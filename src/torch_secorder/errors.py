"""Exception classes of torch-secorder.

Each one derives from the two built-in classes that code written for either
convention catches, as :class:`numpy.exceptions.AxisError` is both a
``ValueError`` and an ``IndexError``: the checks of this package raise
``ValueError`` for a wrong value, while torch-secorder 0.0.1 (which left them to
:mod:`torch.autograd`) raised ``RuntimeError``.  Both ``except ValueError`` and
``except RuntimeError`` catch them.

This module imports nothing of the package (every layer may raise these).

Example:
    >>> import torch
    >>> from torch_secorder import ShapeError, exact_hvp
    >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> try:
    ...     exact_hvp(lambda: (x ** 2).sum(), [x], torch.ones(3))
    ... except RuntimeError as err:  # 0.0.1 code
    ...     print(type(err).__name__, isinstance(err, ValueError))
    ShapeError True
"""

from __future__ import annotations

__all__ = ["DistributedError", "ShapeError", "StrictError", "UnsupportedShapeError"]


class ShapeError(ValueError, RuntimeError):
    """A tensor's shape does not fit: a vector ``v`` unlike the parameters, a
    target unlike the model's output, a loss that is not a scalar.

    Both a ``ValueError`` and a ``RuntimeError`` (0.0.1 raised the latter).
    """


class StrictError(ValueError, RuntimeError):
    """``strict=True`` and a tensor of ``params`` that does not require grad or
    that the loss does not use.

    Both a ``ValueError`` and a ``RuntimeError`` (0.0.1 raised the latter, with
    torch's message "One of the differentiated Tensors does not require grad").
    """


class UnsupportedShapeError(ShapeError, NotImplementedError):
    """An output shape that the quantity is not defined for here: the type-2
    Fisher of ``loss_type="nll"`` needs ``(batch, classes)`` logits.

    A :class:`ShapeError` (so a ``ValueError`` and a ``RuntimeError``) and a
    ``NotImplementedError``, which 0.0.1 raised for such outputs.
    """


class DistributedError(RuntimeError):
    """A rank of a process group failed during a data-parallel computation, or the
    ranks disagreed (different vectors, different models): raised on every rank of
    the group, with the same message, instead of leaving the others waiting in a
    collective (see :doc:`/distributed`).

    Attributes:
        rank: The rank (in the group) that failed first or that disagreed.
    """

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank
