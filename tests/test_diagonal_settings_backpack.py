"""BackPACK's second-order test settings: the exact Hessian and GGN diagonals against the
dense float64 matrices, to 1e-10.

The settings (tests/diagonal_settings.py) are BackPACK's ``test/extensions/secondorder``
problems rebuilt in float64: activations, 1d/2d/3d max/average/adaptive pooling, 1d/2d/3d
convolutions (grouped, transposed, padded, dilated, strided), padding and slicing,
linear layers on extra dimensions, multi-dimensional cross-entropy, BCE with logits,
MSE, recurrent layers, eval-mode batch norm, embeddings, branches and its ResNets.
Convolutions and poolings are also drawn by hypothesis.  The routes each parameter
takes are asserted in tests/test_diagonal_graph_routes.py, not here; BackPACK itself
(a second witness) is compared in benchmarks/bench_diagonal_architectures.py, since
it is not installed in CI.
"""

from __future__ import annotations

import pytest
from conftest import assert_close
from diagonal_settings import (
    BACKPACK_SETTINGS,
    Setting,
    conv_settings,
    dense_ggn_diagonal,
    dense_hessian_diagonal,
    ours_ggn_diagonal,
    ours_hessian_diagonal,
    pool_settings,
)
from hypothesis import given, settings


def _name(setting: Setting) -> str:
    return setting.name


def check_hessian(setting: Setting) -> None:
    built = setting.build()
    assert_close(ours_hessian_diagonal(built), dense_hessian_diagonal(built))


def check_ggn(setting: Setting) -> None:
    built = setting.build()
    assert_close(ours_ggn_diagonal(built), dense_ggn_diagonal(built))


@pytest.mark.parametrize("setting", BACKPACK_SETTINGS, ids=_name)
def test_hessian_diagonal(setting: Setting) -> None:
    check_hessian(setting)


@pytest.mark.parametrize("setting", BACKPACK_SETTINGS, ids=_name)
def test_ggn_diagonal(setting: Setting) -> None:
    check_ggn(setting)


@settings(max_examples=6, deadline=None)
@given(setting=conv_settings())
def test_drawn_convolutions(setting: Setting) -> None:
    check_hessian(setting)
    check_ggn(setting)


@settings(max_examples=6, deadline=None)
@given(setting=pool_settings())
def test_drawn_poolings(setting: Setting) -> None:
    check_hessian(setting)
    check_ggn(setting)
