"""Data-parallel operators on torch.distributed (gloo over the loopback, CPU, float64).

One spawn of 3 ranks (tests/_distributed_worker.py) runs every check: on the world's
group (3 ranks) and on a subgroup of 2 ranks, with unequal shards.  Here, each
rank's results are compared with the single-process operators on the union of the
shards (as one batch), with the dense matrices from ``torch.func``, and with the other
ranks' results (bit for bit).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import _distributed_worker as worker
import pytest
import torch
import torch.multiprocessing as mp
from conftest import assert_close
from torch import Tensor
from torch.func import functional_call

from torch_secorder.operators._distributed import resolve_group, shared_generator

WORLD = 3
GROUPS = (3, 2)  # the world, and the pair of ranks 0 and 1

#: Seconds the ranks may take in all before the test fails (they take a few).
JOIN_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """What each of the 3 ranks computed (one spawn for the whole module)."""
    outdir = tmp_path_factory.mktemp("distributed")
    # Fresh interpreters (spawned), forked from one server that imported torch and
    # the package once: three imports on a 2-core machine would take most of the time.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "torch_secorder", worker.__name__])
    port = _free_port()
    procs = [
        ctx.Process(target=worker.run, args=(rank, WORLD, port, str(outdir)))
        for rank in range(WORLD)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(JOIN_TIMEOUT_S)
    alive = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not alive, f"ranks {alive} did not finish within {JOIN_TIMEOUT_S} s"
    results = []
    for rank in range(WORLD):
        path = Path(outdir) / f"rank{rank}.pt"
        assert path.exists(), f"rank {rank} wrote no results (exit code {procs[rank].exitcode})"
        out = torch.load(path, weights_only=False)
        assert "__error__" not in out, f"rank {rank} failed:\n{out['__error__']}"
        results.append(out)
    return results


def _members(world: int) -> range:
    return range(world)


# ---------------------------------------------------------------- references


def _dense(kind: str) -> dict[str, Tensor]:
    """Dense Hessian, GGN and empirical Fisher of the whole data set (torch.func)."""
    model, loss_fn, X, y = worker.make_problem(kind)
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(flat: Tensor) -> dict[str, Tensor]:
        out, start = {}, 0
        for name, shape in zip(names, shapes):
            size = shape.numel()
            out[name] = flat[start : start + size].reshape(shape)
            start += size
        return out

    def outputs(flat: Tensor, x: Tensor) -> Tensor:
        return functional_call(model, unflat(flat), (x,))

    def loss(flat: Tensor) -> Tensor:
        return loss_fn(outputs(flat, X), y)

    H = torch.func.hessian(loss)(theta)
    out = outputs(theta, X).detach()
    J = torch.func.jacrev(outputs)(theta, X).reshape(out.numel(), -1)
    Hz = torch.func.hessian(lambda z: loss_fn(z.reshape(out.shape), y))(out.reshape(-1))
    G = J.T @ Hz @ J
    per_sample = torch.stack(
        [
            torch.func.grad(lambda f, i=i: loss_fn(outputs(f, X[i : i + 1]), y[i : i + 1]))(theta)
            for i in range(X.shape[0])
        ]
    )
    F = per_sample.T @ per_sample
    if kind == "ce":  # reduction "mean"
        F = F / X.shape[0]
    return {"hessian": H, "ggn": G, "empirical_fisher": F, "fisher": G}


@pytest.fixture(scope="module")
def dense() -> dict[int, dict[str, Tensor]]:
    return {world: _dense(worker.KINDS[world]) for world in GROUPS}


def _single_process(world: int, name: str) -> Any:
    """The operator on the union of the shards, as one batch, in this process."""
    model, loss_fn, X, y = worker.make_problem(worker.KINDS[world])
    return worker.OPERATORS[name](model, loss_fn, (X, y))


# ---------------------------------------------------------------- tests


def test_no_process_group_means_no_collective() -> None:
    """Without torch.distributed initialised: group=None and False are local; a group raises."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    assert resolve_group(None) is None
    assert resolve_group(False) is None
    with pytest.raises(TypeError, match="group must be None, False or a"):
        resolve_group("world")
    with pytest.raises(TypeError, match="got bool"):
        resolve_group(True)
    assert shared_generator(None, None) is None


@pytest.mark.parametrize("world", GROUPS)
@pytest.mark.parametrize("name", list(worker.OPERATORS))
def test_products_diagonal_trace_equal_the_union(ranks, dense, world: int, name: str) -> None:
    """Every rank's product, diagonal and trace equal the dense matrix of the union."""
    M = dense[world][name]
    V = worker.vectors(M.shape[0])
    total = sum(sum(sizes) for sizes in worker.SHARDS[world])
    single = _single_process(world, name)
    assert_close(single.matmat(V), V @ M)  # the oracle itself, single process
    for rank in _members(world):
        out = ranks[rank]
        key = f"w{world}/{name}"
        assert int(out[f"{key}/num_samples"]) == total
        assert_close(out[f"{key}/matmat"], V @ M)
        assert_close(out[f"{key}/matvec"], M @ V[0])
        assert_close(out[f"{key}/diagonal"], torch.diagonal(M))
        assert_close(out[f"{key}/trace"], torch.trace(M))
    if name == "hessian":
        for rank in _members(world):
            block = ranks[rank][f"w{world}/hessian/block"]
            assert_close(block, V[:, -18:-3] @ M[-18:-3, -18:-3])


@pytest.mark.parametrize("world", GROUPS)
def test_monte_carlo_fisher_equals_one_process_over_the_same_batches(ranks, world: int) -> None:
    """Draws seeded by the index of a batch in the union: the one-process MC Fisher."""
    model, loss_fn, X, y = worker.make_problem(worker.KINDS[world])
    batches = [b for rank in range(world) for b in worker.shard(X, y, world, rank)]
    mc = worker.OPERATORS["fisher"](
        model, loss_fn, batches, num_samples=2, generator=worker.gen(12)
    )
    V = worker.vectors(mc.shape[0])
    dense = mc @ torch.eye(mc.shape[0], dtype=torch.float64)
    assert_close(mc.matmat(V), V @ dense)
    for rank in _members(world):
        assert_close(ranks[rank][f"w{world}/mc_fisher/matmat"], V @ dense)
        assert_close(ranks[rank][f"w{world}/mc_fisher/diagonal"], torch.diagonal(dense))


@pytest.mark.parametrize("world", GROUPS)
def test_estimators_equal_the_single_process_run(ranks, world: int) -> None:
    """Hutchinson, Hutch++, Lanczos and SLQ on the shards = on the union (same probes)."""
    A = _single_process(world, "hessian")
    ref: dict[str, Any] = {}
    worker.estimators(A, ref, "ref")
    for rank in _members(world):
        out = ranks[rank]
        for what in (
            "hutchinson",
            "hutchinson_samples",
            "hutchpp",
            "lanczos_values",
            "slq_nodes",
            "slq_weights",
        ):
            assert_close(out[f"w{world}/hessian/{what}"], ref[f"ref/{what}"])
        # eigenvectors up to sign
        got, want = out[f"w{world}/hessian/lanczos_vectors"], ref["ref/lanczos_vectors"]
        signs = torch.sign((got * want).sum(1, keepdim=True))
        assert_close(got * signs, want, tol=1e-8)
    eigenvalues = torch.linalg.eigvalsh(A @ torch.eye(A.shape[0], dtype=torch.float64))
    assert_close(ranks[0][f"w{world}/hessian/lanczos_values"], eigenvalues.flip(0)[:3])


@pytest.mark.parametrize("world", GROUPS)
def test_documented_functions_take_the_group(ranks, dense, world: int) -> None:
    """The documented functions with data= (this rank's shard) and group=."""
    from torch_secorder import model_hessian_trace_estimate
    from torch_secorder.analysis import model_eigenvalues, model_spectral_density

    H = dense[world]["hessian"]
    model, loss_fn, X, y = worker.make_problem(worker.KINDS[world])
    ref = model_hessian_trace_estimate(
        model, loss_fn, num_samples=10, data=(X, y), generator=worker.gen(9), progress=False
    )
    values, _ = model_eigenvalues(
        model,
        loss_fn,
        (X, y),
        num_eigenvalues=3,
        which="LA",
        tol=1e-10,
        num_iterations=200,
        generator=worker.gen(10),
        progress=False,
    )
    density = model_spectral_density(
        model,
        loss_fn,
        data=(X, y),
        num_steps=8,
        num_probes=3,
        generator=worker.gen(11),
        progress=False,
    )
    assert_close(values, torch.linalg.eigvalsh(H).flip(0)[:3])
    for rank in _members(world):
        out = ranks[rank]
        assert_close(out[f"w{world}/doc/eigenvalues"], values)
        assert_close(out[f"w{world}/doc/density_nodes"], density.nodes)
        assert_close(out[f"w{world}/doc/density_weights"], density.weights)
        assert_close(out[f"w{world}/doc/trace"], torch.trace(H))
        assert_close(out[f"w{world}/doc/diagonal"], torch.diagonal(H))
        assert_close(out[f"w{world}/doc/trace_estimate"], ref.samples)
        assert torch.isfinite(out[f"w{world}/doc/trace_estimate_no_generator"]).all()


def test_group_needs_the_data_form() -> None:
    from torch_secorder import model_hessian_diagonal, model_hessian_trace
    from torch_secorder.analysis import model_eigenvalues, model_spectral_density

    model, loss_fn, X, y = worker.make_problem("ce")
    for fn in (model_hessian_trace, model_hessian_diagonal):
        with pytest.raises(ValueError, match="group= needs data="):
            fn(model, loss_fn, X, y, group=object())
    for fn in (model_eigenvalues, model_spectral_density):
        with pytest.raises(ValueError, match="group= is for the data set form"):
            fn(model, loss_fn, X, y, group=object())
    # group=False: this process alone, the one-batch form as before
    assert_close(
        model_hessian_trace(model, loss_fn, X, y, group=False, progress=False),
        model_hessian_trace(model, loss_fn, X, y, progress=False),
    )


@pytest.mark.parametrize("world", GROUPS)
def test_results_identical_bit_for_bit_across_ranks(ranks, world: int) -> None:
    """Products, diagonals, traces and estimates are the same tensors on every rank."""
    keys = [k for k in ranks[0] if k.startswith(f"w{world}/")]
    assert len(keys) >= 30
    for key in keys:
        for rank in _members(world)[1:]:
            assert torch.equal(ranks[rank][key], ranks[0][key]), f"{key}: rank {rank} differs"


@pytest.mark.parametrize("world", GROUPS)
def test_shared_generator_synchronises_differently_seeded_ranks(ranks, world: int) -> None:
    """Ranks seeded differently draw the same probes from shared_generator(None, group)."""
    g = torch.Generator()
    g.set_state(ranks[0][f"w{world}/shared_state"])
    A = _single_process(world, "hessian")
    from torch_secorder.linalg import hutchinson

    ref = hutchinson(A.matmat, A.shape[0], 6, generator=g, dtype=torch.float64, progress=False)
    for rank in _members(world):
        assert_close(ranks[rank][f"w{world}/shared_hutchinson"], ref.samples)


def test_ddp_model_accepted_without_its_all_reduce(ranks, dense) -> None:
    """A DDP-wrapped model: exact products and diagonal; its comm hook never fires in them."""
    H, G = dense[3]["hessian"], dense[3]["ggn"]
    V = worker.vectors(H.shape[0])
    for rank in range(WORLD):
        out = ranks[rank]
        for strategy in ("vmap", "graph"):
            assert_close(out[f"ddp/hessian_{strategy}/matmat"], V @ H)
            assert_close(out[f"ddp/hessian_{strategy}/diagonal"], torch.diagonal(H))
        assert_close(out["ddp/ggn/matmat"], V @ G)
        assert_close(out["ddp/doc/diagonal"], torch.diagonal(H))
        assert int(out["ddp/hook_calls"]) == 0
        assert bool(out["ddp/grads_none"])
        assert bool(out["ddp/training"])
        assert int(out["ddp/hook_calls_after_backward"]) > 0  # the sensor works


@pytest.mark.parametrize(
    ("key", "failing", "words"),
    [
        ("fail/nan_matmat", 1, ["non-finite loss", "Hessian products"]),
        ("fail/bad_target_diagonal", 2, ["GGN diagonal", "batch 2 of data", "ShapeError"]),
        ("fail/empty_shard", 2, ["data is empty", "the operator's data"]),
    ],
)
def test_a_rank_that_raises_makes_every_rank_raise(ranks, key, failing, words) -> None:
    """The same DistributedError on every rank (the failing one chains its own error)."""
    messages = [ranks[rank][key] for rank in range(WORLD)]
    texts = [m.split("|cause=")[0] for m in messages]
    assert texts[0].startswith(f"rank {failing} of 3 raised"), messages[0]
    assert all(t == texts[0] for t in texts), messages
    for word in words:
        assert word in texts[0], texts[0]
    causes = [m.split("|cause=")[1] for m in messages]
    assert causes[failing] != "-"
    assert all(c == "-" for r, c in enumerate(causes) if r != failing)


def test_operators_of_different_sizes_raise_everywhere(ranks) -> None:
    messages = [ranks[rank]["fail/sizes_differ"] for rank in range(WORLD)]
    assert all(m == messages[0] for m in messages), messages
    assert "differ in size: [43, 43, 15] parameter entries" in messages[0], messages[0]


def test_vectors_that_differ_between_ranks_raise_everywhere(ranks, dense) -> None:
    messages = [ranks[rank]["fail/vectors_differ"] for rank in range(WORLD)]
    assert all(m == messages[0] for m in messages), messages
    assert "differ between ranks" in messages[0] and "shared_generator" in messages[0]
    V = worker.vectors(dense[3]["hessian"].shape[0])
    for rank in range(WORLD):  # and the group goes on working
        assert_close(ranks[rank]["fail/after"], V @ dense[3]["hessian"])


def test_rank_outside_the_group_is_refused(ranks) -> None:
    assert ranks[2]["not_member"].startswith("ValueError: group: this process"), ranks[2][
        "not_member"
    ]
