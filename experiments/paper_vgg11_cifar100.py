"""The paper's VGG-11 variant: the ResNet-18 run's settings on a VGG-11 (sized for a GPU).

VGG-11 has no global pooling layer, so the probed layers are its last three blocks
(block3, block4, block5, each after its max-pool); everything else (30 test images per
class, rank 20, 50 MU iterations, superclass analysis, fidelity) is as in
``paper_resnet18_cifar100.py``, whose command line this script shares.

Examples:
    python experiments/paper_vgg11_cifar100.py --source ~/data --out runs/paper_vgg11
    python experiments/paper_vgg11_cifar100.py --checkpoint runs/vgg11/ckpt --source ~/data
"""

import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paper_resnet18_cifar100 as paper  # noqa: E402

VGG11 = dataclasses.replace(
    paper.PAPER,
    command="paper_vgg11_cifar100",
    model="vgg11",
    layers=("block3", "block4", "block5"),
)

if __name__ == "__main__":
    paper.main(defaults=VGG11, out="runs/paper_vgg11_cifar100", doc=__doc__)
