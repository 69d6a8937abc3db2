"""The two examples of the seed documentation page (``hessian_trace.rst`` of 0.0.1) run and
give the right numbers.

The examples are embedded verbatim (0.0.1 users copied them; they must keep working), and
the page in ``docs/`` is checked too when it exists: its code blocks that play the same
roles are run the same way.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import dense_hessian
from torch.func import functional_call

SEED_QUADRATIC = """\
import torch
from torch_secorder.core.hessian_trace import hessian_trace

x = torch.tensor([1.0, 2.0], requires_grad=True)

def quadratic():
    return x.pow(2).sum()

# Estimate the trace with 1000 samples
trace = hessian_trace(quadratic, [x], num_samples=1000)
print(trace)  # Should be close to 4.0 (trace of 2I)
"""

SEED_MODEL = """\
import torch
import torch.nn as nn
from torch_secorder.core.hessian_trace import model_hessian_trace

# Create a simple neural network
model = nn.Linear(10, 1)
x = torch.randn(5, 10)
y = torch.randn(5, 1)

# Estimate the trace of the Hessian for the MSE loss
trace = model_hessian_trace(model, nn.functional.mse_loss, x, y)
print(f"Estimated Hessian Trace: {trace}")
"""

DOCS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "hessian_trace.rst"


def code_blocks(rst: str) -> list[str]:
    """The bodies of the ``.. code-block:: python`` directives of a reST page, dedented."""
    blocks = []
    for match in re.finditer(r"\.\. code-block:: python\n\n((?:(?:    .*)?\n)+)", rst):
        lines = match.group(1).rstrip().split("\n")
        blocks.append("\n".join(line[4:] for line in lines) + "\n")
    return blocks


def run(code: str) -> tuple[dict, str]:
    namespace: dict = {"__name__": "__seed_example__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<seed example>", "exec"), namespace)
    return namespace, out.getvalue()


def check_quadratic(code: str) -> None:
    namespace, printed = run(code)
    trace = namespace["trace"]
    assert isinstance(trace, torch.Tensor) and trace.shape == ()
    # 1000 probes >= 2 parameter entries: the exact trace of 2I, not an estimate.
    assert float(trace) == 4.0
    assert printed.splitlines()[0] == "tensor(4.)"


def check_model(code: str) -> None:
    torch.manual_seed(0)
    namespace, printed = run(code)
    model, x, y, trace = (namespace[k] for k in ("model", "x", "y", "trace"))
    assert trace.shape == () and trace.dtype == torch.float32
    oracle_model = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in oracle_model.named_parameters()}
    H = dense_hessian(
        lambda p: F.mse_loss(functional_call(oracle_model, p, (x.double(),)), y.double()), params
    )
    torch.testing.assert_close(trace.double(), torch.trace(H), rtol=1e-5, atol=1e-6)
    # Closed form for a linear model and the mean squared error: 2 (||x||^2 / N + 1).
    closed = 2 * (x.double().pow(2).sum() / x.shape[0] + 1)
    torch.testing.assert_close(torch.trace(H), closed, rtol=1e-12, atol=1e-12)
    printed_value = re.search(r"Hessian Trace: (\S+)", printed)
    assert printed_value is not None, printed
    assert float(printed_value.group(1)) == pytest.approx(float(trace), rel=1e-6)


def test_seed_page_quadratic_example_is_exact():
    check_quadratic(SEED_QUADRATIC)


def test_seed_page_model_example_equals_the_dense_hessian_trace():
    check_model(SEED_MODEL)


def test_embedded_examples_are_those_of_the_page_format():
    """The extractor reads the embedded examples back from a reST page (self-check)."""
    page = "".join(
        ".. code-block:: python\n\n"
        + "".join(f"    {line}\n" if line else "\n" for line in code.splitlines())
        + "\nText\n"
        for code in (SEED_QUADRATIC, SEED_MODEL)
    )
    assert code_blocks(page) == [SEED_QUADRATIC, SEED_MODEL]


@pytest.mark.parametrize("role", ["quadratic", "model"])
def test_docs_page_examples(role):
    """The page in ``docs/`` (or, before it exists, the seed examples) runs as documented."""
    blocks = (
        code_blocks(DOCS_PAGE.read_text()) if DOCS_PAGE.exists() else [SEED_QUADRATIC, SEED_MODEL]
    )
    if role == "quadratic":
        matching = [b for b in blocks if "def quadratic" in b and "num_samples=1000" in b]
        assert matching, "the page lost the quadratic example"
        check_quadratic(matching[0])
    else:
        matching = [
            b for b in blocks if "model_hessian_trace(model" in b and "nn.Linear(10, 1)" in b
        ]
        assert matching, "the page lost the model example"
        check_model(matching[0])
