"""Make user code behave as a pure function of its parameters while we differentiate it.

Two :class:`~torch.overrides.TorchFunctionMode` s do the work:

* :class:`SubstitutionMode` replaces, inside every torch call, the user's tensors
  (by identity) with the values the engine passes in.  A closure ``func()`` that
  reads ``params`` thereby becomes a pure function ``f(values)`` that
  ``torch.func`` can transform (``grad``, ``jvp``, ``vmap``).
* :class:`PreservingMode` keeps the user's state as it was: in-place writes into
  pre-existing plain tensors (BatchNorm's ``num_batches_tracked``, a user's
  counter) are undone when the mode exits, and a batch norm in training mode is
  computed without updating running statistics (the same numbers: training-mode
  batch norm normalises with the batch statistics).

:func:`preserved_state` bundles this with the rest of what a wrapper must leave
untouched: ``.grad``, ``requires_grad``, ``model.training``, buffers, the global
RNG (every evaluation of the loss sees the same random stream, so dropout uses one
mask for every probe of an estimate).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["SubstitutionMode", "PreservingMode", "preserved_state", "fixed_rng"]

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _is_foreign(t: Any) -> bool:
    """A plain tensor outside any autograd graph: a buffer, a constant, a counter."""
    return (
        isinstance(t, Tensor) and not _is_wrapped(t) and t.grad_fn is None and not t.requires_grad
    )


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


class SubstitutionMode(TorchFunctionMode):
    """Every torch call inside sees ``values[i]`` wherever it would see ``tensors[i]``."""

    def __init__(self, tensors: Sequence[Tensor], values: Sequence[Tensor]):
        super().__init__()
        self._by_id = {id(t): v for t, v in zip(tensors, values)}

    def _swap(self, t: Tensor) -> Tensor:
        return self._by_id.get(id(t), t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        args = _map_tensors(args, self._swap)
        kwargs = _map_tensors(kwargs, self._swap)
        return func(*args, **kwargs)


_NORMS_WITH_RUNNING_STATS = {
    # function: (index of the "use batch statistics" flag, its keyword)
    F.batch_norm: (5, "training"),
    F.instance_norm: (5, "use_input_stats"),
}


class PreservingMode(TorchFunctionMode):
    """Undo in-place writes into pre-existing tensors; skip running-statistics updates.

    Tensors that torch calls create while the mode is active (intermediates,
    ``torch.func``'s basis tensors) are not the user's: writes into them stand.
    """

    def __init__(self) -> None:
        super().__init__()
        self._saved: dict[int, tuple[Tensor, Tensor]] = {}
        self._created: dict[int, weakref.ref] = {}

    def _was_created_here(self, t: Tensor) -> bool:
        ref = self._created.get(id(t))
        return ref is not None and ref() is t

    def _note_created(self, result: Any) -> None:
        if len(self._created) > 65536:  # forget the dead, keep the table small
            self._created = {k: r for k, r in self._created.items() if r() is not None}
        if isinstance(result, Tensor):
            self._created[id(result)] = weakref.ref(result)
        elif isinstance(result, (tuple, list)):
            for r in result:
                if isinstance(r, Tensor):
                    self._created[id(r)] = weakref.ref(r)

    def _remember(self, target: Any) -> None:
        if (
            _is_foreign(target)
            and id(target) not in self._saved
            and not self._was_created_here(target)
        ):
            self._saved[id(target)] = (target, target.detach().clone())

    def restore(self) -> None:
        with torch.no_grad():
            for target, saved in self._saved.values():
                target.copy_(saved)
        self._saved.clear()
        self._created.clear()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _NORMS_WITH_RUNNING_STATS:
            flag_index, flag_name = _NORMS_WITH_RUNNING_STATS[func]
            uses_batch_stats = kwargs.get(
                flag_name, args[flag_index] if len(args) > flag_index else False
            )
            if uses_batch_stats:
                args = list(args)
                for index, name in ((1, "running_mean"), (2, "running_var")):
                    if len(args) > index:
                        args[index] = None
                    kwargs.pop(name, None)
                args = tuple(args)
        else:
            name = getattr(func, "__name__", "")
            if name.endswith("_") and not name.endswith("__") and args:
                target = args[0]
                if (
                    _is_foreign(target)
                    and not self._was_created_here(target)
                    and torch._C._functorch.maybe_current_level() is not None
                ):
                    # Inside a torch.func transform an in-place write into a
                    # captured tensor is an error; the write goes to a copy.
                    args = (target.clone(), *args[1:])
                else:
                    self._remember(target)
            if "out" in kwargs:
                _map_tensors(kwargs["out"], lambda t: self._remember(t) or t)
        result = func(*args, **kwargs)
        if name_creates(func):
            self._note_created(result)
        return result


def name_creates(func: Any) -> bool:
    """Whether a call may return a fresh tensor (anything but an in-place method)."""
    name = getattr(func, "__name__", "")
    return not (name.endswith("_") and not name.endswith("__"))


@contextlib.contextmanager
def fixed_rng(devices: Sequence[torch.device]) -> Iterator[Callable[[], None]]:
    """Fork the global RNG; yield a function that rewinds it to the fork point.

    Calling the rewind at the start of every loss evaluation gives every
    evaluation the same random numbers (one dropout mask per estimate), and the
    user's RNG stream is left as it was when the block exits.
    """
    cuda_devices = [d for d in devices if d.type == "cuda"]
    with torch.random.fork_rng(devices=cuda_devices):
        cpu_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in cuda_devices]

        def rewind() -> None:
            torch.set_rng_state(cpu_state)
            for d, s in zip(cuda_devices, cuda_states):
                torch.cuda.set_rng_state(s, d)

        yield rewind


@contextlib.contextmanager
def preserved_state(
    params: Sequence[Tensor], model: nn.Module | None = None
) -> Iterator[Callable[[], None]]:
    """Run a curvature computation leaving the user's world as it found it.

    Restores, also after an exception: each parameter's ``.grad`` and
    ``requires_grad``; ``model.training`` of every submodule and every buffer of
    ``model``; any pre-existing tensor written in place by user code; the global
    RNG.  Yields the RNG rewind of
    :func:`fixed_rng`.
    """
    grads = [p.grad for p in params]
    flags = [p.requires_grad for p in params]
    training = [(m, m.training) for m in model.modules()] if model is not None else []
    buffers = [(b, b.detach().clone()) for b in model.buffers()] if model is not None else []
    devices = list({p.device for p in params})
    mode = PreservingMode()
    try:
        with fixed_rng(devices) as rewind, mode:
            yield rewind
    finally:
        mode.restore()
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for module, was_training in training:
            module.training = was_training
        for p, g, flag in zip(params, grads, flags):
            if p.is_leaf and p.requires_grad != flag:
                p.requires_grad_(flag)
            p.grad = g
