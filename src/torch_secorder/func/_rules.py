r"""One rule per recorded operation: how second-order backpropagation crosses it.

The graph route (:mod:`torch_secorder.func._graph`) walks the recorded calls
backwards carrying, for every tensor, its gradient, a diagonal term and sets of
signed columns of the loss Hessian with respect to it.  What it needs from a
call ``out = f(in_1, ..., in_m)`` (``in_i`` the inputs that depend on the
parameters, the *active* ones; every other argument a constant):

* its Jacobian transpose on columns: ``torch.func.vjp`` of the recorded call,
  vmapped over the columns (one rule for every operation; linear in the
  columns, so columns of one origin that meet again add);
* whether its Jacobian is diagonal (``elementwise``): then a diagonal term
  crosses it as a diagonal, scaled by the squared derivative;
* its residual term, where its second derivative is not zero (``curved``):
  :math:`\sum_j g_j \nabla^2 out_j` with ``g`` the gradient at the output, as a
  diagonal (elementwise activations: :math:`g \odot \sigma''`, from autograd's
  double backward of the very call recorded, so that the numbers match the
  other routes'), as closed-form columns (softmax), or from the dense Hessian
  of each slice ``in[n]`` (any other curved call, when small enough);
* how it treats the leading axis (:meth:`Rule.samples`): the route splits the
  loss into a sum over the slices ``n`` of that axis (the samples) and needs
  every call to act on each slice separately (``"batched"``), or to add the
  slices' values (``"reduced"``: ``sum``, ``mean``, the losses).  A call that
  mixes slices (training-mode batch norm, a transpose of the leading axis) has
  no rule answer: the parameters upstream of it take another route.

The table :data:`RULES` maps the recorded function (``torch.tanh``,
``Tensor.__add__``, ``F.max_pool2d``, ...) to its rule; a function that is not
in it stops the route the same way.  BackPACK keeps one small class of
derivatives per module in the same spirit (``core/derivatives``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from torch_secorder.func._tape import Call

__all__ = ["Rule", "RULES", "rule_for", "Residual", "elementwise_derivatives"]

BATCHED, REDUCED = "batched", "reduced"


@dataclass
class Residual:
    """A residual term at a call's inputs: a diagonal at one input and/or signed columns.

    ``diag``: ``{id(input): tensor shaped like the input}``; ``columns``:
    ``{id(input): (K, *input.shape)}`` (one origin: a column's parts on several
    inputs belong together), ``sign``: ``(K, N)``.
    """

    diag: dict[int, Tensor]
    columns: dict[int, Tensor] | None = None
    sign: Tensor | None = None


def _same_shape(call: Call, active: list[Tensor]) -> bool:
    out = call.out
    return len(active) == 1 and isinstance(out, Tensor) and out.shape == active[0].shape


def _both_active(call: Call, active: list[Tensor]) -> bool:
    """Whether the first two arguments are both active (``x * x`` too)."""
    ids = {id(a) for a in active}
    args = call.args[:2]
    return len(args) == 2 and all(isinstance(a, Tensor) and id(a) in ids for a in args)


def _dense_ok(active: list[Tensor]) -> bool:
    return 0 < sum(a[0].numel() for a in active) <= DENSE_LIMIT


def _arg(call: Call, index: int, name: str, default=None):
    if name in call.kwargs:
        return call.kwargs[name]
    if len(call.args) > index:
        return call.args[index]
    return default


def _dims(dim, ndim: int) -> list[int] | None:
    if dim is None:
        return None
    if isinstance(dim, int):
        dim = [dim]
    return [d % ndim for d in dim]


def _aligned(call: Call, active: list[Tensor], n: int) -> bool:
    """Every active input and every output has the leading axis ``n`` in front."""
    outs = call.outputs()
    if not outs or any(o.dim() == 0 or o.shape[0] != n for o in outs):
        return False
    ndim = outs[0].dim()
    return all(a.dim() == ndim and a.shape[0] == n for a in active)


class Rule:
    """How the graph route crosses one kind of call (defaults: a linear, per-slice call).

    Attributes:
        curved: Whether the second derivative in the active inputs can be nonzero.
        elementwise: Whether the Jacobian is diagonal (one active input, same shape).
    """

    curved = False
    elementwise = False

    def samples(self, call: Call, active: list[Tensor], kinds: list[str], n: int) -> str | None:
        """``"batched"``, ``"reduced"`` or ``None`` (the call mixes the slices)."""
        if all(k == BATCHED for k in kinds) and _aligned(call, active, n):
            return BATCHED
        return None

    def is_curved(self, call: Call, active: list[Tensor]) -> bool:
        return self.curved

    def is_elementwise(self, call: Call, active: list[Tensor]) -> bool:
        return self.elementwise and _same_shape(call, active)

    def residual_ok(self, call: Call, active: list[Tensor]) -> bool:
        """Whether the residual's curvature is known (checked before computing)."""
        return True

    def columns_fit(self, call: Call, active: list[Tensor]) -> bool:
        """Whether :meth:`residual` can be formed here: its columns (formed at once)
        within :data:`RESIDUAL_ENTRIES`, a dense residual within :data:`DENSE_LIMIT`.
        Where not, the graph route does not cross the call, and the tangent route reads
        its curvature as a second directional derivative instead."""
        return True

    def per_position(self, call: Call, active: list[Tensor]) -> bool:
        """Whether the call acts on each position (every axis but the last) apart: a
        column living on one position stays on it across the call (and its residual,
        if curved, is made of such columns and a diagonal).  Elementwise calls do."""
        return self.is_elementwise(call, active)

    def residual(self, call: Call, active: list[Tensor], g_out: Tensor) -> Residual | None:
        """The residual term (``None``: declines; the route then stops there)."""
        return None

    def fast_vjp(self, call: Call, active: list[Tensor], cols: Tensor) -> list[Tensor] | None:
        """Closed-form Jacobian transpose of columns ``(K, *out.shape)`` (one output), one
        result per active input, or ``None`` (then ``torch.func.vjp``, vmapped)."""
        return None

    def diagonal_jacobian(self, call: Call, active: list[Tensor]) -> Tensor | None:
        """The Jacobian's diagonal (shaped like the output) of an elementwise call in
        closed form, or ``None`` (then a vector-Jacobian product with ones)."""
        return None


class Linear(Rule):
    """A call linear in its active inputs (shape changes, sums, pooling, ...)."""


class Pointwise(Rule):
    """``add``/``sub``/``mul``/``div``/``where``-like calls with broadcasting.

    Linear (and elementwise) with one active input; ``mul`` of two active
    inputs is curved, ``div`` by an active input too.  On reduced values (a
    summed loss) only linear combinations keep the slices apart.
    """

    def __init__(self, kind: str):
        self.kind = kind  # "add", "mul", "div", "neg"

    def samples(self, call, active, kinds, n):
        if all(k == REDUCED for k in kinds) and isinstance(call.out, Tensor):
            if self.kind in ("add", "neg"):
                return REDUCED
            if len(active) == 1 and (self.kind == "mul" or call.args[0] is active[0]):
                return REDUCED
            return None
        return super().samples(call, active, kinds, n)

    def is_curved(self, call, active):
        if self.kind == "div":
            return any(t is active_t for t in call.args[1:2] for active_t in active)
        return self.kind == "mul" and _both_active(call, active)

    def is_elementwise(self, call, active):
        return _same_shape(call, active) and not self.is_curved(call, active)

    def per_position(self, call, active):
        """Sums and differences of tensors of the output's shape (a residual stream)."""
        out = call.out
        return (
            self.kind == "add"
            and isinstance(out, Tensor)
            and all(a.shape == out.shape for a in active)
        )

    def columns_fit(self, call, active):
        return _dense_ok(active)

    def residual(self, call, active, g_out):
        return _dense_residual(call, active, g_out)

    def diagonal_jacobian(self, call, active):
        (x,) = active
        args = call.args
        if call.kwargs or not 1 <= len(args) <= 2 or sum(a is x for a in args) != 1:
            return None
        out = call.out
        other = None
        if len(args) == 2:
            other = args[1] if args[0] is x else args[0]
        name = call.name
        if self.kind == "neg":
            return torch.full_like(out, -1.0)
        if self.kind == "add":
            minus = (
                name in ("sub", "__sub__") and x is args[1] or name == "__rsub__" and x is args[0]
            )
            return torch.full_like(out, -1.0 if minus else 1.0)
        if self.kind == "mul" and other is not None:
            return torch.zeros_like(out) + other
        if self.kind == "div" and x is args[0] and other is not None:
            return torch.zeros_like(out) + 1.0 / other
        return None

    def fast_vjp(self, call, active, cols):
        out = call.out
        if self.kind != "add" or call.kwargs or len(call.args) != 2:
            return None
        if any(a.shape != out.shape for a in active) or not _both_active(call, active):
            return None
        if call.args[0] is call.args[1]:
            return None
        name = call.name
        first = -1.0 if name == "__rsub__" else 1.0
        second = -1.0 if name in ("sub", "__sub__") else 1.0
        by_id = {id(call.args[0]): first, id(call.args[1]): second}
        return [cols if by_id[id(a)] > 0 else -cols for a in active]


class Activation(Rule):
    """An elementwise function of one tensor (``tanh``, ``gelu``, ``exp``, ``pow``, ...)."""

    elementwise = True

    def __init__(self, piecewise_linear: bool = False):
        self.piecewise_linear = piecewise_linear

    def samples(self, call, active, kinds, n):
        if call.args and call.args[0] is not active[0]:
            return None  # e.g. ``2 ** x`` with the tensor second: take the dense way
        if len(active) != 1 or not isinstance(call.out, Tensor):
            return None
        if call.out.shape != active[0].shape or _inplace(call):
            return None
        return super().samples(call, active, kinds, n)

    def is_curved(self, call, active):
        return not self.piecewise_linear

    def residual_ok(self, call, active):
        return elementwise_derivatives(call, active[0], self.piecewise_linear) is not None

    def residual(self, call, active, g_out):
        derivatives = elementwise_derivatives(call, active[0], self.piecewise_linear)
        if derivatives is None:
            return None
        return Residual({id(active[0]): g_out * derivatives[1]})


class Softmax(Rule):
    r"""``softmax``/``log_softmax`` along a non-leading axis.

    With :math:`p` the softmax of a row and :math:`g` the gradient at the
    output, the residual per row is, for softmax,
    :math:`\operatorname{diag}(u) - u p^\top - p u^\top` with
    :math:`u = p \odot (g - g^\top p)`, i.e. a diagonal and two signed columns
    :math:`(u \pm p)/\sqrt 2`; for log-softmax
    :math:`-(\textstyle\sum g)(\operatorname{diag}(p) - p p^\top)`.
    """

    curved = True

    def __init__(self, log: bool):
        self.log = log

    def _dim(self, call) -> int | None:
        dim = _arg(call, 1, "dim")
        if dim is None or _arg(call, 2, "dtype") is not None or len(call.args) > 3:
            return None
        return dim % call.out.dim()

    def samples(self, call, active, kinds, n):
        if len(active) != 1 or call.args[0] is not active[0] or _inplace(call):
            return None
        dim = self._dim(call)
        if dim is None or dim == 0:
            return None
        return super().samples(call, active, kinds, n)

    def columns_fit(self, call, active):
        """Its columns (two per row of a sample, one for log-softmax) fit."""
        x = active[0]
        rows = x[0].numel() // max(1, x.shape[self._dim(call)])
        return _columns_fit((1 if self.log else 2) * rows, active)

    def fast_vjp(self, call, active, cols):
        r""":math:`J^\top c = p \odot (c - \langle c, p\rangle)` (softmax),
        :math:`c - p \sum c` (log-softmax), along the softmax axis."""
        if call.args[0] is not active[0]:
            return None
        dim = self._dim(call) + 1
        if self.log:
            p = call.out.exp()
            return [cols - p * cols.sum(dim, keepdim=True)]
        p = call.out
        return [p * (cols - (cols * p).sum(dim, keepdim=True))]

    def residual(self, call, active, g_out):
        x = active[0]
        dim = self._dim(call)
        p = torch.softmax(x, dim)
        if self.log:
            total = g_out.sum(dim, keepdim=True)
            diag = -total * p
            col = p * total.abs().sqrt()
            return _row_columns(x, dim, diag, [(col, torch.sign(total))])
        u = p * (g_out - (g_out * p).sum(dim, keepdim=True))
        r = math.sqrt(0.5)
        ones = torch.ones_like(p.sum(dim, keepdim=True))
        return _row_columns(x, dim, u, [((u + p) * r, -ones), ((u - p) * r, ones)])


def _row_columns(x: Tensor, dim: int, diag: Tensor, parts) -> Residual:
    """Columns living on one row (along ``dim``) each: ``(rows * len(parts), *x.shape)``.

    ``parts``: ``(values shaped like x, sign per row shaped like x with dim 1)``.
    """
    n = x.shape[0]
    moved = x.movedim(dim, -1)
    rows = moved[0, ..., 0].numel()  # rows per slice
    cols, signs = [], []
    for values, sign in parts:
        v = values.movedim(dim, -1).reshape(n, rows, -1)  # (N, R, T)
        s = sign.movedim(dim, -1).reshape(n, rows)  # (N, R)
        eye = torch.eye(rows, dtype=x.dtype, device=x.device)
        c = torch.einsum("nrt,kr->knrt", v, eye)  # column k on row k
        cols.append(c.reshape(rows, *moved.shape).movedim(-1, dim + 1))
        signs.append(s.T)  # (R, N)
    return Residual({id(x): diag}, {id(x): torch.cat(cols)}, torch.cat(signs))


class Reduce(Rule):
    """``sum``/``mean`` (over some axes: batched, over all or the leading one: reduced)."""

    def samples(self, call, active, kinds, n):
        if len(active) != 1 or call.args[0] is not active[0]:
            return None
        x = active[0]
        if kinds[0] == REDUCED:
            return REDUCED
        dims = _dims(_arg(call, 1, "dim"), x.dim())
        if _arg(call, 3, "dtype") is not None:
            return None
        if dims is None or 0 in dims:
            return REDUCED
        out = call.out
        if isinstance(out, Tensor) and out.dim() > 0 and out.shape[0] == n == x.shape[0]:
            return BATCHED
        return None


class Loss(Rule):
    """A loss of an input and a constant target: reduced (``"mean"``, ``"sum"``) or per slice.

    Its residual is the dense Hessian of each slice (classes and positions of one
    sample), from Hessian-vector products.
    """

    curved = True

    def __init__(self, piecewise_linear: bool = False):
        self.piecewise_linear = piecewise_linear

    def samples(self, call, active, kinds, n):
        if len(active) != 1 or not call.args or call.args[0] is not active[0]:
            return None
        if any(k != BATCHED for k in kinds) or active[0].dim() < 1 or active[0].shape[0] != n:
            return None
        if call.func in (F.cross_entropy, F.nll_loss) and active[0].dim() < 2:
            return None  # unbatched: the classes would be the leading axis
        reduction = call.kwargs.get("reduction", "mean")
        if any(k in call.kwargs and call.kwargs[k] is not None for k in ("size_average", "reduce")):
            return None
        if reduction in ("mean", "sum"):
            return REDUCED
        if reduction == "none" and isinstance(call.out, Tensor) and call.out.dim() > 0:
            return BATCHED if call.out.shape[0] == n else None
        return None

    def is_curved(self, call, active):
        return not self.piecewise_linear

    def columns_fit(self, call, active):
        return _loss_hessian(call, active[0]) is not None or _dense_ok(active)

    def fast_vjp(self, call, active, cols):
        """The gradient of MSE and cross-entropy (where :func:`_loss_hessian` has a closed
        form) without autograd: :math:`2(x - t)/s` and :math:`(m p - t)/s`."""
        x = active[0]
        closed = _loss_hessian(call, x)
        if closed is None or cols.dim() != 1:
            return None
        kind, h = closed
        target = _arg(call, 1, "target")
        if kind == "diag":
            grad = (x - target) * h
        else:
            scale = x.shape[0] if call.kwargs.get("reduction", "mean") == "mean" else 1
            p = torch.softmax(x, 1)
            if target.is_floating_point():
                grad = (p * target.sum(1, keepdim=True) - target) / scale
            else:
                grad = (p - F.one_hot(target.long(), x.shape[1]).to(x.dtype)) / scale
        return [cols.reshape(-1, *([1] * x.dim())) * grad]

    def residual(self, call, active, g_out):
        closed = _loss_hessian(call, active[0])
        if closed is None:
            return _dense_residual(call, active, g_out)
        x = active[0]
        kind, h = closed
        if kind == "diag":
            return Residual({id(x): g_out * h})
        factor, weight = h  # per sample: weight * factor @ factor.T
        w = g_out * weight  # (N, 1)
        columns = factor.permute(2, 0, 1) * w.abs().sqrt()[None]  # (C, N, C): column j
        sign = torch.sign(w).T.expand(factor.shape[2], x.shape[0])
        return Residual({}, {id(x): columns}, sign)


def _loss_hessian(call: Call, x: Tensor):
    r"""Closed forms of the loss Hessian per sample (``None``: use the dense way).

    ``F.mse_loss`` without ``weight``: ``("diag", 2 / s)`` shaped like the input;
    ``F.cross_entropy`` on ``(N, C)`` logits, no ``weight``, no label smoothing, no
    ignored target, class indices or probabilities:
    :math:`m (\operatorname{diag} p - p p^\top) / s` (``m`` the target mass, ``s``
    the mean's divisor) as ``("factor", (S, m / s))`` with the symmetric factor
    :math:`S = \operatorname{diag}(\sqrt p) - p \sqrt p^\top` ``(N, C, C)``:
    :math:`S S^\top = \operatorname{diag} p - 2pp^\top + (\textstyle\sum p) pp^\top`,
    BackPACK's factorisation (``C`` columns, no eigendecomposition).
    """
    cached = getattr(call, "_loss_hessian", None)
    if cached is not None and cached[0] is x:
        return cached[1]
    found = _closed_loss_hessian(call, x)
    call._loss_hessian = (x, found)  # type: ignore[attr-defined]
    return found


def _closed_loss_hessian(call: Call, x: Tensor):
    reduction = call.kwargs.get("reduction", "mean")
    if reduction not in ("mean", "sum") or call.args[0] is not x:
        return None
    if call.func is F.mse_loss:
        target = _arg(call, 1, "target")
        if _arg(call, 5, "weight") is not None or len(call.args) > 2:
            return None
        if not isinstance(target, Tensor) or target.shape != x.shape:
            return None
        scale = x.numel() if reduction == "mean" else 1
        return "diag", torch.full_like(x, 2.0 / scale)
    if call.func is not F.cross_entropy or x.dim() != 2 or len(call.args) > 2:
        return None
    kw = call.kwargs
    if kw.get("weight") is not None or kw.get("label_smoothing", 0.0) != 0.0:
        return None
    target = _arg(call, 1, "target")
    n, c = x.shape
    if not isinstance(target, Tensor):
        return None
    if target.dtype in (torch.int64, torch.int32) and target.shape == (n,):
        if bool((target == kw.get("ignore_index", -100)).any()):
            return None
        mass = torch.ones(n, 1, dtype=x.dtype, device=x.device)
    elif target.is_floating_point() and target.shape == x.shape:
        mass = target.sum(1, keepdim=True)
    else:
        return None
    scale = n if reduction == "mean" else 1
    p = torch.softmax(x, 1)
    root = p.sqrt()
    factor = torch.diag_embed(root) - p[:, :, None] * root[:, None, :]
    return "factor", (factor, mass / scale)


class Matmul(Rule):
    """``@``/``matmul``/``bmm``: linear with one active operand, curved with two."""

    def samples(self, call, active, kinds, n):
        if len(call.args) != 2 or call.kwargs or any(k != BATCHED for k in kinds):
            return None
        a, b = call.args
        if not isinstance(a, Tensor) or not isinstance(b, Tensor) or min(a.dim(), b.dim()) < 2:
            return None
        out = call.out
        if out.dim() == 2 and a is not active[0] or len(active) == 2 and out.dim() < 3:
            return None
        return super().samples(call, active, kinds, n)

    def is_curved(self, call, active):
        return _both_active(call, active)

    def columns_fit(self, call, active):
        if self._paired(call, active):
            a, b = call.args
            per_matrix = 2 * min(a.shape[-2], b.shape[-1]) * a.shape[-1]
            return _columns_fit(per_matrix * math.prod(a.shape[1:-2]), active)
        return _dense_ok(active)

    def fast_vjp(self, call, active, cols):
        a, b = call.args
        ids = {id(t) for t in active}
        res = []
        for t in active:
            if t is a and id(b) not in ids or t is a and a is not b:
                res.append(cols @ b.transpose(-1, -2))
            elif t is b and a is not b:
                res.append(a.transpose(-1, -2) @ cols)
            else:
                return None
        if any(r.shape[1:] != t.shape for r, t in zip(res, active)):
            return None  # a broadcast operand: its gradient sums over the broadcast
        return res

    @staticmethod
    def _paired(call, active) -> bool:
        a, b = call.args
        return (
            len(active) == 2
            and a.dim() == b.dim() >= 3
            and a.shape[:-2] == b.shape[:-2]
            and a is not b
        )

    def residual(self, call, active, g_out):
        r"""For ``A @ B`` (both active, same batch shape) in closed form.

        The residual is the bilinear form :math:`2\langle G, \delta A\, \delta B\rangle`.
        With the SVD :math:`G = \sum_r s_r a_r b_r^\top` of each matrix of the
        batch, it is :math:`\sum_{r,j} \tfrac{s_r}{2}[(u+v)(u+v)^\top - (u-v)(u-v)^\top]`
        with :math:`u = a_r \otimes e_j` on ``A`` and :math:`v = e_j \otimes b_r`
        on ``B``: ``2 * rank * inner`` signed columns per matrix.
        """
        if not self._paired(call, active):
            return _dense_residual(call, active, g_out)
        a, b = call.args
        n = a.shape[0]
        lead = a.shape[1:-2]
        p = math.prod(lead)
        m, inner, width = a.shape[-2], a.shape[-1], b.shape[-1]
        u, sv, vh = torch.linalg.svd(g_out.reshape(n, p, m, width), full_matrices=False)
        rank = sv.shape[-1]
        scale = (sv / 2).sqrt()  # (N, P, R)
        eye_p = torch.eye(p, dtype=a.dtype, device=a.device)
        eye_j = torch.eye(inner, dtype=a.dtype, device=a.device)
        ca = torch.einsum("pq,npir,jk,npr->prjnqik", eye_p, u, eye_j, scale)
        cb = torch.einsum("pq,nprl,jk,npr->prjnqkl", eye_p, vh, eye_j, scale)
        k = p * rank * inner
        ca = ca.reshape(k, *a.shape)
        cb = cb.reshape(k, *b.shape)
        ones = torch.ones(k, n, dtype=a.dtype, device=a.device)
        columns = {id(a): torch.cat([ca, ca]), id(b): torch.cat([cb, -cb])}
        return Residual({}, columns, torch.cat([ones, -ones]))


class Norm(Rule):
    """``layer_norm``/``group_norm`` (normalisation per slice: curved); eval ``batch_norm``."""

    curved = True

    def __init__(self, kind: str):
        self.kind = kind

    def samples(self, call, active, kinds, n):
        if len(active) != 1 or call.args[0] is not active[0]:
            return None
        if self.kind == "batch_norm":
            training = _arg(call, 5, "training", False)
            if training or _arg(call, 1, "running_mean") is None:
                return None
        if self.kind in ("layer_norm", "rms_norm"):
            shape = _arg(call, 1, "normalized_shape")
            if shape is None or len(tuple(shape)) >= active[0].dim():
                return None
        if self.kind == "group_norm" and active[0].dim() < 2:
            return None
        return super().samples(call, active, kinds, n)

    def is_curved(self, call, active):
        return self.kind != "batch_norm"

    def is_elementwise(self, call, active):
        return self.kind == "batch_norm" and _same_shape(call, active)

    def diagonal_jacobian(self, call, active):
        r"""Eval batch norm: the weight over :math:`\sqrt{\text{running var} + \epsilon}`."""
        x = active[0]
        var, weight = _arg(call, 2, "running_var"), _arg(call, 3, "weight")
        eps = _arg(call, 7, "eps", 1e-5)
        if self.kind != "batch_norm" or not isinstance(var, Tensor) or x.dim() < 2:
            return None
        scale = (var + eps).rsqrt()
        if isinstance(weight, Tensor):
            scale = scale * weight
        elif weight is not None:
            return None
        shape = [1] * x.dim()
        shape[1] = -1
        return torch.zeros_like(call.out) + scale.reshape(shape)

    def fast_vjp(self, call, active, cols):
        r"""Layer norm over the trailing axes: :math:`J^\top c = \sigma^{-1}(u - \bar u
        - \hat x\, \overline{u \hat x})` with :math:`u = c \odot w` (means over the
        normalised axes), the derivative of :math:`\hat x = (x - \mu)/\sigma`."""
        if self.kind != "layer_norm" or call.args[0] is not active[0]:
            return None
        x = active[0]
        shape = _arg(call, 1, "normalized_shape")
        weight, eps = _arg(call, 2, "weight"), _arg(call, 4, "eps", 1e-5)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if len(call.args) > 5 or set(call.kwargs) - {"weight", "bias", "eps"}:
            return None
        if weight is not None and not isinstance(weight, Tensor):
            return None
        dims = tuple(range(x.dim() - len(shape), x.dim()))
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        rstd = (var + eps).rsqrt()
        xhat = (x - mean) * rstd
        u = cols if weight is None else cols * weight
        kdims = tuple(d + 1 for d in dims)
        res = rstd * (u - u.mean(kdims, keepdim=True) - xhat * (u * xhat).mean(kdims, keepdim=True))
        return [res]

    def columns_fit(self, call, active):
        found = self._row_norm(call, active)
        if found is not None:
            return _columns_fit(4 * active[0].numel() // (found[0] * active[0].shape[0]), active)
        return _dense_ok(active)

    def per_position(self, call, active):
        """A layer/RMS norm over the last axis (eval batch norm: elementwise)."""
        found = self._row_norm(call, active)
        return (found is not None and found[0] == active[0].shape[-1]) or self.is_elementwise(
            call, active
        )

    def residual(self, call, active, g_out):
        found = self._row_norm(call, active)
        if found is not None:
            return _row_norm_residual(active[0], g_out, *found, centred=self.kind == "layer_norm")
        return _dense_residual(call, active, g_out)

    def _row_norm(self, call, active) -> tuple[int, Tensor | None, float] | None:
        """``(normalised entries D, weight, eps)`` of a layer/RMS norm whose residual has
        the closed form of :func:`_row_norm_residual`, else ``None``."""
        if self.kind not in ("layer_norm", "rms_norm") or call.args[0] is not active[0]:
            return None
        names = ("input", "normalized_shape", "weight", "bias", "eps")
        if self.kind == "rms_norm":
            names = ("input", "normalized_shape", "weight", "eps")
        if len(call.args) > len(names) or set(call.kwargs) - set(names):
            return None
        bound = dict(zip(names, call.args))
        bound.update(call.kwargs)
        shape = bound.get("normalized_shape")
        weight, eps = bound.get("weight"), bound.get("eps")
        if weight is not None and not isinstance(weight, Tensor):
            return None
        if eps is None:
            eps = 1e-5 if self.kind == "layer_norm" else torch.finfo(active[0].dtype).eps
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return math.prod(shape), weight, float(eps)


def _row_norm_residual(
    x: Tensor, g_out: Tensor, d: int, weight: Tensor | None, eps: float, centred: bool
) -> Residual:
    r"""The residual of a layer norm (``centred``) or RMS norm over the last ``d`` entries.

    Per row, with :math:`c = Px` (:math:`P = I - \mathbf 1\mathbf 1^\top/D` for the
    layer norm, :math:`I` for the RMS norm), :math:`\sigma^2 = |c|^2/D + \epsilon`,
    :math:`\hat x = c/\sigma`, :math:`a = g \odot w` (the gradient at the output times
    the weight), :math:`u = Pa` and :math:`s = a^\top \hat x`, the Hessian of
    :math:`\langle a, \hat x\rangle` is

    .. math::
        \frac{1}{D\sigma^2}\Big(-s P + 3\frac{s}{D}\hat x\hat x^\top
        - (u\hat x^\top + \hat x u^\top)\Big):

    a diagonal :math:`-s/(D\sigma^2)`, and per row four signed columns (three for the
    RMS norm): :math:`\mathbf 1`, :math:`\hat x`, and :math:`u/\gamma \pm \gamma\hat x`
    (:math:`\gamma^2 = |u|/|\hat x|`, balanced) for the symmetric product.
    """
    n = x.shape[0]
    xr = x.reshape(n, -1, d)  # (N, R, D)
    rows = xr.shape[1]
    a = g_out.reshape(n, rows, d)
    if weight is not None:
        a = a * weight.reshape(d)
    if centred:
        c = xr - xr.mean(-1, keepdim=True)
        u = a - a.mean(-1, keepdim=True)
    else:
        c, u = xr, a
    var = (c * c).mean(-1, keepdim=True) + eps
    xhat = c * var.rsqrt()
    s = (a * xhat).sum(-1, keepdim=True)  # (N, R, 1)
    scale = 1.0 / (d * var)  # (N, R, 1)
    diag = (-s * scale).expand(n, rows, d).reshape(x.shape)
    size = xhat.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    gamma = (u.norm(dim=-1, keepdim=True) / size).sqrt()
    gamma = torch.where(gamma > 0, gamma, torch.ones_like(gamma))
    half = (0.5 * scale).sqrt()
    parts = [
        (xhat * (3 * s.abs() * scale / d).sqrt(), torch.sign(s)),
        ((u / gamma + gamma * xhat) * half, -torch.ones_like(s)),
        ((u / gamma - gamma * xhat) * half, torch.ones_like(s)),
    ]
    if centred:
        ones = torch.ones_like(xhat) * (s.abs() * scale / d).sqrt()
        parts.append((ones, torch.sign(s)))
    eye = torch.eye(rows, dtype=x.dtype, device=x.device)
    cols, signs = [], []
    for values, sign in parts:
        cols.append(torch.einsum("nrd,kr->knrd", values, eye).reshape(rows, *x.shape))
        signs.append(sign.reshape(n, rows).T)
    return Residual({id(x): diag}, {id(x): torch.cat(cols)}, torch.cat(signs))


class Dropout(Rule):
    """Eval (or ``p = 0``) dropout: the identity."""

    elementwise = True

    def samples(self, call, active, kinds, n):
        p = _arg(call, 1, "p", 0.5)
        training = _arg(call, 2, "training", True)
        if (training and p != 0) or _arg(call, 3, "inplace", False):
            return None
        return super().samples(call, active, kinds, n)

    def diagonal_jacobian(self, call, active):
        return torch.ones_like(call.out)


class Shape(Rule):
    """A shape change, copy or selection that keeps the leading axis where it is.

    ``many``: several active inputs allowed (``cat``, ``stack``).
    """

    def __init__(self, check: Callable[[Call, Tensor | None], bool], many: bool = False):
        self.check = check
        self.many = many

    def samples(self, call, active, kinds, n):
        if len(active) > 1 and not self.many:
            return None
        if call.args and isinstance(call.args[0], Tensor) and call.args[0] in active:
            if not self.check(call, call.args[0]):
                return None
        elif not self.check(call, None):
            return None
        outs = call.outputs()
        if any(o is a for o in outs for a in active):
            return None  # in place (``unsqueeze_``): the recorded input is gone
        if all(k == BATCHED for k in kinds) and all(o.dim() > 0 and o.shape[0] == n for o in outs):
            return BATCHED
        return None


class Reshape(Shape):
    """``view``/``reshape``/``flatten``/...: the columns are reshaped back."""

    def fast_vjp(self, call, active, cols):
        (x,) = active
        return [cols.reshape(cols.shape[0], *x.shape)]


class LinearInput(Shape):
    """``F.linear``/convolutions reading a constant weight: linear in their input."""

    def per_position(self, call, active):
        """``F.linear`` mixes the last axis only."""
        return call.func is F.linear and len(active) == 1 and call.args[0] is active[0]

    def fast_vjp(self, call, active, cols):
        (x,) = active
        if call.args[0] is not x:
            return None
        w = _arg(call, 1, "weight")
        k = cols.shape[0]
        if call.func is F.linear:
            return [cols @ w]
        spatial = _SPATIAL.get(call.func)
        if call.func not in (F.conv1d, F.conv2d, F.conv3d) or len(call.args) + len(call.kwargs) > 7:
            return None
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        bound = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
        bound.update(zip(names, call.args))
        bound.update(call.kwargs)
        if isinstance(bound["padding"], str):
            return None
        grad_input = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input,
                      3: torch.nn.grad.conv3d_input}[spatial]  # fmt: skip
        out = call.out
        folded = cols.reshape(k * out.shape[0], *out.shape[1:])
        size = (k * x.shape[0], *x.shape[1:])
        res = grad_input(
            size, w, folded, bound["stride"], bound["padding"], bound["dilation"], bound["groups"]
        )
        return [res.reshape(k, *x.shape)]


class MaxPool(Shape):
    """``F.max_pool{1,2,3}d``: the Jacobian transpose scatters each output entry to the input
    entry that won (the indices of one extra call), as torch's own backward does."""

    _NAMES = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
              "return_indices")  # fmt: skip

    def fast_vjp(self, call, active, cols):
        (x,) = active
        if len(call.args) > len(self._NAMES) or any(k not in self._NAMES for k in call.kwargs):
            return None
        bound = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False}
        bound.update(zip(self._NAMES, call.args))
        bound.update(call.kwargs)
        spatial = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}[call.func]
        if bound.get("return_indices") or bound["input"] is not x or x.dim() != spatial + 2:
            return None
        indices = getattr(call, "_pool_indices", None)
        if indices is None:
            with_indices = {
                F.max_pool1d: F.max_pool1d_with_indices,
                F.max_pool2d: F.max_pool2d_with_indices,
                F.max_pool3d: F.max_pool3d_with_indices,
            }[call.func]
            args = [bound[k] for k in self._NAMES[:6]]
            indices = with_indices(*args)[1]
            call._pool_indices = indices  # type: ignore[attr-defined]
        k = cols.shape[0]
        lead = x.shape[:2]
        flat = cols.reshape(k, *lead, -1)
        idx = indices.reshape(1, *lead, -1).expand(k, *lead, flat.shape[-1])
        res = flat.new_zeros(k, *lead, x[0, 0].numel()).scatter_add_(-1, idx, flat)
        return [res.reshape(k, *x.shape)]


class AvgPool(Shape):
    """``F.avg_pool2d``/``F.avg_pool3d``: torch's backward kernel on the columns folded
    into the batch."""

    _NAMES = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
              "divisor_override")  # fmt: skip

    def fast_vjp(self, call, active, cols):
        (x,) = active
        if len(call.args) > len(self._NAMES) or any(k not in self._NAMES for k in call.kwargs):
            return None
        bound = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                 "divisor_override": None}  # fmt: skip
        bound.update(zip(self._NAMES, call.args))
        bound.update(call.kwargs)
        dims = 2 if call.func is F.avg_pool2d else 3
        if bound["input"] is not x or x.dim() != dims + 2:
            return None

        def tup(v):
            return (v,) * dims if isinstance(v, int) else tuple(v)

        kernel = tup(bound["kernel_size"])
        stride = kernel if bound["stride"] in (None, [], ()) else tup(bound["stride"])
        backward = (
            torch.ops.aten.avg_pool2d_backward if dims == 2 else torch.ops.aten.avg_pool3d_backward
        )
        k, out = cols.shape[0], call.out
        folded = cols.reshape(k * out.shape[0], *out.shape[1:])
        shape = x.new_empty(()).expand(k * x.shape[0], *x.shape[1:])
        res = backward(
            folded, shape, kernel, stride, tup(bound["padding"]), bool(bound["ceil_mode"]),
            bool(bound["count_include_pad"]), bound["divisor_override"],
        )  # fmt: skip
        return [res.reshape(k, *x.shape)]


def _axis(kind: str | None) -> int | None:
    """Where the leading (sample) axis sits: ``"batched"`` 0, ``"axis<j>"`` j."""
    if kind == BATCHED:
        return 0
    if kind is not None and kind.startswith("axis"):
        return int(kind[4:])
    return None


def _kind_at(axis: int, outs: list[Tensor], n: int) -> str | None:
    if not outs or any(o.dim() <= axis or o.shape[axis] != n for o in outs):
        return None
    return BATCHED if axis == 0 else f"axis{axis}"


class Moves(Rule):
    """``permute``/``transpose``/``unbind``/integer indexing: the sample axis may move.

    A tensor whose sample axis is not the leading one (``q, k, v`` packed in front,
    as in ``qkv.view(b, s, 3, h, d).permute(2, 0, 3, 1, 4)``) only passes through
    these calls until the axis is in front again.
    """

    def samples(self, call, active, kinds, n):
        if len(active) != 1 or not call.args or call.args[0] is not active[0]:
            return None
        x, axis = active[0], _axis(kinds[0])
        if axis is None or _inplace(call):
            return None
        outs = call.outputs()
        name, ndim = call.name, x.dim()
        if name == "permute":
            dims = call.args[1:] if len(call.args) > 2 else _arg(call, 1, "dims")
            dims = [d % ndim for d in ((dims,) if isinstance(dims, int) else dims)]
            return _kind_at(dims.index(axis), outs, n) if axis in dims else None
        if name == "transpose":
            d0, d1 = _arg(call, 1, "dim0") % ndim, _arg(call, 2, "dim1") % ndim
            return _kind_at({d0: d1, d1: d0}.get(axis, axis), outs, n)
        if name == "unbind":
            dim = _arg(call, 1, "dim", 0) % ndim
            return None if dim == axis else _kind_at(axis - (dim < axis), outs, n)
        index = call.args[1]
        if (
            axis > 0
            and isinstance(index, int)
            or isinstance(index, tuple)
            and (len(index) == 1 and isinstance(index[0], int))
        ):
            return _kind_at(axis - 1, outs, n) if axis > 0 else None
        if axis == 0 and _getitem_ok(call, x):
            return _kind_at(0, outs, n)
        return None

    def fast_vjp(self, call, active, cols):
        """``permute``/``transpose``: the inverse move on the columns (after the column axis)."""
        x = active[0]
        if call.args[0] is not x:
            return None
        ndim = x.dim()
        if call.name == "permute":
            dims = call.args[1:] if len(call.args) > 2 else _arg(call, 1, "dims")
            dims = [d % ndim for d in ((dims,) if isinstance(dims, int) else dims)]
            inverse = [0] * ndim
            for i, d in enumerate(dims):
                inverse[d] = i
            return [cols.permute(0, *[i + 1 for i in inverse])]
        if call.name == "transpose":
            d0, d1 = _arg(call, 1, "dim0") % ndim, _arg(call, 2, "dim1") % ndim
            return [cols.transpose(d0 + 1, d1 + 1)]
        return None


def _inplace(call: Call) -> bool:
    if call.kwargs.get("inplace") or "out" in call.kwargs:
        return True
    return any(call.out is t for t in call.tensor_inputs())


def _keeps_lead(call: Call, x: Tensor | None) -> bool:
    """``view``/``reshape``/``flatten``/``contiguous``/...: leading size kept (row-major)."""
    out = call.out
    return x is not None and isinstance(out, Tensor) and out.dim() > 0


def _no_dim0(index: int, name: str, default=None):
    def check(call: Call, x: Tensor | None) -> bool:
        if x is None:
            return False
        dims = _arg(call, index, name, default)
        dims = _dims(dims, max(x.dim(), 1) + (1 if call.name == "unsqueeze" else 0))
        return dims is not None and 0 not in dims

    return check


def _flatten_ok(call: Call, x: Tensor | None) -> bool:
    return x is not None and (x.dim() == 0 or _arg(call, 1, "start_dim", 0) % x.dim() != 0)


def _getitem_ok(call: Call, x: Tensor | None) -> bool:
    if x is None:
        return False
    index = call.args[1]
    if not isinstance(index, tuple):
        index = (index,)
    tensors = sum(isinstance(i, (Tensor, list)) for i in index)
    if tensors > 1 or any(isinstance(i, bool) for i in index):
        return False
    first = index[0] if index else slice(None)
    if first is Ellipsis:
        rest = [i for i in index[1:] if i is not None and i is not Ellipsis]
        return len(rest) < x.dim() and Ellipsis not in index[1:]
    return isinstance(first, slice) and first == slice(None)


def _cat_ok(call: Call, x: Tensor | None) -> bool:
    tensors = _arg(call, 0, "tensors")
    dim = _arg(call, 1, "dim", 0)
    if not isinstance(tensors, (list, tuple)) or not tensors:
        return False
    ndim = tensors[0].dim() + (1 if call.name == "stack" else 0)
    return dim % ndim != 0


def _split_ok(call: Call, x: Tensor | None) -> bool:
    return x is not None and _arg(call, 2, "dim", 0) % x.dim() != 0


def _pad_ok(call: Call, x: Tensor | None) -> bool:
    pad = _arg(call, 1, "pad")
    mode = _arg(call, 2, "mode", "constant")
    if x is None or pad is None or mode != "constant":
        return False
    return len(pad) // 2 < x.dim()  # the leading axis is not padded


def _spatial_ok(call: Call, x: Tensor | None) -> bool:
    """Pooling: batched input ``(N, C, *spatial)``; no indices returned (one output)."""
    return x is not None and isinstance(call.out, Tensor) and x.dim() >= 3


def _always(call: Call, x: Tensor | None) -> bool:
    return x is not None


_SPATIAL = {
    F.conv1d: 1, F.conv2d: 2, F.conv3d: 3,
    F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3,
}  # fmt: skip


def _site_input_ok(call: Call, x: Tensor | None) -> bool:
    """A linear/convolution reading a constant weight: linear in the input (batched)."""
    w = _arg(call, 1, "weight")
    if x is None or not isinstance(w, Tensor):
        return False
    spatial = _SPATIAL.get(call.func)
    return x.dim() > 1 if spatial is None else x.dim() == spatial + 2


def elementwise_derivatives(
    call: Call, z: Tensor, piecewise_linear: bool
) -> tuple[Tensor, Tensor] | None:
    r""":math:`\sigma'(z)` and :math:`\sigma''(z)` of the recorded elementwise call, or ``None``.

    Reverse over reverse with autograd on a detached copy of ``z`` (grad mode on):
    the gradient of :math:`\sum\sigma(z)` is :math:`\sigma'(z)` and the gradient
    of :math:`\sum\sigma'(z)` is :math:`\sigma''(z)`, the derivatives autograd's
    own double backward gives (nested forward mode under ``no_grad`` lacks rules,
    e.g. ``silu_backward``).  Piecewise-linear calls get :math:`\sigma'' = 0`.
    ``None`` when torch has no derivative for the call.
    """
    cached = getattr(call, "_derivatives", None)
    if cached is not None and cached[0] is z:
        return cached[1]
    found = _derivatives(call, z, piecewise_linear)
    call._derivatives = (z, found)  # type: ignore[attr-defined]
    return found


_RELU = (F.relu, torch.relu, Tensor.relu)
_TANH = (torch.tanh, Tensor.tanh, F.tanh)
_SIGMOID = (torch.sigmoid, Tensor.sigmoid, F.sigmoid)


def _closed_form(call: Call, z: Tensor) -> tuple[Tensor, Tensor] | None:
    r""":math:`\sigma', \sigma''` of ``relu``/``tanh``/``sigmoid`` from the recorded output
    (autograd's backward formulas: ``out > 0``, :math:`1 - t^2`, :math:`s(1 - s)`)."""
    out = call.out
    extra = [v for v in call.kwargs.values() if v is not False] + list(call.args[1:])
    if extra or not isinstance(out, Tensor) or out.shape != z.shape:
        return None
    func = call.func
    if func in _RELU:
        return (out > 0).to(z.dtype), torch.zeros_like(z)
    if func in _TANH:
        d1 = 1.0 - out * out
        return d1, -2.0 * out * d1
    if func in _SIGMOID:
        d1 = out * (1.0 - out)
        return d1, d1 * (1.0 - 2.0 * out)
    return None


def _derivatives(call: Call, z: Tensor, piecewise_linear: bool):
    rest, kwargs = call.args[1:], call.kwargs
    closed = _closed_form(call, z)
    if closed is not None:
        return closed
    if call.func is F.hardsigmoid:
        # torch's backward multiplies by 1/6 rounded to float32 (5e-9 off in float64)
        inside = (z > -3.0) & (z < 3.0)
        return inside.to(z.dtype) / 6.0, torch.zeros_like(z)
    try:
        with torch.enable_grad():
            t = z.detach().requires_grad_(True)
            a = call.func(t, *rest, **kwargs)
            if not a.requires_grad:
                return None
            (d1,) = torch.autograd.grad(a, t, torch.ones_like(a), create_graph=not piecewise_linear)
            if piecewise_linear or not d1.requires_grad:
                d2 = torch.zeros_like(z)
            else:
                (d2,) = torch.autograd.grad(d1, t, torch.ones_like(d1), allow_unused=True)
                if d2 is None:
                    d2 = torch.zeros_like(z)
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return d1.detach(), d2.detach()


#: Per-slice entries above which the dense residual of a call is not formed.
DENSE_LIMIT = 1024

#: Entries (columns times the entries of each) above which a residual's columns, formed
#: at once, are not formed (about 1 GiB in float64): the call is then not crossed and
#: the parameters upstream of it take the tangent route (or the sweep).  In a 1-layer
#: transformer (d 32, 4 heads) at 16 tokens and batch 8 every residual fits; at 64 tokens
#: and batch 4 the product ``P @ V`` (3.0e8 entries) does not.
RESIDUAL_ENTRIES = 2**27


def _columns_fit(count: int, active: list[Tensor]) -> bool:
    """Whether ``count`` columns on the active inputs stay within :data:`RESIDUAL_ENTRIES`."""
    return count * sum(a.numel() for a in active) <= RESIDUAL_ENTRIES


def _dense_residual(call: Call, active: list[Tensor], g_out: Tensor) -> Residual | None:
    r"""The residual :math:`\sum_j g_j \nabla^2 out_j` from the dense Hessian of each slice.

    Hessian-vector products of :math:`\langle g, f(in)\rangle` with a unit
    tangent at one entry of every slice at once (the call acts on slices
    separately, so each slice's block comes out), then a symmetric
    eigendecomposition per slice: columns :math:`v\sqrt{|\lambda|}`, signs
    :math:`\operatorname{sign}\lambda` (eigenvalues below :math:`10^{-14}` of
    the slice's largest dropped).  ``None`` when a slice has more than
    :data:`DENSE_LIMIT` entries.
    """
    from torch.func import grad, vjp, vmap

    from torch_secorder.func._fixes import differentiable

    n = active[0].shape[0]
    sizes = [a[0].numel() for a in active]
    total = sum(sizes)
    if total > DENSE_LIMIT or total == 0:
        return None
    fn = _substituted(call, active)
    outs = call.out

    def phi(*xs: Tensor) -> Tensor:
        out = differentiable(fn)(*xs)
        if isinstance(outs, Tensor):
            return (out * g_out).sum()
        return sum((o * g).sum() for o, g in zip(out, g_out, strict=True))

    primals = tuple(a.detach() for a in active)
    gradient = grad(phi, argnums=tuple(range(len(active))))

    def hvp(*vs: Tensor):
        return vjp(lambda *xs: gradient(*xs), *primals)[1](tuple(vs))

    tangents = []
    eye = torch.eye(total, dtype=active[0].dtype, device=active[0].device)
    offset = 0
    for a, size in zip(active, sizes, strict=True):
        block = eye[:, offset : offset + size]  # (total, size)
        tangents.append(block[:, None, :].expand(total, n, size).reshape(total, *a.shape))
        offset += size
    with torch.enable_grad():
        products = vmap(hvp)(*tangents)
    h = torch.cat([p.reshape(total, n, -1) for p in products], dim=2)  # (total, N, total)
    return _eig_columns(active, h.permute(1, 0, 2))


def _eig_columns(active: list[Tensor], h: Tensor) -> Residual:
    r"""Signed columns of the per-slice symmetric matrices ``h`` ``(N, D, D)`` (the
    active inputs' slices concatenated): eigenvectors times :math:`\sqrt{|\lambda|}`."""
    n, total = h.shape[0], h.shape[1]
    sizes = [a[0].numel() for a in active]
    h = 0.5 * (h + h.transpose(1, 2))
    values, vectors = torch.linalg.eigh(h)  # (N, total), (N, total, total)
    top = values.abs().amax(1, keepdim=True)
    keep = values.abs() > 1e-14 * top
    if not bool(keep.any()):
        return Residual({})
    rank = int(keep.sum(1).max())
    order = values.abs().argsort(1, descending=True)[:, :rank]  # (N, rank)
    values = values.gather(1, order) * keep.gather(1, order)
    vectors = vectors.gather(2, order[:, None, :].expand(n, total, rank))
    cols = (vectors * values.abs().sqrt()[:, None, :]).permute(2, 0, 1)  # (rank, N, total)
    columns = {}
    offset = 0
    for a, size in zip(active, sizes, strict=True):
        columns[id(a)] = cols[:, :, offset : offset + size].reshape(rank, *a.shape)
        offset += size
    return Residual({}, columns, torch.sign(values).T)


def _substituted(call: Call, active: list[Tensor]) -> Callable[..., object]:
    """The recorded call as a function of its active inputs (the rest fixed)."""
    ids = [id(a) for a in active]

    def swap(obj, xs):
        if isinstance(obj, Tensor):
            for i, x in zip(ids, xs, strict=True):
                if id(obj) == i:
                    return x
            return obj
        if isinstance(obj, (list, tuple)):
            return type(obj)(swap(o, xs) for o in obj)
        if isinstance(obj, dict):
            return {k: swap(v, xs) for k, v in obj.items()}
        return obj

    def fn(*xs: Tensor):
        return call.func(*swap(call.args, xs), **swap(call.kwargs, xs))

    return fn


substituted = _substituted


def _build_table() -> dict[Callable, Rule]:
    table: dict[Callable, Rule] = {}

    def add(funcs, rule: Rule) -> None:
        for f in funcs:
            table[f] = rule

    smooth = [
        torch.tanh, Tensor.tanh, F.tanh, torch.sigmoid, Tensor.sigmoid, F.sigmoid, F.silu,
        F.gelu, F.elu, F.celu, torch.celu, F.selu, torch.selu, F.softplus, F.mish, F.hardswish,
        F.logsigmoid, F.softsign, F.tanhshrink, torch.exp, Tensor.exp, torch.log, Tensor.log,
        torch.sqrt, Tensor.sqrt, torch.rsqrt, Tensor.rsqrt, torch.sin, Tensor.sin, torch.cos,
        Tensor.cos, torch.square, Tensor.square, Tensor.pow, torch.pow, Tensor.__pow__,
        torch.reciprocal, Tensor.reciprocal, torch.log1p, Tensor.log1p, torch.expm1,
        torch.erf, Tensor.erf,
    ]  # fmt: skip
    add(smooth, Activation())
    piecewise = [
        F.relu, torch.relu, Tensor.relu, F.relu6, F.leaky_relu, F.hardtanh, F.hardsigmoid,
        F.hardshrink, F.softshrink, F.threshold, torch.abs, Tensor.abs, Tensor.__abs__,
    ]  # fmt: skip
    add(piecewise, Activation(piecewise_linear=True))
    add([torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__], Pointwise("add"))
    add([torch.sub, Tensor.sub, Tensor.__sub__, Tensor.__rsub__], Pointwise("add"))
    add([torch.neg, Tensor.neg, Tensor.__neg__], Pointwise("neg"))
    add([torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__], Pointwise("mul"))
    add([torch.div, Tensor.div, Tensor.__truediv__], Pointwise("div"))
    add([torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm], Matmul())
    add([torch.softmax, Tensor.softmax, F.softmax], Softmax(log=False))
    add([torch.log_softmax, Tensor.log_softmax, F.log_softmax], Softmax(log=True))
    add([torch.sum, Tensor.sum, torch.mean, Tensor.mean], Reduce())
    add([F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout], Dropout())
    add([F.layer_norm], Norm("layer_norm"))
    add([F.rms_norm], Norm("rms_norm"))
    add([F.group_norm], Norm("group_norm"))
    add([F.batch_norm], Norm("batch_norm"))
    losses = [
        F.cross_entropy, F.nll_loss, F.mse_loss, F.binary_cross_entropy_with_logits,
        F.binary_cross_entropy, F.smooth_l1_loss, F.huber_loss, F.kl_div,
        F.poisson_nll_loss, F.soft_margin_loss,
    ]  # fmt: skip
    add(losses, Loss())
    add([F.l1_loss], Loss(piecewise_linear=True))
    linear_in_input = [
        F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
        F.conv_transpose3d,
    ]  # fmt: skip
    add(linear_in_input, LinearInput(_site_input_ok))
    keeps = [
        Tensor.view, Tensor.reshape, torch.reshape, Tensor.contiguous, Tensor.clone,
        torch.clone, Tensor.view_as, Tensor.reshape_as,
    ]  # fmt: skip
    add(keeps, Reshape(_keeps_lead))
    add([torch.flatten, Tensor.flatten], Reshape(_flatten_ok))
    add([Tensor.permute, torch.permute, Tensor.transpose, torch.transpose], Moves())
    add([Tensor.__getitem__, Tensor.unbind, torch.unbind], Moves())
    add([torch.cat, torch.concat, torch.stack], Shape(_cat_ok, many=True))
    add([torch.split, Tensor.split, torch.chunk, Tensor.chunk], Shape(_split_ok))
    add([Tensor.unsqueeze, torch.unsqueeze], Shape(_no_dim0(1, "dim")))
    add([Tensor.squeeze, torch.squeeze], Shape(_no_dim0(1, "dim")))
    add([F.pad], Shape(_pad_ok))
    pools = [
        F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
        F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
        F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
        torch.max_pool1d, torch.max_pool2d, torch.max_pool3d, torch.avg_pool1d,
        torch.adaptive_avg_pool1d,
    ]  # fmt: skip
    add(pools, Shape(_spatial_ok))
    add([F.max_pool1d, F.max_pool2d, F.max_pool3d], MaxPool(_spatial_ok))
    add([F.avg_pool2d, F.avg_pool3d], AvgPool(_spatial_ok))
    add([F.interpolate, F.upsample], Shape(_spatial_ok))  # linear in the input, any mode
    return table


#: The recorded function -> its rule.
RULES: dict[Callable, Rule] = _build_table()


def rule_for(call: Call) -> Rule | None:
    """The rule of a recorded call, or ``None``."""
    try:
        return RULES.get(call.func)
    except TypeError:  # an unhashable callable
        return None
