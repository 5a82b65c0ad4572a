"""The run directory: its file names, atomic writes, and reading a finished run back.

Everything here is plumbing shared by :mod:`jaxcnmf.runs.pipeline` (which writes a run)
and :mod:`jaxcnmf.runs.report` (which reads one): both import it, neither imports the
other's internals, so the package has no import circle. The names are also re-exported
by ``pipeline`` (``pipeline.load_run``, ``pipeline.RUN_JSON``, ...), where they lived
before this module existed.

Run directory layout::

    run.json            settings, model, accuracy, relative errors, wall times, status;
                        with --store, "store": path, bytes, blocks, dtype, written/resumed/reused
    factorization.npz   the FitResult (jaxcnmf.load_result)
    probe.npz           probe images (N, H, W, C) uint8, labels, coarse labels, predictions
    analysis.json       k-means baseline and fidelity (they need activations / the network)
    tcav.json           TCAV settings, timings and one row per (layer, concept, class), when
    tcav.npz            the TCAV step ran (``jaxcnmf tcav`` or ``--tcav``); the npz holds
                        the per-run scores the report's heatmaps are drawn from
    ckpt/               the network, when this run trained it
    figures/*.png, tables/*.csv|json, report.html, COMPLETE
    .jaxcnmf.lock       the lock a run holds while it writes here (see lock_run_dir)

Every file is written through a temporary file in the same directory and renamed, so a
reader never sees half of one; ``COMPLETE`` is written last, when the whole run is done.
``run.json`` lists under ``"files"`` every file the run wrote (paths relative to the run
directory); a forced re-run deletes those and nothing else (see :func:`start_run_dir`),
so a user's own files in the directory survive ``--force``.
The report's outputs (``figures/``, ``tables/``, ``report.html``) are drawn into a
staging directory ``.report-*`` and swapped in whole (:func:`report_staging`,
:func:`swap_in_report`), so a redraw that is killed or fails leaves the previous ones.

Example:
    >>> from jaxcnmf.runs import rundir
    >>> saved = rundir.load_run("runs/demo")  # doctest: +SKIP
    >>> saved.result.F.shape  # doctest: +SKIP
    (10, 300)
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import io
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

RUN_JSON = "run.json"
FACTORIZATION = "factorization.npz"
PROBE = "probe.npz"
ANALYSIS = "analysis.json"
TCAV = "tcav.json"
TCAV_ARRAYS = "tcav.npz"
CHECKPOINT_DIR = "ckpt"
COMPLETE = "COMPLETE"
REPORT = "report.html"
LOCK = ".jaxcnmf.lock"
# What a run always writes under these names: a forced re-run removes them even when the
# earlier run died before listing its files, so nothing of it can pass for the new run's.
RUN_FILES = (COMPLETE, REPORT, FACTORIZATION, PROBE, ANALYSIS, TCAV, TCAV_ARRAYS)


def holds_files(path: str | os.PathLike) -> bool:
    """True when ``path`` exists and is not a directory holding nothing but a run lock."""
    path = Path(path)
    if not path.exists():
        return False
    return not path.is_dir() or any(entry.name != LOCK for entry in path.iterdir())


def check_out_dir(out: str | os.PathLike, force: bool) -> Path:
    """Refuse an output directory that already holds files unless ``force``.

    Raises:
        FileExistsError: ``out`` is not a directory (a file, even with ``force``), or
            holds files and ``force`` is False.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output directory: {out} exists and is not a directory; "
                              "expected a directory (new or empty) for --out")
    if holds_files(out) and not force:
        raise FileExistsError(
            f"output directory {out} already exists and holds files; "
            "pass --force (force=True) to overwrite it, or choose another --out"
        )
    return out


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON through a temporary file, so readers never see half of it."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        # mkstemp makes the file private; give it the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def environment() -> dict[str, str]:
    """Versions and devices this run used, for ``run.json`` and ``train.json``."""
    import jax

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": str([str(d) for d in jax.devices()]),
        "platform": platform.platform(),
    }


@contextlib.contextmanager
def lock_run_dir(out: str | os.PathLike):
    """Hold an exclusive OS lock on the run directory ``out`` (created if missing).

    The lock is ``fcntl.flock`` on ``out/.jaxcnmf.lock``: the kernel releases it when the
    holder exits, however it exits, so a crashed run never leaves a stale lock. The file
    itself stays (removing it would let a third process lock a new inode while a second
    still holds the old one); :func:`holds_files` ignores it.

    Raises:
        FileExistsError: another process (or another open of the lock) holds it.

    Example:
        >>> with lock_run_dir("/tmp/run"):  # doctest: +SKIP
        ...     pass  # a second writer into /tmp/run is refused meanwhile
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    # Closing the only descriptor (leaving the with) releases the flock.
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise FileExistsError(
                f"output directory {out} is in use by another jaxcnmf run (it holds the "
                f"lock {path}); wait for that run to end or choose another --out"
            ) from None
        yield path


def files_under(out: Path) -> set[str]:
    """Relative POSIX paths of the regular files below ``out`` (the lock file excluded)."""
    if not out.is_dir():
        return set()
    return {path.relative_to(out).as_posix() for path in out.rglob("*")
            if path.is_file() and not path.is_symlink() and path.name != LOCK}


def written_files(out: Path, before: set[str], earlier=()) -> list[str]:
    """What a run wrote in ``out``: ``earlier`` entries and files not in ``before`` (sorted)."""
    return sorted(set(earlier) | (files_under(out) - before))


def recorded_files(out: Path) -> list[str]:
    """The ``"files"`` list of ``out/run.json``, or [] when there is none or it is unreadable."""
    try:
        record = json.loads((out / RUN_JSON).read_text())
    except (OSError, ValueError):
        return []
    files = record.get("files") if isinstance(record, dict) else None
    return [f for f in files if isinstance(f, str)] if isinstance(files, list) else []


def remove_written(out: Path) -> list[str]:
    """Delete what the run recorded in ``out/run.json`` wrote, and its fixed file names.

    Only files the earlier run listed under ``"files"`` (plus :data:`RUN_FILES`, which a
    run that died before listing them may have left) are removed, and only when they lie
    inside ``out``; folders are removed when that leaves them empty. A user's own files
    stay, even in ``figures/`` or ``tables/``.

    Returns:
        The relative paths removed.
    """
    root = out.resolve()
    removed = []
    for name in sorted(set(recorded_files(out)) | set(RUN_FILES)):
        path = out / name
        try:
            inside = path.resolve().is_relative_to(root) and path.resolve() != root
        except OSError:
            inside = False
        if not inside or not path.is_file() or path.is_symlink() or path.name == LOCK:
            continue
        path.unlink()
        removed.append(name)
        for parent in path.parents:
            if parent == out or not parent.is_relative_to(out):
                break
            with contextlib.suppress(OSError):
                parent.rmdir()  # only when empty
    return removed


def start_run_dir(out: Path, record: dict) -> None:
    """Create ``out``, remove what a previous run wrote there, write ``record`` as ``run.json``.

    A forced re-run must leave nothing of the previous run that could pass for its own (no
    finished report, no saved results that ``jaxcnmf report`` would draw from), and must
    not touch anything else: see :func:`remove_written`.
    """
    out.mkdir(parents=True, exist_ok=True)
    remove_written(out)
    write_json_atomic(out / RUN_JSON, record)


REPORT_DIRS = ("figures", "tables")
# What the report writes in each of REPORT_DIRS; anything else there is the user's and is
# carried over to the new drawing.
REPORT_PATTERNS = {"figures": ("*.png",), "tables": ("*.csv", "*.json")}
_STAGING = ".report-"
_PREVIOUS = "previous"


def report_staging(run_dir: str | os.PathLike) -> Path:
    """A fresh, empty staging directory ``run_dir/.report-*`` for a redraw.

    First repairs what a redraw killed mid-swap may have left (see
    :func:`recover_report`), so the previous outputs are in place before anything else.
    """
    run_dir = Path(run_dir)
    recover_report(run_dir)
    return Path(tempfile.mkdtemp(dir=run_dir, prefix=_STAGING))


def recover_report(run_dir: str | os.PathLike) -> list[str]:
    """Put back report outputs a killed redraw moved aside, and drop its staging dirs.

    A swap moves ``figures/`` to ``.report-*/previous/figures`` and the new one into
    place; a kill between the two renames leaves no ``figures/``. This moves the previous
    one back wherever the run directory lacks it.

    Returns:
        The names put back (e.g. ``["figures"]``).
    """
    run_dir = Path(run_dir)
    restored = []
    for staging in sorted(run_dir.glob(_STAGING + "*")):
        if not staging.is_dir():
            continue
        for name in REPORT_DIRS:
            aside = staging / _PREVIOUS / name
            if aside.is_dir() and not (run_dir / name).exists():
                os.rename(aside, run_dir / name)
                restored.append(name)
        shutil.rmtree(staging, ignore_errors=True)
    return restored


def _is_report_output(name: str, path: Path) -> bool:
    return any(path.match(pattern) for pattern in REPORT_PATTERNS[name])


def swap_in_report(run_dir: str | os.PathLike, staging: str | os.PathLike) -> None:
    """Replace ``run_dir``'s ``figures/``, ``tables/`` and ``report.html`` by ``staging``'s.

    Files in the old folders that the report does not write (not ``*.png`` in
    ``figures``, not ``*.csv``/``*.json`` in ``tables``) are copied into the new ones
    first. Each folder is swapped by two renames; on an exception the swap is undone,
    and a kill between renames is undone by the next :func:`report_staging`. The
    staging directory is left for the caller to remove.
    """
    run_dir, staging = Path(run_dir), Path(staging)
    previous = staging / _PREVIOUS
    previous.mkdir()
    mode = 0o777 & ~_umask()
    moved, placed = [], []
    try:
        for name in REPORT_DIRS:
            current, new = run_dir / name, staging / name
            new.mkdir(exist_ok=True)
            os.chmod(new, mode)  # mkdtemp's privacy must not carry over to the run's folders
            if current.is_dir():
                for item in current.iterdir():
                    if item.is_file() and not _is_report_output(name, item):
                        shutil.copy2(item, new / item.name)
                os.rename(current, previous / name)
                moved.append(name)
            os.rename(new, current)
            placed.append(name)
        os.replace(staging / REPORT, run_dir / REPORT)
    except BaseException:
        for name in reversed(placed):
            os.rename(run_dir / name, staging / name)
        for name in reversed(moved):
            os.rename(previous / name, run_dir / name)
        raise


def progress_bar(items, progress: bool, desc: str):
    """``items`` wrapped in a tqdm bar when ``progress``, else unchanged."""
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


_TCAV_FIELDS = ("scores", "random_scores", "magnitudes", "random_magnitudes", "cav_accuracies",
                "random_cav_accuracies", "p_values", "adjusted", "significant")


def save_tcav(run_dir: str | os.PathLike, result) -> None:
    """Save a :class:`jaxcnmf.tcav.TcavResult` as ``tcav.npz`` (arrays) and ``tcav.json``.

    ``tcav.json`` (names, settings, timings and ``table()``'s rows) is written last, so its
    presence says both files are whole.
    """
    run_dir = Path(run_dir)
    buffer = io.BytesIO()
    arrays = {name: getattr(result, name) for name in _TCAV_FIELDS}
    if result.constant_gradient is not None:
        arrays["constant_gradient"] = result.constant_gradient
    np.savez_compressed(buffer, **arrays)
    write_bytes_atomic(run_dir / TCAV_ARRAYS, buffer.getvalue())
    write_json_atomic(run_dir / TCAV, {
        "layers": list(result.layers), "concepts": list(result.concepts),
        "classes": list(result.classes), "correction": result.correction,
        "alpha": result.alpha, "config": result.config, "timings": result.timings,
        "cells": result.table(),
    })


def load_tcav(run_dir: str | os.PathLike):
    """The :class:`jaxcnmf.tcav.TcavResult` saved in ``run_dir``, or None when there is none.

    Example:
        >>> load_tcav("runs/demo").heatmap_matrix()[0].shape  # doctest: +SKIP
        (10, 10)
    """
    from jaxcnmf.concepts import tcav

    run_dir = Path(run_dir)
    if not (run_dir / TCAV).is_file():
        return None
    summary = json.loads((run_dir / TCAV).read_text())
    with np.load(run_dir / TCAV_ARRAYS) as arrays:
        fields = {name: arrays[name] for name in _TCAV_FIELDS}
        # Results saved before the flag existed have none.
        fields["constant_gradient"] = arrays.get("constant_gradient")
    return tcav.TcavResult(
        layers=tuple(summary["layers"]), concepts=tuple(summary["concepts"]),
        classes=tuple(summary["classes"]), correction=summary["correction"],
        alpha=summary["alpha"], timings=summary["timings"], config=summary["config"], **fields,
    )


@dataclasses.dataclass(frozen=True)
class SavedRun:
    """What a run directory holds, as :func:`load_run` reads it back.

    Attributes:
        path: the run directory.
        record: ``run.json`` (settings, dataset, model, layers, views, wall times, status).
        result: the :class:`jaxcnmf.FitResult`.
        images: uint8 (N, H, W, C) probe images.
        labels: int64 (N,) class ids.
        coarse_labels: int64 (N,) superclass ids, or None.
        predictions: int64 (N,) the network's predicted classes.
        network: ``analysis.json`` (k-means baseline, fidelity rows).
        tcav: the :class:`jaxcnmf.tcav.TcavResult` of ``tcav.json``/``tcav.npz``, or None.
    """

    path: Path
    record: dict
    result: Any
    images: np.ndarray
    labels: np.ndarray
    coarse_labels: np.ndarray | None
    predictions: np.ndarray
    network: dict
    tcav: Any = None


def load_run(run_dir: str | os.PathLike) -> SavedRun:
    """Read a run directory written by :func:`jaxcnmf.runs.pipeline.run`.

    Raises:
        FileNotFoundError: the directory, or one of its saved files, is missing (for
            example because the run stopped before the analyses finished).

    Example:
        >>> saved = load_run("runs/demo")  # doctest: +SKIP
        >>> saved.result.F.shape  # doctest: +SKIP
        (10, 300)
    """
    import jaxcnmf

    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory: {path} does not exist or is not a directory")
    if not (path / RUN_JSON).is_file():
        raise FileNotFoundError(f"run directory: {path} has no {RUN_JSON}; expected a "
                                "directory written by 'jaxcnmf analyze' or 'jaxcnmf demo'")
    record = _read_json(path / RUN_JSON, dict)
    missing = [name for name in (FACTORIZATION, PROBE, ANALYSIS) if not (path / name).is_file()]
    if missing:
        status = record.get("status", "unknown")
        error = f" ({record['error']})" if record.get("error") else ""
        raise FileNotFoundError(
            f"run directory: {path} has no {missing[0]}; the run stopped before it was "
            f"saved (status {status}{error})"
        )
    probe_arrays = _read_probe(path / PROBE)
    coarse = probe_arrays["coarse_labels"]
    return SavedRun(
        path=path,
        record=record,
        result=jaxcnmf.load_result(path / FACTORIZATION),
        images=probe_arrays["images"],
        labels=probe_arrays["labels"].astype(np.int64),
        coarse_labels=None if np.any(coarse < 0) else coarse.astype(np.int64),
        predictions=probe_arrays["predictions"].astype(np.int64),
        network=_read_json(path / ANALYSIS, dict),
        tcav=load_tcav(path),
    )


def _read_json(path: Path, kind: type):
    """A run file's JSON, or a ValueError naming the file (truncated or edited files)."""
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: expected JSON written by jaxcnmf, got an unreadable file "
                         f"({str(error)[:80]}); rerun the analysis") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path}: expected a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def _read_probe(path: Path) -> dict[str, np.ndarray]:
    """``probe.npz``'s arrays, checked for the fields and shapes a report needs."""
    try:
        with np.load(path, allow_pickle=False) as probe_file:
            arrays = {key: probe_file[key] for key in probe_file.files}
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{path}: expected an .npz written by jaxcnmf, got an unreadable "
                         f"file ({str(error)[:80]})") from None
    for field in ("images", "labels", "coarse_labels", "predictions"):
        if field not in arrays:
            raise ValueError(f"{path}: field '{field}' is missing")
    n = arrays["images"].shape[0] if arrays["images"].ndim == 4 else -1
    if n < 0:
        raise ValueError(f"{path}: field 'images': expected (N, H, W, C), got shape "
                         f"{arrays['images'].shape}")
    for field in ("labels", "coarse_labels", "predictions"):
        if arrays[field].shape != (n,) or not np.issubdtype(arrays[field].dtype, np.integer):
            raise ValueError(f"{path}: field '{field}': expected {n} integers, got "
                             f"{arrays[field].dtype} {arrays[field].shape}")
    return arrays
