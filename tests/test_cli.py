"""``python -m torch_secorder`` (issue 7, section 5).

Bad options are argparse errors (usage line, exit status 2), not tracebacks; the
main job prints no warning (NumPy is a declared dependency, so torch does not warn
that it is missing) and its timings are of warm calls, with the first call's time
beside them.  One run of the main job on the smallest model.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from torch_secorder.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
BAD_OPTIONS = [
    (["--samples", "0"], r"argument --samples: expected an int >= 1, got 0"),
    (["--samples", "-3"], r"argument --samples: expected an int >= 1, got -3"),
    (["--samples", "2.5"], r"argument --samples: expected an int >= 1, got '2.5'"),
    (["--samples", "many"], r"argument --samples: expected an int >= 1, got 'many'"),
    (["--seed", "-1"], r"argument --seed: expected an int in \[0, 2\*\*63\), got -1"),
    (["--seed", str(2**64)], r"argument --seed: expected an int in \[0, 2\*\*63\)"),
    (["--model", "vgg"], r"argument --model: invalid choice: 'vgg'"),
    (["--dtype", "float16"], r"argument --dtype: invalid choice: 'float16'"),
    (["--bogus"], r"unrecognized arguments: --bogus"),
]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.parametrize("argv, message", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_options_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m torch_secorder")
    assert re.search(message, err), err


def test_a_bad_option_from_the_shell_prints_usage_not_a_traceback():
    run = subprocess.run(
        [sys.executable, "-m", "torch_secorder", "--samples", "0"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert "error: argument --samples: expected an int >= 1, got 0" in run.stderr


def test_the_main_job_prints_no_warning_and_warm_timings():
    run = subprocess.run(
        [sys.executable, "-m", "torch_secorder", "--samples", "3", "--no-progress"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # no warning (NumPy, deprecations) and no progress bar
    out = run.stdout
    timed = [line for line in out.splitlines() if " s warm; first call " in line]
    assert len(timed) == 3, out  # exact trace, Hutchinson, exact diagonal
    exact = float(re.search(r"exact trace:\s+(\S+)", out).group(1))
    total = float(re.search(r"sum of the diagonal = (\S+)", out).group(1))
    assert abs(exact - total) <= 1e-9 * abs(exact)
    estimate = re.search(r"Hutchinson \(3 probes\):\s+(\S+) \+- (\S+)", out)
    assert estimate is not None, out


def test_numpy_is_a_declared_runtime_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=!~ \[]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]]
    assert "numpy" in names
