"""Loaders for the peer libraries used in the side-by-side benchmarks.

Every ``load_*`` function returns a :class:`Loaded` ``(module, reason)`` pair:
``module`` is ``None`` when the peer is unavailable and ``reason`` then says why,
so a benchmark can print ``skipped: <reason>`` instead of failing::

    pyh, why = load_pyhessian()
    if pyh is None:
        print(f"PyHessian skipped: {why}")

Install the peers with ``bash benchmarks/setup_peers.sh`` (see README.md).

torch-secorder 0.0.1 shares the import name ``torch_secorder`` with this
repository's package.  It is installed with ``pip --target`` into
``benchmarks/.peer_site/secorder001`` and :func:`load_secorder_001` imports it
under the alias ``secorder001`` while leaving ``import torch_secorder`` pointing
at our package, so both can be timed in one process.

``python benchmarks/_peers.py --check`` imports every peer and runs one tiny call
on each (used by setup_peers.sh).
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.metadata
import os
import pkgutil
import sys
import types
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "Loaded",
    "SECORDER_001_ALIAS",
    "SECORDER_001_DIR",
    "block_imports",
    "load_backpack",
    "load_curvlinops",
    "load_eigenthings",
    "load_pyhessian",
    "load_secorder_001",
    "peer_versions",
]

PEER_SITE = Path(__file__).resolve().parent / ".peer_site"
#: Where ``setup_peers.sh`` installs torch-secorder 0.0.1 (override with the
#: ``TORCH_SECORDER_001_DIR`` environment variable).
SECORDER_001_DIR = Path(os.environ.get("TORCH_SECORDER_001_DIR", PEER_SITE / "secorder001"))
#: ``sys.modules`` prefix under which the old package is registered.
SECORDER_001_ALIAS = "secorder001"

_DISTRIBUTIONS = {
    "curvlinops": "curvlinops-for-pytorch",
    "pyhessian": "PyHessian",
    "backpack": "backpack-for-pytorch",
    "hessian_eigenthings": "hessian-eigenthings",
}


class Loaded(NamedTuple):
    """Result of a ``load_*`` call: the module (or namespace) or ``None`` plus why."""

    module: Any
    reason: str | None = None

    def __bool__(self) -> bool:
        return self.module is not None


def _import(name: str) -> Loaded:
    try:
        return Loaded(importlib.import_module(name))
    except Exception as exc:  # noqa: BLE001 - any failure means "skip this peer"
        dist = _DISTRIBUTIONS.get(name, name)
        return Loaded(None, f"{dist} not importable ({type(exc).__name__}: {exc})")


@functools.cache
def load_pyhessian() -> Loaded:
    """``pyhessian`` (PyHessian 0.1); use ``pyhessian.hessian(model, crit, data=..., cuda=...)``."""
    return _import("pyhessian")


@functools.cache
def load_curvlinops() -> Loaded:
    """``curvlinops`` (curvlinops-for-pytorch 3.0.1)."""
    return _import("curvlinops")


@functools.cache
def load_backpack() -> Loaded:
    """``backpack`` (backpack-for-pytorch 1.7.1).

    backpack declares a dependency on torchvision but only
    ``backpack/utils/examples.py`` imports it, and nothing we use imports that
    module (checked for extend() on Linear/Conv2d/Tanh/ReLU/Flatten/MSELoss/
    CrossEntropyLoss with DiagHessian/DiagGGN/BatchGrad; ``--check`` verifies
    with torchvision blocked).  So it is installed with ``--no-deps`` and no
    stub is needed.
    """
    return _import("backpack")


@functools.cache
def load_eigenthings() -> Loaded:
    """``hessian_eigenthings`` (hessian-eigenthings 1.0.0a5)."""
    return _import("hessian_eigenthings")


def _owned(name: str, key: str) -> bool:
    return key == name or key.startswith(name + ".")


def _import_aliased(path: Path, name: str, alias: str) -> types.ModuleType:
    """Import package ``name`` from directory ``path`` and register it as ``alias``.

    All of the package's submodules are imported eagerly (so that nothing is
    imported lazily later, by which time ``name`` means our package again), then
    every ``name*`` entry of ``sys.modules`` is moved to ``alias*``.  ``sys.path``
    and any ``name*`` modules that were loaded before are restored afterwards.
    """
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if _owned(name, k)}
    entry = str(path)
    sys.path.insert(0, entry)
    importlib.invalidate_caches()
    loaded: dict[str, types.ModuleType] = {}
    try:
        pkg = importlib.import_module(name)
        origin = Path(pkg.__file__ or "").resolve()
        if path.resolve() not in origin.parents:
            raise ImportError(f"{name} was imported from {origin}, not from {path}")
        for info in pkgutil.walk_packages(pkg.__path__, prefix=name + "."):
            importlib.import_module(info.name)
        loaded = {k: sys.modules.pop(k) for k in list(sys.modules) if _owned(name, k)}
    finally:
        for k in [k for k in sys.modules if _owned(name, k)]:  # partial imports on failure
            del sys.modules[k]
        sys.path.remove(entry)
        sys.path_importer_cache.pop(entry, None)
        sys.modules.update(saved)
        importlib.invalidate_caches()

    for old_name, mod in loaded.items():
        new_name = alias + old_name[len(name) :]
        is_pkg = hasattr(mod, "__path__")
        mod.__name__ = new_name
        mod.__package__ = new_name if is_pkg else new_name.rpartition(".")[0]
        if mod.__spec__ is not None:
            mod.__spec__.name = new_name
        sys.modules[new_name] = mod
    return sys.modules[alias]


@functools.cache
def load_secorder_001() -> Loaded:
    """torch-secorder 0.0.1, imported beside ours under the alias ``secorder001``.

    The returned namespace has

    * every public name of the 0.0.1 top level (``__all__``), e.g. ``exact_hvp``,
      ``hessian_trace`` (0.0.1's *exact* trace = sum of ``hessian_diagonal``, one
      HVP per parameter entry), ``hessian_diagonal``, ``model_hvp``, ``jvp``,
      ``vjp``, ``batch_jvp``, ``batch_vjp``, ``full_jacobian``, ``power_iteration``,
      ``lanczos_iteration``, ``estimate_eigenvalues``, ...;
    * the submodules under short names: ``hvp`` (``hvp.hessian_trace`` is 0.0.1's
      Hutchinson estimator, ``hvp.exact_hvp``), ``gvp``, ``utils``,
      ``hessian_diagonal_mod``, ``hessian_trace_mod``, ``per_layer_curvature``,
      ``eigensolvers``, ``landscape``, ``fisher_diagonal``, ``fisher_trace``,
      ``gauss_newton``, and the packages ``core``, ``analysis``, ``approximations``;
    * ``package`` (the aliased top-level module), ``__version__`` and ``path``.
    """
    path = SECORDER_001_DIR
    if not (path / "torch_secorder" / "__init__.py").is_file():
        return Loaded(
            None,
            f"torch-secorder 0.0.1 not installed in {path} (run benchmarks/setup_peers.sh)",
        )
    try:
        pkg = _import_aliased(path, "torch_secorder", SECORDER_001_ALIAS)
    except Exception as exc:  # noqa: BLE001
        return Loaded(None, f"torch-secorder 0.0.1 failed to import ({type(exc).__name__}: {exc})")

    ns = types.SimpleNamespace()
    for attr in getattr(pkg, "__all__", []):
        setattr(ns, attr, getattr(pkg, attr))
    a = SECORDER_001_ALIAS
    short = {
        "core": a + ".core",
        "analysis": a + ".analysis",
        "approximations": a + ".approximations",
        "hvp": a + ".core.hvp",
        "gvp": a + ".core.gvp",
        "utils": a + ".core.utils",
        "hessian_diagonal_mod": a + ".core.hessian_diagonal",
        "hessian_trace_mod": a + ".core.hessian_trace",
        "per_layer_curvature": a + ".core.per_layer_curvature",
        "eigensolvers": a + ".analysis.eigensolvers",
        "landscape": a + ".analysis.landscape",
        "fisher_diagonal": a + ".approximations.fisher_diagonal",
        "fisher_trace": a + ".approximations.fisher_trace",
        "gauss_newton": a + ".approximations.gauss_newton",
    }
    for attr, mod_name in short.items():
        if mod_name in sys.modules:
            setattr(ns, attr, sys.modules[mod_name])
    ns.package = pkg
    ns.__version__ = getattr(pkg, "__version__", "?")
    ns.path = path
    return Loaded(ns)


def peer_versions() -> dict[str, str]:
    """Installed versions of torch and the peers (``'missing'`` if absent)."""
    out = {}
    for dist in ["torch", *_DISTRIBUTIONS.values()]:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "missing"
    old = load_secorder_001()
    out["torch-secorder==0.0.1"] = old.module.__version__ if old else "missing"
    return out


class _Blocker(importlib.abc.MetaPathFinder):
    def __init__(self, names: tuple[str, ...]):
        self.names = names

    def find_spec(self, fullname, path=None, target=None):  # noqa: ARG002
        if fullname.split(".")[0] in self.names:
            raise ImportError(f"import of {fullname!r} blocked by benchmarks._peers.block_imports")
        return None


def block_imports(*names: str) -> _Blocker:
    """Make ``import <name>`` raise for the rest of the process (returns the finder).

    Used by ``--check`` to prove backpack's code paths never touch torchvision.
    Remove with ``sys.meta_path.remove(finder)``.
    """
    finder = _Blocker(names)
    sys.meta_path.insert(0, finder)
    return finder


# --------------------------------------------------------------------------- check


def _tiny_problem():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    return model, torch.nn.MSELoss(), x, y


def _exact_trace(model, loss_fn, x, y) -> float:
    import torch
    from torch.func import functional_call, hessian

    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)

    def f(flat):
        chunks = torch.split(flat, [params[k].numel() for k in names])
        p = {k: c.view_as(params[k]) for k, c in zip(names, chunks, strict=True)}
        return loss_fn(functional_call(model, p, (x,)), y)

    flat = torch.cat([params[k].reshape(-1) for k in names])
    return torch.trace(hessian(f)(flat)).item()


def _check() -> int:  # noqa: C901 - a linear list of smoke tests
    import warnings

    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch

    blocker = block_imports("torchvision")
    failures = 0

    def report(name, fn):
        nonlocal failures
        try:
            print(f"  ok    {name}: {fn()}")
        except Exception as exc:  # noqa: BLE001
            failures += 1
            print(f"  FAIL  {name}: {type(exc).__name__}: {exc}")

    for dist, ver in peer_versions().items():
        print(f"{dist:28s} {ver}")
    model, loss_fn, x, y = _tiny_problem()
    exact = _exact_trace(model, loss_fn, x, y)
    print(f"exact trace of the tiny problem: {exact:.6f}")
    n_params = sum(p.numel() for p in model.parameters())

    pyh = load_pyhessian()
    if pyh:

        def run_pyhessian():
            m, lf, xx, yy = _tiny_problem()
            h = pyh.module.hessian(m, lf, data=(xx, yy), cuda=False)
            return f"trace(maxIter=4) ~ {sum(h.trace(maxIter=4, tol=-1.0)) / 4:.4f}"

        report("pyhessian.hessian(...).trace", run_pyhessian)
    else:
        failures += 1
        print(f"  FAIL  pyhessian: {pyh.reason}")

    cl = load_curvlinops()
    if cl:

        def run_curvlinops():
            m, lf, xx, yy = _tiny_problem()
            H = cl.module.HessianLinearOperator(m, lf, list(m.parameters()), [(xx, yy)])
            dense = H @ torch.eye(n_params)
            est = cl.module.hutchinson_trace(H, num_matvecs=n_params - 1)
            assert abs(torch.trace(dense).item() - exact) < 1e-4
            return f"dense trace {torch.trace(dense).item():.6f}, hutchinson ~ {est.item():.4f}"

        report("curvlinops.HessianLinearOperator", run_curvlinops)
    else:
        failures += 1
        print(f"  FAIL  curvlinops: {cl.reason}")

    bp = load_backpack()
    if bp:

        def run_backpack():
            from backpack import backpack, extend
            from backpack.extensions import DiagHessian

            torch.manual_seed(0)
            m = extend(
                torch.nn.Sequential(
                    torch.nn.Conv2d(1, 2, 3),
                    torch.nn.ReLU(),
                    torch.nn.Conv2d(2, 2, 3),
                    torch.nn.Tanh(),
                    torch.nn.Flatten(),
                    torch.nn.Linear(2 * 2 * 2, 3),
                )
            )
            xx, yy = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 0])
            total = 0.0
            for lf, target in [
                (torch.nn.CrossEntropyLoss(), yy),
                (torch.nn.MSELoss(), torch.randn(4, 3)),
            ]:
                lf = extend(lf)
                m.zero_grad()
                with backpack(DiagHessian()):
                    lf(m(xx), target).backward()
                total += sum(p.diag_h.sum().item() for p in m.parameters())
            mm, lf, xx, yy = _tiny_problem()
            mm, lf = extend(mm), extend(lf)
            with backpack(DiagHessian()):
                lf(mm(xx), yy).backward()
            tr = sum(p.diag_h.sum().item() for p in mm.parameters())
            assert abs(tr - exact) < 1e-4, (tr, exact)
            assert "torchvision" not in sys.modules
            return f"DiagHessian trace {tr:.6f} (conv/relu/tanh/CE/MSE ok, no torchvision)"

        report("backpack DiagHessian", run_backpack)
    else:
        failures += 1
        print(f"  FAIL  backpack: {bp.reason}")

    ht = load_eigenthings()
    if ht:

        def run_eigenthings():
            m, lf, xx, yy = _tiny_problem()
            op = ht.module.HessianOperator(m, [(xx, yy)], ht.module.supervised_loss(lf))
            res = ht.module.hutchinson(op, num_samples=4, seed=0)
            return f"hutchinson ~ {res.estimate:.4f}"

        report("hessian_eigenthings.HessianOperator", run_eigenthings)
    else:
        failures += 1
        print(f"  FAIL  hessian_eigenthings: {ht.reason}")

    old = load_secorder_001()
    if old:

        def run_old():
            m, lf, xx, yy = _tiny_problem()
            params = list(m.parameters())

            def closure():
                return lf(m(xx), yy)

            tr = float(old.module.hessian_trace(closure, params))
            est = old.module.hvp.hessian_trace(closure, params, num_samples=4)
            assert abs(tr - exact) < 1e-4, (tr, exact)
            leaked = [
                k
                for k, v in sys.modules.items()
                if _owned("torch_secorder", k) and ".peer_site" in str(getattr(v, "__file__", ""))
            ]
            assert not leaked, leaked
            alias = old.module.package.__name__
            return f"exact trace {tr:.6f}, hvp.hessian_trace ~ {est:.4f} (alias {alias})"

        report("torch-secorder 0.0.1", run_old)
    else:
        failures += 1
        print(f"  FAIL  torch-secorder 0.0.1: {old.reason}")

    try:
        import torch_secorder as ours

        where = Path(ours.__file__).resolve()
        assert SECORDER_001_DIR.resolve() not in where.parents, where
        print(f"  ok    `import torch_secorder` -> {where.parent}")
    except ImportError as exc:
        print(f"  note  our torch_secorder not importable here ({exc}); pip install -e .")

    sys.meta_path.remove(blocker)
    print("all peers ok" if failures == 0 else f"{failures} peer check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        raise SystemExit(_check())
    print(__doc__)
