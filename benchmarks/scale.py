"""How the sharded coupled NMF scales: time per iteration against N and the device count.

Problem: views of ``rows`` (default 4 views, 2048 rows in all: a scaled-down paper
problem, so that N = 30k fits a shared CPU box), rank 20, random non-negative data, MU and
HALS. Measured in one run:

* milliseconds per iteration against N (3k, 10k, 30k; ``--n`` for more, e.g. 100k-1M with
  ``--storage bfloat16`` on an accelerator), on all local devices; compile time apart;
* milliseconds per iteration against the device count (1, 2, 4 by default), each in a
  subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=D`` on a CPU (on an
  accelerator host, the first D real devices);
* the bandwidth reached: bytes of the views read per iteration (two passes: ``W^T X`` for
  ``F`` and ``X F^T`` for the loadings) divided by the time, against a measured copy
  bandwidth (``x * 2`` in place over an array of the views' size: read + write) on the
  same devices.

Every timing is warm (``lower().compile()`` first, reported apart), blocks on the result,
and is the best of ``--repeats``; iterations are forced (``tol=0``).

Usage::

    python benchmarks/scale.py                       # writes results/scale.json
    python benchmarks/scale.py --n 3000 --devices 1 2 --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROWS = (1024, 512, 384, 128)


def _measure(n, rank, rows, storage, iters, repeats, devices):
    """One process: ms/iteration for MU and HALS on ``devices`` devices, and copy bandwidth."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxcnmf.solver import core, initialization, sharding

    devices = devices or jax.device_count()
    mesh = jax.make_mesh((devices,), ("n",), devices=jax.devices()[:devices])
    rng = np.random.default_rng(0)
    views = [rng.random((r, n), np.float32) for r in rows]
    names = [f"view{i}" for i in range(len(rows))]
    placement = sharding.plan(names, views, mesh).with_columns(n)
    jviews = placement.views(views, storage)
    F0, L0 = initialization.random(jax.random.PRNGKey(0), jviews, rank, "float32", n)
    F0, L0 = placement.factors(F0, L0)
    mask = placement.column_mask()
    out = {"n": n, "devices": devices, "rank": rank, "rows": list(rows), "storage": storage,
           "iters": iters}
    view_bytes = sum(r * placement.n_padded for r in rows) * jnp.dtype(storage).itemsize
    out["view_bytes"] = view_bytes
    for method in ("mu", "hals"):
        config = core.SolverConfig(method=method, rank=rank, max_iter=iters, tol=0.0)
        start = time.perf_counter()
        compiled = sharding._solve.lower(jviews, F0, L0, None, mask, config,
                                         placement).compile()
        compile_s = time.perf_counter() - start
        best = np.inf
        for _ in range(repeats):
            start = time.perf_counter()
            state = compiled(jviews, F0, L0, None, mask)
            jax.block_until_ready(state)
            best = min(best, time.perf_counter() - start)
        ms = 1e3 * best / int(state.iteration)
        out[method] = {"compile_s": round(compile_s, 3), "ms_per_iter": round(ms, 3),
                       "views_GBps": round(2 * view_bytes / (ms * 1e-3) / 1e9, 3)}
    big = jax.device_put(jnp.ones((view_bytes // 4,), jnp.float32),
                         jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("n")))
    # Donated, so the output reuses the input's pages: a fresh 100 MB+ output would time
    # the kernel's page faults, not the memory bandwidth.
    double = jax.jit(lambda x: x * 2, donate_argnums=0)
    big = double(big).block_until_ready()
    best = np.inf
    for _ in range(repeats + 1):
        start = time.perf_counter()
        big = double(big).block_until_ready()
        best = min(best, time.perf_counter() - start)
    out["copy_GBps"] = round(2 * view_bytes / best / 1e9, 3)
    for method in ("mu", "hals"):
        out[method]["fraction_of_copy"] = round(out[method]["views_GBps"] / out["copy_GBps"],
                                                3)
    return out


def _in_subprocess(devices, args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if env.get("JAX_PLATFORMS", "cpu") == "cpu":
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    cmd = [sys.executable, __file__, "--worker", "--n", str(args.device_n), "--rank",
           str(args.rank), "--storage", args.storage, "--iters", str(args.iters),
           "--repeats", str(args.repeats), "--worker-devices", str(devices)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _load():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[3000, 10000, 30000])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device-n", type=int, default=10000,
                        help="N of the device-count series")
    parser.add_argument("--rank", type=int, default=20)
    parser.add_argument("--storage", default="float32")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/scale.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-devices", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_measure(args.n[0], args.rank, ROWS, args.storage, args.iters,
                                  args.repeats, args.worker_devices)))
        return

    import jax

    load_before = _load()
    by_n = [_measure(n, args.rank, ROWS, args.storage, args.iters, args.repeats, 0)
            for n in args.n]
    by_devices = [_in_subprocess(d, args) for d in args.devices]
    header = (f"{'N':>8} {'dev':>4} {'MU ms/it':>9} {'HALS ms/it':>10} {'MU GB/s':>8} "
              f"{'HALS GB/s':>9} {'copy GB/s':>9} {'MU frac':>7}")
    print(header)
    for row in by_n + by_devices:
        print(f"{row['n']:>8} {row['devices']:>4} {row['mu']['ms_per_iter']:>9.2f} "
              f"{row['hals']['ms_per_iter']:>10.2f} {row['mu']['views_GBps']:>8.2f} "
              f"{row['hals']['views_GBps']:>9.2f} {row['copy_GBps']:>9.2f} "
              f"{row['mu']['fraction_of_copy']:>7.2f}")
    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "backend": jax.default_backend(), "device": str(jax.devices()[0]),
                    "jax": jax.__version__, "load_before": load_before,
                    "load_after": _load()},
        "settings": {"rows": list(ROWS), "rank": args.rank, "storage": args.storage,
                     "iters": args.iters, "repeats": args.repeats},
        "by_n": by_n, "by_devices": by_devices,
    }
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
