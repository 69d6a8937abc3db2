r"""Exact Hessian and GGN diagonals at the cost of a few products per layer.

The basis sweep (:func:`torch_secorder.func.hessian_diagonal`) pays one
Hessian-vector product per parameter entry.  This module finds, by recording one
evaluation of the loss, the parameters for which much less is enough, and
computes their diagonal by one of two routes; everything else is swept.  Every
route is exact: the numbers equal the dense Hessian's (GGN's) diagonal up to
rounding.

**Chain route** (``"chain"``).  When the whole loss is a chain
``linear -> elementwise -> ... -> linear -> loss`` on ``(N, D)`` activations
(``F.linear``, elementwise activations, ``flatten``, eval dropout, ending in
``F.mse_loss`` or ``F.cross_entropy``), the Hessian with respect to each layer
output :math:`z_l` is propagated backwards in closed form, as in BackPACK's
``DiagHessian``, but keeping diagonal terms diagonal:

.. math::
    \nabla^2_{z_l} L = J^\top (\nabla^2_{a_{l+1}} L) J
    + \operatorname{diag}(\sigma''(z_l) \odot \nabla_{a_l} L)

per sample, with the loss Hessian as a diagonal plus a few signed columns, so
that a term :math:`W^\top \operatorname{diag}(r) W` is read off as
:math:`(W \odot W)^\top r` and only materialised (as signed columns, BackPACK's
way) when it must cross a second linear layer.  Cost: a few matrix products
per layer for a two-hidden-layer network; the GGN drops the
:math:`\sigma''` terms.

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

**Sweep** (``"sweep"``): parameters read twice (tied weights), by other
operators, layers whose rows are coupled (batch norm in training mode upstream of
it), anything not recognised.  When in doubt, the slow exact answer.

Memory: at most ``chunk_size`` perturbations are in flight at once (default:
about ``2**24`` tangent entries).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optree
import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from torch_secorder.func._chain import chain_diagonal
from torch_secorder.func._fixes import differentiable
from torch_secorder.func._sites import SITE_FUNCS, Site, make_site
from torch_secorder.func._tape import Call, PerturbMode, record
from torch_secorder.func._tree import PyTree, tree_leaves
from torch_secorder.func.diagonal import _replace_leaf, leaf_hessian_diagonal
from torch_secorder.func.hvp import default_chunk_size
from torch_secorder.linalg.progress import progress_bar
from torch_secorder.linalg.trace import chunk_ranges

__all__ = ["diagonal_plan", "fast_hessian_diagonal", "ggn_diagonal", "ROUTES"]

#: The routes a parameter's diagonal can take (see the module docstring).
ROUTES = ("chain", "rows", "blocks", "sweep")


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

    batched = vmap(ggn_product, randomness="same")
    pieces = []
    for start, stop in progress_bar(
        chunk_ranges(numel, chunk_size), enabled=progress, desc="GGN diagonal sweep"
    ):
        rows = torch.arange(stop - start, device=leaf.device)
        basis = torch.zeros(stop - start, numel, dtype=leaf.dtype, device=leaf.device)
        basis[rows, rows + start] = 1.0
        products = batched(basis.reshape(stop - start, *leaf.shape)).reshape(stop - start, numel)
        pieces.append(products[rows, rows + start])
    return torch.cat(pieces).reshape(leaf.shape)


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


def _split_is_clean(batched, site: Site, groups: Tensor, rows_shape, gen) -> bool:
    """Products with random perturbations on each half of every bit split of ``groups``
    vanish on the other half."""
    n_groups = int(groups.max()) + 1
    bits = max(1, math.ceil(math.log2(n_groups))) if n_groups > 1 else 0
    if bits == 0:
        return True
    masks = torch.stack([((groups >> b) & 1).bool() for b in range(bits)])  # (bits, N, T)
    masks = masks[..., None].expand(bits, *rows_shape)
    z = site.call.out
    noise = torch.randn((bits, *rows_shape), generator=gen, dtype=z.dtype, device="cpu").to(
        z.device
    )
    probes = site.from_rows(noise * masks)
    out = site.to_rows(batched(probes))
    return bool((out.masked_fill(masks, 0.0) == 0).all())


def _structure(product, site: Site, gen: torch.Generator, samples_useful: bool = True) -> str:
    """``"rows"``, ``"samples"`` or ``"coupled"``: which rows of ``z`` interact.

    ``samples_useful=False`` skips the second probe (the blocks route would not be taken).
    """
    n, t, u = site.rows_shape
    batched = vmap(product, randomness="same")
    device = site.call.out.device
    rows = torch.arange(n * t, device=device).reshape(n, t)
    if _split_is_clean(batched, site, rows, (n, t, u), gen):
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


def _run(problem: _Problem, chunk_size, progress, plan_only=False):
    leaves = problem.leaves
    routes: dict[int, str] = {}
    diag: dict[int, Tensor] = {}
    if not leaves:
        return diag, routes
    with torch.no_grad():
        calls, value = record(problem.f, problem.params)
    chained = chain_diagonal(
        calls, value, leaves, residuals=problem.kind == "hessian", compute=not plan_only
    )
    if chained is not None:
        for i, d in chained.items():
            routes[i] = "chain"
            if d is not None:
                diag[i] = d
    else:
        gen = torch.Generator().manual_seed(0)
        for site in progress_bar(
            _find_sites(calls, leaves), enabled=progress, desc="diagonal by layer"
        ):
            sweep_cost = sum(leaves[i].numel() for i in site.roles.values())
            if site.cost(False) >= sweep_cost:
                continue
            product = problem.site_product(site)
            blocks_useful = site.supports_blocks and site.cost(True) < sweep_cost
            structure = _structure(product, site, gen, blocks_useful)
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
            run = _site_rows if route == "rows" else _site_blocks
            for role, d in run(product, site, chunk_size).items():
                diag[site.roles[role]] = d.reshape(leaves[site.roles[role]].shape)
    for i in range(len(leaves)):
        if i not in routes:
            routes[i] = "sweep"
            if not plan_only:
                diag[i] = problem.leaf_sweep(i, chunk_size, progress)
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
    takes the chain, layer or sweep route (module docstring;
    :func:`diagonal_plan` tells which).  ``f`` is evaluated once without
    autograd to find the routes, so it must be a deterministic function of
    ``params`` (draw dropout masks from a fixed seed).

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
    Fisher.  Routes as in :func:`fast_hessian_diagonal` (the chain route drops
    the activations' second derivatives; the layer route uses GGN-vector
    products :math:`J^\top H_{\text{out}} J v`; the sweep one per entry).

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
        {'w': 'rows'}
    """
    if kind != "hessian":
        raise ValueError(f"kind must be 'hessian', got {kind!r}")
    _, routes = _run(_Problem(f, params, "hessian"), None, False, plan_only=True)
    return _unflatten(params, routes)
