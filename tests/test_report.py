"""``python -m torch_secorder report`` (issue 11).

The report of the built-in problem and of a user's model given by module path:
the HTML exists, embeds every figure (the same bytes as the PNG beside it), and
states the trace and eigenvalues that the library returns for the same seed; the
user model's numbers are checked against the dense Hessian from ``torch.func``;
every PNG decodes with its stated size; bad paths and raising factories give
errors naming the path; the page renders to a non-blank screenshot in headless
Chromium where it is installed.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_close, dense_hessian, seeded_tanh_mlp_problem

from torch_secorder import compute_loss_surface_1d, create_random_direction, model_hessian_trace
from torch_secorder.__main__ import main
from torch_secorder.linalg import hutchinson_adaptive, hutchinson_diagonal, lanczos_eigsh
from torch_secorder.operators import HessianOperator
from torch_secorder.report import (
    FIGURES,
    ReportOptions,
    compute_report,
    default_problem,
    write_report,
)
from torch_secorder.report.compute import _basis_size, step_generator

pytest.importorskip("matplotlib", reason="the report needs matplotlib (the test extra has it)")

ROOT = Path(__file__).resolve().parents[1]

# Small settings: the report of the built-in problem in a few seconds.
FAST = [
    "--top-k", "2", "--bottom-k", "1", "--eig-iters", "12", "--slq-steps", "5",
    "--slq-probes", "2", "--points-1d", "5", "--points-2d", "4", "--quiet",
]  # fmt: skip

USER_MODULE = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def model():
    g = torch.Generator().manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return net


def tensors():
    g = torch.Generator().manual_seed(5)
    return (torch.randn(30, 3, generator=g, dtype=torch.float64),
            torch.randn(30, 2, generator=g, dtype=torch.float64))


def loader():
    return DataLoader(TensorDataset(*tensors()), batch_size=10)


def half_squared_error(outputs, targets):
    return 0.5 * ((outputs - targets) ** 2).sum(dim=1).mean()


def raising():
    raise ValueError("no weights on this machine")


def not_a_model():
    return 42


def a_tensor():
    return torch.zeros(3)


NOT_CALLABLE = 5
"""


def _values(page: str) -> dict[str, float]:
    """``{data-name: data-value}`` of every number the page states."""
    found = re.findall(r'data-name="([^"]+)" data-value="([^"]+)">([^<]*)<', page)
    out = {}
    for name, value, text in found:
        out[name] = float(value)
        # the text shown is the same number, rounded
        if text not in ("nan", "inf", "-inf"):
            assert abs(float(text) - float(value)) <= 1e-2 * abs(float(value)) + 1e-300, name
    return out


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _check_figures(out: Path, page: str) -> None:
    """Every figure embedded (the PNG's bytes), decodes, and has the stated size."""
    from PIL import Image

    embedded = dict(
        (name, base64.b64decode(data))
        for data, name in re.findall(
            r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"[^>]*data-file="([^"]+)"', page
        )
    )
    assert sorted(embedded) == sorted(FIGURES)
    assert 'src="http' not in page and "src='http" not in page  # nothing outside the page
    for name, size in FIGURES.items():
        data = (out / name).read_bytes()
        assert embedded[name] == data
        assert _png_size(data) == size
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes the whole image
            assert image.size == size
            assert len(image.getcolors(maxcolors=1 << 20) or range(1 << 20)) > 8, name


def _run_in_process(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def default_report(tmp_path_factory) -> tuple[Path, str, str]:
    out = tmp_path_factory.mktemp("default_report")
    torch.set_num_threads(2)
    code, stdout, stderr = _run_in_process(
        ["report", "--seed", "4", "--train-steps", "5", "--out", str(out), *FAST]
    )
    assert code == 0, stderr
    return out, stdout, stderr


def test_default_report_states_the_numbers_the_library_returns(default_report):
    out, stdout, stderr = default_report
    assert stderr == ""  # --quiet: no progress bars
    page_path = out / "report.html"
    assert f"report: {page_path}" in stdout
    page = page_path.read_text()
    values = _values(page)

    model, loss_fn, data = default_problem(4, train_steps=5)
    exact = model_hessian_trace(model, loss_fn, data=data, progress=False)
    assert abs(values["trace"] - float(exact)) <= 1e-10 * abs(float(exact))

    H = HessianOperator(model, loss_fn, data)
    n = H.shape[0]
    common = dict(max_iter=12, tol=1e-5, dtype=H.dtype, ncv=_basis_size(n, 2, 1))
    for which, prefix, k in (("LA", "top", 2), ("SA", "bottom", 1)):
        res = lanczos_eigsh(
            H.matmat,
            n,
            k,
            which=which,
            generator=step_generator(4, prefix, H.device),
            **common,
        )
        for i in range(k):
            assert values[f"{prefix}{i}"] == pytest.approx(float(res.eigenvalues[i]), rel=1e-9)
            assert values[f"{prefix}_residual{i}"] == pytest.approx(
                float(res.residuals[i]), rel=1e-3, abs=1e-12
            )
    # the per-parameter table sums to the trace
    blocks = [v for k, v in values.items() if k.startswith("block_trace:")]
    assert len(blocks) == len(list(model.parameters()))
    assert abs(sum(blocks) - float(exact)) <= 1e-5 * abs(float(exact))


def test_default_report_embeds_every_figure_with_its_size(default_report):
    out, _, _ = default_report
    _check_figures(out, (out / "report.html").read_text())


def _user_module(tmp_path: Path, monkeypatch=None) -> str:
    name = f"user_factories_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    if monkeypatch is not None:
        monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _dense_user_hessian(mod) -> torch.Tensor:
    model = mod.model()
    x, y = mod.tensors()
    names = [name for name, _ in model.named_parameters()]

    def loss(params: list[torch.Tensor]) -> torch.Tensor:
        outputs = torch.func.functional_call(model, dict(zip(names, params)), (x,))
        return torch.nn.functional.mse_loss(outputs, y)

    return dense_hessian(loss, list(model.parameters()))  # rows in named_parameters() order


def test_user_model_by_module_path_in_a_subprocess(tmp_path):
    """--model/--data/--loss by path (a DataLoader of 3 batches), against the dense Hessian."""
    name = _user_module(tmp_path)
    out = tmp_path / "report"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(tmp_path)])
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch_secorder",
            "report",
            "--model",
            f"{name}:model",
            "--data",
            f"{name}:loader",
            "--loss",
            "mse",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--seed",
            "3",
            "--top-k",
            "3",
            "--bottom-k",
            "2",
            "--slq-steps",
            "10",
            "--slq-probes",
            "2",
            "--points-1d",
            "5",
            "--points-2d",
            "4",
            "--quiet",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert f"report: {out / 'report.html'}" in run.stdout
    page = (out / "report.html").read_text()
    _check_figures(out, page)
    values = _values(page)

    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        mod = importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))
    dense = _dense_user_hessian(mod)
    eigs = torch.linalg.eigvalsh(dense)
    assert abs(values["trace"] - float(dense.trace())) <= 1e-10 * float(dense.abs().sum())
    top = [values[f"top{i}"] for i in range(3)]
    bottom = [values[f"bottom{i}"] for i in range(2)]
    assert_close(torch.tensor(top, dtype=torch.float64), eigs.flip(0)[:3], tol=1e-8)
    assert_close(torch.tensor(bottom, dtype=torch.float64), eigs[:2], tol=1e-8)
    assert bottom[0] < 0  # the test problem is indefinite: there is negative curvature to report
    # the per-parameter diagonal statistics are those of the dense Hessian's diagonal
    diag = dense.diagonal()
    model = mod.model()
    start = 0
    for pname, p in model.named_parameters():
        block = diag[start : start + p.numel()]
        start += p.numel()
        assert values[f"block_trace:{pname}"] == pytest.approx(float(block.sum()), rel=1e-5)
        assert values[f"diag_max:{pname}"] == pytest.approx(float(block.max()), rel=1e-3)


def test_user_loss_by_path_and_a_tensor_pair(tmp_path, monkeypatch):
    """A loss function by path (no declared reduction: one batch needs none); --device and
    --dtype; without --quiet, the progress bar and a summary."""
    name = _user_module(tmp_path, monkeypatch)
    out = tmp_path / "report"
    code, stdout, stderr = _run_in_process(
        ["report", "--model", f"{name}:model", "--data", f"{name}:tensors", "--loss",
         f"{name}:half_squared_error", "--out", str(out), "--device", "cpu", "--dtype",
         "float64", *[a for a in FAST if a != "--quiet"]]
    )  # fmt: skip
    assert code == 0, stderr
    assert "curvature report" in stderr  # the progress bar over the steps
    assert re.search(r"Hessian trace: \S+ \(exact\)", stdout), stdout
    import importlib

    mod = importlib.import_module(name)
    dense = _dense_user_hessian(mod)  # half the summed squared error over outputs = mse * 2 / 2
    values = _values((out / "report.html").read_text())
    assert abs(values["trace"] - float(dense.trace())) <= 1e-10 * float(dense.abs().sum())


BAD = [
    (["--model", "{m}", "--data", "{m}:tensors"], 2,
     "--model '{m}': expected 'package.module:name'"),
    (["--model", "no_such_module_xyz:model", "--data", "{m}:tensors"], 2,
     "--model 'no_such_module_xyz:model': cannot import module 'no_such_module_xyz'"),
    (["--model", "{m}:missing", "--data", "{m}:tensors"], 2,
     "--model '{m}:missing': module '{m}' has no attribute 'missing'"),
    (["--model", "{m}:NOT_CALLABLE", "--data", "{m}:tensors"], 2,
     "--model '{m}:NOT_CALLABLE': expected a callable factory, got int"),
    (["--model", "{m}:not_a_model", "--data", "{m}:tensors"], 2,
     "--model '{m}:not_a_model': the factory must return a torch.nn.Module, got int"),
    (["--model", "{m}:raising", "--data", "{m}:tensors"], 1,
     "--model '{m}:raising': the factory raised ValueError: no weights on this machine"),
    (["--model", "{m}:model", "--data", "{m}:raising"], 1,
     "--data '{m}:raising': the factory raised ValueError: no weights on this machine"),
    (["--model", "{m}:model", "--data", "{m}:a_tensor"], 2,
     "--data '{m}:a_tensor': the factory must return a pair (inputs, targets) of tensors or a "
     "DataLoader"),
    (["--model", "{m}:model", "--data", "nowhere_xyz.sub:data"], 2,
     "--data 'nowhere_xyz.sub:data': cannot import module 'nowhere_xyz.sub'"),
    (["--model", "{m}:model", "--data", "{m}:tensors", "--loss", "hinge"], 2,
     "--loss 'hinge': expected one of ['cross_entropy', 'mse'] or 'package.module:name'"),
    (["--model", "{m}:model", "--data", "{m}:tensors", "--loss", "{m}:nope"], 2,
     "--loss '{m}:nope': module '{m}' has no attribute 'nope'"),
    (["--model", "{m}:model"], 2, "--model and --data go together"),
    (["--top-k", "0"], 2, "argument --top-k: expected an int >= 1, got 0"),
    (["--span", "-1"], 2, "argument --span: expected a positive number, got -1.0"),
]  # fmt: skip


@pytest.mark.parametrize("argv, code, message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_paths_and_raising_factories_name_the_path(tmp_path, monkeypatch, argv, code, message):
    m = _user_module(tmp_path, monkeypatch)
    argv = [a.replace("{m}", m) for a in argv]
    status, stdout, stderr = _run_in_process(["report", *argv, "--out", str(tmp_path / "r")])
    assert status == code, stderr
    assert message.replace("{m}", m) in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("python -m torch_secorder report: error:"), (
        stderr
    )
    assert not (tmp_path / "r").exists()


def test_an_error_of_the_library_on_the_users_model_is_a_message(tmp_path, monkeypatch):
    """cross_entropy on real-valued 2-column targets: the library's error, no traceback."""
    m = _user_module(tmp_path, monkeypatch)
    status, _, stderr = _run_in_process(
        ["report", "--model", f"{m}:model", "--data", f"{m}:loader", "--loss",
         f"{m}:half_squared_error", "--out", str(tmp_path / "r"), *FAST]
    )  # fmt: skip
    assert status == 1
    assert "Traceback" not in stderr
    assert "reduction" in stderr  # a plain function over 3 batches must say how it reduces


def test_without_matplotlib_the_command_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    status, _, stderr = _run_in_process(["report", "--out", str(tmp_path / "r"), *FAST])
    assert status == 1
    assert "pip install torch-secorder[plot]" in stderr
    assert not (tmp_path / "r").exists()


def test_report_help_and_the_default_command_beside_it():
    status, stdout, _ = _run_in_process(["report", "--help"])
    assert status == 0
    assert stdout.startswith("usage: python -m torch_secorder report")
    assert "--model package.module:factory" in stdout
    status, stdout, _ = _run_in_process(["--help"])
    assert status == 0 and "python -m torch_secorder report" in stdout


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_the_page_renders_in_headless_chromium(default_report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip(
            "no Chromium on this machine (looked for chromium, chromium-browser, google-chrome): "
            "apt-get install chromium to render the report headless"
        )
    from PIL import Image, ImageStat

    out, _, _ = default_report
    shot = tmp_path / "screenshot.png"
    command = [
        browser, "--headless", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}",
        "--window-size=1100,2400", f"--user-data-dir={tmp_path / 'profile'}",
        (out / "report.html").as_uri(),
    ]  # fmt: skip
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    with Image.open(shot) as image:
        rgb = image.convert("RGB")
        assert rgb.size == (1100, 2400)
        stat = ImageStat.Stat(rgb)
        colors = rgb.getcolors(maxcolors=1 << 22)
    # not blank: many colours (text, the figures' colour maps) and contrast
    assert colors is None or len(colors) > 200
    assert max(stat.stddev) > 20
    # the top of the page is the white background with dark text, as styled
    assert max(stat.mean) > 150


def _small_problem():
    model, x, y = seeded_tanh_mlp_problem(1, 20, 3, 4, 2, "mse")
    loss_fn = torch.nn.MSELoss()
    names = [name for name, _ in model.named_parameters()]

    def loss(params: list[torch.Tensor]) -> torch.Tensor:
        return loss_fn(torch.func.functional_call(model, dict(zip(names, params)), (x,)), y)

    return model, loss_fn, (x, y), dense_hessian(loss, list(model.parameters()))


SMALL = dict(slq_steps=6, slq_probes=2, points_1d=3, points_2d=3, top_k=2, bottom_k=1)


def test_the_estimated_trace_when_exact_is_not_affordable():
    """Over ``exact_limit`` parameters: Hutchinson with its error bar, the same as the library's."""
    model, loss_fn, data, dense = _small_problem()
    options = ReportOptions(trace="auto", exact_limit=10, trace_rtol=0.05, diag_samples=50, **SMALL)
    report = compute_report(model, loss_fn, data, seed=2, options=options, progress=False)
    assert not report.diagonal_exact
    assert report.trace_method.startswith("Hutchinson estimate")
    H = HessianOperator(model, loss_fn, data)
    est = hutchinson_adaptive(
        H.matmat, H.shape[0], rtol=0.05, max_matvecs=options.trace_max_matvecs,
        generator=step_generator(2, "trace", H.device), dtype=H.dtype, progress=False,
    )  # fmt: skip
    assert report.trace == float(est.estimate)
    assert report.trace_std_error == float(est.std_error) > 0
    assert report.trace_matvecs == est.matvecs
    # the estimate is an estimate of the dense Hessian's trace: within 4 standard errors
    assert abs(report.trace - float(dense.trace())) <= 4 * report.trace_std_error
    diag = torch.cat([d.reshape(-1) for d in report.diagonals])
    expected = hutchinson_diagonal(
        H.matmat, H.shape[0], 50, generator=step_generator(2, "diagonal", H.device),
        dtype=H.dtype, progress=False,
    ).estimate  # fmt: skip
    assert_close(diag, expected)
    html = write_report(report, Path(tempfile.mkdtemp(prefix="h11_")), "test").read_text()
    values = _values(html)
    assert values["trace"] == report.trace and values["trace_std_error"] == report.trace_std_error
    assert "(estimated)" in html or "estimated by Hutchinson" in html


def test_landscapes_along_the_top_eigenvectors_curve_as_their_eigenvalues():
    """``directions="eigen"``: along ``d = s y`` (``y`` the unit top eigenvector, ``s`` the
    parameter norm) the second difference of the loss is ``s**2 * lambda_1``."""
    model, loss_fn, data, dense = _small_problem()
    h = 1e-3
    options = ReportOptions(directions="eigen", span=h, **SMALL)
    report = compute_report(model, loss_fn, data, seed=0, options=options, progress=False)
    eigs = torch.linalg.eigvalsh(dense).flip(0)
    assert_close(report.top.eigenvalues, eigs[:2], tol=1e-8)
    s2 = float(sum(p.detach().pow(2).sum() for p in model.parameters()))
    for (label, (alphas, losses)), lam in zip(report.landscape_1d.items(), eigs[:2]):
        assert_close(alphas, torch.tensor([-h, 0.0, h], dtype=torch.float64))
        second = float(losses[0] - 2 * losses[1] + losses[2]) / h**2
        assert second == pytest.approx(s2 * float(lam), rel=1e-4), label
    with torch.no_grad():
        loss = float(loss_fn(model(data[0]), data[1]))
    assert report.loss == pytest.approx(loss, rel=1e-12)
    a, b, surface = report.landscape_2d
    assert_close(surface[1, 1], torch.tensor(report.loss, dtype=torch.float64))


def test_frozen_parameters_stay_out_of_the_hessian_and_the_landscapes():
    model, loss_fn, data, _ = _small_problem()
    model[0].weight.requires_grad_(False)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    before = [p.detach().clone() for p in model.parameters()]
    options = ReportOptions(**SMALL)
    report = compute_report(model, loss_fn, data, seed=5, options=options, progress=False)
    assert report.names == names and report.num_params == 4 * 1 + 2 * 4 + 2
    # the Hessian over the trainable parameters: the trace of the dense block
    dense = _small_problem()[3]
    keep = torch.ones(dense.shape[0], dtype=torch.bool)
    keep[: 4 * 3] = False  # 0.weight comes first in named_parameters()
    assert report.trace == pytest.approx(float(dense[keep][:, keep].trace()), rel=1e-10)
    # the random directions: filter-normalised, zero on the frozen weight
    gen = step_generator(5, "directions", torch.device("cpu"))
    d1 = create_random_direction(model, normalization="filter", generator=gen)
    d1[0] = torch.zeros_like(d1[0])
    alphas, losses = compute_loss_surface_1d(model, loss_fn, *data, d1, (-1.0, 1.0), 3)
    assert_close(next(iter(report.landscape_1d.values()))[1], losses)
    assert not model[0].weight.requires_grad
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
