"""Solver speed on the paper-sized problem: JAX MU / HALS vs NumPy and scikit-learn.

Problem: N = 3000 images, rank 20, views of 3 x 1024 pixel rows and 16384, 8192 and 512
activation rows, random non-negative float32 data. Measured in one run:

* compile time of the jitted MU and HALS loops (``lower().compile()``);
* milliseconds per iteration of MU and HALS (warm, ``block_until_ready``, best of repeats);
* the same 50 MU iterations by a NumPy float64 implementation of the paper's updates;
* time to reach the relative error (of the stacked data) that 50 MU iterations reach, for
  JAX HALS and MU (NNDSVDa start; iterations needed times the warm time per iteration, plus
  the warm init time) and scikit-learn's ``NMF`` (``solver="cd"`` and ``"mu"``,
  ``init="nndsvda"``, ``max_iter`` doubled until reached; wall time of that fit) on the
  stacked matrix.

Usage::

    python benchmarks/solver_speed.py            # full problem, writes results/solver_speed.json
    python benchmarks/solver_speed.py --quick    # small smoke run, writes nothing by default
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnmf.solver import core as solver, initialization

FULL = {"n": 3000, "rank": 20, "rows": {"red": 1024, "green": 1024, "blue": 1024,
                                         "layer_a": 16384, "layer_b": 8192, "layer_c": 512}}
QUICK = {"n": 300, "rank": 8, "rows": {"red": 64, "green": 64, "blue": 64,
                                        "layer_a": 1024, "layer_b": 512, "layer_c": 32}}
REFERENCE_ITERS = 50
RESULT_PATH = pathlib.Path(__file__).parent / "results" / "solver_speed.json"


def make_views(problem, seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.random((rows, problem["n"]), dtype=np.float32)
            for name, rows in problem["rows"].items()}


def stacked_rel_error(state):
    """Relative error of the stacked data after every recorded iteration."""
    n = int(state.iteration)
    rel = np.asarray(state.rel_error_history, np.float64)[:, :n]
    sq = np.asarray(state.sq_norms, np.float64)[:, None]
    return np.sqrt(np.sum(rel ** 2 * sq, axis=0) / np.sum(sq))


def timed(fn, repeats):
    """Best wall time of ``repeats`` warm calls (after one warm-up), and the last output."""
    out = jax.block_until_ready(fn())
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best, out


def numpy_mu(views, F, loadings, n_iter):
    """The paper's multiplicative updates in NumPy float64: F, then every loading."""
    eps = 1e-10
    views = [X.astype(np.float64) for X in views]
    F = np.asarray(F, np.float64)
    loadings = [np.asarray(W, np.float64) for W in loadings]
    for _ in range(n_iter):
        numer = sum(W.T @ X for W, X in zip(loadings, views))
        gram = sum(W.T @ W for W in loadings)
        F = F * numer / (gram @ F + eps)
        FFt = F @ F.T
        loadings = [W * (X @ F.T) / (W @ FFt + eps) for W, X in zip(loadings, views)]
    return F, loadings


def sklearn_time_to(stacked, rank, solver_name, target, max_iter_cap):
    """Seconds for scikit-learn NMF to reach ``target``; doubles max_iter until it does."""
    from sklearn.decomposition import NMF

    norm = np.linalg.norm(stacked)
    n_iter = 5
    while True:
        model = NMF(n_components=rank, solver=solver_name, init="nndsvda", max_iter=n_iter,
                    tol=0.0, random_state=0)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(stacked)
        elapsed = time.perf_counter() - start
        rel = model.reconstruction_err_ / norm
        if rel <= target or n_iter >= max_iter_cap:
            return {"seconds": elapsed if rel <= target else None, "iterations": n_iter,
                    "rel_error": float(rel), "reached": bool(rel <= target)}
        n_iter *= 2


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help=f"JSON path (default {RESULT_PATH} for the full run)")
    parser.add_argument("--skip-sklearn", action="store_true")
    args = parser.parse_args()
    problem = QUICK if args.quick else FULL
    out_path = args.out or (None if args.quick else RESULT_PATH)
    load_before = os.getloadavg()

    names = tuple(problem["rows"])
    host_views = make_views(problem)
    views = tuple(jnp.asarray(host_views[name]) for name in names)
    rank = problem["rank"]
    weights = (1.0,) * len(names)

    def nndsvda():
        return initialization.nndsvd(views, rank, weights, variant="nndsvda")

    init_s, (F0, loadings0) = timed(nndsvda, args.repeats)

    results = {"ms_per_iter": {}, "compile_s": {}, "states": {}}
    for method in ("mu", "hals"):
        config = solver.SolverConfig(method=method, rank=rank, weights=weights,
                                     max_iter=REFERENCE_ITERS, tol=0.0)
        fn = jax.jit(lambda v, F, L, config=config: solver.run(
            solver.init_state(v, F, L, config), v, config))
        start = time.perf_counter()
        compiled = fn.lower(views, F0, loadings0).compile()
        results["compile_s"][method] = time.perf_counter() - start
        seconds, state = timed(lambda: compiled(views, F0, loadings0), args.repeats)
        results["ms_per_iter"][method] = 1e3 * seconds / int(state.iteration)
        results["states"][method] = state

    start = time.perf_counter()
    F_np, loadings_np = numpy_mu([host_views[n] for n in names], F0, loadings0,
                                 REFERENCE_ITERS)
    numpy_ms = 1e3 * (time.perf_counter() - start) / REFERENCE_ITERS
    mu_F = np.asarray(results["states"]["mu"].F, np.float64)
    numpy_agreement = float(np.max(np.abs(mu_F - F_np)) / np.max(np.abs(F_np)))

    curves = {m: stacked_rel_error(results["states"][m]) for m in ("mu", "hals")}
    target = float(curves["mu"][-1])
    time_to = {}
    for method in ("mu", "hals"):
        hits = np.nonzero(curves[method] <= target * (1 + 1e-6))[0]
        iters = int(hits[0]) + 1 if hits.size else None
        time_to[f"jax_{method}"] = {
            "iterations": iters, "reached": iters is not None,
            "seconds": None if iters is None
            else init_s + iters * results["ms_per_iter"][method] / 1e3,
            "seconds_without_init": None if iters is None
            else iters * results["ms_per_iter"][method] / 1e3,
            "rel_error": float(curves[method][iters - 1 if iters else -1])}
    if not args.skip_sklearn:
        stacked = np.concatenate([host_views[n] for n in names]).astype(np.float32)
        cap = 64 if args.quick else 1280
        for name in ("cd", "mu"):
            time_to[f"sklearn_{name}"] = sklearn_time_to(stacked, rank, name, target, cap)

    mu_ms, hals_ms = results["ms_per_iter"]["mu"], results["ms_per_iter"]["hals"]
    hals_t, mu_t = time_to["jax_hals"]["seconds"], time_to["jax_mu"]["seconds"]
    report = {
        "problem": {"n": problem["n"], "rank": rank, "rows": problem["rows"],
                    "dtype": "float32", "quick": args.quick},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "jax": jax.__version__, "device": str(jax.devices()[0]),
                    "load_average_before": load_before,
                    "load_average_after": os.getloadavg(),
                    "note": "shared CPU: other jobs were running during the measurement"},
        "compile_s": results["compile_s"],
        "nndsvda_init_s": init_s,
        "ms_per_iter": {"jax_mu": mu_ms, "jax_hals": hals_ms, "numpy_float64_mu": numpy_ms},
        "numpy_vs_jax_mu_max_rel_diff_after_50": numpy_agreement,
        "target_rel_error": target,
        "time_to_target": time_to,
        "targets": {
            "mu_at_most_50ms_per_iter": bool(mu_ms <= 50.0),
            "hals_at_most_a_third_of_mu_time": bool(hals_t is not None and mu_t is not None
                                                     and hals_t <= mu_t / 3),
        },
    }

    print(f"problem: N={problem['n']}, rank {rank}, rows {problem['rows']}")
    print(f"load average before/after: {load_before} / {report['machine']['load_average_after']}")
    print(f"{'':28}{'value':>12}")
    print(f"{'compile MU (s)':28}{results['compile_s']['mu']:12.2f}")
    print(f"{'compile HALS (s)':28}{results['compile_s']['hals']:12.2f}")
    print(f"{'NNDSVDa init (s)':28}{init_s:12.3f}")
    print(f"{'JAX MU (ms/iter)':28}{mu_ms:12.1f}")
    print(f"{'JAX HALS (ms/iter)':28}{hals_ms:12.1f}")
    print(f"{'NumPy float64 MU (ms/iter)':28}{numpy_ms:12.1f}")
    print(f"target rel. error (50 MU iterations): {target:.5f}")
    print(f"{'time to target':28}{'seconds':>12}{'iters':>8}{'rel.err':>10}")
    for name, entry in time_to.items():
        seconds = "not reached" if entry["seconds"] is None else f"{entry['seconds']:.2f}"
        print(f"{name:28}{seconds:>12}{str(entry['iterations']):>8}{entry['rel_error']:10.5f}")
    print(f"targets: {report['targets']}")
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
