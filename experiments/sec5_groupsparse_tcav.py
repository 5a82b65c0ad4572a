"""The paper's Section 5: group-sparse concepts of out-of-distribution probes, checked by TCAV.

Train a SmallCNN on dataset X, probe it with images of a different dataset Y, factorize the
activations only (no pixel views) with a group lasso over Y's classes (one group per class,
``unit_columns=True``), report each concept's top classes and the (concept, class) groups
that are exactly zero, show where the classes the network never saw land, and test every
concept with TCAV (top images of each factor as the concept set, the trained classes as
the classes, Benjamini-Hochberg over the grid).

Two ways to get X and Y:

- ``--train cifar10 --probe cifar100``: the paper's pair (needs CIFAR-100 under
  ``--source`` or in tensorflow-datasets). Every probe class is unseen; superclass shares
  are reported when the probe set has them.
- ``--split-classes``: one dataset split in two. The network is trained on ``--seen``
  classes of ``--train``'s training split and probed with ``--per-class`` test images of
  every class, so the other classes are unseen.

The LAM sweep is expressed as fractions of ``lam_max``, the smallest group weight for which
F = 0 is optimal given the unregularised fit's loadings
(``max_kg ||2 sum_v w_v W_vk^T X_vg||``); the chosen LAM is the largest swept value that
leaves no concept dead and raises the weighted relative error by at most
``--max-error-increase`` (or ``--lam`` given as a fraction).

Outputs (no dataset images): README.md with every table, tcav_<layer>.png, class_shares.png,
tcav.csv and summary.json under ``--out``; the checkpoint under ``--work``.

Examples:
    python experiments/sec5_groupsparse_tcav.py --split-classes --source /work/cifar \\
        --epochs 5 --work /work/runs/sec5
    python experiments/sec5_groupsparse_tcav.py --split-classes --source /work/cifar \\
        --checkpoint /work/runs/sec5/ckpt --random-runs 50
    python experiments/sec5_groupsparse_tcav.py --train cifar10 --probe cifar100 \\
        --source /data --per-class 30 --rank 20 --epochs 30
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import jaxcnmf
from jaxcnmf.concepts import labels, tcav
from jaxcnmf.nets import data, models, probe, train
from jaxcnmf.runs import figures

DEFAULT_SEEN = ("airplane", "automobile", "bird", "cat", "deer")
DEFAULT_FRACTIONS = (0.0, 0.01, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1)


def log(message):
    print(f"[sec5 {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="examples:" + __doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--train", default="cifar10", help="dataset X the network learns")
    parser.add_argument("--probe", help="dataset Y of the probe images (not with --split-classes)")
    parser.add_argument("--split-classes", action="store_true",
                        help="train on --seen classes of --train, probe with all its classes")
    parser.add_argument("--seen", nargs="+", default=list(DEFAULT_SEEN),
                        help="classes trained on in --split-classes mode")
    parser.add_argument("--source", help="folder holding the named datasets (see data.load); "
                        "--train/--probe may also be a dataset path")
    parser.add_argument("--checkpoint", help="a trained checkpoint; skips training")
    parser.add_argument("--work", default="/work/runs/sec5",
                        help="folder for the checkpoint and the fit results")
    parser.add_argument("--out", default="experiments/results/sec5", help="results folder")
    parser.add_argument("--width", type=float, default=0.5, help="SmallCNN width multiplier")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--train-per-class", type=int,
                        help="train on this many images per class (default: all)")
    parser.add_argument("--per-class", type=int, default=100, help="probe images per class")
    parser.add_argument("--layers", nargs="+", default=["conv3", "pool"],
                        help="activation views (flattened)")
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--method", choices=("mu", "hals"), default="hals")
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--fractions", type=float, nargs="+", default=list(DEFAULT_FRACTIONS),
                        help="LAM sweep as fractions of lam_max (0 = no group lasso)")
    parser.add_argument("--lam", type=float,
                        help="use this fraction of lam_max instead of choosing from the sweep")
    parser.add_argument("--max-error-increase", type=float, default=0.05,
                        help="largest rise of the weighted relative error a chosen LAM may cause")
    parser.add_argument("--tcav-layers", nargs="+", default=["conv2", "conv3"],
                        help="TCAV layers; the first is the headline heatmap")
    parser.add_argument("--top", type=int, default=50, help="images per TCAV concept")
    parser.add_argument("--random-runs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.fractions) < 0 or (args.lam is not None and args.lam < 0):
        parser.error(f"--fractions/--lam: expected fractions >= 0, got {args.fractions} "
                     f"and {args.lam}")
    if args.split_classes == (args.probe is not None):
        parser.error("expected either --split-classes or --probe DATASET, got "
                     + ("both" if args.split_classes else "neither"))
    return parser, args


# ----------------------------------------------------------------------------- data


def load(name, source):
    """A named dataset from ``source``, or a path (folder, .npz) on its own."""
    return data.load(name, source=source if name in data.KNOWN_DATASETS else None)


def datasets(args):
    """(training set, eval set of the trained classes, probe set, seen flags per probe class)."""
    x = load(args.train, args.source)
    if args.split_classes:
        train_ds = data.select_classes(x.train, args.seen)
        eval_ds = data.select_classes(x.test, args.seen)
        probe_ds = data.balanced_subset(x.test, args.per_class, seed=args.seed)
    else:
        y = load(args.probe, args.source)
        train_ds, eval_ds = x.train, x.test
        probe_ds = data.balanced_subset(y.test, args.per_class, seed=args.seed)
    if args.train_per_class:
        train_ds = data.balanced_subset(train_ds, args.train_per_class, seed=args.seed)
    seen = np.array([name in train_ds.class_names for name in probe_ds.class_names])
    return train_ds, eval_ds, probe_ds, seen


def trained_model(args, train_ds, eval_ds):
    """(model, variables, epochs, training seconds summed over the epochs)."""
    if args.checkpoint:
        ckpt = train.load_checkpoint(args.checkpoint)
        if tuple(ckpt.meta.get("class_names") or ()) != train_ds.class_names:
            raise ValueError(f"--checkpoint: expected a network of classes "
                             f"{train_ds.class_names}, got {ckpt.meta.get('class_names')}")
        seconds = sum((ckpt.meta.get("history") or {}).get("seconds") or [0.0])
        return ckpt.model, ckpt.variables, ckpt.meta.get("epochs", ckpt.meta.get("epoch")), seconds
    model = models.small_cnn(train_ds.num_classes, width=args.width)
    result = train.fit(model, train_ds, epochs=args.epochs, eval_ds=eval_ds,
                       checkpoint_dir=Path(args.work) / "ckpt", seed=args.seed)
    return result.model, result.variables, result.epochs, sum(result.history["seconds"])


# ------------------------------------------------------------------ factorization


def lam_max(views, res, groups, n_groups):
    """Smallest group weight for which F = 0 is optimal given res's loadings (KKT at 0)."""
    weights = res.config["weights"]
    grad = sum(2 * weights[name] * res.loadings[name].T @ X for name, X in views.items())
    norms = np.zeros((grad.shape[0], n_groups))
    np.add.at(norms.T, groups, (grad**2).T)
    return float(np.sqrt(norms).max())


def group_stats(F, groups, n_groups):
    """Numbers of zero (concept, group) blocks and of dead (all-zero) concepts of F."""
    mass = np.zeros((F.shape[0], n_groups))
    np.add.at(mass.T, groups, np.abs(F).T)
    return int((mass == 0).sum()), int((mass.sum(1) == 0).sum())


def weighted_error(res, views):
    """sqrt(sum_v w_v ||X_v - W_v F||^2 / sum_v w_v ||X_v||^2)."""
    weights = res.config["weights"]
    num = sum(weights[n] * (res.relative_errors[n] * np.linalg.norm(X)) ** 2
              for n, X in views.items())
    den = sum(weights[n] * np.linalg.norm(X) ** 2 for n, X in views.items())
    return float(np.sqrt(num / den))


def sweep(args, views, labels, n_groups):
    """Fit every swept LAM; returns (rows, chosen fit, chosen fraction, lam_max)."""

    def fit(lam):
        return jaxcnmf.fit(
            views, args.rank, method=args.method, max_iter=args.max_iter, seed=args.seed,
            weights="balanced", unit_columns=True, groups=labels, group_lam=lam,
            progress=False)

    t0 = time.perf_counter()
    base = fit(0.0)
    base_seconds = time.perf_counter() - t0
    scale = lam_max(views, base, labels, n_groups)
    log(f"lam_max = {scale:.4g}")
    rows, fits = [], {}
    fractions = sorted({0.0, *args.fractions, *([args.lam] if args.lam is not None else [])})
    for frac in fractions:
        t0 = time.perf_counter()
        res = base if frac == 0 else fit(frac * scale)
        zeros, dead = group_stats(res.F, labels, n_groups)
        row = {"fraction": frac, "lam": frac * scale, "zero_groups": zeros,
               "total_groups": res.F.shape[0] * n_groups, "dead_concepts": dead,
               "weighted_rel_error": weighted_error(res, views),
               **{f"rel_error_{n}": float(e) for n, e in res.relative_errors.items()},
               "n_iter": int(res.n_iter), "converged": bool(res.converged),
               "seconds": base_seconds if frac == 0 else time.perf_counter() - t0}
        rows.append(row)
        fits[frac] = res
        log(f"LAM {frac:g} x lam_max: {zeros}/{row['total_groups']} zero groups, "
            f"{dead} dead, weighted rel. error {row['weighted_rel_error']:.4f}")
    if args.lam is not None:
        chosen = args.lam
    else:
        limit = rows[0]["weighted_rel_error"] + args.max_error_increase
        ok = [r["fraction"] for r in rows
              if r["dead_concepts"] == 0 and r["weighted_rel_error"] <= limit]
        chosen = max(ok)
    return rows, fits[chosen], chosen, scale


# ------------------------------------------------------------------------ tables


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def share_text(shares_row, names, top=3, seen=None):
    order = np.argsort(-shares_row, kind="stable")[:top]
    mark = (lambda c: "" if seen is None or seen[c] else "*")
    return ", ".join(f"{names[c]}{mark(c)} {shares_row[c]:.2f}" for c in order
                     if shares_row[c] > 0)


def concept_names(shares, names):
    """Short labels: concept index and its (at most two) classes with a share >= 0.25."""
    out = []
    for k, row in enumerate(shares):
        top = [names[c] for c in np.argsort(-row, kind="stable")[:2] if row[c] >= 0.25]
        out.append(f"c{k} {'+'.join(top) or 'mixed'}")
    return out


def unseen_rows(shares, mass, probe_ds, seen, predicted, model_classes, top_concepts=2):
    """Per unseen class: its main concepts, their seen companions, the network's votes."""
    names = probe_ds.class_names
    rows = []
    for c in np.flatnonzero(~seen):
        # A class's mass on concept k is F[k, class c].sum() = shares[k, c] * mass[k].
        weight = shares[:, c] * mass
        weight = weight / max(weight.sum(), 1e-12)
        order = np.argsort(-weight, kind="stable")[:top_concepts]
        concepts = "; ".join(f"c{k} ({weight[k]:.2f})" for k in order)
        companions = []
        for k in order:
            others = [(shares[k, j], names[j]) for j in range(len(names)) if j != c
                      and (seen[j] if seen.any() else True)]
            share, name = max(others)
            companions.append(f"c{k}: {name} {share:.2f}")
        votes = np.bincount(predicted[probe_ds.labels == c], minlength=len(model_classes))
        votes = votes / max(votes.sum(), 1)
        vote_text = ", ".join(f"{model_classes[j]} {votes[j]:.2f}"
                              for j in np.argsort(-votes, kind="stable")[:3] if votes[j] > 0)
        rows.append([names[c], concepts, "; ".join(companions), vote_text])
    return rows


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser, args = parse_args(argv)
    t_all = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    times = {}

    try:
        train_ds, eval_ds, probe_ds, seen = datasets(args)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    log(f"train: {train_ds.summary()}")
    log(f"probe: {probe_ds.summary()}; unseen: "
        f"{[n for n, s in zip(probe_ds.class_names, seen) if not s]}")

    t0 = time.perf_counter()
    try:
        model, variables, epochs, train_seconds = trained_model(args, train_ds, eval_ds)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    times["training (sum of epoch times)"] = train_seconds
    times["train or load checkpoint"] = time.perf_counter() - t0
    accuracy = train.evaluate(model, variables, eval_ds)
    log(f"accuracy on {len(eval_ds)} test images of the trained classes: {accuracy:.4f}")

    t0 = time.perf_counter()
    # The logits come from the same forward pass as the activations ("fc" is collected
    # with them, as the pipeline does); they are the one view that may be negative.
    views = probe.collect(model, variables, probe_ds.images, tuple(args.layers) + ("fc",),
                          pixels=False, pooling="flatten", progress=False,
                          allow_negative=True)
    predicted = views.pop("fc").argmax(axis=0)
    times["probe"] = time.perf_counter() - t0
    log("views: " + ", ".join(f"{n} {X.shape}" for n, X in views.items()))

    t0 = time.perf_counter()
    labels = probe_ds.labels
    n_groups = probe_ds.num_classes
    sweep_rows, res, chosen, scale = sweep(args, views, labels, n_groups)
    times["LAM sweep (all fits)"] = time.perf_counter() - t0
    res.save(Path(args.work) / "fit.npz")
    shares = labels.class_shares(res.F, labels, n_groups)
    zeros, dead = group_stats(res.F, labels, n_groups)
    names = concept_names(shares, probe_ds.class_names)

    order = labels.concept_order(res.F, labels, n_groups)
    fig = figures.class_share_heatmap(
        shares, [f"{n}{'' if s else '*'}" for n, s in zip(probe_ds.class_names, seen)],
        order=order, title="class shares of each concept (* unseen)")
    figures.save_figure(fig, out / "class_shares.png")

    t0 = time.perf_counter()
    concepts = tcav.concepts_from_factors(res, probe_ds.images, top=args.top, names=names)
    model_classes = train_ds.class_names
    classes = {}
    for name in model_classes:
        if name in probe_ds.class_names:
            classes[name] = probe_ds.images[labels == probe_ds.class_names.index(name)]
        else:
            classes[name] = eval_ds.images[eval_ds.labels == model_classes.index(name)][
                : args.per_class]
    result = tcav.run(model, variables, args.tcav_layers, concepts, classes,
                      class_names=model_classes, random_runs=args.random_runs,
                      pool=probe_ds.images, seed=args.seed, correction="bh")
    times["TCAV"] = time.perf_counter() - t0
    result.to_csv(out / "tcav.csv")
    for layer in args.tcav_layers:
        tcav.figure(result, layer=layer, path=out / f"tcav_{layer}.png")
    times["total (this invocation)"] = time.perf_counter() - t_all

    write_readme(args, out, model, train_ds, eval_ds, probe_ds, seen, epochs, accuracy, views,
                 sweep_rows, chosen, scale, res, shares, zeros, dead, names, predicted,
                 model_classes, result, times)
    log(f"done in {times['total (this invocation)']:.0f} s; wrote {out}")


def tcav_section(args, result):
    """Per layer: counts, CAV accuracy, degeneracy, and a concept x class score matrix."""
    parts = [
        f"Mean TCAV score over {args.random_runs} CAVs per cell; **bold** = significant after "
        "Benjamini-Hochberg (in brackets: mean score of the random-vs-random CAVs). The test "
        "is two-sided: a significant score near 1 means the concept raises the class's logit, "
        "near 0 that it lowers it. Full table with p-values: [tcav.csv](tcav.csv).",
    ]
    for li, layer in enumerate(result.layers):
        means, significant = result.heatmap_matrix(layer)
        random = result.random_scores[li].mean(-1)
        binary = np.mean((result.scores[li] == 0) | (result.scores[li] == 1))
        parts += [
            "",
            f"### `{layer}`",
            "",
            f"{int(significant.sum())} of {significant.size} cells significant "
            f"({int((significant & (means > 0.5)).sum())} of them above 0.5); mean CAV "
            f"held-out accuracy {float(result.cav_accuracies[li].mean()):.3f} (random-vs-"
            f"random {float(result.random_cav_accuracies[li].mean()):.3f}); "
            f"{binary:.0%} of the concept CAVs' per-class scores are exactly 0 or 1.",
            "",
            md_table(["concept"] + list(result.classes),
                     [[concept] + [(f"**{means[ci, ki]:.2f}**" if significant[ci, ki]
                                    else f"{means[ci, ki]:.2f}") + f" ({random[ci, ki]:.2f})"
                                   for ki in range(len(result.classes))]
                      for ci, concept in enumerate(result.concepts)]),
            "",
            f"![TCAV heatmap at {layer}](tcav_{layer}.png)",
        ]
    return "\n".join(parts)


def write_readme(args, out, model, train_ds, eval_ds, probe_ds, seen, epochs, accuracy, views,
                 sweep_rows, chosen, scale, res, shares, zeros, dead, names, predicted,
                 model_classes, result, times):
    cls = probe_ds.class_names
    unseen = [n for n, s in zip(cls, seen) if not s]
    coarse = (None if probe_ds.coarse_labels is None else labels.class_shares(
        res.F, probe_ds.coarse_labels, len(probe_ds.superclass_names)))
    pair = (f"{args.train} ({', '.join(train_ds.class_names)}) -> {args.train} test, all "
            f"{len(cls)} classes" if args.split_classes else f"{args.train} -> {args.probe}")
    view_text = ", ".join(f"{n} {X.shape[0]} rows" for n, X in views.items())
    lines = [
        "# Section 5: group-sparse concepts of out-of-distribution probes, with TCAV",
        "",
        "Produced by `experiments/sec5_groupsparse_tcav.py` "
        f"(`{' '.join(sys.argv[1:]) or 'defaults'}`); every number below is from that run.",
        "",
        "## Setup",
        "",
        f"- Train -> probe: {pair}. Unseen probe classes (marked * below): {', '.join(unseen)}.",
        f"- Network: SmallCNN width {models.spec(model)['width']}, "
        f"{epochs} epochs on {len(train_ds)} training images; accuracy on the "
        f"{len(eval_ds)} test images of the trained classes: **{accuracy:.4f}**.",
        f"- Probe set: {args.per_class} test images per class, N = {len(probe_ds)}.",
        f"- Factorization: activations only ({view_text}, flattened), rank {args.rank}, "
        f"{args.method}, max_iter {args.max_iter}, balanced view weights, unit columns, "
        f"group lasso over the {len(cls)} probe classes.",
        f"- LAM = {chosen:g} x lam_max = {chosen * scale:.4g} (lam_max = {scale:.4g}: the "
        "smallest weight for which F = 0 is optimal given the unregularised loadings); chosen "
        "as "
        "the largest swept value with no dead concept and a weighted relative error at most "
        f"{args.max_error_increase} above LAM = 0." if args.lam is None else
        f"- LAM = {chosen:g} x lam_max = {chosen * scale:.4g} (given).",
        f"- TCAV at {', '.join(f'`{n}`' for n in args.tcav_layers)}: concept = top {args.top} probe images of each factor, "
        f"classes = the {len(model_classes)} trained classes ({args.per_class} images each), "
        f"{args.random_runs} random runs (random sets from the whole probe set), logistic "
        "CAVs, two-sided Welch t-test, Benjamini-Hochberg over the whole layer x concept x "
        "class grid, "
        f"alpha {result.alpha}. In the SmallCNN, conv3 -> pool -> fc is linear (a spatial "
        "mean, then a dense layer), so a logit's gradient with respect to conv3 or pool is the "
        "same for every input and each CAV scores all images of a class alike (scores 0 or "
        "1); conv2 reaches the logits through conv3's convolutions, ReLUs and max-pool, so "
        "its scores are graded.",
        "",
        "## LAM sweep",
        "",
        md_table(
            ["LAM / lam_max", "LAM", "zero (concept, class) groups", "dead concepts",
             "weighted rel. error"] + [f"rel. error {n}" for n in views] + ["iterations",
                                                                           "seconds"],
            [[f"{r['fraction']:g}", f"{r['lam']:.4g}",
              f"{r['zero_groups']} / {r['total_groups']}", r["dead_concepts"],
              f"{r['weighted_rel_error']:.4f}"]
             + [f"{r[f'rel_error_{n}']:.4f}" for n in views]
             + [f"{r['n_iter']}{'' if r['converged'] else ' (max)'}", f"{r['seconds']:.1f}"]
             for r in sweep_rows]),
        "",
        f"## Concepts at LAM = {chosen:g} x lam_max",
        "",
        f"{zeros} of {res.F.shape[0] * len(cls)} (concept, class) groups are exactly zero; "
        f"{dead} dead concepts. Shares: each concept's mass per class (rows sum to 1).",
        "",
        md_table(["concept", "mass", "top classes (share)", "classes with non-zero group"]
                 + (["top superclasses (share)"] if coarse is not None else []),
                 [[names[k], f"{res.F[k].sum() / res.F.sum():.3f}",
                   share_text(shares[k], cls, 3, seen), int((shares[k] > 0).sum())]
                  + ([share_text(coarse[k], probe_ds.superclass_names)]
                     if coarse is not None else [])
                  for k in range(res.F.shape[0])]),
        "",
        "![concept x class shares](class_shares.png)",
        "",
        "## Where the unseen classes land",
        "",
        "For each unseen class: the two concepts holding most of its mass (fraction of the "
        "class's mass), the trained class (or, when no probe class was trained on, the other "
        "probe class) with the largest share in each of those concepts, "
        "and how the network (which can only answer a trained class) labels its images.",
        "",
        md_table(["unseen class", "main concepts",
                  "seen class sharing each concept" if seen.any()
                  else "other probe class sharing each concept",
                  "network's predictions"],
                 unseen_rows(shares, res.F.sum(1), probe_ds, seen, predicted, model_classes)),
        "",
        "## TCAV",
        "",
        tcav_section(args, result),
        "",
        "## Wall times (seconds, shared 2-core CPU)",
        "",
        md_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in times.items()]),
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
    summary = {
        "accuracy_seen": accuracy, "epochs": epochs, "n_probe": len(probe_ds),
        "rank": args.rank, "lam_fraction": chosen, "lam": chosen * scale, "lam_max": scale,
        "sweep": sweep_rows, "zero_groups": zeros, "dead_concepts": dead,
        "concepts": {names[k]: dict(zip(cls, shares[k].round(4).tolist()))
                     for k in range(len(names))},
        "tcav_significant": [[r["layer"], r["concept"], r["class"], r["mean_score"]]
                             for r in result.table() if r["significant"]],
        "tcav_timings": result.timings, "times": times,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
