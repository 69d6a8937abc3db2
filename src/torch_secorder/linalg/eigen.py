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

Convergence is judged on the residual of each Ritz pair :math:`(\theta, y)`,
:math:`\|A y - \theta y\| \le \mathrm{tol}\cdot\max(|\theta|, \sqrt{\varepsilon}\,
\|A\|_{\mathrm{est}})`, with :math:`\varepsilon` the machine epsilon of the dtype
and :math:`\|A\|_{\mathrm{est}}` the largest Ritz value in magnitude.  For a
symmetric matrix an eigenvalue of :math:`A` lies within the residual of every
Ritz value, and the error of a well separated Ritz value is of order
:math:`\|r\|^2 / \mathrm{gap}`.
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


def _ritz(alphas: list[float], betas: list[float], k: int, which: str):
    return ritz_pairs(
        torch.tensor(alphas, dtype=torch.float64),
        torch.tensor(betas, dtype=torch.float64),
        k,
        which,
    )


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
) -> EigenResult:
    r"""``k`` extreme eigenpairs of a symmetric matrix by Lanczos with full reorthogonalisation.

    Builds an orthonormal Krylov basis :math:`Q_m` (each new vector orthogonalised
    twice against all previous ones, so no spurious copies of converged
    eigenvalues appear) and the tridiagonal :math:`T_m = Q_m^\top A Q_m`.  After
    every step the wanted Ritz pairs of :math:`T_m` are checked; the run stops
    when all ``k`` meet the tolerance (see the module doc), after ``max_iter``
    products, or when the basis spans the whole space.  If the recurrence breaks
    down (an invariant subspace is found), it continues from a random vector
    orthogonal to the basis, so eigenvalues of multiplicity above one are found
    there.  Memory: ``max_iter`` vectors of length ``n``.

    Args:
        matmat: ``V -> V A`` on ``(b, n)`` batches (called with ``b = 1``).
        dim: ``n``.
        k: Number of eigenpairs.
        which: ``"LM"`` (largest magnitude), ``"LA"`` (largest algebraic) or
            ``"SA"`` (smallest algebraic).
        max_iter: Largest Krylov dimension (default ``min(n, max(2k + 20, 100))``).
        tol: Relative residual tolerance.
        dtype: Dtype of the basis (default: ``v0``'s, else torch's default).
        device: Device of the basis (default: ``v0``'s, else the generator's or CPU).
        generator: Source of the random start (and of restarts).
        v0: Start vector (``(n,)``); random Gaussian if ``None``.

    Returns:
        An :class:`EigenResult`.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([3.0, -5.0, 1.0, 0.5], dtype=torch.float64))
        >>> res = lanczos_eigsh(lambda V: V @ A, 4, 2, dtype=torch.float64)
        >>> [round(float(x), 10) for x in res.eigenvalues]
        [-5.0, 3.0]
        >>> res = lanczos_eigsh(lambda V: V @ A, 4, 1, which="LA", dtype=torch.float64)
        >>> round(float(res.eigenvalues[0]), 10)
        3.0
    """
    check_generator(generator, device)
    _check_common(dim, k, tol)
    _check_which(which)
    if max_iter is None:
        max_iter = max(2 * k + 20, 100)
    check_count(max_iter, "max_iter")
    m_max = min(max_iter, dim)
    if m_max < k:
        raise ValueError(f"max_iter must be >= the number of eigenpairs k={k}, got {max_iter}")
    if v0 is not None:
        if v0.shape != (dim,):
            raise ShapeError(f"v0 must have shape ({dim},), got {tuple(v0.shape)}")
        dtype = dtype or v0.dtype
        device = device if device is not None else v0.device
    dtype = dtype or torch.get_default_dtype()
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    eps = torch.finfo(dtype).eps
    # beta below this (relative to ||A||) means an invariant subspace: restart there
    breakdown_tol = eps**0.75

    def random_vector() -> Tensor:
        return torch.randn(dim, generator=generator, dtype=dtype, device=device)

    q = (v0.to(dtype=dtype, device=device) if v0 is not None else random_vector()).clone()
    if not bool(q.norm() > 0):
        raise ValueError("v0 must be nonzero")
    q = q / q.norm()
    Q = torch.empty(m_max, dim, dtype=dtype, device=device)
    alphas: list[float] = []
    betas: list[float] = []
    theta = S = residuals = None
    anorm = 0.0
    m = 0
    block_start = 0  # where the current Krylov sequence began (restarts after breakdown)
    last_check = 0
    for j in range(m_max):
        Q[j] = q
        w = _apply(matmat, q[None])[0]
        alpha = torch.dot(w, q)
        w = w - alpha * q
        if j > 0:
            w = w - betas[-1] * Q[j - 1]
        basis = Q[: j + 1]
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w = w - basis.T @ (basis @ w)
        beta = w.norm()
        alphas.append(float(alpha))
        betas.append(float(beta))
        m = j + 1
        anorm = max(anorm, abs(alphas[-1]), betas[-1])
        breakdown = betas[-1] <= breakdown_tol * max(anorm, torch.finfo(dtype).tiny)
        # The Ritz pairs (an eigendecomposition of T_m) are checked after every step
        # up to 20, then every m // 10 steps (at most 10% more products than needed).
        due = m - block_start >= k and (m <= 20 or m - last_check >= m // 10)
        if m == m_max or breakdown or due:
            last_check = m
            theta, S, residuals = _ritz(alphas, betas, k, which)
            anorm = max(anorm, float(theta.abs().max()))
        if m == m_max:
            break
        if due and not breakdown:
            bound = tol * torch.clamp(theta.abs(), min=math.sqrt(eps) * anorm)
            if bool((residuals <= bound).all()):
                break
        if breakdown:
            betas[-1] = 0.0
            block_start = m
            w = _orthonormalize(random_vector()[None], Q[:m], generator)[0]
            q = w
        else:
            q = w / beta
    assert theta is not None and S is not None and residuals is not None
    vectors = S.T.to(dtype=dtype, device=device) @ Q[:m]
    bound = tol * torch.clamp(theta.abs(), min=math.sqrt(eps) * anorm)
    return EigenResult(
        theta.to(dtype=dtype, device=device),
        vectors,
        residuals.to(dtype=dtype, device=device),
        (residuals <= bound).to(device),
        m,
    )


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
