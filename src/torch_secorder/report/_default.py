"""The report's built-in problem: a small tanh network, briefly trained on synthetic data.

No download: 512 Gaussian inputs in 16 dimensions, labelled by a random teacher
network (so that the task is learnable), and a 16-32-32-4 tanh MLP (1,732
parameters, float64) trained for 60 full-batch Adam steps (loss about 0.12) from the
seed.  Its Hessian has a few large outlying eigenvalues, a bulk near zero and
some negative curvature: the shape the report's figures are made to show.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["DEFAULT_TRAIN_STEPS", "default_problem"]

#: Full-batch Adam steps of the default model.
DEFAULT_TRAIN_STEPS = 60


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    ).double()


def default_problem(
    seed: int = 0, train_steps: int = DEFAULT_TRAIN_STEPS
) -> tuple[nn.Module, nn.Module, tuple[Tensor, Tensor]]:
    """``(model, loss_fn, (inputs, targets))`` of the built-in problem for ``seed``.

    The same seed gives the same model, bit for bit, in the same environment.

    Example:
        >>> model, loss_fn, (x, y) = default_problem(0, train_steps=0)
        >>> sum(p.numel() for p in model.parameters()), tuple(x.shape), tuple(y.shape)
        (1732, (512, 16), (512,))
    """
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(512, 16, generator=gen, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        teacher = _mlp()
        model = _mlp()
    with torch.no_grad():
        targets = teacher(3.0 * inputs).argmax(dim=1)
    loss_fn = nn.CrossEntropyLoss()
    if train_steps:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(train_steps):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(inputs), targets).backward()
            opt.step()
        for p in model.parameters():
            p.grad = None
    model.eval()  # no dropout or batch norm: the same Hessian, without training-mode bookkeeping
    return model, loss_fn, (inputs, targets)
