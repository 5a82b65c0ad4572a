"""The paper's main run: concepts of a ResNet-18 trained on CIFAR-100 (sized for a GPU).

Settings as in the paper: layers conv4_x, conv5_x and avgpool plus the three pixel
channels, 30 test images per class (3000 images), rank 20, 50 multiplicative-update
iterations (``tol=0`` so that all 50 run), unweighted views; the report's concept table
lists top superclasses next to top classes (CIFAR-100's 20 coarse labels), and its summary
gives purity and NMI against both label sets (Table 1), the concept gallery with latent
images and masks (Figures 2-3), the per-layer similarity heatmaps and eigenvalues (Figure
4) and the neighbour analysis (Figure 5), plus the fidelity the paper does not report.

CIFAR-100 comes from ``--source`` (a folder holding ``cifar-100-python`` or the official
``cifar-100-python.tar.gz``), else from ``$JAXCNMF_DATA``, else from tensorflow-datasets.
Without ``--checkpoint`` the script first trains the network (``--epochs``) into
``OUT/ckpt``.

Examples:
    python experiments/paper_resnet18_cifar100.py --source ~/data --out runs/paper_r18
    python experiments/paper_resnet18_cifar100.py --checkpoint runs/r18/ckpt --source ~/data
"""

import argparse
import dataclasses

from jaxcnmf.runs import pipeline, report

PAPER = pipeline.RunConfig(
    command="paper_resnet18_cifar100",
    dataset="cifar100",
    model="resnet18",
    width=1.0,
    epochs=60,
    train_batch_size=128,
    layers=("conv4_x", "conv5_x", "avgpool"),
    split="test",
    per_class=30,
    rank=20,
    method="mu",
    max_iter=50,
    tol=0.0,
    weights=None,
    fidelity_ranks=(5, 10),
    top_images=8,
    neighbours=10,
)


def build_parser(defaults, out, doc):
    parser = argparse.ArgumentParser(
        description=doc.split("\n")[0],
        epilog="examples:" + doc.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--source", help="folder or archive holding the CIFAR data")
    parser.add_argument("--checkpoint", help="a trained checkpoint; without it, train first")
    parser.add_argument("--out", default=out, help=f"run directory (default: {out})")
    parser.add_argument("--epochs", type=int, default=defaults.epochs,
                        help=f"training epochs without --checkpoint (default: {defaults.epochs})")
    parser.add_argument("--width", type=float, default=defaults.width,
                        help=f"channel width multiplier (default: {defaults.width})")
    parser.add_argument("--summary", help="also write a Markdown summary to this file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite --out")
    return parser


def main(argv=None, defaults=PAPER, out="runs/paper_resnet18_cifar100", doc=__doc__):
    parser = build_parser(defaults, out, doc)
    args = parser.parse_args(argv)
    config = dataclasses.replace(defaults, source=args.source, checkpoint=args.checkpoint,
                                 epochs=args.epochs, width=args.width, seed=args.seed)
    try:
        print(pipeline.run(config, args.out, force=args.force))
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        parser.error(str(err))
    if args.summary:
        print(report.write_summary(args.out, args.summary))


if __name__ == "__main__":
    main()
