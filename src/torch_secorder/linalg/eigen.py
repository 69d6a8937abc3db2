r"""Extreme eigenpairs of a symmetric matrix known only through products.

A *matmat* is any function ``V -> V A`` on a ``(k, n)`` batch of row vectors, for
a symmetric ``n x n`` matrix ``A`` (a Hessian, a Gauss-Newton matrix, a Fisher, a
plain matrix).  Nothing here knows about models.

* :func:`lanczos_eigsh`: Lanczos with full reorthogonalisation; the Ritz pairs of
  the tridiagonal matrix :math:`T_m = Q_m^\top A Q_m` approximate the extreme
  eigenpairs.  Stops when every wanted Ritz pair has a small residual.
* :func:`subspace_iteration`: block power iteration with Rayleigh-Ritz and
  deflation (converged vectors are locked and projected out of the rest).

Both select eigenvalues by ``which``:

* ``"LM"``: largest magnitude, sorted by decreasing :math:`|\lambda|`;
* ``"LA"``: largest algebraic, decreasing;
* ``"SA"``: smallest algebraic (most negative), increasing.

Convergence is judged, by default (``criterion="residual"``), on the residual of
each Ritz pair :math:`(\theta, y)`,
:math:`\|A y - \theta y\| \le \mathrm{tol}\cdot\max(|\theta|, \sqrt{\varepsilon}\,
\|A\|_{\mathrm{est}})`, with :math:`\varepsilon` the machine epsilon of the dtype
and :math:`\|A\|_{\mathrm{est}}` the largest Ritz value in magnitude.  :func:`lanczos_eigsh` also
accepts a residual at the rounding level of the products,
:math:`\|A y - \theta y\| \le 64\,\varepsilon\,\|A\|_{\mathrm{est}}` (nothing smaller
can be computed: a zero eigenvalue with ``which="LM"`` and ``k = n``).  For a
symmetric matrix an eigenvalue of :math:`A` lies within the residual of every
Ritz value, and the error of a well separated Ritz value is of order
:math:`\|r\|^2 / \mathrm{gap}`.

With ``criterion="eigenvalue"`` (:func:`lanczos_eigsh` only) the *eigenvalue* is
what must meet the tolerance, by the Kato-Temple bound: if no other eigenvalue
lies within :math:`\delta` of :math:`\theta`, the eigenvalue :math:`\lambda`
nearest to it satisfies :math:`|\lambda - \theta| \le \|r\|^2 / \delta`
(Parlett, *The Symmetric Eigenvalue Problem*, Thm. 10.5.1).  The gap
:math:`\delta` is estimated from the other Ritz pairs,
:math:`\delta_i = \min_{j \ne i} (|\theta_i - \theta_j| - \|r_j\|)` (each
:math:`\theta_j` has an eigenvalue within :math:`\|r_j\|`); a pair converges
when :math:`\|r\|^2 / \delta \le \mathrm{tol}\cdot|\theta|` with
:math:`\|r\| < \delta` (and the same floors as above).  The residual needed is
then about :math:`\sqrt{\mathrm{tol}\cdot|\theta|\,\delta}`, far from
:math:`\mathrm{tol}\cdot|\theta|`: the eigenvalue to ``tol`` costs fewer
products, the eigenvector is then only accurate to about
:math:`\|r\| / \delta`.  As with every Krylov method, an eigenvalue the start
vector does not see (or the gap to one not yet found) is beyond any estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from torch_secorder._checks import check_count, check_generator
from torch_secorder.errors import ShapeError

__all__ = ["EigenResult", "WHICH", "lanczos_eigsh", "ritz_pairs", "subspace_iteration"]

Matmat = Callable[[Tensor], Tensor]

#: Accepted values of ``which``.
WHICH = ("LM", "LA", "SA")

#: Accepted values of ``criterion`` (:func:`lanczos_eigsh`).
CRITERIA = ("residual", "eigenvalue")

#: Residuals below this many machine epsilons times the norm estimate count as converged.
ROUNDING_FLOOR = 64


class EigenResult(NamedTuple):
    """Eigenpairs from an iterative solver.

    Attributes:
        eigenvalues: ``(k,)`` Ritz values, ordered as ``which`` asks.
        eigenvectors: ``(k, n)`` orthonormal Ritz vectors, one per row.
        residuals: ``(k,)`` residual norms :math:`\\|A y - \\theta y\\|`.
        converged: ``(k,)`` bool, whether each pair met the tolerance.
        iterations: Products with ``A`` used (Lanczos steps, or power steps).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: Tensor
    iterations: int


def _check_which(which: str) -> str:
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    return which


def _check_common(dim: int, k: int, tol: float) -> None:
    check_count(dim, "dim")
    check_count(k, "k (the number of eigenpairs)")
    if k > dim:
        raise ValueError(f"the number of eigenpairs must be an int in [1, dim={dim}], got {k!r}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")


def _select(values: Tensor, k: int, which: str) -> Tensor:
    """Indices of the ``k`` wanted values, in the order of ``which``."""
    if which == "LM":
        order = torch.argsort(values.abs(), descending=True, stable=True)
    elif which == "LA":
        order = torch.argsort(values, descending=True, stable=True)
    else:
        order = torch.argsort(values, stable=True)
    return order[:k]


def _apply(matmat: Matmat, X: Tensor) -> Tensor:
    out = matmat(X)
    if not isinstance(out, Tensor) or out.shape != X.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"matmat must map a ({X.shape[0]}, {X.shape[1]}) batch to the same shape, got {got}"
        )
    return out.to(X.dtype)


def _orthonormalize(X: Tensor, against: Tensor | None, generator: torch.Generator | None) -> Tensor:
    """Rows of ``X`` made orthonormal and orthogonal to the rows of ``against``.

    Two passes of classical Gram-Schmidt against ``against`` then a QR; rows that
    vanish (``X`` rank-deficient) are replaced by random directions.
    """
    eps = torch.finfo(X.dtype).eps
    for _ in range(3):
        for _ in range(2):
            if against is not None and against.shape[0]:
                X = X - (X @ against.T) @ against
        norms = X.norm(dim=1, keepdim=True)
        Q, R = torch.linalg.qr((X / norms.clamp_min(torch.finfo(X.dtype).tiny)).T)
        Q = Q.T
        bad = R.diagonal().abs() < math.sqrt(eps)
        if not bool(bad.any()):
            return Q
        X = torch.where(
            bad[:, None],
            torch.randn(X.shape, generator=generator, dtype=X.dtype, device=X.device),
            Q,
        )
    return Q


def ritz_pairs(
    alphas: Tensor, betas: Tensor, k: int, which: str = "LM"
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Wanted Ritz values of a Lanczos tridiagonal matrix and their residual norms.

    For :math:`T_m` with diagonal ``alphas`` (length ``m``) and off-diagonal
    ``betas[:m-1]``, and :math:`\beta_m` = ``betas[m-1]`` the norm of the next
    Lanczos vector, the Ritz pair :math:`(\theta_i, Q_m s_i)` has residual
    :math:`|\beta_m s_{m,i}|`.

    Args:
        alphas: ``(m,)`` diagonal.
        betas: ``(m,)`` off-diagonal followed by :math:`\beta_m`.
        k: Number of Ritz pairs wanted (at most ``m`` are returned).
        which: ``"LM"``, ``"LA"`` or ``"SA"``.

    Returns:
        ``(theta, S, residuals)``: the wanted Ritz values, the ``(m, k)``
        eigenvectors of :math:`T_m` and the residual norms.

    Example:
        >>> import torch
        >>> a = torch.tensor([2.0, 2.0], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 0.0], dtype=torch.float64)
        >>> theta, S, res = ritz_pairs(a, b, 2)
        >>> theta
        tensor([3., 1.], dtype=torch.float64)
    """
    check_count(k, "k")
    m = alphas.shape[0]
    T = torch.diag(alphas)
    if m > 1:
        T = T + torch.diag(betas[: m - 1], 1) + torch.diag(betas[: m - 1], -1)
    theta, S = torch.linalg.eigh(T)
    idx = _select(theta, min(k, m), _check_which(which))
    S = S[:, idx]
    return theta[idx], S, (betas[m - 1] * S[m - 1]).abs()


def _extend_basis(
    W: Tensor, V: Tensor, scale: Tensor, thresh: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, bool]:
    """Orthonormal rows ``Q`` and upper-triangular ``R`` with ``W = R^T Q`` (``W ⟂ V``).

    The rows of ``W`` come already orthogonalised twice against ``V`` from rows of
    norms ``scale``.  Column-by-column Gram-Schmidt (twice) of them against the rows
    already accepted; where a row lost most of its norm in all this (cancellation),
    one more pass against ``V`` and the rows (Daniel, Gragg, Kaufman, Stewart 1976).
    A row whose remainder is at most ``thresh`` has no new
    direction (an invariant subspace of ``A`` was reached): it is replaced by a random
    direction orthogonal to everything, with a zero coupling (the remainder, at most
    ``thresh``, is dropped).  Where the whole space is spanned, no row is added.
    Returns ``(Q, R, breakdown)``; ``R`` has one row per row of ``Q``.
    """
    rows: list[Tensor] = []
    coeffs: list[Tensor] = []  # column j of R: coefficients of W[j] along rows
    breakdown = False
    for j in range(W.shape[0]):
        x = W[j]
        c = torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)
        for _ in range(2 if rows else 0):
            Qs = torch.stack(rows)
            d = Qs @ x
            x = x - Qs.T @ d
            c[: len(rows)] += d
        nrm = x.norm()
        if float(nrm) < 0.5 * float(scale[j]):
            x = x - V.T @ (V @ x)
            if rows:
                Qs = torch.stack(rows)
                d = Qs @ x
                x = x - Qs.T @ d
                c[: len(rows)] += d
            nrm = x.norm()
        if float(nrm) > thresh:
            c[len(rows)] = nrm
            rows.append(x / nrm)
        else:
            breakdown = True
            for _ in range(3):  # a random direction orthogonal to V and the rows
                z = torch.randn(W.shape[1], generator=generator, dtype=W.dtype, device=W.device)
                z = z / z.norm()
                for _ in range(2):
                    z = z - V.T @ (V @ z)
                    if rows:
                        Qs = torch.stack(rows)
                        z = z - Qs.T @ (Qs @ z)
                if float(z.norm()) > 10 * math.sqrt(torch.finfo(W.dtype).eps):
                    rows.append(z / z.norm())
                    break
        coeffs.append(c)
    if not rows:
        empty = torch.empty(0, W.shape[1], dtype=W.dtype, device=W.device)
        return empty, torch.empty(0, W.shape[0], dtype=W.dtype, device=W.device), breakdown
    R = torch.stack(coeffs, dim=1)[: len(rows)]
    return torch.stack(rows), R, breakdown


def _default_ncv(dim: int, k: int, block_size: int) -> int:
    return min(dim, max(2 * k + 20 + block_size, 3 * k + 2 * block_size, 50))


def lanczos_eigsh(
    matmat: Matmat,
    dim: int,
    k: int = 1,
    *,
    which: str = "LM",
    max_iter: int | None = None,
    tol: float = 1e-6,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    v0: Tensor | None = None,
    ncv: int | None = None,
    block_size: int = 1,
    criterion: str = "residual",
) -> EigenResult:
    r"""``k`` extreme eigenpairs of a symmetric matrix by thick-restart (block) Lanczos.

    Builds an orthonormal Krylov basis :math:`V_m` (each new block orthogonalised
    twice against the whole basis: full reorthogonalisation, so no spurious copies
    of converged eigenvalues appear) and the projected matrix
    :math:`H_m = V_m^\top A V_m`, with the Lanczos relation

    .. math::

        A V_m = V_m H_m + Q B E_m^\top,

    :math:`Q` the next block.  The Ritz pair :math:`(\theta_i, V_m s_i)` of
    :math:`H_m` has residual norm :math:`\|B E_m^\top s_i\|` (the last block of
    :math:`s_i`, weighted by the coupling).  These are checked after every product;
    once all ``k`` wanted pairs meet the tolerance (see the module doc), the
    residuals are recomputed from the stored products :math:`A V_m` (the true
    :math:`\|A y - \theta y\|`, not the estimate) and the run stops if they
    confirm it.

    When the basis reaches ``ncv`` vectors it is restarted thickly (Wu & Simon
    2000; Stewart's Krylov-Schur): the most wanted Ritz vectors (``k`` and a third
    of the others, at the wanted end of the spectrum) are kept with their
    products, :math:`H` becomes diagonal with an arrow coupling to :math:`Q`, and
    the expansion continues.  Converged wanted pairs are always among those kept.

    If the recurrence breaks down (an invariant subspace is found), it continues
    from random directions orthogonal to the basis and does not stop at that step,
    so eigenvalues of multiplicity above one are found when the Krylov space is
    exhausted.  Before that, single-vector Lanczos (``block_size=1``) sees one copy
    of a repeated eigenvalue: pass ``block_size`` at least the multiplicity to find
    all copies.

    Memory: ``2 * (ncv + block_size)`` vectors of length ``n`` (the basis and its
    products).

    Args:
        matmat: ``V -> V A`` on ``(b, n)`` batches (called with ``b <= block_size``).
        dim: ``n``.
        k: Number of eigenpairs.
        which: ``"LM"`` (largest magnitude), ``"LA"`` (largest algebraic) or
            ``"SA"`` (smallest algebraic).
        max_iter: Largest number of products with ``A`` (vectors, not blocks;
            default ``max(300, 10 * ncv)``).
        tol: Relative residual tolerance.
        dtype: Dtype of the basis (default: ``v0``'s, else torch's default).
        device: Device of the basis (default: ``v0``'s, else the generator's or CPU).
        generator: Source of the random start (and of restarts).
        v0: Start vector ``(n,)`` or start block ``(block_size, n)``; random
            Gaussian if ``None``.
        ncv: Largest basis size before a thick restart (default
            ``min(n, max(2k + 20 + block_size, 3k + 2 block_size, 50))``); at least
            ``k + 2 * block_size`` unless it is ``n``.
        block_size: Number of vectors multiplied at once (block Lanczos).
        criterion: What ``tol`` bounds: ``"residual"`` (the relative residual of
            each pair, as scipy's ``eigsh``) or ``"eigenvalue"`` (the relative
            error of each eigenvalue by the Kato-Temple bound
            :math:`\|r\|^2/\delta`, see the module doc; fewer products when
            only the eigenvalues are wanted).

    Returns:
        An :class:`EigenResult`; ``residuals`` are the true residual norms
        :math:`\|A y - \theta y\|` of the returned pairs, ``converged`` whether each
        meets the tolerance (on ``criterion``), ``iterations`` the products with ``A``.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([3.0, -5.0, 1.0, 0.5], dtype=torch.float64))
        >>> res = lanczos_eigsh(lambda V: V @ A, 4, 2, dtype=torch.float64)
        >>> [round(float(x), 10) for x in res.eigenvalues]
        [-5.0, 3.0]
        >>> res = lanczos_eigsh(lambda V: V @ A, 4, 1, which="LA", dtype=torch.float64)
        >>> round(float(res.eigenvalues[0]), 10), bool(res.converged[0])
        (3.0, True)

        Only the eigenvalue, to ``1e-8`` relative:

        >>> A = torch.diag(torch.linspace(0.0, 1.0, 200, dtype=torch.float64))
        >>> ones = torch.ones(200, dtype=torch.float64)
        >>> on_value = lanczos_eigsh(lambda V: V @ A, 200, 1, which="LA", tol=1e-8,
        ...                          criterion="eigenvalue", v0=ones)
        >>> on_residual = lanczos_eigsh(lambda V: V @ A, 200, 1, which="LA", tol=1e-8, v0=ones)
        >>> abs(float(on_value.eigenvalues[0]) - 1.0) < 1e-8
        True
        >>> on_value.iterations < on_residual.iterations
        True
    """
    check_generator(generator, device)
    _check_common(dim, k, tol)
    _check_which(which)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    check_count(block_size, "block_size")
    b = min(block_size, dim)
    if ncv is None:
        ncv = _default_ncv(dim, k, b)
    else:
        check_count(ncv, "ncv")
        ncv = min(ncv, dim)
        if ncv < dim and ncv < k + 2 * b:
            raise ValueError(
                f"ncv must be >= k + 2 * block_size = {k + 2 * b} (or >= dim={dim}), got {ncv}"
            )
    if max_iter is None:
        max_iter = max(300, 10 * ncv)
    check_count(max_iter, "max_iter")
    if max_iter < k:
        raise ValueError(f"max_iter must be >= the number of eigenpairs k={k}, got {max_iter}")
    if v0 is not None:
        if v0.shape not in ((dim,), (b, dim)):
            raise ShapeError(
                f"v0 must have shape ({dim},) or (block_size={b}, {dim}), got {tuple(v0.shape)}"
            )
        dtype = dtype or v0.dtype
        device = device if device is not None else v0.device
    dtype = dtype or torch.get_default_dtype()
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny

    X = torch.randn(b, dim, generator=generator, dtype=dtype, device=device)
    if v0 is not None:
        start = v0.to(dtype=dtype, device=device).reshape(-1, dim)
        if not bool(start.norm(dim=1).gt(0).all()):
            raise ValueError("v0 must be nonzero")
        X[: start.shape[0]] = start
    X = _orthonormalize(X, None, generator)
    cap = min(ncv + b, dim)
    V = torch.empty(cap, dim, dtype=dtype, device=device)
    AV = torch.empty(cap, dim, dtype=dtype, device=device)
    H = torch.zeros(cap, cap, dtype=torch.float64)
    V[:b] = X
    m, t = 0, b  # multiplied rows, then t trailing rows of V not multiplied yet
    coupling = torch.zeros(b, 0, dtype=torch.float64)  # A V[:m] along V[m:m+t]
    anorm = 0.0
    matvecs = 0

    def wanted_ritz() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        Hm = H[:m, :m]
        theta, S = torch.linalg.eigh((Hm + Hm.T) / 2)
        idx = _select(theta, min(k, m), which)
        est = (coupling @ S).norm(dim=0) if coupling.numel() else torch.zeros_like(theta)
        return theta, S, idx, est[idx], est

    def bound(theta: Tensor) -> Tensor:
        relative = tol * torch.clamp(theta.abs(), min=math.sqrt(eps) * anorm)
        return torch.clamp(relative, min=ROUNDING_FLOOR * eps * anorm)

    def met(theta: Tensor, idx: Tensor, res: Tensor, others: Tensor) -> Tensor:
        """Whether the wanted pairs ``idx`` (residuals ``res``) meet the criterion."""
        limit = bound(theta[idx]).to(res)
        if criterion == "residual":
            return res <= limit
        # Kato-Temple: |lambda - theta_i| <= r_i^2 / delta_i, delta_i estimated from
        # the other Ritz values and their residual estimates ``others``.
        gaps = (theta[idx, None] - theta[None, :]).abs() - others[None, :]
        gaps[torch.arange(idx.numel()), idx] = math.inf
        if theta.numel() == 1:  # no other Ritz value: no estimate of the gap
            return res <= ROUNDING_FLOOR * eps * anorm
        delta = gaps.min(dim=1).values.to(res)
        floor = ROUNDING_FLOOR * eps * anorm
        return (res <= floor) | ((res < delta) & (res.square() <= limit * delta))

    def true_pairs(theta: Tensor, S: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        St = S.T.to(dtype=dtype, device=device)
        Y, AY = St @ V[:m], St @ AV[:m]
        th = theta.to(dtype=dtype, device=device)
        return Y, (AY - th[:, None] * Y).norm(dim=1), th

    while True:
        use = min(t, max_iter - matvecs)
        block = slice(m, m + use)
        W = _apply(matmat, V[block])
        matvecs += use
        AV[block] = W
        scale = W.norm(dim=1)
        basis = V[: m + t]
        # Local step first: the rows coupled to the block (the previous block, or the
        # kept Ritz vectors after a restart) and the block itself hold the large
        # components of A V[block]; then full reorthogonalisation against the basis,
        # a second pass only where the first removed much (Daniel et al. 1976).
        local = torch.cat(
            [
                torch.nonzero(coupling.abs().sum(0) > 0).flatten(),
                torch.arange(m, m + t),
            ]
        ).to(V.device)
        Vl = V[local]
        Cl = Vl @ W.T
        W = W - Cl.T @ Vl
        before = W.norm(dim=1)
        C = basis @ W.T  # (m + t, use): the new columns of H, with Cl below
        W = W - C.T @ basis
        if bool((W.norm(dim=1) < 0.7 * before).any()):
            C2 = basis @ W.T
            W = W - C2.T @ basis
            C = C + C2
        C[local] += Cl
        C = C.to(dtype=torch.float64, device="cpu")
        H[: m + t, block] = C
        H[block, : m + t] = C.T
        m += use
        anorm = max(anorm, float(C.abs().max()))
        thresh = eps**0.75 * max(anorm, tiny)
        if use < t or m == dim:  # the budget ends here, or the whole space is spanned
            t = 0
            coupling = torch.zeros(0, m, dtype=torch.float64)
            breakdown = False
        else:
            Q, R, breakdown = _extend_basis(W, V[:m], scale, thresh, generator)
            t = Q.shape[0]
            V[m : m + t] = Q
            coupling = torch.zeros(t, m, dtype=torch.float64)
            coupling[:, m - use :] = R.to(dtype=torch.float64, device="cpu")
        theta, S, idx, est, est_all = wanted_ritz()
        anorm = max(
            anorm,
            float(theta.abs().max()),
            float(coupling.abs().max()) if coupling.numel() else 0.0,
        )
        done = t == 0 or matvecs >= max_iter
        if not done and not breakdown and m >= k and bool(met(theta, idx, est, est_all).all()):
            _, res, _ = true_pairs(theta[idx], S[:, idx])
            done = bool(met(theta, idx, res.cpu().to(torch.float64), est_all).all())
        if done:
            break
        grow = min(b, dim - m - t)  # rows the next step adds
        if m + t + grow > cap:  # thick restart: keep the most wanted Ritz vectors
            keep = min(k + (m - k) // 3, cap - t - grow)
            order = _select(theta, keep, which)
            Sk = S[:, order]
            St = Sk.T.to(dtype=dtype, device=device)
            V[:keep], AV[:keep] = St @ V[:m], St @ AV[:m]
            V[keep : keep + t] = V[m : m + t].clone()
            H.zero_()
            H[:keep, :keep] = torch.diag(theta[order])
            coupling = coupling @ Sk
            m = keep
    theta, S, idx, _, est_all = wanted_ritz()
    vectors, residuals, values = true_pairs(theta[idx], S[:, idx])
    converged = met(theta, idx, residuals.cpu().to(torch.float64), est_all).to(device)
    return EigenResult(values, vectors, residuals, converged, matvecs)


def _spectral_radius_bound(
    matmat: Matmat,
    dim: int,
    max_iter: int,
    tol: float,
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator | None,
) -> float:
    """An upper bound on :math:`\\|A\\|_2` from a short power iteration (Ritz value + residual)."""
    res = subspace_iteration(
        matmat,
        dim,
        1,
        which="LM",
        max_iter=max_iter,
        tol=min(tol, 1e-3),
        dtype=dtype,
        device=device,
        generator=generator,
    )
    bound = float(res.eigenvalues.abs()[0] + res.residuals[0])
    return 1.01 * bound + torch.finfo(dtype).tiny


def subspace_iteration(
    matmat: Matmat,
    dim: int,
    k: int = 1,
    *,
    which: str = "LM",
    max_iter: int = 100,
    tol: float = 1e-6,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    X0: Tensor | None = None,
) -> EigenResult:
    r"""``k`` extreme eigenpairs by block power iteration with Rayleigh-Ritz and deflation.

    Each step multiplies the active block :math:`X` (orthonormal rows) by
    :math:`A`, takes the Ritz pairs of :math:`X A X^\top`, locks the leading pairs
    that meet the tolerance (deflation: they are projected out of every later
    block) and continues with the orthonormalised :math:`A X`.  The :math:`i`-th
    pair converges like :math:`|\lambda_{k+1} / \lambda_i|^t`.  For ``"LA"`` and
    ``"SA"`` the matrix is shifted by a bound :math:`\rho \ge \|A\|_2` from a
    short power iteration, :math:`A + \rho I` or :math:`A - \rho I`, whose
    largest-magnitude eigenvalues are the wanted ones; the convergence is then
    slower (ratios of :math:`\lambda + \rho`): prefer :func:`lanczos_eigsh`.

    Args:
        matmat: ``V -> V A`` on ``(b, n)`` batches (called with ``b <= k``).
        dim: ``n``.
        k: Number of eigenpairs.
        which: ``"LM"``, ``"LA"`` or ``"SA"``.
        max_iter: Largest number of block products.
        tol: Relative residual tolerance.
        dtype: Dtype (default: ``X0``'s, else torch's default).
        device: Device (default: ``X0``'s, else the generator's or CPU).
        generator: Source of the random start block.
        X0: Start block ``(k, n)``; random Gaussian if ``None``.

    Returns:
        An :class:`EigenResult` (``iterations``: block products used).

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([3.0, -5.0, 1.0, 0.5], dtype=torch.float64))
        >>> res = subspace_iteration(lambda V: V @ A, 4, 2, tol=1e-10, dtype=torch.float64)
        >>> [round(float(x), 8) for x in res.eigenvalues]
        [-5.0, 3.0]
    """
    check_generator(generator, device)
    _check_common(dim, k, tol)
    _check_which(which)
    check_count(max_iter, "max_iter")
    if X0 is not None:
        if X0.shape != (k, dim):
            raise ShapeError(f"X0 must have shape ({k}, {dim}), got {tuple(X0.shape)}")
        dtype = dtype or X0.dtype
        device = device if device is not None else X0.device
    dtype = dtype or torch.get_default_dtype()
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    eps = torch.finfo(dtype).eps

    shift = 0.0
    if which != "LM":
        rho = _spectral_radius_bound(matmat, dim, max_iter, tol, dtype, device, generator)
        shift = rho if which == "LA" else -rho

    def product(X: Tensor) -> Tensor:
        out = _apply(matmat, X)
        return out + shift * X if shift else out

    X = X0.to(dtype=dtype, device=device) if X0 is not None else None
    if X is None:
        X = torch.randn(k, dim, generator=generator, dtype=dtype, device=device)
    X = _orthonormalize(X, None, generator)
    locked_vecs = torch.empty(0, dim, dtype=dtype, device=device)
    locked_vals: list[Tensor] = []
    locked_res: list[Tensor] = []
    anorm = 0.0
    iterations = 0
    theta = residuals = None
    while True:
        AX = product(X)
        iterations += 1
        H = X @ AX.T
        theta, S = torch.linalg.eigh((H + H.T) / 2)
        order = torch.argsort(theta.abs(), descending=True, stable=True)
        theta, S = theta[order], S[:, order]
        X, AX = S.T @ X, S.T @ AX
        residuals = (AX - theta[:, None] * X).norm(dim=1)
        anorm = max(anorm, float(theta.abs().max()))
        ok = residuals <= tol * torch.clamp(theta.abs(), min=math.sqrt(eps) * anorm)
        lead = int(torch.cumprod(ok.to(torch.int64), 0).sum())
        if lead:
            locked_vecs = torch.cat([locked_vecs, X[:lead]])
            locked_vals.append(theta[:lead])
            locked_res.append(residuals[:lead])
        if lead == X.shape[0] or iterations >= max_iter:
            break
        X = _orthonormalize(AX[lead:], locked_vecs, generator)
    assert theta is not None and residuals is not None
    n_locked = locked_vecs.shape[0]
    values = torch.cat([*locked_vals, theta[lead:]])
    vectors = torch.cat([locked_vecs, X[lead:]])
    res = torch.cat([*locked_res, residuals[lead:]])
    converged = torch.arange(k, device=device) < n_locked
    values = values - shift
    idx = _select(values, k, which)
    return EigenResult(values[idx], vectors[idx], res[idx], converged[idx], iterations)
