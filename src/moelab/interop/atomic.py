"""Atomic directory writes: build a directory beside its destination, then swap it into place.

    write_dir(Path("runs/x/adapter"), lambda tmp: save_file(tensors, str(tmp / "w.safetensors")))

``write(tmp)`` fills a fresh temporary sibling directory; only when it returns is ``out`` replaced (an
existing ``out`` is renamed aside and restored if the swap fails). An error or Ctrl-C leaves ``out``
as it was and removes the temporary directory, so readers never see a half-written result.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_dir(out: Path, write: Callable[[Path], None]) -> Path:
    """Create ``out`` atomically from ``write(tmp)``; returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes the directory private; results are meant to be shared
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)  # put the previous directory back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
