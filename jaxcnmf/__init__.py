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

Submodules (``models``, ``data``, ``probe``, ``train``, ``analysis``, ``tcav``, ...) are
imported on first use so that ``import jaxcnmf`` stays cheap.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "fit": "jaxcnmf.factorization",
    "FitResult": "jaxcnmf.factorization",
    "load_result": "jaxcnmf.factorization",
    "SolverConfig": "jaxcnmf.solver",
    "SolverState": "jaxcnmf.solver",
    "init_state": "jaxcnmf.solver",
    "step": "jaxcnmf.solver",
    "run": "jaxcnmf.solver",
    "objective": "jaxcnmf.solver",
}
_SUBMODULES = (
    "analysis",
    "data",
    "factorization",
    "figures",
    "initialization",
    "models",
    "probe",
    "report",
    "solver",
    "tcav",
    "train",
)

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"jaxcnmf.{name}")
    raise AttributeError(f"module 'jaxcnmf' has no attribute {name!r}")


def __dir__():
    return __all__
