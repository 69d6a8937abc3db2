"""torch-secorder: second-order quantities of PyTorch models on ``torch.func``.

* :mod:`torch_secorder.func`: the engine, pure functions of a parameter pytree.
* :mod:`torch_secorder.linalg`: matrix-free algorithms on any batched product.
* :mod:`torch_secorder.operators`: curvature matrices (Hessian, GGN, Fisher) of a
  model's loss over a data set, as linear operators.
* :mod:`torch_secorder.core`, :mod:`torch_secorder.approximations`,
  :mod:`torch_secorder.analysis`: the documented API of torch-secorder 0.0.1,
  rebuilt on the engine.

Every public name of the three API subpackages is also exported here, with the
operators and the exception classes of :mod:`torch_secorder.errors`.
"""

from torch_secorder import analysis, approximations, core, func, linalg, operators, precision
from torch_secorder.analysis import *  # noqa: F401,F403
from torch_secorder.approximations import *  # noqa: F401,F403
from torch_secorder.core import *  # noqa: F401,F403
from torch_secorder.errors import ShapeError, StrictError, UnsupportedShapeError
from torch_secorder.operators import (
    CurvatureOperator,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)

__version__ = "0.1.0"

__all__ = [
    "func",
    "linalg",
    "core",
    "approximations",
    "analysis",
    "operators",
    "precision",
    "CurvatureOperator",
    "HessianOperator",
    "GGNOperator",
    "EmpiricalFisherOperator",
    "FisherOperator",
    "ShapeError",
    "StrictError",
    "UnsupportedShapeError",
    *core.__all__,
    *approximations.__all__,
    *analysis.__all__,
]
