"""The chunk policy per device (issue 12), on the CPU with a stubbed CUDA memory reading."""

from __future__ import annotations

import pytest
import torch

from torch_secorder import _chunks
from torch_secorder._chunks import ChunkSchedule, chunk_policy, static_chunk_size
from torch_secorder.func.hvp import default_chunk_size

GIB = 2**30
CUDA = torch.device("cuda", 0)


class StubReader:
    """A CUDA card: ``free`` bytes free, and a product that costs ``per_vector`` bytes at peak.

    ``run(k)`` stands for one chunk of ``k`` products: the allocator's peak rises to
    ``allocated + k * per_vector`` (unless an earlier peak was higher).
    """

    def __init__(self, free: int, per_vector: int, allocated: int = 0, peak: int = 0):
        self.free_bytes = free
        self.per_vector = per_vector
        self.allocated_bytes = allocated
        self.peak_bytes = max(peak, allocated)
        self.resets = 0

    def free(self, device):
        return self.free_bytes

    def allocated(self, device):
        return self.allocated_bytes

    def peak(self, device):
        return self.peak_bytes

    def reset_peak(self, device):
        self.resets += 1
        self.peak_bytes = self.allocated_bytes

    def run(self, k: int) -> None:
        needed = self.allocated_bytes + k * self.per_vector
        if k * self.per_vector > self.free_bytes:
            raise torch.cuda.OutOfMemoryError(f"chunk of {k} needs {needed} bytes")
        self.peak_bytes = max(self.peak_bytes, needed)


@pytest.fixture
def stub(monkeypatch):
    def install(**kwargs):
        reader = StubReader(**kwargs)
        monkeypatch.setattr(_chunks, "memory_reader", reader)
        return reader

    return install


def _run_schedule(reader: StubReader, total: int, dim: int) -> list[tuple[int, int]]:
    pieces = []
    for start, stop in ChunkSchedule(total, None, CUDA, dim=dim):
        reader.run(stop - start)
        pieces.append((start, stop))
    return pieces


def test_cpu_rule_is_the_tangent_budget():
    n = 1_862_410  # the 784-1024-1024-10 MLP
    assert static_chunk_size(64, n) == chunk_policy.cpu_elements // n == 9
    assert default_chunk_size(64, n) == 9
    assert static_chunk_size(5, 10) == 5
    assert static_chunk_size(5000, 10) == chunk_policy.max_chunk


def test_cpu_schedule_covers_every_vector_once():
    pieces = list(ChunkSchedule(1000, None, torch.device("cpu"), dim=50_000))
    size = chunk_policy.cpu_elements // 50_000
    assert pieces[0] == (0, size)
    assert [i for a, b in pieces for i in range(a, b)] == list(range(1000))
    assert len(ChunkSchedule(1000, None, torch.device("cpu"), dim=50_000)) == len(pieces)


def test_explicit_chunk_size_wins(stub):
    stub(free=16 * GIB, per_vector=GIB)
    assert list(ChunkSchedule(5, 2, CUDA, dim=10)) == [(0, 2), (2, 4), (4, 5)]


@pytest.mark.parametrize(
    "name, dim, per_vector",
    [
        # peak bytes of one float32 product, as measured on an H100 (issue 12): the MLP's
        # 64 probes in one chunk peaked at 2.4 GiB; the exact trace of a 10k-parameter
        # conv+BN ResNet at 19.6 GiB over its default chunk of 1024 basis vectors; the
        # exact diagonal of a 28,554-parameter tanh ResNet at 42.2 GiB over 587 vectors.
        ("mlp", 1_862_410, int(2.4 * GIB / 64)),
        ("bn_resnet", 10_000, int(19.6 * GIB / 1024)),
        ("tanh_resnet", 28_554, int(42.2 * GIB / 587)),
    ],
)
def test_no_out_of_memory_on_a_16_gib_card(stub, name, dim, per_vector):
    """On a 16 GiB card each chunk of the measured schedule fits; the 2**24 budget did not."""
    reader = stub(free=16 * GIB, per_vector=per_vector)
    total = 1024
    pieces = _run_schedule(reader, total, dim)  # raises OutOfMemoryError if a chunk does not fit
    assert [i for a, b in pieces for i in range(a, b)] == list(range(total))
    largest = max(b - a for a, b in pieces)
    assert largest * per_vector <= chunk_policy.memory_fraction * reader.free_bytes
    if name != "mlp":  # the old CPU budget on these would have run out of memory
        old = min(total, 1024, 2**24 // dim)
        with pytest.raises(torch.cuda.OutOfMemoryError):
            StubReader(free=16 * GIB, per_vector=per_vector).run(old)


def test_big_card_takes_all_probes_in_one_chunk(stub):
    """On an 80 GiB card the MLP's 64 probes run in one chunk after the measuring one."""
    reader = stub(free=78 * GIB, per_vector=int(2.4 * GIB / 64))
    pieces = _run_schedule(reader, 64, 1_862_410)
    assert pieces == [(0, 2), (2, 64)]


def test_earlier_peak_is_reset_or_read_conservatively(stub, monkeypatch):
    reader = stub(free=16 * GIB, per_vector=GIB // 8, allocated=GIB, peak=12 * GIB)
    schedule = ChunkSchedule(256, None, CUDA, dim=1000)
    pieces = []
    for start, stop in schedule:
        reader.run(stop - start)
        pieces.append((start, stop))
    assert reader.resets == 1
    assert schedule.measured_bytes_per_vector == GIB // 8
    assert max(b - a for a, b in pieces) == 64  # 8 GiB / (1/8 GiB)

    monkeypatch.setattr(chunk_policy, "reset_peak", False)
    reader = stub(free=16 * GIB, per_vector=GIB // 8, allocated=GIB, peak=12 * GIB)
    schedule = ChunkSchedule(256, None, CUDA, dim=1000)
    for start, stop in schedule:
        reader.run(stop - start)
    assert reader.resets == 0
    assert schedule.measured_bytes_per_vector == 11 * GIB / 2  # the earlier peak: conservative


def test_estimate_before_measurement_uses_free_memory(stub):
    stub(free=16 * GIB, per_vector=1)
    expected = int(16 * GIB * chunk_policy.memory_fraction // (64.0 * 1_000_000))
    assert static_chunk_size(1024, 1_000_000, CUDA) == expected == 134


def test_basis_sweep_runs_the_measured_schedule(stub, monkeypatch):
    """The diagonal sweep takes its chunks from the schedule: 2 measuring vectors, then the rest."""
    from torch_secorder.func.diagonal import basis_sweep_diagonal

    reader = stub(free=10 * 1000, per_vector=1000)
    monkeypatch.setattr(_chunks, "_is_cuda", lambda device: device is not None)
    A = torch.randn(12, 12, dtype=torch.float64)
    A = A + A.T
    chunks = []

    def product(v):
        if not chunks:
            reader.run(_chunks.FIRST_CHUNK)  # the measuring chunk's peak
        chunks.append(v)
        return A @ v

    diag = basis_sweep_diagonal(product, torch.zeros(12, dtype=torch.float64), None)
    torch.testing.assert_close(diag, torch.diagonal(A), rtol=0, atol=1e-14)
    assert len(chunks) == 3  # (0, 2), (2, 7), (7, 12): 0.5 * 10 vectors' memory per chunk


def test_kept_graphs_stop_at_the_memory_share(stub, monkeypatch):
    """On CUDA the operators' kept graphs take at most memory_fraction of the free memory."""
    from torch_secorder.operators._cache import GraphCache

    reader = stub(free=8 * GIB, per_vector=1)
    monkeypatch.setattr(_chunks, "_is_cuda", lambda device: device is not None)
    model = torch.nn.Linear(2, 1)
    cache = GraphCache(16)
    kept = []
    for index in range(6):
        before = len(cache)
        cache.store(model, "key", index, torch.randn(3, 2), torch.randn(3, 1), lambda V: V)
        if len(cache) > before:
            reader.free_bytes -= 2 * GIB  # each kept graph holds 2 GiB
        kept.append(len(cache))
    assert kept == [1, 2, 3, 3, 3, 3]  # 3 graphs: 4 GiB = half of the 8 GiB free at the start


def test_operator_with_a_full_device_keeps_fewer_graphs_and_stays_exact(stub, monkeypatch):
    from torch_secorder.operators import HessianOperator

    monkeypatch.setattr(_chunks, "_is_cuda", lambda device: device is not None)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.double()
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))]
    data = data * 1 + [
        (torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))
        for _ in range(4)
    ]
    loss_fn = torch.nn.MSELoss()
    A = HessianOperator(model, loss_fn, data, strategy="graph")
    reader = stub(free=8 * GIB, per_vector=1)
    # each kept graph holds 2 GiB of the 8 GiB that were free
    monkeypatch.setattr(reader, "free", lambda device: 8 * GIB - 2 * GIB * len(A._cache))
    V = torch.randn(A.shape[0], 3, dtype=torch.float64)
    first = A @ V
    assert len(A._cache) == 3  # a 4th graph would take more than half of the 8 GiB
    again = A @ V
    reference = HessianOperator(model, loss_fn, data, strategy="graph", cache_batches=0) @ V
    torch.testing.assert_close(first, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(again, reference, rtol=1e-12, atol=1e-12)
