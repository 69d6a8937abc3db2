"""A batch that does not fit the model: target shape, input dtype, device, generator.

Issue 7, section 5: each error names both sides (the output's shape and the
target's; the input's dtype or device and the parameters'), instead of torch's
broadcasting warning or a message from deep in the forward pass.  Legitimate
inputs (integer tokens to an embedding, class targets and probability targets to
cross-entropy) still give the dense oracle's numbers.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPE, assert_close, dense_hessian, ravel
from torch import nn
from torch.func import functional_call

import torch_secorder
from torch_secorder import ShapeError, func, linalg
from torch_secorder._checks import check_generator
from torch_secorder.core import gvp
from torch_secorder.linalg import eigen, probes


def mlp(d_out: int = 2):
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, d_out)).to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DTYPE))
    x = torch.randn(5, 3, generator=g, dtype=DTYPE)
    return model, x


def snapshot(model):
    return [(p.detach().clone(), p.grad, p.requires_grad) for p in model.parameters()]


def assert_untouched(model, snap):
    for p, (value, grad, rg) in zip(model.parameters(), snap, strict=True):
        assert torch.equal(p.detach(), value) and p.grad is grad and p.requires_grad == rg


def module_oracle(model, loss_fn, x, y):
    params = {n: p.detach() for n, p in model.named_parameters()}
    return params, dense_hessian(lambda p: loss_fn(functional_call(model, p, (x,)), y), params)


def module_calls(model, loss_fn, x, y):
    v = [torch.ones_like(p) for p in model.parameters()]
    q = dict(progress=False)
    return {
        "model_hessian_trace": lambda: torch_secorder.model_hessian_trace(
            model, loss_fn, x, y, **q
        ),
        "model_hessian_trace_estimate": lambda: torch_secorder.model_hessian_trace_estimate(
            model, loss_fn, x, y, 3, generator=torch.Generator().manual_seed(0), **q
        ),
        "model_hessian_diagonal": lambda: torch_secorder.model_hessian_diagonal(
            model, loss_fn, x, y, **q
        ),
        "model_hvp": lambda: torch_secorder.model_hvp(model, loss_fn, x, y, v),
        "model_hvp_graph": lambda: torch_secorder.model_hvp(
            model, loss_fn, x, y, v, strategy="graph"
        ),
        "gauss_newton_product": lambda: torch_secorder.gauss_newton_product(
            model, loss_fn, x, y, v
        ),
    }


# --------------------------------------------------------------------------- target shape

BAD_TARGETS = [
    # (loss, output width, target, shapes named in the message)
    (F.mse_loss, 1, lambda n: torch.randn(n, dtype=DTYPE), r"\(5,\).*\(5, 1\)"),
    (nn.MSELoss(), 2, lambda n: torch.randn(n - 1, 2, dtype=DTYPE), r"\(4, 2\).*\(5, 2\)"),
    (F.l1_loss, 1, lambda n: torch.randn(n, dtype=DTYPE), r"\(5,\).*\(5, 1\)"),
    (nn.HuberLoss(), 2, lambda n: torch.randn(1, 2, dtype=DTYPE), r"\(1, 2\).*\(5, 2\)"),
    (F.poisson_nll_loss, 1, lambda n: torch.rand(n, dtype=DTYPE), r"\(5,\).*\(5, 1\)"),
    (F.cross_entropy, 3, lambda n: torch.randint(0, 3, (n - 1,)), r"\(4,\).*\(5, 3\)"),
    (F.cross_entropy, 3, lambda n: torch.randint(0, 3, (n, 1)), r"\(5, 1\).*\(5, 3\)"),
    (nn.CrossEntropyLoss(), 3, lambda n: torch.rand(n, 2, dtype=DTYPE), r"\(5, 2\).*\(5, 3\)"),
    (nn.BCEWithLogitsLoss(), 1, lambda n: torch.rand(n, dtype=DTYPE), r"\(5,\).*\(5, 1\)"),
]


@pytest.mark.parametrize("case", range(len(BAD_TARGETS)))
def test_a_target_that_does_not_fit_names_both_shapes(case):
    loss_fn, width, make_target, shapes = BAD_TARGETS[case]
    model, x = mlp(width)
    y = make_target(x.shape[0])
    snap = snapshot(model)
    for name, call in module_calls(model, loss_fn, x, y).items():
        with warnings.catch_warnings():
            warnings.simplefilter(
                "error", UserWarning
            )  # an error, not torch's broadcasting warning
            with pytest.raises(ShapeError, match=rf"targets of shape {shapes}") as info:
                call()
        assert "output" in str(info.value), name
        assert_untouched(model, snap)


TARGETS_THAT_FIT = [
    (F.mse_loss, 2, lambda n: torch.randn(n, 2, dtype=DTYPE)),
    (F.cross_entropy, 3, lambda n: torch.tensor([0, 2, 1, 1, 0])),
    (F.cross_entropy, 3, lambda n: torch.softmax(torch.randn(n, 3, dtype=DTYPE), -1)),
    (nn.BCEWithLogitsLoss(), 1, lambda n: torch.rand(n, 1, dtype=DTYPE)),
]


@pytest.mark.parametrize("case", range(len(TARGETS_THAT_FIT)))
def test_targets_that_fit_give_the_dense_oracle(case):
    loss_fn, width, make_target = TARGETS_THAT_FIT[case]
    model, x = mlp(width)
    y = make_target(x.shape[0])
    params, H = module_oracle(model, loss_fn, x, y)
    calls = module_calls(model, loss_fn, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert_close(calls["model_hessian_trace"](), H.trace())
        diag = calls["model_hessian_diagonal"]()
        hv = calls["model_hvp"]()
    assert_close(ravel(dict(zip(params, diag, strict=True))), H.diagonal())
    ones = torch.ones(H.shape[0], dtype=DTYPE)
    assert_close(ravel(dict(zip(params, hv, strict=True))), H @ ones)


def test_other_warnings_of_the_loss_still_reach_the_user():
    model, x = mlp(3)
    y = torch.softmax(torch.randn(5, 3, dtype=DTYPE), -1)

    def kl(out, target):  # reduction="mean" warns (it is not the KL divergence per sample)
        return F.kl_div(F.log_softmax(out, -1), target)

    with pytest.warns(UserWarning, match="batchmean"):
        value = torch_secorder.model_hessian_trace(model, kl, x, y, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, H = module_oracle(model, kl, x, y)
    assert_close(value, H.trace())


# --------------------------------------------------------------------------- dtype


def conv_model():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).to(DTYPE)


def test_integer_images_to_a_conv_net_name_both_dtypes():
    model = conv_model()
    images = torch.randint(0, 255, (2, 1, 4, 4))
    y = torch.tensor([0, 2])
    snap = snapshot(model)
    for call in module_calls(model, F.cross_entropy, images, y).values():
        with pytest.raises(
            TypeError, match=r"inputs has dtype torch.int64, but the parameters.*torch.float64"
        ):
            call()
        assert_untouched(model, snap)
    with pytest.raises(TypeError, match=r"torch.int64.*torch.float64"):
        torch_secorder.model_jvp(model, images, [torch.ones_like(p) for p in model.parameters()])


def test_float32_inputs_to_a_float64_model_name_both_dtypes():
    model, x = mlp(2)
    y = torch.randn(5, 2, dtype=DTYPE)
    for call in module_calls(model, F.mse_loss, x.float(), y).values():
        with pytest.raises(TypeError, match=r"torch.float32.*parameters.*torch.float64"):
            call()
    with pytest.raises(TypeError, match=r"torch.float32.*torch.float64"):
        torch_secorder.model_vjp(model, x.float(), torch.ones(5, 2, dtype=DTYPE))
    # A tuple of inputs names the one that is off.
    bilinear = nn.Bilinear(3, 3, 2).to(DTYPE)
    with pytest.raises(TypeError, match=r"inputs\[1\] has dtype torch.float32"):
        torch_secorder.model_hessian_trace(bilinear, F.mse_loss, (x, x.float()), y)


def test_integer_tokens_to_an_embedding_are_legitimate():
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Embedding(6, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6, 2)).to(DTYPE)
    tokens = torch.randint(0, 6, (4, 2), generator=g)
    y = torch.tensor([0, 1, 1, 0])
    params, H = module_oracle(model, F.cross_entropy, tokens, y)
    diag = torch_secorder.model_hessian_diagonal(model, F.cross_entropy, tokens, y, progress=False)
    assert_close(ravel(dict(zip(params, diag, strict=True))), H.diagonal())
    assert_close(
        torch_secorder.model_hessian_trace(model, F.cross_entropy, tokens, y, progress=False),
        H.trace(),
    )


# --------------------------------------------------------------------------- device

# The device checks run before any forward pass, so a meta tensor stands in for a
# batch on another device than the (CPU) parameters.


def test_a_batch_on_another_device_names_both_devices():
    model, x = mlp(2)
    y = torch.randn(5, 2, dtype=DTYPE)
    meta_x, meta_y = x.to("meta"), y.to("meta")
    for call in module_calls(model, F.mse_loss, meta_x, y).values():
        with pytest.raises(ValueError, match=r"inputs is on meta, but the parameters are on cpu"):
            call()
    for call in module_calls(model, F.mse_loss, x, meta_y).values():
        with pytest.raises(ValueError, match=r"targets is on meta, but the parameters are on cpu"):
            call()
    bilinear = nn.Bilinear(3, 3, 2).to(DTYPE)
    with pytest.raises(ValueError, match=r"inputs\[1\] is on meta"):
        torch_secorder.model_hessian_trace(bilinear, F.mse_loss, (x, meta_x), y)
    with pytest.raises(ValueError, match=r"inputs is on meta.*cpu"):
        torch_secorder.model_jvp(model, meta_x, [torch.ones_like(p) for p in model.parameters()])
    # A 0-dim CPU tensor mixes with any device in torch: not refused.
    loss = torch_secorder.model_hessian_trace(
        model, lambda o, t: F.mse_loss(o, y) * t, x, torch.tensor(2.0, dtype=DTYPE)
    )
    _, H = module_oracle(model, lambda o, t: F.mse_loss(o, y) * t, x, torch.tensor(2.0))
    assert_close(loss, H.trace())


# --------------------------------------------------------------------------- generator


def test_check_generator_names_both_devices():
    cpu = torch.Generator()
    with pytest.raises(ValueError, match=r"generator is on cpu, but the parameters are on cuda"):
        check_generator(cpu, torch.device("cuda", 0))
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        check_generator(0, "cpu")
    assert check_generator(cpu, "cpu") is cpu and check_generator(None, "cuda") is None


def test_a_cpu_generator_for_parameters_elsewhere_is_refused_up_front():
    """The engine and linalg check before drawing: parameters on meta stand in for CUDA."""
    gen = torch.Generator().manual_seed(0)
    point = {"x": torch.ones(3, dtype=DTYPE, device="meta")}
    match = r"generator is on cpu, but the parameters are on meta"
    with pytest.raises(ValueError, match=match):
        func.hutchinson_trace_estimate(lambda p: (p["x"] ** 2).sum(), point, 2, gen)
    with pytest.raises(ValueError, match=match):
        func.hutchinson_trace(lambda p: (p["x"] ** 2).sum(), point, 2, gen)
    with pytest.raises(ValueError, match=match):
        linalg.hutchinson(lambda V: V, 3, 2, generator=gen, device="meta")
    with pytest.raises(ValueError, match=match):
        probes.draw_probes(2, 3, generator=gen, device="meta")
    with pytest.raises(ValueError, match=match):
        eigen.lanczos_eigsh(lambda V: V, 3, generator=gen, device="meta")
    with pytest.raises(ValueError, match=match):
        eigen.subspace_iteration(lambda V: V, 3, generator=gen, device="meta")
    with pytest.raises(ValueError, match=match):
        linalg.stochastic_lanczos_quadrature(lambda V: V, 3, generator=gen, device="meta")
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        linalg.hutchinson(lambda V: V, 3, 2, generator=0)
    # A generator on the right device: the same seed, the same estimate.
    A = torch.diag(torch.tensor([1.0, 2.0, -4.0], dtype=DTYPE)) + 0.5
    a = linalg.hutchinson(lambda V: V @ A, 3, 4, dtype=DTYPE, generator=gen.manual_seed(5))
    b = linalg.hutchinson(lambda V: V @ A, 3, 4, dtype=DTYPE, generator=gen.manual_seed(5))
    assert torch.equal(a.samples, b.samples)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_generator_for_cuda_parameters_is_refused_everywhere():
    model, x = mlp(2)
    model, x = model.cuda(), x.cuda()
    y = torch.randn(5, 2, dtype=DTYPE, device="cuda")
    t = torch.ones(3, dtype=DTYPE, device="cuda", requires_grad=True)
    gen = torch.Generator()
    out = model(x)
    classes = torch.tensor([0, 1, 1, 0, 1], device="cuda")
    calls = [
        lambda: torch_secorder.hessian_trace(lambda: (t**3).sum(), [t], 2, generator=gen),
        lambda: torch_secorder.model_hessian_trace_estimate(
            model, F.mse_loss, x, y, 2, generator=gen
        ),
        lambda: torch_secorder.core.hvp.hessian_trace(lambda: (t**3).sum(), [t], 2, generator=gen),
        lambda: torch_secorder.generalized_fisher_diagonal(
            model, out, classes, num_samples=2, generator=gen
        ),
        lambda: func.hutchinson_trace(lambda p: (p["t"] ** 3).sum(), {"t": t.detach()}, 2, gen),
        lambda: torch_secorder.power_iteration(lambda V: V, 3, device="cuda", generator=gen),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="generator is on cpu, but the parameters are on cuda"):
            call()


def test_gvp_batched_products_check_chunks_and_shapes_together():
    # Batched JVPs with a valid chunk give the same numbers as one JVP per vector.
    x = torch.tensor([1.0, -2.0, 0.5], dtype=DTYPE, requires_grad=True)
    V = torch.randn(4, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    J = torch.diag(2 * x.detach())
    assert_close(gvp.batch_jvp(lambda: x**2, [x], V, chunk_size=3), V @ J.T)


def test_landscapes_and_eigenvalues_name_both_devices():
    model, x = mlp(2)
    y = torch.randn(5, 2, dtype=DTYPE)
    direction = [torch.ones_like(p) for p in model.parameters()]
    with pytest.raises(ValueError, match=r"inputs is on meta, but the parameters are on cpu"):
        torch_secorder.compute_loss_surface_1d(model, nn.MSELoss(), x.to("meta"), y, direction)
    with pytest.raises(ValueError, match=r"target is on meta, but the parameters are on cpu"):
        torch_secorder.model_eigenvalues(
            model, lambda m, d, t: F.mse_loss(m(d), t), x, y.to("meta")
        )
    # On one device: the landscape is the loss at the shifted parameters.
    alphas, losses = torch_secorder.compute_loss_surface_1d(
        model, nn.MSELoss(), x, y, direction, alpha_range=(0.0, 1.0), num_points=2
    )
    shifted = {n: p.detach() + 1.0 for n, p in model.named_parameters()}
    expected = F.mse_loss(functional_call(model, shifted, (x,)), y)
    assert_close(losses[-1], expected)


def test_the_ggn_matrix_functions_name_both_shapes_dtypes_and_devices():
    model, x = mlp(1)
    y = torch.randn(5, 1, dtype=DTYPE)
    ggn_diag = torch_secorder.gauss_newton_matrix_approximation
    for ggn in (ggn_diag, torch_secorder.gauss_newton_matrix):
        with pytest.raises(ShapeError, match=r"targets of shape \(5,\).*output of shape \(5, 1\)"):
            ggn(model, F.mse_loss, x, y[:, 0])
        with pytest.raises(TypeError, match=r"inputs has dtype torch.float32.*torch.float64"):
            ggn(model, F.mse_loss, x.float(), y)
        with pytest.raises(ValueError, match=r"targets is on meta, but the parameters are on cpu"):
            ggn(model, F.mse_loss, x, y.to("meta"))
    # Targets that fit: the GGN diagonal of MSE is (2/N) sum_i J_i^T J_i, against the dense
    # Jacobian of the output.
    params = {n: p.detach() for n, p in model.named_parameters()}
    J = torch.func.jacrev(lambda p: functional_call(model, p, (x,)).reshape(-1))(params)
    J = torch.cat([J[n].reshape(5, -1) for n in params], dim=1)
    expected = (2.0 / 5) * (J**2).sum(0)
    diag = ggn_diag(model, F.mse_loss, x, y)
    assert_close(torch.cat([d.reshape(-1) for d in diag]), expected)


def test_the_empirical_fisher_names_both_devices():
    model, x = mlp(2)
    y = torch.randn(5, 2, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"inputs is on meta, but the parameters are on cpu"):
        torch_secorder.empirical_fisher_diagonal(model, nn.MSELoss(), x.to("meta"), y)
    with pytest.raises(ValueError, match=r"targets is on meta, but the parameters are on cpu"):
        torch_secorder.empirical_fisher_trace(model, nn.MSELoss(), x, y.to("meta"))
    # On one device: the mean of the squared per-sample gradients (one backward each).
    grads = []
    for i in range(5):
        model.zero_grad()
        nn.MSELoss()(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    expected = torch.stack(grads).pow(2).mean(0)
    diag = torch_secorder.empirical_fisher_diagonal(model, nn.MSELoss(), x, y)
    assert_close(torch.cat([d.reshape(-1) for d in diag]), expected)
