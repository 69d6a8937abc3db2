"""TF32 behind an explicit switch (issue 12): flags restored exactly, and the CPU emulation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_mlp
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_secorder.func.hvp import hvp
from torch_secorder.precision import (
    TF32_UNIT_ROUNDOFF,
    emulate_tf32,
    round_to_tf32,
    tf32,
)

B = torch.backends


def _raw_flags() -> dict[str, object]:
    """Every flag, read independently of the module under test ('raises' if unreadable)."""
    readers = {
        "legacy_matmul": lambda: B.cuda.matmul.allow_tf32,
        "matmul_precision": torch.get_float32_matmul_precision,
        "cuda_matmul": lambda: B.cuda.matmul.fp32_precision,
        "mkldnn_matmul": lambda: B.mkldnn.matmul.fp32_precision,
        "legacy_cudnn": lambda: B.cudnn.allow_tf32,
        "cudnn_conv": lambda: B.cudnn.conv.fp32_precision,
        "cudnn_rnn": lambda: B.cudnn.rnn.fp32_precision,
    }
    out = {}
    for name, read in readers.items():
        try:
            out[name] = read()
        except RuntimeError:
            out[name] = "raises"
    return out


def _torch_defaults() -> None:
    torch.set_float32_matmul_precision("highest")
    B.cuda.matmul.fp32_precision = "none"
    B.mkldnn.matmul.fp32_precision = "none"
    B.cudnn.allow_tf32 = True
    B.cudnn.conv.fp32_precision = "tf32"
    B.cudnn.rnn.fp32_precision = "tf32"


@pytest.fixture(autouse=True)
def defaults_around():
    _torch_defaults()
    yield
    _torch_defaults()


def _set_legacy_true():
    B.cuda.matmul.allow_tf32 = True


def _set_new_matmul():
    B.cuda.matmul.fp32_precision = "ieee"


def _mix_matmul():  # legacy then new: reading the legacy flag raises
    B.cuda.matmul.allow_tf32 = True
    B.cuda.matmul.fp32_precision = "ieee"


def _mix_cudnn():
    B.cudnn.conv.fp32_precision = "ieee"


def _medium():
    torch.set_float32_matmul_precision("medium")


def _cudnn_off():
    B.cudnn.allow_tf32 = False


USER_STATES = {
    "defaults": lambda: None,
    "legacy matmul on": _set_legacy_true,
    "new matmul ieee": _set_new_matmul,
    "matmul APIs mixed": _mix_matmul,
    "cudnn APIs mixed": _mix_cudnn,
    "precision medium": _medium,
    "cudnn off": _cudnn_off,
}


@pytest.mark.parametrize("state", list(USER_STATES))
@pytest.mark.parametrize("enabled", [True, False])
def test_flags_inside_and_restored_exactly(state, enabled):
    USER_STATES[state]()
    before = _raw_flags()
    with tf32(enabled):
        assert B.cuda.matmul.fp32_precision == ("tf32" if enabled else "ieee")
        expected_conv = (
            "tf32" if enabled else ("none" if before["legacy_cudnn"] != "raises" else "ieee")
        )
        assert B.cudnn.conv.fp32_precision == expected_conv
        if before["matmul_precision"] != "raises":  # the user's flags were consistent: still so
            assert B.cuda.matmul.allow_tf32 is enabled
        if before["legacy_cudnn"] != "raises":
            assert B.cudnn.allow_tf32 is enabled
        if before["mkldnn_matmul"] != "raises":
            assert B.mkldnn.matmul.fp32_precision == before["mkldnn_matmul"]  # CPU untouched
    assert _raw_flags() == before


@pytest.mark.parametrize("state", ["defaults", "matmul APIs mixed", "precision medium"])
def test_restored_after_an_exception_and_when_nested(state):
    USER_STATES[state]()
    before = _raw_flags()
    with pytest.raises(KeyError):
        with tf32():
            raise KeyError("inside")
    assert _raw_flags() == before
    with tf32(True):
        outer = _raw_flags()
        with tf32(False):
            assert B.cuda.matmul.fp32_precision == "ieee"
            with pytest.raises(ValueError):
                with tf32(True):
                    assert B.cuda.matmul.fp32_precision == "tf32"
                    raise ValueError
            assert B.cuda.matmul.fp32_precision == "ieee"
        assert _raw_flags() == outer
    assert _raw_flags() == before


def test_enabled_must_be_a_bool():
    with pytest.raises(TypeError, match="enabled must be a bool, got int 1"):
        with tf32(1):  # type: ignore[arg-type]
            pass


# ------------------------------------------------------------------------ the rounding

TF32_MAX = (2 - 2**-10) * 2.0**127


def _tf32_by_definition(x: float) -> float:
    """The nearest number with 11 significant bits (ties to even), float32's exponent range."""
    if math.isnan(x) or math.isinf(x) or x == 0:
        return x
    _, e = math.frexp(x)  # |x| in [2**(e-1), 2**e)
    spacing = 2.0 ** (max(e, -125) - 11)  # subnormals: the spacing of 2**-126's binade
    r = round(x / spacing) * spacing  # round() of an exact float: ties to even
    return math.copysign(math.inf, x) if abs(r) > TF32_MAX else r


HAND_MADE = [
    (1.0, 1.0),
    (1 + 2**-11, 1.0),  # tie, kept bit even: down
    (1 + 3 * 2**-11, 1 + 2**-9),  # tie, kept bit odd: up
    (1 + 2**-11 + 2**-23, 1 + 2**-10),  # just above the tie
    (1 + 2**-11 - 2**-23, 1.0),  # just below
    (-(1 + 3 * 2**-11), -(1 + 2**-9)),
    (2 - 2**-23, 2.0),  # carries into the exponent
    ((2 - 2**-23) * 2.0**127, math.inf),  # float32 max: above the largest TF32 number
    ((2 - 2**-10) * 2.0**127, (2 - 2**-10) * 2.0**127),  # the largest TF32 number
    (2.0**-130 * (1 + 2**-11), 2.0**-130),  # subnormal, TF32 spacing 2**-136
    (2.0**-149, 0.0),  # the smallest float32 subnormal: below half the spacing
]


@pytest.mark.parametrize(("x", "expected"), HAND_MADE)
def test_rounding_of_hand_made_values(x, expected):
    assert _tf32_by_definition(x) == expected  # the reference agrees with the hand value
    got = float(round_to_tf32(torch.tensor([x], dtype=torch.float32)))
    assert got == expected


def test_specials_and_other_dtypes_pass():
    x = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0])
    out = round_to_tf32(x)
    assert torch.equal(out[:2], x[:2]) and math.isnan(float(out[2]))
    assert torch.equal(out[3:].view(torch.int32), x[3:].view(torch.int32))  # signed zeros
    y = torch.tensor([1 + 2**-20], dtype=torch.float64)
    assert round_to_tf32(y) is y


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=50))
def test_rounding_equals_the_definition(values):
    x = torch.tensor(values, dtype=torch.float32)
    got = round_to_tf32(x).tolist()
    assert got == [_tf32_by_definition(float(v)) for v in x.tolist()]
    finite = x.isfinite() & (x.abs() <= TF32_MAX)
    rel = (round_to_tf32(x) - x).abs()[finite] / x.abs()[finite].clamp_min(2.0**-126)
    assert bool((rel <= TF32_UNIT_ROUNDOFF).all())


# ---------------------------------------------------------------------- the emulation


def test_emulation_rounds_forward_backward_and_transforms_only_in_float32():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 7, generator=g)
    X = torch.randn(7, 3, generator=g)
    with emulate_tf32():
        got = A @ X
        lin = torch.nn.functional.linear(X.T, A)
        conv = torch.nn.functional.conv1d(X.T[None], A[:, :6].reshape(5, 3, 2))
        A64 = A.double() @ X.double()
    expected = round_to_tf32(A) @ round_to_tf32(X)
    assert torch.equal(got, expected)
    torch.testing.assert_close(lin, expected.T, rtol=1e-6, atol=1e-6)
    conv_expected = torch.nn.functional.conv1d(
        round_to_tf32(X.T[None]), round_to_tf32(A[:, :6].reshape(5, 3, 2))
    )
    assert torch.equal(conv, conv_expected)
    assert torch.equal(A64, A.double() @ X.double())  # float64: untouched
    # the backward pass's products: d/dA sum(A X) = 1 X^T, X rounded there too
    A.requires_grad_(True)
    with emulate_tf32():
        (A @ X).sum().backward()
    torch.testing.assert_close(A.grad, torch.ones(5, 3) @ round_to_tf32(X).T, rtol=1e-6, atol=1e-6)
    assert not torch.equal(A.grad, torch.ones(5, 3) @ X.T)
    # inside torch.func: a vmapped jvp of a product
    V = torch.randn(4, 7, 3, generator=g)
    with emulate_tf32():
        tangents = torch.func.vmap(
            lambda v: torch.func.jvp(lambda x: A.detach() @ x, (X,), (v,))[1]
        )(V)
    assert torch.equal(tangents, round_to_tf32(A.detach()) @ round_to_tf32(V))


def _mlp_problem(depth: int, width: int = 32, batch: int = 16):
    widths = [8] + [width] * (depth - 1) + [4]
    model64 = make_mlp(widths, "tanh", seed=depth)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 8, generator=g, dtype=torch.float64)
    y = torch.randn(batch, 4, generator=g, dtype=torch.float64)
    params64 = {k: v.detach() for k, v in model64.named_parameters()}
    v64 = {k: torch.randn(t.shape, generator=g, dtype=torch.float64) for k, t in params64.items()}

    def loss(p, x=x, y=y):
        out = torch.func.functional_call(model64, p, (x.to(next(iter(p.values())).dtype),))
        return ((out - y.to(out.dtype)) ** 2).mean()

    return loss, params64, v64


@pytest.mark.parametrize("depth", [2, 4, 8])
def test_hvp_under_emulation_is_within_the_tf32_bound(depth):
    loss, params64, v64 = _mlp_problem(depth)
    ref = hvp(loss, params64, v64)
    params32 = {k: t.float() for k, t in params64.items()}
    v32 = {k: t.float() for k, t in v64.items()}

    def rel_error(out):
        num = sum(float(((out[k].double() - ref[k]) ** 2).sum()) for k in ref)
        den = sum(float((ref[k] ** 2).sum()) for k in ref)
        return math.sqrt(num / den)

    plain = rel_error(hvp(loss, params32, v32))
    with emulate_tf32():
        emulated = rel_error(hvp(loss, params32, v32))
    bound = TF32_UNIT_ROUNDOFF * math.sqrt(depth)
    assert emulated <= 8 * bound, (emulated, bound)
    assert emulated >= bound / 64, (emulated, bound)  # the emulation does round
    assert plain <= 2**-24 * 64 * math.sqrt(depth)  # plain float32: ~1e-6
    assert plain * 30 <= emulated
