r"""TF32 matrix products for float32 work, behind an explicit switch, and a CPU emulation of them.

On NVIDIA GPUs from Ampere on (A100, H100, RTX 30xx and later), cuBLAS and cuDNN can
run float32 matrix products and convolutions on tensor cores in *TensorFloat-32*:
each operand is cut to 10 explicit mantissa bits (float32 has 23; the exponent range
is float32's), the products are summed in float32.  That is several times faster,
and the library's products (Hessian-, GGN- and Fisher-vector products, Hutchinson,
eigensolvers) are made of such matrix products.

:func:`tf32` turns it on (or, with ``enabled=False``, off) for the work inside a
``with`` block, and afterwards puts back every flag exactly as it was, also when
the block raised:

* ``torch.backends.cuda.matmul.allow_tf32`` (cuBLAS: ``mm``, ``bmm``, ``linear``,
  ``einsum``, attention's products);
* ``torch.backends.cudnn.allow_tf32`` (cuDNN convolutions and recurrent layers;
  note that torch's *default* already allows TF32 there, so ``tf32(False)`` is the
  switch to strict float32 convolutions).

What it affects, and what not:

* only float32 tensors on CUDA devices of compute capability 8.0 or later; float64
  (and float16/bfloat16) work never, CPU work never (the CPU's oneDNN float32 flag,
  ``torch.backends.mkldnn.matmul.fp32_precision``, is left alone);
* matrix-vector products (``mv``) and elementwise work stay float32.

The accuracy cost: a TF32 operand carries a relative rounding error of at most
:math:`u = 2^{-11} \approx 4.9 \times 10^{-4}` (float32: :math:`2^{-24}`), so one
matrix product is off by about :math:`u` relative to its size, and a product
through :math:`L` layers by about :math:`u\sqrt{L}` (independent roundings add up
like a random walk).  Measured by emulation (``benchmarks/bench_tf32_accuracy.py``,
against float64): one HVP is off by :math:`3 \times 10^{-4}` to :math:`10^{-2}`
(a 2-layer GPT: attention and cancellation amplify the rounding) instead of
:math:`10^{-6}` in float32; Hutchinson's trace with the same probes by
:math:`10^{-5}` to :math:`2 \times 10^{-3}`; the largest eigenvalue by
:math:`10^{-5}`.  That is harmless beside the statistical error of a stochastic
trace (a few percent at 100 probes) and for a top eigenvalue to 3-4 digits, but
not for results meant to 6 digits, small eigenvalues of an ill-conditioned
Hessian, or a Hessian diagonal compared against float64.

:func:`emulate_tf32` measures that cost without a GPU: under it, every float32
matrix product and convolution the dispatcher runs (also inside autograd's backward
pass, forward-mode AD and ``torch.func`` transforms) gets its operands rounded to
TF32 first (:func:`round_to_tf32`, round to nearest, ties to even), then runs in
float32.  It is for tests and benchmarks, and is slow.

Example:
    >>> import torch
    >>> from torch_secorder.precision import emulate_tf32, round_to_tf32, tf32
    >>> before = torch.backends.cuda.matmul.allow_tf32
    >>> with tf32():
    ...     torch.backends.cuda.matmul.allow_tf32
    True
    >>> torch.backends.cuda.matmul.allow_tf32 == before
    True
    >>> float(round_to_tf32(torch.tensor(1 + 2**-11 + 2**-13)))  # above the tie: up
    1.0009765625
    >>> a = torch.tensor([[1 + 2**-12]])
    >>> with emulate_tf32():
    ...     float(a @ a)  # the operands are rounded to 1.0
    1.0
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["TF32_MANTISSA_BITS", "TF32_UNIT_ROUNDOFF", "emulate_tf32", "round_to_tf32", "tf32"]

#: Explicit mantissa bits of TensorFloat-32 (float32: 23).
TF32_MANTISSA_BITS = 10
#: Unit roundoff of TF32, :math:`2^{-11}`: the largest relative rounding error of an operand.
TF32_UNIT_ROUNDOFF = 2.0**-11

_DROPPED_BITS = 23 - TF32_MANTISSA_BITS  # 13 float32 mantissa bits that TF32 drops


def _flag_state() -> dict[str, Any]:
    """Every flag :func:`tf32` may change, read without raising (``None``: unreadable)."""
    backends = torch.backends
    state: dict[str, Any] = {
        "cuda_matmul": backends.cuda.matmul.fp32_precision,
        "mkldnn_matmul": backends.mkldnn.matmul.fp32_precision,
        "cudnn_conv": backends.cudnn.conv.fp32_precision,
        "cudnn_rnn": backends.cudnn.rnn.fp32_precision,
    }
    # the legacy flags raise when they were set through both torch's old and new APIs
    try:
        state["matmul_precision"] = torch.get_float32_matmul_precision()
    except RuntimeError:
        state["matmul_precision"] = None
    try:
        state["cudnn_allow_tf32"] = bool(backends.cudnn.allow_tf32)
    except RuntimeError:
        state["cudnn_allow_tf32"] = None
    return state


def _restore(state: dict[str, Any]) -> None:
    backends = torch.backends
    # the legacy flags first (each also sets the new ones), then the new ones exactly
    if state["matmul_precision"] is not None:
        torch.set_float32_matmul_precision(state["matmul_precision"])
    backends.cuda.matmul.fp32_precision = state["cuda_matmul"]
    backends.mkldnn.matmul.fp32_precision = state["mkldnn_matmul"]
    if state["cudnn_allow_tf32"] is not None:
        backends.cudnn.allow_tf32 = state["cudnn_allow_tf32"]
    backends.cudnn.conv.fp32_precision = state["cudnn_conv"]
    backends.cudnn.rnn.fp32_precision = state["cudnn_rnn"]


@contextmanager
def tf32(enabled: bool = True) -> Iterator[None]:
    """TF32 for float32 matrix products and cuDNN convolutions inside the block (CUDA only).

    ``enabled=False`` forces strict float32 instead (cuBLAS and cuDNN).  On exit,
    normal or by an exception, every flag is back as it was; blocks nest.  The
    flags are process-wide: another thread's float32 CUDA work during the block is
    affected too.  See the module's notes for what is affected and the accuracy
    cost.

    Args:
        enabled: ``True``: allow TF32; ``False``: forbid it.

    Raises:
        TypeError: ``enabled`` is not a bool.

    Example:
        >>> import torch
        >>> with tf32(False):
        ...     torch.backends.cudnn.allow_tf32
        False
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__} {enabled!r}")
    state = _flag_state()
    try:
        if state["matmul_precision"] is not None:
            # the legacy CUDA flag keeps torch's old and new matmul flags consistent
            torch.backends.cuda.matmul.allow_tf32 = enabled
        else:  # the user mixed the two APIs already: touch only the new one
            torch.backends.cuda.matmul.fp32_precision = "tf32" if enabled else "ieee"
        if state["cudnn_allow_tf32"] is not None:
            torch.backends.cudnn.allow_tf32 = enabled
        else:
            torch.backends.cudnn.conv.fp32_precision = "tf32" if enabled else "ieee"
        yield
    finally:
        _restore(state)


def round_to_tf32(x: Tensor) -> Tensor:
    r"""``x`` (float32) rounded to the nearest TF32 number, ties to even; a float32 tensor.

    The 13 low mantissa bits are rounded off: add :math:`2^{12} - 1` plus the lowest
    kept bit to the bit pattern, then clear the 13 bits (a carry moves into the
    exponent, as rounding up should).  Infinities and NaNs pass unchanged; a finite
    value above the largest TF32 number rounds to infinity.  Other dtypes come back
    unchanged.

    Example:
        >>> import torch
        >>> x = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11)])  # ties
        >>> round_to_tf32(x).tolist()  # to the even neighbour
        [1.0, 1.001953125, -1.0]
    """
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    lowest_kept = (bits >> _DROPPED_BITS) & 1
    rounded = (bits + ((1 << (_DROPPED_BITS - 1)) - 1) + lowest_kept) & ~((1 << _DROPPED_BITS) - 1)
    return torch.where(torch.isfinite(x), rounded.view(torch.float32), x)


_aten = torch.ops.aten

#: ATen operators whose float32 operands the emulation rounds, with the positions of
#: those operands (a bias or an accumulated input is added in float32, as on tensor cores).
_ROUNDED_OPERANDS: dict[Any, tuple[int, ...]] = {
    _aten.mm.default: (0, 1),
    _aten.bmm.default: (0, 1),
    _aten.addmm.default: (1, 2),
    _aten.baddbmm.default: (1, 2),
    _aten.addbmm.default: (1, 2),
    _aten._addmm_activation.default: (1, 2),
    _aten.convolution.default: (0, 1),
    _aten.convolution_backward.default: (0, 1, 2),
    _aten._scaled_dot_product_flash_attention_for_cpu.default: (0, 1, 2),
    _aten._scaled_dot_product_efficient_attention.default: (0, 1, 2),
}


class _EmulateTF32(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        positions = _ROUNDED_OPERANDS.get(func)
        if positions is not None:
            args = tuple(
                round_to_tf32(a) if i in positions and isinstance(a, Tensor) else a
                for i, a in enumerate(args)
            )
        return func(*args, **(kwargs or {}))


@contextmanager
def emulate_tf32() -> Iterator[None]:
    """Round the float32 operands of every matrix product and convolution to TF32 (tests only).

    A :class:`~torch.utils._python_dispatch.TorchDispatchMode`: it sees the ATen
    operators that actually run, including those of autograd's backward pass,
    forward-mode AD and ``torch.func`` transforms (a ``__torch_function__`` mode would
    miss those).  Rounded: ``mm``, ``bmm``, ``addmm``, ``baddbmm``, ``addbmm``,
    convolutions and their backward, and the operands of the fused attention
    kernels (their inner products are not).  The products are then computed and
    summed in float32, as on tensor cores.  Matrix-vector products are rounded too
    where they run as ``mm`` (slightly pessimistic: cuBLAS does not use TF32 for
    ``gemv``).  Hardware may round ties away from zero or truncate instead of
    rounding to even; the error bounds differ by at most a factor of two.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0 + 2**-20]], requires_grad=True)
        >>> with emulate_tf32():
        ...     (x @ x).sum().backward()
        >>> float(x.grad)  # 2 x, x rounded to 1.0 in the backward products too
        2.0
    """
    with _EmulateTF32():
        yield
