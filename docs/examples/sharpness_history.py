"""The top Hessian eigenvalues of a small network during full-batch gradient descent."""

import sys

import torch

from torch_secorder.linalg import lanczos_eigsh
from torch_secorder.operators import HessianOperator
from torch_secorder.plot import plot_eigenvalue_history

torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5))
x, y = torch.randn(512, 20), torch.randint(0, 5, (512,))
loss_fn = torch.nn.CrossEntropyLoss()
lr = 2.0
opt = torch.optim.SGD(net.parameters(), lr=lr)

steps, sharpness = [], []
for step in range(201):
    if step % 20 == 0:
        H = HessianOperator(net, loss_fn, (x, y))
        top = lanczos_eigsh(H.matmat, H.shape[0], 2, which="LA", dtype=H.dtype,
                            generator=torch.Generator().manual_seed(step))
        steps.append(step)
        sharpness.append(top.eigenvalues)
    opt.zero_grad()
    loss_fn(net(x), y).backward()
    opt.step()

ax = plot_eigenvalue_history(steps, torch.stack(sharpness))
ax.axhline(2 / lr, ls=":", color="k", label="2 / learning rate")
ax.legend()
ax.figure.savefig(sys.argv[1] if len(sys.argv) > 1 else "sharpness.png")
