"""Seconds to draw a probe set from an image folder: reading every image, or only the drawn.

``analyze`` used to load the whole folder (``data.load``), split it, and then draw
``per_class`` images of each class from the test split (``data.balanced_subset``); it now
calls ``data.load_probe_set``, which makes the same split and the same draw on the labels
the folder names give and decodes only the drawn files. Both are timed in the same run on a
synthetic folder of random 32x32 RGB PNGs (written once, outside the timing), and the two
probe sets are checked to be identical. A first untimed pass of each warms the file cache,
so the figures are for a folder already in memory; the timed figure is the median of
``--repeats`` runs. Writes ``benchmarks/results/folder_probe_load.json`` next to a printed
table.

Usage:
    python benchmarks/folder_probe_load.py                     # 100 classes x 200 images
    python benchmarks/folder_probe_load.py --quick             # 10 classes x 50 images
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from jaxcnmf.nets import data


def write_folder(root: Path, classes: int, per_folder: int, size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c:03d}"
        folder.mkdir(parents=True)
        for i in range(per_folder):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.png")


def timed(fn, repeats):
    """(result, median seconds of ``repeats`` runs after one untimed run)."""
    result = fn()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return result, statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--images", type=int, default=200, help="images per class folder")
    parser.add_argument("--per-class", type=int, default=30, help="probe images per class")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="10 classes x 50 images")
    parser.add_argument("--dir", default=None, help="where to write the folder (a temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.classes, args.images, args.per_class = 10, 50, 5

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "folder"
        t0 = time.perf_counter()
        write_folder(root, args.classes, args.images, args.size)
        written = time.perf_counter() - t0

        def eager():
            splits = data.load(root, progress=False)
            return data.balanced_subset(splits.test, args.per_class, seed=0)

        def lazy():
            return data.load_probe_set(root, per_class=args.per_class, seed=0, progress=False)

        before, eager_s = timed(eager, args.repeats)
        after, lazy_s = timed(lazy, args.repeats)
    same = bool(np.array_equal(before.images, after.images)
                and np.array_equal(before.labels, after.labels))
    total = args.classes * args.images
    rows = [
        ("read every image, then draw (before)", total, eager_s),
        ("draw on labels, read the drawn (after)", len(after), lazy_s),
    ]
    print(f"folder: {args.classes} classes x {args.images} PNGs of {args.size}x{args.size} RGB "
          f"({total} files, written in {written:.1f} s); probe set {args.per_class} per class")
    print(f"{'':42s} {'decoded':>8s} {'seconds':>8s}")
    for name, decoded, seconds in rows:
        print(f"{name:42s} {decoded:8d} {seconds:8.3f}")
    print(f"speed-up: {eager_s / lazy_s:.1f}x; same probe set: {same}")
    if not same:
        raise SystemExit("the two probe sets differ")

    out = Path(__file__).parent / "results" / "folder_probe_load.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "classes": args.classes, "images_per_class": args.images, "size": args.size,
        "per_class": args.per_class, "repeats": args.repeats,
        "eager_seconds": eager_s, "probe_set_seconds": lazy_s,
        "speedup": eager_s / lazy_s, "same_probe_set": same,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
