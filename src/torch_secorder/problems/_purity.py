"""Make user code behave as a pure function of its parameters while we differentiate it.

A curvature computation evaluates the user's loss many times (a plain forward pass,
vmapped products, perturbed copies of the network).  Every evaluation must compute
the same function, and none may leave a trace in the user's world.  Three pieces do
the work:

* :class:`SubstitutionMode` replaces, inside every torch call, the user's tensors
  (by identity) with the values the engine passes in.  A closure ``func()`` that
  reads ``params`` thereby becomes a pure function ``f(values)`` that
  ``torch.func`` can transform (``grad``, ``jvp``, ``vmap``).
* :class:`PreservingMode` keeps the user's tensors untouched.  A write into a
  tensor that existed before the call (a buffer ``self.calls += 1``,
  ``self.calls[0] += 1``, ``buf.add_(1)``, ``torch.add(a, b, out=buf)``,
  ``buf[:] = ...``, BatchNorm's ``num_batches_tracked``) goes to a private copy of
  that tensor's storage, which every later torch call of the same evaluation reads
  instead (copy on write): the user's tensor is never written, so its value and
  its version counter (``buf._version``) stay as they were, and an autograd graph
  the user built before the call (``loss`` awaiting ``loss.backward()``) stays
  valid.  Which arguments a call writes is read from the ATen operator schema
  (``Tensor(a!)`` arguments) of the call's name, plus ``__setitem__``,
  ``out=`` and ``inplace=True``.  A batch norm that normalises with batch
  statistics is computed without updating running statistics (the same numbers).
* :class:`~torch_secorder.problems._random_draws.RandomDraws` makes every evaluation
  draw the same random numbers.  The first evaluation of a call is a plain
  forward pass of the user's loss on the global random number generator, exactly
  as ``loss_fn(model(x), y)`` would run at that point (torch's own dropout
  kernels, in their own memory order); a
  :class:`~torch.utils._python_dispatch.TorchDispatchMode` records the result of
  every random operator (``bernoulli_``, ``native_dropout``, ``randn``, ...) in
  call order.  Every later evaluation of the call (vmapped, on the autograd graph,
  on a perturbed network) replays the recorded values by order, whatever the
  layout of its tensors, and draws nothing.
* :class:`Evaluations` starts every evaluation afresh: the copies of the last one
  are dropped, and the very buffer objects are put back into the modules
  (``self.calls += 1`` rebinds the attribute to the result of the in-place add,
  our copy).

**The rule for the global RNG** (:func:`preserved_state`): a call advances the
global random number generator exactly as one plain forward pass of the loss
does (its dropout masks), followed by whatever the algorithm draws itself
(Hutchinson probes, a random start vector) when no ``generator`` is given, as
``torch.randn`` would.  So ``torch.manual_seed(s)`` before a call reproduces it,
two calls in a row draw different masks and probes, and the curvature is that of
the loss ``loss_fn(model(x), y)`` the user would compute at the same point of
the random stream, with one mask for every product of the call.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode

from torch_secorder.problems._random_draws import RandomDraws

__all__ = [
    "SubstitutionMode",
    "PreservingMode",
    "RandomDraws",
    "Evaluations",
    "preserved_state",
]

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


def _tensors_in(obj: Any) -> list[Tensor]:
    found: list[Tensor] = []
    _map_tensors(obj, lambda t: found.append(t) or t)
    return found


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


# ---------------------------------------------------------------- which arguments a call writes


@functools.cache
def _schema_writes(name: str) -> tuple[tuple[int | None, str], ...] | None:
    """``(position or None for keyword-only, name)`` of the arguments that the ATen
    operator ``name`` writes in any of its overloads (``Tensor(a!)`` in the schema);
    ``None`` when ATen has no operator of that name."""
    try:
        packet = getattr(torch.ops.aten, name)
        overloads = packet.overloads()
    except (AttributeError, RuntimeError):
        return None
    written: set[tuple[int | None, str]] = set()
    for overload in overloads:
        schema = getattr(packet, overload)._schema
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                written.add((None if arg.kwarg_only else i, arg.name))
    return tuple(sorted(written, key=lambda w: (w[0] is None, w[0] or 0, w[1])))


#: In-place calls that change a tensor's metadata (autograd flags, its view geometry),
#: not its values: not writes for our purpose.
_METADATA_ONLY = frozenset(
    {
        "requires_grad_",
        "retain_grad",
        "detach_",
        "share_memory_",
        "rename_",
        "squeeze_",
        "unsqueeze_",
        "t_",
        "transpose_",
        "swapdims_",
        "swapaxes_",
        "as_strided_",
    }
)


def written_tensors(func: Any, args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors that the torch call ``func(*args, **kwargs)`` writes in place.

    From the ATen schema of ``func``'s name (``add_`` writes ``self``; ``add`` with
    ``out=`` writes ``out``), plus ``__setitem__`` (its ``self``), an ``out=`` keyword
    and ``inplace=True`` (``F.relu(x, inplace=True)``).  A name ending in ``_``
    unknown to ATen (``torch.nn.init.normal_``) writes its first argument.
    """
    name = getattr(func, "__name__", "")
    if not kwargs and not name.endswith("_") and not isinstance(func, torch._ops.OpOverload):
        return []  # the common case, quickly: no in-place name, no out=, no inplace=
    if name in _METADATA_ONLY:
        return []
    schema = getattr(func, "_schema", None)
    written: list[Tensor] = []
    if schema is not None:  # torch.ops.aten.* called directly
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = kwargs.get(arg.name, args[i] if i < len(args) else None)
                written.extend(_tensors_in(value))
        return written
    if name == "__setitem__":
        return _tensors_in(args[:1])
    in_place = name.endswith("_") and not name.endswith("__")
    positions = _schema_writes(name) if in_place or "out" in kwargs else ()
    if positions is None:
        positions = ((0, "self"),) if in_place else ()
    for position, arg_name in positions:
        if arg_name in kwargs:
            written.extend(_tensors_in(kwargs[arg_name]))
        elif position is not None and position < len(args):
            written.extend(_tensors_in(args[position]))
    if "out" in kwargs and not any(w[1] == "out" for w in positions):
        written.extend(_tensors_in(kwargs["out"]))
    if kwargs.get("inplace") is True and args:
        written.extend(_tensors_in(args[:1]))
    return written


# ---------------------------------------------------------------- copy on write


def _storage_key(t: Tensor) -> tuple[torch.device, int] | None:
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, ...
        return None
    return (t.device, ptr) if ptr else None


_NORMS_WITH_RUNNING_STATS = {
    # function: (index of the "use batch statistics" flag, its keyword)
    F.batch_norm: (5, "training"),
    F.instance_norm: (5, "use_input_stats"),
}


def _without_running_stats(func: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A norm's arguments without running statistics when it uses batch statistics."""
    flag_index, flag_name = _NORMS_WITH_RUNNING_STATS[func]
    uses_batch_stats = kwargs.get(flag_name, args[flag_index] if len(args) > flag_index else False)
    if not uses_batch_stats:
        return args, kwargs
    args, kwargs = list(args), dict(kwargs)
    for index, name in ((1, "running_mean"), (2, "running_var")):
        if len(args) > index:
            args[index] = None
        kwargs.pop(name, None)
    return tuple(args), kwargs


class PreservingMode(TorchFunctionMode):
    """Send writes into pre-existing tensors to private copies; skip running-stats updates.

    Tensors that torch calls create while the mode is active (intermediates,
    ``torch.func``'s basis tensors), and views of them, are not the user's: writes
    into them stand.  A write into anything else (a tensor that existed before, or a
    view of one) makes a private copy of that tensor's storage (its *shadow*); the
    write goes to the shadow, and until :meth:`reset` every torch call reads the
    shadow wherever it is given a tensor on the user's storage.
    """

    def __init__(self) -> None:
        super().__init__()
        self._created: dict[int, weakref.ref] = {}
        # id of a wrapped view of a user's tensor -> (weakref to it, the plain view)
        self._wrapped_views: dict[int, tuple[weakref.ref, Tensor]] = {}
        # storage key -> (dtype, private flat copy of the storage)
        self._shadows: dict[tuple[torch.device, int], tuple[torch.dtype, Tensor]] = {}

    def redirects_reads(self) -> bool:
        """Whether torch calls now read a shadow in place of some user's tensor.

        True once the evaluation wrote into a tensor that existed before; arithmetic
        on tensors recorded during it must then run under this mode (see
        :func:`torch_secorder.func._tape.outside_modes`).
        """
        return bool(self._shadows)

    def reset(self) -> None:
        """Forget the shadows: the next evaluation reads the user's tensors again."""
        self._shadows = {}
        self._wrapped_views = {}

    def clear(self) -> None:
        self.reset()
        self._created.clear()

    def _was_created_here(self, t: Tensor) -> bool:
        ref = self._created.get(id(t))
        return ref is not None and ref() is t

    def _note_created(self, result: Any) -> None:
        if len(self._created) > 65536:  # forget the dead, keep the table small
            self._created = {k: r for k, r in self._created.items() if r() is not None}
        for r in _tensors_in(result) if not isinstance(result, Tensor) else (result,):
            self._created[id(r)] = weakref.ref(r)

    def _users_storage(self, t: Tensor) -> Tensor | None:
        """The plain tensor on the user's storage that a write into ``t`` reaches, or ``None``.

        ``t`` is a tensor that existed before the call or a view of one; or, inside a
        ``torch.func`` transform, a wrapper of a view of a model's buffer (the
        transform's own wrapped tensors are never the user's).
        """
        if not _is_wrapped(t):
            base = t._base if t._base is not None else t
            if self._was_created_here(base) or not _is_foreign(base):
                return None
            return t
        entry = self._wrapped_views.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def _shadow_of(self, t: Tensor) -> Tensor | None:
        """The view of the shadow storage that stands for ``t``, or ``None``."""
        key = _storage_key(t)
        if key is None:
            return None
        entry = self._shadows.get(key)
        if entry is None:
            return None
        dtype, flat = entry
        if t.dtype != dtype:
            raise NotImplementedError(
                "the loss writes a tensor that existed before the call and reads its memory "
                f"as another dtype ({t.dtype} and {dtype}): not supported"
            )
        return flat.as_strided(t.size(), t.stride(), t.storage_offset())

    def _make_shadow(self, t: Tensor) -> None:
        key = _storage_key(t)
        if key is None or key in self._shadows:
            return
        with torch.no_grad():
            whole = torch.empty(0, dtype=t.dtype, device=t.device)
            whole.set_(t.untyped_storage())
            self._shadows[key] = (t.dtype, whole.clone())

    def _substitute(self, t: Tensor) -> Tensor:
        if t.requires_grad or _is_wrapped(t):
            return t  # (a tensor with a grad_fn requires grad)
        base = t._base
        if self._was_created_here(t) and (base is None or self._was_created_here(base)):
            return t  # our own tensor, not a view of the user's
        shadow = self._shadow_of(t)
        return t if shadow is None else shadow

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _NORMS_WITH_RUNNING_STATS:
            args, kwargs = _without_running_stats(func, args, kwargs)
        written = written_tensors(func, args, kwargs)
        if written:
            users = {}
            for t in written:
                inner = self._users_storage(t)
                if inner is not None:
                    self._make_shadow(inner)
                    users[id(t)] = inner
            if users:
                args = _map_tensors(args, lambda t: users.get(id(t), t))
                kwargs = _map_tensors(kwargs, lambda t: users.get(id(t), t))
        if self._shadows:
            args = _map_tensors(args, self._substitute)
            kwargs = _map_tensors(kwargs, self._substitute)
        result = func(*args, **kwargs)
        if written:
            return result
        if type(result) is Tensor or isinstance(result, Tensor):
            created = self._created
            if len(created) > 65536:  # forget the dead, keep the table small
                self._created = created = {k: r for k, r in created.items() if r() is not None}
            created[id(result)] = weakref.ref(result)
            if args and _is_wrapped(result):
                first = args[0]
                if isinstance(first, Tensor) and self._users_storage(first) is not None:
                    self._note_wrapped_view(result, first)
        elif isinstance(result, (tuple, list)):
            self._note_created(result)
        return result

    def _note_wrapped_view(self, result: Tensor, source: Tensor) -> None:
        """Inside a ``torch.func`` transform a view of a captured tensor comes out
        wrapped (``self.calls[0]``): remember the plain view behind it."""
        inner = result
        while _is_wrapped(inner):
            inner = torch._C._functorch.get_unwrapped(inner)
        key = _storage_key(inner)
        if key is not None and key == _storage_key(source):
            self._wrapped_views[id(result)] = (weakref.ref(result), inner)


# ---------------------------------------------------------------- module state


_MISSING = object()


class _ModuleTensors:
    """The tensor objects modules hold (buffers, tensor attributes), to put back.

    Those of ``model``'s submodules are noted up front.  While :meth:`watch` is on,
    a buffer that any module rebinds (``self.calls += 1`` assigns the result of the
    in-place add to the attribute: our private copy) is noted with the object it
    held before, so closures that reach modules the wrapper was not given are
    covered too.
    """

    def __init__(self, model: nn.Module | None) -> None:
        self._held: list[tuple[nn.Module, dict[str, Any], dict[str, Tensor]]] = []
        self._rebound: dict[tuple[int, str], tuple[nn.Module, str, Any]] = {}
        self._handle: Any = None
        self._thread = threading.get_ident()
        if model is None:
            return
        for module in model.modules():
            attrs = {k: v for k, v in vars(module).items() if isinstance(v, Tensor)}
            self._held.append((module, dict(module._buffers), attrs))

    def _on_buffer(self, module: nn.Module, name: str, value: Any) -> None:
        if threading.get_ident() != self._thread:
            return  # (the hook is global: another thread's modules are not ours)
        key = (id(module), name)
        if key not in self._rebound:
            before = module._buffers[name] if name in module._buffers else _MISSING
            self._rebound[key] = (module, name, before)

    def watch(self) -> None:
        self._thread = threading.get_ident()
        self._handle = nn.modules.module.register_module_buffer_registration_hook(self._on_buffer)

    def unwatch(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def restore(self) -> None:
        """Put back every original buffer / tensor attribute object (no tensor is written)."""
        for module, name, before in self._rebound.values():
            if before is _MISSING:
                module._buffers.pop(name, None)
            elif module._buffers.get(name, _MISSING) is not before:
                module._buffers[name] = before
        for module, buffers, attrs in self._held:
            current = module._buffers
            if current.keys() != buffers.keys() or any(
                current[k] is not v for k, v in buffers.items()
            ):
                for name in [k for k in current if k not in buffers]:
                    del current[name]
                for name, value in buffers.items():
                    if name not in current or current[name] is not value:
                        current[name] = value
            namespace = vars(module)
            for name, value in attrs.items():
                if namespace.get(name) is not value:
                    namespace[name] = value
            for name in [
                k for k, v in namespace.items() if isinstance(v, Tensor) and k not in attrs
            ]:
                del namespace[name]


# ---------------------------------------------------------------- evaluations


def _push_dispatch_mode(mode: TorchDispatchMode) -> None:
    mode.__enter__()


def _pop_dispatch_mode(mode: TorchDispatchMode) -> None:
    if _get_current_dispatch_mode() is not mode:  # pragma: no cover - defensive
        raise RuntimeError("torch dispatch modes were not exited in order during an evaluation")
    mode.__exit__(None, None, None)


class Evaluations:
    """Start and end the evaluations of the user's loss within one call.

    Calling the object starts a fresh evaluation (left open until the next one
    starts or the call ends): the model's buffer objects are put back, the copies
    made by earlier writes are forgotten, and the random draws are recorded (first
    evaluation) or replayed (later ones).  :meth:`evaluation` does the same for a
    ``with`` block and ends the evaluation when the block exits, so that random
    draws after it (Hutchinson probes) come from the global RNG.
    """

    def __init__(self, guard: PreservingMode, modules: _ModuleTensors) -> None:
        self._guard = guard
        self._modules = modules
        self._draws = RandomDraws()
        self._started = 0
        self._pushed: RandomDraws | None = None
        self._depth = 0

    @property
    def draws_random(self) -> bool:
        """Whether the first evaluation drew random numbers."""
        return bool(self._draws.records)

    def __call__(self) -> None:
        if self._depth:
            return  # already inside an evaluation block: it started fresh
        self._end()
        self._start()

    def _start(self, replay: bool = True) -> None:
        self._guard.reset()
        self._modules.restore()
        if not replay:
            return
        self._started += 1
        mode = None
        if self._started == 1:
            mode = self._draws.recording()
        elif self._draws.records:
            mode = self._draws.replaying()
        if mode is not None:
            _push_dispatch_mode(mode)
            self._pushed = mode

    def _end(self) -> None:
        if self._pushed is not None:
            mode, self._pushed = self._pushed, None
            _pop_dispatch_mode(mode)

    @contextlib.contextmanager
    def evaluation(self, replay: bool = True) -> Iterator[None]:
        """One evaluation of the loss (nested blocks belong to the outer one).

        With ``replay=False`` the evaluation starts from the user's buffers as any
        other, but its random draws come fresh from the global RNG and are not
        recorded (per-sample gradients with their own dropout masks).
        """
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._end()
        self._start(replay)
        self._depth = 1
        try:
            yield
        finally:
            self._depth = 0
            self._end()

    def close(self) -> None:
        self._end()
        self._draws.records.clear()


def _same(a: Tensor, b: Tensor) -> bool:
    if a.is_floating_point() or a.is_complex():
        return bool(torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))
    return bool(torch.equal(a, b))


@contextlib.contextmanager
def preserved_state(
    params: Sequence[Tensor], model: nn.Module | None = None
) -> Iterator[Evaluations]:
    """Run a curvature computation leaving the user's world as it found it.

    Yields an :class:`Evaluations`: call it (or enter its :meth:`~Evaluations.evaluation`
    block) at the start of every evaluation of the loss.  Restores, also after an
    exception: each parameter's ``.grad`` and ``requires_grad``; ``model.training``
    of every submodule; the very buffer objects (and tensor attributes) of every
    submodule of ``model``.  No tensor of the user's is written: writes go to private
    copies (:class:`PreservingMode`), so buffers keep their values and version
    counters.  (Should a write escape the guard, say through ``.data``, the buffer's
    value is copied back, and only then.)  The global RNG follows the rule of the
    module documentation: advanced as by one plain forward pass of the loss.
    """
    grads = [p.grad for p in params]
    flags = [p.requires_grad for p in params]
    training = [(m, m.training) for m in model.modules()] if model is not None else []
    buffers = (
        [(b, b._version, b.detach().clone()) for b in model.buffers()] if model is not None else []
    )
    modules = _ModuleTensors(model)
    mode = PreservingMode()
    evaluations = Evaluations(mode, modules)
    try:
        modules.watch()
        with mode:
            try:
                yield evaluations
            finally:
                evaluations.close()
    finally:
        modules.unwatch()
        mode.clear()
        modules.restore()
        with torch.no_grad():
            for buffer, version, saved in buffers:
                if buffer._version != version or not _same(buffer, saved):
                    buffer.copy_(saved)
        for module, was_training in training:
            module.training = was_training
        for p, g, flag in zip(params, grads, flags):
            if p.is_leaf and p.requires_grad != flag:
                p.requires_grad_(flag)
            p.grad = g
