"""The ``jaxcnmf`` command: ``demo``, ``train``, ``analyze``, ``tcav`` and ``report``.

Each subcommand is a thin layer over :mod:`jaxcnmf.pipeline`. Mistakes a user can make on
the command line (an unknown layer, a rank larger than the probe set, a missing checkpoint
or data folder, a run directory that already exists or is incomplete, an unknown dataset)
end with one line
on stderr, ``jaxcnmf: error: ...``, and exit status 2; library errors are caught here and
nowhere else. Python warnings (``ConvergenceWarning``, ``DeadConceptWarning``,
``TcavWarning``, ...) print as one line each, ``jaxcnmf: warning: ...`` (a dead-concept
warning as ``jaxcnmf: note: ...``), in command-line words. Progress, stage and epoch lines
go to stderr; stdout receives only the final result path. SIGTERM is handled like Ctrl-C:
the run directory's ``run.json`` ends ``"interrupted"``.

Example:
    >>> from jaxcnmf.cli import main
    >>> main(["report", "runs/demo"])  # doctest: +SKIP
    0
"""

import argparse
import contextlib
import logging
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_EPILOG_MAIN = """\
examples:
  jaxcnmf demo                       # digits, small CNN, report in runs/demo (offline, 1-2 min)
  jaxcnmf train --model small --dataset cifar10 --source DIR --out runs/c10
  jaxcnmf analyze --checkpoint runs/c10/ckpt --dataset cifar10 --source DIR \\
                  --layers conv2,conv3,pool --per-class 300 --rank 20 --out runs/c10/concepts
  jaxcnmf tcav runs/c10/concepts     # validate the concepts with TCAV, add them to the report
  jaxcnmf report runs/c10/concepts   # re-draw report.html from a saved run

Run 'jaxcnmf COMMAND --help' for the options of one command.
"""

_EPILOG_DEMO = """\
The demo trains a small CNN on the digits bundled with scikit-learn (no files, no network),
probes the pixels and the layers conv2, conv3 and pool of 30 test images per class,
factorizes them with rank 10 (HALS, at most 500 iterations: it stops on its KKT rule well
before) and writes OUT/report.html.

If --out already holds files, the demo writes to a new directory OUT-YYYYmmdd-HHMMSS
beside it instead, so that repeating the demo never destroys an earlier run; pass --force
to overwrite OUT itself.

--tcav adds the TCAV step (see 'jaxcnmf tcav --help': default layer, every class).

examples:
  jaxcnmf demo
  jaxcnmf demo --quick --out /tmp/demo
  jaxcnmf demo --method mu --max-iter 1000 --force
  jaxcnmf demo --tcav --tcav-runs 20
"""

_EPILOG_TRAIN = """\
Writes the checkpoint to OUT/ckpt (the path 'jaxcnmf analyze --checkpoint' takes) and the
per-epoch history to OUT/train.json.

datasets: digits (bundled, offline), cifar10 and cifar100 (from --source, the folder holding
the official python archives, or tensorflow-datasets), an image folder or an .npz file with
'images' and 'labels'. An image folder holds one sub-folder per class (ROOT/CLASS/IMAGE), or
superclass/class folders (ROOT/SUPERCLASS/CLASS/IMAGE: the superclasses become coarse labels,
for 'analyze --groups superclass'), optionally under ROOT/train and ROOT/test.

If OUT/ckpt already holds a checkpoint, train refuses it unless --resume (continue that
training where it stopped, with the checkpoint's own settings) or --force (start over).

examples:
  jaxcnmf train --model small --dataset digits --out runs/digits --epochs 5
  jaxcnmf train --model small --dataset cifar10 --source ~/data --out runs/c10 --epochs 30 \\
                --schedule onecycle --warmup 0.15 --label-smoothing 0.1
  jaxcnmf train --dataset cifar10 --source ~/data --out runs/c10 --resume
  jaxcnmf train --dataset ~/photos --out runs/photos --epochs 20     # superclass/class folders
  jaxcnmf train --model resnet18 --dataset cifar100 --source ~/data --out runs/r18 --width 0.5
"""

_EPILOG_ANALYZE = """\
The run directory OUT receives report.html (one self-contained file), figures/*.png,
tables/*.csv and *.json, factorization.npz (reload with jaxcnmf.load_result), probe.npz
(the probe images, labels and the network's predictions) and run.json (settings, accuracy,
relative errors and wall time per stage). A file OUT/COMPLETE appears only when every stage
has finished. With --tcav, a last stage runs 'jaxcnmf tcav' on the new run (default layer,
every class) before the report is drawn.

examples:
  jaxcnmf analyze --checkpoint runs/c10/ckpt --dataset cifar10 --source DIR \\
                  --layers conv2,conv3,pool --per-class 300 --rank 20 --out runs/c10/concepts
  jaxcnmf analyze --checkpoint runs/c10/ckpt --dataset cifar10 --source DIR \\
                  --layers pool --pixels none --restarts 5 --no-baseline --out runs/c10/pool
  jaxcnmf analyze --checkpoint runs/r18/ckpt --dataset cifar100 --source DIR \\
                  --layers conv4_x,conv5_x,avgpool --per-class 30 --rank 20 \\
                  --group-sparse 0.1 --groups superclass --out runs/r18/concepts

--store DIR is for probe sets whose activations do not fit in memory: the probe stage writes
them to DIR block by block (--store-block-size images a block, by default about 64 MiB of
activations; each block probed in batches of --batch-size), the fit streams the blocks (HALS
or MU, over --devices devices, one start; --group-sparse and --group-lam with --groups class
and a --per-class probe set, whose blocks then hold whole classes), and the k-means
baseline, the layers-only fit, fidelity (on --fidelity-images of the probe images) and TCAV
read from it. Rerunning with --force after an interruption continues the store at its first
missing block, with the store's block size and any --batch-size (--force redoes the run
directory, never the store); a complete store of the same checkpoint, layers and probe set
is reused without probing; a store of anything else is refused. In memory remain the probe
images (uint8), F (rank x N) and a few blocks.
  jaxcnmf analyze --checkpoint runs/r18/ckpt --dataset cifar10 --source DIR --split train \\
                  --per-class 5000 --layers conv4_x,conv5_x,avgpool --pooling mean \\
                  --store runs/r18/acts --store-dtype bfloat16 --out runs/r18/train50k

Your own network: --model-module MODULE:BUILDER imports MODULE (from the current directory
or PYTHONPATH) and calls BUILDER, with num_classes= and input_shape= when it names them; it
returns a flax.nnx.Module, a flax.linen.Module or a probe.from_function adapter.
--checkpoint is then an orbax checkpoint directory of its state (what
orbax.checkpoint.StandardCheckpointer().save(DIR, nnx.state(model)) writes, or the Linen
variables), restored into the network; --layers names layers by their path (layer3,
layer4.1 for NNX, backbone/stage3 for Linen) and is required. 'jaxcnmf tcav' rebuilds the
network from the module and checkpoint recorded in run.json.
  jaxcnmf analyze --model-module mypkg.models:build --checkpoint /abs/ckpt \\
                  --dataset cifar10 --source DIR --layers layer3,layer4 --out runs/mine

--group-sparse F sets the group penalty as a fraction F in (0, 1] of the smallest penalty
that zeroes every group, whatever the data's scale; concepts that end empty are reported
in a note line and in run.json ("dead_concepts"); if every concept dies the run fails.
--group-lam sets the absolute weight instead (for experts). --pixels auto (the default)
uses one gray pixel view when the probe images are gray pictures stored as RGB.
  jaxcnmf analyze --checkpoint runs/c10/ckpt --dataset cifar10 --source DIR \\
                  --layers conv2,conv3 --rank 20 --tcav --tcav-runs 50 --out runs/c10/tcav
"""

_EPILOG_TCAV = """\
Validates a saved run's concepts with TCAV (Kim et al. 2018). Concept i is the --top probe
images with the largest weight in row i of F; for each of --random-runs random sets of probe
images (outside the concept) a linear classifier separates the concept's activations at the
layer from the random set's, and its unit normal is a concept activation vector (CAV). A
class's TCAV score is the fraction of its probe images whose class logit rises along the
CAV. Scores are tested against random-vs-random CAVs (two-sided Welch t-test), corrected over
the whole (layer, concept, class) grid.

The network comes from RUN_DIR/ckpt or the checkpoint named in RUN_DIR/run.json. The layer
defaults to the second-to-last probed layer with a spatial output when two or more were
probed (conv2 for the demo, conv4_x for ResNet-18 probed at conv4_x,conv5_x,avgpool), to
the only spatial one when one was, and to the last probed layer when none was; any
probe-able layer of the network may be named.
The last spatial layer is skipped because it reaches the logits through an average pool and
a dense layer only: a linear map, whose gradient is the same for every image of a class, so
every TCAV score there is 0 or 1 (jaxcnmf warns when a chosen layer does this). --top may be
at most a third of the probe set, since the random sets come from the rest of it.

Writes RUN_DIR/tcav.json, RUN_DIR/tcav.npz, tables/tcav.csv and figures/tcav_<layer>.png,
and re-draws report.html with a TCAV section: the concept x class heatmap of mean scores,
non-significant cells hatched, and the table of significant cells.

examples:
  jaxcnmf tcav runs/demo
  jaxcnmf tcav runs/c10/concepts --layer conv2,conv3 --top 50 --random-runs 100
  jaxcnmf tcav runs/c10/concepts --classes cat,dog --cav mean_diff --correction bonferroni
"""

_EPILOG_REPORT = """\
Re-computes the analyses that need only the saved factorization and probe set, re-draws
the figures and rewrites RUN_DIR/report.html; the network is not needed.

example:
  jaxcnmf report runs/c10/concepts
"""


class UsageError(Exception):
    """A command-line argument that cannot be used; reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line naming the command's --help."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _comma_list(text):
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _checked(convert, accept, expected):
    """An argparse type: ``convert`` the text, then insist on ``accept(value)``."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda value: value >= 1, "a positive integer")
_at_least_two = _checked(int, lambda value: value >= 2, "an integer >= 2")
_level = _checked(float, lambda value: 0 < value < 1, "a level in (0, 1)")
_non_negative_float = _checked(float, lambda value: value >= 0, "a number >= 0")
_fraction = _checked(float, lambda value: 0 < value <= 1, "a fraction in (0, 1]")
_unit_interval = _checked(float, lambda value: 0 <= value < 1, "a number in [0, 1)")
_positive_float = _checked(float, lambda value: 0 < value < float("inf"),
                           "a finite number > 0")
_input_shape = _checked(
    lambda text: tuple(int(item) for item in text.split(",")),
    lambda values: len(values) == 3 and min(values) >= 1 and values[2] in (1, 3),
    "H,W,C: three positive integers, C 1 or 3",
)
_positive_int_list = _checked(
    lambda text: tuple(int(item) for item in text.split(",")),
    lambda values: all(value >= 1 for value in values),
    "comma-separated positive integers",
)


def _add_common(parser):
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--force", action="store_true", help="overwrite the output directory if it holds files"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bars or stage lines on stderr"
    )


def _add_tcav_step(parser):
    parser.add_argument(
        "--tcav", action="store_true",
        help="test the concepts with TCAV at the end (see 'jaxcnmf tcav --help')",
    )
    parser.add_argument(
        "--tcav-runs", metavar="N", type=_at_least_two, default=None,
        help="random runs per concept for --tcav (default: 50)",
    )


def _classes(text):
    return None if text.strip() == "all" else _comma_list(text)


_DEFAULT_MAX_ITER = 500  # pipeline.DEFAULT_MAX_ITER; repeated so --help imports no jax


def _add_method(parser):
    parser.add_argument(
        "--method", choices=("hals", "mu"), default="hals",
        help="solver: hals (default; converges in a few hundred iterations) or mu "
        "(multiplicative updates, much slower to converge)",
    )


def _add_pixels(parser):
    parser.add_argument(
        "--pixels", choices=("auto", "rgb", "gray", "none"), default="auto",
        help="pixel views factorized with the layers: rgb (one per channel), gray (one), "
        "none, or auto: gray when every probe image has equal red, green and blue "
        "(default: auto)",
    )
    parser.add_argument(  # the earlier spelling of --pixels none
        "--no-pixels", dest="pixels", action="store_const", const="none",
        help=argparse.SUPPRESS,
    )


def _add_data(parser, default="digits"):
    parser.add_argument(
        "--dataset",
        default=default,
        help="digits, cifar10, cifar100, an image folder or an .npz file (default: digits"
        + (", or the checkpoint's with --resume)" if default is None else ")"),
    )
    parser.add_argument(
        "--source",
        metavar="DIR",
        help="folder holding the dataset files (e.g. cifar-10-batches-py); "
        "without it cifar10/cifar100 come from tensorflow-datasets",
    )


_FORMATTER = argparse.RawDescriptionHelpFormatter


def _subcommand(commands, name, *, help, description, epilog):
    """One subcommand's parser, with the formatting every subcommand shares."""
    return commands.add_parser(name, help=help, description=description, epilog=epilog,
                               formatter_class=_FORMATTER)


def _add_run_dir(parser):
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by analyze/demo")


def _add_demo(commands):
    demo = _subcommand(
        commands, "demo",
        help="train, probe, factorize and report on the bundled digits (offline)",
        description="End-to-end concept analysis of a small CNN on the bundled digits.",
        epilog=_EPILOG_DEMO,
    )
    demo.add_argument(
        "--out", default="runs/demo", help="run directory (default: runs/demo)"
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help="a reduced run for smoke tests (1 epoch, 10 images per class)",
    )
    _add_method(demo)
    demo.add_argument(
        "--max-iter", metavar="N", type=_positive_int, default=None,
        help=f"most solver iterations; the solver stops earlier on its KKT rule "
        f"(default: {_DEFAULT_MAX_ITER})",
    )
    _add_pixels(demo)
    _add_tcav_step(demo)
    _add_common(demo)


def _add_train(commands):
    train = _subcommand(
        commands, "train",
        help="train a CNN and save a checkpoint",
        description="Train one of the bundled CNNs and save a checkpoint for 'analyze'.",
        epilog=_EPILOG_TRAIN,
    )
    # Training settings default to None: with --resume only the ones given are checked
    # against the checkpoint's; without it None takes the default named in the help.
    train.add_argument(
        "--model", default=None, help="small, resnet18 or vgg11 (default: small)"
    )
    _add_data(train, default=None)
    train.add_argument("--out", required=True, help="output directory; checkpoint in OUT/ckpt")
    train.add_argument("--epochs", type=_positive_int, default=None, help="default: 10")
    train.add_argument(
        "--width", type=_positive_float, default=None,
        help="channel width multiplier (default: 1.0)",
    )
    train.add_argument("--batch-size", type=_positive_int, default=None, help="default: 128")
    train.add_argument(
        "--lr", type=_positive_float, default=None,
        help="peak learning rate (default: the trainer's, 0.05)",
    )
    train.add_argument(
        "--schedule", choices=("cosine", "onecycle", "constant"), default=None,
        help="learning-rate schedule: cosine (warm-up, then cosine to 0), onecycle or "
        "constant (default: cosine)",
    )
    train.add_argument(
        "--warmup", metavar="FRACTION", type=_unit_interval, default=None,
        help="fraction of the steps spent warming up to --lr (default: 0, 0.25 for onecycle)",
    )
    train.add_argument(
        "--label-smoothing", metavar="EPS", type=_unit_interval, default=None,
        help="label smoothing in [0, 1) (default: 0)",
    )
    train.add_argument(
        "--no-augment", dest="augment", action="store_false", default=None,
        help="no random crops and flips",
    )
    train.add_argument(
        "--resume", action="store_true",
        help="continue the training checkpointed in OUT/ckpt (or the ckpt.old a crash "
        "left), with its own settings",
    )
    _add_common(train)


def _add_probe_options(parser):
    """analyze: which layers and images are probed, and how a layer becomes rows."""
    parser.add_argument(
        "--layers",
        metavar="LIST",
        type=_comma_list,
        default=None,
        help="comma-separated layers to probe (default: every probe-able layer)",
    )
    parser.add_argument(
        "--split", choices=("train", "test"), default="test", help="probe split (default: test)"
    )
    parser.add_argument(
        "--per-class",
        metavar="N",
        type=_positive_int,
        default=100,
        help="probe images per class, balanced (default: 100)",
    )
    _add_pixels(parser)
    parser.add_argument(
        "--pooling",
        choices=("flatten", "mean", "max"),
        default="flatten",
        help="how a conv layer becomes rows: every position, or pooled per channel "
        "(default: flatten)",
    )


def _add_solver_options(parser):
    """analyze: the factorization's settings."""
    parser.add_argument(
        "--rank", metavar="K", type=_positive_int, default=20,
        help="number of concepts (default: 20)",
    )
    _add_method(parser)
    parser.add_argument(
        "--max-iter", metavar="N", type=_positive_int, default=_DEFAULT_MAX_ITER,
        help=f"most solver iterations; the solver stops earlier on its KKT rule "
        f"(default: {_DEFAULT_MAX_ITER})",
    )
    parser.add_argument(
        "--restarts",
        metavar="N",
        type=_positive_int,
        default=1,
        help="random restarts; the best is kept and their stability reported (default: 1)",
    )
    parser.add_argument(
        "--devices", metavar="N", type=_positive_int, default=None,
        help="shard the images over N local devices (GPUs/TPUs) in the factorization "
        "(default: all local devices; 1 on a CPU)",
    )
    parser.add_argument(
        "--weights",
        choices=("balanced", "none"),
        default="balanced",
        help="view weights: 'balanced' gives every view the same total weight "
        "(default: balanced)",
    )
    parser.add_argument(
        "--pixel-share", metavar="F", type=_pixel_share, default=0.1,
        help="with balanced weights, the pixel views' share of the objective, or 'equal' "
        "for the paper's equal weight per view (default: 0.1, chosen by "
        "experiments/validity.py: near the layers-only purity, latent images kept)",
    )
    parser.add_argument(
        "--unit-columns",
        action="store_true",
        help="normalise each loadings column to unit norm (scale lives in F)",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--group-sparse",
        metavar="F",
        type=_fraction,
        default=None,
        help="group lasso on F over the --groups, as a fraction in (0, 1] of the smallest "
        "penalty that zeroes every group (try 0.01-0.1; default: off)",
    )
    group.add_argument(
        "--group-lam",
        metavar="LAM",
        type=_non_negative_float,
        default=0.0,
        help="the group-lasso weight as an absolute number instead (experts; its useful "
        "range depends on the data's scale)",
    )
    parser.add_argument(
        "--groups",
        choices=("class", "superclass"),
        default="class",
        help="groups of images for --group-sparse (default: class)",
    )
    parser.add_argument(
        "--no-baseline", dest="baseline", action="store_false",
        help="skip the k-means baseline the report compares the concepts with",
    )


def _add_analyze(commands):
    analyze = _subcommand(
        commands, "analyze",
        help="probe a trained CNN, factorize, analyse and write the report",
        description="Probe a trained CNN with a balanced subset of a dataset, factorize the "
        "pixels and layer activations jointly, run every analysis and write report.html.",
        epilog=_EPILOG_ANALYZE,
    )
    analyze.add_argument(
        "--checkpoint", metavar="DIR", default=None,
        help="checkpoint written by 'jaxcnmf train'; with --model-module, an orbax "
        "checkpoint of that network's state (nnx.state(model) or Linen variables)",
    )
    analyze.add_argument(
        "--model-module", metavar="MODULE:BUILDER", default=None,
        help="your own network: MODULE is imported from the current directory or "
        "PYTHONPATH and BUILDER() (given num_classes=, input_shape= if it names them) "
        "returns a flax.nnx.Module, a flax.linen.Module or a probe.from_function adapter",
    )
    analyze.add_argument(
        "--input-shape", metavar="H,W,C", type=_input_shape, default=None,
        help="with --model-module, the image shape the network takes, checked against "
        "the dataset's (default: the dataset's)",
    )
    _add_data(analyze)
    analyze.add_argument("--out", required=True, help="run directory to create")
    _add_probe_options(analyze)
    _add_solver_options(analyze)
    analyze.add_argument(
        "--fidelity-ranks",
        metavar="LIST",
        type=_positive_int_list,
        default=(2, 5, 10),
        help="ranks at which fidelity is measured, besides --rank (default: 2,5,10)",
    )
    analyze.add_argument(
        "--batch-size", metavar="N", type=_positive_int, default=256,
        help="images per forward pass when probing (default: 256)",
    )
    analyze.add_argument(
        "--store", metavar="DIR", default=None,
        help="probe into an on-disk activation store in DIR, fit by streaming from it and "
        "run the analyses from it, for probe sets whose activations do not fit in memory "
        "(a rerun resumes an unfinished store and reuses a complete one; see below)",
    )
    analyze.add_argument(
        "--store-dtype", choices=("float32", "bfloat16"), default=None,
        help="dtype of the stored activations; bfloat16 halves disk and reads (default: "
        "float32; needs --store)",
    )
    analyze.add_argument(
        "--store-block-size", metavar="N", type=_positive_int, default=None,
        help="images per store block (default: about 64 MiB of activations a block, whole "
        "classes with a group penalty; an unfinished store resumes with its own; needs "
        "--store)",
    )
    analyze.add_argument(
        "--fidelity-images", metavar="N", type=_positive_int, default=None,
        help="with --store, measure fidelity (and draw TCAV's classes and random sets) on a "
        "random subset of N probe images (default: 2000; needs --store)",
    )
    _add_tcav_step(analyze)
    analyze.add_argument(
        "--tcav-top", metavar="N", type=_positive_int, default=None,
        help="images per concept for --tcav (default: 50, at most a third of the probe "
        "set)",
    )
    _add_common(analyze)


def _add_tcav(commands):
    tcav = _subcommand(
        commands, "tcav",
        help="validate a saved run's concepts with TCAV and add them to its report",
        description="Test each concept of a saved run with TCAV against every class and "
        "add the concept x class heatmap to report.html.",
        epilog=_EPILOG_TCAV,
    )
    _add_run_dir(tcav)
    tcav.add_argument(
        "--layer", metavar="LIST", type=_comma_list, default=None,
        help="layer(s) to test, comma-separated (default: the second-to-last spatial "
        "probed layer, or the only one; the last feeds a linear head, see below)",
    )
    tcav.add_argument(
        "--top", metavar="N", type=_positive_int, default=None,
        help="images per concept: the top of each row of F (default: 50, or a third of "
        "the probe set when that is smaller)",
    )
    tcav.add_argument(
        "--random-runs", metavar="N", type=_at_least_two, default=50,
        help="random sets per concept, at least 2 (default: 50)",
    )
    tcav.add_argument(
        "--classes", metavar="LIST", type=_classes, default=None,
        help="'all' or comma-separated class names to score (default: all)",
    )
    tcav.add_argument(
        "--correction", choices=("bh", "bonferroni"), default="bh",
        help="multiple-testing correction over the grid (default: bh, Benjamini-Hochberg)",
    )
    tcav.add_argument(
        "--alpha", type=_level, default=0.05,
        help="significance level after correction (default: 0.05)",
    )
    tcav.add_argument(
        "--cav", choices=("logistic", "mean_diff"), default="logistic",
        help="how a CAV is found: logistic (L2-regularised logistic regression, the "
        "default) or mean_diff (the difference of the means, faster)",
    )
    tcav.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    tcav.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _add_report(commands):
    report = _subcommand(
        commands, "report",
        help="re-draw report.html from a saved run directory",
        description="Re-draw the figures, tables and report.html of a saved run.",
        epilog=_EPILOG_REPORT,
    )
    _add_run_dir(report)
    report.add_argument("--quiet", action="store_true", help="no progress on stderr")


_SUBCOMMANDS = (_add_demo, _add_train, _add_analyze, _add_tcav, _add_report)


def build_parser():
    """The argument parser of the ``jaxcnmf`` command.

    Returns:
        argparse.ArgumentParser: with subcommands demo, train, analyze, tcav and report
        (one builder each, in that order, which is the order ``--help`` lists them in).
    """
    from jaxcnmf import __version__

    parser = _Parser(
        prog="jaxcnmf",
        description="Find the concepts a trained CNN has learned: coupled non-negative "
        "matrix factorization of a probe set's pixels and layer activations.",
        epilog=_EPILOG_MAIN,
        formatter_class=_FORMATTER,
    )
    parser.add_argument("--version", action="version", version=f"jaxcnmf {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for add in _SUBCOMMANDS:
        add(commands)
    return parser


def _demo(args):
    from jaxcnmf.runs import pipeline

    # Settings are checked before the run directory is chosen, so a bad argument ends
    # with its error line alone.
    tcav = _tcav_settings(args)
    out = _check_out_arg(args.out)
    if not args.force and pipeline.holds_files(out):
        requested = out
        out = out.with_name(f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        _note(f"{requested} already holds a run; writing to {out} (--force overwrites it)")
    config = pipeline.demo_config(quick=args.quick, method=args.method,
                                  max_iter=args.max_iter, pixels=args.pixels, seed=args.seed)
    return pipeline.run(config, out, force=args.force, progress=not args.quiet, tcav=tcav)


def _check_out_arg(out) -> Path:
    """``--out`` as a Path; an existing non-directory (a file, a device) is an error."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a directory; expected a new or "
                         "existing directory")
    return out


def _tcav_settings(args):
    """The TCAV settings of ``--tcav``, or None without it."""
    from jaxcnmf.runs import pipeline

    given = [flag for flag, value in (("--tcav-runs", args.tcav_runs),
                                      ("--tcav-top", getattr(args, "tcav_top", None)))
             if value is not None]
    if not args.tcav:
        if given:
            raise UsageError(f"{given[0]} needs --tcav")
        return None
    defaults = pipeline.TcavConfig()
    return pipeline.TcavConfig(top=getattr(args, "tcav_top", None),
                               random_runs=args.tcav_runs or defaults.random_runs,
                               seed=args.seed)


def _train(args):
    from jaxcnmf.runs import pipeline

    if args.resume and args.force:
        raise UsageError("--resume and --force: expected one of them (--force starts over)")
    return pipeline.train_model(
        model=args.model,
        dataset=args.dataset,
        source=args.source,
        out=_check_out_arg(args.out),
        epochs=args.epochs,
        width=args.width,
        batch_size=args.batch_size,
        lr=args.lr,
        augment=args.augment,
        schedule=args.schedule,
        warmup=args.warmup,
        label_smoothing=args.label_smoothing,
        seed=args.seed,
        force=args.force,
        resume=args.resume,
        progress=not args.quiet,
    )


def _pixel_share(text: str):
    if text == "equal":
        return None
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) or 'equal', got {text!r}")
    return value


def _analyze(args):
    from jaxcnmf.runs import pipeline

    if args.checkpoint is None and args.model_module is None:
        raise UsageError("--checkpoint: expected a checkpoint written by 'jaxcnmf train', or "
                         "--model-module MODULE:BUILDER for your own network")
    if args.input_shape is not None and args.model_module is None:
        raise UsageError("--input-shape needs --model-module (a checkpoint from 'jaxcnmf "
                         "train' records its own)")
    config = pipeline.RunConfig(
        command="analyze",
        dataset=args.dataset,
        source=args.source,
        checkpoint=args.checkpoint,
        model_module=args.model_module,
        input_shape=args.input_shape,
        layers=args.layers,
        split=args.split,
        per_class=args.per_class,
        pixels=args.pixels,
        pooling=args.pooling,
        rank=args.rank,
        method=args.method,
        max_iter=args.max_iter,
        restarts=args.restarts,
        devices=args.devices,
        weights=None if args.weights == "none" else args.weights,
        pixel_share=args.pixel_share,
        unit_columns=args.unit_columns,
        group_lam=args.group_lam,
        group_lam_fraction=args.group_sparse,
        groups=args.groups,
        baseline=args.baseline,
        fidelity_ranks=args.fidelity_ranks,
        batch_size=args.batch_size,
        seed=args.seed,
        **_store_settings(args),
    )
    tcav = _tcav_settings(args)
    return pipeline.run(config, _check_out_arg(args.out), force=args.force,
                        progress=not args.quiet, tcav=tcav)


def _store_settings(args) -> dict:
    """RunConfig's store fields from --store, --store-dtype, --store-block-size and
    --fidelity-images."""
    from jaxcnmf.runs import pipeline

    if args.store is None:
        given = [flag for flag, value in (("--store-dtype", args.store_dtype),
                                          ("--store-block-size", args.store_block_size),
                                          ("--fidelity-images", args.fidelity_images))
                 if value is not None]
        if given:
            raise UsageError(f"{given[0]} needs --store")
        return {}
    return {"store": args.store, "store_dtype": args.store_dtype or "float32",
            "store_block_size": args.store_block_size,
            "fidelity_images": args.fidelity_images or pipeline.DEFAULT_FIDELITY_IMAGES}


def _tcav(args):
    from jaxcnmf.runs import pipeline

    config = pipeline.TcavConfig(
        layers=args.layer, top=args.top, random_runs=args.random_runs, classes=args.classes,
        correction=args.correction, alpha=args.alpha, cav_method=args.cav, seed=args.seed,
    )
    return pipeline.run_tcav(args.run_dir, config, progress=not args.quiet)


def _report(args):
    from jaxcnmf.runs import report

    return report.write_report(args.run_dir, progress=not args.quiet)


_COMMANDS = {"demo": _demo, "train": _train, "analyze": _analyze, "tcav": _tcav,
             "report": _report}


def _note(message):
    print(f"jaxcnmf: {message}", file=sys.stderr)


def _fail(message):
    one_line = " ".join(str(message).split())
    print(f"jaxcnmf: error: {one_line}", file=sys.stderr)
    return EXIT_USAGE


# Library parameter names in warnings and errors, as the command line spells them.
_CLI_WORDS = (
    (r"\bgroup_lam_fraction[ =]", "--group-sparse "),
    (r"\bgroup_lam[ =]", "--group-lam "),
    (r"\bmax_iter[ =]", "--max-iter "),
    (r"\bmax_iter\b", "--max-iter"),
    (r"\bsource=DIR\b", "--source DIR"),
    (r"^model_module:", "--model-module:"),
    (r"^input_shape:", "--input-shape:"),
    # probe.collect's advice for a pre-activation layer names options analyze lacks.
    (r"\(its ReLU\), or pass negative=.*$", "(its ReLU) in --layers"),
)


def _cli_words(message: str) -> str:
    for pattern, words in _CLI_WORDS:
        message = re.sub(pattern, words, message)
    return message


def _format_warning(message, category, filename, lineno, line=None):
    """warnings.formatwarning for the CLI: one line, no file path or source line.

    Replacing the format rather than ``showwarning`` keeps warnings visible to whoever
    records them around ``main`` (``warnings.catch_warnings(record=True)``,
    ``pytest.warns``).
    """
    from jaxcnmf.solver.fit import DeadConceptWarning

    kind = "note" if issubclass(category, DeadConceptWarning) else "warning"
    text = " ".join(_cli_words(str(message)).split())
    return f"jaxcnmf: {kind}: {text}\n"


def _dataset_error(err: FileNotFoundError, args) -> str:
    """A CIFAR that is nowhere to be found, in command-line words: what to pass."""
    from jaxcnmf.nets import data

    dataset, message = getattr(args, "dataset", None), str(err)
    spec = getattr(data, "_CIFAR", {}).get(dataset)
    if spec is None or getattr(args, "source", None) or \
            not message.startswith(f"{dataset}: not found"):
        return _cli_words(message)
    looked = re.search(r"Looked in: (.*?)\.\s", message)
    return (f"{dataset}: not found; pass --source DIR, where DIR holds {spec['archive']} "
            f"or its extracted {spec['folder']}/ (or set $JAXCNMF_DATA=DIR)"
            + (f"; looked in {looked.group(1)}" if looked else ""))


@contextlib.contextmanager
def _cli_environment():
    """What main() changes for the duration of a command, and restores after it.

    Warnings print as one line; absl's logging (tensorflow-datasets') is quieted below
    errors; SIGTERM raises KeyboardInterrupt like Ctrl-C, so the run directory is marked
    "interrupted"; stdout goes to stderr, so that progress, stage and epoch lines share
    one stream and stdout carries only the result path main() prints after.
    """
    absl = logging.getLogger("absl")
    absl_level, previous_format = absl.level, warnings.formatwarning
    absl.setLevel(logging.ERROR)
    previous_term = None
    if threading.current_thread() is threading.main_thread():
        previous_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            warnings.formatwarning = _format_warning
            yield
    finally:
        warnings.formatwarning = previous_format
        absl.setLevel(absl_level)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    """Run the ``jaxcnmf`` command.

    Args:
        argv: the arguments after the program name (list of str); ``None`` reads
            ``sys.argv[1:]``.

    Returns:
        int: 0 on success, after printing the result path (report, checkpoint) on
        stdout. Usage and input errors raise ``SystemExit(2)`` after one line
        ``jaxcnmf: error: ...`` on stderr; Ctrl-C and SIGTERM raise ``SystemExit(130)``.

    Example:
        >>> main(["demo", "--quick", "--out", "/tmp/demo"])  # doctest: +SKIP
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        raise SystemExit(_fail(err)) from None
    if args.command is None:
        parser.print_help(sys.stderr)
        raise SystemExit(EXIT_USAGE)
    try:
        with _cli_environment():
            written = _COMMANDS[args.command](args)
    except FileNotFoundError as err:
        raise SystemExit(_fail(_dataset_error(err, args))) from None
    except (UsageError, ValueError, FileExistsError, NotADirectoryError) as err:
        raise SystemExit(_fail(_cli_words(str(err)))) from None
    except KeyboardInterrupt:
        _note("interrupted; the output directory is incomplete (no COMPLETE marker)")
        raise SystemExit(EXIT_INTERRUPTED) from None
    print(written)
    return 0
