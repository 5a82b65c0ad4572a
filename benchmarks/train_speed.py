"""Training throughput of the models on CIFAR-shaped batches, to plan a full training run.

Times the jitted SGD step of ``jaxcnmf.train`` (augmentation, forward, backward, update)
on random 32x32x3 batches for each model, after a warm-up step whose time (compilation)
is reported separately, and converts images/s into seconds per CIFAR epoch (50,000
images). Random pixels cost the same as real ones, so no dataset is needed.

Usage:
    python benchmarks/train_speed.py                          # small, resnet18, vgg11 at width 1
    python benchmarks/train_speed.py --models small --steps 5 --quick
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

from jaxcnmf.nets import models, train

CIFAR_EPOCH = 50_000


def measure(name, width, batch_size, steps, num_classes=10):
    model = models.build(name, num_classes=num_classes, width=width)
    config = train.TrainConfig(epochs=1, batch_size=batch_size)
    tx = train.make_optimizer(config, steps_per_epoch=steps + 1)
    state = train.create_train_state(model, jax.random.PRNGKey(0), (32, 32, 3), tx)
    step = train._jitted_train_step(config)
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.random((batch_size, 32, 32, 3), dtype=np.float32))
    labels = jax.device_put(rng.integers(0, num_classes, batch_size).astype(np.int32))
    key = jax.random.PRNGKey(1)

    t0 = time.perf_counter()
    state, metrics = step(state, images, labels, key)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0

    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, images, labels, key)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - t0
    rate = steps * batch_size / seconds
    return {
        "model": name,
        "width": width,
        "batch_size": batch_size,
        "steps": steps,
        "first_step_s": first,
        "images_per_s": rate,
        "seconds_per_cifar_epoch": CIFAR_EPOCH / rate,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="small,resnet18,vgg11")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="width 0.25, 3 timed steps")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_speed.json"))
    args = parser.parse_args(argv)
    width, steps = (0.25, 3) if args.quick else (args.width, args.steps)

    rows = [measure(name, width, args.batch_size, steps) for name in args.models.split(",")]
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}")
    print(f"{'model':<10}{'width':>7}{'batch':>7}{'compile s':>11}{'img/s':>10}{'s/epoch':>10}")
    for r in rows:
        print(f"{r['model']:<10}{r['width']:>7}{r['batch_size']:>7}{r['first_step_s']:>11.1f}"
              f"{r['images_per_s']:>10.0f}{r['seconds_per_cifar_epoch']:>10.0f}")
    result = {
        "benchmark": "train_speed",
        "device": f"{device.device_kind} ({device.platform})",
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "jax_version": jax.__version__,
        "quick": args.quick,
        "results": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
