r"""The computations behind the Fisher diagonals and traces.

* :func:`~torch_secorder.problems._per_sample.empirical_sq_sum` (in ``core``, where the
  per-layer Fisher also uses it): :math:`\sum_i g_i \odot g_i` over per-sample
  gradients.
* :func:`predictive_sq_sum`: :math:`\sum_r (J^\top u_r) \odot (J^\top u_r)` for a
  set of output-space vectors :math:`u_r` (one sample's row each) chosen so that
  :math:`\sum_r u_r u_r^\top` is the Hessian of the negative log-likelihood with
  respect to the outputs, exactly or in expectation.  The products
  :math:`J^\top u` are backward passes through the graph of ``outputs``
  (``is_grads_batched``), ``chunk_size`` at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder._chunks import chunk_entries
from torch_secorder.errors import UnsupportedShapeError
from torch_secorder.linalg.trace import chunk_ranges
from torch_secorder.problems._inputs import check_generator, check_module, check_num_samples
from torch_secorder.problems._per_sample import empirical_sq_sum  # re-exported

__all__ = ["LOSS_TYPES", "empirical_sq_sum", "loss_kind", "predictive_sq_sum"]

#: Accepted ``loss_type`` spellings, and the likelihood each one means.
LOSS_TYPES = {
    "nll": "ce",
    "ce": "ce",
    "cross_entropy": "ce",
    "crossentropy": "ce",
    "mse": "mse",
    "gaussian": "mse",
}


def loss_kind(loss_type: Any) -> str:
    """``"ce"`` or ``"mse"``; anything else raises ``NotImplementedError``."""
    kind = LOSS_TYPES.get(loss_type.lower()) if isinstance(loss_type, str) else None
    if kind is None:
        raise NotImplementedError(
            f"loss_type {loss_type!r} is not supported; supported: {sorted(LOSS_TYPES)} "
            "('nll'/'ce'/'cross_entropy': categorical likelihood on logits; "
            "'mse'/'gaussian': Gaussian likelihood)"
        )
    return kind


def _check_outputs(model: nn.Module, outputs: Any, targets: Any, kind: str) -> None:
    check_module(model)
    if not isinstance(outputs, Tensor):
        raise TypeError(f"outputs must be a tensor (model(inputs)), got {type(outputs).__name__}")
    if not outputs.requires_grad:
        raise ValueError(
            "outputs must be computed from model with autograd enabled (outputs = model(inputs), "
            "not under torch.no_grad() and not detached): the Fisher needs their Jacobian"
        )
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    if kind == "ce":
        if outputs.ndim != 2:
            raise UnsupportedShapeError(
                f"outputs must be (batch, classes) logits for loss_type 'nll', "
                f"got shape {tuple(outputs.shape)}"
            )
        if targets.shape not in (outputs.shape[:1], outputs.shape):
            raise ValueError(
                f"targets must have shape ({outputs.shape[0]},) (class indices) or "
                f"{tuple(outputs.shape)} (probabilities) for outputs of shape "
                f"{tuple(outputs.shape)}, got {tuple(targets.shape)}"
            )
    else:
        if outputs.ndim < 1 or targets.shape != outputs.shape:
            raise ValueError(
                f"targets must have the shape of outputs {tuple(outputs.shape)} for loss_type "
                f"'mse', got {tuple(targets.shape)}"
            )


def _rows(
    outputs: Tensor,
    kind: str,
    num_samples: int | None,
    generator: torch.Generator | None,
    create_graph: bool,
) -> tuple[Callable[[int, int], Tensor], int]:
    """Return ``make(start, stop)``: the ``u_r`` of samples ``start:stop``, and rows per sample.

    Each call returns ``(stop - start, r, N, D)``: for sample ``i`` the ``r``
    output vectors (zero outside row ``i``), with ``sum_r u u^T`` equal (in
    expectation for Monte Carlo) to the per-sample NLL Hessian w.r.t. the outputs.
    """
    n = outputs.shape[0]
    flat = outputs.reshape(n, -1)
    d = flat.shape[1]
    if kind == "ce":
        probs = torch.softmax(flat if create_graph else flat.detach(), dim=-1)
    per = d if num_samples is None else num_samples
    eye = torch.eye(d, dtype=flat.dtype, device=flat.device)

    def make(start: int, stop: int) -> Tensor:
        m = stop - start
        if kind == "ce":
            p = probs[start:stop]  # (m, C)
            if num_samples is None:
                # diag(p) - p p^T = sum_c p_c (e_c - p)(e_c - p)^T
                u = p.sqrt()[:, :, None] * (eye[None] - p[:, None, :])
            else:
                labels = torch.multinomial(
                    p.detach(), num_samples, replacement=True, generator=generator
                )  # (m, S)
                u = (p[:, None, :] - eye[labels]) / num_samples**0.5
        else:
            if num_samples is None:
                u = eye.expand(m, d, d) * 2**0.5
            else:
                eps = torch.randn(
                    m, num_samples, d, generator=generator, dtype=flat.dtype, device=flat.device
                )
                u = eps * (2.0 / num_samples) ** 0.5
        rows = torch.zeros(m, per, n, d, dtype=flat.dtype, device=flat.device)
        index = torch.arange(m, device=flat.device)
        rows[index, :, start + index] = u
        return rows

    return make, per


def predictive_sq_sum(
    model: nn.Module,
    outputs: Tensor,
    targets: Tensor,
    loss_type: str,
    create_graph: bool,
    num_samples: int | None,
    generator: torch.Generator | None,
    chunk_size: int | None,
    reduction: str,
) -> list[Tensor]:
    """Diagonal of the type-2 Fisher (``reduction``-scaled), one tensor per parameter."""
    kind = loss_kind(loss_type)
    _check_outputs(model, outputs, targets, kind)
    check_generator(generator, outputs.device)
    if num_samples is not None:
        check_num_samples(num_samples)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    params = list(model.parameters())
    active = [p for p in params if p.requires_grad]
    if not active:
        raise ValueError("no parameter of model requires grad: nothing to differentiate")
    n = outputs.shape[0]
    d = outputs.numel() // max(n, 1)
    make, per = _rows(outputs, kind, num_samples, generator, create_graph)
    dim = sum(p.numel() for p in active)
    if chunk_size is None:
        budget = chunk_entries(outputs.device)
        rows_budget = max(1, min(budget // dim, budget // (8 * outputs.numel())))
        chunk_size = max(1, rows_budget // per)
    sums = [torch.zeros_like(p) for p in active]
    with torch.enable_grad():
        for start, stop in chunk_ranges(n, chunk_size):
            rows = make(start, stop).reshape(-1, *outputs.shape)
            grads = torch.autograd.grad(
                outputs,
                active,
                grad_outputs=rows,
                retain_graph=True,
                create_graph=create_graph,
                allow_unused=True,
                is_grads_batched=True,
            )
            sums = [s if g is None else s + (g**2).sum(0) for s, g in zip(sums, grads, strict=True)]
    if reduction == "mean":
        scale = 1.0 / n if kind == "ce" else 1.0 / (n * d)
        sums = [s * scale for s in sums]
    it = iter(sums)
    return [next(it) if p.requires_grad else torch.zeros_like(p) for p in params]
