"""``probe.collect(..., store=DIR)``: one store block per batch against blocks of the default size.

The same probe set is written twice: with ``block_size=batch_size`` (what ``collect`` did
before it took ``block_size``: e.g. 256 float32 columns, rows a power of two bytes apart)
and with ``block_size=None`` (``store.default_block_size``: about 64 MiB of all views a
block, rows an odd number of 64-byte cache lines). For each store it reports:

* ``write_s``: seconds of the ``collect`` call (the forward passes are compiled by a
  warm-up call first, so this is probing plus writing), the best of ``--repeats``;
* ``hals_s_per_iter``: seconds per iteration of ``jaxcnmf.fit(store)`` (HALS, rank 20,
  random init, ``tol=0``) = (best time of a ``1 + iters``-iteration fit - best time of a
  1-iteration fit) / iters, both after a warm-up fit that compiles everything.

The two stores are measured in turns (each repeat times both), so that the load of a
shared machine falls on both alike.

The network is an untrained ``models.small_cnn`` (the numbers do not depend on its
weights) on random uint8 images; the views are the three pixel channels and ``--layers``
(flattened). Writes ``benchmarks/results/collect_store.json`` next to a printed table.

Usage::

    python benchmarks/collect_store.py                    # N = 8192, width 1, conv2
    python benchmarks/collect_store.py --quick --out /tmp/c.json
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import _record  # benchmarks/_record.py, beside this script
import jax
import numpy as np

import jaxcnmf
from jaxcnmf import store
from jaxcnmf.nets import models, probe


def _fit_seconds(s, iters, rank):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jaxcnmf.ConvergenceWarning)
        start = time.perf_counter()
        result = jaxcnmf.fit(s, rank, method="hals", init="random", max_iter=iters, tol=0.0,
                             progress=False, seed=0)
        jax.block_until_ready(result.F)
    return time.perf_counter() - start


def _write(block_size, model, variables, images, args, path):
    kwargs = {"layers": list(args.layers), "batch_size": args.batch_size, "progress": False}
    shutil.rmtree(path, ignore_errors=True)
    start = time.perf_counter()
    s = probe.collect(model, variables, images, **kwargs, store=path, block_size=block_size)
    return s, time.perf_counter() - start


def bench(model, variables, images, args, scratch):
    stores = {"per-batch": args.batch_size, "default": None}
    # Compile the forward pass (one shape: batch_size) before timing.
    _write(None, model, variables, images[: args.batch_size], args, scratch / "warm")
    times = {label: {"write": [], "one": [], "many": []} for label in stores}
    opened = {}
    for _ in range(args.repeats):
        for label, block_size in stores.items():
            opened[label], seconds = _write(block_size, model, variables, images, args,
                                            scratch / label)
            times[label]["write"].append(seconds)
    for label, s in opened.items():
        _fit_seconds(s, 1, args.rank)  # compiles every block shape
    for _ in range(args.repeats):
        for label, s in opened.items():
            times[label]["one"].append(_fit_seconds(s, 1, args.rank))
            times[label]["many"].append(_fit_seconds(s, 1 + args.iters, args.rank))
    return [{"store": label, "block_size": s.block_size, "n_blocks": s.n_blocks,
             "rows": sum(s.rows.values()), "write_s": round(min(times[label]["write"]), 3),
             "hals_s_per_iter": round((min(times[label]["many"]) - min(times[label]["one"]))
                                      / args.iters, 4),
             "seconds": times[label]}
            for label, s in opened.items()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192, help="probe images")
    parser.add_argument("--width", type=float, default=1.0, help="small_cnn width")
    parser.add_argument("--layers", nargs="+", default=["conv2"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rank", type=int, default=20)
    parser.add_argument("--iters", type=int, default=5, help="timed HALS iterations")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scratch", default=None, help="where the stores are written")
    parser.add_argument("--quick", action="store_true", help="N = 1024, width 0.25")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"
                                             / "collect_store.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.width, args.iters, args.repeats = 1024, 0.25, 2, 1

    model = models.small_cnn(10, width=args.width)
    variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32),
                           train=False)
    images = np.random.default_rng(0).integers(0, 256, (args.n, 32, 32, 3), dtype=np.uint8)
    scratch = Path(tempfile.mkdtemp(prefix="collect_store-", dir=args.scratch))
    try:
        rows = bench(model, variables, images, args, scratch)
    finally:
        shutil.rmtree(scratch)

    print(f"{'store':<10}{'block':>7}{'blocks':>7}{'rows':>7}{'write s':>9}{'HALS s/it':>11}")
    for r in rows:
        print(f"{r['store']:<10}{r['block_size']:>7}{r['n_blocks']:>7}{r['rows']:>7}"
              f"{r['write_s']:>9.2f}{r['hals_s_per_iter']:>11.3f}")
    result = {
        "benchmark": "collect_store",
        **_record.machine(),
        "default_block_size": store.default_block_size(rows[0]["rows"], args.n, "float32"),
        "args": vars(args),
        "results": rows,
    }
    _record.write(args.out, result)


if __name__ == "__main__":
    main()
