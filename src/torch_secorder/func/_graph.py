r"""The graph route: second-order backpropagation through the recorded calls.

The loss :math:`L = \sum_n \ell_n` is split along the leading axis of every
tensor (the samples; :mod:`torch_secorder.func._rules` checks that every call on
the way acts on each slice separately or adds the slices).  Then the Hessian
of :math:`L` with respect to any tensor ``t`` on the way is block diagonal over
the slices, and it is carried backwards, from the loss to the parameters, in
three kinds of terms, each crossing a call ``out = f(in)`` by the chain rule
:math:`\nabla^2_{in} L = J^\top (\nabla^2_{out} L) J + \sum_j g_j \nabla^2 out_j`:

* **signed columns** ``S`` (``(K, *t.shape)``, each column living on one slice
  ``n``: ``S[k, n]`` is the ``k``-th column of slice ``n``, with a sign
  ``(K, N)``): the term :math:`\sum_k s_{kn} S_{kn} S_{kn}^\top`.  Crossing a
  call maps every column by :math:`J^\top` (the rule's closed form,
  :meth:`~torch_secorder.func._rules.Rule.fast_vjp`, or ``torch.func.vjp`` of the
  recorded call, vmapped over the columns); where a tensor is read twice (a residual
  connection), the columns of one origin arriving from its readers add;
  columns of different origins are carried separately (one backward walk per
  origin, each in chunks of columns).
* a **diagonal** :math:`\operatorname{diag}(r)`: kept as a diagonal across
  calls with a diagonal Jacobian (scaled by its square), and read off at an
  affine parameter site in closed form (:meth:`~torch_secorder.func._sites.Site.diag_rows`);
  after one ``F.linear`` :math:`A` (and elementwise calls :math:`D`) it stays
  lazy, :math:`(AD)^\top \operatorname{diag}(r) (AD)`, and a linear or
  layer-norm site right below reads it by its diagonal (:meth:`_Plan.lazy`);
  where it meets any other call it becomes signed columns
  :math:`\sqrt{|r_i|}\, e_i` (as many per slice as the slice has entries).
* the **residual** terms :math:`\sum_j g_j \nabla^2 out_j` of curved calls
  (their rules give a diagonal and/or columns; ``g`` comes from a first-order
  backward pass), which start new origins.  The loss itself is such a call.

Where the columns of several origins meet at a tensor read twice on the way, shaped
``(N, D)`` or ``(N, T, D)`` (a residual stream), those living on one position of a
sample each (the per-position residuals of layer norms and MLP activations, crossing
per-position calls) are summed into one ``D x D`` block per position
(:class:`_Junction`) and walk on as its eigenvectors: at most ``D`` columns per
position, however many origins arrived (in a transformer block of width 32 on 16
tokens, the final norm, the GELU and the second norm send about 3,000 columns per
sample to the stream between attention and MLP; 512 go on through the attention).

At an affine site ``z = op(x, \theta)`` whose parameter no other call reads
(:mod:`~torch_secorder.func._sites`), the columns give the parameter's
diagonal :math:`\sum_{k,n} s_{kn} (\partial_\theta \langle S_{kn}, z_n\rangle)^2`:
the per-sample gradients of the columns, squared (for a linear layer on
``(N, D)`` rows :math:`(\sum_k s_k S_k^2)^\top (x\odot x)`).  For a network of
linear and piecewise-linear calls (ReLU, max pooling) only the loss's columns
exist: ``C`` per sample for ``C`` outputs, the GGN's cost.  For the GGN only the
loss's calls contribute residuals.

A parameter whose site is upstream of a call without a rule (or that mixes the
slices: training-mode batch norm, a transposed leading axis, a curved call
whose slice is too large for its dense residual) is not covered; the caller
takes another exact route for it.

Memory: one origin's columns exist at a time (a curved call's residual is formed
again when its walk starts, from the gradient kept at its output); a residual's
columns, formed at once, are at most :data:`~torch_secorder.func._rules.RESIDUAL_ENTRIES`
entries (a call beyond it is not crossed).  A walk carries at most ``budget`` column
entries at one tensor, by
default the device's chunk policy, :func:`torch_secorder._chunks.chunk_entries`
of the loss value's device (on the CPU ``2**24`` entries; on CUDA the policy's
share of the memory free when the route starts, at an estimated 64 bytes per
entry): the columns of an origin go in chunks of
``max(1, budget // largest tensor)`` (at most ``max_columns``, the caller's
``chunk_size``); per-sample gradients at a site in chunks of
``max(1, budget // (N * parameter entries))`` columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vjp, vmap

from torch_secorder._chunks import chunk_entries
from torch_secorder.func._patches import unfold
from torch_secorder.func._rules import (
    BATCHED,
    REDUCED,
    RESIDUAL_ENTRIES,
    Activation,
    Norm,
    Softmax,
    elementwise_derivatives,
    rule_for,
    substituted,
)
from torch_secorder.func._sites import Site
from torch_secorder.func._tangents import tangent_diagonal
from torch_secorder.func._tape import Call

__all__ = ["graph_diagonal"]

_WEIGHTED = {
    F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
    F.conv_transpose3d,
}  # fmt: skip


@dataclass
class _Step:
    """One recorded call on the way from a site to the loss."""

    index: int
    call: Call
    active: list[Tensor]  # its inputs that depend on the sites (by identity, no repeats)
    rule: object = None
    site: Site | None = None
    curved: bool = False
    elementwise: bool = False
    useful: list[Tensor] = field(default_factory=list)  # active inputs with sites upstream
    _vjp: object = None

    @property
    def outs(self) -> list[Tensor]:
        return self.call.outputs()

    _jac: Tensor | None = None

    def vjp_fn(self):
        if self._vjp is None:
            fn = substituted(self.call, self.active)
            self._vjp = vjp(fn, *self.active)[1]
        return self._vjp

    def jacobian(self) -> Tensor:
        """The diagonal of the Jacobian of an elementwise call."""
        if self._jac is None:
            found = None
            if isinstance(self.rule, Activation):
                found = elementwise_derivatives(
                    self.call, self.active[0], self.rule.piecewise_linear
                )
            if found is None:
                closed = self.rule.diagonal_jacobian(self.call, self.active)
                if closed is not None:
                    found = (closed,)
            if found is None:
                self._jac = self.vjp_fn()(torch.ones_like(self.call.out))[0]
            else:
                self._jac = found[0]
        return self._jac

    def back(self, mine: list[Tensor]) -> list[Tensor]:
        """Columns ``(K, *out.shape)`` at the outputs -> at the active inputs."""
        if self.elementwise:
            return [mine[0] * self.jacobian()]
        if isinstance(self.call.out, Tensor):
            fast = self.rule.fast_vjp(self.call, self.active, mine[0])
            if fast is not None:
                return fast
            return list(vmap(self.vjp_fn())(mine[0]))
        return list(vmap(self.vjp_fn())(tuple(mine)))


class _Plan:
    """Which sites the graph route covers, and the calls it walks."""

    def __init__(
        self,
        calls: list[Call],
        value: Tensor,
        sites: list[Site],
        curved_from: int,
        blocked: set[int] = frozenset(),  # type: ignore[assignment]
    ):
        self.value = value
        site_of = {id(s.call): s for s in sites}
        active: dict[int, Tensor] = {}
        kinds: dict[int, str | None] = {}
        steps: list[_Step] = []
        bad: set[int] = set()
        self.unformed: set[int] = set()  # curved calls whose residual is too large to form
        n = None
        for i, call in enumerate(calls):
            site = site_of.get(id(call))
            seen: dict[int, Tensor] = {}
            for t in call.tensor_inputs():
                if id(t) in active:
                    seen.setdefault(id(t), t)
            ins = list(seen.values())
            if not ins and site is None:
                continue
            if site is not None and n is None:
                z = call.out
                n = z.shape[0] if z.dim() > 0 else None
            step = _Step(i, call, ins, rule_for(call), site)
            kind = self._kind(step, [kinds[id(t)] for t in ins], n)
            if kind is not None and ins and i >= curved_from:
                step.curved = step.rule.is_curved(call, ins)
                if step.curved and not step.rule.residual_ok(call, ins):
                    kind = None
                elif step.curved and not step.rule.columns_fit(call, ins):
                    self.unformed.add(id(call))  # not crossed by columns; tangents do
            if kind is not None and ins:
                step.elementwise = step.rule.is_elementwise(call, ins)
            if kind is None:
                # Not crossed: the parameters upstream are not covered, and for the
                # calls downstream its outputs are constants (a new source).
                bad.add(id(call))
            for o in step.outs:
                active[id(o)] = o
                kinds[id(o)] = kind if kind is not None else self._source(o, n)
            steps.append(step)
        self.n = n
        # the calls on the way to the loss value
        needed = {id(value)} if kinds.get(id(value)) == REDUCED else set()
        walk = []
        for step in reversed(steps):
            if any(id(o) in needed for o in step.outs):
                walk.append(step)
                needed.update(id(t) for t in step.active)
        walk.reverse()
        # everything upstream of a call without an answer is not covered
        tainted: set[int] = set()
        for step in reversed(walk):
            if id(step.call) in blocked:  # not crossed: upstream of it not covered
                tainted.update(id(t) for t in step.active)
            if id(step.call) in bad or any(id(o) in tainted for o in step.outs):
                tainted.update(id(t) for t in step.active)
                tainted.update(id(o) for o in step.outs)
        self.sites = [
            s.site
            for s in walk
            if s.site is not None and id(s.call.out) not in tainted and self._site_ok(s.site, n)
        ]
        covered = {id(s.call.out) for s in self.sites}
        useful: set[int] = set(covered)
        for step in walk:
            step.useful = [t for t in step.active if id(t) in useful and id(t) not in tainted]
            if step.useful:
                useful.update(id(o) for o in step.outs)
        self.walk = walk
        self.covered = covered

    def lazy(self, step: _Step) -> tuple[list[_Step], _Step] | None:
        r"""For a diagonal term at the output of ``F.linear`` (``step``, a constant weight
        :math:`A` applied to the last axis): the elementwise calls (:math:`D`) and the
        covered linear site below them, where the term :math:`(AD)^\top
        \operatorname{diag}(r) (AD)` is read off from its diagonal, else ``None``.

        The term acts on each position (all axes but the last) separately, so at the
        linear (or layer/RMS norm) site below only its diagonal
        :math:`d^2 \odot ((A \odot A)^\top r)` counts (as in BackPACK's ``DiagHessian``
        of an MLP, without its columns).
        """
        call = step.call
        if (
            call.func is not F.linear
            or len(step.useful) != 1
            or not call.args
            or call.args[0] is not step.useful[0]
            or len(step.outs) != 1
        ):
            return None
        weight = call.kwargs.get("weight", call.args[1] if len(call.args) > 1 else None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            return None
        by_out = self._by_out()
        chain: list[_Step] = []
        node = step.useful[0]
        covered = {id(x) for x in self.sites}
        while True:
            below = by_out.get(id(node))
            if below is None:
                return None
            if below.site is not None and id(below.site) in covered:
                if below.site.kind not in _LAZY_SITES or below.call.out is not node:
                    return None
                return chain, below
            if not below.elementwise or len(below.useful) != 1:
                return None
            chain.append(below)
            node = below.useful[0]

    def _lazy_stops(self, step: _Step) -> bool:
        """Whether a diagonal term at ``step``'s output is read off lazily and goes no
        further (the site below reads constants only)."""
        lazy = self.lazy(step)
        return lazy is not None and not lazy[1].useful

    def _by_out(self) -> dict[int, _Step]:
        """The step that made each tensor (a call returning its own input, e.g. eval
        dropout, is the identity and not its maker)."""
        if getattr(self, "_by_out_cache", None) is None:
            self._by_out_cache = {
                id(o): st
                for st in self.walk
                for o in st.outs
                if not any(o is t for t in st.call.tensor_inputs())
            }
        return self._by_out_cache

    def banded(self, step: _Step) -> tuple[list[_Step], _Step] | None:
        """For a diagonal term at the output of a 2-d convolution ``step``: the
        elementwise calls and the convolution site below it, when the term stops
        there (the site reads data only) and its offsets are fewer than the columns it
        saves (:data:`BAND_WORK`), else ``None`` (see :func:`_banded`)."""
        if (
            not _plain_conv2d(step.call)
            or len(step.useful) != 1
            or step.call.args[0] is not (step.useful[0])
        ):
            return None
        call = step.call
        weight = call.kwargs.get("weight", call.args[1] if len(call.args) > 1 else None)
        kh, kw = weight.shape[-2:]
        if BAND_WORK * (2 * kh - 1) * (2 * kw - 1) >= step.call.out[0].numel():
            return None
        by_out = self._by_out()
        chain: list[_Step] = []
        node = step.useful[0]
        while True:
            below = by_out.get(id(node))
            if below is None:
                return None
            if below.site is not None and id(below.site) in {id(x) for x in self.sites}:
                if below.useful or not _plain_conv2d(below.call) or below.site.kind != "conv":
                    return None
                return chain, below
            if not below.elementwise or len(below.useful) != 1:
                return None
            chain.append(below)
            node = below.useful[0]

    def costly(self) -> set[int]:
        """The calls whose columns would cost more than sweeping the parameters upstream:
        an origin of :meth:`origin_costs` above :data:`SMALL_COST` whose cost, times
        :data:`COST_RATIO`, exceeds the sweep's (by ``id`` of its call): those parameters
        take another route."""
        return {
            id(step.call)
            for step, cost, sweep in self.origin_costs()
            if cost > SMALL_COST and COST_RATIO * cost > sweep
        }

    def origin_costs(self) -> list[tuple[_Step, float, float]]:
        """Each origin of columns, its estimated work and the sweep's of the parameters
        upstream of it; empty when no origin can reach :data:`SMALL_COST`.

        Simulates where diagonals and columns arise (as :class:`_Backprop` does) and
        charges each origin its columns times the work of the calls below it, in
        per-slice entries (a call with a weight costs its fan-in per output entry; the
        per-sample squares at a site as much again; a convolution :data:`CONV_WORK` times
        that).  Columns on one position each that reach a junction (:meth:`junctions`)
        through per-position calls only are charged down to it, and below it as at most
        the junction's columns.  A sweep costs about four passes over all calls per
        parameter.
        """
        unit, upto, ups = {}, {}, {}
        total = 0.0
        widest = 0  # the most columns and diagonal entries one call can start
        for step in self.walk:
            size = sum(o[0].numel() if o.dim() > 0 else 1 for o in step.outs)
            unit[step.index] = size * (1 + _fan_in(step))
            if step.useful or step.site is not None:  # columns pass: convolutions dearer
                total += unit[step.index] * (CONV_WORK if step.call.func in _CONVS else 1.0)
            upto[step.index] = total
            if step.useful:
                widest = max(widest, size + (_residual_columns(step) if step.curved else 0))
        if widest * total <= SMALL_COST:  # every origin costs at most widest * total
            return []
        covered = {id(site) for site in self.sites}
        for step in self.walk:
            up = set().union(*(ups.get(id(u), set()) for u in step.useful))
            if step.site is not None and id(step.site) in covered:
                up = up | {id(step.site)}
            for o in step.outs:
                ups[id(o)] = up
        everything = sum(unit.values())
        numel = {id(site): sum(site.bound[r].numel() for r in site.roles) for site in self.sites}

        def sweep(step: _Step) -> float:
            up = set().union(*(ups.get(id(u), set()) for u in step.useful))
            return 4.0 * everything * sum(numel[i] for i in up)

        # Columns living on one position that reach a junction through per-position
        # calls only leave it as at most one column per entry of a position.
        junctions = self.junctions()
        reach: dict[int, int | None] = {}  # id(tensor) -> the junction its columns reach
        for step in self.walk:
            below = {reach.get(id(u)) for u in step.useful}
            through = (
                len(below) == 1
                and step.rule is not None
                and step.rule.per_position(step.call, step.active)
            )
            for o in step.outs:
                if step.index in junctions:
                    reach[id(o)] = step.index
                elif through:
                    reach[id(o)] = next(iter(below))

        def charge(count: int, step: _Step, start: list[Tensor]) -> float:
            ends = {reach.get(id(t)) for t in start}
            j = ends.pop() if len(ends) == 1 else None
            if j is None:
                return count * upto[step.index]
            kept = min(count, junctions[j])
            return count * (upto[step.index] - upto[j]) + kept * upto[j]

        found: list[tuple[_Step, float, float]] = []
        diag: set[int] = set()
        for step in reversed(self.walk):
            if not step.useful:
                continue
            cost = 0.0
            if step.curved:
                columns = _residual_columns(step)
                if step.rule.per_position(step.call, step.active):
                    cost += charge(columns, step, step.useful)
                else:
                    cost += columns * upto[step.index]
                if _has_diagonal(step):
                    diag.update(id(u) for u in step.useful)
            for o in step.outs:
                if id(o) not in diag:
                    continue
                diag.discard(id(o))
                if step.elementwise:
                    diag.add(id(step.active[0]))
                elif self.banded(step) is None and not self._lazy_stops(step):
                    cost += charge(o[0].numel() if o.dim() > 0 else 1, step, [o])
            if cost:
                found.append((step, cost, sweep(step)))
        return found

    def junctions(self) -> dict[int, int]:
        """The tensors where columns of several origins meet (read by two calls or more
        on the way, ``(N, D)`` or ``(N, T, D)``: a residual stream), as the index of the
        call that made each -> its columns per sample after the junction (positions
        times units, see :class:`_Junction`)."""
        readers: dict[int, int] = {}
        made: dict[int, list[int]] = {}  # id(tensor) -> the steps returning it
        for step in self.walk:
            for t in step.useful:
                readers[id(t)] = readers.get(id(t), 0) + 1
            for o in step.outs:
                made.setdefault(id(o), []).append(step.index)
        # A junction must see every column of an origin whole: no call below it may read
        # a tensor made above it (a path around it), and it is nobody's alias (eval
        # dropout returns its input).
        oldest_after: dict[int, float] = {}
        oldest = math.inf
        for step in reversed(self.walk):
            oldest_after[step.index] = oldest
            for t in step.useful:
                oldest = min(oldest, made.get(id(t), [math.inf])[0])
        found = {}
        for step in self.walk:
            outs = step.outs
            if (
                len(outs) == 1
                and readers.get(id(outs[0]), 0) > 1
                and outs[0].dim() in (2, 3)
                and made[id(outs[0])] == [step.index]
                and oldest_after[step.index] >= step.index
            ):
                found[step.index] = outs[0][0].numel()
        return found

    @staticmethod
    def _source(t: Tensor, n: int | None) -> str | None:
        return BATCHED if n is not None and t.dim() > 0 and t.shape[0] == n else None

    @staticmethod
    def _kind(step: _Step, kinds: list[str | None], n: int | None) -> str | None:
        call = step.call
        if n is None or any(k is None for k in kinds):
            return None
        if not step.active:  # a site reading constants only
            z = call.out
            ok = isinstance(z, Tensor) and z.dim() > 0 and z.shape[0] == n
            return BATCHED if ok else None
        if step.rule is None:
            return None
        return step.rule.samples(call, step.active, kinds, n)

    @staticmethod
    def _site_ok(site: Site, n: int) -> bool:
        x = site.bound["input"]
        z = site.call.out
        return z.dim() > 0 and z.shape[0] == n and x.dim() > 0 and x.shape[0] == n


#: Site kinds that read a lazy term by its diagonal (:meth:`_Plan.lazy`).
_LAZY_SITES = ("linear", "layer_norm", "rms_norm")

#: The route is declined where this many times its estimated work exceeds the sweep's.
#: Measured (``benchmarks/bench_diagonal_routes.py``; 2 threads, float64, graph route
#: forced against the sweep, with
#: :data:`CONV_WORK`): a 2-block tanh ResNet (width 8, 16x16, batch 16), estimated 0.92x
#: the sweep's work, ran 12.0 s against the sweep's 13.4 s and the tangent route's 2.7 s
#: (declined: the tangent route takes its convolutions); 1-layer transformers (d 32, 4
#: heads) estimated 32-64x, 4-8x and 1-2x below the sweep at 16, 64 and 128 tokens
#: (batch 8, 4, 2) ran 12.6x, 3.5x and 2.9x faster than it (taken; beyond
#: RESIDUAL_ENTRIES, the attention by tangents).  The estimate is against the sweep,
#: not the tangent route: where the graph route is taken, it was also the faster of
#: the two in every case measured (transformer, 16 tokens: 2.4 s against 10.1 s).
COST_RATIO = 1.0
#: How much more a convolution's multiply-add costs on columns (its input-gradient and
#: the per-sample squares from unfolded patches, in chunks of columns) than in the sweep's
#: vectorised products, per the estimate's unit.  Measured (2 threads, float64, 16x16
#: images of 8 channels): the columns pass 0.6 ms per column and convolution and 0.5 ms
#: per column and site, about 4x the estimate's share against the sweep's.
CONV_WORK = 4.0
#: The banded read of a diagonal term between two convolutions costs about this many
#: columns per kernel offset (each offset a convolution and a product of patches, with
#: its own overhead): it is taken where that is below the term's columns, one per entry
#: of a sample.  Measured (2 threads, float64, tanh CNNs): 4 channels of 4x4 after a
#: 3x3 kernel (64 columns, 25 offsets) 15 ms banded against 12 ms in columns; 8
#: channels of 8x8 (512 columns) 49 ms against 525 ms.
BAND_WORK = 4.0
#: Below this estimate (per-slice entries times fan-in) the route is always taken: small
#: problems cost little either way, and the graph route's few vectorised calls win.
SMALL_COST = 1e8


_CONVS = _WEIGHTED - {F.linear}


def _fan_in(step: _Step) -> int:
    """Multiply-adds per output entry of a call with a weight (1 for other calls)."""
    call = step.call
    w = call.kwargs.get("weight", call.args[1] if len(call.args) > 1 else None)
    if call.func in _WEIGHTED and isinstance(w, Tensor) and w.dim() > 1:
        return w[0].numel()
    return 1


def _residual_columns(step: _Step) -> int:
    """Columns a curved call's residual starts (an estimate; diagonals not counted)."""
    rule, call = step.rule, step.call
    if isinstance(rule, Activation) or _diag_loss(step):
        return 0
    if isinstance(rule, Softmax):
        x = step.active[0]
        return 2 * x[0].numel() // max(1, x.shape[rule._dim(call)])
    if isinstance(rule, Norm) and (found := rule._row_norm(call, step.active)) is not None:
        return 4 * step.active[0][0].numel() // found[0]  # four per normalised row
    return sum(a[0].numel() if a.dim() > 0 else 1 for a in step.active)


def _has_diagonal(step: _Step) -> bool:
    """Whether a curved call's residual has a diagonal part (activations, softmax, the
    layer/RMS norms' closed form, the squared error)."""
    rule = step.rule
    if isinstance(rule, (Activation, Softmax)) or _diag_loss(step):
        return True
    return isinstance(rule, Norm) and rule._row_norm(step.call, step.active) is not None


def _diag_loss(step: _Step) -> bool:
    return step.call.func is F.mse_loss


def graph_diagonal(
    calls: list[Call],
    value: Tensor,
    sites: list[Site],
    curved_from: int = 0,
    compute: bool = True,
    budget: int | None = None,
    max_columns: int | None = None,
    progress: bool = False,
) -> dict[int, tuple[str, Tensor | None]]:
    """Routes and diagonals (leaf index -> ``(route, tensor)``) of the parameters the
    graph route covers (``"graph"``), and of those whose columns it declines as too
    costly, by the tangent route (``"tangent"``, :mod:`torch_secorder.func._tangents`).

    ``sites``: the affine sites of once-read parameters; ``curved_from``: the
    first call whose second derivatives count (``0`` for the Hessian, the first
    call of the loss for the GGN); ``compute=False`` only plans (tensors
    ``None``); ``budget``: column entries at one tensor (default: the chunk policy
    of ``value``'s device, read once here).
    """
    full = plan = _Plan(calls, value, sites, curved_from)
    blocked: set[int] = set(full.unformed)  # residuals too large to form as columns
    while True:  # and the origins whose columns would cost more than sweeping
        if blocked:
            plan = _Plan(calls, value, sites, curved_from, blocked)
        more = plan.costly() - blocked if plan.sites else set()
        if not more:
            break
        blocked |= more
    graphed = {id(s) for s in plan.sites}
    forward = [s for s in full.sites if id(s) not in graphed]
    routes = [("graph", s) for s in plan.sites] + [("tangent", s) for s in forward]
    if not compute:
        return {i: (route, None) for route, s in routes for i in s.roles.values()}
    if budget is None:
        budget = chunk_entries(value.device)
    with torch.no_grad():
        acc = _Backprop(plan, budget, max_columns).run() if plan.sites else {}
        try:
            acc.update(tangent_diagonal(full.walk, value, forward, budget, progress))
        except (RuntimeError, NotImplementedError, TypeError):
            # a second directional derivative that torch.func cannot take: the
            # caller's next routes (the sweep) answer for these parameters
            routes = [(route, s) for route, s in routes if route == "graph"]
    out: dict[int, tuple[str, Tensor | None]] = {}
    for route, site in routes:
        for role, i in site.roles.items():
            out[i] = (route, acc[(id(site), role)].reshape(site.bound[role].shape))
    return out


class _Backprop:
    def __init__(self, plan: _Plan, budget: int, max_columns: int | None):
        self.plan = plan
        self.budget = budget
        self.max_columns = max_columns
        self.acc: dict[tuple[int, str], Tensor] = {}
        self.rows: dict[int, tuple[Site, Tensor]] = {}
        self.site_of = {id(s.call): s for s in plan.sites}

    def _add(self, site: Site, found: dict[str, Tensor]) -> None:
        for role, v in found.items():
            key = (id(site), role)
            v = v.reshape(site.bound[role].shape)
            self.acc[key] = v if key not in self.acc else self.acc[key] + v

    def run(self) -> dict[tuple[int, str], Tensor]:
        plan = self.plan
        for site in plan.sites:
            self._add(site, {r: torch.zeros_like(site.bound[r]) for r in site.roles})
        g: dict[int, Tensor] = {id(plan.value): torch.ones_like(plan.value)}
        diag: dict[int, Tensor] = {}
        origins: list[tuple] = []
        floor = min((s.index for s in plan.walk if s.curved and s.useful), default=math.inf)
        for step in reversed(plan.walk):
            outs = step.outs
            g_outs = [g.pop(id(o), None) for o in outs]
            if all(x is None for x in g_outs) and not any(id(o) in diag for o in outs):
                continue
            g_outs = [torch.zeros_like(o) if x is None else x for o, x in zip(outs, g_outs)]
            site = self.site_of.get(id(step.call))
            z = step.call.out
            if site is not None and id(z) in diag:
                self._add_rows(site, diag[id(z)])
            if not step.useful:
                for o in outs:
                    diag.pop(id(o), None)
                continue
            cot = g_outs[0] if isinstance(step.call.out, Tensor) else tuple(g_outs)
            if step.index > floor:  # gradients are needed further down
                ins_g = step.back([x[None] for x in g_outs])
                for t, gi in zip(step.active, ins_g):
                    if self._is_useful(step, id(t)):
                        gi = gi[0]
                        g[id(t)] = gi if id(t) not in g else g[id(t)] + gi
            if step.curved:
                res = step.rule.residual(step.call, step.active, cot)
                for key, d in res.diag.items():
                    if any(id(u) == key for u in step.useful):
                        diag[key] = d if key not in diag else diag[key] + d
                if res.columns and any(self._is_useful(step, k) for k in res.columns):
                    # formed again when walked: one origin's columns in memory at a time
                    origins.append((step.index, False, (step, cot), None))
                del res
            for o in outs:
                d = diag.pop(id(o), None)
                if d is None:
                    continue
                if step.elementwise:
                    (a,) = step.active
                    jac = step.jacobian()
                    d = d * jac * jac
                    diag[id(a)] = d if id(a) not in diag else diag[id(a)] + d
                elif self.plan.banded(step) is not None:
                    self._add(*_banded(self.plan, step, d))
                elif (lazy := self.plan.lazy(step)) is not None:
                    chain, below = lazy
                    self._add_rows(below.site, _lazy_read(step, chain, d))
                    if below.useful:  # on below it: columns, the site read done
                        origins.append((step.index, True, o, d, below.index))
                else:
                    origins.append((step.index, True, o, d, None))
        self.junctions = self._junctions()
        # Origins in order of their start, latest call first (as found); a junction is
        # walked on once every origin starting at or after its maker has deposited.
        position = 0
        while True:
            ready = [j for j in self.junctions.values() if j.count]
            junction = max(ready, key=lambda j: j.index, default=None)
            if position < len(origins) and (
                junction is None or origins[position][0] >= junction.index
            ):
                start, inclusive, cols, sign, *skip = origins[position]
                origins[position] = None  # released once walked
                position += 1
                if inclusive:
                    self._walk_diag(start, cols, sign, skip[0])
                else:
                    step, cot = cols
                    res = step.rule.residual(step.call, step.active, cot)
                    cols = {k: c for k, c in res.columns.items() if self._is_useful(step, k)}
                    self._walk(start, False, cols, res.sign)
                    del res, cols
            elif junction is not None:
                del self.junctions[id(junction.tensor)]
                cols, sign = junction.columns()
                self._walk(junction.index, True, {id(junction.tensor): cols}, sign, own=True)
            else:
                break
        for site, h in self.rows.values():
            self._add(site, site.diag_at_output(h))
        return self.acc

    def _add_rows(self, site: Site, h: Tensor) -> None:
        """Add to the diagonal of the site's output Hessian, read off once at the end
        (:meth:`~torch_secorder.func._sites.Site.diag_rows` is linear in it)."""
        key = id(site)
        if key in self.rows:
            h = self.rows[key][1] + h
        self.rows[key] = (site, h)

    @staticmethod
    def _is_useful(step: _Step, key: int) -> bool:
        return any(id(u) == key for u in step.useful)

    def _largest(self) -> int:
        """Entries of the largest tensor a walk carries columns at."""
        return max(
            (o.numel() for s in self.plan.walk if s.useful for o in [*s.outs, *s.useful]),
            default=1,
        )

    def _chunk(self) -> int:
        chunk = max(1, self.budget // max(self._largest(), 1))
        return chunk if self.max_columns is None else min(chunk, self.max_columns)

    def _walk_diag(self, start: int, node: Tensor, d: Tensor, skip: int | None = None) -> None:
        """Columns :math:`\\sqrt{|d_i|} e_i` (one per entry of a slice) from ``node`` down
        (``skip``: a step whose site read was done otherwise)."""
        n = node.shape[0]
        per = node[0].numel()
        flat = d.reshape(n, per)
        chunk = self._chunk()
        for lo in range(0, per, chunk):
            hi = min(per, lo + chunk)
            k = hi - lo
            cols = node.new_zeros(k, n, per)
            idx = torch.arange(k, device=node.device)
            cols[idx, :, lo + idx] = flat[:, lo:hi].abs().sqrt().T
            sign = torch.sign(flat[:, lo:hi]).T
            self._walk(start, True, {id(node): cols.reshape(k, *node.shape)}, sign, skip)

    def _junctions(self) -> dict[int, _Junction]:
        """A :class:`_Junction` at each of :meth:`_Plan.junctions`, by ``id`` of its tensor."""
        at = self.plan.junctions()
        found = {}
        for step in self.plan.walk:
            if step.index in at:
                found[id(step.outs[0])] = _Junction(step.outs[0], step.index, self.budget)
        return found

    def _walk(
        self,
        start: int,
        inclusive: bool,
        cols: dict[int, Tensor],
        sign: Tensor,
        skip: int | None = None,
        own: bool = False,
    ) -> None:
        """Columns from the calls at or before ``start`` down to the sites.

        ``own``: the columns are a junction's, at the output of ``start``, whose site (if
        any) reads them; otherwise the columns at ``start``'s outputs were read there.
        """
        k = sign.shape[0]
        chunk = self._chunk()
        if k > chunk:
            for lo in range(0, k, chunk):
                part = {key: c[lo : lo + chunk] for key, c in cols.items()}
                self._walk(start, inclusive, part, sign[lo : lo + chunk], skip, own)
            return
        cols = dict(cols)
        for step in reversed(self.plan.walk):
            if step.index > start or (step.index == start and not inclusive):
                continue
            outs = step.outs
            mine = [cols.pop(id(o), None) for o in outs]
            if all(c is None for c in mine):
                continue
            at_start = step.index == start and inclusive
            site = self.site_of.get(id(step.call))
            # Columns that start at a site's output were read there already (a diagonal
            # term, read by its rows): they may not join a junction whose columns the
            # site reads when they leave it.
            read = step.index == skip or (at_start and not own and site is not None)
            junction = self.junctions.get(id(outs[0])) if len(outs) == 1 else None
            if (
                junction is not None
                and not (at_start and own)
                and not read
                and junction.take(mine[0], sign)
            ):
                continue
            if site is not None and (own or not at_start) and step.index != skip:
                self._add(site, self._site_columns(site, mine[0], sign))
            if not step.useful:
                continue
            mine = [torch.zeros(k, *o.shape, dtype=o.dtype, device=o.device) if c is None else c
                    for o, c in zip(outs, mine)]  # fmt: skip
            for t, c in zip(step.active, step.back(mine)):
                if self._is_useful(step, id(t)):
                    cols[id(t)] = c if id(t) not in cols else cols[id(t)] + c

    def _site_columns(self, site: Site, s: Tensor, sign: Tensor) -> dict[str, Tensor]:
        r""":math:`\sum_{k,n} s_{kn} (\partial_\theta \langle S_{kn}, z_n\rangle)^2` per role."""
        x = site.bound["input"]
        if site.kind == "linear" and x.dim() == 2:
            self._add_rows(site, _signed(s * s, sign))
            return {}
        if site.kind in _LAZY_SITES and _one_position_each(s, _units(site)):
            # each column lives on one position: its per-sample square is the square
            # of that position's entries, a diagonal read like the rows route's
            self._add_rows(site, _signed(s * s, sign))
            return {}
        if site.kind == "linear":
            return _linear_squares(site, s, sign, self.budget)
        if site.kind in ("layer_norm", "rms_norm"):
            return _norm_squares(site, s, sign)
        if site.kind in ("batch_norm", "group_norm"):
            return _channel_squares(site, s, sign)
        if site.kind == "embedding" and site.bound["padding_idx"] is None:
            return _embedding_squares(site, s, sign, self.budget)
        if site.kind == "conv" and site.call.func in (F.conv1d, F.conv2d):
            found = _conv_squares(site, s, sign, self.budget)
            if found is not None:
                return found
        return _per_sample_squares(site, s, sign, self.budget)


class _Junction:
    r"""Columns met at a tensor read twice, summed per position into blocks.

    Every column arriving here that lives on one position of one sample (a
    per-position residual, such as a transformer's layer norms and MLP activations,
    crossing per-position calls) is summed into that position's ``D x D`` block
    :math:`B_{np} = \sum_k s_{kn} S_{knp} S_{knp}^\top`; other columns walk on.  When
    every origin downstream has arrived, the blocks leave as their eigenvectors,
    :math:`\sqrt{|\lambda|}\,v` with the sign of :math:`\lambda`: at most ``D``
    columns per position whatever the number that arrived (the columns themselves
    when they were fewer).
    """

    def __init__(self, tensor: Tensor, index: int, budget: int):
        self.tensor = tensor
        self.index = index  # the call that made it
        self.budget = budget
        n = tensor.shape[0]
        self.units = tensor.shape[-1]
        self.positions = tensor[0].numel() // self.units
        self.shape = (n, self.positions, self.units)
        self.count = 0
        self.parts: list[tuple[Tensor, Tensor]] = []
        self.blocks: Tensor | None = None

    def take(self, cols: Tensor, sign: Tensor) -> bool:
        """Keep ``cols`` (``(K, *tensor.shape)``) if each lives on one position."""
        if not _one_position_each(cols, self.units):
            return False
        few = self.count + cols.shape[0] <= self.positions * self.units
        kept = (self.count + cols.shape[0]) * self.tensor.numel()
        if self.blocks is None and few and kept <= self.budget:
            self.count += cols.shape[0]
            self.parts.append((cols, sign))
            return True
        if self.blocks is None and not self._blocks_fit():
            return False  # these walk on as they are; the kept ones leave unchanged
        self.count += cols.shape[0]
        if self.blocks is None:
            n, p, u = self.shape
            self.blocks = cols.new_zeros(n * p, u, u)
            for part in self.parts:
                self._fold(*part)
            self.parts = []
        self._fold(cols, sign)
        return True

    def _blocks_fit(self) -> bool:
        """The blocks within the walk's budget and their eigen-columns, formed at once,
        within :data:`~torch_secorder.func._rules.RESIDUAL_ENTRIES`."""
        n, p, u = self.shape
        return n * p * u * u <= self.budget and p * u * self.tensor.numel() <= RESIDUAL_ENTRIES

    def _fold(self, cols: Tensor, sign: Tensor) -> None:
        n, p, u = self.shape
        k = cols.shape[0]
        flat = cols.reshape(k, n, p, u)
        where = (flat != 0).any(-1).to(torch.int8).argmax(-1)  # (K, N): each one's position
        rows = flat.gather(2, where[..., None, None].expand(k, n, 1, u)).squeeze(2)  # (K, N, u)
        index = (torch.arange(n, device=cols.device) * p)[None, :] + where
        step = max(1, self.budget // max(1, n * u * u))
        for lo in range(0, k, step):
            r, s = rows[lo : lo + step], sign[lo : lo + step]
            outer = (r * s[..., None])[..., :, None] * r[..., None, :]
            self.blocks.index_add_(0, index[lo : lo + step].reshape(-1), outer.reshape(-1, u, u))

    def columns(self) -> tuple[Tensor, Tensor]:
        """``(K, *tensor.shape)`` columns and their ``(K, N)`` signs."""
        if self.blocks is None:
            return torch.cat([c for c, _ in self.parts]), torch.cat([s for _, s in self.parts])
        n, p, u = self.shape
        lam, vec = torch.linalg.eigh(self.blocks.reshape(n, p, u, u))  # (N, P, u), (N, P, u, u)
        scaled = vec * lam.abs().sqrt()[..., None, :]  # column j: sqrt|lam_j| v_j
        cols = lam.new_zeros(p, u, n, p, u)
        at = torch.arange(p, device=lam.device)
        cols[at, :, :, at, :] = scaled.permute(1, 3, 0, 2)  # (P, j, N, u) on its position
        sign = torch.sign(lam).permute(1, 2, 0).reshape(p * u, n)
        keep = (lam.abs().amax(0).reshape(p * u) > 0).nonzero().flatten()  # (P, j) order
        cols = cols.reshape(p * u, *self.tensor.shape)
        return cols[keep], sign[keep]


def _signed(values: Tensor, sign: Tensor) -> Tensor:
    """:math:`\\sum_k s_{kn} v_{kn\\ldots}`: ``values`` ``(K, N, ...)``, ``sign`` ``(K, N)``."""
    return (values * sign.reshape(*sign.shape, *([1] * (values.dim() - 2)))).sum(0)


def _plain_conv2d(call: Call) -> bool:
    """An ungrouped ``F.conv2d`` with numeric padding (the banded shortcut's case)."""
    if call.func is not F.conv2d or len(call.args) + len(call.kwargs) > 7:
        return False
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = dict(zip(names, call.args))
    bound.update(call.kwargs)
    pad = bound.get("padding", 0)
    return bound.get("groups", 1) == 1 and not isinstance(pad, str)


def _conv_args(call: Call) -> dict:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    bound.update(zip(names, call.args))
    bound.update(call.kwargs)
    for key in ("stride", "padding", "dilation"):
        v = bound[key]
        bound[key] = (v, v) if isinstance(v, int) else tuple(v)
    return bound


def _shift(t: Tensor, dy: int, dx: int) -> Tensor:
    """``t[..., i + dy, j + dx]`` (zero outside)."""
    out = torch.zeros_like(t)
    h, w = t.shape[-2:]
    ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
    xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
    out[..., yd, xd] = t[..., ys, xs]
    return out


def _banded(plan: _Plan, step: _Step, r: Tensor) -> tuple[Site, dict[str, Tensor]]:
    r"""A diagonal term :math:`\operatorname{diag}(r)` at ``z2 = conv2(a)`` read off at the
    convolution site ``z1 = conv1(x)`` below (``a`` elementwise in ``z1``), without columns.

    At ``z1`` the term is :math:`D A^\top \operatorname{diag}(r) A D` (``A`` the second
    convolution, ``D`` the elementwise derivatives); a weight of ``conv1`` feeds one
    channel ``o`` of ``z1``, and within a channel the term is banded: positions ``p``,
    ``p + \Delta`` with :math:`\Delta` a difference of two kernel offsets.  Its band
    :math:`B_\Delta[o, p] = d_p d_{p+\Delta} \sum_{o_2, q} r_{o_2 q} W_2[o_2, o, \delta]
    W_2[o_2, o, \delta + \Delta]` is the input gradient of ``conv2`` with the kernel
    :math:`W_2[\delta] W_2[\delta+\Delta]`, and the weight diagonal is
    :math:`\sum_\Delta \sum_{n,p} B_\Delta[o, p]\, X[j, p]\, X[j, p + \Delta]` with ``X``
    the input patches of ``conv1``.  Cost: one convolution per offset, no columns.
    """
    chain, below = plan.banded(step)
    site = below.site
    c2 = _conv_args(step.call)
    a = c2["input"]
    w2 = c2["weight"]
    d = torch.ones_like(a)
    for st in chain:  # from a down to z1
        d = d * st.jacobian()
    c1 = _conv_args(below.call)
    x, w1 = c1["input"], c1["weight"]
    kh, kw = w2.shape[-2:]
    dil = c2["dilation"]
    patches = unfold(x, tuple(w1.shape[-2:]), c1["dilation"], c1["padding"], c1["stride"])
    n, j, _ = patches.shape
    grid = a.shape[-2:]
    patches = patches.reshape(n, j, *grid)
    weight = torch.zeros(w1.shape[0], j, dtype=r.dtype, device=r.device)
    bias = torch.zeros(w1.shape[0], dtype=r.dtype, device=r.device)
    for ey in range(-(kh - 1), kh):
        for ex in range(-(kw - 1), kw):
            shifted = torch.zeros_like(w2)
            ys, yd = slice(max(ey, 0), kh + min(ey, 0)), slice(max(-ey, 0), kh + min(-ey, 0))
            xs, xd = slice(max(ex, 0), kw + min(ex, 0)), slice(max(-ex, 0), kw + min(-ex, 0))
            shifted[..., yd, xd] = w2[..., ys, xs]  # W2[delta + Delta] at delta
            kernel = w2 * shifted
            t = torch.nn.grad.conv2d_input(a.shape, kernel, r, c2["stride"], c2["padding"], dil, 1)
            dy, dx = ey * dil[0], ex * dil[1]
            band = d * _shift(d, dy, dx) * t  # (N, O1, H, W)
            weight = weight + torch.einsum("nohw,njhw->oj", band, patches * _shift(patches, dy, dx))
            bias = bias + band.sum((0, 2, 3))
    found = {}
    if "weight" in site.roles:
        found["weight"] = weight
    if "bias" in site.roles:
        found["bias"] = bias
    return site, found


def _lazy_read(step: _Step, chain: list[_Step], r: Tensor) -> Tensor:
    r"""The diagonal :math:`d^2 \odot ((A \odot A)^\top r)` of :math:`(AD)^\top
    \operatorname{diag}(r) (AD)` (``A`` the weight of ``step``, ``D`` the Jacobians of
    ``chain``) at the site's output below (see :meth:`_Plan.lazy`)."""
    call = step.call
    weight = call.kwargs.get("weight", call.args[1] if len(call.args) > 1 else None)
    h = r @ (weight * weight)
    for st in chain:
        jac = st.jacobian()
        h = h * jac * jac
    return h


def _units(site: Site) -> int:
    """Entries per position of a linear/layer-norm site's output (its unit axes)."""
    return math.prod(site.shape[d] for d in site.unit_axes)


def _one_position_each(s: Tensor, units: int) -> bool:
    """Whether every column ``s[k, n]`` is zero outside one position (the entries of
    ``s[k, n]`` that are not units; e.g. columns from a per-position residual)."""
    k, n = s.shape[:2]
    if s[0, 0].numel() == units:
        return True
    for probe in (s[:1], s[-1:]):  # a quick no first: the whole check reads every column
        if bool(((probe.reshape(1, n, -1, units) != 0).any(-1).sum(-1) > 1).any()):
            return False
    spread = (s.reshape(k, n, -1, units) != 0).any(-1).sum(-1)
    return bool((spread <= 1).all())


def _linear_squares(site: Site, s: Tensor, sign: Tensor, budget: int) -> dict[str, Tensor]:
    r"""Per-sample squares of a linear layer on ``(N, ..., D)``: positions summed first.

    With few positions (``T <= D``) and room for ``N * O * T**2`` entries, the
    columns are first summed into each unit's position block
    :math:`M_{no} = \sum_k s_{kn} S_{kno} S_{kno}^\top` (``T x T``, one product over
    the columns), and the weight diagonal is :math:`\sum_n x_{n\cdot j}^\top M_{no}
    x_{n\cdot j}`: ``K N O T^2`` multiply-adds in large products instead of ``K N O T D``
    in small ones.
    """
    x = site.bound["input"]
    n, k = x.shape[0], s.shape[0]
    xr = x.reshape(n, -1, x.shape[-1])  # (N, T, D)
    sr = s.reshape(k, n, xr.shape[1], -1)  # (K, N, T, O)
    t, o, d = sr.shape[2], sr.shape[3], xr.shape[-1]
    if 1 < t <= d and n * o * t * t <= budget:
        return _linear_blocks(site, sr, xr, sign)
    out: dict[str, Tensor] = {}
    if "weight" in site.roles:
        chunk = max(1, budget // max(1, n * sr.shape[-1] * xr.shape[-1]))
        total = x.new_zeros(sr.shape[-1], xr.shape[-1])
        for lo in range(0, k, chunk):
            per = sr[lo : lo + chunk].transpose(-1, -2) @ xr  # (k, N, O, D)
            w = sign[lo : lo + chunk].reshape(*per.shape[:2], 1, 1)
            total = total + (per * per * w).sum((0, 1))
        out["weight"] = total
    if "bias" in site.roles:
        b = sr.sum(2)
        out["bias"] = _signed(b * b, sign).sum(0)
    return out


def _linear_blocks(site: Site, sr: Tensor, xr: Tensor, sign: Tensor) -> dict[str, Tensor]:
    """:func:`_linear_squares` through each unit's ``T x T`` block of the columns."""
    k, n, t, o = sr.shape
    blocks = sr.new_zeros(n, o, t, t)
    # Columns that live on a few units (one attention head's) only: the units they
    # touch, grouped by pattern, each group's blocks from those units alone.
    touched = (sr != 0).any(2).any(1)  # (K, O)
    patterns, group = torch.unique(touched, dim=0, return_inverse=True)
    for g in range(patterns.shape[0]):
        units = patterns[g].nonzero().flatten()
        if units.numel() == 0:
            continue
        members = (group == g).nonzero().flatten()
        part = sr if members.numel() == k else sr[members]
        if units.numel() < o:
            part = part[..., units]
        cols = part.permute(1, 3, 2, 0)  # (N, U, T, k)
        weighted = cols * sign[members].T.reshape(n, 1, 1, -1)
        found = weighted @ cols.transpose(-1, -2)  # (N, U, T, T)
        if units.numel() < o:
            blocks[:, units] += found
        else:
            blocks += found
    out: dict[str, Tensor] = {}
    if "weight" in site.roles:
        mixed = blocks @ xr[:, None]  # (N, O, T, D)
        out["weight"] = (mixed * xr[:, None]).sum((0, 2))
    if "bias" in site.roles:
        out["bias"] = blocks.sum((0, 2, 3))
    return out


def _affine_squares(site: Site, sr: Tensor, xr: Tensor, sign: Tensor) -> dict[str, Tensor]:
    """Per-sample squares of an affine ``xhat * w + b`` with one weight per unit.

    ``sr``: the columns at the output, ``(k, n, positions, units)``; ``xr``: the
    normalised input, ``(1, n, positions, units)``; each sample's gradient is summed
    over its positions before squaring.
    """
    out: dict[str, Tensor] = {}
    if "weight" in site.roles:
        per = (sr * xr).sum(2)
        out["weight"] = _signed(per * per, sign).sum(0)
    if "bias" in site.roles:
        per = sr.sum(2)
        out["bias"] = _signed(per * per, sign).sum(0)
    return out


def _norm_squares(site: Site, s: Tensor, sign: Tensor) -> dict[str, Tensor]:
    """Per-sample squares of a layer/RMS norm's affine part ``xhat * w + b``."""
    xhat = site._xhat()
    k, n = s.shape[0], xhat.shape[0]
    units = (
        math.prod(site.bound["normalized_shape"])
        if not isinstance(site.bound["normalized_shape"], int)
        else site.bound["normalized_shape"]
    )
    return _affine_squares(site, s.reshape(k, n, -1, units), xhat.reshape(1, n, -1, units), sign)


def _channel_squares(site: Site, s: Tensor, sign: Tensor) -> dict[str, Tensor]:
    """Per-sample squares of a batch/group norm's affine part (one weight per channel)."""
    xhat = site._xhat()
    k, n, c = s.shape[0], xhat.shape[0], xhat.shape[1]
    return _affine_squares(
        site,
        s.reshape(k, n, c, -1).transpose(2, 3),
        xhat.reshape(1, n, c, -1).transpose(2, 3),
        sign,
    )


def _embedding_squares(site: Site, s: Tensor, sign: Tensor, budget: int) -> dict[str, Tensor]:
    """Per-sample squares of an embedding table: the rows a sample reads, summed."""
    idx, w = site.bound["input"], site.bound["weight"]
    n, k = idx.shape[0], s.shape[0]
    flat = idx.reshape(n, -1)
    t = flat.shape[1]
    same = (flat[:, :, None] == flat[:, None, :]).to(s.dtype)  # (N, T, T): same token
    sr = s.reshape(k, n, t, -1)  # (K, N, T, E)
    # sum over tokens v of (sum_{t: idx = v} S_t)^2 = sum_t S_t * (sum_{t' ~ t} S_t'),
    # gathered back into row idx_t of the table
    rows = _signed(sr * (same @ sr), sign)  # (N, T, E)
    total = torch.zeros_like(w)
    total.index_add_(0, flat.reshape(-1), rows.reshape(n * t, -1))
    return {"weight": total}


def _conv_squares(site: Site, s: Tensor, sign: Tensor, budget: int) -> dict[str, Tensor] | None:
    """:func:`_per_sample_squares` of a 1-d/2-d convolution from its input patches.

    Per-sample weight gradients ``(K, N, groups, C_out/g, C_in/g kh kw)`` as one
    product of the columns with the patches (:func:`~torch_secorder.func._patches.unfold`),
    in chunks of columns.
    """
    b = site.bound
    x, w = b["input"], b["weight"]
    pad = b["padding"]
    if isinstance(pad, str):
        if pad != "valid":
            return None
        pad = 0
    one = site.call.func is F.conv1d

    def pair(v, fill):
        v = (v,) if isinstance(v, int) else tuple(v)
        return (fill, *v) if one else (v * 2 if len(v) == 1 else v)

    if one:
        x, w = x.unsqueeze(2), w.unsqueeze(2)
    stride, dilation, padding = pair(b["stride"], 1), pair(b["dilation"], 1), pair(pad, 0)
    groups = b["groups"]
    n, k = x.shape[0], s.shape[0]
    c_out = w.shape[0]
    patches = unfold(x, tuple(w.shape[2:]), dilation, padding, stride)  # (N, C_in kk, L)
    patches = patches.reshape(n, groups, -1, patches.shape[-1])  # (N, G, J, L)
    cols = s.reshape(k, n, groups, c_out // groups, -1)  # (K, N, G, O, L)
    out: dict[str, Tensor] = {}
    numel = c_out * patches.shape[2]
    chunk = max(1, budget // max(1, n * numel))
    if "weight" in site.roles:
        total = x.new_zeros(groups, c_out // groups, patches.shape[2])
        for lo in range(0, k, chunk):
            per = torch.einsum("kngol,ngjl->kngoj", cols[lo : lo + chunk], patches)
            total = total + _signed(per * per, sign[lo : lo + chunk]).sum(0)
        out["weight"] = total.reshape(b["weight"].shape)
    if "bias" in site.roles:
        sums = s.reshape(k, n, c_out, -1).sum(-1)
        out["bias"] = _signed(sums * sums, sign).sum(0)
    return out


def _per_sample_squares(site: Site, s: Tensor, sign: Tensor, budget: int) -> dict[str, Tensor]:
    """Signed sums of squared per-sample parameter gradients of the columns ``s``."""
    roles = list(site.roles)
    params = tuple(site.bound[r] for r in roles)
    call, x = site.call, site.bound["input"]
    n, k = x.shape[0], s.shape[0]
    numel = sum(p.numel() for p in params)
    chunk = max(1, budget // max(1, n * numel))

    def swap(obj, ps):
        if isinstance(obj, Tensor):
            for r, p in zip(roles, ps):
                if obj is site.bound[r]:
                    return p
            return obj
        if isinstance(obj, (list, tuple)):
            return type(obj)(swap(o, ps) for o in obj)
        return obj

    def one(s_n: Tensor, x_n: Tensor) -> tuple[Tensor, ...]:
        def f(*ps: Tensor) -> Tensor:
            args = list(swap(call.args, ps))
            kwargs = {key: swap(v, ps) for key, v in call.kwargs.items()}
            if args and args[0] is x:
                args[0] = x_n[None]
            else:
                kwargs["input"] = x_n[None]
            return call.func(*args, **kwargs)

        return vjp(f, *params)[1](s_n[None])

    batched = vmap(vmap(one, in_dims=(0, None)), in_dims=(1, 0))
    totals = [torch.zeros_like(p) for p in params]
    for lo in range(0, k, chunk):
        grads = batched(s[lo : lo + chunk], x)  # each (N, k, *p.shape)
        w = sign[lo : lo + chunk].T  # (N, k)
        for j, gr in enumerate(grads):
            totals[j] = totals[j] + torch.einsum("nk...,nk->...", gr * gr, w)
    return dict(zip(roles, totals))
