"""Streaming fit from an on-disk store: peak memory against N, and time per iteration.

One view of ``ROWS`` rows (4096 by default, the size of a pooled-free conv layer slice) and
``N`` columns of random non-negative float32 data is written to a store under a scratch
directory for every ``N``. Then, each in a fresh subprocess so that its peak resident set
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) belongs to that run alone:

* ``stream``: ``jaxcnmf.fit(store, ...)`` with HALS, rank 20, random init; time per
  iteration = (time of a ``1 + ITERS``-iteration fit - time of a 1-iteration fit) / ITERS,
  both after a warm-up fit that compiles everything (compile time reported separately);
  peak memory of the whole process and its growth over the baseline after imports;
* ``memory``: the same fit with the views in memory (``store.read_all()``), timed the same
  way (its warm-up compiles the whole ``while_loop``);
* ``read``: one read (a copy of every memory-mapped block) of the whole store from the
  page cache, with SHA-256 checks (the first read of a ``Store``) and without (later
  reads).

The cold-cache read is not measured: dropping the page cache needs root and disturbs the
other users of a shared machine.

Usage::

    python benchmarks/scale_streaming.py                 # N = 10k, 20k, 40k
    python benchmarks/scale_streaming.py --n 20000 100000 300000 --scratch /big/disk
    python benchmarks/scale_streaming.py --quick         # tiny smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

RESULT_PATH = pathlib.Path(__file__).parent / "results" / "scale_streaming.json"
ROWS = 4096
RANK = 20
ITERS = 3
BLOCK = 2048


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _child(kind, path, iters):
    """Runs in a subprocess; prints one JSON line."""
    import warnings

    import jax

    import jaxcnmf
    from jaxcnmf import store

    warnings.simplefilter("ignore")
    jax.numpy.zeros(1).block_until_ready()
    baseline = _rss_mb()
    s = store.open(path)
    out = {"kind": kind, "baseline_rss_mb": baseline}
    if kind == "read":
        # Blocks come back memory-mapped: copying them is what reads the pages.
        start = time.perf_counter()
        for block in s.blocks("conv"):
            np.array(block)
        out["read_verified_s"] = time.perf_counter() - start
        start = time.perf_counter()
        for block in s.blocks("conv"):
            np.array(block)
        out["read_s"] = time.perf_counter() - start
    else:
        views = s if kind == "stream" else s.read_all()
        options = {"rank": RANK, "method": "hals", "init": "random", "tol": 0.0,
                   "progress": False}

        def timed(max_iter):
            start = time.perf_counter()
            res = jaxcnmf.fit(views, max_iter=max_iter, **options)
            jax.block_until_ready(res.F)
            return time.perf_counter() - start

        # The in-memory loop compiles once per max_iter (its history buffers): warm both.
        out["first_fits_s"] = timed(1) + timed(1 + iters)
        one = timed(1)
        many = timed(1 + iters)
        out["compile_s"] = out["first_fits_s"] - one - many
        out["iteration_s"] = (many - one) / iters
        out["setup_s"] = one - out["iteration_s"]
    out["peak_rss_mb"] = _rss_mb()
    print(json.dumps(out))


def _run_child(kind, path, iters):
    command = [sys.executable, __file__, "--child", kind, str(path), "--iters", str(iters)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _write_store(path, n, rows, block):
    from jaxcnmf import store

    rng = np.random.default_rng(0)
    writer = store.Writer(path, {"conv": rows}, n, block_size=block)
    for i in writer.missing:
        start, stop = writer.columns(i)
        writer.write_block(i, {"conv": rng.random((rows, stop - start), dtype=np.float32)})
    return writer.finish()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 20_000, 40_000])
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--iters", type=int, default=ITERS)
    parser.add_argument("--block", type=int, default=BLOCK)
    parser.add_argument("--scratch", default=None, help="where the stores are written")
    parser.add_argument("--skip-memory", action="store_true",
                        help="no in-memory fits (for N beyond this machine's memory)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.iters)
        return
    if args.quick:
        args.n, args.rows, args.block = [600, 1200], 256, 256
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="jaxcnmf-scale-", dir=args.scratch))
    rows_out = []
    try:
        for n in args.n:
            path = scratch / f"n{n}"
            start = time.perf_counter()
            _write_store(path, n, args.rows, args.block)
            write_s = time.perf_counter() - start
            row = {"n": n, "rows": args.rows, "block_size": args.block, "rank": RANK,
                   "store_mb": n * args.rows * 4 / 2**20, "write_s": write_s,
                   "load_before": os.getloadavg()[0]}
            row["read"] = _run_child("read", path, args.iters)
            row["stream"] = _run_child("stream", path, args.iters)
            if not args.skip_memory:
                row["memory"] = _run_child("memory", path, args.iters)
            row["load_after"] = os.getloadavg()[0]
            rows_out.append(row)
            shutil.rmtree(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"{'N':>8} {'store MB':>9} {'read s':>7} {'read+sha s':>10} {'stream it s':>11} "
          f"{'memory it s':>11} {'ratio':>6} {'stream peak MB':>14} {'(+ over base)':>13} "
          f"{'memory peak MB':>14} {'load':>5}")
    for row in rows_out:
        stream, memory = row["stream"], row.get("memory")
        ratio = stream["iteration_s"] / memory["iteration_s"] if memory else float("nan")
        print(f"{row['n']:>8} {row['store_mb']:>9.0f} {row['read']['read_s']:>7.2f} "
              f"{row['read']['read_verified_s']:>10.2f} {stream['iteration_s']:>11.3f} "
              f"{memory['iteration_s'] if memory else float('nan'):>11.3f} {ratio:>6.2f} "
              f"{stream['peak_rss_mb']:>14.0f} "
              f"{stream['peak_rss_mb'] - stream['baseline_rss_mb']:>13.0f} "
              f"{memory['peak_rss_mb'] if memory else float('nan'):>14.0f} "
              f"{row['load_after']:>5.1f}")
    if args.quick and args.out is None:
        return
    out = pathlib.Path(args.out) if args.out else RESULT_PATH
    out.parent.mkdir(parents=True, exist_ok=True)
    import jax

    out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "jax": jax.__version__, "backend": jax.default_backend()},
        "settings": {"iters": args.iters, "method": "hals", "init": "random",
                     "prefetch_blocks": 2},
        "results": rows_out,
    }, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
