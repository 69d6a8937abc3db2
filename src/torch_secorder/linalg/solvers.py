r"""Krylov solvers for :math:`(A + \lambda I)\, x = b` with a symmetric ``A`` known by products.

A *matmat* is any function ``V -> V A`` on a ``(k, n)`` batch of row vectors.
Both solvers take one right-hand side ``b`` of shape ``(n,)`` or a batch of
``k`` of them, ``(k, n)``, solved independently (each has its own Krylov
space and scalars) but multiplied together: one call of ``matmat`` per
iteration on the rows that have not converged.  ``damping`` is the
:math:`\lambda` of the shifted system (Levenberg-Marquardt, Tikhonov,
influence functions :math:`(H + \lambda I)^{-1} \nabla L`, Newton-CG steps).

* :func:`conjugate_gradient`: for :math:`A + \lambda I` symmetric positive
  definite, optionally preconditioned.  Minimises the energy norm of the error
  over the Krylov space.
* :func:`minres`: for any symmetric :math:`A + \lambda I` (indefinite or
  singular too).  Minimises the residual norm over the Krylov space, so its
  residual history never increases.

A right-hand side has converged when its residual satisfies

.. math::
    \|b - (A + \lambda I) x\| \le \max(\mathrm{atol},\ \mathrm{rtol}\cdot\|b\|).

The solvers track the residual by recurrence; when the recurrence meets the
tolerance the true residual is computed (one more product) and, if it misses
the tolerance (rounding), the solver restarts from the current ``x`` with
the true residual.  So ``converged`` is reported only for solutions whose true
residual meets the tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from torch_secorder.linalg.progress import PROGRESS_DELAY_S

__all__ = ["SolveResult", "conjugate_gradient", "minres"]

Matmat = Callable[[Tensor], Tensor]


class SolveResult(NamedTuple):
    r"""Solution of :math:`(A + \lambda I)\, x = b` by a Krylov solver.

    For a single right-hand side ``b`` of shape ``(n,)`` the per-right-hand-side
    fields are scalars (0-d tensors); for a batch ``(k, n)`` they have a
    leading dimension ``k``.

    Attributes:
        x: The solution, shaped like ``b``.
        residual_norms: ``(t + 1,)`` or ``(t + 1, k)`` residual norms after
            iteration ``0..t`` (row 0: the initial residual).  A right-hand
            side that stopped early keeps its last value.  Entries are the
            solver's recurrence values, replaced by the true residual where it
            was checked.
        converged: Whether the true residual met the tolerance.
        iterations: Iterations (products with ``A`` in the recurrence) per
            right-hand side.
        matvecs: All products with ``A`` (rows passed to the matmat), the
            residual checks included.
    """

    x: Tensor
    residual_norms: Tensor
    converged: Tensor
    iterations: Tensor
    matvecs: int


def _check_real(value: object, name: str, *, nonnegative: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (nonnegative and value < 0):
        want = "a finite number >= 0" if nonnegative else "a finite number"
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return value


class _System:
    """Checked inputs of a solve: the shifted operator, the batch, the tolerances."""

    def __init__(
        self,
        name: str,
        matmat: Matmat,
        b: Tensor,
        damping: float,
        x0: Tensor | None,
        rtol: float,
        atol: float,
        max_iter: int | None,
    ) -> None:
        if not callable(matmat):
            raise TypeError(f"matmat must be callable, got {type(matmat).__name__}")
        if not isinstance(b, Tensor):
            raise TypeError(f"b must be a tensor, got {type(b).__name__}")
        if not b.is_floating_point():
            raise TypeError(f"b must be a floating-point tensor, got dtype {b.dtype}")
        if b.ndim not in (1, 2) or b.shape[-1] == 0 or (b.ndim == 2 and b.shape[0] == 0):
            raise ValueError(
                f"b must have shape (n,) or (k, n) with n, k >= 1, got {tuple(b.shape)}"
            )
        if not bool(torch.isfinite(b).all()):
            raise ValueError("b must be finite (it holds nan or inf)")
        self.name = name
        self.matmat = matmat
        self.single = b.ndim == 1
        self.B = b[None] if self.single else b
        self.damping = _check_real(damping, "damping", nonnegative=False)
        rtol = _check_real(rtol, "rtol", nonnegative=True)
        atol = _check_real(atol, "atol", nonnegative=True)
        k, n = self.B.shape
        if max_iter is None:
            max_iter = 10 * n
        if isinstance(max_iter, bool) or not isinstance(max_iter, int):
            raise TypeError(f"max_iter must be an int, got {type(max_iter).__name__}")
        if max_iter < 0:
            raise ValueError(f"max_iter must be >= 0, got {max_iter}")
        self.max_iter = max_iter
        if x0 is not None:
            if not isinstance(x0, Tensor):
                raise TypeError(f"x0 must be a tensor, got {type(x0).__name__}")
            if x0.shape != b.shape:
                raise ValueError(
                    f"x0 must have the shape of b {tuple(b.shape)}, got {tuple(x0.shape)}"
                )
            x0 = x0.to(dtype=b.dtype, device=b.device)
            if not bool(torch.isfinite(x0).all()):
                raise ValueError("x0 must be finite (it holds nan or inf)")
        self.X0 = None if x0 is None else (x0[None] if self.single else x0).clone()
        self.tol = torch.clamp(rtol * self.B.norm(dim=1), min=atol)
        self.matvecs = 0

    def op(self, V: Tensor) -> Tensor:
        r"""``V -> V (A + \lambda I)``, checked."""
        out = self.matmat(V)
        if not isinstance(out, Tensor) or out.shape != V.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"matmat must map a ({V.shape[0]}, {V.shape[1]}) batch to the same shape, got {got}"
            )
        if not bool(torch.isfinite(out).all()):
            raise ValueError(
                f"{self.name}: matmat returned nan or inf: the matrix products are not finite"
            )
        self.matvecs += V.shape[0]
        out = out.to(V.dtype)
        return out + self.damping * V if self.damping else out

    def initial(self) -> tuple[Tensor, Tensor]:
        """``(X, R)``: the start and its residual (no product when ``x0`` is None)."""
        if self.X0 is None:
            return torch.zeros_like(self.B), self.B.clone()
        return self.X0, self.B - self.op(self.X0)

    def true_residual(self, X: Tensor, rows: Tensor) -> Tensor:
        return self.B[rows] - self.op(X[rows])

    def result(
        self,
        X: Tensor,
        history: list[Tensor],
        converged: Tensor,
        iterations: Tensor,
    ) -> SolveResult:
        hist = torch.stack(history)
        if self.single:
            return SolveResult(X[0], hist[:, 0], converged[0], iterations[0], self.matvecs)
        return SolveResult(X, hist, converged, iterations, self.matvecs)


def _iterations(max_iter: int, progress: bool, desc: str) -> Iterator[int]:
    """``range(max_iter)``, with a tqdm bar once the loop has run a few seconds."""
    if not progress or max_iter <= 1:
        yield from range(max_iter)
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        yield from range(max_iter)
        return
    with tqdm(total=max_iter, desc=desc, delay=PROGRESS_DELAY_S, leave=False) as bar:
        for i in range(max_iter):
            yield i
            bar.update(1)


def _as_preconditioner(
    preconditioner: Callable[[Tensor], Tensor] | Tensor | None, n: int, like: Tensor
) -> Callable[[Tensor], Tensor] | None:
    if preconditioner is None:
        return None
    if isinstance(preconditioner, Tensor):
        diag = preconditioner.to(dtype=like.dtype, device=like.device)
        if diag.shape != (n,):
            raise ValueError(
                f"preconditioner as a tensor must be the diagonal of M, shape ({n},), "
                f"got {tuple(diag.shape)}"
            )
        if not bool((diag > 0).all()) or not bool(torch.isfinite(diag).all()):
            raise ValueError("preconditioner diagonal must be positive and finite")
        return lambda R: R / diag
    if not callable(preconditioner):
        raise TypeError(
            f"preconditioner must be a callable, a (n,) tensor or None, "
            f"got {type(preconditioner).__name__}"
        )

    def apply(R: Tensor) -> Tensor:
        out = preconditioner(R)
        if not isinstance(out, Tensor) or out.shape != R.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"preconditioner must map a {tuple(R.shape)} batch to the same shape, got {got}"
            )
        return out.to(R.dtype)

    return apply


def conjugate_gradient(
    matmat: Matmat,
    b: Tensor,
    *,
    damping: float = 0.0,
    x0: Tensor | None = None,
    rtol: float = 1e-5,
    atol: float = 0.0,
    max_iter: int | None = None,
    preconditioner: Callable[[Tensor], Tensor] | Tensor | None = None,
    progress: bool = True,
) -> SolveResult:
    r"""Solve :math:`(A + \lambda I)\, x = b` by (preconditioned) conjugate gradients.

    For :math:`K = A + \lambda I` symmetric positive definite and a symmetric
    positive definite preconditioner :math:`M \approx K`, iteration :math:`t`
    minimises :math:`\|x - x_\star\|_K` over
    :math:`x_0 + \mathcal K_t(M^{-1}K, M^{-1}r_0)`:

    .. math::
        \alpha_t = \frac{r_t^\top z_t}{p_t^\top K p_t},\quad
        x_{t+1} = x_t + \alpha_t p_t,\quad r_{t+1} = r_t - \alpha_t K p_t,\quad
        z_{t+1} = M^{-1} r_{t+1},\quad
        p_{t+1} = z_{t+1} + \frac{r_{t+1}^\top z_{t+1}}{r_t^\top z_t}\, p_t .

    The error in the :math:`K`-norm falls at least like
    :math:`2\bigl(\frac{\sqrt\kappa - 1}{\sqrt\kappa + 1}\bigr)^t` with
    :math:`\kappa` the condition number of :math:`M^{-1}K`.  If a search direction
    has :math:`p^\top K p \le 0` the operator is not positive definite and a
    ``ValueError`` is raised (use :func:`minres`, or a larger ``damping``).

    Reference: M. R. Hestenes, E. Stiefel, *Methods of conjugate gradients for
    solving linear systems*, J. Res. Nat. Bur. Standards 49 (1952); Y. Saad,
    *Iterative Methods for Sparse Linear Systems*, 2nd ed., Alg. 9.1.

    Args:
        matmat: ``V -> V A`` on ``(k, n)`` batches, ``A`` symmetric.
        b: Right-hand side ``(n,)`` or a batch ``(k, n)``.
        damping: :math:`\lambda`.
        x0: Start (default zero), shaped like ``b``.
        rtol: Relative tolerance on the residual norm (relative to :math:`\|b\|`).
        atol: Absolute tolerance on the residual norm.
        max_iter: Most iterations per right-hand side (default ``10 n``).
        preconditioner: :math:`M^{-1}` as a function on ``(k, n)`` batches, or
            the ``(n,)`` positive diagonal of :math:`M` (Jacobi), or ``None``.
        progress: Show a progress bar when the run lasts more than a few seconds.

    Returns:
        A :class:`SolveResult`.

    Example:
        >>> import torch
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> res = conjugate_gradient(lambda V: V @ A, b, damping=1.0, rtol=1e-12)
        >>> torch.allclose(res.x, torch.linalg.solve(A + torch.eye(2), b)), bool(res.converged)
        (True, True)
        >>> int(res.iterations)            # at most n steps in exact arithmetic
        2
    """
    system = _System("conjugate_gradient", matmat, b, damping, x0, rtol, atol, max_iter)
    k, n = system.B.shape
    precond = _as_preconditioner(preconditioner, n, system.B)
    X, R = system.initial()
    rnorm = R.norm(dim=1)
    Z = R if precond is None else precond(R)
    rz = (R * Z).sum(-1)
    P = Z.clone()
    history = [rnorm.clone()]
    iterations = torch.zeros(k, dtype=torch.int64, device=b.device)
    converged = rnorm <= system.tol
    done = converged.clone()

    def check_preconditioner(values: Tensor, norms: Tensor) -> None:
        if precond is not None and bool(((values <= 0) & (norms > 0)).any()):
            raise ValueError(
                "preconditioner must be positive definite: r^T M^{-1} r <= 0 for a nonzero r"
            )

    check_preconditioner(rz, rnorm)
    for it in _iterations(system.max_iter, progress, "conjugate gradients"):
        rows = (~done).nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        Pa = P[rows]
        KP = system.op(Pa)
        curvature = (Pa * KP).sum(-1)
        if bool((curvature <= 0).any()):
            bad = int(rows[(curvature <= 0).nonzero()[0, 0]])
            raise ValueError(
                f"conjugate_gradient needs A + damping * I positive definite, but "
                f"p^T (A + damping I) p = {float(curvature.min()):.3e} <= 0 for right-hand "
                f"side {bad} at iteration {it + 1}; use minres for indefinite systems or "
                f"increase damping (now {system.damping})"
            )
        alpha = rz[rows] / curvature
        X[rows] += alpha[:, None] * Pa
        Ra = R[rows] - alpha[:, None] * KP
        iterations[rows] += 1
        norms = Ra.norm(dim=1)
        # the recurrence says converged: check the true residual, restart if it misses
        met = norms <= system.tol[rows]
        restart = torch.zeros_like(met)
        if bool(met.any()):
            check = rows[met]
            true_r = system.true_residual(X, check)
            true_norms = true_r.norm(dim=1)
            ok = true_norms <= system.tol[check]
            Ra[met] = true_r
            norms[met] = true_norms
            converged[check[ok]] = True
            done[check[ok]] = True
            restart[met] = ~ok
        R[rows] = Ra
        rnorm[rows] = norms
        Za = Ra if precond is None else precond(Ra)
        rz_new = (Ra * Za).sum(-1)
        check_preconditioner(rz_new, norms)
        beta = torch.where(restart, torch.zeros_like(rz_new), rz_new / rz[rows])
        P[rows] = Za + beta[:, None] * Pa
        rz[rows] = rz_new
        history.append(rnorm.clone())
    return system.result(X, history, converged, iterations)


def minres(
    matmat: Matmat,
    b: Tensor,
    *,
    damping: float = 0.0,
    x0: Tensor | None = None,
    rtol: float = 1e-5,
    atol: float = 0.0,
    max_iter: int | None = None,
    progress: bool = True,
) -> SolveResult:
    r"""Solve :math:`(A + \lambda I)\, x = b` for symmetric, possibly indefinite ``A`` by MINRES.

    With :math:`K = A + \lambda I`, Lanczos on :math:`K` from
    :math:`v_1 = r_0 / \beta_1` gives :math:`K V_t = V_{t+1} \underline{T}_t`
    (:math:`\underline{T}_t` tridiagonal, ``(t+1) x t``), and iteration ``t``
    takes

    .. math::
        x_t = x_0 + V_t y_t,\qquad
        y_t = \arg\min_y \bigl\|\beta_1 e_1 - \underline{T}_t\, y\bigr\|
            = \arg\min_{x \in x_0 + \mathcal K_t(K, r_0)} \|b - K x\|,

    solving the least-squares problem by a QR factorisation of
    :math:`\underline{T}_t` updated with one Givens rotation per step (so
    :math:`\|r_t\| = \beta_1 \prod_i |s_i|` is known without forming
    :math:`r_t`, and never increases), and updating :math:`x_t` by three-term
    recurrences of the directions :math:`W_t = V_t R_t^{-1}`.  Unlike CG it
    needs no definiteness: it solves saddle-point and shifted systems, and on
    a singular consistent system converges to a solution.

    Reference: C. C. Paige, M. A. Saunders, *Solution of sparse indefinite
    systems of linear equations*, SIAM J. Numer. Anal. 12 (1975).

    Args:
        matmat: ``V -> V A`` on ``(k, n)`` batches, ``A`` symmetric.
        b: Right-hand side ``(n,)`` or a batch ``(k, n)``.
        damping: :math:`\lambda` (any real number).
        x0: Start (default zero), shaped like ``b``.
        rtol: Relative tolerance on the residual norm (relative to :math:`\|b\|`).
        atol: Absolute tolerance on the residual norm.
        max_iter: Most iterations per right-hand side (default ``10 n``).
        progress: Show a progress bar when the run lasts more than a few seconds.

    Returns:
        A :class:`SolveResult`; ``residual_norms`` is non-increasing between the
        (rare) restarts described in the module doc.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64))
        >>> b = torch.ones(3, dtype=torch.float64)
        >>> res = minres(lambda V: V @ A, b, rtol=1e-12)
        >>> [round(float(t), 10) for t in res.x]
        [0.5, -1.0, 2.0]
        >>> bool(res.converged), int(res.iterations)
        (True, 3)
    """
    system = _System("minres", matmat, b, damping, x0, rtol, atol, max_iter)
    k, n = system.B.shape
    dtype, device = system.B.dtype, system.B.device
    X, R = system.initial()
    rnorm = R.norm(dim=1)
    history = [rnorm.clone()]
    iterations = torch.zeros(k, dtype=torch.int64, device=device)
    converged = rnorm <= system.tol
    done = converged.clone()

    # Lanczos vectors v_t, v_{t-1} and beta_t (the norm that made v_t)
    V = torch.zeros_like(R)
    V_prev = torch.zeros_like(R)
    beta = torch.zeros(k, dtype=dtype, device=device)
    # Givens state: last rotation (cs, sn), carried entries, residual norm phibar
    cs = torch.zeros(k, dtype=dtype, device=device)
    sn = torch.zeros_like(cs)
    dbar = torch.zeros_like(cs)
    epsln = torch.zeros_like(cs)
    phibar = torch.zeros_like(cs)
    # directions w_{t-1}, w_{t-2}
    W1 = torch.zeros_like(R)
    W2 = torch.zeros_like(R)

    def reset(rows: Tensor, residual: Tensor, norms: Tensor) -> None:
        """(Re)start the recurrence of ``rows`` from their residual."""
        V[rows] = residual / torch.where(norms > 0, norms, torch.ones_like(norms))[:, None]
        V_prev[rows] = 0.0
        beta[rows] = norms
        cs[rows] = -1.0
        sn[rows] = 0.0
        dbar[rows] = 0.0
        epsln[rows] = 0.0
        phibar[rows] = norms
        W1[rows] = 0.0
        W2[rows] = 0.0

    reset(torch.arange(k, device=device), R, rnorm)
    for _ in _iterations(system.max_iter, progress, "MINRES"):
        rows = (~done).nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        v = V[rows]
        Kv = system.op(v)
        alpha = (v * Kv).sum(-1)
        nxt = Kv - alpha[:, None] * v - beta[rows, None] * V_prev[rows]
        beta_next = nxt.norm(dim=1)
        # apply the previous rotation to the new column (..., beta_t, alpha_t, beta_{t+1})
        c, s = cs[rows], sn[rows]
        old_eps = epsln[rows]
        delta = c * dbar[rows] + s * alpha
        gbar = s * dbar[rows] - c * alpha
        epsln[rows] = s * beta_next
        dbar[rows] = -c * beta_next
        # new rotation annihilating beta_{t+1}
        gamma = torch.hypot(gbar, beta_next)
        singular = gamma == 0  # K singular on this Krylov space: no progress possible
        gamma_safe = torch.where(singular, torch.ones_like(gamma), gamma)
        c_new = torch.where(singular, c, gbar / gamma_safe)
        s_new = torch.where(singular, torch.ones_like(s), beta_next / gamma_safe)
        phi = torch.where(singular, torch.zeros_like(gamma), c_new * phibar[rows])
        phibar[rows] = s_new * phibar[rows]
        cs[rows], sn[rows] = c_new, s_new
        w = (v - old_eps[:, None] * W2[rows] - delta[:, None] * W1[rows]) / gamma_safe[:, None]
        W2[rows] = W1[rows]
        W1[rows] = w
        X[rows] += phi[:, None] * w
        V_prev[rows] = v
        V[rows] = nxt / torch.where(beta_next > 0, beta_next, torch.ones_like(beta_next))[:, None]
        beta[rows] = beta_next
        iterations[rows] += 1
        norms = phibar[rows].abs()
        # the recurrence says converged: check the true residual, restart if it misses
        met = norms <= system.tol[rows]
        if bool(met.any()):
            check = rows[met]
            true_r = system.true_residual(X, check)
            true_norms = true_r.norm(dim=1)
            ok = true_norms <= system.tol[check]
            norms[met] = true_norms
            converged[check[ok]] = True
            done[check[ok]] = True
            if bool((~ok).any()):
                reset(check[~ok], true_r[~ok], true_norms[~ok])
        stalled = singular & ~met
        done[rows[stalled]] = True
        rnorm[rows] = norms
        history.append(rnorm.clone())
    return system.result(X, history, converged, iterations)
