r"""Exact Hessian and GGN diagonals at the cost of a few products per layer.

The basis sweep (:func:`torch_secorder.func.hessian_diagonal`) pays one
Hessian-vector product per parameter entry.  This module finds, by recording one
evaluation of the loss, the parameters for which much less is enough, and
computes their diagonal by one of three routes; everything else is swept.  Every
route is exact: the numbers equal the dense Hessian's (GGN's) diagonal up to
rounding.

**Graph route** (``"graph"``).  The recorded calls are walked
backwards as a graph (:mod:`torch_secorder.func._graph`, one rule per operation
in :mod:`torch_secorder.func._rules`): the loss Hessian with respect to every
tensor on the way is carried as signed columns (``C`` per sample for a
``C``-class cross-entropy, from its symmetric factor), a diagonal, and the
residual terms of calls with a nonzero second derivative (activations, softmax,
products such as :math:`QK^\top`, layer norm, the loss), each crossing a call by
its Jacobian transpose (in closed form for linear layers, convolutions, pooling,
layer norm, softmax, moves of axes and elementwise calls; ``torch.func.vjp``
otherwise); at every affine site the parameter diagonal is the signed sum of
squared per-sample gradients of the columns.  Columns of several origins that
meet on a residual stream, each living on one position, are summed there into a
block per position and go on as at most one column per entry of a position.  A
diagonal term that crosses one ``F.linear`` stays lazy,
:math:`(AD)^\top \operatorname{diag}(r)(AD)`, down to the linear or layer-norm site
below, which reads it by its diagonal
:math:`d^2 \odot (A\odot A)^\top r`; one that crosses a 2-d convolution into a
convolution site reading the data is read by its band of kernel offsets.
Pooling, reshapes, slicing, padding, concatenation, residual additions (a tensor
read twice: its columns add), eval-mode batch norm, layer/group/RMS norm,
embeddings, grouped, transposed and 3-d convolutions and attention are covered;
for a network of linear and piecewise-linear calls (ReLU, max pooling) only the
loss's columns exist, the cost of the GGN.

On a chain ``linear -> elementwise -> ... -> linear -> loss`` (an MLP, or
convolutions before a ``flatten``) this is BackPACK's ``DiagHessian`` with the
diagonal terms kept diagonal: per sample,

.. math::
    \nabla^2_{z_l} L = J^\top (\nabla^2_{a_{l+1}} L) J
    + \operatorname{diag}(\sigma''(z_l) \odot \nabla_{a_l} L),

with the loss Hessian a diagonal plus a few signed columns, so that a term
:math:`W^\top \operatorname{diag}(r) W` is read off as :math:`(W \odot W)^\top r`
and only becomes signed columns (BackPACK's way) when it must cross a second
linear layer: a few matrix products per layer; the GGN drops the
:math:`\sigma''` terms.

The samples must stay apart: a call that mixes them (training-mode batch norm,
a transposed batch axis) or that has no rule leaves the parameters upstream of
it to the next routes.

**Tangent route** (``"tangent"``).  Where an origin of columns is estimated to
cost more than sweeping the parameters above it (a diagonal term crossing wide
convolutions: one column per entry of a sample), those parameters go the other
way (:mod:`torch_secorder.func._tangents`): one forward tangent per parameter
entry, from its site down to the loss through the same rules, and the diagonal
entry is the sum over the curved calls of their residual terms read as quadratic
forms in the tangent, :math:`\partial^2 L/\partial\theta_j^2 = \sum_c
t_c^\top R_c\, t_c`.  One forward pass per entry, from the site on, where the
sweep pays a forward and a backward pass from the input.

**Layer route** (``"rows"``, ``"blocks"``).  For a parameter read by exactly one
call of an operator affine in it (``F.linear``, ``F.conv*d``, ``F.embedding``,
the affine part of ``F.layer_norm``/``F.group_norm``/``F.batch_norm``; see
:mod:`torch_secorder.func._sites`), the diagonal is :math:`u_k^\top
\nabla^2_z L\, u_k` with :math:`u_k = \partial z/\partial\theta_k`.  Whether the
rows of ``z`` (samples, positions) interact through the rest of the loss is
*measured*: Hessian-vector products with random perturbations of ``z`` supported
on half of the rows (split by each bit of the row index) must vanish exactly on
the other half.  Rows independent: one product per output unit, perturbing that
unit in every row at once (``"rows"``).  Only samples independent: one product
per unit and position (``"blocks"``).  A route is taken only where it needs
fewer products than the sweep of that layer's parameters.

**Sweep** (``"sweep"``): parameters read twice (tied weights, also through a
property such as ``.T``), by other operators, layers whose rows are coupled
(batch norm in training mode downstream of it), anything not recognised.  When in
doubt, the slow exact answer.  Also every parameter when the caller
differentiates the diagonal (a ``torch.func`` transform, or autograd through a
tensor that requires grad): the other routes compute without autograd.

Memory: at most ``chunk_size`` perturbations are in flight at once (default:
about ``2**24`` tangent entries); the graph route walks its columns in chunks
of at most :func:`torch_secorder._chunks.chunk_entries` entries at a tensor (the
device's chunk policy: ``2**24`` on the CPU, from the free memory on CUDA; at
most ``chunk_size`` columns when given); the tangent route carries a quarter of
that budget's worth of directions per tensor.

The closed-form arithmetic of the graph route runs outside the
torch-function modes active at the call (:func:`~torch_secorder.func._tape.outside_modes`);
the user's function itself is evaluated under them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optree
import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from torch_secorder._checks import check_chunk_size
from torch_secorder.func._fixes import differentiable
from torch_secorder.func._graph import graph_diagonal
from torch_secorder.func._sites import SITE_FUNCS, Site, make_site
from torch_secorder.func._tape import Call, PerturbMode, outside_modes, record
from torch_secorder.func._tree import PyTree, tree_leaves
from torch_secorder.func.diagonal import _replace_leaf, basis_sweep_diagonal, leaf_hessian_diagonal
from torch_secorder.func.hvp import default_chunk_size
from torch_secorder.linalg.progress import progress_bar
from torch_secorder.linalg.trace import chunk_ranges

__all__ = ["diagonal_plan", "fast_hessian_diagonal", "ggn_diagonal", "ROUTES"]

#: The routes a parameter's diagonal can take (see the module docstring).
ROUTES = ("graph", "tangent", "rows", "blocks", "sweep")


class _Problem:
    """A loss ``loss_fn(model_fn(params))`` (or a plain ``f``) and its curvature kind."""

    def __init__(self, f, params, kind, model_fn=None, loss_fn=None):
        self.f = f
        self.params = params
        self.kind = kind
        self.model_fn = model_fn
        self.loss_fn = loss_fn
        self.leaves = tree_leaves(params)

    # -- products with respect to a perturbation of a site's output ---------------
    def site_product(self, site: Site) -> Callable[[Tensor], Tensor]:
        key = id(self.leaves[next(iter(site.roles.values()))])
        zero = torch.zeros(site.shape, dtype=site.call.out.dtype, device=site.call.out.device)
        params = self.params

        # The perturbing mode must be the innermost one (inside ``differentiable``'s):
        # an outer mode does not see the Python-level calls (``F.layer_norm``) that an
        # inner mode's handler makes.
        if self.kind == "hessian":
            f = self.f

            @differentiable
            def loss_of_delta(d: Tensor) -> Tensor:
                with PerturbMode({key: d}, SITE_FUNCS):
                    return f(params)

            def product(v: Tensor) -> Tensor:
                return jvp(grad(loss_of_delta), (zero,), (v,))[1]

            return product

        model_fn, loss_fn = self.model_fn, differentiable(self.loss_fn)

        @differentiable
        def output_of_delta(d: Tensor) -> Any:
            with PerturbMode({key: d}, SITE_FUNCS):
                return model_fn(params)

        def ggn_product(v: Tensor) -> Tensor:
            out, tangent = jvp(output_of_delta, (zero,), (v,))
            curved = jvp(grad(loss_fn), (out,), (tangent,))[1]
            return vjp(output_of_delta, zero)[1](curved)[0]

        return ggn_product

    def leaf_sweep(self, index: int, chunk_size: int | None, progress: bool) -> Tensor:
        if self.kind == "hessian":
            return leaf_hessian_diagonal(self.f, self.params, index, chunk_size, progress)
        return _leaf_ggn_diagonal(
            self.model_fn, self.loss_fn, self.params, index, chunk_size, progress
        )

    def group_sweep(
        self, indices: list[int], chunk_size: int | None, progress: bool
    ) -> list[Tensor]:
        """The sweep of several leaves (one layer's weight and bias) in one vectorised call.

        Basis vectors run over the leaves' entries in turn; each carries a one-hot
        tangent in one leaf and zeros in the others.
        """
        if len(indices) == 1:
            return [self.leaf_sweep(indices[0], chunk_size, progress)]
        leaves = [self.leaves[i] for i in indices]
        sizes = [leaf.numel() for leaf in leaves]
        total = sum(sizes)
        chunk = chunk_size or default_chunk_size(total, total)
        params, spec = optree.tree_flatten(
            self.params, none_is_leaf=False, namespace="torch_secorder"
        )

        def with_leaves(xs) -> PyTree:
            full = list(params)
            for i, x in zip(indices, xs, strict=True):
                full[i] = x
            return optree.tree_unflatten(spec, full)

        primals = tuple(leaves)
        if self.kind == "hessian":
            f_group = differentiable(lambda *xs: self.f(with_leaves(xs)))
            argnums = tuple(range(len(leaves)))

            def product(*vs: Tensor) -> tuple[Tensor, ...]:
                return jvp(grad(f_group, argnums=argnums), primals, vs)[1]

        else:
            model_fn, loss_fn = differentiable(self.model_fn), differentiable(self.loss_fn)

            def output_of(*xs: Tensor) -> Any:
                return model_fn(with_leaves(xs))

            def product(*vs: Tensor) -> tuple[Tensor, ...]:
                out, tangent = jvp(output_of, primals, vs)
                curved = jvp(grad(loss_fn), (out,), (tangent,))[1]
                return vjp(output_of, *primals)[1](curved)

        batched = vmap(product, randomness="same")
        offsets = [sum(sizes[:j]) for j in range(len(sizes))]
        pieces: list[list[Tensor]] = [[] for _ in leaves]
        for start, stop in progress_bar(
            chunk_ranges(total, chunk), enabled=progress, desc="Hessian diagonal sweep"
        ):
            k = stop - start
            flat = torch.arange(start, stop)
            tangents, picks = [], []
            for leaf, size, offset in zip(leaves, sizes, offsets, strict=True):
                basis = torch.zeros(k, size, dtype=leaf.dtype, device=leaf.device)
                inside = ((flat >= offset) & (flat < offset + size)).nonzero().flatten()
                basis[inside, flat[inside] - offset] = 1.0
                tangents.append(basis.reshape(k, *leaf.shape))
                picks.append((inside, flat[inside] - offset))
            products = batched(*tangents)
            for j, (rows, cols) in enumerate(picks):
                if rows.numel():
                    pieces[j].append(products[j].reshape(k, -1)[rows, cols])
        return [torch.cat(p).reshape(leaf.shape) for p, leaf in zip(pieces, leaves, strict=True)]


def _leaf_ggn_diagonal(model_fn, loss_fn, params, index, chunk_size, progress) -> Tensor:
    leaf = tree_leaves(params)[index]
    numel = leaf.numel()
    if chunk_size is None:
        chunk_size = default_chunk_size(numel, numel)
    model_fn, loss_fn = differentiable(model_fn), differentiable(loss_fn)

    def output_of_leaf(x: Tensor) -> Any:
        return model_fn(_replace_leaf(params, index, x))

    def ggn_product(v: Tensor) -> Tensor:
        out, tangent = jvp(output_of_leaf, (leaf,), (v,))
        curved = jvp(grad(loss_fn), (out,), (tangent,))[1]
        return vjp(output_of_leaf, leaf)[1](curved)[0]

    return basis_sweep_diagonal(ggn_product, leaf, chunk_size, progress, "GGN diagonal sweep")


# -- detection --------------------------------------------------------------------


def _usage(calls: list[Call], leaf_ids: dict[int, int]) -> dict[int, int]:
    count: dict[int, int] = {}
    for call in calls:
        for t in call.tensor_inputs():
            i = leaf_ids.get(id(t))
            if i is not None:
                count[i] = count.get(i, 0) + 1
    return count


def _find_sites(calls: list[Call], leaves: list[Tensor]) -> list[Site]:
    leaf_ids = {id(leaf): i for i, leaf in enumerate(leaves)}
    once = {i for i, c in _usage(calls, leaf_ids).items() if c == 1}
    sites = []
    for call in calls:
        site = make_site(call, leaf_ids, once)
        if site is not None:
            sites.append(site)
    return sites


def _feeders(calls: list[Call], sites: list[Site]) -> list[set[int]]:
    """For each site, the earlier sites whose outputs reach its input (through the tape)."""
    index = {id(site.call): s for s, site in enumerate(sites)}
    masks: dict[int, int] = {}  # id(tensor) -> bit set of the sites it depends on
    feeders: list[set[int]] = [set() for _ in sites]
    for call in calls:
        mask = 0
        for t in call.tensor_inputs():
            mask |= masks.get(id(t), 0)
        s = index.get(id(call))
        if s is not None:
            feeders[s] = {k for k in range(len(sites)) if mask >> k & 1}
            mask |= 1 << s
        if mask:
            for t in call.outputs():
                masks[id(t)] = mask
    return feeders


def _probe_cost(site: Site) -> int:
    """Products of the first coupling probe (one per bit of the row index)."""
    n, t, _ = site.rows_shape
    return max(1, math.ceil(math.log2(n * t))) if n * t > 1 else 0


def _split_is_clean(batched, site: Site, groups: Tensor, rows_shape, gen, extra=None):
    """Products with random perturbations on each half of every bit split of ``groups``
    vanish on the other half.

    ``extra`` (``(k, N, T, U)`` tangents in rows layout) rides along in the same
    vectorised call; with it, returns ``(clean, their products in rows layout)``.
    """
    n_groups = int(groups.max()) + 1
    bits = max(1, math.ceil(math.log2(n_groups))) if n_groups > 1 else 0
    if bits == 0 and extra is None:
        return True
    z = site.call.out
    masks = torch.zeros((bits, *groups.shape), dtype=torch.bool, device=groups.device)
    for b in range(bits):
        masks[b] = ((groups >> b) & 1).bool()
    masks = masks[..., None].expand(bits, *rows_shape)
    noise = torch.randn((bits, *rows_shape), generator=gen, dtype=z.dtype, device="cpu").to(
        z.device
    )
    tangents = noise * masks
    if extra is not None:
        tangents = torch.cat([tangents, extra])
    out = site.to_rows(batched(site.from_rows(tangents)))
    clean = bool((out[:bits].masked_fill(masks, 0.0) == 0).all())
    return clean if extra is None else (clean, out[bits:])


def _structure(product, site: Site, gen: torch.Generator, samples_useful: bool = True, rows=None):
    """``"rows"``, ``"samples"`` or ``"coupled"``: which rows of ``z`` interact.

    ``samples_useful=False`` skips the second probe (the blocks route would not be taken).
    ``rows``: a list; when the rows route's unit tangents fit in one chunk
    (``rows == [chunk]``), they ride along with the first probe and, if the rows are
    independent, the output Hessian's diagonal ``(N, T, U)`` is appended to ``rows``.
    """
    n, t, u = site.rows_shape
    batched = vmap(product, randomness="same")
    device = site.call.out.device
    index = torch.arange(n * t, device=device).reshape(n, t)
    if rows is not None and u + _probe_cost(site) <= rows[0]:
        z = site.call.out
        units = torch.arange(u, device=device)
        tangents = torch.zeros(u, n, t, u, dtype=z.dtype, device=device)
        tangents[units, :, :, units] = 1.0
        clean, out = _split_is_clean(batched, site, index, (n, t, u), gen, tangents)
        if clean:
            rows.append(out[units, :, :, units].permute(1, 2, 0))
    else:
        clean = _split_is_clean(batched, site, index, (n, t, u), gen)
    if clean:
        return "rows"
    if not samples_useful:
        return "coupled"
    samples = torch.arange(n, device=device)[:, None].expand(n, t)
    if _split_is_clean(batched, site, samples, (n, t, u), gen):
        return "samples"
    return "coupled"


# -- the layer route ------------------------------------------------------------------


def _site_rows(product, site: Site, chunk_size: int | None) -> dict[str, Tensor]:
    n, t, u = site.rows_shape
    z = site.call.out
    chunk = chunk_size or default_chunk_size(u, z.numel())
    batched = vmap(product, randomness="same")
    h = torch.empty(n, t, u, dtype=z.dtype, device=z.device)
    for start, stop in chunk_ranges(u, chunk):
        k = stop - start
        units = torch.arange(k, device=z.device)
        tangents = torch.zeros(k, n, t, u, dtype=z.dtype, device=z.device)
        tangents[units, :, :, units + start] = 1.0
        out = site.to_rows(batched(site.from_rows(tangents)))
        h[:, :, start:stop] = out[units, :, :, units + start].permute(1, 2, 0)
    return site.diag_rows(h)


def _site_blocks(product, site: Site, chunk_size: int | None) -> dict[str, Tensor]:
    n, t, u = site.rows_shape
    z = site.call.out
    total = u * t
    chunk = chunk_size or default_chunk_size(total, z.numel())
    batched = vmap(product, randomness="same")
    blocks = torch.empty(n, u, t, t, dtype=z.dtype, device=z.device)
    for start, stop in chunk_ranges(total, chunk):
        k = stop - start
        idx = torch.arange(start, stop, device=z.device)
        unit, pos = idx // t, idx % t
        tangents = torch.zeros(k, n, t, u, dtype=z.dtype, device=z.device)
        rows = torch.arange(k, device=z.device)
        tangents[rows, :, pos, unit] = 1.0
        out = site.to_rows(batched(site.from_rows(tangents)))  # (k, n, T, U)
        columns = out[rows, :, :, unit]  # (k, n, T): B[n, unit, :, pos]
        blocks[:, unit, :, pos] = columns  # advanced indices first: (k, n, T)
    return site.diag_blocks(blocks)


# -- driver -------------------------------------------------------------------------------


_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _under_transform() -> bool:
    """Whether we run inside a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ...)."""
    return torch._C._functorch.maybe_current_level() is not None


def _tracked(calls: list[Call], leaves: list[Tensor]) -> bool:
    """Whether autograd would track the loss: grad mode is on and a tensor it reads
    (a parameter, or a captured tensor such as a loss scale or the inputs) requires
    grad or is a ``torch.func`` wrapper."""
    if not torch.is_grad_enabled():
        return False
    tensors = [*leaves, *(t for call in calls for t in call.tensor_inputs())]
    return any(t.requires_grad or _is_wrapped(t) for t in tensors)


def _sweep_all(problem: _Problem, chunk_size, progress, plan_only):
    """Every leaf by its own one-hot sweep: differentiable (the sweep is ``jvp``, ``grad``
    and ``vmap`` of the loss), for a caller that differentiates the diagonal."""
    routes = dict.fromkeys(range(len(problem.leaves)), "sweep")
    if plan_only:
        return {}, routes
    diag = {i: problem.leaf_sweep(i, chunk_size, progress) for i in routes}
    return diag, routes


def _record(problem: _Problem) -> tuple[list[Call], Tensor, int | None]:
    """The tape, the value, and the first call whose second derivatives count.

    For the GGN the model and the loss are recorded one after the other (the
    loss's calls start at the returned index); ``None`` when the model's output
    is not one tensor (the graph route then does not run).
    """
    with torch.no_grad():
        if problem.kind == "hessian":
            calls, value = record(problem.f, problem.params)
            return calls, value, 0
        model_calls, out = record(problem.model_fn, problem.params)
        if not isinstance(out, Tensor):
            calls, value = record(problem.f, problem.params)
            return calls, value, None
        loss_calls, value = record(problem.loss_fn, out)
        return model_calls + loss_calls, value, len(model_calls)


def _run(problem: _Problem, chunk_size, progress, plan_only=False):
    leaves = problem.leaves
    routes: dict[int, str] = {}
    diag: dict[int, Tensor] = {}
    if not leaves:
        return diag, routes
    # The graph and layer routes compute without autograd (``no_grad``, exact zero
    # tests, closed forms): a caller differentiating the diagonal (a ``torch.func``
    # transform, or autograd through tensors that require grad) gets the sweep.
    if _under_transform():
        return _sweep_all(problem, chunk_size, progress, plan_only)
    calls, value, curved_from = _record(problem)
    if _tracked(calls, leaves):
        return _sweep_all(problem, chunk_size, progress, plan_only)
    sites = _find_sites(calls, leaves)
    if curved_from is not None:
        with outside_modes():
            graphed = graph_diagonal(
                calls,
                value,
                sites,
                curved_from,
                not plan_only,
                max_columns=chunk_size,
                progress=progress,
            )
        for i, (route, d) in graphed.items():
            routes[i] = route
            if d is not None:
                diag[i] = d
        sites = [s for s in sites if not all(i in routes for i in s.roles.values())]
    gen = torch.Generator().manual_seed(0)
    feeders = _feeders(calls, sites)
    presumed_coupled: set[int] = set()
    # Last layer first: a layer upstream of one whose rows are coupled has its rows
    # coupled too (in all but degenerate cases), so it is not probed when only the
    # rows route could help it; the sweep it then takes is exact all the same.
    for s in progress_bar(
        range(len(sites) - 1, -1, -1), enabled=progress, desc="diagonal by layer"
    ):
        site = sites[s]
        u = site.rows_shape[2]
        sweep_cost = sum(leaves[i].numel() for i in site.roles.values())
        blocks_useful = site.supports_blocks and site.cost(True) < sweep_cost
        if not blocks_useful and (
            s in presumed_coupled or site.cost(False) + _probe_cost(site) >= sweep_cost
        ):
            continue
        if site.cost(False) >= sweep_cost:
            continue
        product = problem.site_product(site)
        z = site.call.out
        fused = u + _probe_cost(site)  # the rows route's products ride with the probe
        rows_out = None if plan_only else [chunk_size or default_chunk_size(fused, z.numel())]
        structure = _structure(product, site, gen, blocks_useful, rows_out)
        if structure != "rows":
            presumed_coupled |= feeders[s]
        if structure == "rows":
            route = "rows"
        elif structure == "samples" and blocks_useful:
            route = "blocks"
        else:
            continue
        for i in site.roles.values():
            routes[i] = route
        if plan_only:
            continue
        if route == "rows" and len(rows_out) == 2:
            found = site.diag_rows(rows_out[1])
        else:
            run = _site_rows if route == "rows" else _site_blocks
            found = run(product, site, chunk_size)
        for role, d in found.items():
            diag[site.roles[role]] = d.reshape(leaves[site.roles[role]].shape)
    groups: list[list[int]] = []  # a site's unrouted leaves are swept together
    for site in sites:
        group = [i for i in site.roles.values() if i not in routes]
        if group:
            groups.append(group)
            routes.update(dict.fromkeys(group, "sweep"))
    groups += [[i] for i in range(len(leaves)) if i not in routes]
    for group in groups:
        routes.update(dict.fromkeys(group, "sweep"))
        if not plan_only:
            for i, d in zip(group, problem.group_sweep(group, chunk_size, progress), strict=True):
                diag[i] = d
    return diag, routes


def _unflatten(params: PyTree, values: dict[int, Any]) -> PyTree:
    leaves, spec = optree.tree_flatten(params, none_is_leaf=False, namespace="torch_secorder")
    return optree.tree_unflatten(spec, [values[i] for i in range(len(leaves))])


def fast_hessian_diagonal(
    f: Callable[[PyTree], Tensor],
    params: PyTree,
    chunk_size: int | None = None,
    progress: bool = False,
) -> PyTree:
    r"""Exact :math:`\operatorname{diag}(\nabla^2 f(\theta))`, by the cheapest exact route.

    Same numbers as :func:`torch_secorder.func.hessian_diagonal`; each parameter
    takes the graph, layer or sweep route (module docstring;
    :func:`diagonal_plan` tells which).  ``f`` is evaluated once without
    autograd to find the routes, so it must be a deterministic function of
    ``params`` (draw dropout masks from a fixed seed).

    Differentiable like the sweep: inside a ``torch.func`` transform (``grad``,
    ``vmap``, ...), or with grad mode on and a tensor that ``f`` reads (a
    parameter, a captured input or loss scale) requiring grad, every parameter
    takes the sweep, whose result carries the derivatives.  Call it under
    :func:`torch.no_grad` (or detach) to get the fast routes there.

    Args:
        f: Pure function of ``params`` returning a scalar tensor (e.g. a
            ``functional_call`` of a model followed by a loss).
        params: The point (pytree of tensors).
        chunk_size: Perturbations (or basis vectors) per vmapped call; peak
            memory is about ``chunk_size`` Hessian-vector products (default:
            about ``2**24`` tangent entries).
        progress: Show a progress bar for runs longer than a few seconds.

    Returns:
        A pytree shaped like ``params``.

    Example:
        >>> import torch
        >>> from torch.func import functional_call
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                             torch.nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
        >>> params = {k: v.detach() for k, v in model.named_parameters()}
        >>> f = lambda p: torch.nn.functional.mse_loss(functional_call(model, p, (x,)), y)
        >>> fast = fast_hessian_diagonal(f, params)
        >>> from torch_secorder.func import hessian_diagonal
        >>> slow = hessian_diagonal(f, params)
        >>> all(torch.allclose(fast[k], slow[k], atol=1e-12) for k in params)
        True
    """
    check_chunk_size(chunk_size)
    problem = _Problem(f, params, "hessian")
    diag, _ = _run(problem, chunk_size, progress)
    return _unflatten(params, diag)


def ggn_diagonal(
    model_fn: Callable[[PyTree], Any],
    loss_fn: Callable[[Any], Tensor],
    params: PyTree,
    chunk_size: int | None = None,
    progress: bool = False,
) -> PyTree:
    r"""Exact diagonal of the generalized Gauss-Newton matrix :math:`J^\top H_{\text{out}} J`.

    With :math:`o = \text{model\_fn}(\theta)`, :math:`J = \partial o/\partial\theta`
    and :math:`H_{\text{out}} = \nabla^2_o\, \text{loss\_fn}(o)`, returns
    :math:`\operatorname{diag}(J^\top H_{\text{out}} J)`.  For cross-entropy with
    targets sampled from the model this is also the exact diagonal of the
    Fisher.  Routes as in :func:`fast_hessian_diagonal` (the graph route records
    the model and the loss one after the other and keeps the residual terms of
    the loss's calls only, dropping the activations' second derivatives; the
    layer route uses GGN-vector
    products :math:`J^\top H_{\text{out}} J v`; the sweep one per entry), and
    differentiable in the same way (the sweep under a transform or autograd).

    Args:
        model_fn: Pure function of ``params`` returning the output ``o``.
        loss_fn: Function of ``o`` returning a scalar.
        params: The point (pytree of tensors).
        chunk_size: As in :func:`fast_hessian_diagonal`.
        progress: Show a progress bar for long runs.

    Returns:
        A pytree shaped like ``params``.

    Example:
        >>> import torch
        >>> params = {"w": torch.tensor([[1.0, 2.0]])}
        >>> x = torch.tensor([[3.0, 1.0]])
        >>> model_fn = lambda p: torch.nn.functional.linear(x, p["w"])
        >>> loss_fn = lambda o: (o ** 2).sum()
        >>> ggn_diagonal(model_fn, loss_fn, params)
        {'w': tensor([[18.,  2.]])}
    """
    check_chunk_size(chunk_size)

    def f(p: PyTree) -> Tensor:
        return loss_fn(model_fn(p))

    problem = _Problem(f, params, "ggn", model_fn, loss_fn)
    diag, _ = _run(problem, chunk_size, progress)
    return _unflatten(params, diag)


def diagonal_plan(f: Callable[[PyTree], Tensor], params: PyTree, kind: str = "hessian") -> PyTree:
    """Which route (one of :data:`ROUTES`) each parameter's diagonal takes.

    Runs the detection of :func:`fast_hessian_diagonal` (one recorded
    evaluation and a few probe products per layer), not the computation.
    ``kind="ggn"`` is not accepted here: the GGN routes are the Hessian's.

    Example:
        >>> import torch
        >>> w = torch.ones(2, 3)
        >>> x = torch.randn(4, 3)
        >>> f = lambda p: torch.nn.functional.linear(x, p["w"]).pow(2).sum() + p["w"].sum()
        >>> diagonal_plan(f, {"w": w})
        {'w': 'sweep'}
        >>> diagonal_plan(lambda p: torch.nn.functional.linear(x, p["w"]).pow(4).sum(), {"w": w})
        {'w': 'graph'}
    """
    if kind != "hessian":
        raise ValueError(f"kind must be 'hessian', got {kind!r}")
    _, routes = _run(_Problem(f, params, "hessian"), None, False, plan_only=True)
    return _unflatten(params, routes)
