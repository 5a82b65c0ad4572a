"""Train a model of jaxcnmf.models on any dataset source; write a checkpoint and a summary.

Examples:
    python experiments/train.py --data digits --model small --width 0.5 --epochs 5 --out runs/digits
    python experiments/train.py --data cifar10 --source /work/cifar --model small \\
        --epochs 8 --lr 0.1 --schedule onecycle --out /work/runs/c10_small
    python experiments/train.py --data cifar10 --source /work/cifar --model resnet18 \\
        --epochs 1 --max-train 512 --out /tmp/r18_speed        # speed only

Writes ``OUT/ckpt/`` (``jaxcnmf.train.load_checkpoint`` rebuilds the model from it) and
``OUT/summary.json`` (accuracy, epochs, seconds, images per second, history). Rerunning
the same command resumes from ``OUT/ckpt`` after an interruption.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxcnmf.nets import data, models, train


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="digits",
                   help="digits, cifar10, cifar100, an image folder or an .npz (default digits)")
    p.add_argument("--source", default=None, help="where the CIFAR archives or folders are")
    p.add_argument("--model", default="small", choices=models.MODEL_NAMES)
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier")
    p.add_argument("--channels", default=None,
                   help="small CNN only: comma-separated base channels per block, e.g. 32,64,128")
    p.add_argument("--convs-per-block", type=int, default=None, help="small CNN only")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", default="cosine", choices=train.SCHEDULES)
    p.add_argument("--warmup", type=float, default=None, help="fraction of steps warming up")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--no-augment", action="store_true", help="no random crops or flips")
    p.add_argument("--flip", choices=("auto", "on", "off"), default="auto",
                   help="horizontal flips; auto turns them off for digits")
    p.add_argument("--max-train", type=int, default=None,
                   help="train on a seeded random subset of this many images (timing runs)")
    p.add_argument("--max-eval", type=int, default=None, help="evaluate on this many test images")
    p.add_argument("--no-eval", action="store_true", help="skip the per-epoch test accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (ckpt/ and summary.json)")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")
    return p.parse_args(argv)


def _subset(ds: data.Dataset, n: int | None, seed: int) -> data.Dataset:
    if n is None or n >= len(ds):
        return ds
    if n < 1:
        raise SystemExit(f"--max-train/--max-eval: expected a positive count, got {n}")
    return ds.subset(np.sort(np.random.default_rng(seed).permutation(len(ds))[:n]))


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    splits = data.load(args.data, source=args.source, progress=not args.no_progress)
    train_ds = _subset(splits.train, args.max_train, args.seed)
    eval_ds = None if args.no_eval else _subset(splits.test, args.max_eval, args.seed + 1)
    extra = {}
    if args.channels:
        extra["channels"] = tuple(int(c) for c in args.channels.split(","))
    if args.convs_per_block:
        extra["convs_per_block"] = args.convs_per_block
    model = models.build(args.model, splits.num_classes, args.width, **extra)
    flip = {"on": True, "off": False, "auto": args.data != "digits"}[args.flip]
    out = Path(args.out)
    command = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    logging.info("%s\n%s\nmodel %s", command, splits.summary(), models.spec(model))

    start = time.perf_counter()
    result = train.fit(
        model,
        train_ds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        warmup=args.warmup,
        label_smoothing=args.label_smoothing,
        augment=not args.no_augment,
        flip=flip,
        eval_ds=eval_ds,
        checkpoint_dir=out / "ckpt",
        resume=not args.restart,
        seed=args.seed,
        progress=not args.no_progress,
        meta={"command": command},
    )
    wall = time.perf_counter() - start
    h = result.history
    images_per_epoch = (len(train_ds) // args.batch_size) * args.batch_size
    train_seconds = float(sum(h["seconds"]))
    # Epoch 1 includes compilation, so the steady rate comes from the later epochs.
    steady = h["seconds"][1:] or h["seconds"]
    summary = {
        "command": command,
        "model": models.spec(model),
        "dataset": args.data,
        "train_images": len(train_ds),
        "eval_images": None if eval_ds is None else len(eval_ds),
        "epochs": result.epochs,
        "accuracy": result.accuracy,
        "train_seconds": train_seconds,
        "eval_seconds": float(sum(s or 0.0 for s in h["eval_seconds"])),
        "wall_seconds_this_invocation": wall,
        "images_per_second": images_per_epoch * len(h["seconds"]) / train_seconds,
        "images_per_second_steady": images_per_epoch * len(steady) / float(sum(steady)),
        "history": h,
        "checkpoint": str(result.checkpoint),
        "machine": {"platform": platform.platform(), "device": str(jax.devices()[0])},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    acc = "-" if result.accuracy is None else f"{result.accuracy:.4f}"
    print(
        f"{args.model} on {args.data}: accuracy {acc} after {result.epochs} epochs, "
        f"{train_seconds / 60:.1f} min training, {summary['images_per_second_steady']:.0f} img/s; "
        f"wrote {out / 'summary.json'} and {result.checkpoint}"
    )
    return summary


if __name__ == "__main__":
    main()
