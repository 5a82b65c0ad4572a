"""Images per second of ``probe.collect`` against plain jitted inference of the same model.

Both passes read the same uint8 images in the same batches, convert each batch on the
host, keep the next batch in flight while the previous result is copied back, and pad the
last batch; the plain pass returns the logits, ``collect`` the probe matrices, once as
numpy arrays (``output="numpy"``, on the host) and once as device arrays
(``output="device"``, blocked on until ready). The two outputs are checked to be equal.
The first run of each compiles and is reported separately; the timed figure is the median
of ``--repeats`` runs. Writes ``benchmarks/results/probe_speed.json`` next to a printed
table.

``--models nnx_resnet18`` runs the same comparison for a Flax NNX port of ResNet-18 (a
user's own NNX class, probed by attribute path: ``layer3``, ``layer4``, the outputs of its last two stages),
against plain jitted inference of the split model (``nnx.split`` / ``nnx.merge`` inside
``jax.jit``, eval mode), which is how NNX users run inference.

Usage:
    python benchmarks/probe_speed.py                 # width 1, 1024 images, batch 256
    python benchmarks/probe_speed.py --quick         # width 0.25, 256 images, batch 64
    python benchmarks/probe_speed.py --quick --models small nnx_resnet18 \
        --out benchmarks/results/probe_speed_nnx.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import _record  # benchmarks/_record.py, beside this script
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcnmf.nets import models, probe

DEFAULT_LAYERS = {
    "small": ("conv2", "conv3", "pool"),
    "resnet18": ("conv4_x", "conv5_x", "avgpool"),
    "vgg11": ("block3", "block4", "block5"),
    "nnx_resnet18": ("layer3", "layer4"),  # resnet18's conv4_x and conv5_x
}
NNX_MODELS = ("nnx_resnet18",)


class BasicBlock(nnx.Module):
    """ResNet basic block, as a user writes it in NNX: two 3x3 convs with batch norm."""

    def __init__(self, cin: int, cout: int, stride: int, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, padding=1, use_bias=False,
                              rngs=rngs)
        self.bn1 = nnx.BatchNorm(cout, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, rngs=rngs)
        self.shortcut = nnx.data(None)
        if stride != 1 or cin != cout:
            self.shortcut = nnx.Sequential(
                nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs),
                nnx.BatchNorm(cout, rngs=rngs),
            )

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return nnx.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class NNXResNet18(nnx.Module):
    """CIFAR ResNet-18 in Flax NNX: ``layer1`` ... ``layer4`` are lists of two blocks."""

    def __init__(self, num_classes: int, width: float, rngs: nnx.Rngs):
        c = [models.scaled(n, width) for n in (64, 128, 256, 512)]
        self.conv1 = nnx.Conv(3, c[0], (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(c[0], rngs=rngs)
        cin, stages = c[0], []
        for i, cout in enumerate(c):
            stride = 1 if i == 0 else 2
            stages.append(nnx.List([BasicBlock(cin, cout, stride, rngs),
                                    BasicBlock(cout, cout, 1, rngs)]))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nnx.Linear(cin, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x)
        return self.fc(x.mean(axis=(1, 2)))


def nnx_resnet18(num_classes: int, width: float) -> NNXResNet18:
    """The NNX ResNet-18 with He-normal kernels, built abstractly and filled from NumPy
    (eager initialisers compile op by op, which takes minutes on a CPU)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NNXResNet18(num_classes, width,
                                                                    nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def fill(path, a):
        name = str(path[-1])
        if "kernel" in name:
            return jnp.asarray(rng.normal(0, np.sqrt(2 / np.prod(a.shape[:-1])), a.shape),
                               jnp.float32)
        if "scale" in name or "var" in name:
            return jnp.ones(a.shape, jnp.float32)
        return jnp.zeros(a.shape, jnp.float32)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def plain_inference(apply, variables, images, batch_size):
    """Logits of every image from jitted ``apply``, batched exactly as ``collect`` batches."""
    outs, pending = [], None
    for start in range(0, len(images), batch_size):
        block = images[start : start + batch_size].astype(np.float32) / np.float32(255)
        n_valid = len(block)
        if n_valid < batch_size:
            block = np.concatenate([block, np.zeros((batch_size - n_valid, *block.shape[1:]), block.dtype)])
        logits = apply(variables, block)
        if pending is not None:
            outs.append(np.asarray(pending[0])[: pending[1]])
        pending = (logits, n_valid)
    outs.append(np.asarray(pending[0])[: pending[1]])
    return np.concatenate(outs)


def timed(fn, repeats):
    """(first-run seconds, median seconds of the next ``repeats`` runs)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def build(name, width):
    """(model, variables for collect, jitted plain inference, its first argument)."""
    if name in NNX_MODELS:
        model = nnx_resnet18(10, width)
        graphdef, state = nnx.split(model)

        def run(s, x):
            net = nnx.merge(graphdef, s)
            net.eval()
            return net(x)

        return model, None, jax.jit(run), state
    model = models.build(name, 10, width)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(
        jnp.zeros((1, 32, 32, 3), jnp.float32)
    )
    return model, variables, jax.jit(lambda v, x: model.apply(v, x, train=False)), variables


def bench(name, width, n, batch_size, pooling, repeats):
    model, variables, apply, apply_state = build(name, width)
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    layers = DEFAULT_LAYERS[name]

    first_plain, plain = timed(lambda: plain_inference(apply, apply_state, images, batch_size),
                               repeats)
    def collect(output):
        views = probe.collect(
            model, variables, images, layers, pooling=pooling, batch_size=batch_size,
            progress=False, output=output,
        )
        return jax.block_until_ready(views)

    first_collect, collect_numpy = timed(lambda: collect("numpy"), repeats)
    # Both outputs run the same compiled program, so only the first compiles.
    _, collect_device = timed(lambda: collect("device"), repeats)
    host, device = collect("numpy"), collect("device")
    equal = list(host) == list(device) and all(
        np.array_equal(host[k], np.asarray(device[k])) for k in host
    )
    return {
        "model": name,
        "width": width,
        "layers": list(layers),
        "pooling": pooling,
        "n_images": n,
        "batch_size": batch_size,
        "view_megabytes": sum(v.nbytes for v in host.values()) / 2**20,
        "plain_images_per_s": n / plain,
        "collect_images_per_s": n / collect_numpy,
        "collect_device_images_per_s": n / collect_device,
        "ratio": plain / collect_numpy,
        "ratio_device": plain / collect_device,
        "device_equals_numpy": bool(equal),
        "plain_compile_s": first_plain - plain,
        "collect_compile_s": first_collect - collect_numpy,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small", "resnet18"], choices=models.MODEL_NAMES + NNX_MODELS)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--n", type=int, default=1024, help="images per pass")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--pooling", default="flatten", choices=probe.POOLINGS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="width 0.25, 256 images, batch 64")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "probe_speed.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.n, args.batch_size = 0.25, 256, 64

    rows = [bench(m, args.width, args.n, args.batch_size, args.pooling, args.repeats) for m in args.models]

    print(
        f"{'model':<14}{'width':>7}{'N':>7}{'batch':>7}{'MB':>8}{'plain img/s':>13}"
        f"{'numpy img/s':>13}{'ratio':>7}{'device img/s':>14}{'ratio':>7}{'equal':>7}"
    )
    for r in rows:
        print(
            f"{r['model']:<14}{r['width']:>7.3g}{r['n_images']:>7}{r['batch_size']:>7}"
            f"{r['view_megabytes']:>8.1f}{r['plain_images_per_s']:>13.1f}"
            f"{r['collect_images_per_s']:>13.1f}{r['ratio']:>7.2f}"
            f"{r['collect_device_images_per_s']:>14.1f}{r['ratio_device']:>7.2f}"
            f"{str(r['device_equals_numpy']):>7}"
        )
    print("compile s (plain / collect): " + "; ".join(
        f"{r['model']} {r['plain_compile_s']:.2f} / {r['collect_compile_s']:.2f}" for r in rows
    ))
    result = {
        "benchmark": "probe_speed",
        **_record.machine(),
        "args": vars(args),
        "results": rows,
    }
    _record.write(args.out, result)


if __name__ == "__main__":
    main()
