r"""Data-parallel operators: the collectives of :mod:`torch.distributed` behind ``group=``.

Each rank of a process group holds a shard of the data and a replica of the model.
An operator built with ``group=`` stands for the curvature of the loss over the
union of the shards: for ``reduction="mean"``, with :math:`N = \sum_r N^{(r)}` the
samples of all ranks (all-reduced once, when the operator is built),

.. math::
    A V = \sum_r \sum_{b \in \text{shard } r} \frac{N_b}{N} A_b V,

so each rank sums its own batches, weighted by the global :math:`N`, and one
all-reduce per call of ``matmat`` (one chunk of products, not one per batch)
adds the ranks' sums.  The exact diagonal and trace likewise: one all-reduce.

Before that all-reduce, one small all-gather per call carries a flag per rank
(did its local step raise?) and a fingerprint of the vectors: a rank that raised
(a bad batch, a non-finite loss) makes every rank raise the same
:class:`~torch_secorder.errors.DistributedError` instead of waiting for it in the
all-reduce, and vectors that differ between ranks (probes drawn from unsynchronised
random generators) raise it too instead of giving a wrong product.  The result of
the all-reduce is the same on every rank (bit for bit: gloo, tested, and NCCL
reduce each part of the buffer once and send it to every rank), so an estimator run
on the same probes on every rank gives the same answer on every rank.

The group: ``group=None`` is the default group when :mod:`torch.distributed` is
initialised and no collective at all when it is not; ``group=False`` computes on
this rank's data alone (no collective); a group of one rank needs no collective.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torch_secorder.errors import DistributedError

__all__ = [
    "all_reduce_checked",
    "gather_checked",
    "resolve_group",
    "shard_counts",
    "shared_generator",
    "unwrap_model",
]

#: Entries of the vectors compared across ranks per product (evenly spread).
FINGERPRINT_ENTRIES = 64


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def resolve_group(group: Any) -> Any:
    """The process group to reduce over, or ``None`` for no collective.

    Args:
        group: ``None`` (the default group if :mod:`torch.distributed` is
            initialised, else none), ``False`` (none: this rank's data alone), or a
            ``torch.distributed.ProcessGroup`` this rank belongs to.

    Raises:
        TypeError: ``group`` is of another type.
        ValueError: a group is given but :mod:`torch.distributed` is not initialised,
            or this rank is not a member of it.
    """
    if group is False:
        return None
    dist = _dist()
    if dist.is_available() and group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("group: this process is not a member of the group")
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(
            "group must be None, False or a torch.distributed.ProcessGroup, got "
            f"{type(group).__name__}"
        )
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised:
        if group is None:
            return None
        raise ValueError(
            "group: torch.distributed is not initialised (call "
            "torch.distributed.init_process_group first)"
        )
    if group is None:
        group = dist.group.WORLD
    if dist.get_rank(group) < 0:
        raise ValueError(
            f"group: this process (global rank {dist.get_rank()}) is not a member of the group"
        )
    if dist.get_world_size(group) == 1:
        return None
    return group


def unwrap_model(model: Any) -> Any:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper.

    The operators run the wrapped module itself, never the wrapper's forward: no
    buffer broadcast, and the gradient hooks of the wrapper's reducer never fire
    (our products differentiate copies of the parameters, not the leaves the
    hooks sit on), so no gradient all-reduce of its own runs inside a product.
    A fully sharded model (FSDP) holds a shard of each parameter: refused.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    if type(model).__module__.startswith("torch.distributed.fsdp"):
        raise TypeError(
            "model is a FullyShardedDataParallel module, whose ranks hold shards of the "
            "parameters: the operators need a full replica on every rank (use "
            "DistributedDataParallel, or the unwrapped model)"
        )
    return model


def _rank_and_size(group: Any) -> tuple[int, int]:
    dist = _dist()
    return dist.get_rank(group), dist.get_world_size(group)


def _fingerprint(same: Tensor | None) -> list[float]:
    """``numel`` and :data:`FINGERPRINT_ENTRIES` evenly spread entries of ``same``."""
    if same is None:
        return [0.0] * (1 + FINGERPRINT_ENTRIES)
    flat = same.detach().reshape(-1)
    numel = flat.numel()
    if numel == 0:
        return [0.0] * (1 + FINGERPRINT_ENTRIES)
    index = torch.linspace(0, numel - 1, FINGERPRINT_ENTRIES, device=flat.device).long()
    return [float(numel), *flat[index].double().tolist()]


def _same_rows(a: Tensor, b: Tensor) -> bool:
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def gather_checked(
    group: Any,
    error: BaseException | None,
    numbers: Sequence[float] = (),
    *,
    same: Tensor | None = None,
    device: torch.device | None = None,
    what: str = "the operator",
) -> Tensor:
    r"""One all-gather of ``[failed, *numbers, fingerprint of same]`` from every rank.

    Every rank calls it after its local step, with the exception that step raised
    (``error``) or ``None``.  If any rank's step raised, every rank raises the same
    :class:`~torch_secorder.errors.DistributedError` naming the first failing rank
    and its error (the failing rank chains its own exception); if ``same`` (the
    vectors of a product) differs between ranks, every rank raises too.

    Returns:
        A ``(world_size, len(numbers))`` float64 tensor: row ``r`` holds rank ``r``'s
        ``numbers`` (exact for integers below :math:`2^{53}`).
    """
    dist = _dist()
    rank, size = _rank_and_size(group)
    row = torch.tensor(
        [1.0 if error is not None else 0.0, *map(float, numbers), *_fingerprint(same)],
        dtype=torch.float64,
        device=device,
    )
    rows = [torch.empty_like(row) for _ in range(size)]
    dist.all_gather(rows, row, group=group)
    table = torch.stack(rows).cpu()
    failed = [r for r in range(size) if table[r, 0] != 0]
    if failed:
        message = None if error is None else f"{type(error).__name__}: {error}"
        messages: list[Any] = [None] * size
        dist.all_gather_object(messages, message, group=group)
        first = failed[0]
        others = f" (ranks {failed[1:]} raised too)" if len(failed) > 1 else ""
        exc = DistributedError(
            f"rank {first} of {size} raised while computing {what}{others}, and every rank "
            f"of the group raises this error: {messages[first]}",
            rank=first,
        )
        if error is not None:
            raise exc from error
        raise exc
    width = len(numbers)
    prints = table[:, 1 + width :]
    if same is not None:
        differ = [r for r in range(1, size) if not _same_rows(prints[r], prints[0])]
        if differ:
            raise DistributedError(
                f"the vectors passed to {what} differ between ranks (rank 0 and ranks "
                f"{differ}), so their products cannot be added: give every rank the same "
                "vectors, e.g. probes from a torch.Generator seeded identically on every "
                "rank (see torch_secorder.operators.shared_generator)",
                rank=differ[0],
            )
    return table[:, 1 : 1 + width]


def all_reduce_checked(
    group: Any,
    compute: Callable[[], Tensor],
    *,
    same: Tensor | None = None,
    device: torch.device | None = None,
    what: str = "the operator",
) -> Tensor:
    """``compute()`` on this rank, summed over the ranks of ``group`` by one all-reduce.

    First :func:`gather_checked` (every rank raises if one rank's ``compute`` raised,
    or if ``same`` differs between ranks), then one ``all_reduce`` (sum) of the
    results, which leaves the same tensor on every rank.
    """
    error: BaseException | None = None
    value: Tensor | None = None
    try:
        value = compute()
    except Exception as exc:  # every rank must learn of it, not wait in the all-reduce
        error = exc
    gather_checked(group, error, same=same, device=device, what=what)
    assert value is not None
    value = value.detach()
    if not value.is_contiguous():
        value = value.contiguous()
    _dist().all_reduce(value, group=group)
    return value


def shared_generator(
    generator: torch.Generator | None = None,
    group: Any = None,
    device: torch.device | str | None = None,
) -> torch.Generator | None:
    """A generator that draws the same numbers on every rank of ``group``.

    Estimators give the same answer on every rank when they draw the same probes
    there.  ``generator`` given: it is returned as it is (seed it identically on
    every rank: a different draw on a rank is caught by the operator's products,
    which raise).  ``None``: every rank draws a seed from its global generator
    (advancing it alike on every rank), rank 0's seed is broadcast, and a new
    generator seeded with it is returned; without a group (no collective), ``None``
    (the global generator, as without ``group``).

    Args:
        generator: The user's generator, or ``None``.
        group: As for the operators (see :func:`resolve_group`).
        device: Device of the returned generator (default: CPU).

    Example:
        >>> shared_generator(None, group=False) is None  # no group: the global generator
        True
    """
    resolved = resolve_group(group)
    if generator is not None or resolved is None:
        return generator
    device = torch.device(device) if device is not None else torch.device("cpu")
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64).to(device)
    dist = _dist()
    dist.broadcast(seed, src=dist.get_global_rank(resolved, 0), group=resolved)
    return torch.Generator(device=device).manual_seed(int(seed.item()))


def shard_counts(
    group: Any, error: BaseException | None, batches: Any, dim: int, like: Tensor
) -> tuple[int, int, int]:
    """Samples and batches of the union of the ranks' shards, and this rank's batch offset.

    One all-gather.  The offset is the number of batches of the lower ranks: this
    rank's batch ``b`` is batch ``offset + b`` of the union (the Monte Carlo Fisher
    seeds its draws by it, so the ranks' draws are those of one process over the
    union's batches in rank order).

    Every rank raises if one rank could not read its shard (``error``), or if the
    ranks' operators differ in size (``dim``, different models or ``params``).
    """
    counts = (0, 0) if error is not None else (batches.num_samples, batches.num_batches)
    table = gather_checked(
        group, error, (*counts, dim), device=like.device, what="the operator's data"
    )
    dims = [int(d) for d in table[:, 2].tolist()]
    if len(set(dims)) > 1:
        differ = [r for r, d in enumerate(dims) if d != dims[0]]
        raise DistributedError(
            f"the operators of the ranks differ in size: {dims} parameter entries on ranks "
            f"0 to {len(dims) - 1}; every rank must pass the same model and params",
            rank=differ[0],
        )
    rank = _rank_and_size(group)[0]
    return int(table[:, 0].sum()), int(table[:, 1].sum()), int(table[:rank, 1].sum())
