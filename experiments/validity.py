"""Which factorization settings give concepts that mean something: a sweep anyone can rerun.

Trains (or loads) a small CNN, probes a balanced probe set once, then factorizes the same
views under one setting changed at a time from a base setting:

- pixels: the RGB channels as three views (the paper), one gray view, or no pixels;
- view weights: "balanced" (1/||X_v||^2), or balanced with the pixels' share of the
  objective cut to 10%;
- unit columns on or off; rank 1x, 2x, 4x the number of classes; HALS or MU.

Per setting it reports class NMI and purity of each image's strongest concept (scale-free:
F rows scaled by the stacked, weighted loading column norms) against k-means with the same k
on the same layer activations; superclass NMI/purity where the dataset has superclasses;
top-image purity (the majority-class share of each concept's top images, against that of
the images nearest each k-means centroid); fidelity per layer; stability over 5 restarts
(mean Hungarian-matched cosine of F rows); and time. Results: a Markdown table and JSON.

Examples:
    python experiments/validity.py --dataset digits
    python experiments/validity.py --dataset cifar10 --source /tmp/cifar --per-class 100 \\
        --epochs 2 --out experiments/results/validity/cifar10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

import jaxcnmf
from jaxcnmf.concepts.fidelity import fidelity
from jaxcnmf.concepts.kmeans import kmeans
from jaxcnmf.concepts.labels import cluster_purity, nmi
from jaxcnmf.nets import data, models, probe, train

# CIFAR-10 has no superclasses; vehicles against animals gives a coarse labelling to test.
CIFAR10_SUPER = {"airplane": 0, "automobile": 0, "ship": 0, "truck": 0}
LAYERS = ("conv2", "conv3", "pool")
TOP = 10  # images per concept / per k-means centroid for top-image purity


@dataclasses.dataclass(frozen=True)
class Setting:
    pixels: str = "rgb"  # "rgb" | "gray" | "none"
    weights: str = "balanced"  # "balanced" | "pixels10"
    unit_columns: bool = False
    rank_factor: int = 1
    method: str = "hals"

    def label(self, base: "Setting") -> str:
        changed = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != getattr(base, f.name)]
        return ", ".join(changed) or "base"


def sweep(base: Setting) -> list[Setting]:
    """The base setting and every single change from it."""
    options = {"pixels": ("gray", "none"), "weights": ("pixels10",), "unit_columns": (True,),
               "rank_factor": (2, 4), "method": ("mu",)}
    return [base] + [dataclasses.replace(base, **{k: v}) for k, vs in options.items() for v in vs]


def network(args, splits):
    if args.checkpoint:
        loaded = train.load_checkpoint(args.checkpoint)
        return loaded.model, loaded.variables
    model = models.build("small", splits.num_classes, args.width)
    result = train.fit(model, splits.train, epochs=args.epochs, batch_size=64 if args.dataset == "digits" else 128,
                       flip=args.dataset != "digits", eval_ds=splits.test, seed=args.seed,
                       checkpoint_dir=Path(args.work) / f"{args.dataset}-ckpt")
    return model, result.variables


def views_for(setting: Setting, pixel_views, layer_views):
    views = {}
    if setting.pixels == "rgb":
        views.update(pixel_views)
    elif setting.pixels == "gray":
        views["gray"] = np.mean(np.stack(list(pixel_views.values())), axis=0)
    views.update(layer_views)
    return views


def weights_for(setting: Setting, views, pixel_names):
    balanced = {k: 1.0 / float(np.sum(np.square(v, dtype=np.float64))) for k, v in views.items()}
    if setting.weights == "balanced":
        return balanced
    pix = [k for k in views if k in pixel_names]
    if not pix:
        return balanced
    # Pixels together get 10% of the (balanced) objective, the layers 90%.
    layers = [k for k in views if k not in pixel_names]
    return {k: balanced[k] * (0.1 / len(pix) if k in pix else 0.9 / len(layers)) for k in views}


def top_purity(scores, labels, top):
    """Mean majority-class share among the ``top`` highest-scoring images of each row."""
    shares = []
    for row in scores:
        if not np.any(row > 0):
            continue
        idx = np.argsort(-row, kind="stable")[:top]
        shares.append(np.bincount(labels[idx]).max() / len(idx))
    return float(np.mean(shares)) if shares else 0.0


def stack_unit(layer_views):
    blocks = [v / np.maximum(np.linalg.norm(v, axis=0, keepdims=True), 1e-30) for v in layer_views.values()]
    return np.concatenate(blocks, axis=0).T.astype(np.float32)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="examples:" + __doc__.split("Examples:")[1])
    parser.add_argument("--dataset", default="digits", choices=("digits", "cifar10"))
    parser.add_argument("--source", help="folder with the CIFAR-10 archive (cifar10)")
    parser.add_argument("--checkpoint", help="a trained SmallCNN; without it, train first")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="experiments/results/validity/digits")
    parser.add_argument("--work", default="runs/validity", help="where the trained network is kept")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    splits = data.load(args.dataset, args.source)
    model, variables = network(args, splits)
    probe_set = data.balanced_subset(splits.test, args.per_class, seed=args.seed)
    labels = probe_set.labels
    coarse = None
    if args.dataset == "cifar10":
        coarse = np.array([CIFAR10_SUPER.get(probe_set.class_names[c], 1) for c in labels])
    elif probe_set.coarse_labels is not None:
        coarse = probe_set.coarse_labels
    collected = probe.collect(model, variables, probe_set.images, list(LAYERS), pixels=True)
    pixel_names = data.channel_names(probe_set.images.shape[-1])
    pixel_views = {k: collected[k] for k in pixel_names}
    layer_views = {k: collected[k] for k in LAYERS}
    shapes = probe.available_layers(model, tuple(probe_set.images.shape[1:]))
    logits = train.predict(model, variables, probe_set.images)
    accuracy = float(np.mean(np.argmax(logits, 1) == labels))
    print(f"[validity] {args.dataset}: N={labels.size}, network accuracy on the probe set {accuracy:.3f}")

    unit = stack_unit(layer_views)
    rows, kmeans_cache = [], {}
    base = Setting(pixels="rgb" if len(pixel_names) == 3 else "gray")
    settings = list(dict.fromkeys(sweep(base)))  # gray images: "pixels=gray" is the base
    for setting in settings:
        if setting.pixels == "rgb" and len(pixel_names) == 1:
            continue
        k = setting.rank_factor * splits.num_classes
        views = views_for(setting, pixel_views, layer_views)
        weights = weights_for(setting, views, pixel_names)
        start = time.perf_counter()
        res = jaxcnmf.fit(views, k, method=setting.method, max_iter=args.max_iter, seed=args.seed,
                          weights=weights, unit_columns=setting.unit_columns,
                          restarts=args.restarts, progress=False)
        seconds = time.perf_counter() - start
        S = res.scaled_F()
        assign = np.where(S.max(0) > 0, S.argmax(0), -1)
        if k not in kmeans_cache:
            km = kmeans(unit, k, n_init=10, seed=args.seed)
            d = ((unit[:, None, :] - km.centers[None]) ** 2).sum(-1)  # (N, k)
            # Nearness to each centroid as a non-negative score, larger = nearer.
            kmeans_cache[k] = (km.assignment, (d.max() - d).T)
        km_assign, km_scores = kmeans_cache[k]
        fid = {}
        for layer in LAYERS:
            table = fidelity(model, variables, probe_set.images, labels, res, layer,
                             activations=layer_views[layer], shape=shapes[layer])
            fid[layer] = float(table.accuracy[0])
        row = {
            "setting": setting.label(base), **dataclasses.asdict(setting), "rank": k,
            "nmi": nmi(assign, labels), "purity": cluster_purity(assign, labels),
            "kmeans_nmi": nmi(km_assign, labels), "kmeans_purity": cluster_purity(km_assign, labels),
            "top_purity": top_purity(S, labels, TOP), "kmeans_top_purity": top_purity(km_scores, labels, TOP),
            "fidelity": fid, "stability": float(res.stability) if res.stability is not None else None,
            "rel_error_layers": float(np.mean([res.relative_errors[l] for l in LAYERS])),
            "n_iter": int(res.n_iter), "converged": bool(res.converged), "seconds": seconds,
        }
        if coarse is not None:
            row.update(super_nmi=nmi(assign, coarse), super_purity=cluster_purity(assign, coarse),
                       kmeans_super_nmi=nmi(km_assign, coarse),
                       kmeans_super_purity=cluster_purity(km_assign, coarse))
        rows.append(row)
        print(f"[validity] {row['setting']:<22} NMI {row['nmi']:.3f} (k-means {row['kmeans_nmi']:.3f}) "
              f"purity {row['purity']:.3f} ({row['kmeans_purity']:.3f}) top {row['top_purity']:.3f} "
              f"({row['kmeans_top_purity']:.3f}) stab {row['stability']:.3f} {seconds:.1f}s", flush=True)

    record = {"dataset": args.dataset, "n_images": int(labels.size), "accuracy": accuracy,
              "args": vars(args), "rows": rows}
    (out / "validity.json").write_text(json.dumps(record, indent=1))
    head = ("| setting | rank | NMI | k-means NMI | purity | k-means purity | top-10 purity | "
            "k-means top-10 | " + (" super NMI | k-means super NMI | " if coarse is not None else "")
            + " | ".join(f"fidelity {l}" for l in LAYERS) + " | stability | iters | s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        sup = f" {r['super_nmi']:.3f} | {r['kmeans_super_nmi']:.3f} |" if coarse is not None else ""
        lines.append(
            f"| {r['setting']} | {r['rank']} | {r['nmi']:.3f} | {r['kmeans_nmi']:.3f} | {r['purity']:.3f} | "
            f"{r['kmeans_purity']:.3f} | {r['top_purity']:.3f} | {r['kmeans_top_purity']:.3f} |{sup} "
            + " | ".join(f"{r['fidelity'][l]:.3f}" for l in LAYERS)
            + f" | {r['stability']:.3f} | {r['n_iter']} | {r['seconds']:.1f} |")
    (out / "table.md").write_text(f"{args.dataset}: N={labels.size}, probe-set accuracy {accuracy:.3f}\n\n"
                                  + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
