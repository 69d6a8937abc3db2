r"""The chain route: closed-form backpropagation of the exact per-sample Hessian.

Applies when the recorded loss is a chain of ``F.linear`` calls on ``(N, D)``
activations, zero-padded ungrouped ``F.conv1d``/``F.conv2d`` calls (any stride
and dilation; per sample a matrix :math:`A` whose entries are single weights or
zeros), elementwise activations (``tanh``, ``sigmoid``, ``silu``, ``gelu``,
``elu``, ``celu``, ``selu``, ``softplus``, ``mish``, ``hardswish``, ``logsigmoid``,
``softsign``, ``tanhshrink`` and the piecewise-linear ``relu``, ``relu6``,
``leaky_relu``, ``hardtanh``, ``hardsigmoid``, ``hardshrink``, ``softshrink``,
``threshold``; a ``flatten`` ``(N, ...) -> (N, D)``
and eval ``dropout`` pass through), ending in ``F.mse_loss`` or
``F.cross_entropy`` (``"mean"`` or ``"sum"``) on ``(N, C)``, each intermediate
result used exactly once by the next call, and every parameter read by one such
call only.  The samples then never
interact, and the Hessian of the loss with respect to a layer output ``z`` is,
per sample, a sum of three kinds of terms:

* ``diag(r)``: from the loss (:math:`2/s` for MSE, :math:`p/s` for
  cross-entropy) and from each activation, :math:`\sigma''(z)\odot\nabla_a L`;
* ``S diag(sign) S^T``: signed columns (cross-entropy's :math:`-pp^\top/s`, and
  terms that crossed two linear layers);
* ``(W diag(d))^T diag(r) (W diag(d))``: a diagonal term that crossed one linear
  layer ``W`` (and activations, ``d``); its diagonal is
  :math:`d^2 \odot ((W\odot W)^\top r)`, no columns needed.

Crossing a linear layer multiplies columns by :math:`W^\top`, an activation
scales rows by :math:`\sigma'`; a third-kind term becomes signed columns
:math:`W'^\top \operatorname{diag}(d) W^\top \operatorname{diag}(\sqrt{|r|})`
when it meets a second linear layer.  At every layer output, the diagonal gives
the weight's :math:`(\operatorname{diag} H_z)^\top (x \odot x)` and the bias's
column sums.  A convolution's weight reads many entries of one sample's
output, so there the third kind becomes signed columns first, and the weight's
diagonal is the sum of the squared per-sample weight gradients of the signed
columns plus the convolution's weight gradient of :math:`(x \odot x, r)`;
crossing a convolution applies its input backward to the columns, and the
:math:`(A \odot A)^\top r` of a third-kind term is the same backward with the
weights squared.  Where the columns would exceed the device's chunk budget
(:func:`torch_secorder._chunks.chunk_entries`: ``2**24`` entries on the CPU, from
the free memory on CUDA) the route declines (the layer route or the sweep takes
over).  The first and second derivatives of the activations come from
autograd's double backward of the very call recorded (zero second derivatives
for piecewise-linear ones), so they match the other routes'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from torch_secorder._chunks import chunk_entries
from torch_secorder.func._rules import elementwise_derivatives
from torch_secorder.func._tape import Call

__all__ = ["chain_diagonal"]

#: Elementwise activations the chain passes through (their calls as recorded).
_ELEMENTWISE = {
    torch.tanh,
    Tensor.tanh,
    F.tanh,
    torch.sigmoid,
    Tensor.sigmoid,
    F.sigmoid,
    F.silu,
    F.gelu,
    F.elu,
    F.celu,
    torch.celu,
    F.selu,
    torch.selu,
    F.softplus,
    F.mish,
    F.hardswish,
    F.logsigmoid,
    F.softsign,
    F.tanhshrink,
}
#: Piecewise-linear activations: second derivative zero wherever it exists (torch
#: has no double backward for some of them, e.g. ``hardsigmoid``).
_PIECEWISE_LINEAR = {
    F.relu,
    torch.relu,
    Tensor.relu,
    F.relu6,
    F.leaky_relu,
    F.hardtanh,
    F.hardsigmoid,
    F.hardshrink,
    F.softshrink,
    F.threshold,
}
_ELEMENTWISE |= _PIECEWISE_LINEAR
_PASS = {torch.flatten, Tensor.flatten, F.dropout}
_LOSSES = {F.mse_loss, F.cross_entropy}
_CONVS = {F.conv1d: 1, F.conv2d: 2}


@dataclass
class _Linear:
    """``z = x W^T + b`` on ``(N, D)``."""

    x: Tensor
    weight: Tensor
    roles: dict[str, int]

    @property
    def d_out(self) -> int:
        return self.weight.shape[0]

    @property
    def d_in(self) -> int:
        return self.weight.shape[1]

    def back(self, cols: Tensor) -> Tensor:
        """Columns ``(N, m, D_out)`` at the output -> at the input (times the matrix)."""
        return _through(cols, self.weight)

    def back_sq(self, r: Tensor) -> Tensor:
        """``(N, D_out) -> (N, D_in)``: ``r`` times the entrywise square of the matrix."""
        return r @ (self.weight * self.weight)

    def matrix(self) -> Tensor:
        return self.weight


@dataclass
class _Conv:
    r"""A zero-padded, ungrouped 1-d or 2-d convolution, held in 2-d form.

    Per sample it is a matrix :math:`A` (``D_out x D_in``) whose entries are
    single weights or zeros, so :math:`(A \odot A)` is the same convolution with
    the weights squared.
    """

    x: Tensor  # (N, C_in, H, W)
    weight: Tensor  # (C_out, C_in, kh, kw)
    roles: dict[str, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    out_hw: tuple[int, int]

    @property
    def d_out(self) -> int:
        return self.weight.shape[0] * self.out_hw[0] * self.out_hw[1]

    @property
    def d_in(self) -> int:
        return self.x[0].numel()

    def _input(self, batch: int, weight: Tensor, grad_out: Tensor) -> Tensor:
        size = (batch, *self.x.shape[1:])
        grad_out = grad_out.reshape(batch, self.weight.shape[0], *self.out_hw)
        return torch.nn.grad.conv2d_input(
            size, weight, grad_out, self.stride, self.padding, self.dilation
        ).reshape(batch, -1)

    def back(self, cols: Tensor) -> Tensor:
        n, m, _ = cols.shape
        if m == 0:
            return cols.new_zeros(n, 0, self.d_in)
        return self._input(n * m, self.weight, cols).reshape(n, m, -1)

    def back_sq(self, r: Tensor) -> Tensor:
        return self._input(r.shape[0], self.weight * self.weight, r)

    def matrix(self) -> Tensor:
        eye = torch.eye(self.d_out, dtype=self.x.dtype, device=self.x.device)
        return self._input(self.d_out, self.weight, eye)

    def patches(self) -> Tensor:
        """``(N, C_in kh kw, L)``: the input entry each weight meets at each output position."""
        k = self.weight.shape[2:]
        return F.unfold(self.x, k, self.dilation, self.padding, self.stride)

    def diagonals(self, diag: Tensor | None, cols) -> dict[str, Tensor]:
        """Weight and bias diagonals from the output Hessian ``diag(diag) + S diag(sign) S^T``."""
        c_out = self.weight.shape[0]
        n = self.x.shape[0]
        pat = self.patches()
        wd = self.x.new_zeros(c_out, pat.shape[1])
        bd = self.x.new_zeros(c_out)
        if diag is not None:
            r = diag.reshape(n, c_out, -1)
            wd = wd + torch.einsum("nol,njl->oj", r, pat * pat)
            bd = bd + r.sum((0, 2))
        for s, sign in cols:
            if s.shape[1] == 0:
                continue
            s4 = s.reshape(n, s.shape[1], c_out, -1)
            per = torch.einsum("nmol,njl->nmoj", s4, pat)  # per-sample weight gradients
            wd = wd + torch.einsum("nmoj,nmoj,nm->oj", per, per, sign)
            b = s4.sum(-1)
            bd = bd + torch.einsum("nmo,nmo,nm->o", b, b, sign)
        out = {}
        if "weight" in self.roles:
            out["weight"] = wd
        if "bias" in self.roles:
            out["bias"] = bd
        return out


@dataclass
class _Act:
    """An elementwise activation ``a = sigma(z)`` and, once computed, its derivatives."""

    call: Call
    z: Tensor
    d1: Tensor | None = None
    d2: Tensor | None = None


def _is_external(t: Tensor, produced: set[int], leaf_ids: dict[int, int]) -> bool:
    return id(t) not in produced and id(t) not in leaf_ids


def _parse(calls: list[Call], value: Tensor, leaves: list[Tensor]):  # noqa: C901
    """The chain's steps and its loss call, or ``None`` if the tape is not a chain."""
    leaf_ids = {id(leaf): i for i, leaf in enumerate(leaves)}
    used: dict[int, int] = {}
    for call in calls:
        for t in call.tensor_inputs():
            if id(t) in leaf_ids:
                used[id(t)] = used.get(id(t), 0) + 1
    if any(c != 1 for c in used.values()):
        return None
    steps: list = []
    produced: set[int] = set()
    cur: Tensor | None = None
    loss_call = None
    for call in calls:
        inputs = call.tensor_inputs()
        touches_chain = any(id(t) in produced or id(t) in leaf_ids for t in inputs)
        if not touches_chain:
            continue  # data preparation: a constant of the parameters
        if loss_call is not None or not isinstance(call.out, Tensor):
            return None
        func = call.func
        if func is F.linear:
            names = ("input", "weight", "bias")
            if len(call.args) > 3 or any(k not in names for k in call.kwargs):
                return None
            bound = dict(zip(names, call.args, strict=False))
            bound.update(call.kwargs)
            x, w, b = bound.get("input"), bound.get("weight"), bound.get("bias")
            if cur is None:
                if not isinstance(x, Tensor) or not _is_external(x, produced, leaf_ids):
                    return None
            elif x is not cur:
                return None
            if x.dim() != 2 or not isinstance(w, Tensor) or w.dim() != 2:
                return None
            if id(w) in produced or (isinstance(b, Tensor) and id(b) in produced):
                return None
            steps.append(_Linear(x, w, _roles(w, b, leaf_ids)))
        elif func in _CONVS:
            step = _parse_conv(call, cur, produced, leaf_ids)
            if step is None:
                return None
            steps.append(step)
        elif cur is None or not call.args or call.args[0] is not cur:
            return None
        elif any(t is not cur for t in inputs[1:]) and func not in _LOSSES:
            return None
        elif func in _ELEMENTWISE:
            if call.kwargs.get("inplace") or (len(call.args) > 1 and call.args[-1] is True):
                return None
            if call.out.shape != cur.shape:
                return None
            steps.append(_Act(call, cur))
        elif func in _PASS:
            if func is F.dropout:
                p = call.kwargs.get("p", call.args[1] if len(call.args) > 1 else 0.5)
                training = call.kwargs.get("training", call.args[2] if len(call.args) > 2 else True)
                inplace = call.kwargs.get("inplace", call.args[3] if len(call.args) > 3 else False)
                if (training and p != 0) or inplace:
                    return None
            elif (
                call.out.dim() != 2
                or call.out.shape[0] != cur.shape[0]
                or call.out.numel() != cur.numel()
            ):
                return None  # flatten must keep samples: (N, ...) -> (N, D)
        elif func in _LOSSES:
            if any(id(t) in produced for t in inputs[1:] if t is not cur):
                return None
            loss_call = call
            produced.add(id(call.out))
            continue
        else:
            return None
        produced.add(id(call.out))
        cur = call.out
    if loss_call is None or loss_call.out is not value or cur is None or cur.dim() != 2:
        return None
    if not any(isinstance(s, (_Linear, _Conv)) for s in steps):
        return None
    return steps, loss_call


def _pair(v, dim: int, fill: int) -> tuple[int, int] | None:
    if isinstance(v, int):
        v = (v,) * dim
    if not isinstance(v, (tuple, list)) or len(v) != dim or not all(isinstance(i, int) for i in v):
        return None
    return (fill, *v) if dim == 1 else tuple(v)


def _roles(w: Any, b: Any, leaf_ids: dict[int, int]) -> dict[str, int]:
    """Which parameter leaves a layer's weight and bias are (if they are leaves)."""
    roles = {}
    if id(w) in leaf_ids:
        roles["weight"] = leaf_ids[id(w)]
    if isinstance(b, Tensor) and id(b) in leaf_ids:
        roles["bias"] = leaf_ids[id(b)]
    return roles


def _parse_conv(call: Call, cur, produced: set[int], leaf_ids: dict[int, int]) -> _Conv | None:
    """A :class:`_Conv` step for a zero-padded, ungrouped ``F.conv1d``/``F.conv2d`` call."""
    dim = _CONVS[call.func]
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    if len(call.args) > len(names) or any(k not in names for k in call.kwargs):
        return None
    bound = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    bound.update(zip(names, call.args, strict=False))
    bound.update(call.kwargs)
    x, w, b = bound.get("input"), bound.get("weight"), bound["bias"]
    if cur is None:
        if not isinstance(x, Tensor) or not _is_external(x, produced, leaf_ids):
            return None
    elif x is not cur:
        return None
    if not isinstance(w, Tensor) or x.dim() != dim + 2 or w.dim() != dim + 2:
        return None
    if id(w) in produced or (isinstance(b, Tensor) and id(b) in produced):
        return None
    if bound["groups"] != 1:
        return None
    padding = bound["padding"]
    if padding == "valid":
        padding = 0
    stride, dilation = _pair(bound["stride"], dim, 1), _pair(bound["dilation"], dim, 1)
    padding = _pair(padding, dim, 0)
    if stride is None or dilation is None or padding is None:
        return None
    roles = _roles(w, b, leaf_ids)
    out = call.out
    if dim == 1:
        x, w, out_hw = x.unsqueeze(2), w.unsqueeze(2), (1, out.shape[2])
    else:
        out_hw = (out.shape[2], out.shape[3])
    return _Conv(x, w, roles, stride, padding, dilation, out_hw)


def _loss_terms(call: Call, out: Tensor):
    """Gradient, diagonal and signed columns of the loss Hessian w.r.t. ``out`` (N, C)."""
    if call.func is F.mse_loss:
        names = ("input", "target", "size_average", "reduce", "reduction", "weight")
        bound = {"size_average": None, "reduce": None, "reduction": "mean", "weight": None}
        bound.update(zip(names, call.args, strict=False))
        bound.update(call.kwargs)
        target = bound["target"]
        if set(bound) - set(names) or bound["size_average"] is not None:
            return None
        if (
            bound["weight"] is not None
            or bound["reduce"] is not None
            or bound["reduction"] not in ("mean", "sum")
        ):
            return None
        if not isinstance(target, Tensor) or target.shape != out.shape:
            return None
        scale = out.numel() if bound["reduction"] == "mean" else 1
        grad = 2.0 * (out - target) / scale
        return grad, torch.full_like(out, 2.0 / scale), []
    names = (
        "input",
        "target",
        "weight",
        "size_average",
        "ignore_index",
        "reduce",
        "reduction",
        "label_smoothing",
    )
    bound = {
        "weight": None,
        "size_average": None,
        "ignore_index": -100,
        "reduce": None,
        "reduction": "mean",
        "label_smoothing": 0.0,
    }
    bound.update(zip(names, call.args, strict=False))
    bound.update(call.kwargs)
    if set(bound) - set(names) or bound["weight"] is not None:
        return None
    if bound["size_average"] is not None or bound["reduce"] is not None:
        return None
    if bound["label_smoothing"] != 0.0 or bound["reduction"] not in ("mean", "sum"):
        return None
    target = bound["target"]
    n = out.shape[0]
    p = torch.softmax(out, dim=1)
    if target.dtype in (torch.int64, torch.int32) and target.shape == (n,):
        if bool((target == bound["ignore_index"]).any()):
            return None
        soft = F.one_hot(target.long(), out.shape[1]).to(out.dtype)
    elif target.is_floating_point() and target.shape == out.shape:
        soft = target
    else:
        return None
    scale = n if bound["reduction"] == "mean" else 1
    mass = soft.sum(1, keepdim=True)
    grad = (p * mass - soft) / scale
    diag = p * mass / scale
    cols = (p * (mass.abs() / scale).sqrt())[:, None, :]
    sign = -torch.sign(mass)  # (N, 1)
    return grad, diag, [(cols, sign)]


def _derivatives(call: Call, z: Tensor) -> tuple[Tensor, Tensor] | None:
    r""":math:`\sigma'(z)` and :math:`\sigma''(z)` of the recorded activation call, or ``None``
    (the graph route's rule: :func:`torch_secorder.func._rules.elementwise_derivatives`;
    piecewise-linear activations get :math:`\sigma'' = 0`).  ``None``: the chain
    route declines."""
    return elementwise_derivatives(call, z, call.func in _PIECEWISE_LINEAR)


def chain_diagonal(
    calls: list[Call],
    value: Tensor,
    leaves: list[Tensor],
    residuals: bool = True,
    compute: bool = True,
) -> dict[int, Tensor | None] | None:
    """Diagonals (leaf index -> tensor) by the chain route, or ``None`` if it does not apply.

    ``residuals=False`` gives the GGN (no activation second derivatives);
    ``compute=False`` only checks applicability (values ``None``).
    """
    parsed = _parse(calls, value, leaves)
    if parsed is None:
        return None
    steps, loss_call = parsed
    terms = _loss_terms(loss_call, loss_call.args[0])
    if terms is None:
        return None
    covered = [i for s in steps if not isinstance(s, _Act) for i in s.roles.values()]
    if not covered:
        return None
    first = min(k for k, s in enumerate(steps) if not isinstance(s, _Act) and s.roles)
    n = loss_call.args[0].shape[0]
    if _too_big(steps, first, n, sum(c.shape[1] for c, _ in terms[2])):
        return None
    for step in steps:
        if isinstance(step, _Act):
            derivatives = _derivatives(step.call, step.z)
            if derivatives is None:
                return None
            step.d1, step.d2 = derivatives
    if not compute:
        return dict.fromkeys(covered)
    with torch.no_grad():
        result = _backward(steps, terms, residuals)
    return {i: result[i].reshape(leaves[i].shape) for i in covered}


def _through(cols: Tensor, weight: Tensor) -> Tensor:
    """Columns ``(N, m, D_out)`` of a factor at a linear layer's output -> at its input."""
    n, m, d = cols.shape
    return (cols.reshape(n * m, d) @ weight).reshape(n, m, weight.shape[1])


def _too_big(steps, first: int, n: int, m: int) -> bool:
    """Whether the backward pass would materialise more than the chunk budget at once.

    ``m`` columns; a lazy term becomes as many columns as the output of the layer
    it crossed (a bound: it assumes a diagonal term at every layer).
    """
    lazy = None  # the layer the lazy term crossed
    sizes = []
    for k in range(len(steps) - 1, first - 1, -1):
        step = steps[k]
        if isinstance(step, _Act):
            continue
        if lazy is not None and (isinstance(step, _Conv) or k != first):
            sizes += [lazy.d_out * lazy.d_in, n * lazy.d_out * lazy.d_in]
            m, lazy = m + lazy.d_out, None
        if isinstance(step, _Conv) and step.roles:
            sizes.append(n * m * step.weight.shape[0] * step.weight[0].numel())
        if k == first:
            break
        sizes.append(n * m * step.d_in)
        lazy = step
    return max(sizes, default=0) > chunk_entries(steps[first].x.device)


def _backward(steps, terms, residuals: bool) -> dict[int, Tensor]:  # noqa: C901
    """The diagonals (leaf index -> tensor) of the chain's parameters."""
    g, diag, cols = terms
    n = g.shape[0]
    lazy: list[tuple] = []  # (step, r, d): (A diag(d))^T diag(r) (A diag(d))
    result: dict[int, Tensor] = {}
    first = min(k for k, s in enumerate(steps) if not isinstance(s, _Act) and s.roles)
    for k in range(len(steps) - 1, first - 1, -1):
        step = steps[k]
        if isinstance(step, _Act):
            d1, d2 = step.d1.reshape(n, -1), step.d2.reshape(n, -1)
            cols = [(d1[:, None, :] * s, sign) for s, sign in cols]
            lazy = [(a, r, d1 if d is None else d * d1) for a, r, d in lazy]
            diag = None if diag is None else diag * d1 * d1
            if residuals:
                extra = d2 * g  # g is the gradient w.r.t. the activation's output
                diag = extra if diag is None else diag + extra
            g = g * d1
            continue
        # a linear layer or a convolution: the current node is its output z
        if isinstance(step, _Conv) and (step.roles or lazy):
            cols = cols + [_as_columns(a, r, d) for a, r, d in lazy]
            lazy = []
        if step.roles:
            if isinstance(step, _Conv):
                found = step.diagonals(diag, cols)
            else:
                h = torch.zeros_like(g) if diag is None else diag.clone()
                for s, sign in cols:
                    h = h + torch.einsum("nmd,nmd,nm->nd", s, s, sign)
                for a, r, d in lazy:
                    part = a.back_sq(r)
                    h = h + (part if d is None else part * d * d)
                found = {}
                if "weight" in step.roles:
                    found["weight"] = h.T @ (step.x * step.x)
                if "bias" in step.roles:
                    found["bias"] = h.sum(0)
            for role, value in found.items():
                result[step.roles[role]] = value
        if k == first:
            break
        new_cols = [(step.back(s), sign) for s, sign in cols]
        for a, r, d in lazy:  # crosses a second layer: signed columns
            s, sign = _as_columns(a, r, d)
            new_cols.append((step.back(s), sign))
        cols = new_cols
        lazy = [] if diag is None else [(step, diag, None)]
        diag = None
        g = step.back(g[:, None, :])[:, 0]
    return result


def _as_columns(a, r: Tensor, d: Tensor | None) -> tuple[Tensor, Tensor]:
    """Signed columns ``(N, D_out, D_in)`` of ``(A diag(d))^T diag(r) (A diag(d))``."""
    s = a.matrix()[None, :, :] * r.abs().sqrt()[:, :, None]
    if d is not None:
        s = s * d[:, None, :]
    return s, torch.sign(r)
