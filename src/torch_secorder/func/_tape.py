"""Record the torch calls of one evaluation of a loss, and perturb chosen outputs.

:class:`TapeMode` is a :class:`~torch.overrides.TorchFunctionMode` that writes
down every top-level torch call (function, arguments, output) made while it is
active.  Calls made *inside* a recorded call (e.g. the ``torch.layer_norm``
inside ``F.layer_norm``) are not seen: a mode is switched off while its handler
runs.  From the tape the fast diagonal learns which parameter enters which
operator call, and how often.

:class:`PerturbMode` adds a tensor ``delta`` to the output of the operator calls
that read a given parameter (by identity): the loss as a function of ``delta``
is the loss as a function of that layer's output, whose Hessian the fast
diagonal needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode, _pop_mode, _push_mode
from torch.utils._device import DeviceContext

__all__ = ["Call", "TapeMode", "PerturbMode", "iter_tensors", "outside_modes", "record"]

#: Calls that only read metadata; they never carry a derivative.  (A property read,
#: ``__get__``, is metadata only when it returns no tensor: ``.shape`` and ``.dtype``
#: are, ``.T``, ``.mT``, ``.H`` and ``.real`` are uses of the tensor, see
#: :func:`is_metadata`.)
_METADATA = {
    "size",
    "dim",
    "numel",
    "stride",
    "is_floating_point",
    "is_complex",
    "element_size",
    "data_ptr",
    "is_contiguous",
    "storage_offset",
    "nelement",
    "ndimension",
    "get_device",
    "__len__",
    "__format__",
    "__repr__",
    "__bool__",
    "__hash__",
}


def is_metadata(func: Callable, out: Any) -> bool:
    """Whether a call only read metadata (its result carries no derivative).

    Property reads (``__get__``) count as metadata unless they return a tensor:
    ``weight.T`` is a use of ``weight`` like ``weight.t()`` (a tied weight read
    once directly and once through ``.T`` is read twice).
    """
    name = getattr(func, "__name__", "")
    if name == "__get__":
        return next(iter_tensors(out), None) is None
    return name in _METADATA


def iter_tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor inside nested lists, tuples and dicts."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from iter_tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from iter_tensors(o)


@dataclass
class Call:
    """One recorded torch call."""

    func: Callable
    args: tuple
    kwargs: dict
    out: Any

    @property
    def name(self) -> str:
        return getattr(self.func, "__name__", repr(self.func))

    def tensor_inputs(self) -> list[Tensor]:
        """The tensors among the arguments (computed once: the tape is read many times)."""
        found = self.__dict__.get("_inputs")
        if found is None:
            found = self.__dict__["_inputs"] = list(iter_tensors((self.args, self.kwargs)))
        return found

    def outputs(self) -> list[Tensor]:
        """The tensors in the output (computed once)."""
        found = self.__dict__.get("_outputs")
        if found is None:
            found = self.__dict__["_outputs"] = list(iter_tensors(self.out))
        return found


class TapeMode(TorchFunctionMode):
    """Record top-level torch calls in :attr:`calls` (not metadata reads: :func:`is_metadata`)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not is_metadata(func, out):
            self.calls.append(Call(func, tuple(args), dict(kwargs), out))
        return out


def record(f: Callable[[Any], Tensor], params: Any) -> tuple[list[Call], Tensor]:
    """Evaluate ``f(params)`` once without autograd; return its tape and its value."""
    with torch.no_grad(), TapeMode() as mode:
        value = f(params)
    return mode.calls, value


class PerturbMode(TorchFunctionMode):
    """Add ``deltas[key]`` to the output of the call that reads the tensor ``key``.

    ``deltas`` maps ``id(parameter)`` to the perturbation (shaped like the
    output of that parameter's only call).  Any recognised operator call whose
    arguments include the parameter gets the perturbation added to its output.
    """

    def __init__(self, deltas: Mapping[int, Tensor], funcs: frozenset) -> None:
        super().__init__()
        self._deltas = dict(deltas)
        self._funcs = funcs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in self._funcs and self._deltas:
            for t in iter_tensors((args, kwargs)):
                delta = self._deltas.get(id(t))
                if delta is not None:
                    return out + delta
        return out


def _redirects_reads(mode: Any) -> bool:
    """Whether ``mode`` now hands torch calls other tensors than those they are given."""
    redirects = getattr(mode, "redirects_reads", None)
    return bool(redirects()) if callable(redirects) else False


@contextlib.contextmanager
def outside_modes() -> Iterator[None]:
    """Run our own arithmetic on recorded tensors outside the active torch-function modes.

    The modes active when a diagonal is asked for (the state-preserving mode of
    :mod:`torch_secorder.core`, a user's logging mode) see every evaluation of the
    user's function; the closed-form arithmetic of the fast routes on the recorded
    tensors is not the user's code, and a Python mode costs several microseconds
    per torch call.  The modes are popped for the duration (a ``torch.device``
    context stays, so that tensors are made where the user asked) and pushed back
    in their order; modes pushed inside (``differentiable``'s) work as usual.

    A mode that redirects reads of the user's tensors stays too: the
    state-preserving mode, once the evaluation wrote into a buffer, makes every
    torch call read its private copy instead of the user's tensor, and the recorded
    calls hold the user's tensor (a call counter ``self.calls[0] += 1`` read after
    the write).  Such a mode says so by a method ``redirects_reads()`` returning
    ``True``.
    """
    popped = []
    while torch._C._len_torch_function_stack() > 0:
        popped.append(_pop_mode())
    kept = [m for m in reversed(popped) if isinstance(m, DeviceContext) or _redirects_reads(m)]
    for mode in kept:
        _push_mode(mode)
    try:
        yield
    finally:
        for _ in kept:
            _pop_mode()
        for mode in reversed(popped):
            _push_mode(mode)
