r"""How many vectors one batched product takes at once: the chunk policy, per device.

Every batched product of the library (Hutchinson probes, the diagonal's basis
sweep, eigensolver blocks, landscapes, the fast diagonal's columns) runs its
vectors in *chunks*: a chunk of :math:`k` vectors costs about :math:`k` times the
memory of one product (activations and their tangents) plus the :math:`k \times n`
block of vectors itself.  Larger chunks are faster (fewer, larger kernels), until
memory runs out.  The policy:

* **CPU**: a chunk holds about :data:`CPU_CHUNK_ELEMENTS` :math:`= 2^{24}` tangent
  entries (``chunk * n``; 64 MiB in float32), at most :data:`MAX_CHUNK` vectors.
  Measured on the 2-core CPU (benchmarks), larger chunks gain nothing there.
* **CUDA**: the chunk comes from the memory that is free on the device
  (``torch.cuda.mem_get_info``) and the measured peak of one product: a
  :class:`ChunkSchedule` runs a first chunk of :data:`FIRST_CHUNK` vectors,
  reads the allocator's peak, and sizes the following chunks so that they use at
  most :attr:`ChunkPolicy.memory_fraction` of the free memory.  Before anything
  is measured (or where the caller cannot run a first chunk) the size is an
  estimate: :attr:`ChunkPolicy.bytes_per_entry_estimate` bytes of peak memory per
  tangent entry.

The policy is one object, :data:`chunk_policy`; set its fields to change every
default at once (an explicit ``chunk_size=`` argument always wins).  The device
readings go through :data:`memory_reader`, which tests replace by a stub.

Example:
    >>> import torch
    >>> static_chunk_size(64, 1_000_000, torch.device("cpu"))
    16
    >>> [piece for piece in ChunkSchedule(10, 4, torch.device("cpu"), dim=5)]
    [(0, 4), (4, 8), (8, 10)]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = [
    "CPU_CHUNK_ELEMENTS",
    "FIRST_CHUNK",
    "MAX_CHUNK",
    "ChunkPolicy",
    "ChunkSchedule",
    "MemoryReader",
    "chunk_entries",
    "chunk_policy",
    "memory_reader",
    "static_chunk_size",
]

#: Tangent entries (``chunk * n``) a CPU chunk aims at: 64 MiB in float32.
CPU_CHUNK_ELEMENTS = 2**24
#: The most vectors in one chunk on any device.
MAX_CHUNK = 1024
#: Vectors in the first, measuring chunk on CUDA.
FIRST_CHUNK = 2


@dataclass
class ChunkPolicy:
    """The knobs of the default chunk size (one instance: :data:`chunk_policy`).

    Attributes:
        cpu_elements: Tangent entries per chunk on the CPU (and any non-CUDA device).
        memory_fraction: Share of the device's free memory a chunk may take (CUDA).
        bytes_per_entry_estimate: Peak bytes per tangent entry assumed before a
            measurement (CUDA); a deliberate over-estimate (a product holds
            activations and their tangents, several times the vector itself).
        max_chunk: The most vectors in one chunk.
        reset_peak: Whether the measuring chunk may reset the CUDA allocator's peak
            statistic (``torch.cuda.reset_peak_memory_stats``) when an earlier, higher
            peak would hide the chunk's own; with ``False`` the reading is then the
            earlier peak, a conservative over-estimate (smaller chunks).
    """

    cpu_elements: int = CPU_CHUNK_ELEMENTS
    memory_fraction: float = 0.5
    bytes_per_entry_estimate: float = 64.0
    max_chunk: int = MAX_CHUNK
    reset_peak: bool = True


#: The policy every default chunk size reads.
chunk_policy = ChunkPolicy()


class MemoryReader:
    """Device memory readings (bytes); a stub replaces it in tests."""

    def free(self, device: torch.device) -> int:
        """Memory on ``device`` that this process's tensors can still take.

        What the driver reports free (``torch.cuda.mem_get_info``) plus what
        PyTorch's caching allocator holds reserved but unallocated (its cached
        blocks serve new tensors first), and at most what a per-process cap leaves
        (``torch.cuda.set_per_process_memory_fraction``: that share of the card's
        memory, less what is allocated).
        """
        driver_free, total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        cached = torch.cuda.memory_reserved(device) - allocated
        free = int(driver_free) + max(int(cached), 0)
        share = _process_share(device)
        if share < 1.0:
            free = min(free, int(share * int(total)) - int(allocated))
        return max(free, 0)

    def allocated(self, device: torch.device) -> int:
        """Memory held by tensors on ``device`` now."""
        return int(torch.cuda.memory_allocated(device))

    def peak(self, device: torch.device) -> int:
        """The allocator's peak on ``device`` since its last reset."""
        return int(torch.cuda.max_memory_allocated(device))

    def reset_peak(self, device: torch.device) -> None:
        """Start the allocator's peak statistic afresh."""
        torch.cuda.reset_peak_memory_stats(device)


#: The readings the policy uses.
memory_reader = MemoryReader()


def _process_share(device: torch.device) -> float:
    """The per-process memory fraction set on ``device`` (1.0 where none is, or unknown)."""
    reader = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if reader is None:  # pragma: no cover - older torch
        return 1.0
    try:
        return float(reader(device))
    except (RuntimeError, ValueError, TypeError):  # pragma: no cover - no such device
        return 1.0


def _is_cuda(device: torch.device | None) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _clamp(chunk: float, num_vectors: int) -> int:
    return int(max(1, min(num_vectors, chunk_policy.max_chunk, chunk)))


def chunk_entries(device: torch.device | None = None) -> int:
    """Tangent entries (vectors x entries per vector) one chunk may hold on ``device``.

    On the CPU :attr:`ChunkPolicy.cpu_elements`; on CUDA the policy's share of
    the free memory divided by its peak-bytes-per-entry estimate.

    Example:
        >>> chunk_entries() == 2**24
        True
    """
    if not _is_cuda(device):
        return int(chunk_policy.cpu_elements)
    budget = memory_reader.free(torch.device(device)) * chunk_policy.memory_fraction
    return max(1, int(budget // chunk_policy.bytes_per_entry_estimate))


def static_chunk_size(num_vectors: int, dim: int, device: torch.device | None = None) -> int:
    """The default chunk before any measurement: vectors per chunk for ``dim`` entries each.

    Args:
        num_vectors: How many vectors the loop has in all.
        dim: Entries of one vector (``n``).
        device: Where the products run (``None``: the CPU rule).

    Returns:
        An int in ``[1, min(num_vectors, max_chunk)]``.

    Example:
        >>> static_chunk_size(8, 10)
        8
    """
    return _clamp(chunk_entries(device) // max(int(dim), 1), num_vectors)


class ChunkSchedule:
    """The ``(start, stop)`` pieces of a loop over ``total`` vectors, sized by the policy.

    Iterate over it and run one chunk of products per piece.  On CUDA, with no
    explicit ``chunk_size``, the first piece has :data:`FIRST_CHUNK` vectors; when
    the loop asks for the next piece, the schedule reads the allocator's peak
    during that first chunk (``peak - allocated before``) and sizes the remaining
    pieces to ``memory_fraction * free / peak_per_vector``.  Where an earlier peak
    is higher than what is allocated now, the peak statistic is reset first (unless
    :attr:`ChunkPolicy.reset_peak` is off: then the earlier peak is the reading).

    Args:
        total: Vectors in all.
        chunk_size: An explicit size (wins over the policy), or ``None``.
        device: Where the products run.
        dim: Entries of one vector, for the estimate before the measurement.
    """

    def __init__(
        self, total: int, chunk_size: int | None, device: torch.device | None, dim: int
    ) -> None:
        self.total = int(total)
        self.chunk_size = chunk_size
        self.device = None if device is None else torch.device(device)
        self.dim = dim
        #: Peak bytes per vector measured on the first chunk (CUDA only; else ``None``).
        self.measured_bytes_per_vector: float | None = None

    def __len__(self) -> int:
        """Pieces if the sizes were fixed now (an estimate on CUDA before measuring)."""
        size = self.chunk_size or static_chunk_size(self.total, self.dim, self.device)
        return -(-self.total // max(size, 1)) if self.total else 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.chunk_size is not None or not _is_cuda(self.device):
            size = self.chunk_size or static_chunk_size(self.total, self.dim, self.device)
            for start in range(0, self.total, size):
                yield start, min(start + size, self.total)
            return
        first = min(FIRST_CHUNK, self.total)
        if first == 0:
            return
        before = memory_reader.allocated(self.device)
        if chunk_policy.reset_peak and memory_reader.peak(self.device) > before:
            memory_reader.reset_peak(self.device)
        yield 0, first
        peak = memory_reader.peak(self.device) - before
        per_vector = max(peak, 1) / first
        self.measured_bytes_per_vector = per_vector
        free = memory_reader.free(self.device)
        size = _clamp(free * chunk_policy.memory_fraction // per_vector, self.total)
        for start in range(first, self.total, size):
            yield start, min(start + size, self.total)
