"""jaxcnmf: find the concepts a trained CNN has learned, without labels.

Coupled non-negative matrix factorization of a probe set's pixels and layer activations
with one shared image embedding ``F``, in JAX.

Example:
    >>> import numpy as np, jaxcnmf
    >>> rng = np.random.default_rng(0)
    >>> views = {"red": rng.random((64, 100)), "conv": rng.random((32, 100))}
    >>> res = jaxcnmf.fit(views, rank=4, max_iter=20, progress=False)
    >>> res.F.shape, res.loadings["conv"].shape
    ((4, 100), (32, 4))

The package follows the method's steps, imports flowing one way
(``runs`` -> ``concepts`` -> ``nets`` and ``solver``):

- ``jaxcnmf.solver``: the coupled NMF (core, initialization, fit);
- ``jaxcnmf.nets``: what is probed (data, models, train, probe);
- ``jaxcnmf.concepts``: what the factors mean (labels, neurons, images, neighbours,
  fidelity, tcav);
- ``jaxcnmf.runs``: the application (run directory, pipeline, figures, report, cli);
- ``jaxcnmf.store`` (``jaxcnmf.solver.store``): views on disk for probe sets larger than
  memory; ``jaxcnmf.fit(store.open(path), ...)`` streams them.

The former flat module names (``jaxcnmf.probe``, ``jaxcnmf.tcav``, ``jaxcnmf.analysis``,
``jaxcnmf.factorization``, ...) still import; see ``jaxcnmf._moved``. Submodules are
imported on first use so that ``import jaxcnmf`` stays cheap.
"""

import importlib

from jaxcnmf import _moved

__version__ = "0.1.0"

_moved.install()

_EXPORTS = {
    "fit": "jaxcnmf.solver.fit",
    "FitResult": "jaxcnmf.solver.fit",
    "load_result": "jaxcnmf.solver.fit",
    "ConvergenceWarning": "jaxcnmf.solver.fit",
    "SolverConfig": "jaxcnmf.solver.core",
    "SolverState": "jaxcnmf.solver.core",
    "init_state": "jaxcnmf.solver.core",
    "step": "jaxcnmf.solver.core",
    "run": "jaxcnmf.solver.core",
    "objective": "jaxcnmf.solver.core",
}
_SUBPACKAGES = ("solver", "nets", "concepts", "runs")
_FORMER = tuple(sorted(_moved.MOVED)) + ("analysis",)

__all__ = sorted(_EXPORTS) + list(_SUBPACKAGES) + list(_FORMER)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBPACKAGES or name in _FORMER:
        return importlib.import_module(f"jaxcnmf.{name}")
    raise AttributeError(f"module 'jaxcnmf' has no attribute {name!r}")


def __dir__():
    return __all__
