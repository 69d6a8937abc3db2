"""GPU benchmark (issue 12): ms per Hutchinson probe, ours against the peers, one process.

Models (float32, the issue's table):

* MLP 784-1024-1024-10, batch 512 (1.86M parameters), MSE;
* a small tanh ResNet (width 32, two residual blocks, CIFAR-sized 3x32x32, batch 128),
  cross-entropy;
* a 2-layer GPT (d = 128, 4 heads, 16 sequences of 64 tokens, vocabulary 256),
  next-token cross-entropy.

Columns: ``ours`` (``model_hessian_trace_estimate`` with its defaults: the chunk
policy of :mod:`torch_secorder._chunks`), ``engine`` (the bare engine,
``func.hutchinson_trace_estimate`` on ``functional_call``; the wrapper's overhead is
``ours / engine``), ``compiled`` (the engine's HVP under ``torch.compile``), and the
peers: curvlinops 3.0.1 (``HessianLinearOperator`` + ``hutchinson_trace``),
PyHessian 0.1 (``hessian.trace``), torch-secorder 0.0.1 (``hvp.hessian_trace``).
Then the exact diagonal against BackPACK's ``DiagHessian`` on the MLPs, and the
accuracy cost of TF32 (``bench_tf32_accuracy.accuracy_table``: HVP, trace and top
eigenvalue against float64; real TF32 on CUDA, emulated on the CPU).

    python benchmarks/bench_gpu.py                # on cuda, the issue's sizes
    python benchmarks/bench_gpu.py --device cpu --quick   # a smoke run on the CPU

Ratios are peer / ours (above 1: ours is faster).  Peak GPU memory of each of
ours is printed beside it.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._models import Problem, mlp  # noqa: E402
from benchmarks._peers import load_backpack  # noqa: E402
from benchmarks._timing import busy_warning, print_table, sync, time_call  # noqa: E402
from benchmarks.bench_hutchinson import peers  # noqa: E402
from benchmarks.bench_tf32_accuracy import accuracy_table  # noqa: E402
from torch_secorder.core.hessian_diagonal import model_hessian_diagonal  # noqa: E402
from torch_secorder.core.hessian_trace import model_hessian_trace_estimate  # noqa: E402
from torch_secorder.func import hutchinson_trace_estimate  # noqa: E402
from torch_secorder.func.hvp import hvp  # noqa: E402


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return torch.tanh(x + self.conv2(torch.tanh(self.conv1(x))))


class TanhResNet(nn.Module):
    def __init__(self, width: int, classes: int = 10, blocks: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(blocks)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.blocks(torch.tanh(self.stem(x)))
        return self.head(x.mean((2, 3)))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, layers: int, length: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.position = nn.Parameter(torch.randn(length, d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        x = self.layers(x, mask=self.mask, is_causal=True)
        return self.head(self.norm(x)).flatten(0, 1)


def problems(device: str, quick: bool) -> dict[str, Problem]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    scale = 8 if quick else 1
    out = {}
    out["mlp 784-1024-1024-10"] = mlp(
        (784, 1024 // scale, 1024 // scale, 10), batch=512 // scale, device=device
    )
    resnet = TanhResNet(32 // (2 if quick else 1)).to(device).eval()
    batch = 128 // scale
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    out["tanh resnet w32"] = Problem(resnet, nn.CrossEntropyLoss(), x, y)
    length, seqs, vocab = (16, 4, 64) if quick else (64, 16, 256)
    gpt = GPT(vocab, 128 // (2 if quick else 1), 4, 2, length).to(device).eval()
    tokens = torch.randint(0, vocab, (seqs, length + 1), generator=g).to(device)
    out["gpt 2x128"] = Problem(
        gpt, nn.CrossEntropyLoss(), tokens[:, :-1], tokens[:, 1:].reshape(-1)
    )
    return out


def ours(problem: Problem, probes: int) -> Callable[[], object]:
    def run():
        return model_hessian_trace_estimate(
            problem.model,
            problem.loss_fn,
            problem.inputs,
            problem.targets,
            probes,
            progress=False,
        )

    return run


def _pure(problem: Problem):
    names = [n for n, p in problem.model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in problem.model.named_parameters() if p.requires_grad}

    def f(p):
        out = torch.func.functional_call(problem.model, p, (problem.inputs,))
        return problem.loss_fn(out, problem.targets)

    return names, params, f


def engine(problem: Problem, probes: int) -> Callable[[], object]:
    _, params, f = _pure(problem)
    return lambda: hutchinson_trace_estimate(f, params, probes, progress=False)


def compiled(problem: Problem, probes: int) -> Callable[[], object] | str:
    """The engine's HVP, vmapped over all probes, under ``torch.compile``."""
    _, params, f = _pure(problem)
    try:
        batched = torch.compile(torch.func.vmap(lambda v: hvp(f, params, v)))
    except Exception as exc:  # noqa: BLE001
        return f"torch.compile failed: {type(exc).__name__}"

    def run():
        V = {
            k: torch.randint(0, 2, (probes, *p.shape), device=p.device).to(p.dtype) * 2 - 1
            for k, p in params.items()
        }
        HV = batched(V)
        return sum((V[k] * HV[k]).sum() for k in params) / probes

    try:
        run()
    except Exception as exc:  # noqa: BLE001
        return f"torch.compile failed: {type(exc).__name__}: {str(exc)[:80]}"
    return run


def _peak(fn: Callable[[], object], device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() / 2**30


def interleaved(runners: dict[str, Callable[[], object]], repeats: int) -> dict[str, object]:
    """Median seconds per call, in shuffled interleaved rounds after one warm-up each.

    A runner that raises on its warm-up is reported by its error instead of a time.
    """
    failed: dict[str, object] = {}
    for label, fn in list(runners.items()):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run this model
            failed[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
            print(f"  {label} failed: {failed[label]}")
            runners = {k: v for k, v in runners.items() if k != label}
    times: dict[str, list[float]] = {label: [] for label in runners}
    order, rng = list(runners), random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)
        for label in order:
            times[label].append(time_call(runners[label], repeats=1, warmup=0))
    return {**failed, **{label: statistics.median(v) for label, v in times.items()}}


def trace_table(cases: dict[str, Problem], probes: int, repeats: int, device: str) -> None:
    rows = []
    for name, problem in cases.items():
        row: dict = {"case": f"{name} (n={problem.n_params:,})"}
        runners: dict = {"ours": ours(problem, probes), "engine": engine(problem, probes)}
        comp = compiled(problem, probes)
        candidates = {"compiled": comp, **peers(problem, probes, device)}
        for label, fn in candidates.items():
            if isinstance(fn, str):
                row[label] = fn
                print(f"  {name}: {label} skipped: {fn}")
            else:
                runners[label] = fn
        for label, seconds in interleaved(runners, repeats).items():
            row[label] = seconds / probes if isinstance(seconds, float) else seconds
        peak = _peak(runners["ours"], device)
        if peak is not None:
            print(f"  {name}: peak memory of ours {peak:.2f} GiB")
        rows.append(row)
    print(f"\nHutchinson, time per probe ({probes} probes, {device}, float32); (x) = peer/ours")
    print_table(rows, ours="ours")


def diagonal_table(cases: dict[str, Problem], repeats: int, device: str) -> None:
    backpack = load_backpack()
    rows = []
    for name, problem in cases.items():
        if not name.startswith("mlp"):
            continue
        row: dict = {"case": f"{name} (n={problem.n_params:,})"}
        runners: dict = {
            "ours": lambda p=problem: model_hessian_diagonal(
                p.model, p.loss_fn, p.inputs, p.targets
            )
        }
        if backpack.module is None:
            row["backpack"] = backpack.reason
        else:
            from backpack import backpack as bp_context
            from backpack import extend
            from backpack.extensions import DiagHessian

            model = extend(_copy_sequential(problem.model))
            loss_fn = extend(type(problem.loss_fn)())

            def run_backpack(model=model, loss_fn=loss_fn, p=problem):
                loss = loss_fn(model(p.inputs), p.targets)
                with bp_context(DiagHessian()):
                    loss.backward()
                return [q.diag_h for q in model.parameters()]

            runners["backpack"] = run_backpack
        row.update(interleaved(runners, repeats))
        rows.append(row)
    print(f"\nExact Hessian diagonal ({device}, float32); (x) = peer/ours")
    print_table(rows, ours="ours")


def _copy_sequential(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--probes", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a CPU smoke run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warning = busy_warning()
    if warning and args.device == "cpu":
        print(warning)
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    cases = problems(args.device, args.quick)
    trace_table(cases, args.probes, args.repeats, args.device)
    diagonal_table(cases, args.repeats, args.device)
    # real TF32 on CUDA, emulated by rounding on the CPU
    accuracy_table(cases, args.device)


if __name__ == "__main__":
    main()
