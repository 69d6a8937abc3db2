"""The chunk policy (issue 12) in the matrix-free estimators of ``torch_secorder.linalg``.

Every estimator's default chunk comes from :mod:`torch_secorder._chunks`; the numbers
are the same whatever the chunk (the same probes: :class:`ProbeStream`), and the chunks
follow a stubbed CUDA free-memory reading on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, dense_hessian, make_mlp
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_secorder import _chunks
from torch_secorder._chunks import chunk_policy
from torch_secorder.func.hvp import hessian_matmat
from torch_secorder.linalg import (
    hutchinson,
    hutchinson_adaptive,
    hutchinson_diagonal,
    hutchpp,
    stochastic_lanczos_quadrature,
    xdiag,
    xnystrace,
    xtrace,
)
from torch_secorder.linalg import probes as probes_module
from torch_secorder.linalg.probes import ProbeStream, draw_probes

DTYPE = torch.float64
N = 24


def _matrix(seed: int = 0, psd: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(N, N, generator=g, dtype=DTYPE)
    return B @ B.T if psd else B + B.T


class RowByRow:
    """``V -> V A`` one row at a time (each row's product is the same in any batch)."""

    def __init__(self, A: torch.Tensor):
        self.A = A
        self.calls: list[int] = []

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        self.calls.append(V.shape[0])
        return torch.stack([self.A @ v for v in V])


def _run(name: str, matmat, chunk_size, seed: int = 1, distribution: str = "rademacher"):
    g = torch.Generator().manual_seed(seed)
    common = {"generator": g, "dtype": DTYPE, "chunk_size": chunk_size, "progress": False}
    if name == "hutchinson":
        est = hutchinson(matmat, N, 10, distribution=distribution, **common)
        return est.samples
    if name == "hutchinson_diagonal":
        est = hutchinson_diagonal(matmat, N, 10, distribution=distribution, **common)
        return torch.cat([est.estimate, est.std_error])
    if name == "hutchinson_adaptive":
        est = hutchinson_adaptive(
            matmat, N, rtol=0.05, max_matvecs=200, distribution=distribution, **common
        )
        return torch.stack([est.estimate, est.std_error, torch.tensor(float(est.matvecs))])
    if name == "hutchpp":
        est = hutchpp(matmat, N, 12, distribution=distribution, **common)
        return torch.stack([est.estimate, est.std_error])
    if name == "xtrace":
        est = xtrace(matmat, N, 12, **common)
        return torch.stack([est.estimate, est.std_error])
    if name == "xnystrace":
        est = xnystrace(matmat, N, 12, **common)
        return torch.stack([est.estimate, est.std_error])
    if name == "xdiag":
        est = xdiag(matmat, N, 12, **common)
        return torch.cat([est.estimate, est.std_error])
    if name == "slq":
        res = stochastic_lanczos_quadrature(
            matmat, N, num_steps=6, num_probes=7, distribution=distribution, **common
        )
        return torch.cat([res.nodes.flatten(), res.weights.flatten()])
    raise AssertionError(name)


ESTIMATORS = [
    "hutchinson",
    "hutchinson_diagonal",
    "hutchinson_adaptive",
    "hutchpp",
    "xtrace",
    "xnystrace",
    "xdiag",
    "slq",
]


@pytest.fixture
def small_draws(monkeypatch):
    """Probe blocks of 3 rows, so that chunks cut across the stream's blocks."""
    monkeypatch.setattr(probes_module, "DRAW_ENTRIES", 3 * N + 1)


# XTrace, XNysTrace and XDiag draw Rademacher test vectors only
CASES = [(name, "rademacher") for name in ESTIMATORS] + [
    (name, "gaussian") for name in ESTIMATORS if name not in ("xtrace", "xnystrace", "xdiag")
]


@pytest.mark.parametrize(("name", "distribution"), CASES)
def test_numbers_do_not_depend_on_the_chunk(name, distribution, small_draws):
    A = _matrix(psd=name == "xnystrace")
    reference = _run(name, RowByRow(A), None, distribution=distribution)
    for chunk in (1, 2, 5, 1000):
        got = _run(name, RowByRow(A), chunk, distribution=distribution)
        if name == "hutchinson_diagonal":  # moments merged chunk by chunk: rounding only
            assert_close(got, reference, tol=1e-13)
        else:
            assert torch.equal(got, reference), (name, chunk)


@settings(max_examples=15, deadline=None)
@given(
    total=st.integers(1, 40),
    dim=st.integers(1, 9),
    rows=st.integers(1, 7),
    cuts=st.lists(st.integers(1, 12), min_size=1, max_size=20),
    distribution=st.sampled_from(["rademacher", "gaussian", "sparse_rademacher"]),
)
def test_probe_stream_is_cut_from_fixed_blocks(total, dim, rows, cuts, distribution):
    """The stream's probes are its blocks' rows, however the chunks cut them."""
    old = probes_module.DRAW_ENTRIES
    probes_module.DRAW_ENTRIES = rows * dim
    try:
        stream = ProbeStream(
            total, dim, distribution=distribution, generator=torch.Generator().manual_seed(5)
        )
        pieces, left = [], total
        for cut in cuts:
            if left == 0:
                break
            pieces.append(stream.take(min(cut, left)))
            left -= pieces[-1].shape[0]
        if left:
            pieces.append(stream.take(left))
    finally:
        probes_module.DRAW_ENTRIES = old
    g = torch.Generator().manual_seed(5)
    blocks = [
        draw_probes(min(rows, total - start), dim, distribution=distribution, generator=g)
        for start in range(0, total, rows)
    ]
    assert torch.equal(torch.cat(pieces), torch.cat(blocks))
    with pytest.raises(ValueError, match="no probes left"):
        stream.take(1)


def test_one_block_is_the_plain_draw(monkeypatch):
    """Up to DRAW_ENTRIES entries, the stream is draw_probes of all the probes at once."""
    monkeypatch.setattr(probes_module, "DRAW_ENTRIES", 64 * 50)
    m, dim = 64, 50
    stream = ProbeStream(
        m, dim, distribution="gaussian", generator=torch.Generator().manual_seed(2)
    )
    got = torch.cat([stream.take(5) for _ in range(12)] + [stream.take(4)])
    expected = draw_probes(
        m, dim, distribution="gaussian", generator=torch.Generator().manual_seed(2)
    )
    assert torch.equal(got, expected)


def test_cpu_default_is_the_tangent_budget(monkeypatch):
    """On the CPU a default chunk holds about cpu_elements entries (was: all probes at once)."""
    monkeypatch.setattr(chunk_policy, "cpu_elements", 5 * N)
    A = _matrix()
    for name, expected in [
        ("hutchinson", [5, 5]),
        ("hutchinson_diagonal", [5, 5]),
        ("hutchpp", [4, 4, 4]),  # sketch, basis, residual probes: 4 each
        ("xtrace", [5, 1, 5, 1]),  # 6 test vectors, then the 6 basis vectors
        ("xdiag", [5, 1, 5, 1]),
    ]:
        matmat = RowByRow(A)
        _run(name, matmat, None)
        assert matmat.calls == expected, name
    matmat = RowByRow(A)
    _run("hutchinson_adaptive", matmat, None)  # min_samples (8) unless the budget is smaller
    assert set(matmat.calls[:-1]) == {5}
    matmat = RowByRow(A)
    _run("slq", matmat, None)  # a probe holds 7 vectors of N (6 steps + 1): one per chunk
    assert max(matmat.calls) == 1


def test_exact_diagonal_route_follows_the_budget(monkeypatch):
    monkeypatch.setattr(chunk_policy, "cpu_elements", 7 * N)
    A = _matrix()
    matmat = RowByRow(A)
    est = hutchinson_diagonal(matmat, N, N, dtype=DTYPE, progress=False)
    assert matmat.calls == [7, 7, 7, 3]
    assert torch.equal(est.estimate, A.diagonal())


class StubCuda:
    """A card with ``free`` bytes, whose products cost ``per_vector`` bytes each at peak."""

    def __init__(self, free: int, per_vector: int):
        self.free_bytes, self.per_vector = free, per_vector
        self.peak_bytes = 0

    def free(self, device):
        return self.free_bytes

    def allocated(self, device):
        return 0

    def peak(self, device):
        return self.peak_bytes

    def reset_peak(self, device):
        self.peak_bytes = 0

    def run(self, k: int) -> None:
        if k * self.per_vector > self.free_bytes:
            raise torch.cuda.OutOfMemoryError(f"a chunk of {k} vectors does not fit")
        self.peak_bytes = max(self.peak_bytes, k * self.per_vector)


@pytest.fixture
def cuda_stub(monkeypatch):
    """The CUDA rule on CPU tensors, with a stubbed memory reading."""

    def install(free: int, per_vector: int) -> StubCuda:
        reader = StubCuda(free, per_vector)
        monkeypatch.setattr(_chunks, "memory_reader", reader)
        monkeypatch.setattr(_chunks, "_is_cuda", lambda device: device is not None)
        return reader

    return install


class OnStubCard(RowByRow):
    """Products that use the stub card's memory."""

    def __init__(self, A: torch.Tensor, reader: StubCuda):
        super().__init__(A)
        self.reader = reader

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        self.reader.run(V.shape[0])
        return super().__call__(V)


@pytest.mark.parametrize("free_vectors", [6, 20, 60])
def test_chunks_follow_the_stubbed_free_memory(cuda_stub, free_vectors):
    """A measuring chunk of 2, then memory_fraction of the free memory; same numbers."""
    A = _matrix()
    per_vector = 1000
    reader = cuda_stub(free=free_vectors * per_vector, per_vector=per_vector)
    matmat = OnStubCard(A, reader)
    g = torch.Generator().manual_seed(1)
    est = hutchinson(matmat, N, 40, generator=g, dtype=DTYPE, progress=False)
    size = int(free_vectors * chunk_policy.memory_fraction)
    expected = [2] + [size] * ((40 - 2) // size) + ([(40 - 2) % size] if (40 - 2) % size else [])
    assert matmat.calls == expected
    reference = hutchinson(
        RowByRow(A), N, 40, generator=torch.Generator().manual_seed(1), dtype=DTYPE, chunk_size=1
    )
    assert torch.equal(est.samples, reference.samples)


def test_sketch_estimators_follow_the_stubbed_free_memory(cuda_stub):
    A = _matrix()
    reader = cuda_stub(free=8 * 1000, per_vector=1000)  # 4 vectors per chunk after the first
    for name in ("hutchpp", "xtrace", "xdiag", "slq"):
        matmat = OnStubCard(A, reader)
        got = _run(name, matmat, None)
        assert max(matmat.calls) <= 4, (name, matmat.calls)
        assert torch.equal(got, _run(name, RowByRow(A), 1)), name


def test_hessian_trace_of_a_model_under_the_stubbed_policy(cuda_stub):
    """Per-probe values v^T H v of an MLP's Hessian against the dense float64 Hessian."""
    model = make_mlp([3, 5, 2], "tanh", seed=0)
    x = torch.randn(6, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    y = torch.randn(6, 2, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        out = torch.func.functional_call(model, p, (x,))
        return ((out - y) ** 2).mean()

    H = dense_hessian(loss, params)
    n = H.shape[0]
    reader = cuda_stub(free=10 * 1000, per_vector=1000)
    matmat = hessian_matmat(loss, params)
    calls = []

    def on_card(V):
        reader.run(V.shape[0])
        calls.append(V.shape[0])
        return matmat(V)

    est = hutchinson(
        on_card, n, 23, generator=torch.Generator().manual_seed(3), dtype=DTYPE, progress=False
    )
    assert calls == [2, 5, 5, 5, 5, 1]
    V = draw_probes(23, n, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    assert_close(est.samples, ((V @ H) * V).sum(-1))
    diag = hutchinson_diagonal(on_card, n, n, dtype=DTYPE, progress=False)
    assert_close(diag.estimate, H.diagonal())
    assert math.isclose(float(diag.estimate.sum()), float(H.trace()), rel_tol=1e-12)
