"""Suite-wide settings.

XLA's backend optimisations (LLVM passes on the CPU) dominate the suite's time: hundreds of
small programs are compiled once each and run for milliseconds. The tests check behaviour and
numerics to stated tolerances, not speed, so they compile at optimisation level 0 (about 2x
faster on the 2-core CI machine; measured on tests/nets/test_probe.py and test_models.py:
61 s against 142 s). Benchmarks and experiments run at XLA's default level. A level already
given in ``XLA_FLAGS`` is kept.
"""

import os

_FLAG = "--xla_backend_optimization_level"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=0".strip()
