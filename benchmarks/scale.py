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

``--streaming`` measures the streaming fit from an on-disk store instead (the ``streaming``
section of the same JSON; the in-memory sections are kept). One view of ``--rows`` rows
(4096) and ``N`` columns (20k, 100k, 300k) of random non-negative data is written to a
store (``--stream-dtype``, float32 by default: on a CPU without native bfloat16 the
bfloat16 products are many times slower) under ``--scratch``; then, each in a fresh
subprocess so that its peak resident set (``ru_maxrss``) is that run's alone:

* ``stream``: ``jaxcnmf.fit(store, ...)``, HALS, rank 20, random init; seconds per
  iteration = (time of a ``1 + iters``-iteration fit - time of a 1-iteration fit) / iters,
  both after warm-up fits that compile everything (compile time apart); peak memory and
  its growth over the baseline after imports;
* ``memory`` (for N up to ``--memory-max-n``): the same fit with the views in memory
  (``store.read_all()``), timed the same way;
* ``read``: one read of the whole store (a copy of every memory-mapped block) with the
  SHA-256 checks of a first read, again from the page cache, and cold: after
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` on every block file.

Usage::

    python benchmarks/scale.py                       # writes results/scale.json
    python benchmarks/scale.py --n 3000 --devices 1 2 --out /tmp/s.json
    python benchmarks/scale.py --streaming --scratch /tmp       # its streaming section
    python benchmarks/scale.py --streaming --quick --out /tmp/q.json   # smoke run
    python benchmarks/scale.py --streaming --interleaved-n 20000       # streaming vs memory

``--interleaved-n N`` times a streaming against an in-memory iteration alternately in one
process (fits of 3 and 3 + ``--iters`` iterations, 100 by default), for the default block
size and each of ``--interleaved-blocks``; the section's key is ``--interleaved-key``.
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

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROWS = (1024, 512, 384, 128)
STREAM_RANK = 20
LEAD = 3  # iterations of the shorter fit in an interleaved timing


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



# ------------------------------------------------------------------------ streaming fit


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _drop_cache(store):
    """Evict the store's block files from the page cache (no root needed)."""
    for path in (store.path / "blocks").glob("*.npy"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _stream_child(kind, path, iters, uncached=True):
    """Runs in a subprocess (see ``--streaming``); prints one JSON line."""
    import warnings

    import jax
    import numpy as np

    import jaxcnmf
    from jaxcnmf import store

    warnings.simplefilter("ignore")
    jax.numpy.zeros(1).block_until_ready()
    baseline = _rss_mb()
    out = {"kind": kind, "baseline_rss_mb": round(baseline, 1)}
    s = None if kind == "interleaved" else store.open(path)
    if kind == "read":
        def read():
            # Blocks come back memory-mapped: copying them is what reads the pages.
            start = time.perf_counter()
            for block in s.blocks("conv"):
                np.array(block)
            return round(time.perf_counter() - start, 3)

        out["read_verified_s"] = read()  # first read of this Store: SHA-256 of every file
        out["read_s"] = read()
        _drop_cache(s)
        out["read_cold_s"] = read()
    elif kind == "interleaved":
        out.update(_interleaved(path, iters, uncached))
    else:
        views = s if kind == "stream" else s.read_all()
        options = {"rank": STREAM_RANK, "method": "hals", "init": "random", "tol": 0.0,
                   "progress": False}

        def timed(max_iter):
            start = time.perf_counter()
            res = jaxcnmf.fit(views, max_iter=max_iter, **options)
            jax.block_until_ready(res.F)
            return time.perf_counter() - start, res.n_iter

        # Warm both: the in-memory loop compiles once per max_iter (its history buffers),
        # the streaming fit's later passes compile another step than its first.
        first = timed(1)[0] + timed(1 + iters)[0]
        (one, n_one), (many, n_many) = timed(1), timed(1 + iters)
        # Divided by the iterations run (the in-memory loop may stop on a plateau).
        out["n_iter"] = [n_one, n_many]
        per = (many - one) / max(n_many - n_one, 1)
        out["compile_s"] = round(first - one - many, 2)
        out["iteration_s"] = round(per, 4)
        out["setup_s"] = round(one - per, 3)
    out["peak_rss_mb"] = round(_rss_mb(), 1)
    print(json.dumps(out))


def _interleaved(root, iters, uncached=True, rounds=3):
    """Streaming and in-memory iterations timed alternately in one process (so that the
    machine's other load falls on all alike): one in-memory fit of the data, and a
    streaming fit of every store under ``root`` (the same data in other block sizes;
    on an accelerator also without chunks kept on the device, ``cache_bytes=0``).

    Seconds per iteration = (best time of a ``LEAD + iters``-iteration fit - best time of
    a ``LEAD``-iteration fit) / iters, the bests over ``rounds`` taken apart: both fits
    include the same setup (statistics, initialisation, final objective), whose run-to-run
    spread would swamp a difference of one or two iterations.
    """
    import jax

    import jaxcnmf
    from jaxcnmf import store

    stores = {p.name: store.open(p) for p in sorted(pathlib.Path(root).iterdir())}
    first = next(iter(stores.values()))
    memory = first.read_all()
    if jax.default_backend() != "cpu":
        # In memory on an accelerator means on the device: sent once, not every fit.
        memory = jax.block_until_ready(jax.device_put(memory))
    runs = {"memory": (memory, None)}
    for name, s in stores.items():
        runs[name] = (s, None)
        if jax.default_backend() != "cpu" and name == "default" and uncached:
            runs[name + ", cache_bytes=0"] = (s, 0)
    options = {"rank": STREAM_RANK, "method": "hals", "init": "random", "tol": 0.0,
               "progress": False}

    def timed(kind, max_iter):
        views, cache = runs[kind]
        extra = {} if cache is None else {"cache_bytes": cache}
        start = time.perf_counter()
        res = jaxcnmf.fit(views, max_iter=max_iter, **options, **extra)
        jax.block_until_ready(res.F)
        assert res.n_iter == max_iter, (kind, res.n_iter)
        return time.perf_counter() - start, res

    for kind in runs:  # compile everything (the in-memory loop once per max_iter)
        timed(kind, LEAD), timed(kind, LEAD + iters)
    fastest = {kind: [float("inf"), float("inf")] for kind in runs}
    config = {}
    for _ in range(rounds):
        for kind in runs:
            (short, _), (long, res) = timed(kind, LEAD), timed(kind, LEAD + iters)
            fastest[kind] = [min(fastest[kind][0], short), min(fastest[kind][1], long)]
            config[kind] = res.config
    per = {kind: (hi - lo) / iters for kind, (lo, hi) in fastest.items()}
    rows = []
    for kind, seconds in per.items():
        row = {"kind": kind, "iteration_s": round(seconds, 4),
               "over_memory": round(seconds / per["memory"], 3),
               "fit_s": [round(x, 3) for x in fastest[kind]]}
        if kind != "memory":
            row.update({key: config[kind][key] for key in
                        ("block_size", "step_columns", "steps_kept_on_device")})
        rows.append(row)
    return {"lead_iters": LEAD, "rows": rows,
            "backend": jax.default_backend(), "device": str(jax.devices()[0])}


def _run_stream_child(kind, path, iters, uncached=True):
    command = [sys.executable, __file__, "--stream-child", kind, str(path), "--iters",
               str(iters)] + ([] if uncached else ["--no-uncached"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _write_store(path, n, rows, block, dtype):
    """A store of one random view; one block of draws in the store's dtype, rolled by a
    different amount for every block (drawing and converting all of N would dominate the
    run; the timings do not depend on the values)."""
    import numpy as np

    from jaxcnmf import store
    from jaxcnmf.solver.store import _numpy_dtype

    rng = np.random.default_rng(0)
    writer = store.Writer(path, {"conv": rows}, n, block_size=block, dtype=dtype)
    block = writer.manifest["block_size"]
    base = rng.random((rows, block), dtype=np.float32).astype(_numpy_dtype(dtype))
    for i in writer.missing:
        start, stop = writer.columns(i)
        part = np.roll(base, 7 * i + 1, axis=1)[:, :stop - start]
        writer.write_block(i, {"conv": part})
    return writer.finish()


def _streaming(args, save):
    """The ``streaming`` section: one row per N (see the module docstring); ``save`` is
    called with the section after every N."""
    import numpy as np

    if args.quick:
        args.stream_n, args.rows, args.block = [600, 1200], 256, 250
        args.interleaved_blocks = [256]
    itemsize = 2 if args.stream_dtype in ("bfloat16", "float16") else 4
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="jaxcnmf-scale-", dir=args.scratch))
    rows_out = []
    try:
        for n in args.stream_n:
            path = scratch / f"n{n}"
            start = time.perf_counter()
            written = _write_store(path, n, args.rows, args.block, args.stream_dtype)
            row = {"n": n, "rows": args.rows, "block_size": written.block_size,
                   "rank": STREAM_RANK, "dtype": args.stream_dtype,
                   "store_mb": round(n * args.rows * itemsize / 2**20, 1),
                   "F_mb": round(STREAM_RANK * n * 4 / 2**20, 1),
                   "write_s": round(time.perf_counter() - start, 2), "load_before": _load()}
            # Beyond --memory-max-n one timed iteration (each is a pass over the store).
            iters = args.iters if n <= args.memory_max_n else 1
            row["iters"] = iters
            row["read"] = _run_stream_child("read", path, iters)
            row["stream"] = _run_stream_child("stream", path, iters)
            if n <= args.memory_max_n:
                row["memory"] = _run_stream_child("memory", path, iters)
                row["stream_over_memory"] = round(
                    row["stream"]["iteration_s"] / row["memory"]["iteration_s"], 3)
            row["load_after"] = _load()
            rows_out.append(row)
            shutil.rmtree(path)
            print(json.dumps(row), flush=True)
            save(_section(args, rows_out))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"{'N':>7} {'store MB':>8} {'read s':>6} {'+sha s':>6} {'cold s':>6} "
          f"{'stream it s':>11} {'memory it s':>11} {'ratio':>5} {'stream peak MB':>14} "
          f"{'(+base)':>7} {'memory peak MB':>14} {'load':>5}")
    for row in rows_out:
        stream, memory = row["stream"], row.get("memory", {})
        print(f"{row['n']:>7} {row['store_mb']:>8.0f} {row['read']['read_s']:>6.2f} "
              f"{row['read']['read_verified_s']:>6.2f} {row['read']['read_cold_s']:>6.2f} "
              f"{stream['iteration_s']:>11.3f} {memory.get('iteration_s', np.nan):>11.3f} "
              f"{row.get('stream_over_memory', np.nan):>5.2f} {stream['peak_rss_mb']:>14.0f} "
              f"{stream['peak_rss_mb'] - stream['baseline_rss_mb']:>7.0f} "
              f"{memory.get('peak_rss_mb', np.nan):>14.0f} {row['load_after'][0]:>5.1f}")
    return _section(args, rows_out)


def _interleaved_section(args, save):
    """``--interleaved-n N``: a streaming against an in-memory iteration, timed alternately
    in one process, for stores of the same data in the default block size and in each of
    ``--interleaved-blocks``; added to the streaming section under
    ``--interleaved-key`` (``interleaved``)."""
    from jaxcnmf import store

    scratch = pathlib.Path(tempfile.mkdtemp(prefix="jaxcnmf-scale-", dir=args.scratch))
    try:
        root = scratch / "stores"
        root.mkdir()
        default = _write_store(root / "default", args.interleaved_n, args.rows, args.block,
                               args.stream_dtype)
        if args.interleaved_blocks:
            views = default.read_all()
            for block in args.interleaved_blocks:
                store.save(root / f"block {block}", views, block_size=block,
                           dtype=args.stream_dtype)
            del views
        row = {"n": args.interleaved_n, "rows": args.rows, "dtype": args.stream_dtype,
               "iters": args.iters, "load_before": _load()}
        row.update(_run_stream_child("interleaved", root, args.iters, args.uncached))
        row["load_after"] = _load()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(row))
    print(f"{'store':>24} {'block':>6} {'step cols':>9} {'kept':>4} {'it s':>7} "
          f"{'x memory':>8}")
    for r in row["rows"]:
        print(f"{r['kind']:>24} {r.get('block_size', ''):>6} {r.get('step_columns', ''):>9} "
              f"{r.get('steps_kept_on_device', ''):>4} {r['iteration_s']:>7.4f} "
              f"{r['over_memory']:>8.2f}")
    out = pathlib.Path(args.out)
    section = json.loads(out.read_text()).get("streaming", {}) if out.exists() else {}
    section[args.interleaved_key] = row
    save(section)


def _section(args, rows_out):
    import jax

    return {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "backend": jax.default_backend(), "jax": jax.__version__},
            "settings": {"iters": args.iters, "method": "hals", "init": "random",
                         "rows": args.rows, "block_size": args.block,
                         "dtype": args.stream_dtype, "prefetch_blocks": 2,
                         "memory_max_n": args.memory_max_n},
            "rows": rows_out}


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
    parser.add_argument("--streaming", action="store_true",
                        help="measure the streaming fit from a store (its JSON section)")
    parser.add_argument("--stream-n", type=int, nargs="+", default=[20_000, 100_000, 300_000])
    parser.add_argument("--rows", type=int, default=4096, help="rows of the streamed view")
    parser.add_argument("--block", type=int, default=None,
                        help="store block size (default: store.default_block_size)")
    parser.add_argument("--stream-dtype", default="float32",
                        help="store dtype (bfloat16 computes in bfloat16: slow on a CPU)")
    parser.add_argument("--memory-max-n", type=int, default=100_000,
                        help="largest N also fitted in memory")
    parser.add_argument("--scratch", default=None, help="where the stores are written")
    parser.add_argument("--quick", action="store_true", help="tiny streaming smoke run")
    parser.add_argument("--interleaved-n", type=int, default=0,
                        help="with --streaming: only the interleaved ratio at this N")
    parser.add_argument("--interleaved-blocks", type=int, nargs="*", default=[2048, 256],
                        help="other block sizes timed in the interleaved run")
    parser.add_argument("--interleaved-key", default="interleaved",
                        help="key of the interleaved run in the streaming section")
    parser.add_argument("--no-uncached", dest="uncached", action="store_false",
                        help="on an accelerator, leave out the run without chunks kept on "
                        "the device (cache_bytes=0: every pass crosses from the host)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-devices", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stream-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stream_child:
        _stream_child(args.stream_child[0], args.stream_child[1], args.iters, args.uncached)
        return
    if args.streaming:
        out = pathlib.Path(args.out)
        # The interleaved timing differences fits of 3 and 3 + iters iterations: with few
        # iterations the in-memory fit's setup (its spread about a second) swamps them.
        args.iters = args.iters if "--iters" in sys.argv else (
            100 if args.interleaved_n else 2)

        def save(section):
            result = json.loads(out.read_text()) if out.exists() else {}
            # The N-series and the interleaved runs are measured apart: keep the others'.
            kept = {key: value for key, value in result.get("streaming", {}).items()
                    if key.startswith("interleaved") and key not in section}
            result["streaming"] = {**section, **kept}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1) + "\n")

        if args.interleaved_n:
            _interleaved_section(args, save)
        else:
            _streaming(args, save)
        print(f"wrote the streaming section of {out}")
        return
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
    out = pathlib.Path(args.out)
    if out.exists() and "streaming" in json.loads(out.read_text()):
        result["streaming"] = json.loads(out.read_text())["streaming"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
