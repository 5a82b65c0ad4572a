"""The coupled NMF: every view ``X_v`` (rows_v, N) factorized as ``W_v F`` with one shared,
non-negative image embedding ``F`` (rank, N).

- :mod:`jaxcnmf.solver.core`: the pure core: ``SolverConfig``, the ``SolverState`` pytree,
  ``init_state`` / ``step`` / ``run`` (MU, HALS, group-lasso FISTA) and ``objective``.
- :mod:`jaxcnmf.solver.initialization`: NNDSVD/NNDSVDa, random and user starting points.
- :mod:`jaxcnmf.solver.fit`: the front door ``fit`` (validation, weights, restarts),
  ``FitResult`` (``transform``, ``reconstruct``, ``save``) and ``load_result``.

The names of the core are re-exported here, so ``jaxcnmf.solver.SolverConfig`` and
``jaxcnmf.solver.run`` keep working as before the package was split.
"""

from jaxcnmf.solver.core import (
    METHODS,
    SolverConfig,
    SolverState,
    f_grams,
    init_state,
    objective,
    run,
    solve_F,
    step,
)

__all__ = [
    "METHODS",
    "SolverConfig",
    "SolverState",
    "f_grams",
    "init_state",
    "objective",
    "run",
    "solve_F",
    "step",
]
