"""Helpers shared by the ``moelab`` command and its sub-apps (``moelab data ...``).

Kept apart from :mod:`moelab.cli` so that sub-apps can use them while ``cli.py`` imports the sub-apps.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from moelab.errors import MoelabError

#: Messages, warnings and progress go to stderr; results (tables, JSON) go to stdout.
err = Console(stderr=True)


#: What libraries say when a write fails for lack of space: OSError texts without an errno (numpy),
#: Rust's io::Error (safetensors, tokenizers) and torch.save's stream writer (which keeps no errno).
_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122",
               "not enough free space to write", "pytorchstreamwriter failed writing", "file write failed")


def _noting_full_disk(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, turning an error that means "the disk is full" into a one-line
    :class:`MoelabError`; every other exception passes through untouched."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        message = _disk_full_message(e) or _filesystem_message(e)
        if message is None:
            raise
    raise MoelabError(message)


def _filesystem_message(e: BaseException) -> str | None:
    """One line for a file-system refusal no check caught (an unwritable --out, a path through a file):
    what was refused, on which path, and what to do; None for any other exception."""
    import errno

    if not isinstance(e, OSError) or not e.filename or e.errno is None:
        return None
    path = _result_path(e.filename)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"{path}: {e.strerror.lower()}; give a path you may write to (and read), or change its "
                "permissions")
    if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENAMETOOLONG):
        return f"{path}: {e.strerror.lower()}; check the path (each part but the last must be a directory)"
    return None


def _result_path(filename) -> str:
    """Name the result, not its temporary sibling: ``.OUT.tmp-PID-XXXX/f`` -> ``OUT/f``,
    ``.tmp-step-N-XXXX`` -> ``step-N``."""
    path = re.sub(r"(^|/)\.([^/]+)\.tmp-\d+-[^/]+", r"\1\2", os.fspath(filename))
    return re.sub(r"(^|/)\.tmp-(step-\d+)-[^/]+", r"\1\2", path)


def _disk_full_message(e: BaseException) -> str | None:
    """The one-line message for an exception that means "the disk (or quota) is full", else None.

    Looks through the exception and its causes for ENOSPC / EDQUOT or the texts in :data:`_FULL_TEXTS`
    (torch.save raises a RuntimeError that names no errno), and names the file being written: the
    OSError's filename, else the innermost file open for writing (or path given to a ``save``) found
    in the traceback.
    """
    import errno

    codes = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
    full, filename, todo, seen = False, None, [e], set()
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        text = str(x).lower()
        if isinstance(x, OSError) and x.errno in codes:
            full, filename = True, filename or x.filename
        elif any(t in text for t in _FULL_TEXTS) or ("inline_container" in text and "unexpected pos" in text):
            full = True            # torch.save on a short write: "[enforce fail at inline_container.cc] unexpected pos"
        todo += [x.__cause__, x.__context__]
    if not full:
        return None
    filename = filename or _file_being_written(e.__traceback__)
    if filename:
        filename = _result_path(filename)
    what = f"writing {filename}" if filename else "writing (no space left on device)"
    return f"disk full while {what} (free some space, then run again; nothing was half-written)"


def _file_being_written(tb) -> str | None:
    """The innermost file open for writing, or path handed to a ``save``/``save_file``, in a traceback."""
    import io
    import os

    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        try:
            local = dict(frame.f_locals)
        except Exception:   # noqa: BLE001 (best effort: a frame whose locals cannot be read)
            continue
        for value in local.values():
            name, mode = getattr(value, "name", None), getattr(value, "mode", "")
            if isinstance(value, io.IOBase) and isinstance(name, str) and any(c in str(mode) for c in "wax+"):
                return name
        if frame.f_code.co_name in ("save", "save_file"):
            for key in ("f", "filename", "file", "path"):
                if isinstance(local.get(key), str | os.PathLike):
                    return os.fspath(local[key])
    return None


def friendly(fn):
    """Run a CLI command so that user errors are one line on stderr, not a stack trace.

    A :class:`MoelabError` prints ``error: <message>`` and exits with status 1; so does a full disk (or
    quota): ``error: disk full while writing <file> ...``. Ctrl-C prints ``interrupted`` and exits with 130.
    Python warnings raised meanwhile print as ``warning: <message>``.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                return _noting_full_disk(fn, *args, **kwargs)
            except MoelabError as e:
                if not (getattr(e, "agreed", False) and os.environ.get("RANK", "0") != "0"):
                    err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None     # (an error every torchrun rank raised alike: rank 0 says it)
            except KeyboardInterrupt:
                _ignore_further_interrupts()
                err.print("interrupted")
                raise typer.Exit(130) from None
            except typer.Exit as e:
                if e.exit_code == 130:        # a command that stopped cleanly on Ctrl-C
                    _ignore_further_interrupts()
                raise
            except Exception as e:
                if not _is_lost_rank(e):
                    raise
                err.print(f"[bold red]error:[/] {escape(_lost_rank_message(e))}", highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None

    return wrapper


#: How gloo and NCCL word a peer that died or a collective that timed out (they raise plain RuntimeErrors)
_LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out waiting",
              "timed out", "NCCL communicator was aborted", "ProcessGroupGloo", "gloo/transport")


def _is_lost_rank(e: BaseException) -> bool:
    """A torch.distributed failure under torchrun: a peer process died or a collective timed out."""
    if any(c.__name__ in ("DistError", "DistBackendError", "DistNetworkError") for c in type(e).__mro__):
        return True
    return (isinstance(e, RuntimeError) and int(os.environ.get("WORLD_SIZE", "1")) > 1
            and any(w in str(e) for w in _LOST_PEER))


def _lost_rank_message(e: BaseException) -> str:
    rank = os.environ.get("RANK", "?")
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    return (f"rank {rank}: a collective with the other ranks failed ({first}). Another rank stopped or timed out "
            "(torchrun's summary names it; parallel.timeout_s bounds the wait). Checkpoints are written whole or "
            "not at all: continue from the last one by running the same command with --resume")


def _ignore_further_interrupts() -> None:
    """After a Ctrl-C has been handled, the process only exits: another Ctrl-C (impatience) must not
    break into the interpreter's exit handlers with "Exception ignored ... KeyboardInterrupt"."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:   # not the main thread
        pass


def _show_warning(message, category, filename, lineno, file=None, line=None):
    err.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------
# option checks shared by the sub-apps (run before any work, so a bad option fails in a second)
# ----------------------------------------------------------------------------------------------
def resolve_device(device: str, option: str = "--device") -> str:
    """:func:`moelab.common.device.resolve_device` (imported late: torch loads only when a command runs)."""
    from moelab.common.device import resolve_device as resolve

    return resolve(device, option)


def _first_existing(path):
    """``path`` or its nearest ancestor that exists (links followed)."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_out_dir(out, option: str = "--out") -> None:
    """Refuse an output directory that cannot be one (an existing file, or a path under a file).

    Nothing is created here: the command writes its files (and the directory) only when they are ready.
    """
    import os
    from pathlib import Path

    from moelab.errors import ConfigError

    out = Path(out)

    if out.exists() and not out.is_dir():
        raise ConfigError(f"{option} {out} is a file; give a directory")
    if os.path.islink(out) and not out.exists():
        raise ConfigError(f"{option} {out} is a broken symbolic link; give a directory")
    base = _first_existing(out)
    if not base.is_dir():
        raise ConfigError(f"{option} {out}: {base} is a file, not a directory; give a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {out}: cannot write in {base} (permission denied); give another directory")


def check_out_file(out, option: str = "--out", example: str = "out.json") -> None:
    """Refuse an output file path that names a directory or lies under a file (nothing is created).

    ``example``: a file name to suggest inside a directory given by mistake."""
    import os
    from pathlib import Path

    from moelab.errors import ConfigError

    out = Path(out)

    if out.is_dir():
        raise ConfigError(f"{option} {out} is a directory; give a file name (e.g. {out / example})")
    if out.exists() and not out.is_file():
        raise ConfigError(f"{option} {out} exists and is not a regular file; give another file name")
    if os.path.islink(out) and not out.exists():
        raise ConfigError(f"{option} {out} is a broken symbolic link; give another file name")
    base = _first_existing(out.parent)
    if not base.is_dir():
        raise ConfigError(f"{option} {out}: {base} is a file, not a directory; give a path in a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {out}: cannot write in {base} (permission denied); give another path")


def read_model_source(path: Path):
    """A :class:`ModelConfig` from a TOML config (its [model]), a checkpoint directory or its config.json."""
    from moelab.config import load_model_config
    from moelab.interop.hf_config import read_config_json

    if path.is_dir():
        return read_config_json(path)
    if path.suffix == ".json":
        if path.name != "config.json":
            raise MoelabError(f"{path}: expected a TOML config, a checkpoint directory or its config.json")
        return read_config_json(path.parent)
    if not path.exists():
        raise MoelabError(f"{path} does not exist; give a TOML config (configs/*.toml) or a checkpoint directory")
    return load_model_config(path)
