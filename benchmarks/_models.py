"""Deterministic benchmark problems (synthetic data only, nothing is downloaded).

Every builder returns a :class:`Problem`, a named 4-tuple
``(model, loss_fn, inputs, targets)``::

    model, loss_fn, x, y = mlp_784_256_256_10(batch=256)
    loss = loss_fn(model(x), y)

``loss_fn`` is an ``nn.MSELoss`` / ``nn.CrossEntropyLoss`` module with
``reduction="mean"`` (curvlinops and BackPACK need the module form).  Weights and
data are drawn from ``seed`` under ``torch.random.fork_rng`` so the global RNG is
left untouched, always on the CPU and then moved to ``device``, so a problem is
identical on every device.

========================  =============================================  ========
builder                   architecture                                   params
========================  =============================================  ========
mlp_784_256_256_10        784-256(tanh)-256(tanh)-10                      269,322
tanh_cnn                  conv3x3 3->16, tanh, conv3x3 16->16 stride 2,    43,738
                          tanh, flatten, linear 4096->10 (32x32 input)
mlp_30_30_10              30-30(tanh)-10                                    1,240
mlp_few_thousand          20-64(tanh)-32(tanh)-5                            3,589
tiny_transformer_block    pre-LN block d=32, 4 heads, MLP 128, seq 16,     13,098
                          mean-pool, linear 32->10
========================  =============================================  ========
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = [
    "PROBLEMS",
    "Problem",
    "TinyTransformerBlock",
    "mlp",
    "mlp_30_30_10",
    "mlp_784_256_256_10",
    "mlp_few_thousand",
    "tanh_cnn",
    "tiny_transformer_block",
]


class Problem(NamedTuple):
    """``(model, loss_fn, inputs, targets)`` plus a few conveniences."""

    model: nn.Module
    loss_fn: nn.Module
    inputs: Tensor
    targets: Tensor

    @property
    def params(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def loss(self) -> Tensor:
        """The mini-batch loss at the current parameters (a closure for old-style APIs)."""
        return self.loss_fn(self.model(self.inputs), self.targets)


def _build(
    make_model: Callable[[], nn.Module],
    x_shape: tuple[int, ...],
    n_out: int,
    loss: str,
    seed: int,
    dtype: torch.dtype,
    device: torch.device | str,
    target_shape: tuple[int, ...] | None = None,
) -> Problem:
    if loss not in ("mse", "ce"):
        raise ValueError(f"loss must be 'mse' or 'ce', got {loss!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model()
        x = torch.randn(x_shape)
        batch = x_shape[0]
        if loss == "mse":
            y = torch.randn(target_shape or (batch, n_out))
            loss_fn: nn.Module = nn.MSELoss()
        else:
            y = torch.randint(0, n_out, target_shape or (batch,))
            loss_fn = nn.CrossEntropyLoss()
    model = model.to(device=device, dtype=dtype).eval()
    x = x.to(device=device, dtype=dtype)
    y = y.to(device=device, dtype=dtype) if y.is_floating_point() else y.to(device)
    return Problem(model, loss_fn, x, y)


def mlp(
    widths: tuple[int, ...],
    batch: int,
    loss: str = "mse",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    act: type[nn.Module] = nn.Tanh,
) -> Problem:
    """Generic MLP ``widths[0] -> ... -> widths[-1]`` with ``act`` between layers."""

    def make() -> nn.Module:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            if i:
                layers.append(act())
            layers.append(nn.Linear(a, b))
        return nn.Sequential(*layers)

    return _build(make, (batch, widths[0]), widths[-1], loss, seed, dtype, device)


def mlp_784_256_256_10(
    batch: int = 256,
    dtype: torch.dtype = torch.float32,
    loss: str = "mse",
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> Problem:
    """MNIST-shaped tanh MLP 784-256-256-10 (269,322 parameters)."""
    return mlp((784, 256, 256, 10), batch, loss, dtype, device, seed)


def mlp_30_30_10(
    batch: int = 64,
    dtype: torch.dtype = torch.float32,
    loss: str = "mse",
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> Problem:
    """Tanh MLP 30-30-10: input 30, one hidden layer of 30, output 10.

    n = 31*30 + 31*10 = 1,240 parameters, small enough for the dense Hessian.
    (Two hidden layers of 30 cannot give 1,240: that is 30*d_in + 1,270 > 1,240.)
    """
    return mlp((30, 30, 10), batch, loss, dtype, device, seed)


def mlp_few_thousand(
    batch: int = 64,
    dtype: torch.dtype = torch.float32,
    loss: str = "mse",
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> Problem:
    """Tanh MLP 20-64-32-5 (3,589 parameters): dense Hessian is 3,589^2 ~ 13M entries."""
    return mlp((20, 64, 32, 5), batch, loss, dtype, device, seed)


def tanh_cnn(
    batch: int = 64,
    dtype: torch.dtype = torch.float32,
    loss: str = "ce",
    device: torch.device | str = "cpu",
    seed: int = 0,
    size: int = 32,
    channels: int = 16,
) -> Problem:
    """Two 3x3 convolutions with tanh on ``3 x size x size`` inputs, then linear to 10.

    conv(3->c, pad 1) - tanh - conv(c->c, stride 2, pad 1) - tanh - flatten -
    linear(c*(size/2)^2 -> 10).  Defaults: 43,738 parameters, cross-entropy.
    """
    half = (size + 1) // 2

    def make() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(channels * half * half, 10),
        )

    return _build(make, (batch, 3, size, size), 10, loss, seed, dtype, device)


class TinyTransformerBlock(nn.Module):
    """One pre-LN transformer block on ``(batch, seq, d)`` inputs, mean-pooled to classes.

    ``x = x + Attn(LN(x)); x = x + MLP(LN(x)); logits = Linear(LN(x).mean(1))``.
    ``attn`` selects the attention kernel:

    * ``"manual"`` (default): ``softmax(QK^T/sqrt(dh)) V`` written out; supports
      double backward and forward-over-reverse everywhere.
    * ``"sdpa"``: ``F.scaled_dot_product_attention`` as is.  On CPU (torch 2.13)
      this dispatches to ``_scaled_dot_product_flash_attention_for_cpu``, which has
      NO forward-AD formula and NO double-backward formula: every HVP fails.
    * ``"sdpa_math"``: SDPA under ``sdpa_kernel(SDPBackend.MATH)``; second order
      works and agrees with ``"manual"`` to ~1e-15 in float64.
    """

    def __init__(
        self, d: int = 32, heads: int = 4, mlp_ratio: int = 4, n_out: int = 10, attn: str = "manual"
    ):
        super().__init__()
        if d % heads:
            raise ValueError("d must be divisible by heads")
        if attn not in ("manual", "sdpa", "sdpa_math"):
            raise ValueError(f"attn must be 'manual', 'sdpa' or 'sdpa_math', got {attn!r}")
        self.heads, self.attn = heads, attn
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, mlp_ratio * d)
        self.fc2 = nn.Linear(mlp_ratio * d, d)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_out)

    def _attention(self, h: Tensor) -> Tensor:
        b, s, d = h.shape
        q, k, v = self.qkv(h).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.attn == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        elif self.attn == "sdpa_math":
            with sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, s, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self._attention(self.ln1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(self.ln_f(x).mean(dim=1))


def tiny_transformer_block(
    batch: int = 32,
    seq: int = 16,
    d: int = 32,
    heads: int = 4,
    dtype: torch.dtype = torch.float32,
    loss: str = "ce",
    device: torch.device | str = "cpu",
    seed: int = 0,
    attn: str = "manual",
) -> Problem:
    """:class:`TinyTransformerBlock` (d=32: 13,098 parameters) on random embeddings."""
    return _build(
        lambda: TinyTransformerBlock(d, heads, attn=attn),
        (batch, seq, d),
        10,
        loss,
        seed,
        dtype,
        device,
    )


#: name -> builder, for benchmarks that loop over problems.
PROBLEMS: dict[str, Callable[..., Problem]] = {
    "mlp_784_256_256_10": mlp_784_256_256_10,
    "tanh_cnn": tanh_cnn,
    "mlp_30_30_10": mlp_30_30_10,
    "mlp_few_thousand": mlp_few_thousand,
    "tiny_transformer_block": tiny_transformer_block,
}
