"""What every benchmark records about its machine, and how it writes its JSON."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import jax


def machine() -> dict:
    """The device, backend, CPU count, load at the end, platform and JAX version."""
    return {
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "platform": platform.platform(),
        "jax_version": jax.__version__,
    }


def write(out: str | Path, result: dict) -> None:
    """``result`` as indented JSON at ``out`` (folders made), and a line saying so."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
