"""The concept pipeline on real CIFAR-10 with the small CNN, sized for a 2-core CPU.

Trains a SmallCNN (``--epochs``, width 0.5) on the 50,000 training images, probes 100 test
images per class (pixels + conv2, conv3, pool), factorizes them with rank 20 (MU, 200
iterations, balanced view weights), runs every analysis, writes the run directory with
report.html, and a Markdown summary (purity and NMI against the k-means baseline,
fidelity at ranks 5, 10 and 20, relative errors, wall times, and the figures that show
no probe images) to ``--summary``.

CIFAR-10 comes from ``--source``: a folder holding ``cifar-10-batches-py`` or the official
``cifar-10-python.tar.gz``. On the project's machines, lay it out first from the shared
JPEG copy:

    python3 ../shared/data/build_cifar.py /tmp/cifar --check

Examples:
    python experiments/cifar10_small.py --source /tmp/cifar
    python experiments/cifar10_small.py --source /tmp/cifar --checkpoint runs/c10/ckpt \\
        --out runs/cifar10_small_b --summary /tmp/summary.md
"""

import argparse
import dataclasses

from jaxcnmf.runs import pipeline, report

CIFAR10_SMALL = pipeline.RunConfig(
    command="cifar10_small",
    dataset="cifar10",
    model="small",
    width=0.5,
    epochs=10,
    train_batch_size=128,
    layers=("conv2", "conv3", "pool"),
    split="test",
    per_class=100,
    rank=20,
    method="mu",
    max_iter=200,
    weights="balanced",
    fidelity_ranks=(5, 10),
    top_images=8,
    neighbours=10,
)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="examples:" + __doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--source", required=True,
                        help="folder holding cifar-10-batches-py or cifar-10-python.tar.gz")
    parser.add_argument("--checkpoint", help="a trained SmallCNN; without it, train first")
    parser.add_argument("--out", default="runs/cifar10_small", help="run directory")
    parser.add_argument("--summary", default="experiments/results/cifar10/README.md",
                        help="Markdown summary (default: experiments/results/cifar10/README.md)")
    parser.add_argument("--epochs", type=int, default=CIFAR10_SMALL.epochs)
    parser.add_argument("--per-class", type=int, default=CIFAR10_SMALL.per_class)
    parser.add_argument("--method", choices=("mu", "hals"), default=CIFAR10_SMALL.method)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite --out")
    args = parser.parse_args(argv)
    config = dataclasses.replace(
        CIFAR10_SMALL, source=args.source, checkpoint=args.checkpoint, epochs=args.epochs,
        per_class=args.per_class, method=args.method, seed=args.seed)
    try:
        print(pipeline.run(config, args.out, force=args.force))
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        parser.error(str(err))
    print(report.write_summary(
        args.out, args.summary,
        title=f"Concepts of a small CNN on CIFAR-10 ({config.per_class} test images per class, "
              f"rank {config.rank}, {config.method})"))


if __name__ == "__main__":
    main()
