"""The token-directory format ``moelab-tokens-v1``: its constants, its ``meta.json``, a summary table of it.

``meta.json`` holds the format, dtype (``uint16`` / ``uint32``), vocab and special ids, per-split
documents / tokens / bytes and bytes per token, sources, skips and the seed. Token counts include the
EOS tokens and byte counts are UTF-8 bytes of the document texts, so ``bytes_per_token`` converts a mean
loss over the token stream into bits per byte.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.table import Table

from moelab.errors import DataError

FORMAT = "moelab-tokens-v1"
SPLITS = ("train", "val")
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2


def bytes_per_token(n_bytes: int, n_tokens: int) -> float | None:
    """``n_bytes / n_tokens`` to 4 decimals; None for no tokens."""
    return round(n_bytes / n_tokens, 4) if n_tokens else None


def read_meta(path: str | os.PathLike) -> dict:
    """The ``meta.json`` of a token directory; a DataError if ``path`` is not one."""
    d = Path(path)
    how = f"create one with `moelab data prepare SOURCE --out {d}`"
    if not d.is_dir():
        raise DataError(f"{d} is not a directory; {how}")
    try:
        meta = json.loads((d / "meta.json").read_text())
    except FileNotFoundError:
        raise DataError(f"{d} is not a moelab token directory (no meta.json); {how}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {d / 'meta.json'}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise DataError(f"{d / 'meta.json'} has format {got!r}, not {FORMAT!r}; {how}")
    return meta


def _count(n: int | None, what: str) -> str:
    return f" · {n} {what}{'s' if n != 1 else ''} skipped" if n else ""


def _fim_caption(meta: dict) -> str:
    fim = meta.get("fim")
    if not fim:
        return ""
    short = f", {fim['too_short']:,} too short to cut" if fim.get("too_short") else ""
    return (f"\nFIM ({fim['fim_mode']}, rate {fim['fim_rate']:g}): {fim['documents']:,} of "
            f"{meta['splits']['train']['documents']:,} train documents rearranged{short}; val left-to-right")


def summary_table(meta: dict, title: str | None = None) -> Table:
    """Documents, bytes, tokens and bytes/token per split, as a rich Table."""
    t = Table(title=title, title_justify="left",
              caption=f"vocab {meta['vocab_size']:,} · {meta['dtype']} · seed {meta['seed']}" + _fim_caption(meta)
              + _count(meta.get("skipped_files"), "file") + _count(meta.get("skipped_lines"), "line"),
              caption_justify="left")
    t.add_column("split", style="bold")
    for name in ("documents", "bytes", "tokens", "bytes/token"):
        t.add_column(name, justify="right")
    rows = [(s, meta["splits"][s]) for s in SPLITS]
    total = {k: sum(v[k] for _, v in rows) for k in ("documents", "bytes", "tokens")}
    for name, s in [*rows, ("total", total)]:
        bpt = bytes_per_token(s["bytes"], s["tokens"])
        t.add_row(name, f"{s['documents']:,}", f"{s['bytes']:,}", f"{s['tokens']:,}",
                  "-" if bpt is None else f"{bpt:.3f}", end_section=name == "val")
    return t
