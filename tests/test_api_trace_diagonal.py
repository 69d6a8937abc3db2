"""The documented API: ``core.hessian_trace``, ``core.hessian_diagonal``, ``core.hvp``.

Checked against the dense float64 oracle (``conftest.dense_hessian``) at 1e-10: closures
and models (MLPs with MSE and cross-entropy, transformer blocks with the default
``scaled_dot_product_attention``, batch norm in train and eval mode, dropout), third
derivatives through ``create_graph=True``, ``strict``, the ``num_samples >= n`` rule, the
three product strategies; that nothing of the user's state changes, also when a call
raises; and that every bad input gets an error that names the problem.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DTYPE,
    Problem,
    cubic_problems,
    dense_hessian,
    make_mlp,
    mlp_problems,
    smooth_problems,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from torch_secorder.core import hvp as core_hvp
from torch_secorder.core.hessian_diagonal import hessian_diagonal, model_hessian_diagonal
from torch_secorder.core.hessian_trace import (
    hessian_trace,
    hessian_trace_estimate,
    model_hessian_trace,
    model_hessian_trace_estimate,
)
from torch_secorder.core.hvp import exact_hvp, model_hvp
from torch_secorder.linalg.probes import draw_probes

EXAMPLES = settings(max_examples=10, deadline=None)
STRATEGIES = ("vmap", "graph", "graph_batched")
seeds = st.integers(0, 2**31 - 1)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def split_like(vector: torch.Tensor, like) -> list[torch.Tensor]:
    pieces = torch.split(vector, [t.numel() for t in like])
    return [p.reshape(t.shape) for p, t in zip(pieces, like, strict=True)]


def close(actual, expected, tol: float = 1e-10) -> None:
    if isinstance(actual, (list, tuple)):
        assert isinstance(expected, (list, tuple)) and len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            close(a, e, tol)
        return
    torch.testing.assert_close(
        actual.detach(), torch.as_tensor(expected, dtype=actual.dtype), rtol=tol, atol=tol
    )


def module_hessian(model: nn.Module, loss_fn, inputs, targets) -> torch.Tensor:
    """Dense Hessian of ``loss_fn(model(inputs), targets)`` in ``model.parameters()`` order."""
    names = [n for n, _ in model.named_parameters()]
    values = [p.detach() for _, p in model.named_parameters()]
    args = inputs if isinstance(inputs, tuple) else (inputs,)

    def f(vals):
        return loss_fn(functional_call(model, dict(zip(names, vals, strict=True)), args), targets)

    return dense_hessian(f, values)


def quadratic_forms(H: torch.Tensor, num: int, seed: int) -> torch.Tensor:
    """``v_j^T H v_j`` for the Rademacher probes of ``Generator().manual_seed(seed)``."""
    V = draw_probes(num, H.shape[0], generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return ((V @ H) * V).sum(-1)


# ------------------------------------------------------------- closures vs oracle


@EXAMPLES
@given(smooth_problems(), st.sampled_from([None, 1, 3]))
def test_exact_trace_and_diagonal_match_the_oracle(problem, chunk_size):
    H = problem.list_hessian()
    func, tensors = problem.closure()
    trace = hessian_trace(func, tensors, chunk_size=chunk_size, progress=False)
    assert trace.shape == () and not trace.requires_grad
    close(trace, torch.trace(H))
    diag = hessian_diagonal(func, tensors, chunk_size=chunk_size, progress=False)
    assert isinstance(diag, list)
    close(diag, split_like(torch.diagonal(H), tensors))


@EXAMPLES
@given(smooth_problems(), seeds)
def test_diagonal_with_v_is_v_times_the_diagonal(problem, seed):
    H = problem.list_hessian()
    func, tensors = problem.closure()
    v = problem.random_vector(seed)
    result = hessian_diagonal(func, tensors, v, progress=False)
    close(result, split_like(torch.diagonal(H) * flat(v), tensors))


@EXAMPLES
@given(smooth_problems(), seeds, st.sampled_from(STRATEGIES))
def test_exact_hvp_matches_the_oracle_for_every_strategy(problem, seed, strategy):
    H = problem.list_hessian()
    func, tensors = problem.closure()
    v = problem.random_vector(seed)
    result = exact_hvp(func, tensors, v, strategy=strategy)
    expected = split_like(H @ flat(v), tensors)
    if len(tensors) == 1:
        close(result, expected[0])
    else:
        close(result, expected)


def test_exact_hvp_single_tensor_in_single_tensor_out():
    x = torch.tensor([1.0, -2.0, 0.5], dtype=DTYPE, requires_grad=True)
    result = exact_hvp(lambda: (x**3).sum() + x.prod(), x, torch.ones(3, dtype=DTYPE))
    assert isinstance(result, torch.Tensor)
    H = dense_hessian(lambda z: (z**3).sum() + z.prod(), x)
    close(result, H @ torch.ones(3, dtype=DTYPE))


@EXAMPLES
@given(smooth_problems(max_n=7), st.integers(0, 4))
def test_num_samples_at_least_n_gives_the_exact_trace(problem, extra):
    H = problem.list_hessian()
    func, tensors = problem.closure()
    est = hessian_trace_estimate(
        func,
        tensors,
        problem.n + extra,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    close(est.estimate, torch.trace(H))
    assert float(est.std_error) == 0.0


@EXAMPLES
@given(smooth_problems(), seeds)
def test_hutchinson_is_the_mean_of_quadratic_forms_and_strategies_agree(problem, seed):
    H = problem.list_hessian()
    func, tensors = problem.closure()
    m = max(1, problem.n - 1)
    expected = quadratic_forms(H, m, seed).mean() if m < problem.n else torch.trace(H)
    for strategy in STRATEGIES:
        for chunk_size in (None, 2):
            trace = hessian_trace(
                func,
                tensors,
                m,
                generator=torch.Generator().manual_seed(seed),
                strategy=strategy,
                chunk_size=chunk_size,
                progress=False,
            )
            close(trace, expected)


# --------------------------------------------------------------- third order


def third_order_oracle(problem: Problem) -> torch.Tensor:
    """:math:`\\nabla_x \\operatorname{tr} \\nabla^2 f(x)`, flat in list order, by torch.func."""
    like = problem.param_list()

    def trace_at(x):
        return torch.trace(torch.func.hessian(lambda z: problem.list_f(split_like(z, like)))(x))

    return torch.func.jacrev(trace_at)(flat(like))


@settings(max_examples=8, deadline=None)
@given(st.one_of(cubic_problems(max_n=6), mlp_problems(max_width=2)))
def test_create_graph_gives_the_derivative_of_the_exact_trace(problem):
    func, tensors = problem.closure()
    trace = hessian_trace(func, tensors, create_graph=True, progress=False)
    assert trace.requires_grad
    grads = torch.autograd.grad(trace, tensors, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors, strict=True)]
    expected = third_order_oracle(problem)
    close(flat(grads), expected)
    # The diagonal: its sum has the same derivative.
    diag = hessian_diagonal(func, tensors, create_graph=True, progress=False)
    grads = torch.autograd.grad(sum(d.sum() for d in diag), tensors, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors, strict=True)]
    close(flat(grads), expected)


@settings(max_examples=6, deadline=None)
@given(cubic_problems(min_n=3, max_n=6), seeds, st.sampled_from(STRATEGIES))
def test_create_graph_through_hutchinson_and_hvp(problem, seed, strategy):
    """Third derivatives of the cubic, contracted with probes: closed form."""
    c, u = problem.extra["c"], problem.extra["u"]
    func, tensors = problem.closure()
    m = problem.n - 1
    est = hessian_trace(
        func,
        tensors,
        m,
        create_graph=True,
        generator=torch.Generator().manual_seed(seed),
        strategy=strategy,
        progress=False,
    )
    grads = torch.autograd.grad(est, tensors)
    # d/dx v^T H(x) v = 6 c * v^2 + 6 u (u^T v)^2, with v^2 = 1 for Rademacher probes.
    V = draw_probes(m, problem.n, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    expected = 6 * c + 6 * u * ((V @ u) ** 2).mean()
    close(flat(grads), expected)
    w = problem.random_vector(seed)
    v = problem.random_vector(seed + 1)
    Hv = exact_hvp(func, tensors, v, create_graph=True, strategy=strategy)
    Hv = Hv if isinstance(Hv, list) else [Hv]
    grads = torch.autograd.grad(sum((a * b).sum() for a, b in zip(w, Hv, strict=True)), tensors)
    fw, fv = flat(w), flat(v)
    close(flat(grads), 6 * c * fw * fv + 6 * u * (u @ fw) * (u @ fv))


# ---------------------------------------------------------------------- strict


def strict_setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, generator=g, dtype=DTYPE, requires_grad=True)
    frozen = torch.randn(2, generator=g, dtype=DTYPE)  # does not require grad
    unused = torch.randn(2, generator=g, dtype=DTYPE, requires_grad=True)

    def func():
        return (x**3).sum() * frozen.sum() + torch.tanh(x).prod()

    return func, x, frozen, unused


STRICT_CALLS = {
    "trace": lambda f, p, strict: hessian_trace(f, p, strict=strict, progress=False),
    "hutchinson": lambda f, p, strict: hessian_trace(
        f, p, 2, strict=strict, generator=torch.Generator().manual_seed(0), progress=False
    ),
    "diagonal": lambda f, p, strict: hessian_diagonal(f, p, strict=strict, progress=False),
}


@pytest.mark.parametrize("name", list(STRICT_CALLS))
def test_strict_names_the_index_and_non_strict_gives_zeros(name):
    call = STRICT_CALLS[name]
    func, x, frozen, unused = strict_setup()
    cases = (
        ([x, frozen], 1, "require"),
        ([x, unused], 1, "not used"),
        ([unused, x], 0, "not used"),
    )
    for params, index, what in cases:
        with pytest.raises(ValueError, match=rf"params\[{index}\].*{what}"):
            call(func, params, True)
    H = dense_hessian(lambda z: (z**3).sum() * frozen.sum() + torch.tanh(z).prod(), x)
    result = call(func, [x, frozen, unused], False)
    if name == "diagonal":
        close(result, [torch.diagonal(H), torch.zeros(2), torch.zeros(2)])
    elif name == "trace":
        close(result, torch.trace(H))
    else:
        # Probes over the differentiated entries (x, then unused); unused has a zero block.
        H_active = torch.zeros(5, 5, dtype=DTYPE)
        H_active[:3, :3] = H
        close(result, quadratic_forms(H_active, 2, 0).mean())
    hv = exact_hvp(func, [x, frozen, unused], [torch.ones(3), torch.ones(2), torch.ones(2)])
    close(hv, [H @ torch.ones(3, dtype=DTYPE), torch.zeros(2), torch.zeros(2)])


def test_strict_model_names_the_parameter_index():
    model = make_mlp([3, 2, 2], "tanh", seed=0)
    model[0].bias.requires_grad_(False)
    x, y = torch.randn(4, 3, dtype=DTYPE), torch.randn(4, 2, dtype=DTYPE)
    for call in (
        lambda: model_hessian_trace(model, F.mse_loss, x, y, strict=True, progress=False),
        lambda: model_hessian_diagonal(model, F.mse_loss, x, y, strict=True, progress=False),
    ):
        with pytest.raises(ValueError, match=r"params\[1\]"):
            call()
    assert not model[0].bias.requires_grad
    diag = model_hessian_diagonal(model, F.mse_loss, x, y, progress=False)
    close(diag[1], torch.zeros(2))


# ------------------------------------------------------------------------ models


@EXAMPLES
@given(mlp_problems(), seeds)
def test_model_functions_match_the_oracle_on_mlps(problem, seed):
    model, loss_fn, x, y = problem.model, problem.loss_fn, problem.inputs, problem.targets
    H = problem.list_hessian()
    params = list(model.parameters())
    close(model_hessian_trace(model, loss_fn, x, y, progress=False), torch.trace(H))
    close(
        model_hessian_diagonal(model, loss_fn, x, y, progress=False),
        split_like(torch.diagonal(H), params),
    )
    v = problem.random_vector(seed)
    for strategy in STRATEGIES:
        close(
            model_hvp(model, loss_fn, x, y, v, strategy=strategy), split_like(H @ flat(v), params)
        )
    m = problem.n - 1
    est = model_hessian_trace_estimate(
        model, loss_fn, x, y, m, generator=torch.Generator().manual_seed(seed), progress=False
    )
    close(est.samples, quadratic_forms(H, m, seed))


class SDPABlock(nn.Module):
    """Self-attention calling ``F.scaled_dot_product_attention`` directly, then an MLP."""

    def __init__(self, d: int = 4, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm(x))


class MHABlock(nn.Module):
    """``nn.MultiheadAttention`` followed by a linear read-out."""

    def __init__(self, d: int = 4, heads: int = 2):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.head(out.mean(1))


def transformer_cases():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, dtype=DTYPE)
    encoder = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0, batch_first=True)
    return {
        "sdpa": (SDPABlock().to(DTYPE), x, torch.randn(2, 3, 4, dtype=DTYPE), F.mse_loss),
        "mha": (MHABlock().to(DTYPE), x, torch.tensor([0, 2]), F.cross_entropy),
        "encoder-train": (
            encoder.to(DTYPE).train(),
            x,
            torch.randn(2, 3, 4, dtype=DTYPE),
            F.mse_loss,
        ),
        "encoder-eval": (
            copy.deepcopy(encoder).to(DTYPE).eval(),
            x,
            torch.randn(2, 3, 4, dtype=DTYPE),
            F.mse_loss,
        ),
    }


@pytest.mark.parametrize("case", ["sdpa", "mha", "encoder-train", "encoder-eval"])
def test_transformers_work_under_the_default_attention(case):
    """Trace, diagonal, HVP and Hutchinson of attention models equal the dense Hessian
    computed under the math kernel; the user's code runs with the default kernel."""
    model, x, y, loss_fn = transformer_cases()[case]
    H = module_hessian(model, loss_fn, x, y)
    params = list(model.parameters())
    n = H.shape[0]
    close(model_hessian_trace(model, loss_fn, x, y, progress=False), torch.trace(H))
    close(
        model_hessian_diagonal(model, loss_fn, x, y, progress=False),
        split_like(torch.diagonal(H), params),
    )
    v = split_like(torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=DTYPE), params)
    for strategy in STRATEGIES:
        close(
            model_hvp(model, loss_fn, x, y, v, strategy=strategy), split_like(H @ flat(v), params)
        )
    est = model_hessian_trace_estimate(
        model,
        loss_fn,
        x,
        y,
        3,
        generator=torch.Generator().manual_seed(2),
        strategy="vmap",
        progress=False,
    )
    close(est.samples, quadratic_forms(H, 3, 2))


def bn_model() -> nn.Sequential:
    """Linear -> BatchNorm1d -> tanh -> Linear, float64, with non-trivial running statistics."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, dtype=DTYPE) * 2 + 1)
    assert int(model[1].num_batches_tracked) == 3
    return model


def no_running_stats(bn: nn.BatchNorm1d) -> None:
    """Make ``bn`` normalise with batch statistics and update nothing (an oracle's copy)."""
    bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    bn.track_running_stats = False


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batch_norm_uses_batch_statistics_in_train_and_running_statistics_in_eval(mode):
    model = getattr(bn_model(), mode)()
    x, y = torch.randn(6, 3, dtype=DTYPE), torch.randn(6, 2, dtype=DTYPE)
    oracle = copy.deepcopy(model)
    if mode == "train":
        # Batch statistics, no running-statistics update: the same numbers as training mode.
        no_running_stats(oracle[1])
    H = module_hessian(oracle, F.mse_loss, x, y)
    other = copy.deepcopy(model).train(mode == "eval")
    if mode == "eval":
        no_running_stats(other[1])
    assert not torch.allclose(H, module_hessian(other, F.mse_loss, x, y)), "modes must differ"
    buffers = [b.clone() for b in model.buffers()]
    params = list(model.parameters())
    close(model_hessian_trace(model, F.mse_loss, x, y, progress=False), torch.trace(H))
    close(
        model_hessian_diagonal(model, F.mse_loss, x, y, progress=False),
        split_like(torch.diagonal(H), params),
    )
    v = split_like(torch.randn(H.shape[0], dtype=DTYPE), params)
    for strategy in STRATEGIES:
        close(
            model_hvp(model, F.mse_loss, x, y, v, strategy=strategy),
            split_like(H @ flat(v), params),
        )
        est = model_hessian_trace_estimate(
            model,
            F.mse_loss,
            x,
            y,
            4,
            generator=torch.Generator().manual_seed(0),
            strategy=strategy,
            progress=False,
        )
        close(est.samples, quadratic_forms(H, 4, 0))
    for before, after in zip(buffers, model.buffers(), strict=True):
        assert torch.equal(before, after)
    assert model.training == (mode == "train")


class FixedMask(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def dropout_model() -> nn.Sequential:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 2)).to(DTYPE)


def mask_of_next_forward(model, x) -> torch.Tensor:
    """The dropout mask (with its 1/(1-p) scale) the model's next forward would draw."""
    seen = {}
    handle = model[2].register_forward_hook(lambda m, i, o: seen.update(i=i[0], o=o))
    state = torch.get_rng_state()
    with torch.no_grad():
        model(x)
    torch.set_rng_state(state)
    handle.remove()
    assert (seen["i"] != 0).all()
    return seen["o"] / seen["i"]


def test_dropout_in_train_mode_uses_one_mask_for_every_product():
    """Training-mode dropout: every quantity is that of the loss with one mask, the mask
    the model's next forward would draw from the global RNG; the RNG is left where that
    forward pass leaves it.

    Hutchinson's samples equal ``v^T H_mask v`` for every probe, so no probe saw another
    mask; the exact diagonal (a sweep of many products) equals ``diag(H_mask)``.
    """
    model = dropout_model().train()
    x, y = torch.randn(5, 3, dtype=DTYPE), torch.randn(5, 2, dtype=DTYPE)
    torch.manual_seed(10)
    state = torch.get_rng_state()
    mask = mask_of_next_forward(model, x)
    assert 0 < int((mask == 0).sum()) < mask.numel(), "the mask must drop some units"
    with torch.no_grad():
        model(x)
    after_forward = torch.get_rng_state()
    oracle = copy.deepcopy(model)
    oracle[2] = FixedMask(mask)
    H = module_hessian(oracle, F.mse_loss, x, y)
    params = list(model.parameters())
    n = H.shape[0]
    results = {
        "trace": lambda: model_hessian_trace(model, F.mse_loss, x, y, progress=False),
        "diagonal": lambda: model_hessian_diagonal(
            model, F.mse_loss, x, y, chunk_size=7, progress=False
        ),
    }
    for strategy in STRATEGIES:
        results[f"hvp-{strategy}"] = lambda s=strategy: model_hvp(
            model, F.mse_loss, x, y, split_like(torch.ones(n, dtype=DTYPE), params), strategy=s
        )
        results[f"hutchinson-{strategy}"] = lambda s=strategy: (
            model_hessian_trace_estimate(
                model,
                F.mse_loss,
                x,
                y,
                25,
                generator=torch.Generator().manual_seed(1),
                strategy=s,
                chunk_size=4,
                progress=False,
            ).samples
        )
    expected = {
        "trace": torch.trace(H),
        "diagonal": split_like(torch.diagonal(H), params),
        **{f"hvp-{s}": split_like(H.sum(1), params) for s in STRATEGIES},
        **{f"hutchinson-{s}": quadratic_forms(H, 25, 1) for s in STRATEGIES},
    }
    for name, run in results.items():
        torch.set_rng_state(state)
        close(run(), expected[name])
        assert torch.equal(torch.get_rng_state(), after_forward), f"{name}: RNG not as one forward"
    # Another RNG state, another mask, another Hessian: the mask really is random.
    torch.manual_seed(11)
    assert not torch.allclose(
        model_hessian_trace(model, F.mse_loss, x, y, progress=False), torch.trace(H)
    )


def test_dropout_in_eval_mode_is_the_identity():
    model = dropout_model().eval()
    x, y = torch.randn(5, 3, dtype=DTYPE), torch.randn(5, 2, dtype=DTYPE)
    oracle = copy.deepcopy(model)
    oracle[2] = nn.Identity()
    H = module_hessian(oracle, F.mse_loss, x, y)
    close(model_hessian_trace(model, F.mse_loss, x, y, progress=False), torch.trace(H))
    close(
        model_hessian_diagonal(model, F.mse_loss, x, y, progress=False),
        split_like(torch.diagonal(H), list(model.parameters())),
    )


def test_hessians_through_normalisation_layers_are_symmetric_and_exact():
    """torch 2.13 gets the double backward of layer/batch/instance norm wrong; the library
    must not: its HVPs equal the oracle built from elementary operators."""
    torch.manual_seed(5)
    x = torch.randn(4, 3, 5, dtype=DTYPE)
    model = (
        nn.Sequential(
            nn.Conv1d(3, 2, 1),
            nn.InstanceNorm1d(2, affine=True),
            nn.Tanh(),
            nn.Flatten(),
            nn.LayerNorm(10),
            nn.Linear(10, 3),
            nn.BatchNorm1d(3),
        )
        .to(DTYPE)
        .train()
    )
    bn = model[6]
    y = torch.randn(4, 3, dtype=DTYPE)
    oracle = copy.deepcopy(model)
    no_running_stats(oracle[6])
    H = module_hessian(oracle, F.mse_loss, x, y)
    torch.testing.assert_close(H, H.T, rtol=1e-12, atol=1e-12)
    params = list(model.parameters())
    v = split_like(torch.randn(H.shape[0], dtype=DTYPE), params)
    for strategy in STRATEGIES:
        close(
            model_hvp(model, F.mse_loss, x, y, v, strategy=strategy),
            split_like(H @ flat(v), params),
        )
    assert int(bn.num_batches_tracked) == 0


# -------------------------------------------------------------- user's state


def user_world():
    """A model with batch norm, dropout, a frozen parameter, existing ``.grad`` s,
    a submodule in eval mode inside a training model, and running statistics."""
    model = bn_model()
    model = nn.Sequential(*model, nn.Dropout(0.3)).train()
    model[3].eval()
    model[0].bias.requires_grad_(False)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def snapshot(model):
    return {
        "values": [p.detach().clone() for p in model.parameters()],
        "grads": [(p.grad, p.grad.clone()) for p in model.parameters()],
        "flags": [p.requires_grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "buffers": [b.clone() for b in model.buffers()],
        "rng": torch.get_rng_state(),
    }


def assert_world_unchanged(model, snap):
    for p, before in zip(model.parameters(), snap["values"], strict=True):
        assert torch.equal(p.detach(), before) and p.dtype == before.dtype
    for p, (grad, grad_copy) in zip(model.parameters(), snap["grads"], strict=True):
        assert p.grad is grad and torch.equal(p.grad, grad_copy)
    assert [p.requires_grad for p in model.parameters()] == snap["flags"]
    assert [m.training for m in model.modules()] == snap["training"]
    for b, before in zip(model.buffers(), snap["buffers"], strict=True):
        assert torch.equal(b, before)
    # (the global RNG advances as by one plain forward pass: tests/test_rng_dropout.py)


def model_calls(model, x, y, loss_fn):
    n = sum(p.numel() for p in model.parameters())
    ones = [torch.ones_like(p) for p in model.parameters()]
    return {
        "trace": lambda: model_hessian_trace(model, loss_fn, x, y, progress=False),
        "hutchinson": lambda: model_hessian_trace(model, loss_fn, x, y, 3, progress=False),
        "hutchinson-vmap": lambda: model_hessian_trace(
            model, loss_fn, x, y, 3, strategy="vmap", chunk_size=2, progress=False
        ),
        "diagonal": lambda: model_hessian_diagonal(model, loss_fn, x, y, progress=False),
        "hvp": lambda: model_hvp(model, loss_fn, x, y, ones),
        "hvp-vmap": lambda: model_hvp(model, loss_fn, x, y, ones, strategy="vmap"),
        "create_graph": lambda: model_hessian_trace(
            model, loss_fn, x, y, n - 1, create_graph=True, progress=False
        ),
    }


def test_nothing_of_the_users_world_changes_after_a_successful_call():
    model = user_world()
    x, y = torch.randn(6, 3, dtype=DTYPE), torch.randn(6, 2, dtype=DTYPE)
    torch.manual_seed(0)
    snap = snapshot(model)
    with torch.no_grad():
        copy.deepcopy(model)(x)  # the random draws of one plain forward pass
    after_forward = torch.get_rng_state()
    for name, call in model_calls(model, x, y, F.mse_loss).items():
        torch.set_rng_state(snap["rng"])
        call()
        assert_world_unchanged(model, snap), name
        if name in ("trace", "diagonal", "hvp", "hvp-vmap"):  # (no probes drawn)
            assert torch.equal(torch.get_rng_state(), after_forward), name


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_nothing_of_the_users_world_changes_when_the_call_raises(fail_at):
    """``loss_fn`` raises on its ``fail_at``-th call: at the input check, in the middle of
    the computation (after forward passes that touched batch norm and dropout)."""
    model = user_world()
    x, y = torch.randn(6, 3, dtype=DTYPE), torch.randn(6, 2, dtype=DTYPE)
    torch.manual_seed(0)
    snap = snapshot(model)

    class Boom(Exception):
        pass

    for name in model_calls(model, x, y, F.mse_loss):
        calls = {"n": 0}

        def loss_fn(out, target, calls=calls, name=name):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise Boom(name)
            return F.mse_loss(out, target)

        call = model_calls(model, x, y, loss_fn)[name]
        try:
            call()
        except Boom:
            pass
        assert_world_unchanged(model, snap)
    # A bad ``v`` is detected inside the call, after the problem is set up.
    with pytest.raises(ValueError, match="shape"):
        model_hvp(model, F.mse_loss, x, y, [torch.ones(1)] * len(list(model.parameters())))
    assert_world_unchanged(model, snap)


def test_closures_leave_tensors_flags_grads_and_in_place_counters_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, generator=g, dtype=DTYPE, requires_grad=True)
    w = torch.randn(4, generator=g, dtype=DTYPE)  # frozen
    x.grad = torch.ones(4, dtype=DTYPE)
    grad, counter = x.grad, torch.zeros((), dtype=DTYPE)
    x_before, w_before = x.detach().clone(), w.clone()

    def func():
        counter.add_(1)  # user code writing into its own state
        return (torch.tanh(x * w) ** 2).sum() + (x**3).sum()

    for call in (
        lambda: hessian_trace(func, [x, w], progress=False),
        lambda: hessian_trace(func, [x, w], 2, progress=False),
        lambda: hessian_diagonal(func, [x, w], progress=False),
        lambda: exact_hvp(func, [x, w], [torch.ones(4), torch.ones(4)]),
        lambda: core_hvp.hessian_trace(func, [x, w], 3, progress=False),
    ):
        call()
        assert torch.equal(x.detach(), x_before) and torch.equal(w, w_before)
        assert x.requires_grad and not w.requires_grad
        assert x.grad is grad and torch.equal(grad, torch.ones(4, dtype=DTYPE))
        assert float(counter) == 0.0


# ------------------------------------------------------------------- bad input


def closure_calls():
    return {
        "trace": lambda f, p: hessian_trace(f, p, progress=False),
        "hutchinson": lambda f, p: hessian_trace(f, p, 2, progress=False),
        "diagonal": lambda f, p: hessian_diagonal(f, p, progress=False),
        "hvp": lambda f, p: exact_hvp(f, p, [torch.ones_like(t) for t in p]),
        "hvp-trace": lambda f, p: core_hvp.hessian_trace(f, p, 2, progress=False),
    }


@pytest.mark.parametrize("name", list(closure_calls()))
def test_a_loss_that_is_not_a_scalar_is_refused(name):
    x = torch.randn(3, dtype=DTYPE, requires_grad=True)
    with pytest.raises(ValueError, match=r"scalar.*\(3,\)"):
        closure_calls()[name](lambda: x**2, [x])


@pytest.mark.parametrize("name", list(closure_calls()))
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_loss_is_refused(name, value):
    x = torch.randn(3, dtype=DTYPE, requires_grad=True)
    with pytest.raises(ValueError, match="non-finite"):
        closure_calls()[name](lambda: (x**2).sum() * value, [x])


@pytest.mark.parametrize("name", list(closure_calls()))
def test_empty_params_non_floating_and_mixed_devices_are_refused(name):
    call = closure_calls()[name]
    with pytest.raises(ValueError, match="params.*empty"):
        call(lambda: torch.zeros(()), [])
    ints = torch.arange(3)
    with pytest.raises(TypeError, match=r"params\[0\].*floating.*torch.int64"):
        call(lambda: ints.sum().double(), [ints])
    # Checked before any computation, so a meta tensor stands in for a second device.
    cpu = torch.ones(2, dtype=DTYPE, requires_grad=True)
    meta = torch.ones(2, dtype=DTYPE, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match=r"one device.*params\[0\] on cpu.*params\[1\] on meta"):
        call(lambda: (cpu**2).sum(), [cpu, meta])


@pytest.mark.parametrize(
    "call",
    [
        lambda f, p, m: hessian_trace(f, p, m, progress=False),
        lambda f, p, m: core_hvp.hessian_trace(f, p, m, progress=False),
        lambda f, p, m: model_hessian_trace(
            nn.Linear(2, 1).to(DTYPE),
            F.mse_loss,
            torch.ones(3, 2, dtype=DTYPE),
            torch.ones(3, 1, dtype=DTYPE),
            m,
            progress=False,
        ),
    ],
    ids=["trace", "hvp-trace", "model"],
)
def test_num_samples_must_be_a_positive_int(call):
    x = torch.randn(3, dtype=DTYPE, requires_grad=True)

    def func():
        return (x**2).sum()

    for bad in (0, -1):
        with pytest.raises(ValueError, match=rf"num_samples.*>= 1.*{bad}"):
            call(func, [x], bad)
    for bad in (2.5, "3", True):
        with pytest.raises(TypeError, match="num_samples.*int"):
            call(func, [x], bad)


def test_v_whose_shapes_do_not_match_params_is_refused():
    x = torch.randn(3, dtype=DTYPE, requires_grad=True)
    w = torch.randn(2, 2, dtype=DTYPE, requires_grad=True)

    def func():
        return (x**2).sum() * (w**2).sum()

    bad = [torch.ones(3), torch.ones(4)]
    for call in (
        lambda: exact_hvp(func, [x, w], bad),
        lambda: hessian_diagonal(func, [x, w], bad, progress=False),
    ):
        with pytest.raises(ValueError, match=r"v\[1\].*shape \(4,\).*\(2, 2\)"):
            call()
    with pytest.raises(ValueError, match="one tensor per parameter.*2.*1"):
        exact_hvp(func, [x, w], [torch.ones(3)])
    model = nn.Linear(2, 1).to(DTYPE)
    with pytest.raises(ValueError, match=r"shape \(2,\).*\(1, 2\)"):
        model_hvp(
            model,
            F.mse_loss,
            torch.ones(3, 2, dtype=DTYPE),
            torch.ones(3, 1, dtype=DTYPE),
            [torch.ones(2), torch.ones(1)],
        )


def test_other_bad_arguments_are_named():
    x = torch.randn(3, dtype=DTYPE, requires_grad=True)
    with pytest.raises(TypeError, match="func.*callable"):
        hessian_trace(3.0, [x])
    with pytest.raises(TypeError, match="model.*Module"):
        model_hessian_trace(lambda t: t, F.mse_loss, x, x)
    with pytest.raises(ValueError, match="strategy.*'fast'"):
        hessian_trace(lambda: (x**2).sum(), [x], 2, strategy="fast", progress=False)
    with pytest.raises(ValueError, match=r"loss_fn\(model\(inputs\), targets\).*scalar.*\(3, 1\)"):
        model_hessian_trace(
            nn.Linear(2, 1).to(DTYPE),
            lambda out, y: (out - y) ** 2,
            torch.ones(3, 2, dtype=DTYPE),
            torch.ones(3, 1, dtype=DTYPE),
            progress=False,
        )
