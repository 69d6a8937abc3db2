"""Record the random draws of one evaluation of a loss; replay them in later ones.

See :mod:`torch_secorder.problems._purity` for the rule this serves: the first
evaluation of a call is a plain forward pass on the global random number
generator, every later one replays its draws, so every product of a call sees the
mask a plain ``loss_fn(model(x), y)`` draws.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["RandomDraws"]


def _map_tensors(obj: Any, fn: Any) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    return obj


def _writes_first_argument(func: Any) -> bool:
    arguments = func._schema.arguments
    return (
        bool(arguments) and arguments[0].alias_info is not None and arguments[0].alias_info.is_write
    )


def _fit(recorded: Tensor, shape: torch.Size, func: Any) -> Tensor:
    if recorded.shape == shape:
        return recorded
    try:
        return recorded.expand(shape)
    except RuntimeError:
        raise RuntimeError(
            f"an evaluation of the loss drew random numbers of shape {tuple(shape)} with "
            f"{func} where its first evaluation drew {tuple(recorded.shape)}: the loss does not "
            "draw the same random numbers in every evaluation, so its curvature is undefined"
        ) from None


#: Operators that draw from the same distribution, as vmap rewrites one into another
#: (an in-place draw into a batched tensor becomes a draw of the logical shape, the
#: fused CUDA dropout a ``bernoulli_`` of its mask).
_FAMILIES = {
    "bernoulli": "bernoulli",
    "native_dropout": "bernoulli",
    "normal": "normal",
    "randn": "normal",
    "randn_like": "normal",
    "uniform": "uniform",
    "rand": "uniform",
    "rand_like": "uniform",
    "random": "random",
    "randint": "random",
    "randint_like": "random",
}


def _family(func: Any) -> str:
    name = func.overloadpacket.__name__.rstrip("_")
    return _FAMILIES.get(name, name)


class RandomDraws(TorchDispatchMode):
    """Record the random operators of one evaluation; replay them in later ones.

    Recording (:meth:`recording`): every operator tagged
    ``torch.Tag.nondeterministic_seeded`` runs as it is, and its result is kept, in
    call order.  Replaying (:meth:`replaying`): the ``k``-th random operator returns
    the ``k``-th recorded result (written into its output, broadcast over a vmapped
    batch), and draws nothing.  ``native_dropout`` (the fused CUDA dropout) replays
    its mask, and vmap's form of it (``bernoulli_`` of the mask) takes that mask.  A
    training-mode ``rrelu_with_noise`` replays its slopes (its output is the input
    times them).  A draw of another kind, or of a shape that does not fit, raises: the loss does not
    draw the same random numbers in every evaluation.  (An operator whose values
    depend on tensor arguments, ``torch.normal(mean, std)`` with tensors, replays
    the values of the first evaluation.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[Any, Any]] = []
        self._replay = False
        self._cursor = 0

    def recording(self) -> RandomDraws:
        self._replay = False
        return self

    def replaying(self) -> RandomDraws:
        self._replay = True
        self._cursor = 0
        return self

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded not in func.tags:
            return func(*args, **kwargs)
        if not self._replay:
            out = func(*args, **kwargs)
            if func.overloadpacket is torch.ops.aten.native_dropout:
                self.records.append((func, out[1].clone()))
            elif func.overloadpacket is torch.ops.aten.rrelu_with_noise:
                self.records.append((func, args[1].clone()))  # the slopes it drew
            elif _writes_first_argument(func):
                self.records.append((func, args[0].clone()))
            else:
                self.records.append((func, _map_tensors(out, lambda t: t.clone())))
            return out
        if self._cursor >= len(self.records):
            raise RuntimeError(
                f"an evaluation of the loss drew more random numbers ({func}) than its first "
                "evaluation: the loss does not draw the same random numbers in every "
                "evaluation, so its curvature is undefined"
            )
        recorded_func, recorded = self.records[self._cursor]
        self._cursor += 1
        if _family(recorded_func) != _family(func):
            raise RuntimeError(
                f"an evaluation of the loss drew random numbers with {func} where its first "
                f"evaluation drew with {recorded_func}: the loss does not draw the same random "
                "numbers in every evaluation, so its curvature is undefined"
            )
        if recorded_func.overloadpacket is torch.ops.aten.rrelu_with_noise:
            # training-mode RReLU: the output is the input times the slopes drawn (1 where
            # the input is positive); the slopes go into its ``noise`` argument, which
            # its backward reads, so derivatives with respect to the input stay exact.
            noise = args[1]
            noise.copy_(_fit(recorded, noise.shape, func))
            return args[0] * noise
        if recorded_func.overloadpacket is torch.ops.aten.native_dropout:
            # the fused dropout: replay its (boolean) mask
            mask = recorded
            if func.overloadpacket is torch.ops.aten.native_dropout:
                input, p = args[0], args[1]
                mask = _fit(mask, input.shape, func)
                scale = 0.0 if p == 1 else 1.0 / (1.0 - p)
                return input * mask * scale, mask.clone()
            recorded = mask
        if _writes_first_argument(func):
            target = args[0]
            target.copy_(_fit(recorded, target.shape, func))
            return target
        if isinstance(recorded, Tensor):
            shape = args[0].shape if args and isinstance(args[0], Tensor) else recorded.shape
            return _fit(recorded, shape, func).clone()
        return _map_tensors(recorded, lambda t: t.clone())
