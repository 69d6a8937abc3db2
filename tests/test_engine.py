"""The engine, :mod:`torch_secorder.func`, against the dense oracle, and its composability.

Every number is compared with :func:`torch.func.hessian` of the flattened loss (see
``conftest.dense_hessian``) in float64 at 1e-10.  Composability: the engine's functions
are called inside ``torch.func.vmap``, differentiated by ``torch.func.grad`` and compiled
by ``torch.compile`` (one small compile test: compilation is slow on a CPU).
"""

from __future__ import annotations

import optree
import torch
import torch.nn.functional as F
from conftest import (
    DTYPE,
    assert_close,
    cubic_problems,
    dense_hessian,
    diagonal_problems,
    hessian_of_closure,
    make_mlp,
    mlp_problems,
    quadratic_problems,
    ravel,
    smooth_problems,
    unravel,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call, grad, vmap

import torch_secorder.func as sf

EXAMPLES = settings(max_examples=15, deadline=None)
seeds = st.integers(0, 2**31 - 1)
chunk_sizes = st.sampled_from([None, 1, 2, 3, 5])


def randn_like_tree(tree, seed: int, batch: tuple[int, ...] = ()):
    g = torch.Generator().manual_seed(seed)
    return optree.tree_map(
        lambda t: torch.randn((*batch, *t.shape), generator=g, dtype=DTYPE), tree
    )


def frozen(tree):
    return optree.tree_map(lambda t: t.detach().clone(), tree)


def assert_unchanged(tree, copy) -> None:
    for a, b in zip(optree.tree_leaves(tree), optree.tree_leaves(copy), strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------- the oracle itself


@EXAMPLES
@given(st.one_of(quadratic_problems(), cubic_problems(), diagonal_problems()))
def test_oracle_equals_the_closed_form_hessian(problem):
    torch.testing.assert_close(problem.hessian(), problem.known_hessian, rtol=1e-12, atol=1e-12)


@settings(max_examples=8, deadline=None)
@given(mlp_problems())
def test_oracle_equals_double_backward_on_mlps(problem):
    func, tensors = problem.closure()
    torch.testing.assert_close(
        problem.list_hessian(), hessian_of_closure(func, tensors), rtol=1e-12, atol=1e-12
    )


# ----------------------------------------------------------------------------- HVP


@EXAMPLES
@given(smooth_problems(), seeds)
def test_hvp_matches_dense_hessian(problem, seed):
    H = problem.hessian()
    v = randn_like_tree(problem.params, seed)
    before = frozen(problem.params)
    result = sf.hvp(problem.f, problem.params, v)
    assert_close(result, unravel(H @ ravel(v), problem.params))
    assert_unchanged(problem.params, before)


@EXAMPLES
@given(smooth_problems(), st.integers(1, 6), chunk_sizes, seeds)
def test_hvp_batched_matches_dense_for_every_chunk_size(problem, k, chunk_size, seed):
    H = problem.hessian()
    V = randn_like_tree(problem.params, seed, batch=(k,))
    result = sf.hvp_batched(problem.f, problem.params, V, chunk_size=chunk_size)
    flat_V = torch.cat([leaf.reshape(k, -1) for leaf in optree.tree_leaves(V)], dim=1)
    expected = flat_V @ H
    assert_close(
        result, optree.tree_unflatten(optree.tree_structure(V), list(_split_rows(expected, V)))
    )


def _split_rows(flat, like):
    leaves = optree.tree_leaves(like)
    k = flat.shape[0]
    pieces = torch.split(flat, [leaf[0].numel() for leaf in leaves], dim=1)
    return [p.reshape(k, *leaf.shape[1:]) for p, leaf in zip(pieces, leaves, strict=True)]


@EXAMPLES
@given(smooth_problems(), st.integers(1, 5), chunk_sizes, seeds)
def test_hessian_matmat_is_the_dense_hessian_on_flat_batches(problem, k, chunk_size, seed):
    H = problem.hessian()
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(k, problem.n, generator=g, dtype=DTYPE)
    matmat = sf.hessian_matmat(problem.f, problem.params, chunk_size=chunk_size)
    assert matmat.dim == problem.n
    torch.testing.assert_close(matmat(V), V @ H, rtol=1e-10, atol=1e-10)


@EXAMPLES
@given(smooth_problems(), seeds)
def test_hvp_is_symmetric(problem, seed):
    u = randn_like_tree(problem.params, seed)
    v = randn_like_tree(problem.params, seed + 1)
    uHv = ravel(u) @ ravel(sf.hvp(problem.f, problem.params, v))
    vHu = ravel(v) @ ravel(sf.hvp(problem.f, problem.params, u))
    torch.testing.assert_close(uHv, vHu, rtol=1e-10, atol=1e-10)


@EXAMPLES
@given(smooth_problems(), seeds, st.floats(-3, 3), st.floats(-3, 3))
def test_hvp_is_linear(problem, seed, a, b):
    u = randn_like_tree(problem.params, seed)
    v = randn_like_tree(problem.params, seed + 1)
    combo = optree.tree_map(lambda x, y: a * x + b * y, u, v)
    Hu = sf.hvp(problem.f, problem.params, u)
    Hv = sf.hvp(problem.f, problem.params, v)
    assert_close(
        sf.hvp(problem.f, problem.params, combo),
        optree.tree_map(lambda x, y: a * x + b * y, Hu, Hv),
    )


# ------------------------------------------------------------------ diagonal, trace


@EXAMPLES
@given(smooth_problems(), chunk_sizes)
def test_hessian_diagonal_matches_dense(problem, chunk_size):
    H = problem.hessian()
    before = frozen(problem.params)
    diag = sf.hessian_diagonal(problem.f, problem.params, chunk_size=chunk_size)
    assert list(diag) == list(problem.params)
    assert_close(diag, unravel(torch.diagonal(H), problem.params))
    assert_unchanged(problem.params, before)


@EXAMPLES
@given(smooth_problems(), chunk_sizes)
def test_hessian_trace_matches_dense(problem, chunk_size):
    trace = sf.hessian_trace(problem.f, problem.params, chunk_size=chunk_size)
    assert trace.shape == ()
    torch.testing.assert_close(trace, torch.trace(problem.hessian()), rtol=1e-10, atol=1e-10)


def test_chunk_sizes_that_do_not_divide_the_leaf_give_the_same_diagonal():
    """A 3x5 weight (15 entries) swept 1, 2, 4, 7, 15 and 100 at a time."""
    model = make_mlp([5, 3, 2], "softplus", seed=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, generator=g, dtype=DTYPE)
    y = torch.randn(4, 2, generator=g, dtype=DTYPE)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p):
        return F.mse_loss(functional_call(model, p, (x,)), y)

    expected = unravel(torch.diagonal(dense_hessian(f, params)), params)
    for chunk_size in (1, 2, 4, 7, 15, 100):
        assert_close(sf.hessian_diagonal(f, params, chunk_size=chunk_size), expected)


def test_nested_pytree_with_several_leaves():
    """Dicts of dicts and tuples: every engine function keeps the structure and the numbers."""
    g = torch.Generator().manual_seed(1)
    params = {
        "layer": {
            "w": torch.randn(2, 3, generator=g, dtype=DTYPE),
            "b": torch.randn(3, generator=g, dtype=DTYPE),
        },
        "scales": (
            torch.randn(3, generator=g, dtype=DTYPE),
            torch.randn((), generator=g, dtype=DTYPE),
        ),
    }
    inputs = torch.randn(4, 2, generator=g, dtype=DTYPE)

    def f(p):
        h = torch.tanh(inputs @ p["layer"]["w"] + p["layer"]["b"])
        s, t = p["scales"]
        return (F.softplus(h * s) ** 2).sum() * torch.sigmoid(t) + t**3

    H = dense_hessian(f, params)
    v = randn_like_tree(params, 5)
    assert_close(sf.hvp(f, params, v), unravel(H @ ravel(v), params))
    assert_close(sf.hessian_diagonal(f, params, chunk_size=2), unravel(torch.diagonal(H), params))
    torch.testing.assert_close(sf.hessian_trace(f, params), torch.trace(H), rtol=1e-10, atol=1e-10)
    V = randn_like_tree(params, 6, batch=(3,))
    flat_V = torch.cat([leaf.reshape(3, -1) for leaf in optree.tree_leaves(V)], dim=1)
    result = sf.hvp_batched(f, params, V, chunk_size=2)
    flat_result = torch.cat([leaf.reshape(3, -1) for leaf in optree.tree_leaves(result)], dim=1)
    assert optree.tree_structure(result) == optree.tree_structure(V)
    torch.testing.assert_close(flat_result, flat_V @ H, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------- composability


@EXAMPLES
@given(smooth_problems(), st.integers(1, 4), seeds)
def test_hvp_inside_vmap_over_a_batch_of_vectors(problem, k, seed):
    H = problem.hessian()
    V = randn_like_tree(problem.params, seed, batch=(k,))
    result = vmap(lambda v: sf.hvp(problem.f, problem.params, v))(V)
    flat_V = torch.cat([leaf.reshape(k, -1) for leaf in optree.tree_leaves(V)], dim=1)
    flat_result = torch.cat([leaf.reshape(k, -1) for leaf in optree.tree_leaves(result)], dim=1)
    torch.testing.assert_close(flat_result, flat_V @ H, rtol=1e-10, atol=1e-10)


@settings(max_examples=8, deadline=None)
@given(cubic_problems(max_n=6), st.integers(1, 3), seeds)
def test_exact_trace_and_diagonal_inside_vmap_over_points(problem, k, seed):
    points = randn_like_tree(problem.params, seed, batch=(k,))
    traces = vmap(lambda q: sf.hessian_trace(problem.f, q, chunk_size=2))(points)
    diags = vmap(lambda q: sf.hessian_diagonal(problem.f, q))(points)
    for i in range(k):
        point = optree.tree_map(lambda t, i=i: t[i], points)
        H = dense_hessian(problem.f, point)
        torch.testing.assert_close(traces[i], torch.trace(H), rtol=1e-10, atol=1e-10)
        assert_close(optree.tree_map(lambda t, i=i: t[i], diags), unravel(torch.diagonal(H), point))


@EXAMPLES
@given(smooth_problems(), st.floats(0.25, 4.0))
def test_grad_of_exact_trace_with_respect_to_a_loss_scale(problem, scale):
    r""":math:`\frac{d}{ds}\operatorname{tr}\nabla^2(s f) = \operatorname{tr}\nabla^2 f`."""
    d_trace = grad(lambda s: sf.hessian_trace(lambda p: s * problem.f(p), problem.params))(
        torch.tensor(scale, dtype=DTYPE)
    )
    torch.testing.assert_close(d_trace, torch.trace(problem.hessian()), rtol=1e-10, atol=1e-10)


@EXAMPLES
@given(cubic_problems())
def test_grad_of_exact_trace_with_respect_to_the_point_is_the_third_derivative(problem):
    r"""For the cubic, :math:`\nabla_x \operatorname{tr} H(x) = 6c + 6\|u\|^2 u`."""
    c, u = problem.extra["c"], problem.extra["u"]
    d_trace = grad(lambda q: sf.hessian_trace(problem.f, q, chunk_size=3))(problem.params)
    assert_close(d_trace, unravel(6 * c + 6 * (u @ u) * u, problem.params))


@settings(max_examples=6, deadline=None)
@given(smooth_problems(), st.integers(1, 5), seeds)
def test_grad_of_hutchinson_with_respect_to_a_loss_scale(problem, m, seed):
    """With the same probes, Hutchinson of ``s f`` is ``s`` times Hutchinson of ``f``."""
    d_est = grad(
        lambda s: sf.hutchinson_trace(
            lambda p: s * problem.f(p),
            problem.params,
            m,
            generator=torch.Generator().manual_seed(seed),
        )
    )(torch.tensor(1.7, dtype=DTYPE))
    est = sf.hutchinson_trace(
        problem.f, problem.params, m, generator=torch.Generator().manual_seed(seed)
    )
    torch.testing.assert_close(d_est, est, rtol=1e-10, atol=1e-10)


@settings(max_examples=5, deadline=None)
@given(diagonal_problems(), st.integers(1, 3), seeds)
def test_hutchinson_inside_vmap_over_points(problem, k, seed):
    """vmapped over points (randomness='same'): exact on diagonal Hessians at every point."""
    points = randn_like_tree(problem.params, seed, batch=(k,))
    g = torch.Generator().manual_seed(seed)
    estimates = vmap(
        lambda q: sf.hutchinson_trace(problem.f, q, 3, generator=g), randomness="same"
    )(points)
    for i in range(k):
        point = optree.tree_map(lambda t, i=i: t[i], points)
        torch.testing.assert_close(
            estimates[i], torch.trace(dense_hessian(problem.f, point)), rtol=1e-10, atol=1e-10
        )


def test_compiled_hvp_equals_eager_hvp():
    """torch.compile of the vmapped HVP of an MLP with an MSE loss (a rerouted operator)."""
    model = make_mlp([3, 4, 2], "tanh", seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g, dtype=DTYPE)
    y = torch.randn(5, 2, generator=g, dtype=DTYPE)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p):
        return F.mse_loss(functional_call(model, p, (x,)), y)

    V = randn_like_tree(params, 1, batch=(3,))
    v = optree.tree_map(lambda t: t[0], V)
    eager_single = sf.hvp(f, params, v)
    eager_batch = sf.hvp_batched(f, params, V)
    compiled = torch.compile(lambda p, V: sf.hvp_batched(f, p, V))
    compiled_batch = compiled(params, V)
    assert_close(compiled_batch, eager_batch)
    assert_close(optree.tree_map(lambda t: t[0], compiled_batch), eager_single)
    H = dense_hessian(f, params)
    assert_close(eager_single, unravel(H @ ravel(v), params))
