"""nox sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s docs``, ``nox -s benchmarks``.

Every session pins the CPU build of torch 2.13.0 (an unpinned torch can pull a
multi-GB CUDA build).
"""

import nox

TORCH = "torch==2.13.0"
nox.options.sessions = ["tests", "lint"]


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, doctests included (what .ci/run runs)."""
    session.install(TORCH, "-e", ".[test]")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff>=0.4")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "noxfile.py")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the Sphinx docs into docs/_build/html (warnings are errors)."""
    session.install(TORCH, "-e", ".[docs]")
    session.run("sphinx-build", "-W", "-b", "html", "docs", "docs/_build/html")


@nox.session
def benchmarks(session: nox.Session) -> None:
    """Side-by-side benchmarks against the peers (installed by benchmarks/setup_peers.sh)."""
    session.install(TORCH, "-e", ".[test]")
    session.run("bash", "benchmarks/setup_peers.sh", external=True)
    for script in (
        "bench_hutchinson.py",
        "bench_diagonal.py",
        "bench_api_001.py",
        "bench_analysis_001.py",
    ):
        session.run("python", f"benchmarks/{script}", *session.posargs)
