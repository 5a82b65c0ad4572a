"""The activation store of a run (``jaxcnmf analyze --store DIR``): written, resumed or reused.

With a store, :func:`jaxcnmf.runs.pipeline.run` probes the network into an on-disk store
(:mod:`jaxcnmf.solver.store`) instead of memory, fits by streaming its blocks
(:mod:`jaxcnmf.solver.streaming`) and runs the analyses from it. This module holds what the
run needs around the store:

- the store's *identity*: the manifest's ``provenance`` names the checkpoint (its path and a
  SHA-256 of its weights), the probed layers, pooling, pixel views, dataset, split, probe
  subset (``per_class``, ``seed``); :func:`plan` compares it with what a run would write
  and says whether the store is new, to be resumed (an interrupted probe: it continues at
  the first missing block, with the block size the store was started with) or complete and
  reusable; any difference is refused in one line that names it;
- views of a store: :func:`select` (some of its views, e.g. without the logits, or the
  layers alone), :func:`scan` (in one pass, the logits view's arg max and the other views'
  squared norms, which the view weights need), :func:`sq_norms`;
- :func:`describe`: path, size on disk and blocks, for ``run.json`` and the report.

Example:
    >>> from jaxcnmf.runs import runstore
    >>> runstore.plan("acts/", identity, dtype="float32")  # doctest: +SKIP
    Plan(state='resume', written=3, n_blocks=10, block_size=4080)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# Identity fields, in the order a mismatch is looked for, and how the message names them.
_FIELDS = (
    ("checkpoint", "checkpoint"),
    ("weights_sha256", "network weights with SHA-256"),
    ("probed_layers", "layers"),
    ("pooling", "pooling"),
    ("pixel_views", "pixel views"),
    ("dataset", "dataset"),
    ("split", "split"),
    ("per_class", "per_class"),
    ("seed", "seed"),
)


class Plan(NamedTuple):
    """What to do with ``--store DIR``.

    Attributes:
        state: ``"new"`` (nothing there), ``"resume"`` (an unfinished store of this run:
            probing continues at the first missing block) or ``"reuse"`` (a complete store
            of this run: probing is skipped).
        written: blocks already written.
        n_blocks: blocks of the whole store (0 when new).
        block_size: columns per block to write with: the store's own when it exists, else
            the one asked for (None: ``store.default_block_size``).
    """

    state: str
    written: int
    n_blocks: int
    block_size: int | None


def weights_digest(variables) -> str:
    """SHA-256 of a network's variables (every leaf's path, dtype, shape and bytes).

    Tells a retrained network at the same checkpoint path from the one a store came from.
    """
    import jax

    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_leaves_with_path(variables)
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def identity(*, checkpoint: str, variables, layers, pooling: str, pixels: str, dataset: str,
             split: str, per_class: int | None, seed: int) -> dict[str, Any]:
    """The provenance a run writes into its store's manifest (JSON-ready).

    ``layers`` are the probed layers without the logits; ``collect`` adds its own fields
    (model, the layers it captured, image shape, the batch size that started the store).
    """
    return {"checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
            "weights_sha256": weights_digest(variables), "probed_layers": list(layers),
            "pooling": pooling, "pixel_views": pixels, "dataset": dataset, "split": split,
            "per_class": per_class, "seed": seed}


def _shown(field: str, value) -> str:
    if field == "weights_sha256" and isinstance(value, str):
        return value[:12]
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def plan(path, expected: dict[str, Any], *, dtype: str, block_size: int | None = None
         ) -> Plan:
    """Whether ``path`` is a new, unfinished or complete store of this run.

    Blocks do not depend on the probing batch size, so a store resumes with any
    ``--batch-size``; its block size is its own (the manifest's ``block_size``).

    Args:
        path: the ``--store`` directory.
        expected: :func:`identity` of this run.
        dtype: the stored dtype this run writes.
        block_size: the columns per block asked for (``--store-block-size``), or None for
            the store's own (or, for a new store, ``store.default_block_size``). An
            unfinished store resumes only with its own; a complete one is reused whatever
            the block size asked for.

    Returns:
        :class:`Plan`.

    Raises:
        ValueError: ``path`` is a file, a non-empty directory that is not a store, a store
            not written by a run, or a store written from another checkpoint, network,
            layers, pooling, pixel views, dataset, split, probe subset or dtype, or an
            unfinished store of another block size than ``block_size`` (one line naming
            the first difference).
    """
    from jaxcnmf.solver import store

    path = Path(path)
    where = f"store: {path}"
    if path.exists() and not path.is_dir():
        raise ValueError(f"{where} exists and is not a directory; expected a new directory "
                         "or a store written by an earlier run")
    if not (path / store.MANIFEST).is_file():
        if path.is_dir() and any(path.iterdir()):
            raise ValueError(f"{where} holds files but no {store.MANIFEST}; expected a new "
                             "directory or a store written by an earlier run")
        return Plan("new", 0, 0, block_size)
    manifest = store._load_manifest(path)
    provenance = manifest.get("provenance") or {}
    if "probed_layers" not in provenance:
        raise ValueError(f"{where} was not written by a jaxcnmf run (its manifest names no "
                         "probed layers); choose another --store directory")
    for field, words in _FIELDS:
        old, new = provenance.get(field), expected[field]
        if old != new:
            raise ValueError(f"{where} was written from {words} {_shown(field, old)}; this "
                             f"run has {words} {_shown(field, new)} (choose another --store "
                             "directory, or delete that one)")
    if manifest["dtype"] != dtype:
        raise ValueError(f"{where} holds {manifest['dtype']} values; this run asks for "
                         f"{dtype} (pass --store-dtype {manifest['dtype']}, or choose another "
                         "--store directory)")
    n_blocks, recorded = int(manifest["n_blocks"]), int(manifest["block_size"])
    if manifest["complete"]:
        return Plan("reuse", n_blocks, n_blocks, recorded)
    if block_size is not None and block_size != recorded:
        raise ValueError(f"{where} is unfinished and was started with block size {recorded}; "
                         f"this run has --store-block-size {block_size} (resume with "
                         f"--store-block-size {recorded} or without it, or choose another "
                         "--store directory)")
    return Plan("resume", len(store._written_blocks(path, manifest)), n_blocks, recorded)


def select(s, names):
    """The store ``s`` restricted to the views ``names`` (a :class:`Store` on the same files).

    ``jaxcnmf.fit`` of the result streams those views only; files already checked through
    ``s`` are not hashed again.

    Example:
        >>> layers = select(s, ["conv2", "conv3"])  # doctest: +SKIP
    """
    from jaxcnmf.solver import store

    names = list(names)
    unknown = [name for name in names if name not in s.views]
    if unknown or not names:
        raise ValueError(f"views: expected some of {list(s.views)}, got {names}")
    keep = [s.views.index(name) for name in names]
    manifest = dict(s.manifest, views=[s.manifest["views"][i] for i in keep],
                    blocks=[dict(block, files=[block["files"][i] for i in keep])
                            for block in s.manifest["blocks"]])
    subset = store.Store(s.path, manifest)
    subset._verified = s._verified  # one record of checked files for both
    known = getattr(s, "known_sq_norms", None)
    if known is not None:
        subset.known_sq_norms = {name: known[name] for name in names if name in known}
    return subset


def sq_norms(s) -> dict[str, float]:
    """``||X_v||^2`` of every view of ``s`` (float64 sums): those :func:`scan` or
    :func:`select` left on it (``known_sq_norms``), else from one pass over the store."""
    known = getattr(s, "known_sq_norms", None) or {}
    if all(name in known for name in s.views):
        return {name: known[name] for name in s.views}
    return scan(s)[1]


def scan(s, logits: str | None = None):
    """One pass over ``s``: the arg max of each column of the ``logits`` view (the
    network's predictions) and ``||X_v||^2`` of every other view.

    Returns:
        ``(predictions, norms)``: int64 ``(N,)`` (None without ``logits``) and a dict view
        name -> float; the norms are also kept on ``s`` as ``known_sq_norms``, where
        :func:`sq_norms` and :func:`select` find them.
    """
    totals = {name: 0.0 for name in s.views if name != logits}
    predicted = []
    for arrays in s.blocks():
        for name, X in arrays.items():
            X = np.asarray(X, np.float32)
            if name == logits:
                predicted.append(X.argmax(axis=0))
            else:
                totals[name] += float(np.einsum("ij,ij->", X, X, dtype=np.float64))
    s.known_sq_norms = totals
    return (np.concatenate(predicted) if logits is not None else None), totals


def disk_bytes(path) -> int:
    """Bytes of every file under ``path``."""
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, files in os.walk(path) for name in files)


def describe(s, state: str) -> dict[str, Any]:
    """``run.json``'s ``"store"``: path, bytes on disk, blocks, dtype and what the run did
    with it (``"written"``, ``"resumed"`` or ``"reused"``)."""
    return {"path": str(Path(s.path).resolve()), "bytes": disk_bytes(s.path),
            "blocks": s.n_blocks, "block_size": s.block_size, "images": s.n,
            "dtype": s.dtype, "state": state}


def human_bytes(count: float) -> str:
    """``1.5 GB``-style size (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"
