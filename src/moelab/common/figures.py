"""Matplotlib figures saved as PNG, atomically (a reader never sees half an image).

Figures are built with ``matplotlib.figure.Figure`` (no pyplot, no global state, no display needed).
"""

from __future__ import annotations

import os
from pathlib import Path

from moelab.common.atomic import write_file


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Render ``fig`` (a ``matplotlib.figure.Figure``) with Agg to a PNG at ``path``; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    write_file(path, lambda f: fig.savefig(f, format="png", dpi=dpi), "wb")
    return path
