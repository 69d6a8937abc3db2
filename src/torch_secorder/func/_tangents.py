r"""The tangent route: each parameter entry's curvature by one forward tangent.

Along a parameter entry :math:`\theta_j` the diagonal entry is the second derivative
:math:`\partial^2 L/\partial\theta_j^2`.  With the first derivative :math:`t = \partial
\cdot/\partial\theta_j` carried forward through the recorded calls (a tangent of every
tensor downstream of the entry's site), the chain rule gives

.. math::
    \frac{\partial^2 L}{\partial\theta_j^2} = \sum_{\text{curved calls } c}
    t_{\text{in}(c)}^\top \Big(\sum_i g_{c,i} \nabla^2 \text{out}_{c,i}\Big)
    t_{\text{in}(c)},

the residual term of every curved call (its rule's diagonal and signed columns, with
``g`` its output's gradient from one backward pass; the loss is such a call, its
residual the loss Hessian) read as a quadratic form in the tangent of its inputs.
An affine site contributes no second derivative of its own, and the second-order
tangents never need to be formed: they enter only through linear calls, whose
contribution the gradients ``g`` already carry.

Cost: one forward pass of tangents per parameter entry, from the entry's site down
to the loss, all entries of a chunk at once; no backward pass per entry.  A
Hessian-vector product of the sweep costs a forward and a backward pass of tangents
from the input on.  The route covers the sites whose columns the graph route
declines as too costly (many residual entries per sample crossing convolutions:
the columns scale with the activations, the tangents with the parameters).
Convolutions with unit stride carry the tangents by the input-gradient kernel of
their flipped weight, which in float64 on the CPU runs about 2.5x the speed of the
forward kernel (measured, torch 2.13, 8-channel 16x16 maps).

Memory: at most ``max(1, budget // (4 * largest tensor))`` entries in flight, each a
tangent of every live tensor downstream (freed after its last reader).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import jvp, vmap

from torch_secorder.func._patches import unfold
from torch_secorder.func._rules import Residual, substituted
from torch_secorder.linalg.progress import progress_bar

__all__ = ["tangent_diagonal"]


class _OneChannel:
    """Tangents that each live on one channel (axis 1 of a sample's tensor), as a
    convolution weight's or bias entry moves one output channel: ``values``
    ``(k, N, 1, ...)`` and ``channel`` ``(k,)``; elementwise calls keep them so, and the
    next convolution costs a channel's share (then they are dense)."""

    def __init__(self, values: Tensor, channel: Tensor, channels: int, runs: list):
        self.values, self.channel, self.channels = values, channel, channels
        self.runs = runs  # [(channel, first, stop)]: directions lo:hi share a channel

    @property
    def shape(self) -> tuple[int, ...]:
        v = self.values.shape
        return (v[0], v[1], self.channels, *v[3:])

    def pick(self, full: Tensor) -> Tensor:
        """Each direction's channel of a ``(N, C, ...)`` tensor: ``(k, N, 1, ...)``."""
        return full.index_select(1, self.channel).movedim(1, 0).unsqueeze(2)

    def dense(self) -> Tensor:
        out = self.values.new_zeros(self.shape)
        out[torch.arange(self.shape[0]), :, self.channel] = self.values[:, :, 0]
        return out


def _dense(t):
    return t.dense() if isinstance(t, _OneChannel) else t


def _dense_values(t) -> Tensor:
    """A tensor of the tangents' dtype, device and number of directions."""
    return t.values if isinstance(t, _OneChannel) else t


def tangent_diagonal(
    walk: list, value: Tensor, sites: list, budget: int, progress: bool = False
) -> dict:
    """Diagonals ``{(id(site), role): tensor}`` of the sites' parameters.

    ``walk``: the graph route's steps (:class:`~torch_secorder.func._graph._Step`) on
    the way from the sites to ``value``, every one crossed by a rule; ``sites``: affine
    sites among them whose parameters no other call reads; ``progress``: a progress bar
    over the chunks of entries.
    """
    if not sites:
        return {}
    floor = min(_index(walk, site.call) for site in sites)
    residuals = _residuals(walk, value, floor)
    last = _last_reads(walk)
    largest = max((o.numel() for s in walk for o in s.outs), default=1)
    chunk = max(1, budget // max(1, 4 * largest))
    pieces: dict[tuple[int, str], list[Tensor]] = {}
    work = [
        (site, role, lo, min(site.bound[role].numel(), lo + chunk))
        for site in sites
        for role in site.roles
        for lo in range(0, site.bound[role].numel(), chunk)
    ]
    for site, role, lo, hi in progress_bar(work, enabled=progress, desc="diagonal by tangents"):
        tangent = _site_tangent(site, role, lo, hi)
        if tangent is None:  # jvp of the site's call along one-hot directions
            param = site.bound[role]
            basis = param.new_zeros(hi - lo, param.numel())
            basis[torch.arange(hi - lo), torch.arange(lo, hi)] = 1.0
            tangent = vmap(_along(site.call, param))(basis.reshape(hi - lo, *param.shape))
        start = _index(walk, site.call)
        q = _forward(walk, start, {id(site.call.out): tangent}, residuals, last, value)
        pieces.setdefault((id(site), role), []).append(q)
    return {
        (id(site), role): torch.cat(pieces[(id(site), role)]).reshape(site.bound[role].shape)
        for site in sites
        for role in site.roles
    }


def _index(walk: list, call) -> int:
    return next(step.index for step in walk if step.call is call)


def _last_reads(walk: list) -> dict[int, int]:
    """The last step reading each tensor (by ``id``)."""
    last: dict[int, int] = {}
    for step in walk:
        for t in step.active:
            last[id(t)] = step.index
    return last


class _Directional:
    r"""A curved call's curvature along a tangent, :math:`\partial^2_\epsilon \langle g,
    f(x + \epsilon t)\rangle` by ``jvp`` of ``jvp`` (its residual too large to form)."""

    def __init__(self, g_out):
        self.g_out = g_out if isinstance(g_out, tuple) else (g_out,)

    def __call__(self, step, ts: list) -> Tensor:
        from torch_secorder.func._fixes import differentiable

        fn = differentiable(substituted(step.call, step.active))
        primals = tuple(step.active)
        k = _dense_values(next(t for t in ts if t is not None)).shape[0]
        ts = [a.new_zeros(k, *a.shape) if t is None else _dense(t) for a, t in zip(primals, ts)]

        def phi(*xs: Tensor) -> Tensor:
            out = fn(*xs)
            out = out if isinstance(out, (tuple, list)) else (out,)
            return sum((o * g).sum() for o, g in zip(out, self.g_out, strict=True))

        def second(*t: Tensor) -> Tensor:
            return jvp(lambda *xs: jvp(phi, xs, t)[1], primals, t)[1]

        return vmap(second)(*ts)


def _residuals(walk: list, value: Tensor, floor: int) -> dict[int, Residual | _Directional]:
    """The residual of every curved call at or after ``floor``, from one backward pass."""
    g: dict[int, Tensor] = {id(value): torch.ones_like(value)}
    found: dict[int, Residual] = {}
    for step in reversed(walk):
        if step.index < floor:
            break
        outs = step.outs
        g_outs = [g.pop(id(o), None) for o in outs]
        if all(x is None for x in g_outs) or not step.active:
            continue
        g_outs = [torch.zeros_like(o) if x is None else x for o, x in zip(outs, g_outs)]
        if step.curved:
            cot = g_outs[0] if isinstance(step.call.out, Tensor) else tuple(g_outs)
            if step.rule.columns_fit(step.call, step.active):
                res = step.rule.residual(step.call, step.active, cot)
                if res is None:
                    raise RuntimeError(f"no residual for {step.call.func}")  # planned otherwise
                found[step.index] = res
            else:  # too large as columns: read as a second directional derivative
                found[step.index] = _Directional(cot)
        if step.index > floor:
            for t, gi in zip(step.active, step.back([x[None] for x in g_outs])):
                g[id(t)] = gi[0] if id(t) not in g else g[id(t)] + gi[0]
    return found


def _site_tangent(site, role: str, lo: int, hi: int) -> Tensor | _OneChannel | None:
    """The site output's tangents ``(hi - lo, *z.shape)`` along entries ``lo:hi`` of the
    parameter in closed form (``F.linear``, ungrouped ``F.conv1d``/``F.conv2d`` with
    numeric padding: an entry ``(o, j)`` of the weight moves output unit ``o`` by input
    patch entry ``j``, the bias moves it by one), else ``None``."""
    call, z = site.call, site.call.out
    if call.func not in (F.linear, F.conv1d, F.conv2d) or site.kind not in ("linear", "conv"):
        return None
    b = site.bound
    weight = b["weight"]
    if call.func is not F.linear and (
        b.get("groups", 1) != 1 or isinstance(b.get("padding", 0), str)
    ):
        return None
    k = hi - lo
    entries = torch.arange(lo, hi, device=z.device)
    units = weight.shape[0]
    if call.func is F.linear:
        x = b["input"]
        if role == "weight":
            o, j = entries // x.shape[-1], entries % x.shape[-1]
            tangent = z.new_zeros(k, *z.shape)
            tangent[torch.arange(k), ..., o] = x[..., j].movedim(-1, 0)
            return tangent
        tangent = z.new_zeros(k, *z.shape)
        tangent[torch.arange(k), ..., entries] = 1.0
        return tangent
    one = call.func is F.conv1d
    x = b["input"].unsqueeze(2) if one else b["input"]
    kernel = (1, *weight.shape[2:]) if one else weight.shape[2:]

    def pair(v, fill):
        v = (v,) if isinstance(v, int) else tuple(v)
        return (fill, *v) if one else (v * 2 if len(v) == 1 else v)

    n = x.shape[0]
    per_unit = weight[0].numel() if role == "weight" else 1
    runs = [  # entries lo:hi in order: each channel's directions are one run (host side)
        (c, max(lo, c * per_unit) - lo, min(hi, (c + 1) * per_unit) - lo)
        for c in range(lo // per_unit, (hi - 1) // per_unit + 1)
    ]
    if role == "weight":
        patches = unfold(
            x,
            kernel,
            pair(b.get("dilation", 1), 1),
            pair(b.get("padding", 0), 0),
            pair(b.get("stride", 1), 1),
        )  # (N, J, L)
        channel, values = entries // per_unit, patches[:, entries % per_unit].transpose(0, 1)
    else:
        channel, values = entries, z.new_ones(k, n, z[0, 0].numel())
    return _OneChannel(values.reshape(k, n, 1, *z.shape[2:]), channel, units, runs)


def _along(call, param: Tensor) -> Callable[[Tensor], Tensor]:
    """The site's output tangent along a direction of ``param``."""
    fn = substituted(call, [param])

    def along(direction: Tensor) -> Tensor:
        return jvp(fn, (param,), (direction,))[1]

    return along


def _forward(walk, start, tangents, residuals, last, value) -> Tensor:
    """Second derivatives ``(k,)`` along the directions whose tangents start at ``start``."""
    first = _dense_values(next(iter(tangents.values())))
    total = first.new_zeros(first.shape[0])
    for step in walk:
        if step.index <= start:
            continue
        ts = [tangents.get(id(a)) for a in step.active]  # None: no tangent (zero)
        if all(t is None for t in ts):
            continue
        res = residuals.get(step.index)
        if isinstance(res, _Directional):
            total = total + res(step, ts)
        elif res is not None:
            total = total + _quadratic(res, step.active, ts)
        for a in step.active:
            if last.get(id(a)) == step.index:
                tangents.pop(id(a), None)
        if step.call.out is value:
            continue
        for o, t in zip(step.outs, _push(step, ts)):
            tangents[id(o)] = t
    return total


def _quadratic(res: Residual, active: list[Tensor], ts: list[Tensor]) -> Tensor:
    r""":math:`t^\top R\, t` per direction for a residual ``R`` (a diagonal and signed
    columns, each column living on one slice)."""
    some = _dense_values(next(t for t in ts if t is not None))
    k = some.shape[0]
    total = some.new_zeros(k)
    inner = None
    for a, t in zip(active, ts):
        if t is None:
            continue
        d = res.diag.get(id(a))
        if d is not None:
            if isinstance(t, _OneChannel):
                rows, d = t.values.reshape(k, -1), t.pick(d).reshape(k, -1)
                total = total + torch.linalg.vecdot(rows * d, rows)
            else:
                rows = t.reshape(k, -1)
                total = total + torch.linalg.vecdot(rows * d.reshape(-1), rows)
        cols = (res.columns or {}).get(id(a))
        if cols is not None:
            t = _dense(t)
            n = a.shape[0]
            part = torch.einsum(
                "cne,kne->kcn", cols.reshape(cols.shape[0], n, -1), t.reshape(k, n, -1)
            )
            inner = part if inner is None else inner + part
    if inner is not None:
        total = total + (inner * inner * res.sign[None]).sum((1, 2))
    return total


def _push(step, ts: list[Tensor]) -> list[Tensor]:
    """Tangents ``(k, *out.shape)`` of the step's outputs from those of its active inputs."""
    call = step.call
    if step.elementwise:
        t = ts[0]
        if isinstance(t, _OneChannel):
            values = t.values * t.pick(step.jacobian())
            return [_OneChannel(values, t.channel, t.channels, t.runs)]
        return [t * step.jacobian()]
    present = [t for t in ts if t is not None]
    if (
        len(present) == 1
        and isinstance(present[0], _OneChannel)
        and len(step.active) == 1
        and call.args
        and call.args[0] is step.active[0]
    ):
        conv = _conv_by_channel(call, present[0])
        if conv is not None:
            return [conv]
    if call.func in _ADDS and not call.kwargs and isinstance(call.out, Tensor):
        shape = (present[0].shape[0], *call.out.shape)
        if len(present) == 1 and present[0].shape == shape:
            return present  # tangents are never written in place
        present = [_dense(t) for t in present]
        out = present[0].expand(shape).clone()
        for t in present[1:]:
            out += t
        return [out]
    ts = [None if t is None else _dense(t) for t in ts]
    present = [_dense(t) for t in present]
    if len(step.active) == 1 and call.args and call.args[0] is step.active[0]:
        fast = _linear_in_input(call, ts[0])
        if fast is not None:
            return [fast]
    k = present[0].shape[0]
    ts = [a.new_zeros(k, *a.shape) if t is None else t for a, t in zip(step.active, ts)]
    fn = substituted(call, step.active)
    primals = tuple(step.active)

    def one(*tangent: Tensor):
        return jvp(fn, primals, tangent)[1]

    out = vmap(one)(*ts)
    return list(out) if isinstance(out, (tuple, list)) else [out]


#: Sums of tensors: the tangent of the sum is the sum of the tangents (broadcast).
_ADDS = (torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__)


def _linear_in_input(call, t: Tensor) -> Tensor | None:
    """``F.linear`` and unit-stride ungrouped ``F.conv2d`` on tangents, bias left out."""
    k = t.shape[0]
    weight = call.kwargs.get("weight", call.args[1] if len(call.args) > 1 else None)
    if not isinstance(weight, Tensor):
        return None
    if call.func is F.linear:
        return t @ weight.T
    found = _flipped_conv(call)
    if found is None:
        return None
    flipped, pad, dilation = found
    out = call.out
    flat = t.reshape(k * t.shape[1], *t.shape[2:])
    size = (flat.shape[0], *out.shape[1:])
    res = torch.nn.grad.conv2d_input(size, flipped, flat, 1, pad, dilation, 1)
    return res.reshape(k, *out.shape)


def _conv_by_channel(call, t: _OneChannel) -> Tensor | None:
    """A unit-stride ``F.conv2d`` of one-channel tangents: per input channel, that
    channel's slice of the flipped kernel (a channel's share of the work)."""
    found = _flipped_conv(call)
    if found is None:
        return None
    flipped, pad, dilation = found  # (C_in, C_out, kh, kw)
    out = call.out
    k, n = t.values.shape[:2]
    res = t.values.new_empty(k, *out.shape)
    for c, first, stop in t.runs:
        flat = t.values[first:stop].reshape((stop - first) * n, 1, *t.values.shape[3:])
        size = (flat.shape[0], *out.shape[1:])
        part = torch.nn.grad.conv2d_input(size, flipped[c : c + 1], flat, 1, pad, dilation, 1)
        res[first:stop] = part.reshape(stop - first, *out.shape)
    return res


def _flipped_conv(call):
    """``(flipped kernel, its padding, dilation)`` of a unit-stride ungrouped ``F.conv2d``
    with numeric padding within the kernel's reach, else ``None``: ``conv2d(x, W, p)`` is
    the input gradient of a convolution with kernel ``W`` transposed and flipped and
    padding ``d (s - 1) - p``, evaluated at ``x``."""
    if call.func is not F.conv2d:
        return None
    weight = call.kwargs.get("weight", call.args[1] if len(call.args) > 1 else None)
    if not isinstance(weight, Tensor):
        return None
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    bound.update(zip(names, call.args))
    bound.update(call.kwargs)
    pairs = {}
    for key in ("stride", "padding", "dilation"):
        v = bound[key]
        if isinstance(v, str):
            return None
        pairs[key] = (v, v) if isinstance(v, int) else tuple(v)
    kernel = weight.shape[-2:]
    flipped_pad = tuple(
        d * (s - 1) - p for d, s, p in zip(pairs["dilation"], kernel, pairs["padding"])
    )
    if bound["groups"] != 1 or pairs["stride"] != (1, 1) or min(flipped_pad) < 0:
        return None
    return weight.transpose(0, 1).flip(-1, -2), flipped_pad, pairs["dilation"]
