r"""Jacobian products and the exact GGN diagonal on one autograd graph, for models
that ``torch.func`` refuses.

With the output :math:`z = f(\theta)`, :math:`J = \partial z / \partial \theta` and
:math:`H_{\text{out}} = \nabla_z^2 \ell(z)`, the diagonal of the generalised
Gauss-Newton matrix is

.. math::
    G_{ii} = c_i^\top H_{\text{out}}\, c_i, \qquad c_i = J e_i ,

one column of :math:`J` per parameter entry.  The columns come from the
double-vjp trick: :math:`a(u) = J^\top u` is linear in a dummy cotangent
:math:`u`, and the backward pass of :math:`a(u)^\top e_i` with respect to
:math:`u` is :math:`J e_i`.  Both the columns and their products with
:math:`H_{\text{out}}` are batched backward passes (``is_grads_batched``),
``chunk_size`` entries at a time, through one forward pass of the model.  Only
plain autograd is used, so old-style ``autograd.Function`` s, full backward
hooks and checkpointing with saved-tensor hooks are fine.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from torch_secorder._chunks import chunk_entries
from torch_secorder.linalg.progress import progress_bar
from torch_secorder.linalg.trace import chunk_ranges

__all__ = ["graph_ggn_diagonal", "graph_jvp", "transposed_jacobian"]


#: Largest default number of columns per batched backward pass.
MAX_CHUNK = 256


def transposed_jacobian(out: Tensor, tensors: list[Tensor]) -> tuple[Tensor, tuple]:
    r"""``(u, J^T u)`` for a dummy cotangent ``u`` (zeros), with the graph kept.

    :math:`J^\top u` is linear in :math:`u`, so a backward pass of it with respect
    to :math:`u` gives :math:`J v` (the double-vjp trick).  Entries of the tuple are
    ``None`` for tensors that ``out`` does not depend on.
    """
    dummy = torch.zeros_like(out, requires_grad=True)
    pulled = torch.autograd.grad(
        out, tensors, grad_outputs=dummy, create_graph=True, allow_unused=True
    )
    return dummy, pulled


def graph_jvp(
    out: Tensor, tensors: list[Tensor], tangents: list[Tensor], create_graph: bool = False
) -> Tensor | None:
    """``J v`` of ``out`` with respect to ``tensors`` by the double-vjp trick.

    ``None`` where ``out`` depends on none of ``tensors`` (through a derivative).

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> with torch.enable_grad():
        ...     out = w**2
        >>> graph_jvp(out, [w], [torch.tensor([1.0, 1.0])])
        tensor([2., 4.])
    """
    dummy, pulled = transposed_jacobian(out, tensors)
    used = [j for j, a in enumerate(pulled) if a is not None and a.requires_grad]
    if not used:
        return None
    (jv,) = torch.autograd.grad(
        [pulled[j] for j in used],
        dummy,
        grad_outputs=[tangents[j] for j in used],
        create_graph=create_graph,
    )
    return jv


def graph_ggn_diagonal(
    out_fn: Callable[[dict[str, Tensor]], Tensor],
    params: dict[str, Tensor],
    loss_of_out: Callable[[Tensor], Tensor],
    *,
    create_graph: bool = False,
    chunk_size: int | None = None,
    progress: bool = False,
) -> list[Tensor]:
    """Exact ``diag(J^T H_out J)`` of ``loss_of_out(out_fn(params))``, one tensor per parameter.

    Args:
        out_fn: The model output as a function of ``params`` (run on plain autograd).
        params: The point.  With ``create_graph`` these very tensors are
            differentiated (the result is differentiable with respect to them);
            otherwise detached copies are.
        loss_of_out: The loss as a function of the output.
        create_graph: Make the result differentiable.
        chunk_size: Jacobian columns per batched backward pass.
        progress: Show a progress bar for long runs.

    Returns:
        A list shaped like ``params.values()``.

    Example:
        >>> import torch
        >>> x = torch.tensor([[3.0, 1.0]])
        >>> out_fn = lambda p: torch.nn.functional.linear(x, p["w"])
        >>> graph_ggn_diagonal(out_fn, {"w": torch.tensor([[1.0, 2.0]])}, lambda o: (o**2).sum())
        [tensor([[18.,  2.]])]
    """
    names = list(params)
    tensors = [params[k] if create_graph else params[k].detach().requires_grad_() for k in names]
    with torch.enable_grad():
        out = out_fn(dict(zip(names, tensors, strict=True)))
        (g_out,) = torch.autograd.grad(loss_of_out(out), out, create_graph=True)
        dummy, pulled = transposed_jacobian(out, tensors)
        step = chunk_size or max(
            1, min(MAX_CHUNK, chunk_entries(out.device) // max(out.numel(), 1))
        )
        chunks = [
            (j, start, stop)
            for j, t in enumerate(tensors)
            if pulled[j] is not None and pulled[j].requires_grad and g_out.requires_grad
            for start, stop in chunk_ranges(t.numel(), step)
        ]
        pieces: list[list[Tensor]] = [[] for _ in tensors]
        for j, start, stop in progress_bar(chunks, enabled=progress, desc="GGN diagonal (graph)"):
            t, k = tensors[j], stop - start
            basis = torch.zeros(k, t.numel(), dtype=t.dtype, device=t.device)
            basis[torch.arange(k), torch.arange(start, stop)] = 1.0
            (columns,) = torch.autograd.grad(
                pulled[j],
                dummy,
                grad_outputs=basis.reshape(k, *t.shape),
                retain_graph=True,
                create_graph=create_graph,
                is_grads_batched=True,
            )
            (h_columns,) = torch.autograd.grad(
                g_out,
                out,
                grad_outputs=columns,
                retain_graph=True,
                create_graph=create_graph,
                allow_unused=True,
                is_grads_batched=True,
            )
            if h_columns is None:
                h_columns = torch.zeros_like(columns)
            pieces[j].append((columns * h_columns).reshape(k, -1).sum(-1))
    diag = [
        torch.cat(p).reshape(t.shape) if p else torch.zeros_like(t)
        for p, t in zip(pieces, tensors, strict=True)
    ]
    return diag if create_graph else [d.detach() for d in diag]
