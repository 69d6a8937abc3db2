r"""Spectral density by stochastic Lanczos quadrature (SLQ).

The *spectral density* of a symmetric :math:`n \times n` matrix :math:`A` with
eigenvalues :math:`\lambda_1, \dots, \lambda_n` is the measure
:math:`\phi(t) = \frac1n \sum_{i=1}^n \delta(t - \lambda_i)`.  For a unit vector
:math:`v` drawn with :math:`E[v v^\top] = I / n` (a normalised Rademacher or
Gaussian vector),

.. math::
    \frac1n \operatorname{tr} f(A) = E\bigl[v^\top f(A)\, v\bigr]
    = E\Bigl[\sum_{i=1}^n (u_i^\top v)^2 f(\lambda_i)\Bigr],

so the measure :math:`\mu_v = \sum_i (u_i^\top v)^2 \delta_{\lambda_i}` is an
unbiased estimate of :math:`\phi`.  ``m`` Lanczos steps from :math:`v` give the
tridiagonal :math:`T_m = Q_m^\top A Q_m = S \Theta S^\top`; the Gauss quadrature
rule with nodes :math:`\theta_j` (the Ritz values) and weights
:math:`\tau_j = S_{1j}^2` satisfies

.. math::
    v^\top p(A)\, v = \sum_{j=1}^m \tau_j\, p(\theta_j)
    \quad\text{for every polynomial } p \text{ of degree} \le 2m - 1,

so :math:`\sum_j \tau_j \delta_{\theta_j}` is an ``m``-point approximation of
:math:`\mu_v`.  Averaging over ``num_probes`` probes and smoothing each node with
a Gaussian of width :math:`\sigma` gives the density estimate

.. math::
    \hat\phi_\sigma(t) = \frac{1}{N_v} \sum_{l=1}^{N_v} \sum_{j=1}^m
    \tau_j^{(l)} \frac{1}{\sqrt{2\pi}\,\sigma}
    \exp\Bigl(-\frac{(t - \theta_j^{(l)})^2}{2\sigma^2}\Bigr).

Reference: L. Lin, Y. Saad, C. Yang, *Approximating spectral densities of large
matrices*, SIAM Review 58 (2016); S. Ubaru, J. Chen, Y. Saad, *Fast estimation
of tr(f(A)) via stochastic Lanczos quadrature*, SIAM J. Matrix Anal. Appl. 38
(2017).  PyHessian's ``density`` computes the same nodes and weights, one probe
at a time; here the recurrences of all probes run together, one call of the
matmat per Lanczos step on a ``(num_probes, n)`` batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from torch_secorder._checks import check_generator
from torch_secorder.linalg._estimator_tools import schedule
from torch_secorder.linalg.estimate import Estimate
from torch_secorder.linalg.progress import progress_bar

__all__ = ["SpectralDensity", "stochastic_lanczos_quadrature"]

Matmat = Callable[[Tensor], Tensor]

#: Start-vector distributions accepted by :func:`stochastic_lanczos_quadrature`.
START_DISTRIBUTIONS = ("rademacher", "gaussian")

#: Default Gaussian width, as a fraction of the spread of the nodes.
DEFAULT_RELATIVE_SIGMA = 0.01


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_sigma(sigma: object) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"sigma must be a positive float, got {type(sigma).__name__}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive finite float, got {sigma!r}")
    return float(sigma)


@dataclass(frozen=True)
class SpectralDensity:
    r"""Gauss quadrature rules of a spectral density, one per probe.

    Attributes:
        nodes: ``(num_probes, m)`` Ritz values :math:`\theta_j`, increasing along
            each row.  A probe whose recurrence stopped early (an invariant
            subspace after ``k < m`` steps) has its ``m - k`` last nodes padded
            with its largest node, with weight 0.
        weights: ``(num_probes, m)`` quadrature weights :math:`\tau_j \ge 0`; each
            row sums to 1.
        steps: ``(num_probes,)`` Lanczos steps taken per probe (``m`` unless the
            recurrence stopped early).
        matvecs: Products with ``A`` (rows passed to the matmat).
        dim: ``n``.
    """

    nodes: Tensor
    weights: Tensor
    steps: Tensor
    matvecs: int
    dim: int

    @property
    def num_probes(self) -> int:
        """Number of probes (rows of ``nodes``)."""
        return int(self.nodes.shape[0])

    def default_sigma(self) -> float:
        r"""The default Gaussian width: 1% of the spread of the nodes.

        :math:`\sigma = 0.01\,(\max_{l,j}\theta_j^{(l)} - \min_{l,j}\theta_j^{(l)})`
        (``DEFAULT_RELATIVE_SIGMA``), or 1% of :math:`\max|\theta|` (1% if that
        is 0) when all nodes coincide.  The width is a bias-variance choice: the
        ``m`` nodes of a probe are spaced about ``range / m`` apart, and a
        smaller :math:`\sigma` shows that discretisation as spikes.  PyHessian
        uses a variance of :math:`10^{-5} \max(1, \text{range})`, much narrower,
        for log-scale plots; pass ``sigma`` to choose.
        """
        hi = float(self.nodes.max())
        lo = float(self.nodes.min())
        spread = hi - lo
        if spread <= 0:
            spread = max(abs(hi), abs(lo)) or 1.0
        return DEFAULT_RELATIVE_SIGMA * spread

    def grid(self, num_points: int = 1000, sigma: float | None = None) -> Tensor:
        r"""Evenly spaced points covering the nodes with a margin of :math:`6\sigma`.

        Over this grid the smoothed density integrates to 1 within about
        :math:`10^{-8}` (the Gaussian mass beyond :math:`6\sigma`) plus the
        quadrature error of the grid.
        """
        num_points = _check_positive_int(num_points, "num_points")
        sigma = self.default_sigma() if sigma is None else _check_sigma(sigma)
        lo = float(self.nodes.min()) - 6 * sigma
        hi = float(self.nodes.max()) + 6 * sigma
        return torch.linspace(lo, hi, num_points, dtype=self.nodes.dtype, device=self.nodes.device)

    def density(self, grid: Tensor, sigma: float | None = None) -> Tensor:
        r"""The Gaussian-smoothed density :math:`\hat\phi_\sigma` at the points of ``grid``.

        Args:
            grid: 1-D tensor of points :math:`t`.
            sigma: Width of the Gaussians (default :meth:`default_sigma`).

        Returns:
            A tensor shaped like ``grid``; it integrates to 1 over the real line
            (each probe's weights sum to 1, and the probes are averaged).
        """
        grid = self._check_points(grid, "grid")
        sigma = self.default_sigma() if sigma is None else _check_sigma(sigma)
        nodes = self.nodes.reshape(-1).to(grid.dtype)
        weights = self.weights.reshape(-1).to(grid.dtype) / self.num_probes
        norm = 1.0 / (math.sqrt(2 * math.pi) * sigma)
        out = torch.empty_like(grid)
        # bounded memory: at most ~4M kernel evaluations at once
        step = max(1, (1 << 22) // max(1, nodes.numel()))
        for start in range(0, grid.numel(), step):
            t = grid[start : start + step, None]
            kernel = torch.exp(-0.5 * ((t - nodes) / sigma) ** 2)
            out[start : start + step] = norm * (kernel @ weights)
        return out

    def cdf(self, points: Tensor) -> Tensor:
        r"""The distribution function of the quadrature measure (no smoothing).

        :math:`\hat F(t) = \frac{1}{N_v}\sum_l \sum_j \tau_j^{(l)}\,[\theta_j^{(l)} \le t]`,
        an estimate of the fraction of eigenvalues :math:`\le t`.
        """
        points = self._check_points(points, "points")
        nodes = self.nodes.reshape(-1).to(points.dtype)
        weights = self.weights.reshape(-1).to(points.dtype) / self.num_probes
        return (nodes[None, :] <= points[:, None]).to(points.dtype) @ weights

    def trace_samples(self, f: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        r"""Per-probe estimates :math:`n \sum_j \tau_j f(\theta_j)` of :math:`\mathrm{tr} f(A)`.

        For a polynomial ``f`` of degree at most :math:`2m - 1` (any ``f`` for
        a probe whose recurrence broke down, or when ``m = n``) each value
        equals :math:`n\, v^\top f(A)\, v` exactly, so its mean over the
        probes is unbiased.

        Args:
            f: Elementwise function of a tensor of nodes (default identity).

        Returns:
            A ``(num_probes,)`` tensor.
        """
        values = self.nodes if f is None else f(self.nodes)
        if not isinstance(values, Tensor) or values.shape != self.nodes.shape:
            got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ValueError(
                f"f must map the nodes tensor {tuple(self.nodes.shape)} elementwise to a "
                f"tensor of the same shape, got {got}"
            )
        return self.dim * (self.weights * values).sum(-1)

    def trace_estimate(self, f: Callable[[Tensor], Tensor] | None = None) -> Estimate:
        r"""Estimate of :math:`\operatorname{tr} f(A)` (default :math:`f(t) = t`: the trace).

        The mean of :meth:`trace_samples`, with ``std_error`` their standard
        deviation over :math:`\sqrt{N_v}` (``None`` for a single probe) and
        ``matvecs`` the products of the Lanczos runs.

        Args:
            f: Elementwise function of a tensor of nodes (default identity).
        """
        samples = self.trace_samples(f)
        std_error = None
        if self.num_probes > 1:
            std_error = samples.std(correction=1) / math.sqrt(self.num_probes)
        return Estimate(samples.mean(), std_error, self.matvecs)

    def moments(self, max_degree: int) -> Tensor:
        r"""Estimates of the moments :math:`\frac1n\operatorname{tr}(A^k)`, ``k = 0..max_degree``.

        Unbiased for :math:`k \le 2m - 1` (see :meth:`trace_estimate`); moment 0 is 1.
        """
        if isinstance(max_degree, bool) or not isinstance(max_degree, int):
            raise TypeError(f"max_degree must be an int, got {type(max_degree).__name__}")
        if max_degree < 0:
            raise ValueError(f"max_degree must be >= 0, got {max_degree}")
        powers = torch.arange(max_degree + 1, device=self.nodes.device)
        vals = self.nodes[..., None] ** powers.to(self.nodes.dtype)
        return (self.weights[..., None] * vals).sum(1).mean(0)

    def _check_points(self, points: object, name: str) -> Tensor:
        if not isinstance(points, Tensor):
            raise TypeError(f"{name} must be a 1-D tensor, got {type(points).__name__}")
        if points.ndim != 1:
            raise ValueError(f"{name} must be a 1-D tensor, got shape {tuple(points.shape)}")
        if not points.is_floating_point():
            points = points.to(self.nodes.dtype)
        return points


def _apply(matmat: Matmat, X: Tensor) -> Tensor:
    out = matmat(X)
    if not isinstance(out, Tensor) or out.shape != X.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"matmat must map a ({X.shape[0]}, {X.shape[1]}) batch to the same shape, got {got}"
        )
    if not bool(torch.isfinite(out).all()):
        raise ValueError("matmat returned nan or inf: the matrix products are not finite")
    return out.to(X.dtype)


def _lanczos_batch(
    matmat: Matmat,
    start: Tensor,
    num_steps: int,
    reorthogonalize: bool,
    progress: bool,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """Lanczos on every row of ``start`` at once (rows are unit vectors).

    Returns the ``(p, m)`` diagonals, the ``(p, m)`` off-diagonals (entry ``j``
    couples steps ``j`` and ``j + 1``), the ``(p,)`` steps taken, and the matvecs.
    A row stops after step ``j`` when ``beta_j <= eps**0.75 * ||T||_est``: its
    Krylov space is invariant and its ``j + 1`` Ritz values are eigenvalues.
    """
    num, dim = start.shape
    dtype, device = start.dtype, start.device
    breakdown_tol = torch.finfo(dtype).eps ** 0.75
    tiny = torch.finfo(dtype).tiny
    alphas = torch.zeros(num, num_steps, dtype=dtype, device=device)
    betas = torch.zeros(num, num_steps, dtype=dtype, device=device)
    steps = torch.zeros(num, dtype=torch.int64, device=device)
    anorm = torch.zeros(num, dtype=dtype, device=device)
    basis = (
        torch.empty(num, num_steps, dim, dtype=dtype, device=device) if reorthogonalize else None
    )
    q = start.clone()
    q_prev = torch.zeros_like(q)
    beta_prev = torch.zeros(num, dtype=dtype, device=device)
    active = torch.ones(num, dtype=torch.bool, device=device)
    matvecs = 0
    for j in progress_bar(range(num_steps), enabled=progress, desc="Lanczos steps"):
        rows = active.nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        full = rows.numel() == num
        qa = q if full else q[rows]
        w = _apply(matmat, qa)
        matvecs += qa.shape[0]
        alpha = (w * qa).sum(-1)
        w = w - alpha[:, None] * qa - beta_prev[rows, None] * (q_prev if full else q_prev[rows])
        if basis is not None:
            basis[rows, j] = qa
            prev = basis[:, : j + 1] if full else basis[rows, : j + 1]
            for _ in range(2):  # twice is enough (Kahan-Parlett)
                w = w - torch.bmm((torch.bmm(prev, w[:, :, None])).transpose(1, 2), prev)[:, 0]
        beta = w.norm(dim=-1)
        alphas[rows, j] = alpha
        betas[rows, j] = beta
        steps[rows] = j + 1
        anorm[rows] = torch.maximum(anorm[rows], torch.maximum(alpha.abs(), beta))
        broke = beta <= breakdown_tol * anorm[rows].clamp_min(tiny)
        betas[rows[broke], j] = 0.0
        active[rows[broke]] = False
        q_prev[rows] = qa
        q[rows] = w / torch.where(broke, torch.ones_like(beta), beta)[:, None]
        beta_prev[rows] = beta
    return alphas, betas, steps, matvecs


def _quadrature(
    alphas: Tensor, betas: Tensor, steps: Tensor, num_steps: int
) -> tuple[Tensor, Tensor]:
    """Nodes and weights from the tridiagonal matrices, padded to ``num_steps`` columns."""
    num = alphas.shape[0]
    nodes = torch.zeros(num, num_steps, dtype=torch.float64, device=alphas.device)
    weights = torch.zeros_like(nodes)
    for k in sorted(set(steps.tolist())):
        rows = (steps == k).nonzero().squeeze(1)
        a = alphas[rows, :k].to(torch.float64)
        b = betas[rows, : k - 1].to(torch.float64)
        T = torch.diag_embed(a) + torch.diag_embed(b, 1) + torch.diag_embed(b, -1)
        theta, S = torch.linalg.eigh(T)
        nodes[rows, :k] = theta
        weights[rows, :k] = S[:, 0, :] ** 2
        if k < num_steps:
            nodes[rows, k:] = theta[:, -1:]
    return nodes, weights


def stochastic_lanczos_quadrature(
    matmat: Matmat,
    dim: int,
    num_steps: int = 50,
    num_probes: int = 10,
    *,
    distribution: str = "rademacher",
    start: Tensor | None = None,
    reorthogonalize: bool = True,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
) -> SpectralDensity:
    r"""Spectral density of a symmetric matrix by stochastic Lanczos quadrature.

    Runs ``m = min(num_steps, dim)`` Lanczos steps from each of ``num_probes``
    random unit vectors and returns, per probe, the Gauss quadrature rule of
    :math:`T_m` (module doc): nodes :math:`\theta_j` (Ritz values) and weights
    :math:`\tau_j` (squared first components of the eigenvectors of
    :math:`T_m`).  The recurrences of ``chunk_size`` probes run together: one
    call of ``matmat`` per step on a ``(chunk_size, n)`` batch.  With
    ``reorthogonalize`` each new Lanczos vector is orthogonalised twice against
    all previous ones of its probe (no spurious copies of converged
    eigenvalues); memory is about ``chunk_size * m`` vectors of length ``n``.  When a
    probe's recurrence breaks down (:math:`\beta_j \approx 0`: its Krylov space
    is invariant under :math:`A`, so its Ritz values are exact eigenvalues and
    its quadrature exact for every :math:`f`), that probe stops; its weights
    still sum to 1.

    Cost: ``num_probes * m`` products (fewer after breakdowns), plus
    :math:`O(\text{num\_probes}\cdot m^2 n)` for the reorthogonalisation.

    Args:
        matmat: ``V -> V A`` on ``(k, n)`` batches, ``A`` symmetric.
        dim: ``n``.
        num_steps: Lanczos steps ``m`` per probe (capped at ``dim``).  The rule
            integrates polynomials of degree up to ``2m - 1`` exactly.
        num_probes: Number of random start vectors.
        distribution: ``"rademacher"`` or ``"gaussian"`` start vectors, then
            normalised (both have :math:`E[v v^\top] = I / n`).
        start: Optional ``(num_probes, n)`` start vectors (each row is
            normalised); overrides ``distribution`` and ``generator``.
        reorthogonalize: Full reorthogonalisation (recommended).
        generator: Source of the start vectors (``None``: the global RNG).
        dtype: Dtype of the recurrence (default: ``start``'s, else torch's
            default).  Nodes and weights are computed from :math:`T_m` in float64
            and returned in this dtype.
        device: Device (default: ``start``'s, else the generator's, else CPU).
        chunk_size: Probes per batch of recurrences (``None``: the chunk policy
            of ``device``, :mod:`torch_secorder._chunks`, for vectors of
            ``n * (m + 1)`` entries: one probe's basis and product; on the CPU
            about :math:`2^{24} / (n (m + 1))` probes).  Memory: ``chunk_size``
            products plus ``chunk_size * (m + 3)`` vectors of length ``n`` (``3``
            without reorthogonalisation).  Each
            probe's recurrence is its own, so the result does not depend on it
            beyond the rounding of the products.
        progress: Show a progress bar over the Lanczos steps of long runs.

    Returns:
        A :class:`SpectralDensity`.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([1.0, 1.0, 2.0, 5.0], dtype=torch.float64))
        >>> g = torch.Generator().manual_seed(0)
        >>> res = stochastic_lanczos_quadrature(
        ...     lambda V: V @ A, 4, num_steps=4, num_probes=3, generator=g, dtype=torch.float64)
        >>> res.steps.tolist()          # three distinct eigenvalues: breakdown after 3 steps
        [3, 3, 3]
        >>> [round(float(t), 10) for t in res.nodes[0, :3]]
        [1.0, 2.0, 5.0]
        >>> [round(float(t), 10) for t in res.weights[0]]   # last column: padding
        [0.5, 0.25, 0.25, 0.0]
        >>> float(res.trace_estimate().estimate)      # exact after breakdown
        9.0
        >>> grid = res.grid(2000)
        >>> round(float(torch.trapezoid(res.density(grid), grid)), 6)
        1.0
    """
    check_generator(generator, device)
    if not callable(matmat):
        raise TypeError(f"matmat must be callable, got {type(matmat).__name__}")
    dim = _check_positive_int(dim, "dim")
    num_steps = _check_positive_int(num_steps, "num_steps")
    num_probes = _check_positive_int(num_probes, "num_probes")
    if chunk_size is not None:
        chunk_size = _check_positive_int(chunk_size, "chunk_size")
    if distribution not in START_DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {START_DISTRIBUTIONS}, got {distribution!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if start is not None:
        if not isinstance(start, Tensor):
            raise TypeError(f"start must be a tensor, got {type(start).__name__}")
        if start.shape != (num_probes, dim):
            raise ValueError(
                f"start must have shape (num_probes, dim) = ({num_probes}, {dim}), "
                f"got {tuple(start.shape)}"
            )
        dtype = dtype or (start.dtype if start.is_floating_point() else None)
        device = device if device is not None else start.device
    dtype = dtype or torch.get_default_dtype()
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    m = min(num_steps, dim)

    if start is not None:
        vectors = start.to(dtype=dtype, device=device)
        norms = vectors.norm(dim=1)
        if not bool((norms > 0).all()) or not bool(torch.isfinite(norms).all()):
            raise ValueError("start must have nonzero, finite rows")
    elif distribution == "gaussian":
        vectors = torch.randn(num_probes, dim, generator=generator, dtype=dtype, device=device)
        norms = vectors.norm(dim=1)
    else:
        bits = torch.randint(0, 2, (num_probes, dim), generator=generator, device=device)
        vectors = bits.to(dtype) * 2 - 1
        norms = torch.full((num_probes,), math.sqrt(dim), dtype=dtype, device=device)
    vectors = vectors / norms[:, None]

    alphas, betas, steps, matvecs = [], [], [], 0
    # one probe holds its m basis vectors (with reorthogonalisation) and a product
    entries_per_probe = dim * (m + 1 if reorthogonalize else 1)
    for lo, hi in schedule(num_probes, chunk_size, device, entries_per_probe):
        a, b, s, mv = _lanczos_batch(matmat, vectors[lo:hi], m, reorthogonalize, progress)
        alphas.append(a)
        betas.append(b)
        steps.append(s)
        matvecs += mv
    steps_all = torch.cat(steps)
    nodes, weights = _quadrature(torch.cat(alphas), torch.cat(betas), steps_all, m)
    return SpectralDensity(nodes.to(dtype), weights.to(dtype), steps_all, matvecs, dim)
