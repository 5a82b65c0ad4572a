"""Wall time of TCAV with gradients computed once against recomputing them for every CAV.

Task: 1 concept x 10 classes x ``--runs`` random runs at one layer of the small CNN, with
``--per-set`` images per set (concept, each random set, each class), on the digits probe
set (offline). The concept is ``--per-set`` test images of one digit; random sets come
from the union of the class images.

- fast: ``tcav.run`` end to end (activations once, all 2R CAVs in one vmapped call,
  one backward pass per batch of class inputs, all sensitivities as one matrix product,
  t-tests and correction).
- straightforward: the way reference TCAV code works: activations once, then per run one
  concept CAV and one random-vs-random CAV trained one at a time, and for every CAV and
  every class the class inputs' gradients recomputed. Its cost is linear in the runs, so
  it is timed on the first ``--baseline-runs`` runs and scaled to ``--runs`` (the JSON
  says so); ``--baseline-runs`` equal to ``--runs`` times all of it.

Both paths are jitted and warmed up (compilation is reported separately); the fast path
reports the fastest of ``--repeats`` warm runs. The scores of
the straightforward path's CAVs are also computed from once-computed gradients and must
agree: ``jaxcnmf.tcav`` computes gradients, CAVs and sensitivities at full float32
precision, so the batching (one class per pass or all classes) and the backend's default
matmul precision (TF32 on NVIDIA GPUs) must not move a score; the JSON also records the
largest gradient difference between the two batchings, relative to the largest gradient. The CPU is shared with other developers: absolute times are noisy, the ratio less
so. Writes ``benchmarks/results/tcav_speed.json`` next to a printed table.

Usage:
    python benchmarks/tcav_speed.py                    # width 1, conv2, 100 runs
    python benchmarks/tcav_speed.py --quick            # smoke test: width 0.25, 20 runs,
                                                       # 50 per set (gradients are so
                                                       # cheap there that CAV fitting
                                                       # dominates: ~3x, not the target)
    python benchmarks/tcav_speed.py --checkpoint DIR   # a trained small CNN
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

from jaxcnmf.nets import data, models
from jaxcnmf.concepts import tcav


def straightforward(model, variables, layer, concept, classes, pool, runs, per_set, seed):
    """Scores of ``runs`` runs, gradients recomputed for every (CAV, class).

    Returns (concept scores (K, runs), random scores (K, runs), CAVs (2 runs, D), seconds
    by stage).
    """
    timings = {"activations": 0.0, "cavs": 0.0, "gradients": 0.0}
    t0 = time.perf_counter()
    acts = tcav.layer_activations(model, variables, np.concatenate([concept, pool]), [layer])
    concept_acts, pool_acts = acts[layer][: len(concept)], acts[layer][len(concept) :]
    timings["activations"] = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    scores = np.zeros((2, len(classes), runs))
    vectors = []
    for r in range(runs):
        t0 = time.perf_counter()
        picked = rng.permutation(len(pool))[: 2 * per_set]
        anchor, negatives = pool_acts[picked[:per_set]], pool_acts[picked[per_set:]]
        cavs = [
            tcav.train_cavs(positives, negatives[None], seed=seed + r).vectors[0]
            for positives in (concept_acts, anchor)
        ]
        vectors.extend(cavs)
        timings["cavs"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        for which, cav in enumerate(cavs):
            for k, images in enumerate(classes):
                grads = tcav.layer_gradients(
                    model, variables, images, np.full(len(images), k), [layer]
                )[layer]
                scores[which, k, r] = np.mean(tcav.sensitivities(grads, cav[None])[:, 0] > 0)
        timings["gradients"] += time.perf_counter() - t0
    return scores[0], scores[1], np.stack(vectors), timings


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="width 0.25, 20 runs, 50 per set")
    parser.add_argument("--layer", default="conv2")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--per-set", type=int, default=100)
    parser.add_argument("--baseline-runs", type=int, default=5)
    parser.add_argument("--checkpoint", default=None, help="trained small CNN checkpoint dir")
    parser.add_argument("--repeats", type=int, default=3, help="warm runs of the fast path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tcav_speed.json"))
    args = parser.parse_args()
    if args.quick:
        args.width, args.runs, args.per_set, args.baseline_runs = 0.25, 20, 50, 2

    splits = data.load("digits")
    train, test = splits.train, splits.test
    classes = [train.images[train.labels == k][: args.per_set] for k in range(10)]
    concept = test.images[test.labels == 3][: args.per_set]
    pool = np.concatenate(classes)
    if args.checkpoint:
        from jaxcnmf.nets import train as training

        checkpoint = training.load_checkpoint(args.checkpoint)
        model, variables = checkpoint.model, checkpoint.variables
    else:
        model = models.small_cnn(10, width=args.width)
        variables = model.init(jax.random.key(args.seed), data.to_float(pool[:1]), train=False)
    dim = int(np.prod(tcav.layer_shapes(model, variables, pool.shape[1:])[args.layer]))
    print(f"small CNN width {args.width}, layer {args.layer} (D={dim}), 1 concept x 10 "
          f"classes x {args.runs} runs, {args.per_set} images per set; "
          f"{os.cpu_count()} CPUs shared with other developers")

    def fast():
        return tcav.run(
            model, variables, args.layer, {"three": concept},
            {k: images for k, images in enumerate(classes)},
            random_runs=args.runs, seed=args.seed, progress=False,
        )

    t0 = time.perf_counter()
    fast()
    fast_first = time.perf_counter() - t0
    # The CPU is shared: the fastest of a few warm runs is the least disturbed one.
    fast_times, result = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        candidate = fast()
        fast_times.append(time.perf_counter() - t0)
        if fast_times[-1] == min(fast_times):
            result = candidate
    fast_time = min(fast_times)

    t0 = time.perf_counter()
    straightforward(model, variables, args.layer, concept, classes[:1], pool, 1, args.per_set, 99)
    slow_warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow_concept, slow_random, slow_cavs, slow_stages = straightforward(
        model, variables, args.layer, concept, classes, pool, args.baseline_runs,
        args.per_set, args.seed,
    )
    slow_measured = time.perf_counter() - t0
    scale = args.runs / args.baseline_runs
    per_run = slow_stages["cavs"] + slow_stages["gradients"]
    slow_time = slow_stages["activations"] + scale * per_run

    # The straightforward path's CAVs scored from gradients computed once: same numbers.
    inputs = np.concatenate(classes)
    labels = np.repeat(np.arange(10), [len(c) for c in classes])
    grads = tcav.layer_gradients(model, variables, inputs, labels, [args.layer])[args.layer]
    by_class = np.concatenate([
        tcav.layer_gradients(model, variables, images, np.full(len(images), k), [args.layer])[args.layer]
        for k, images in enumerate(classes)
    ])
    grad_diff = float(np.abs(grads - by_class).max() / max(float(np.abs(grads).max()), 1e-30))
    once, _ = tcav.tcav_scores(grads, slow_cavs, labels, 10)
    slow_all = np.stack([slow_concept, slow_random], -1).reshape(10, -1)
    score_diff = float(np.abs(once - slow_all).max())

    speedup = slow_time / fast_time
    sens_fast = result.timings["gradients"] + result.timings["scores"]
    sens_slow = scale * slow_stages["gradients"]
    rows = [
        ("fast (tcav.run), end to end", fast_time),
        ("  activations", result.timings["activations"]),
        ("  gradients once", result.timings["gradients"]),
        (f"  {2 * args.runs} CAVs, one vmapped call", result.timings["cavs"]),
        ("  scores (matrix product)", result.timings["scores"]),
        ("  t-tests + correction", result.timings["tests"]),
        ("  first call (compiles)", fast_first),
        (f"straightforward, end to end (x{scale:g} of {args.baseline_runs} runs)", slow_time),
        ("  activations", slow_stages["activations"]),
        (f"  {2 * args.runs} CAVs one by one", scale * slow_stages["cavs"]),
        (f"  gradients for every CAV x class ({20 * args.runs} passes)", sens_slow),
        ("  warm-up run (compiles)", slow_warmup),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'stage':<{width}}  seconds")
    for name, seconds in rows:
        print(f"{name:<{width}}  {seconds:8.3f}")
    speedup_median = slow_time / float(np.median(fast_times))
    print(f"speedup end to end: {speedup:.1f}x (against the median fast run: "
          f"{speedup_median:.1f}x); sensitivities alone: {sens_slow / sens_fast:.0f}x; "
          f"max score difference on the same CAVs: {score_diff:.3g} (gradients of the two "
          f"batchings differ by {grad_diff:.3g} of the largest)")

    out = {
        "benchmark": "tcav_speed",
        "task": {
            "model": "small", "width": args.width, "layer": args.layer, "dim": dim,
            "concepts": 1, "classes": 10, "random_runs": args.runs,
            "images_per_set": args.per_set, "checkpoint": args.checkpoint,
            "data": "digits (1 channel, 32x32)",
        },
        "fast_seconds": fast_time,
        "fast_seconds_all_repeats": fast_times,
        "fast_stages": result.timings,
        "fast_first_call_seconds": fast_first,
        "straightforward_seconds": slow_time,
        "straightforward_measured_runs": args.baseline_runs,
        "straightforward_measured_seconds": slow_measured,
        "straightforward_stages_measured": slow_stages,
        "straightforward_scaling": "activations once + (CAVs + gradients) x runs / measured runs",
        "speedup": speedup,
        "speedup_vs_median_fast_run": speedup_median,
        "sensitivity_speedup": sens_slow / sens_fast,
        "max_score_difference_same_cavs": score_diff,
        "max_relative_gradient_difference_batchings": grad_diff,
        "precision": "tcav computes at full float32 (jax.default_matmul_precision('float32'))",
        "significant_cells": int(result.significant.sum()),
        "environment": {
            "jax": jax.__version__, "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "note": "CPU shared with other developers during the run; times are noisy",
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
