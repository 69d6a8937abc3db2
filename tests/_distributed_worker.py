"""The rank side of tests/test_distributed.py: problems, shards, and what each rank computes.

Imported by the test (which builds the single-process references on the union of the
shards) and by the ranks it spawns (which compute on their shards with ``group=``).
Each rank saves a dict ``name -> tensor or str`` to ``<outdir>/rank<r>.pt``.

The world has 3 ranks: every check runs on the world's group (3 ranks, cross-entropy,
``reduction="mean"``), then on a subgroup of ranks 0 and 1 (2 ranks, MSE with
``reduction="sum"``).  Shards have unequal sizes and unequal batch counts.
"""

from __future__ import annotations

import copy
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from torch_secorder import (
    model_hessian_diagonal,
    model_hessian_trace,
    model_hessian_trace_estimate,
)
from torch_secorder.analysis import model_eigenvalues, model_spectral_density
from torch_secorder.errors import DistributedError
from torch_secorder.linalg import hutchinson, hutchpp, lanczos_eigsh, stochastic_lanczos_quadrature
from torch_secorder.operators import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)
from torch_secorder.operators._distributed import resolve_group, shared_generator

DTYPE = torch.float64

#: Batch sizes of each rank's shard, per number of ranks (unequal on purpose).
SHARDS = {3: [[4, 3], [5], [2, 2, 1]], 2: [[3, 4], [6, 2, 2]]}

#: The problem of each group: the world (3 ranks) and the pair (ranks 0 and 1).
KINDS = {3: "ce", 2: "mse"}

OPERATORS = {
    "hessian": HessianOperator,
    "ggn": GGNOperator,
    "empirical_fisher": EmpiricalFisherOperator,
    "fisher": FisherOperator,
}

#: Vectors of the products.
NUM_VECTORS = 5


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_problem(kind: str) -> tuple[nn.Module, Any, Tensor, Tensor]:
    """A float64 tanh MLP (4-5-3), its loss, and the whole data set ``(X, y)``."""
    g = gen(7 if kind == "ce" else 8)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DTYPE))
    total = sum(sum(sizes) for sizes in SHARDS[3 if kind == "ce" else 2])
    X = torch.randn(total, 4, generator=g, dtype=DTYPE)
    if kind == "ce":
        return model, nn.CrossEntropyLoss(), X, torch.randint(0, 3, (total,), generator=g)
    return model, nn.MSELoss(reduction="sum"), X, torch.randn(total, 3, generator=g, dtype=DTYPE)


def shard(X: Tensor, y: Tensor, world: int, rank: int) -> list[tuple[Tensor, Tensor]]:
    """Rank ``rank``'s batches: consecutive slices of the whole data set."""
    start = sum(sum(sizes) for sizes in SHARDS[world][:rank])
    batches = []
    for size in SHARDS[world][rank]:
        batches.append((X[start : start + size], y[start : start + size]))
        start += size
    return batches


def vectors(n: int) -> Tensor:
    return torch.randn(NUM_VECTORS, n, generator=gen(2), dtype=DTYPE)


def estimators(A: Any, out: dict[str, Any], prefix: str) -> None:
    """The estimators on operator ``A`` with generators seeded alike on every rank."""
    n = A.shape[0]
    est = hutchinson(A.matmat, n, 12, generator=gen(3), dtype=DTYPE, progress=False)
    out[f"{prefix}/hutchinson"] = torch.stack([est.estimate, est.std_error])
    out[f"{prefix}/hutchinson_samples"] = est.samples
    pp = hutchpp(A.matmat, n, 21, generator=gen(4), dtype=DTYPE, progress=False)
    out[f"{prefix}/hutchpp"] = pp.estimate
    eig = lanczos_eigsh(A.matmat, n, 3, which="LA", tol=1e-10, dtype=DTYPE, generator=gen(5))
    out[f"{prefix}/lanczos_values"] = eig.eigenvalues
    out[f"{prefix}/lanczos_vectors"] = eig.eigenvectors
    slq = stochastic_lanczos_quadrature(
        A.matmat, n, num_steps=8, num_probes=3, generator=gen(6), dtype=DTYPE, progress=False
    )
    out[f"{prefix}/slq_nodes"] = slq.nodes
    out[f"{prefix}/slq_weights"] = slq.weights


def operator_checks(group: Any, world: int, rank: int, out: dict[str, Any]) -> None:
    prefix = f"w{world}"
    model, loss_fn, X, y = make_problem(KINDS[world])
    batches = shard(X, y, world, rank)
    for name, cls in OPERATORS.items():
        A = cls(model, loss_fn, batches, group=group)
        V = vectors(A.shape[0])
        out[f"{prefix}/{name}/num_samples"] = torch.tensor(A.num_samples)
        out[f"{prefix}/{name}/matmat"] = A.matmat(V)
        out[f"{prefix}/{name}/matvec"] = A @ V[0]
        out[f"{prefix}/{name}/diagonal"] = A.diagonal()
        out[f"{prefix}/{name}/trace"] = A.trace()
        if name == "hessian":
            out[f"{prefix}/hessian/block"] = A.block(["2.weight"]).matmat(V[:, -18:-3])
            estimators(A, out, f"{prefix}/hessian")
    # Monte Carlo Fisher: draws seeded by the batch's index in the union of the shards.
    mc = FisherOperator(model, loss_fn, batches, num_samples=2, generator=gen(12), group=group)
    out[f"{prefix}/mc_fisher/matmat"] = mc.matmat(vectors(mc.shape[0]))
    out[f"{prefix}/mc_fisher/diagonal"] = mc.diagonal()
    # The documented functions, data= this rank's shard.
    out[f"{prefix}/doc/trace"] = model_hessian_trace(
        model, loss_fn, data=batches, group=group, progress=False
    )
    est = model_hessian_trace_estimate(
        model, loss_fn, num_samples=10, data=batches, group=group, generator=gen(9)
    )
    out[f"{prefix}/doc/trace_estimate"] = est.samples
    diagonal = model_hessian_diagonal(model, loss_fn, data=batches, group=group, progress=False)
    out[f"{prefix}/doc/diagonal"] = torch.cat([d.reshape(-1) for d in diagonal])
    values, _ = model_eigenvalues(
        model,
        loss_fn,
        batches,
        num_eigenvalues=3,
        which="LA",
        tol=1e-10,
        num_iterations=200,
        generator=gen(10),
        group=group,
        progress=False,
    )
    out[f"{prefix}/doc/eigenvalues"] = values
    density = model_spectral_density(
        model,
        loss_fn,
        data=batches,
        num_steps=8,
        num_probes=3,
        generator=gen(11),
        group=group,
        progress=False,
    )
    out[f"{prefix}/doc/density_nodes"] = density.nodes
    out[f"{prefix}/doc/density_weights"] = density.weights
    torch.manual_seed(200 + rank)  # generator=None: rank 0's seed, on every rank
    est = model_hessian_trace_estimate(
        model, loss_fn, num_samples=10, data=batches, group=group, progress=False
    )
    out[f"{prefix}/doc/trace_estimate_no_generator"] = est.samples
    # Ranks seeded differently: the shared generator gives every rank the same probes.
    torch.manual_seed(100 + rank)
    A = HessianOperator(model, loss_fn, batches, group=group)
    g = shared_generator(None, group)
    out[f"{prefix}/shared_state"] = g.get_state()
    est = hutchinson(A.matmat, A.shape[0], 6, generator=g, dtype=DTYPE, progress=False)
    out[f"{prefix}/shared_hutchinson"] = est.samples


def ddp_checks(group: Any, rank: int, out: dict[str, Any]) -> None:
    """A DDP-wrapped model: no all-reduce of its own fires inside our products."""
    model, loss_fn, X, y = make_problem("ce")
    batches = shard(X, y, 3, rank)
    ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    calls: list[int] = []

    def counting_hook(state, bucket):  # no annotations: DDP checks them against GradBucket
        calls.append(1)
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    ddp.register_comm_hook(None, counting_hook)
    V = vectors(sum(p.numel() for p in model.parameters()))
    for strategy in ("vmap", "graph"):
        A = HessianOperator(ddp, loss_fn, batches, group=group, strategy=strategy)
        out[f"ddp/hessian_{strategy}/matmat"] = A.matmat(V)
        out[f"ddp/hessian_{strategy}/diagonal"] = A.diagonal()
    out["ddp/ggn/matmat"] = GGNOperator(ddp, loss_fn, batches, group=group).matmat(V)
    diagonal = model_hessian_diagonal(ddp, loss_fn, data=batches, group=group, progress=False)
    out["ddp/doc/diagonal"] = torch.cat([d.reshape(-1) for d in diagonal])
    out["ddp/hook_calls"] = torch.tensor(len(calls))
    out["ddp/grads_none"] = torch.tensor(all(p.grad is None for p in ddp.parameters()))
    out["ddp/training"] = torch.tensor(ddp.training and ddp.module.training)
    inputs, targets = batches[0]
    loss_fn(ddp(inputs), targets).backward()  # the sensor: a real backward fires the hook
    out["ddp/hook_calls_after_backward"] = torch.tensor(len(calls))


def _message(call: Any) -> str:
    try:
        call()
    except DistributedError as exc:
        cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else "-"
        return f"{exc}|cause={cause}"
    except Exception as exc:  # noqa: BLE001 - reported to the test as text
        return f"UNEXPECTED {type(exc).__name__}: {exc}"
    return "NO ERROR"


def failure_checks(group: Any, rank: int, out: dict[str, Any]) -> None:
    """Ranks that raise: every rank must raise the same DistributedError, then go on."""
    model, loss_fn, X, y = make_problem("ce")
    batches = shard(X, y, 3, rank)
    V = vectors(sum(p.numel() for p in model.parameters()))
    nan_batches = list(batches)
    if rank == 1:  # a non-finite loss on rank 1
        nan_batches[0] = (torch.full_like(batches[0][0], float("nan")), batches[0][1])
    A = HessianOperator(model, loss_fn, nan_batches, group=group)
    out["fail/nan_matmat"] = _message(lambda: A.matmat(V))
    bad_batches = list(batches)
    if rank == 2:  # targets that do not fit the outputs, on rank 2
        bad_batches[-1] = (batches[-1][0], torch.zeros(7, 2))
    B = GGNOperator(model, loss_fn, bad_batches, group=group)
    out["fail/bad_target_diagonal"] = _message(B.diagonal)
    out["fail/empty_shard"] = _message(
        lambda: HessianOperator(model, loss_fn, [] if rank == 2 else batches, group=group)
    )
    params = ["2.weight"] if rank == 2 else None  # another size on rank 2
    out["fail/sizes_differ"] = _message(
        lambda: HessianOperator(model, loss_fn, batches, params, group=group)
    )
    good = HessianOperator(model, loss_fn, batches, group=group)
    own = torch.randn(V.shape, generator=gen(50 + rank), dtype=DTYPE)
    out["fail/vectors_differ"] = _message(lambda: good.matmat(own))
    out["fail/after"] = good.matmat(V)  # the group still works after the failures


def run(rank: int, world: int, port: int, outdir: str) -> None:
    """Entry point of a spawned rank."""
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    started = time.perf_counter()
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        operator_checks(resolve_group(None), world, rank, out)
        ddp_checks(None, rank, out)
        failure_checks(None, rank, out)
        pair = dist.new_group([0, 1])
        if rank < 2:
            operator_checks(pair, 2, rank, out)
        else:
            out["not_member"] = _message(lambda: resolve_group(pair))
            try:
                resolve_group(pair)
            except ValueError as exc:
                out["not_member"] = f"ValueError: {exc}"
        dist.barrier()
        out["seconds"] = time.perf_counter() - started
    except Exception:  # noqa: BLE001 - reported to the test
        out["__error__"] = traceback.format_exc()
    finally:
        torch.save(out, Path(outdir) / f"rank{rank}.pt")
        dist.destroy_process_group()
