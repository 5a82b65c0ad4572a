"""Suite-wide settings.

XLA's backend optimisations (LLVM passes on the CPU) dominate the suite's time: hundreds of
small programs are compiled once each and run for milliseconds. The tests check behaviour and
numerics to stated tolerances, not speed, so they compile at optimisation level 0 (about 2x
faster on the 2-core CI machine; measured on tests/nets/test_probe.py and test_models.py:
61 s against 142 s). Benchmarks and experiments run at XLA's default level. A level already
given in ``XLA_FLAGS`` is kept.
"""

import os

import pytest

_FLAG = "--xla_backend_optimization_level"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=0".strip()


# A user's own NNX network as it sits in their module (nested blocks with batch norm);
# tests/nets/test_usermodel.py and tests/runs/test_cli.py write it, with builders of their
# own, to a folder on sys.path.
TINY_NNX_MODULE = '''
from flax import nnx


class Block(nnx.Module):
    def __init__(self, cin, cout, rngs):
        self.conv = nnx.Conv(cin, cout, (3, 3), rngs=rngs)
        self.norm = nnx.BatchNorm(cout, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.norm(self.conv(x)))


class TinyCNN(nnx.Module):
    def __init__(self, num_classes, channels, seed=0):
        rngs = nnx.Rngs(seed)
        self.layer1 = Block(channels, 4, rngs)
        self.layer2 = Block(4, 6, rngs)
        self.fc = nnx.Linear(6, num_classes, rngs=rngs)

    def __call__(self, x):
        h = self.layer2(self.layer1(x)[:, ::4, ::4])
        return self.fc(h.mean((1, 2)))


def build(num_classes, input_shape):
    return TinyCNN(num_classes, input_shape[-1])
'''


@pytest.fixture(scope="session")
def tiny_nnx_module() -> str:
    """The source of a module defining ``Block``, ``TinyCNN`` and ``build``."""
    return TINY_NNX_MODULE
