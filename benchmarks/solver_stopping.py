"""Where the KKT stopping rule ends: objective at the stop vs the best objective reached.

Problem: scikit-learn's bundled digits (1797 images), a pixel view (64 x N) and a
"layer" view (256 x N, ReLU of a fixed random projection of the pixels, like a probed
activation), rank 10 and 20, balanced weights. For each method and ``tol`` the fit's
final objective is compared with the best objective any run reached (HALS, 3000
iterations, ``tol=0``): the gap in percent, the iterations used and whether it stopped
by the rule. Writes ``results/solver_stopping.json`` beside a printed table.

Usage::

    python benchmarks/solver_stopping.py
"""

from __future__ import annotations

import json
import pathlib
import time
import warnings

import numpy as np
from sklearn.datasets import load_digits

import jaxcnmf
from jaxcnmf.solver.fit import ConvergenceWarning

RESULT_PATH = pathlib.Path(__file__).parent / "results" / "solver_stopping.json"


def views():
    X = load_digits().data.T.astype(np.float32)        # (64, 1797)
    rng = np.random.default_rng(0)
    layer = np.maximum(rng.standard_normal((256, 64)).astype(np.float32) @ (X - X.mean()), 0)
    return {"pixels": X, "layer": layer}


def run(data, rank, method, tol, max_iter):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = time.perf_counter()
        res = jaxcnmf.fit(data, rank, method=method, tol=tol, max_iter=max_iter,
                          weights="balanced", progress=False)
    return res, time.perf_counter() - start


def main():
    data = views()
    rows = []
    for rank in (10, 20):
        best, _ = run(data, rank, "hals", 0.0, 3000)
        settings = [("hals", tol, 1000) for tol in (1e-3, 3e-4, 1e-4, 3e-5)]
        settings += [("mu", tol, 1000) for tol in (1e-3, 1e-4)]
        settings += [("hals", 1e-4, 200), ("mu", 1e-4, 200)]
        results = [(m, t, i, *run(data, rank, m, t, i)) for m, t, i in settings]
        floor = min([best.objective] + [r.objective for *_, r, _ in results])
        for method, tol, max_iter, res, seconds in results:
            rows.append({"rank": rank, "method": method, "tol": tol, "max_iter": max_iter,
                         "n_iter": res.n_iter, "stopped_by_rule": res.converged,
                         "gap_percent": 100 * (res.objective - floor) / floor,
                         "seconds": seconds})
    print(f"{'rank':>4} {'method':>6} {'tol':>7} {'max_iter':>8} {'n_iter':>6} "
          f"{'rule':>5} {'gap %':>8}")
    for r in rows:
        print(f"{r['rank']:>4} {r['method']:>6} {r['tol']:>7.0e} {r['max_iter']:>8} "
              f"{r['n_iter']:>6} {r['stopped_by_rule']!s:>5} {r['gap_percent']:>8.3f}")
    RESULT_PATH.parent.mkdir(exist_ok=True)
    RESULT_PATH.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
