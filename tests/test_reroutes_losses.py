"""Losses through the operator fixes: exact second derivatives of the losses of ``F``.

torch 2.13 has no forward-mode AD for the backward of ``F.huber_loss`` and
``F.soft_margin_loss``, no double backward at all for ``F.multi_margin_loss`` and
``F.multilabel_margin_loss``, and a double backward of ``F.binary_cross_entropy``
that adds ``1e-12`` to a denominator (second derivatives up to ``1e-8`` relative
off).  ``func/_fixes.py`` reroutes these five to compositions; the other losses are
checked here as they are.

For each loss and configuration (reductions, weights, ``delta``/``beta``, ``p``,
``margin``, label smoothing, probability targets, ...), a reference written here
from the loss's definition, independently of the reroute, is first checked to equal
torch's forward value; the dense float64 Hessian of the reference is then the oracle
for ``model_hvp`` (each strategy), ``exact_hvp``, ``model_hessian_diagonal`` (the
fast diagonal), ``func.fast_hessian_diagonal``, the exact ``hessian_trace``
(closure) and ``model_hessian_trace``, and ``gauss_newton_product`` against
:math:`J^\\top H_{\\text{out}} J` of the reference.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPE, dense_hessian
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call

from torch_secorder import func as engine
from torch_secorder.core.hessian_diagonal import model_hessian_diagonal
from torch_secorder.core.hessian_trace import hessian_trace, model_hessian_trace
from torch_secorder.core.hvp import exact_hvp, gauss_newton_product, model_hvp
from torch_secorder.func._fixes import DifferentiableOpsMode

TOL = 1e-10

pytestmark = pytest.mark.filterwarnings("ignore:reduction. .mean. divides the total loss")
N, D_IN, HIDDEN, C = 5, 3, 4, 3


def reduce(loss: Tensor, reduction: str) -> Tensor:
    return {"mean": loss.mean, "sum": loss.sum}.get(reduction, lambda: loss)()


def log_sigmoid(z: Tensor) -> Tensor:
    """``log(sigmoid(z)) = -log(1 + exp(-z))``, written with ``logaddexp``."""
    return -torch.logaddexp(torch.zeros_like(z), -z)


# ------------------------------------------------------------------- references


def ref_huber(o, y, reduction, delta, weight=None):
    size = (o - y).abs()
    inner = size.clamp(max=delta)
    loss = 0.5 * inner**2 + delta * (size - inner)
    return reduce(loss if weight is None else loss * weight, reduction)


def ref_soft_margin(o, y, reduction):
    return reduce(torch.logaddexp(torch.zeros_like(o), -y * o), reduction)


def ref_bce_of_logits(o, y, reduction, weight=None, pos_weight=None):
    pos = y if pos_weight is None else pos_weight * y
    loss = -(pos * log_sigmoid(o) + (1 - y) * log_sigmoid(-o))
    return reduce(loss if weight is None else loss * weight, reduction)


def ref_multi_margin(o, y, reduction, p, margin, weight=None):
    onehot = F.one_hot(y, C).to(o.dtype)
    score = (o * onehot).sum(1, keepdim=True)
    z = (margin - score + o).clamp(min=0) ** p * (1 - onehot)
    if weight is not None:
        z = z * (onehot @ weight).unsqueeze(1)
    return reduce(z.sum(1) / C, reduction)


def ref_multilabel_margin(o, y, reduction):
    rows = []
    for n in range(o.shape[0]):
        labels = []
        for label in y[n].tolist():
            if label < 0:
                break
            labels.append(label)
        others = [k for k in range(C) if k not in labels]
        terms = [(1 - (o[n, j] - o[n, k])).clamp(min=0) for j in labels for k in others]
        rows.append(torch.stack(terms).sum() / C if terms else o[n].sum() * 0)
    return reduce(torch.stack(rows), reduction)


def ref_kl(o, y, reduction, log_target):
    logp = o - torch.logsumexp(o, 1, keepdim=True)
    loss = torch.exp(y) * (y - logp) if log_target else y * (torch.log(y) - logp)
    if reduction == "batchmean":
        return loss.sum() / o.shape[0]
    return reduce(loss, reduction)


def ref_gaussian_nll(o, y, reduction, full):
    mean, log_var = o[:, :2], o[:, 2:]
    loss = 0.5 * (log_var + (mean - y[:, :2]) ** 2 * torch.exp(-log_var))
    if full:
        loss = loss + 0.5 * math.log(2 * math.pi)
    return reduce(loss, reduction)


def ref_poisson_nll(o, y, reduction, log_input, full):
    loss = torch.exp(o) - y * o if log_input else o * o - y * torch.log(o * o + 1e-8)
    if full:
        stirling = y * torch.log(y) - y + 0.5 * torch.log(2 * math.pi * y)
        loss = loss + torch.where(y > 1, stirling, torch.zeros_like(y))
    return reduce(loss, reduction)


def ref_cross_entropy(o, y, reduction, weight=None, smoothing=0.0, ignore=None):
    """Class-index or probability targets, class weights, label smoothing, ignore_index."""
    logp = o - torch.logsumexp(o, 1, keepdim=True)
    w = torch.ones(C, dtype=o.dtype) if weight is None else weight
    if y.dtype.is_floating_point:
        q = (1 - smoothing) * y + smoothing / C
        loss = -(q * w * logp).sum(1)
        return reduce(loss, reduction)
    keep = torch.ones(y.shape, dtype=o.dtype) if ignore is None else (y != ignore).to(o.dtype)
    safe = torch.where(y == ignore, torch.zeros_like(y), y) if ignore is not None else y
    onehot = F.one_hot(safe, C).to(o.dtype)
    nll = -(onehot * w * logp).sum(1) * keep
    smooth = -(w * logp).sum(1) * keep / C
    loss = (1 - smoothing) * nll + smoothing * smooth
    if reduction == "mean":
        return loss.sum() / ((onehot @ w) * keep).sum()
    return reduce(loss, reduction)


# ---------------------------------------------------------------------- cases


@dataclass
class Case:
    """``loss(out, y)`` as the user writes it, its reference, and the kind of target."""

    name: str
    loss: Callable[[Tensor, Tensor], Tensor]
    reference: Callable[[Tensor, Tensor], Tensor]
    target: str

    def __repr__(self) -> str:
        return self.name


W = torch.tensor([0.4, 1.7, 0.9], dtype=DTYPE)  # per-class weights
W_ELEM = (torch.arange(N * C, dtype=DTYPE).reshape(N, C) % 4 + 1) / 3  # elementwise weights


def _cases() -> list[Case]:
    cases = []
    for r in ("mean", "sum"):
        for d in (0.3, 1.0, 2.5):
            cases.append(
                Case(
                    f"huber-{r}-delta{d}",
                    lambda o, y, r=r, d=d: F.huber_loss(o, y, reduction=r, delta=d),
                    lambda o, y, r=r, d=d: ref_huber(o, y, r, d),
                    "real",
                )
            )
            cases.append(
                Case(
                    f"smooth_l1-{r}-beta{d}",
                    lambda o, y, r=r, d=d: F.smooth_l1_loss(o, y, reduction=r, beta=d),
                    lambda o, y, r=r, d=d: ref_huber(o, y, r, d) / d,
                    "real",
                )
            )
        cases += [
            Case(
                f"huber-{r}-weighted",
                lambda o, y, r=r: F.huber_loss(o, y, reduction=r, delta=0.7, weight=W_ELEM),
                lambda o, y, r=r: ref_huber(o, y, r, 0.7, W_ELEM),
                "real",
            ),
            Case(
                f"l1-{r}",
                lambda o, y, r=r: F.l1_loss(o, y, reduction=r),
                lambda o, y, r=r: reduce((o - y).abs(), r),
                "real",
            ),
            Case(
                f"soft_margin-{r}",
                lambda o, y, r=r: F.soft_margin_loss(o, y, reduction=r),
                lambda o, y, r=r: ref_soft_margin(o, y, r),
                "sign",
            ),
            Case(
                f"bce-{r}",
                lambda o, y, r=r: F.binary_cross_entropy(torch.sigmoid(o), y, reduction=r),
                lambda o, y, r=r: ref_bce_of_logits(o, y, r),
                "prob",
            ),
            Case(
                f"bce-{r}-weighted",
                lambda o, y, r=r: F.binary_cross_entropy(torch.sigmoid(o), y, W, reduction=r),
                lambda o, y, r=r: ref_bce_of_logits(o, y, r, W),
                "prob",
            ),
            Case(
                f"bce_logits-{r}-pos_weight",
                lambda o, y, r=r: F.binary_cross_entropy_with_logits(
                    o, y, W_ELEM, reduction=r, pos_weight=W
                ),
                lambda o, y, r=r: ref_bce_of_logits(o, y, r, W_ELEM, W),
                "prob",
            ),
            Case(
                f"gaussian_nll-{r}",
                lambda o, y, r=r: F.gaussian_nll_loss(
                    o[:, :2], y[:, :2], torch.exp(o[:, 2:]), reduction=r
                ),
                lambda o, y, r=r: ref_gaussian_nll(o, y, r, False),
                "real",
            ),
            Case(
                f"gaussian_nll-{r}-full",
                lambda o, y, r=r: F.gaussian_nll_loss(
                    o[:, :2], y[:, :2], torch.exp(o[:, 2:]), full=True, reduction=r
                ),
                lambda o, y, r=r: ref_gaussian_nll(o, y, r, True),
                "real",
            ),
            Case(
                f"poisson_nll-{r}",
                lambda o, y, r=r: F.poisson_nll_loss(o, y, reduction=r),
                lambda o, y, r=r: ref_poisson_nll(o, y, r, True, False),
                "count",
            ),
            Case(
                f"poisson_nll-{r}-rate-full",
                lambda o, y, r=r: F.poisson_nll_loss(o * o, y, False, True, reduction=r),
                lambda o, y, r=r: ref_poisson_nll(o, y, r, False, True),
                "count",
            ),
            Case(
                f"nll-{r}-weighted-ignore",
                lambda o, y, r=r: F.nll_loss(
                    F.log_softmax(o, 1), y, W, ignore_index=2, reduction=r
                ),
                lambda o, y, r=r: ref_cross_entropy(o, y, r, W, ignore=2),
                "class",
            ),
            Case(
                f"ce-{r}-smoothing",
                lambda o, y, r=r: F.cross_entropy(o, y, reduction=r, label_smoothing=0.15),
                lambda o, y, r=r: ref_cross_entropy(o, y, r, smoothing=0.15),
                "class",
            ),
            Case(
                f"ce-{r}-weighted-smoothing-ignore",
                lambda o, y, r=r: F.cross_entropy(
                    o, y, W, ignore_index=1, reduction=r, label_smoothing=0.3
                ),
                lambda o, y, r=r: ref_cross_entropy(o, y, r, W, 0.3, ignore=1),
                "class",
            ),
            Case(
                f"ce-{r}-probabilities-weighted-smoothing",
                lambda o, y, r=r: F.cross_entropy(o, y, W, reduction=r, label_smoothing=0.2),
                lambda o, y, r=r: ref_cross_entropy(o, y, r, W, 0.2),
                "dist",
            ),
            Case(
                f"multilabel_margin-{r}",
                lambda o, y, r=r: F.multilabel_margin_loss(o, y, reduction=r),
                lambda o, y, r=r: ref_multilabel_margin(o, y, r),
                "labels",
            ),
        ]
        for p in (1, 2):
            cases.append(
                Case(
                    f"multi_margin-{r}-p{p}-weighted",
                    lambda o, y, r=r, p=p: F.multi_margin_loss(
                        o, y, p=p, margin=1.5, weight=W, reduction=r
                    ),
                    lambda o, y, r=r, p=p: ref_multi_margin(o, y, r, p, 1.5, W),
                    "class",
                )
            )
    for r in ("mean", "sum", "batchmean"):
        for log_target in (False, True):
            cases.append(
                Case(
                    f"kl_div-{r}-log_target{log_target}",
                    lambda o, y, r=r, lt=log_target: F.kl_div(
                        F.log_softmax(o, 1), y.log() if lt else y, reduction=r, log_target=lt
                    ),
                    lambda o, y, r=r, lt=log_target: ref_kl(o, y.log() if lt else y, r, lt),
                    "dist",
                )
            )
    return cases


CASES = _cases()


def targets(kind: str, g: torch.Generator) -> Tensor:
    if kind == "real":
        return 1.5 * torch.randn(N, C, generator=g, dtype=DTYPE)
    if kind == "sign":
        return torch.randint(0, 2, (N, C), generator=g).to(DTYPE) * 2 - 1
    if kind == "prob":
        return torch.rand(N, C, generator=g, dtype=DTYPE)
    if kind == "count":
        return torch.randint(0, 5, (N, C), generator=g).to(DTYPE)
    if kind == "class":
        return torch.randint(0, C, (N,), generator=g)
    if kind == "dist":
        return torch.softmax(torch.randn(N, C, generator=g, dtype=DTYPE), 1)
    # "labels": each row lists 0 to C-1 distinct classes, then -1s
    rows = []
    for _ in range(N):
        count = int(torch.randint(0, C, (1,), generator=g))
        labels = torch.randperm(C, generator=g)[:count].tolist()
        rows.append(labels + [-1] * (C - count))
    return torch.tensor(rows)


def problem(case: Case, seed: int):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, C)).to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DTYPE))
    x = torch.randn(N, D_IN, generator=g, dtype=DTYPE)
    return model, x, targets(case.target, g)


def flat(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def reference_hessian(model, x, y, reference) -> Tensor:
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    return dense_hessian(
        lambda values: reference(functional_call(model, dict(zip(names, values)), (x,)), y),
        params,
    )


seeds = st.integers(0, 2**20)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_reference_equals_torch_forward(case):
    """The oracle's function is the user's loss: equal values (and the reroute's too)."""
    for seed in range(3):
        model, x, y = problem(case, seed)
        out = model(x).detach()
        expected = case.loss(out, y)
        torch.testing.assert_close(case.reference(out, y), expected, rtol=1e-13, atol=1e-13)
        with DifferentiableOpsMode():
            rerouted = case.loss(out, y)
        torch.testing.assert_close(rerouted, expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("case", CASES, ids=repr)
@settings(max_examples=1, deadline=None)
@given(seed=seeds)
def test_hvp_diagonal_trace_against_reference(case, seed):
    model, x, y = problem(case, seed)
    H = reference_hessian(model, x, y, case.reference)
    params = list(model.parameters())
    g = torch.Generator().manual_seed(seed + 1)
    v = [torch.randn(p.shape, generator=g, dtype=DTYPE) for p in params]
    expected = H @ flat(v)
    for strategy in ("auto", "vmap", "graph"):
        got = model_hvp(model, case.loss, x, y, v, strategy=strategy)
        torch.testing.assert_close(flat(got), expected, rtol=TOL, atol=TOL)

    def closure():
        return case.loss(model(x), y)

    torch.testing.assert_close(flat(exact_hvp(closure, params, v)), expected, rtol=TOL, atol=TOL)
    diag = H.diagonal()
    torch.testing.assert_close(
        flat(model_hessian_diagonal(model, case.loss, x, y)), diag, rtol=TOL, atol=TOL
    )
    names = [n for n, _ in model.named_parameters()]
    point = {n: p.detach() for n, p in model.named_parameters()}
    fast = engine.fast_hessian_diagonal(
        lambda ps: case.loss(functional_call(model, ps, (x,)), y), point
    )
    torch.testing.assert_close(flat([fast[n] for n in names]), diag, rtol=TOL, atol=TOL)
    trace = H.trace()
    torch.testing.assert_close(hessian_trace(closure, params), trace, rtol=TOL, atol=TOL)
    torch.testing.assert_close(
        model_hessian_trace(model, case.loss, x, y), trace, rtol=TOL, atol=TOL
    )


@pytest.mark.parametrize("case", CASES, ids=repr)
@settings(max_examples=1, deadline=None)
@given(seed=seeds)
def test_gauss_newton_product_against_reference(case, seed):
    model, x, y = problem(case, seed)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    sizes = [p.numel() for p in params]

    def output(theta):
        values = [t.reshape(p.shape) for t, p in zip(theta.split(sizes), params, strict=True)]
        return functional_call(model, dict(zip(names, values)), (x,))

    theta = flat(params)
    out = output(theta).detach()
    J = torch.func.jacrev(output)(theta).reshape(out.numel(), -1)
    H_out = torch.func.hessian(lambda o: case.reference(o.reshape(out.shape), y))(out.reshape(-1))
    g = torch.Generator().manual_seed(seed + 2)
    v = [torch.randn(p.shape, generator=g, dtype=DTYPE) for p in params]
    got = gauss_newton_product(model, case.loss, x, y, v)
    torch.testing.assert_close(flat(got), J.T @ (H_out @ (J @ flat(v))), rtol=TOL, atol=TOL)


def test_huber_module_and_unreduced_losses():
    """``nn.HuberLoss`` goes through ``F.huber_loss``; ``reduction="none"`` keeps the shape."""
    model, x, y = problem(CASES[0], 0)
    H = reference_hessian(model, x, y, lambda o, t: ref_huber(o, t, "mean", 0.6))
    got = model_hessian_diagonal(model, nn.HuberLoss(delta=0.6), x, y)
    torch.testing.assert_close(flat(got), H.diagonal(), rtol=TOL, atol=TOL)
    out = model(x).detach()
    with DifferentiableOpsMode():
        pairs = [
            (F.huber_loss(out, y, reduction="none", delta=0.6), ref_huber(out, y, "none", 0.6)),
            (F.soft_margin_loss(out, y.sign(), reduction="none"), None),
            (F.binary_cross_entropy(torch.sigmoid(out), y.sigmoid(), reduction="none"), None),
            (F.multi_margin_loss(out, y.argmax(1), reduction="none"), None),
        ]
    natives = [
        F.huber_loss(out, y, reduction="none", delta=0.6),
        F.soft_margin_loss(out, y.sign(), reduction="none"),
        F.binary_cross_entropy(torch.sigmoid(out), y.sigmoid(), reduction="none"),
        F.multi_margin_loss(out, y.argmax(1), reduction="none"),
    ]
    for (rerouted, ref), native in zip(pairs, natives, strict=True):
        assert rerouted.shape == native.shape
        torch.testing.assert_close(rerouted, native, rtol=1e-14, atol=1e-14)
        if ref is not None:
            torch.testing.assert_close(ref, native, rtol=1e-14, atol=1e-14)


def test_single_sample_forms():
    """1-dim inputs of the margin losses, as torch accepts them."""
    scores = torch.tensor([0.3, -1.2, 0.8], dtype=DTYPE)
    with DifferentiableOpsMode():
        for reduction in ("mean", "sum", "none"):
            got = F.multi_margin_loss(scores, torch.tensor(1), p=2, reduction=reduction)
            want = torch._C._nn.multi_margin_loss(
                scores, torch.tensor(1), 2, 1.0, None, {"none": 0, "mean": 1, "sum": 2}[reduction]
            )
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
            labels = torch.tensor([2, 0, -1])
            got = F.multilabel_margin_loss(scores, labels, reduction=reduction)
            want = torch._C._nn.multilabel_margin_loss(
                scores, labels, {"none": 0, "mean": 1, "sum": 2}[reduction]
            )
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


def test_rerouted_losses_keep_torchs_errors():
    out = torch.randn(2, 3, dtype=DTYPE)
    with DifferentiableOpsMode():
        with pytest.raises(RuntimeError, match="between 0 and 1"):
            F.binary_cross_entropy(out, torch.rand(2, 3, dtype=DTYPE))
        with pytest.raises(ValueError, match="target size"):
            F.binary_cross_entropy(out.sigmoid(), torch.rand(3, dtype=DTYPE))
        with pytest.raises(RuntimeError, match="delta"):
            F.huber_loss(out, out, delta=0.0)
        with pytest.raises(ValueError, match="not a valid value for reduction"):
            F.huber_loss(out, out, reduction="avg")
        with pytest.raises(ValueError, match="only p == 1 and p == 2"):
            F.multi_margin_loss(out, torch.tensor([0, 1]), p=3)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(UserWarning, match="target size"):
                F.huber_loss(out, out[0])


def test_binary_cross_entropy_torch_own_second_derivative_is_off():
    """The reason for the BCE reroute: torch's double backward against the exact s(1 - s)."""
    z = torch.linspace(-8, 8, 9, dtype=DTYPE)
    y = torch.full_like(z, 0.3)
    exact = torch.sigmoid(z) * (1 - torch.sigmoid(z))

    def loss(t):
        return F.binary_cross_entropy(torch.sigmoid(t), y, reduction="sum")

    native = torch.autograd.functional.hessian(loss, z).diagonal()
    assert ((native - exact).abs() / exact).max() > 1e-8
    with DifferentiableOpsMode():
        rerouted = torch.func.hessian(loss)(z).diagonal()
    torch.testing.assert_close(rerouted, exact, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binary_cross_entropy_at_zero_and_one(dtype):
    """Probabilities of exactly 0 and 1 (a saturated sigmoid): torch's clamped values, and
    finite derivatives: those of the clamped function (zero where the clamp holds)."""
    p = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.25], dtype=dtype)
    y = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.6], dtype=dtype)

    def loss(t):
        return F.binary_cross_entropy(t, y, reduction="sum")

    with DifferentiableOpsMode():
        values = F.binary_cross_entropy(p, y, reduction="none")
        g = torch.func.grad(loss)(p)
        h = torch.func.jacfwd(torch.func.grad(loss))(p)
    torch.testing.assert_close(values, F.binary_cross_entropy(p, y, reduction="none"))
    # Unclamped terms: d/dp = -y/p + (1-y)/(1-p), d2/dp2 = y/p^2 + (1-y)/(1-p)^2.
    expected_g = torch.tensor([1.0, 0.0, 0.0, -1.0, -0.6 / 0.25 + 0.4 / 0.75], dtype=dtype)
    expected_h = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.6 / 0.0625 + 0.4 / 0.5625], dtype=dtype)
    torch.testing.assert_close(g, expected_g)
    torch.testing.assert_close(h, torch.diag(expected_h))
