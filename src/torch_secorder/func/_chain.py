r"""The chain route: closed-form backpropagation of the exact per-sample Hessian.

Applies when the recorded loss is a chain on ``(N, D)`` activations: ``F.linear``
calls and elementwise activations (``tanh``, ``sigmoid``, ``relu``,
``leaky_relu``, ``elu``, ``softplus``, ``silu``, ``gelu``; ``flatten`` and eval
``dropout`` pass through), ending in ``F.mse_loss`` or ``F.cross_entropy``
(``"mean"`` or ``"sum"``), each intermediate result used exactly once by the next
call, and every parameter read by one ``F.linear`` only.  The samples then never
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
column sums.  The first and second derivatives of the activations come from
forward-mode AD of the very call recorded, so they match autograd's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import jvp

from torch_secorder.func._tape import Call

__all__ = ["chain_diagonal"]

_ELEMENTWISE = {
    torch.tanh,
    Tensor.tanh,
    F.tanh,
    torch.sigmoid,
    Tensor.sigmoid,
    F.sigmoid,
    F.relu,
    torch.relu,
    Tensor.relu,
    F.leaky_relu,
    F.elu,
    F.softplus,
    F.silu,
    F.gelu,
}
_PASS = {torch.flatten, Tensor.flatten, F.dropout}
_LOSSES = {F.mse_loss, F.cross_entropy}


@dataclass
class _Linear:
    x: Tensor
    weight: Tensor
    roles: dict[str, int]


@dataclass
class _Act:
    call: Call
    z: Tensor


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
            roles = {}
            if id(w) in leaf_ids:
                roles["weight"] = leaf_ids[id(w)]
            if isinstance(b, Tensor) and id(b) in leaf_ids:
                roles["bias"] = leaf_ids[id(b)]
            steps.append(_Linear(x, w, roles))
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
            elif call.out.dim() != 2 or cur.dim() != 2 or call.out.shape != cur.shape:
                return None  # flatten after the first linear must be a no-op on (N, D)
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
    if not any(isinstance(s, _Linear) for s in steps):
        return None
    return steps, loss_call


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


def _derivatives(call: Call, z: Tensor) -> tuple[Tensor, Tensor]:
    rest, kwargs = call.args[1:], call.kwargs

    def act(t: Tensor) -> Tensor:
        return call.func(t, *rest, **kwargs)

    ones = torch.ones_like(z)

    def first(t: Tensor) -> Tensor:
        return jvp(act, (t,), (ones,))[1]

    d1, d2 = jvp(first, (z,), (ones,))
    return d1, d2


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
    covered = [i for s in steps if isinstance(s, _Linear) for i in s.roles.values()]
    if not compute:
        return dict.fromkeys(covered)
    with torch.no_grad():
        return _backward(steps, terms, residuals)


def _through(cols: Tensor, weight: Tensor) -> Tensor:
    """Columns ``(N, m, D_out)`` of a factor at a linear layer's output -> at its input."""
    n, m, d = cols.shape
    return (cols.reshape(n * m, d) @ weight).reshape(n, m, weight.shape[1])


def _backward(steps, terms, residuals: bool) -> dict[int, Tensor]:  # noqa: C901
    g, diag, cols = terms
    lazy: list[tuple[Tensor, Tensor, Tensor | None]] = []  # (W, r, d)
    result: dict[int, Tensor] = {}
    first = min(k for k, s in enumerate(steps) if isinstance(s, _Linear) and s.roles)
    for k in range(len(steps) - 1, first - 1, -1):
        step = steps[k]
        if isinstance(step, _Act):
            d1, d2 = _derivatives(step.call, step.z)
            cols = [(d1[:, None, :] * s, sign) for s, sign in cols]
            lazy = [(w, r, d1 if d is None else d * d1) for w, r, d in lazy]
            diag = None if diag is None else diag * d1 * d1
            if residuals:
                extra = d2 * g  # g is the gradient w.r.t. the activation's output
                diag = extra if diag is None else diag + extra
            g = g * d1
            continue
        # a linear layer: z = x W^T + b; the current node is z
        if step.roles:
            h = torch.zeros_like(g) if diag is None else diag.clone()
            for s, sign in cols:
                h = h + torch.einsum("nmd,nmd,nm->nd", s, s, sign)
            for w, r, d in lazy:
                part = r @ (w * w)
                h = h + (part if d is None else part * d * d)
            if "weight" in step.roles:
                result[step.roles["weight"]] = h.T @ (step.x * step.x)
            if "bias" in step.roles:
                result[step.roles["bias"]] = h.sum(0)
        if k == first:
            break
        w = step.weight
        new_cols = [(_through(s, w), sign) for s, sign in cols]
        for wl, r, d in lazy:  # crosses a second linear layer: signed columns
            a = wl[None, :, :] * r.abs().sqrt()[:, :, None]
            if d is not None:
                a = a * d[:, None, :]
            new_cols.append((_through(a, w), torch.sign(r)))
        cols = new_cols
        lazy = [] if diag is None else [(w, diag, None)]
        diag = None
        g = g @ w
    return result
