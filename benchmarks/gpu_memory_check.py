"""No out-of-memory error from a default chunk on a 16 GiB card (issue 12), on a real GPU.

The process is capped at ``--cap-gib`` (default 16) of the card's memory with
``torch.cuda.set_per_process_memory_fraction``; the chunk policy reads that cap
(:class:`torch_secorder._chunks.MemoryReader`).  Then, with every default (no
``chunk_size``), the calls the issue saw exceed 16 GiB, and the three models of
``bench_gpu.py``:

* the exact trace of a conv + batch-norm ResNet of about 10k parameters, batch 32
  (19.6 GiB peak before the chunk policy);
* the exact diagonal of a tanh ResNet of width 16 on CIFAR batch 64 (the issue's had
  28,554 parameters and peaked at 42.2 GiB; its blocks are not given: six blocks of
  ``bench_gpu.TanhResNet(16)`` make 28,458);
* the Hutchinson estimate (64 probes) of the MLP, the tanh ResNet and the GPT.

Each line: the call, its peak memory (``torch.cuda.max_memory_allocated``), the time,
and ``ok`` or the error.  Exactness is checked on the way: the exact trace equals the
sum of the exact diagonal (float32, relative 1e-4).

    python benchmarks/gpu_memory_check.py [--cap-gib 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._models import Problem  # noqa: E402
from benchmarks.bench_gpu import TanhResNet, problems  # noqa: E402
from torch_secorder.core.hessian_diagonal import model_hessian_diagonal  # noqa: E402
from torch_secorder.core.hessian_trace import (  # noqa: E402
    model_hessian_trace,
    model_hessian_trace_estimate,
)


class BNBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def bn_resnet(device: str) -> Problem:
    """A conv + batch-norm ResNet of about 10k parameters (eval mode), CIFAR batch 32."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        BNBlock(16),
        BNBlock(16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).to(device)
    model.eval()
    x = torch.randn(32, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (32,), generator=g).to(device)
    return Problem(model, nn.CrossEntropyLoss(), x, y)


def tanh_resnet16(device: str) -> Problem:
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = TanhResNet(16, blocks=6).to(device).eval()
    x = torch.randn(64, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (64,), generator=g).to(device)
    return Problem(model, nn.CrossEntropyLoss(), x, y)


def attempt(label: str, call, device: torch.device):
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        result = call()
        torch.cuda.synchronize(device)
        status = "ok"
    except torch.OutOfMemoryError as exc:
        result, status = None, f"OUT OF MEMORY: {str(exc).splitlines()[0]}"
    except RuntimeError as exc:
        result, status = None, f"ERROR: {str(exc).splitlines()[0]}"
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"{label:<52} peak {peak:6.2f} GiB  {seconds:8.2f} s  {status}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cap-gib", type=float, default=16.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_memory_check: needs a CUDA device")
        return
    device = torch.device("cuda", 0)
    total = torch.cuda.mem_get_info(device)[1]
    fraction = min(1.0, args.cap_gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    print(
        f"{torch.cuda.get_device_name(device)}, {total / 2**30:.1f} GiB; capped at "
        f"{args.cap_gib:g} GiB (fraction {fraction:.3f}); torch {torch.__version__}",
        flush=True,
    )
    bn = bn_resnet("cuda")
    n_bn = sum(p.numel() for p in bn.model.parameters())
    trace = attempt(
        f"exact trace, conv+BN ResNet (n={n_bn:,}), batch 32",
        lambda: model_hessian_trace(bn.model, bn.loss_fn, bn.inputs, bn.targets, progress=False),
        device,
    )
    diag = attempt(
        f"exact diagonal, same (n={n_bn:,})",
        lambda: model_hessian_diagonal(bn.model, bn.loss_fn, bn.inputs, bn.targets, progress=False),
        device,
    )
    if trace is not None and diag is not None:
        total_diag = float(sum(d.sum() for d in diag))
        gap = abs(float(trace) - total_diag) / max(abs(total_diag), 1e-30)
        print(f"  trace {float(trace):.6g} vs sum of diagonal {total_diag:.6g}: rel {gap:.1e}")
    tr = tanh_resnet16("cuda")
    n_tr = sum(p.numel() for p in tr.model.parameters())
    attempt(
        f"exact diagonal, tanh ResNet w16 (n={n_tr:,}), batch 64",
        lambda: model_hessian_diagonal(tr.model, tr.loss_fn, tr.inputs, tr.targets, progress=False),
        device,
    )
    for name, problem in problems("cuda", quick=False).items():
        attempt(
            f"Hutchinson 64 probes, {name}",
            lambda problem=problem: model_hessian_trace_estimate(
                problem.model,
                problem.loss_fn,
                problem.inputs,
                problem.targets,
                64,
                progress=False,
            ),
            device,
        )


if __name__ == "__main__":
    main()
