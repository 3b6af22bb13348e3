"""TEMPORARY shim: the IsoFLOP sweep moved to :mod:`moelab.scaling.isoflop`.

Only ``write_atomic`` is left here, for ``analysis/routing.py`` and ``analysis/probes.py``, which still
import it while they are moved onto :mod:`moelab.common`; delete this file with their last import.
It imports nothing above :mod:`moelab.common`, so analysis stays below scaling.
"""

from __future__ import annotations

from pathlib import Path

from moelab.common.atomic import write_file


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``path`` atomically (see :func:`moelab.common.atomic.write_file`), creating its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, lambda f: f.write(data.encode("utf-8") if isinstance(data, str) else data), "wb")


__all__ = ["write_atomic"]
