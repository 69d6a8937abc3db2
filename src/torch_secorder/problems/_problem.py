"""A user's loss, as the wrappers hand it to the engine.

:func:`closure_problem` turns the documented closure convention (``func()`` reads
the tensors in ``params``) into a :class:`LossProblem`: a pure function of the
differentiated tensors for the ``torch.func`` engine, the same loss on one autograd
graph for the graph route, and the bookkeeping to return results in the user's
list format.  :func:`module_problem` does the same for ``model`` + ``loss_fn`` +
data (or the model's output alone) through the one model adapter,
:class:`~torch_secorder.problems._model_function.ModelFunction`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from torch_secorder import _chunks
from torch_secorder.errors import StrictError
from torch_secorder.func._fixes import differentiable
from torch_secorder.func._tree import tree_ravel, tree_unravel
from torch_secorder.linalg.progress import progress_bar
from torch_secorder.linalg.trace import TraceEstimate, chunk_ranges, hutchinson
from torch_secorder.problems._batch_checks import loss_of_output, targets_fit
from torch_secorder.problems._fallback import (
    has_compiled_module,
    is_functional_refusal,
    is_graph_refusal,
)
from torch_secorder.problems._graph_ggn import transposed_jacobian
from torch_secorder.problems._inputs import (
    as_param_list,
    check_loss,
    check_module,
    check_output,
    loss_convention,
    warn_zero_result,
)
from torch_secorder.problems._model_function import ModelFunction
from torch_secorder.problems._purity import SubstitutionMode, preserved_state

__all__ = [
    "LossProblem",
    "closure_problem",
    "model_output_problem",
    "module_problem",
    "narrow_to",
    "with_graph_fallback",
    "STRATEGIES",
]

T = TypeVar("T")

#: How batches of Hessian products are computed by the wrappers.
#: ``"vmap"``: forward-over-reverse ``jvp(grad(f))`` vmapped over the vectors;
#: ``"graph"``: one ``create_graph`` gradient, then one backward per vector;
#: ``"graph_batched"``: the same backward vmapped over the vectors
#: (``is_grads_batched``), :data:`GRAPH_BATCH` vectors at a time unless a chunk
#: is given; ``"auto"``: ``"vmap"`` on accelerators; on CPU ``"graph"`` for
#: models with convolutions (vmapped convolution derivatives are about 2x slower
#: there) and closures, ``"graph_batched"`` otherwise.  Measured side by side in
#: ``benchmarks/bench_hutchinson.py``.  Whatever is asked, a route that torch
#: refuses for the loss at hand is replaced by the other one (same numbers): the
#: graph routes for code that ``torch.func`` refuses (old-style
#: ``autograd.Function``, full backward hooks, saved-tensor hooks), ``"vmap"``
#: for ``torch.compile``'d code (no double backward); see
#: :mod:`torch_secorder.problems._fallback`.
STRATEGIES = ("auto", "vmap", "graph", "graph_batched")

#: Vectors per batched backward of ``"graph_batched"`` when no chunk is given
#: (larger batches got slower on a 2-core CPU).
GRAPH_BATCH = 8


def _has_convolution(model: nn.Module | None) -> bool:
    return model is not None and any(
        isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()
    )


@dataclass
class LossProblem:
    """A scalar loss of some tensors, ready for the engine.

    Attributes:
        params: The user's tensors, in the user's order.
        active: Indices (into ``params``) of the differentiated tensors.
        pure: Pure function of a tuple of values for the active tensors.
        primals: The point: the active tensors, detached unless ``create_graph``.
        create_graph: Whether results must be differentiable.
        loss_closure: Evaluates the loss on the user's own tensors (autograd on).
        rewind: The call's :class:`~torch_secorder.problems._purity.Evaluations`: calling it
            (or entering its ``evaluation()`` block) starts a fresh evaluation of the
            loss (the model's buffer objects put back, the random draws of the first
            evaluation replayed).
        names: Parameter names (module problems only).
        model: The module (module problems only).
        plain: Closure problems: ``pure`` with the operators as the user called them
            (no :func:`~torch_secorder.func._fixes.differentiable` reroutes), for
            recording the loss's calls (the fast diagonal routes); the engine adds
            the reroutes where it differentiates.
    """

    params: list[Tensor]
    active: list[int]
    pure: Callable[[tuple[Tensor, ...]], Tensor]
    primals: tuple[Tensor, ...]
    create_graph: bool
    loss_closure: Callable[[], Tensor]
    rewind: Callable[[], None]
    names: list[str] | None = None
    model: nn.Module | None = None
    plain: Callable[[tuple[Tensor, ...]], Tensor] | None = None
    _graph_grads: tuple[Tensor | None, ...] | None = field(default=None, repr=False)
    _checked_loss: Tensor | None = field(default=None, repr=False)
    _functional_refused: bool = field(default=False, repr=False)
    _graph_refused: bool = field(default=False, repr=False)

    @property
    def dim(self) -> int:
        """Number of differentiated entries."""
        return sum(p.numel() for p in self.primals)

    @property
    def dtype(self) -> torch.dtype:
        return self.primals[0].dtype

    @property
    def device(self) -> torch.device:
        return self.primals[0].device

    def resolve_strategy(self, strategy: str) -> str:
        """The route that computes ``strategy``'s products for this loss.

        ``"auto"`` picks by device and model (see :data:`STRATEGIES`).  Then, for any
        ``strategy``: ``"vmap"`` becomes ``"graph_batched"`` where ``torch.func`` has
        refused the loss (:meth:`functional_refused`), and a graph route becomes
        ``"vmap"`` where the double backward is refused (``torch.compile``'d modules).
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if strategy == "auto":
            if self.device.type != "cpu":
                strategy = "vmap"
            elif self.model is None or _has_convolution(self.model):
                strategy = "graph"
            else:
                strategy = "graph_batched"
        if strategy == "vmap" and self.functional_refused():
            return "graph_batched"
        if strategy != "vmap" and self.graph_refused():
            return "vmap"
        return strategy

    def functional_refused(self) -> bool:
        """Whether ``torch.func`` has refused this loss (remembered for the problem).

        Set by the first functional route that meets torch's refusal (see
        :meth:`functional_or_graph`): old-style ``autograd.Function`` s, full backward
        hooks, saved-tensor hooks.  Only torch's own refusals count
        (:func:`~torch_secorder.problems._fallback.is_functional_refusal`); any other error
        in the user's code is raised as it is.
        """
        return self._functional_refused

    def functional_or_graph(self, functional: Callable[[], T], graph: Callable[[], T]) -> T:
        """``functional()``, or ``graph()`` where ``torch.func`` refuses the loss.

        The refusal comes at the first transformed forward pass, before a route has
        drawn anything from the global RNG or returned anything; it is remembered,
        so later routes of the problem go to the graph at once.
        """
        if not self._functional_refused:
            try:
                return functional()
            except RuntimeError as exc:
                if not is_functional_refusal(exc):
                    raise
                self._functional_refused = True
        return graph()

    def graph_refused(self) -> bool:
        """Whether the double backward of the graph routes is refused.

        True for a model that is or contains a ``torch.compile``'d module, and after a
        graph route met ``aot_autograd``'s refusal (compiled code inside a closure).
        """
        return self._graph_refused or has_compiled_module(self.model)

    def hutchinson(
        self,
        num_samples: int,
        *,
        distribution: str = "rademacher",
        generator: torch.Generator | None = None,
        chunk_size: int | None = None,
        strategy: str = "auto",
        progress: bool = True,
    ) -> TraceEstimate:
        """Hutchinson estimate of the trace of the problem's Hessian (active tensors).

        Without a ``chunk_size``, probes are drawn and multiplied :data:`GRAPH_BATCH`
        at a time on the graph routes (one big probe block was slower on CPU) and,
        on the vmap route, in the chunks of the device's policy
        (:class:`~torch_secorder._chunks.ChunkSchedule`: about ``2**24`` tangent
        entries on the CPU; on CUDA sized from the free memory and the peak measured
        on a first chunk), each chunk one vmapped call.
        """
        resolved = self.resolve_strategy(strategy)
        product_chunk = chunk_size
        if chunk_size is None:
            if resolved == "vmap":  # the schedule sizes the chunks; one vmapped call each
                product_chunk = _chunks.chunk_policy.max_chunk
            else:
                chunk_size = product_chunk = GRAPH_BATCH
        return hutchinson(
            self.matmat(resolved, product_chunk),
            self.dim,
            num_samples,
            distribution=distribution,
            generator=generator,
            dtype=self.dtype,
            device=self.device,
            chunk_size=chunk_size,
            progress=progress,
        )

    def expand(self, active_values: Sequence[Tensor]) -> list[Tensor]:
        """Results for the active tensors -> one tensor per user tensor (zeros elsewhere)."""
        out = [torch.zeros_like(p) for p in self.params]
        for i, value in zip(self.active, active_values):
            out[i] = value
        return out

    def release_checked_loss(self) -> None:
        """Drop the graph of the validating forward pass (routes that do not use it)."""
        self._checked_loss = None

    def graph_grads(self) -> tuple[Tensor | None, ...]:
        """Gradient of the loss w.r.t. the active tensors, with its graph kept.

        Reuses the forward pass that validated the loss, so the graph routes run
        the user's forward once per call.
        """
        if self._graph_grads is None:
            with torch.enable_grad():
                loss = self._checked_loss
                self._checked_loss = None
                if loss is None or not loss.requires_grad:
                    loss = self.loss_closure()
                tensors = [self.params[i] for i in self.active]
                self._graph_grads = torch.autograd.grad(
                    loss, tensors, create_graph=True, allow_unused=True
                )
        return self._graph_grads

    def matmat(self, strategy: str = "auto", chunk_size: int | None = None) -> Callable:
        """The Hessian as ``V -> V H`` on flat ``(k, dim)`` batches, by ``strategy``.

        ``strategy`` is resolved by :meth:`resolve_strategy`.  Should a route be
        refused on its first product, that product and all later ones take the other
        route: the graph route (``"graph_batched"``) where ``torch.func`` refuses the
        loss, the vmap route where the double backward is refused (``torch.compile``'d
        code that the model does not show).  The vectors are the same either way.
        """
        strategy = self.resolve_strategy(strategy)
        if strategy == "vmap":
            vmap_matmat = self._vmap_matmat(chunk_size)

            def refusable_matmat(flat: Tensor) -> Tensor:
                return self.functional_or_graph(
                    lambda: vmap_matmat(flat),
                    lambda: self._graph_matmat("graph_batched", chunk_size)(flat),
                )

            refusable_matmat.dim = vmap_matmat.dim  # type: ignore[attr-defined]
            return refusable_matmat
        try:
            graph_matmat = self._graph_matmat(strategy, chunk_size)
        except RuntimeError as exc:
            if not is_graph_refusal(exc):
                raise
            self._graph_refused = True
            return self._vmap_matmat(chunk_size)
        fallback: list[Callable] = []

        def matmat(flat: Tensor) -> Tensor:
            if not fallback:
                try:
                    return graph_matmat(flat)
                except RuntimeError as exc:
                    if not is_graph_refusal(exc):
                        raise
                    self._graph_refused = True
                    fallback.append(self._vmap_matmat(chunk_size))
            return fallback[0](flat)

        return matmat

    def _vmap_matmat(self, chunk_size: int | None) -> Callable:
        """``V -> V H`` by vmapped forward-over-reverse products (the engine)."""
        from torch_secorder.func.hvp import hessian_matmat

        self.release_checked_loss()
        # Every evaluation of the loss replays the random draws of the first one (one
        # dropout mask for all products) and draws nothing from the global RNG.
        return hessian_matmat(self.pure, self.primals, chunk_size=chunk_size)

    def _graph_matmat(self, strategy: str, chunk_size: int | None) -> Callable:
        """``V -> V H`` by backward passes through one ``create_graph`` gradient."""
        like = list(self.primals)
        grads = self.graph_grads()
        tensors = [self.params[i] for i in self.active]
        used = [j for j, g in enumerate(grads) if g is not None and g.requires_grad]

        def products(vectors: list[Tensor], batched: bool) -> list[Tensor]:
            if not used:
                return [torch.zeros_like(v) for v in vectors]
            result = torch.autograd.grad(
                [grads[j] for j in used],
                tensors,
                grad_outputs=[vectors[j] for j in used],
                retain_graph=True,
                create_graph=self.create_graph,
                allow_unused=True,
                is_grads_batched=batched,
            )
            return [torch.zeros_like(v) if r is None else r for r, v in zip(result, vectors)]

        def matmat(flat: Tensor) -> Tensor:
            if strategy == "graph_batched" and flat.shape[0] > 1:  # one vector: no vmap
                rows = []
                step = GRAPH_BATCH if chunk_size is None else chunk_size
                for start in range(0, flat.shape[0], step):
                    V = tree_unravel(flat[start : start + step], like)
                    rows.append(tree_ravel(products(V, True), batch_dims=1))
                return torch.cat(rows)
            return torch.stack(
                [tree_ravel(products(tree_unravel(row, like), False)) for row in flat]
            )

        return matmat

    def graph_diagonal(self, chunk_size: int | None = None, progress: bool = True) -> list[Tensor]:
        r"""Exact diagonal blocks of the active tensors, on the autograd graph.

        The route for losses that ``torch.func`` refuses.  For the active tensor
        :math:`\theta_j` with gradient :math:`g_j`, a backward pass of
        :math:`g_j^\top e_i` gives :math:`H_{jj} e_i`, whose entry :math:`i` is
        :math:`H_{ii}`; the one-hot vectors :math:`e_i` go through batched backward
        passes (``is_grads_batched``), ``chunk_size`` at a time (default
        :data:`GRAPH_BATCH`), reusing one ``create_graph`` gradient.  Cost: one
        backward pass per entry, as the vmapped sweep.
        """
        grads = self.graph_grads()
        tensors = [self.params[i] for i in self.active]
        step = GRAPH_BATCH if chunk_size is None else chunk_size
        chunks = [
            (j, start, stop)
            for j, t in enumerate(tensors)
            if grads[j] is not None and grads[j].requires_grad
            for start, stop in chunk_ranges(t.numel(), step)
        ]
        pieces: list[list[Tensor]] = [[] for _ in tensors]
        for j, start, stop in progress_bar(
            chunks, enabled=progress, desc="Hessian diagonal (autograd graph)"
        ):
            t = tensors[j]
            rows = torch.arange(stop - start, device=t.device)
            basis = torch.zeros(stop - start, t.numel(), dtype=t.dtype, device=t.device)
            basis[rows, rows + start] = 1.0
            (columns,) = torch.autograd.grad(
                grads[j],
                t,
                grad_outputs=basis.reshape(stop - start, *t.shape),
                retain_graph=True,
                create_graph=self.create_graph,
                allow_unused=True,
                is_grads_batched=True,
            )
            if columns is None:
                pieces[j].append(torch.zeros(stop - start, dtype=t.dtype, device=t.device))
            else:
                pieces[j].append(columns.reshape(stop - start, -1)[rows, rows + start])
        return [
            torch.cat(p).reshape(t.shape) if p else torch.zeros_like(primal)
            for p, t, primal in zip(pieces, tensors, self.primals, strict=True)
        ]

    def graph_ggn_rows(
        self, loss_fn: Callable[[Tensor, Tensor], Tensor], targets: Any, vectors: list[Tensor]
    ) -> list[Tensor]:
        r"""``J^T H_out J v_r`` for a batch of vectors, on one autograd graph.

        The route for models that ``torch.func`` refuses.  ``vectors`` has one
        ``(k, *shape)`` tensor per active tensor (``k`` vectors), the result likewise.
        One forward pass of the model gives the output :math:`z` and its graph, shared
        by all ``k`` vectors; then, each step one batched backward pass
        (``is_grads_batched``):

        * :math:`J v` by the double-vjp trick: :math:`a(u) = J^\top u` is linear in a
          dummy cotangent :math:`u`, and the backward pass of :math:`a(u)^\top v`
          with respect to :math:`u` is :math:`J v`;
        * :math:`w = H_{\text{out}} J v`: a backward pass of
          :math:`\nabla_z \ell(z, y)^\top (J v)` with respect to :math:`z`;
        * :math:`J^\top w`: a backward pass of :math:`z` with cotangent :math:`w`.
        """
        return self.graph_ggn_rows_fn(loss_fn, targets)(vectors)

    def graph_ggn_rows_fn(
        self, loss_fn: Callable[[Tensor, Tensor], Tensor], targets: Any
    ) -> Callable[[list[Tensor]], list[Tensor]]:
        """:meth:`graph_ggn_rows` as a function of the vectors, on one kept graph.

        The forward pass (and the loss's check) runs here; the returned function runs
        only the three batched backward passes, keeping the graph for the next call.
        """
        tensors = [self.params[i] for i in self.active]
        loss_on_output = differentiable(loss_fn)
        used: list[int] = []
        graph: tuple[Tensor, ...] = ()
        if self.active:
            with torch.enable_grad():
                out = self.loss_closure()
                with targets_fit(loss_fn, out, targets):  # a target unlike the output
                    loss = check_loss(loss_on_output(out, targets), "loss_fn(model(x), y)")
                dummy, pulled = transposed_jacobian(out, tensors)
                used = [j for j, a in enumerate(pulled) if a is not None and a.requires_grad]
                if used:
                    (g_out,) = torch.autograd.grad(loss, out, create_graph=True)
                    graph = (out, dummy, pulled, g_out)
        return functools.partial(self._graph_ggn_apply, tensors, used, graph)

    def _graph_ggn_apply(
        self, tensors: list[Tensor], used: list[int], graph: tuple, vectors: list[Tensor]
    ) -> list[Tensor]:
        k = vectors[0].shape[0] if vectors else 0
        zeros = [torch.zeros(k, *p.shape, dtype=p.dtype, device=p.device) for p in self.primals]
        if not used:
            return zeros
        out, dummy, pulled, g_out = graph
        create_graph = self.create_graph
        vectors = [v if create_graph else v.detach() for v in vectors]
        with torch.enable_grad():
            (jv,) = torch.autograd.grad(
                [pulled[j] for j in used],
                dummy,
                grad_outputs=[vectors[j] for j in used],
                retain_graph=True,
                create_graph=create_graph,
                is_grads_batched=True,
            )
            if not g_out.requires_grad:  # a loss linear in the output
                return zeros
            (w,) = torch.autograd.grad(
                g_out,
                out,
                grad_outputs=jv,
                retain_graph=True,
                create_graph=create_graph,
                is_grads_batched=True,
            )
            product = torch.autograd.grad(
                out,
                tensors,
                grad_outputs=w,
                retain_graph=True,
                create_graph=create_graph,
                allow_unused=True,
                is_grads_batched=True,
            )
        return [
            z if r is None else (r if create_graph else r.detach())
            for r, z in zip(product, zeros, strict=True)
        ]

    def graph_ggn_matmat(
        self, loss_fn: Callable[[Tensor, Tensor], Tensor], targets: Any, V: Tensor
    ) -> Tensor:
        """:meth:`graph_ggn_rows` on flat ``(k, dim)`` rows over the active tensors."""
        rows = self.graph_ggn_rows(loss_fn, targets, list(tree_unravel(V, list(self.primals))))
        return tree_ravel(rows, batch_dims=1)

    def graph_ggn_product(
        self, loss_fn: Callable[[Tensor, Tensor], Tensor], targets: Any, v: list[Tensor]
    ) -> list[Tensor]:
        """:meth:`graph_ggn_rows` of one vector ``v`` (one tensor per tensor of ``params``)."""
        rows = self.graph_ggn_rows(loss_fn, targets, [v[i][None] for i in self.active])
        return self.expand([r[0] for r in rows])


def with_graph_fallback(
    graph_route: Callable[..., T],
) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Give a functional route ``route(problem, *args)`` its autograd-graph twin.

    The decorated route runs as before; where ``torch.func`` refuses the problem's
    loss, ``graph_route(problem, *args)`` runs instead, with the same arguments
    (see :meth:`LossProblem.functional_or_graph`).

    Example:
        >>> @with_graph_fallback(LossProblem.graph_diagonal)
        ... def diagonal(problem, chunk_size=None, progress=True):
        ...     ...
        >>> diagonal.__name__
        'diagonal'
    """

    def decorate(route: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(route)
        def run(problem: LossProblem, *args: Any, **kwargs: Any) -> T:
            return problem.functional_or_graph(
                lambda: route(problem, *args, **kwargs),
                lambda: graph_route(problem, *args, **kwargs),
            )

        return run

    return decorate


def _active_indices(params: list[Tensor], strict: bool) -> list[int]:
    active = []
    for i, p in enumerate(params):
        if p.requires_grad:
            active.append(i)
        elif strict:
            raise StrictError(
                f"params[{i}] does not require grad (strict=True). One of the differentiated "
                f"Tensors does not require grad: call requires_grad_() on params[{i}] or pass "
                f"strict=False to get zeros for it"
            )
    return active


def _check_used(problem: LossProblem, strict: bool) -> None:
    if not strict:
        return
    with torch.enable_grad():
        loss = problem._checked_loss
        if loss is None or not loss.requires_grad:
            loss = problem.loss_closure()
        tensors = [problem.params[i] for i in problem.active]
        grads = (
            torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True)
            if loss.requires_grad
            else [None] * len(tensors)
        )
    for i, g in zip(problem.active, grads):
        if g is None:
            raise StrictError(
                f"params[{i}] is not used by func (strict=True): its gradient is undefined; "
                f"pass strict=False to get zeros for it"
            )


def _zero_reason(
    active: list[int], loss: Tensor | None, model: nn.Module | None, name: str
) -> str | None:
    """Why the result is all zeros (nothing differentiated, a constant loss), or ``None``."""
    where = "model.parameters()" if model is not None else "params"
    if not active:
        return f"no tensor of {where} requires grad"
    if loss is not None and not loss.requires_grad:
        return (
            f"{name} does not depend on {where} (the loss does not require grad: "
            f"computed under torch.no_grad() or detached?)"
        )
    return None


@contextlib.contextmanager
def closure_problem(
    func: Callable[[], Tensor],
    params: Any,
    *,
    strict: bool = False,
    create_graph: bool = False,
    model: nn.Module | None = None,
    name: str = "func",
    scalar: bool = True,
) -> Iterator[LossProblem]:
    """Build a :class:`LossProblem` from a closure ``func()`` that reads ``params``.

    The user's state is preserved for the duration and restored on exit
    (see :func:`~torch_secorder.problems._purity.preserved_state`).  With
    ``scalar=False`` the output may be any tensor (Jacobian products): it is not
    evaluated up front to be checked as a finite scalar loss.
    """
    if not callable(func):
        raise TypeError(f"{name} must be callable, got {type(func).__name__}")
    params = as_param_list(params)
    with preserved_state(params, model) as evaluations:
        active = _active_indices(params, strict)
        tensors = [params[i] for i in active]

        @differentiable
        def loss_closure() -> Tensor:
            with evaluations.evaluation():
                return func()

        # The first evaluation is a plain forward pass of the user's code on the global
        # RNG (the random numbers a plain call draws, recorded for the later ones).
        checked_loss = None
        if scalar:
            # The validating forward pass keeps its graph (when something is
            # differentiated): the graph routes reuse it instead of a second pass.
            with torch.set_grad_enabled(bool(active)):
                checked_loss = check_loss(loss_closure(), name)
        else:
            with torch.no_grad():
                loss_closure()

        def pure(values: tuple[Tensor, ...]) -> Tensor:
            with SubstitutionMode(tensors, values):
                return loss_closure()

        def plain(values: tuple[Tensor, ...]) -> Tensor:
            with SubstitutionMode(tensors, values):
                return loss_closure.__wrapped__()

        primals = tuple(t if create_graph else t.detach() for t in tensors)
        problem = LossProblem(
            params, active, pure, primals, create_graph, loss_closure, evaluations
        )
        problem.plain = plain
        problem._checked_loss = checked_loss
        _check_used(problem, strict)
        if (zero := _zero_reason(active, checked_loss, model, name)) is not None:
            warn_zero_result(zero)
            active = problem.active = []
        if not active:
            problem.primals = ()
        yield problem


def narrow_to(problem: LossProblem, names: Sequence[str], only: Sequence[str] | None) -> None:
    """Differentiate only the active tensors named in ``only`` (``None``: all of them).

    Called before the problem's pure function is built from ``problem.active``; the
    tensors left out are read as constants (the user's own tensors).
    """
    if only is None:
        return
    keep = set(only)
    kept = [(i, t) for i, t in zip(problem.active, problem.primals) if names[i] in keep]
    problem.active = [i for i, _ in kept]
    problem.primals = tuple(t for _, t in kept)


@contextlib.contextmanager
def module_problem(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
    inputs: Any,
    targets: Any = None,
    *,
    strict: bool = False,
    create_graph: bool = False,
    only: Sequence[str] | None = None,
) -> Iterator[LossProblem]:
    """The one model-level problem: ``loss_fn(model(inputs), targets)``, or ``model(inputs)``.

    With a ``loss_fn``, a scalar loss (Hessian products, diagonal, trace); with
    ``loss_fn=None``, the model's output of any shape (Jacobian and Gauss-Newton
    products: ``targets``, if given, is only checked to lie on the parameters'
    device).  The parameters are ``model.parameters()`` (a
    shared one once); the model is evaluated through the one adapter,
    :class:`~torch_secorder.problems._model_function.ModelFunction`.  ``only``
    (parameter names) restricts the differentiated tensors to those names (the
    others are constants: see :func:`narrow_to`).  The user's state is preserved as
    in :func:`closure_problem`.
    """
    check_module(model)
    if loss_fn is not None and loss_convention(loss_fn) == "model":
        raise TypeError(
            "loss_fn takes (model, data, target), torch-secorder 0.0.1's convention of "
            "model_eigenvalues; here loss_fn is called as loss_fn(model(inputs), targets): "
            "pass a loss of (outputs, targets), e.g. torch.nn.MSELoss()"
        )
    model_fn = ModelFunction(model, inputs=inputs, targets=targets)  # devices checked
    names, params = model_fn.names, model_fn.params
    if loss_fn is None:
        name = "model(x)"

        def finish(out: Any) -> Tensor:
            return check_output(out, name)
    else:
        name = "loss_fn(model(inputs), targets)"
        finish = loss_of_output(loss_fn, targets)  # checks the target's shape once

    def func() -> Tensor:
        return finish(model_fn(None, inputs))

    with closure_problem(
        func,
        params,
        strict=strict,
        create_graph=create_graph,
        model=model,
        name=name,
        scalar=loss_fn is not None,
    ) as problem:
        narrow_to(problem, names, only)
        active_names = [names[i] for i in problem.active]
        # Parameters left out by ``only`` are constants: without create_graph, detached
        # (no graph back to them in the results).
        active = set(problem.active)
        fixed = {
            name: p.detach()
            for i, (name, p) in enumerate(zip(names, params, strict=True))
            if i not in active and p.requires_grad and not create_graph
        }

        def pure(values: tuple[Tensor, ...]) -> Tensor:
            with problem.rewind.evaluation():
                return finish(model_fn({**fixed, **model_fn.values(values, active_names)}, inputs))

        # The output's routes (jvp, vjp, vmap, jacrev, the GGN's products) run the model
        # under the operator fixes and the math attention kernel; for a loss the engine
        # adds them where it differentiates.
        problem.pure = differentiable(pure) if loss_fn is None else pure
        problem.names = names
        problem.model = model
        yield problem


def model_output_problem(
    model: nn.Module, inputs: Any, create_graph: bool, only: Sequence[str] | None = None
) -> contextlib.AbstractContextManager[LossProblem]:
    """``model(inputs)`` as a problem: :func:`module_problem` without a loss."""
    return module_problem(model, None, inputs, create_graph=create_graph, only=only)
