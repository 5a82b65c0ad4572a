"""The module names of the flat layout (before 0.2), kept working for user code.

``import jaxcnmf.probe``, ``from jaxcnmf import tcav`` and ``jaxcnmf.analysis.purity`` resolve
to the modules' new homes. A moved name is the new module itself (one object: patching
``jaxcnmf.probe.collect`` patches ``jaxcnmf.nets.probe.collect``); ``jaxcnmf.analysis``,
which was split in five, is a module holding the public names of all five.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

MOVED = {
    "cli": "jaxcnmf.runs.cli",
    "data": "jaxcnmf.nets.data",
    "factorization": "jaxcnmf.solver.fit",
    "figures": "jaxcnmf.runs.figures",
    "initialization": "jaxcnmf.solver.initialization",
    "models": "jaxcnmf.nets.models",
    "pipeline": "jaxcnmf.runs.pipeline",
    "probe": "jaxcnmf.nets.probe",
    "report": "jaxcnmf.runs.report",
    "store": "jaxcnmf.solver.store",
    "tcav": "jaxcnmf.concepts.tcav",
    "train": "jaxcnmf.nets.train",
}
ANALYSIS = tuple(f"jaxcnmf.concepts.{m}" for m in ("labels", "neurons", "images", "neighbours", "fidelity"))


def _analysis(name: str) -> types.ModuleType:
    module = types.ModuleType(name, "The former flat analysis module: the public names of "
                              + ", ".join(ANALYSIS) + ".")
    exported = []
    for source in ANALYSIS:
        part = importlib.import_module(source)
        for attr in part.__all__:
            setattr(module, attr, getattr(part, attr))
            exported.append(attr)
    module.__all__ = sorted(exported)
    return module


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``jaxcnmf.<old name>`` and loads it as the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, short = fullname.rpartition(".")
        if package == "jaxcnmf" and (short in MOVED or short == "analysis"):
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        short = spec.name.rpartition(".")[2]
        if short == "analysis":
            return _analysis(spec.name)
        module = importlib.import_module(MOVED[short])
        # The import system overwrites __spec__ of what create_module returns; keep the
        # module's own, restored in exec_module.
        self._own_spec = module.__spec__
        return module

    def exec_module(self, module):
        if module.__name__ != "jaxcnmf.analysis":
            module.__spec__ = self._own_spec


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
