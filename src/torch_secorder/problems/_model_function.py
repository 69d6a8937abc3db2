"""The one adapter from a model to a function of its parameters.

Every route that evaluates a model at other parameter values goes through
:class:`ModelFunction`: the problems of :mod:`torch_secorder.problems._problem` (Hessian,
GGN, Jacobian products, the operators' batches), the per-sample gradients of the
empirical Fisher, the loss landscapes.  It holds the model's named parameters
(checked once: a module with parameters, the batch on their device) and evaluates
``model(*inputs)`` either as it is or with some parameters replaced
(:func:`torch.func.functional_call`); an input whose dtype does not fit the
parameters' raises a ``TypeError`` naming both dtypes
(:func:`~torch_secorder.problems._batch_checks.inputs_fit`).

State preservation, random draws and the loss around the output are the business
of the problem object built on it (:func:`~torch_secorder.problems._problem.module_problem`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from torch_secorder.problems._batch_checks import check_batch_device, inputs_fit
from torch_secorder.problems._inputs import check_module

__all__ = ["ModelFunction", "model_args"]


def model_args(inputs: Any) -> tuple:
    """The positional arguments of ``model``: a tuple ``inputs`` unpacked, anything else alone."""
    return inputs if isinstance(inputs, tuple) else (inputs,)


class ModelFunction:
    """``model(*inputs)`` as a function of (some of) its parameters' values.

    Args:
        model: The network (``TypeError`` if not an ``nn.Module``; ``ValueError`` if it
            has no parameters: ``empty`` says why that is an error).
        empty: The end of the message for a model without parameters.
        **batch: Tensors (nested in tuples, lists, dicts) that must lie on the
            parameters' device, by argument name (``inputs=..., targets=...``).

    Attributes:
        model: The module.
        names: Its parameter names, in the order of ``model.named_parameters()``.
        params: The parameters, in that order.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> f = ModelFunction(model)
        >>> x = torch.ones(1, 2)
        >>> f({"weight": torch.tensor([[1.0, 2.0]])}, x)
        tensor([[3.]])
        >>> f.values([torch.zeros(1, 2)], ["weight"])["weight"].shape
        torch.Size([1, 2])
    """

    def __init__(
        self, model: Any, *, empty: str = "nothing to differentiate", **batch: Any
    ) -> None:
        check_module(model)
        named = list(model.named_parameters())
        if not named:
            raise ValueError(f"model has no parameters: {empty}")
        self.model: nn.Module = model
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        check_batch_device(self.params, **batch)

    def values(self, tensors: Sequence[Tensor], names: Sequence[str]) -> dict[str, Tensor]:
        """``{name: tensor}`` for the parameters to replace (the others are read as they are)."""
        return dict(zip(names, tensors, strict=True))

    def __call__(self, values: Mapping[str, Tensor] | None, inputs: Any) -> Any:
        """The model's output on ``inputs`` with the parameters in ``values`` replaced.

        ``values=None`` runs the model as it is (its own parameters, on the autograd
        graph); otherwise :func:`torch.func.functional_call` with ``values`` (a subset
        of the parameters by name; the rest are the module's own).
        """
        args = model_args(inputs)
        with inputs_fit(self.params, inputs):
            if values is None:
                return self.model(*args)
            return functional_call(self.model, dict(values), args)
