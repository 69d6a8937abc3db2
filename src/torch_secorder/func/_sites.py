r"""Operator calls that are affine in a parameter: where the fast diagonal applies.

A *site* is one call ``z = op(x, weight, bias, ...)`` of a recognised operator
(``F.linear``, ``F.conv1d/2d/3d``, ``F.conv_transpose1d/2d/3d``, ``F.embedding``,
and the affine part of ``F.layer_norm``, ``F.rms_norm``, ``F.group_norm``,
``F.batch_norm``).  The output ``z`` is
affine in ``weight`` and in ``bias``: with :math:`u_k = \partial z/\partial\theta_k`
(independent of :math:`\theta`),

.. math::
    \frac{\partial^2 L}{\partial\theta_k^2} = u_k^\top \nabla^2_z L\, u_k

whenever :math:`\theta` is read by this call only.  Each :math:`u_k` lives on a
single *unit* of ``z`` (an output feature of a linear layer, an output channel of
a convolution, a normalised feature), so only the Hessian entries
:math:`H_{(r,i),(s,i)}` between *rows* ``r, s`` (the other indices of ``z``:
samples, positions) at the same unit ``i`` matter.  ``z`` is laid out as
``(N, T, U)``: ``N`` samples (its first dimension), ``T`` positions, ``U`` units.

* Rows independent (:math:`H_{(r,i),(s,i)} = 0` for ``r != s``): only
  :math:`h_{r,i} = H_{(r,i),(r,i)}` is needed, and for every operator here
  :math:`(u_k)_{r,i}` is one input entry (or 1), so
  :math:`\sum_r (u_k)_{r,i}^2 h_{r,i}` is the operator's parameter gradient with
  the input squared and ``h`` as the output gradient (:meth:`Site.diag_rows`);
  e.g. for a linear layer :math:`\sum_r x_{rj}^2 h_{ri}` and :math:`\sum_r h_{ri}`.
* Samples independent, positions coupled: the ``T x T`` blocks
  :math:`B_{n,i}[p,q] = H_{(n,p,i),(n,q,i)}` are needed, and
  :math:`\sum_n c_{n,:,k}^\top B_{n,i} c_{n,:,k}` with the coefficients ``c``
  (:meth:`Site.diag_blocks`; not for convolutions, whose coefficients are
  patches: there the basis sweep is cheaper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vjp

from torch_secorder.func._tape import Call

__all__ = ["Site", "SITE_FUNCS", "make_site"]

_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}

_SIGNATURES: dict = {
    F.linear: ("input", "weight", "bias"),
    F.embedding: (
        "input",
        "weight",
        "padding_idx",
        "max_norm",
        "norm_type",
        "scale_grad_by_freq",
        "sparse",
    ),
    F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
    F.rms_norm: ("input", "normalized_shape", "weight", "eps"),
    F.group_norm: ("input", "num_groups", "weight", "bias", "eps"),
    F.batch_norm: (
        "input",
        "running_mean",
        "running_var",
        "weight",
        "bias",
        "training",
        "momentum",
        "eps",
    ),
}
for _conv in _CONVS:
    _SIGNATURES[_conv] = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_TRANSPOSED = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}
for _conv in _TRANSPOSED:
    _SIGNATURES[_conv] = (
        "input",
        "weight",
        "bias",
        "stride",
        "padding",
        "output_padding",
        "groups",
        "dilation",
    )

#: The operators whose calls can be sites.
SITE_FUNCS = frozenset(_SIGNATURES)

_DEFAULTS = {
    "bias": None,
    "weight": None,
    "padding_idx": None,
    "max_norm": None,
    "norm_type": 2.0,
    "scale_grad_by_freq": False,
    "sparse": False,
    "eps": 1e-5,
    "training": False,
    "momentum": 0.1,
    "stride": 1,
    "padding": 0,
    "dilation": 1,
    "groups": 1,
    "output_padding": 0,
}


def _bind(call: Call) -> dict | None:
    names = _SIGNATURES[call.func]
    if len(call.args) > len(names) or any(k not in names for k in call.kwargs):
        return None
    bound = {n: _DEFAULTS.get(n) for n in names}
    if call.func is F.rms_norm:
        bound["eps"] = None  # its default: the dtype's machine epsilon
    bound.update(zip(names, call.args, strict=False))
    bound.update(call.kwargs)
    return bound


def _sum_except(t: Tensor, keep: int) -> Tensor:
    return t.sum(dim=[d for d in range(t.dim()) if d != keep])


@dataclass
class Site:
    """One affine operator call and the parameters (by role) it reads.

    Attributes:
        call: The recorded call.
        bound: Its arguments by name.
        roles: ``{"weight": leaf_index, "bias": leaf_index}`` (the roles present).
        unit_axes: Dimensions of ``z`` that index units (moved last by :meth:`to_rows`).
        shape: Shape of ``z``.
    """

    call: Call
    bound: dict
    roles: dict[str, int]
    unit_axes: tuple[int, ...]
    shape: torch.Size
    kind: str
    _normalised: Tensor | None = field(default=None, repr=False)

    # -- layout -----------------------------------------------------------------
    @property
    def batched(self) -> bool:
        return 0 not in self.unit_axes

    @property
    def rows_shape(self) -> tuple[int, int, int]:
        units = math.prod(self.shape[d] for d in self.unit_axes)
        n = self.shape[0] if self.batched else 1
        return n, math.prod(self.shape) // (units * n), units

    def _perm(self) -> list[int]:
        rest = [d for d in range(len(self.shape)) if d not in self.unit_axes]
        return rest + list(self.unit_axes)

    def to_rows(self, z: Tensor) -> Tensor:
        """``z`` (with optional leading batch dims) -> ``(..., N, T, U)``."""
        lead = z.dim() - len(self.shape)
        perm = list(range(lead)) + [lead + d for d in self._perm()]
        return z.permute(perm).reshape(*z.shape[:lead], *self.rows_shape)

    def from_rows(self, rows: Tensor) -> Tensor:
        """Inverse of :meth:`to_rows`."""
        lead = rows.dim() - 3
        perm = self._perm()
        permuted = rows.reshape(*rows.shape[:lead], *[self.shape[d] for d in perm])
        inverse = [0] * len(perm)
        for i, d in enumerate(perm):
            inverse[d] = i
        return permuted.permute(list(range(lead)) + [lead + i for i in inverse])

    def cost(self, coupled: bool) -> int:
        """Vector products this site needs (units, or units x positions)."""
        n, t, u = self.rows_shape
        return u * t if coupled else u

    @property
    def supports_blocks(self) -> bool:
        return self.kind != "conv"

    # -- the parameter diagonal from the output Hessian ---------------------------
    def _xhat(self) -> Tensor:
        if self._normalised is None:
            b = self.bound
            x = b["input"]
            with torch.no_grad():
                if self.kind == "layer_norm":
                    xh = F.layer_norm(x, b["normalized_shape"], None, None, b["eps"])
                elif self.kind == "rms_norm":
                    xh = F.rms_norm(x, b["normalized_shape"], None, b["eps"])
                elif self.kind == "group_norm":
                    xh = F.group_norm(x, b["num_groups"], None, None, b["eps"])
                else:
                    training = b["training"]
                    xh = F.batch_norm(
                        x,
                        None if training else b["running_mean"],
                        None if training else b["running_var"],
                        None,
                        None,
                        training,
                        0.0,
                        b["eps"],
                    )
            self._normalised = xh
        return self._normalised

    def diag_rows(self, h: Tensor) -> dict[str, Tensor]:
        """Parameter diagonals from ``h`` (``(N, T, U)``, the output Hessian's diagonal)."""
        return self.diag_at_output(self.from_rows(h))

    def diag_at_output(self, hz: Tensor) -> dict[str, Tensor]:
        """:meth:`diag_rows` from the diagonal ``hz`` laid out like the output ``z``."""
        b = self.bound
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            if self.kind == "linear":
                x = b["input"]
                h2 = hz.reshape(-1, hz.shape[-1])
                if "weight" in self.roles:
                    out["weight"] = h2.T @ (x * x).reshape(-1, x.shape[-1])
                if "bias" in self.roles:
                    out["bias"] = h2.sum(0)
            elif self.kind == "conv":
                x, w = b["input"], b["weight"]
                if "weight" in self.roles:
                    conv, names = self.call.func, _SIGNATURES[self.call.func]

                    def of_weight(weight: Tensor) -> Tensor:
                        given = {**b, "input": x * x, "weight": weight, "bias": None}
                        return conv(*[given[name] for name in names])

                    out["weight"] = vjp(of_weight, w)[1](hz)[0]
                if "bias" in self.roles:
                    out["bias"] = _sum_except(hz, 1)
            elif self.kind == "embedding":
                idx, w = b["input"], b["weight"]

                def of_table(weight: Tensor) -> Tensor:
                    return F.embedding(idx, weight, b["padding_idx"])

                out["weight"] = vjp(of_table, w)[1](hz)[0]
            else:  # affine part of a normalisation
                xh = self._xhat()
                if self.kind in ("layer_norm", "rms_norm"):
                    lead = list(range(hz.dim() - len(self.unit_axes)))
                    if "weight" in self.roles:
                        out["weight"] = (hz * xh * xh).sum(lead) if lead else hz * xh * xh
                    if "bias" in self.roles:
                        out["bias"] = hz.sum(lead) if lead else hz
                else:
                    if "weight" in self.roles:
                        out["weight"] = _sum_except(hz * xh * xh, 1)
                    if "bias" in self.roles:
                        out["bias"] = _sum_except(hz, 1)
        return out

    def diag_blocks(self, blocks: Tensor) -> dict[str, Tensor]:
        """Parameter diagonals from the blocks ``B[n, u, p, q]`` (samples independent)."""
        b = self.bound
        n, t, u = self.rows_shape
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            if self.kind == "linear":
                x = b["input"].reshape(n, t, -1)
                if "weight" in self.roles:
                    out["weight"] = torch.einsum("nupq,npj,nqj->uj", blocks, x, x)
            elif self.kind == "embedding":
                w = b["weight"]
                onehot = F.one_hot(b["input"].reshape(n, t), w.shape[0]).to(blocks.dtype)
                table = torch.einsum("nupq,npv,nqv->vu", blocks, onehot, onehot)
                if b["padding_idx"] is not None:
                    table[b["padding_idx"]] = 0.0
                out["weight"] = table
            else:
                xh = self.to_rows(self._xhat())
                if "weight" in self.roles:
                    out["weight"] = torch.einsum("nupq,npu,nqu->u", blocks, xh, xh)
            if "bias" in self.roles:
                out["bias"] = blocks.sum((0, 2, 3))
        return {role: value.reshape(self.param_shape(role)) for role, value in out.items()}

    def param_shape(self, role: str) -> torch.Size:
        return self.bound[role].shape


def make_site(call: Call, leaf_ids: dict[int, int], once: set[int]) -> Site | None:
    """A :class:`Site` for ``call`` if it is a recognised affine call reading leaves
    that are used nowhere else (``once``: leaf indices used in exactly one call)."""
    if call.func not in SITE_FUNCS or not isinstance(call.out, Tensor):
        return None
    bound = _bind(call)
    if bound is None:
        return None
    roles = {}
    for role in ("weight", "bias"):
        t = bound.get(role)
        if isinstance(t, Tensor) and id(t) in leaf_ids and leaf_ids[id(t)] in once:
            roles[role] = leaf_ids[id(t)]
    if not roles:
        return None
    for name, value in bound.items():  # a leaf in any other slot: not affine in it
        if name in roles or (name == "weight" and "bias" in roles):
            continue  # (a shared weight is a constant for the bias, which enters additively)
        if isinstance(value, Tensor) and id(value) in leaf_ids:
            return None
    z = call.out
    x = bound["input"]
    if not isinstance(x, Tensor):
        return None
    func = call.func
    if func is F.linear:
        kind, axes = "linear", (z.dim() - 1,)
    elif func in _CONVS or func in _TRANSPOSED:
        spatial = _CONVS.get(func) or _TRANSPOSED[func]
        if x.dim() != spatial + 2:  # unbatched convolution: leave it to the sweep
            return None
        kind, axes = "conv", (1,)
    elif func is F.embedding:
        if bound["max_norm"] is not None or bound["scale_grad_by_freq"] or bound["sparse"]:
            return None
        kind, axes = "embedding", (z.dim() - 1,)
    elif func in (F.layer_norm, F.rms_norm):
        k = len(tuple(bound["normalized_shape"]))
        kind = "layer_norm" if func is F.layer_norm else "rms_norm"
        axes = tuple(range(z.dim() - k, z.dim()))
    else:
        if x.dim() < 2:
            return None
        kind = "group_norm" if func is F.group_norm else "batch_norm"
        axes = (1,)
    return Site(call, bound, roles, axes, z.shape, kind)
