"""The package layout: imports flow one way, and the former flat module names still work.

Layers, lowest first: ``solver`` and ``nets`` (either may use the other), then
``concepts``, then ``runs``. A module may import its own layer and the layers below it,
never one above: so ``jaxcnmf.nets.probe`` can be used without the analyses, and the
analyses without the application. Every import counts, including the lazy ones inside
functions, since they run too.
"""

import ast
import importlib
import pathlib
import sys

import pytest

import jaxcnmf
from jaxcnmf import _moved

PACKAGE = pathlib.Path(jaxcnmf.__file__).parent
RANK = {"solver": 0, "nets": 0, "concepts": 1, "runs": 2}


def _layer(module: str) -> str | None:
    """``"nets"`` for ``jaxcnmf.nets.probe``; former flat names resolve to their new home."""
    parts = module.split(".")
    if parts[0] != "jaxcnmf" or len(parts) < 2:
        return None
    if parts[1] in _moved.MOVED:
        return _moved.MOVED[parts[1]].split(".")[1]
    if parts[1] == "analysis":
        return "concepts"
    return parts[1] if parts[1] in RANK else None


def _imports(path: pathlib.Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved.

    ``from jaxcnmf.nets import probe`` yields ``jaxcnmf.nets.probe``, so that importing
    a module through its package is checked against the module's layer.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base != "jaxcnmf":  # ``from jaxcnmf import x`` is judged by x alone
                found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield path, module


def test_every_layer_holds_modules():
    # A layer folder that disappeared or was renamed would make the check below vacuous.
    layers = {_layer(module) for _, module in _modules()}
    assert set(RANK) <= layers


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for path, module in _modules():
        own = _layer(module)
        if own is None:  # jaxcnmf/__init__.py, _moved.py, __main__.py: the front door
            continue
        for line, target in _imports(path, module):
            if target == "jaxcnmf" and RANK[own] < RANK["runs"]:
                # The package's front door can reach every layer lazily.
                upward.append(f"{module}:{line} ({own}) imports jaxcnmf")
                continue
            other = _layer(target)
            if other is not None and RANK[other] > RANK[own]:
                upward.append(f"{module}:{line} ({own}) imports {target} ({other})")
    assert not upward, "imports flow runs -> concepts -> nets and solver:\n" + "\n".join(upward)


def test_the_layer_check_sees_an_upward_import(tmp_path):
    # The checker itself: a lazy import of runs inside a nets function is caught.
    bad = tmp_path / "probe.py"
    bad.write_text("def f():\n    from jaxcnmf.runs import rundir\n    from ..concepts import tcav\n")
    targets = [t for _, t in _imports(bad, "jaxcnmf.nets.probe")]
    assert "jaxcnmf.runs.rundir" in targets and "jaxcnmf.concepts.tcav" in targets
    assert [_layer(t) for t in targets if _layer(t)] == ["runs", "runs", "concepts", "concepts"]


@pytest.mark.parametrize("old, new", sorted(_moved.MOVED.items()))
def test_former_module_names_are_the_new_modules(old, new):
    module = importlib.import_module(new)
    assert importlib.import_module(f"jaxcnmf.{old}") is module
    assert sys.modules[f"jaxcnmf.{old}"] is module
    assert getattr(jaxcnmf, old) is module
    # ``from jaxcnmf.<old> import name`` gives the new module's object.
    public = [name for name in vars(module) if not name.startswith("_")]
    assert public
    namespace = {}
    exec(f"from jaxcnmf.{old} import {public[0]}", namespace)
    assert namespace[public[0]] is getattr(module, public[0])


def test_former_analysis_module_holds_the_five_analyses():
    analysis = importlib.import_module("jaxcnmf.analysis")
    assert analysis.__all__
    for source in _moved.ANALYSIS:
        part = importlib.import_module(source)
        for name in part.__all__:
            assert getattr(analysis, name) is getattr(part, name), f"{source}.{name}"
    assert sorted(analysis.__all__) == sorted(
        name for source in _moved.ANALYSIS for name in importlib.import_module(source).__all__)
