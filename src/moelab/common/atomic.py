"""Safe outputs: moelab never deletes what it did not write, and readers never see half a result.

    write_dir(Path("runs/x/adapter"), lambda tmp: save_file(tensors, str(tmp / "w.safetensors")),
              kind=ADAPTER, overwrite=False)

``write(tmp)`` fills a fresh temporary sibling directory; only when it returns is it renamed to ``out``.
Before any work, :func:`check_output_dir` decides whether ``out`` may be written at all:

* ``out`` missing or an empty directory: fine;
* ``out`` holds only what moelab writes for this ``kind`` (a checkpoint, an adapter, ...): replaced
  only with ``overwrite`` (the CLI's ``--overwrite``), else refused;
* anything else (a file, a symlink, a directory with files moelab did not write, the working
  directory or one above it): refused, whatever ``overwrite`` says.

Temporary names carry the writer's process id (``.NAME.tmp-PID-XXXX``, ``.NAME.old-PID``), so that a
directory left behind by a process that died (``kill -9``, power loss) can be recognised and swept by
the next writer of the same ``out``: a leftover ``.tmp-`` is removed, and an ``.old-`` (the previous
result, renamed aside just before the swap) is put back if ``out`` is missing, else removed. Nothing
of a live process is ever touched.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from moelab.errors import CheckpointError, DataError, MoelabError


@dataclass(frozen=True)
class OutputKind:
    """What moelab writes into one kind of output directory.

    ``marker``: the file that identifies the kind; ``patterns``: every top-level name moelab may write
    there (fnmatch patterns). A directory is "a moelab output of this kind" only when it holds the marker
    and nothing else than these names, so replacing it can never delete a user's file. ``error``: the
    exception class a refusal raises (a :class:`MoelabError`: one line on the CLI).
    """

    name: str
    marker: str
    patterns: tuple[str, ...]
    error: type[MoelabError] = CheckpointError

    def owns(self, entry: str) -> bool:
        return any(fnmatch.fnmatchcase(entry, p) for p in self.patterns)


_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
CHECKPOINT = OutputKind("checkpoint", "config.json", (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", *_TOKENIZER))
ADAPTER = OutputKind("LoRA adapter", "adapter_config.json",
                     ("adapter_config.json", "adapter_model.safetensors", "README.md", *_TOKENIZER))
ESFT = OutputKind("ESFT result", "expert_cfg.json", ("expert_cfg.json", "model.safetensors", *_TOKENIZER))
TOKENS = OutputKind("token directory", "meta.json",
                    ("meta.json", "train.bin", "val.bin", "train.idx.npy", "val.idx.npy", *_TOKENIZER), DataError)


def foreign_entries(out: Path, kind: OutputKind) -> list[str]:
    """Top-level names in ``out`` that moelab would not have written as a ``kind`` (sorted)."""
    return sorted(e for e in os.listdir(out) if not kind.owns(e))


def is_output_of(out: Path, kind: OutputKind) -> bool:
    """True when ``out`` is a directory holding a ``kind`` written by moelab and nothing else."""
    return out.is_dir() and not out.is_symlink() and (out / kind.marker).is_file() and not foreign_entries(out, kind)


def _listing(names: Iterable[str], limit: int = 4) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_not_cwd(out: Path, option: str = "--out", error: type[MoelabError] = MoelabError) -> None:
    """Refuse the working directory, or any directory that contains it, as an output to replace."""
    here, target = Path.cwd().resolve(), Path(os.path.abspath(out))
    target = target.resolve() if target.exists() else target
    if target == here or target in here.parents:
        raise error(f"{option} {out} is the working directory or contains it; moelab will not replace "
                          "it — give a new directory, e.g. runs/NAME")


def check_output_dir(out: Path, kind: OutputKind, overwrite: bool, option: str = "--out") -> None:
    """Raise ``kind.error`` unless ``out`` may be written as a ``kind`` (see the module doc)."""
    out = Path(out)
    check_not_cwd(out, option, kind.error)
    if out.is_symlink():
        raise kind.error(f"{option} {out} is a symbolic link; give a real directory path")
    if not out.exists():
        return
    if not out.is_dir():
        raise kind.error(f"{option} {out} is a file; give a directory path")
    entries = os.listdir(out)
    if not entries:
        return
    foreign = foreign_entries(out, kind)
    if foreign or not (out / kind.marker).is_file():
        what = f"holds files moelab did not write ({_listing(foreign)})" if foreign else f"is not a moelab {kind.name}"
        raise kind.error(f"{option} {out} is not empty and {what}; moelab never deletes what it did not "
                          "write — choose a new or empty directory")
    if not overwrite:
        raise kind.error(f"{option} {out} already holds a moelab {kind.name}; pass --overwrite to replace it, "
                          "or choose another directory")


# ------------------------------------------------------------------------------------------------
# temporary names and the sweep of what dead writers left behind
# ------------------------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a reused id counts as alive: never sweep on doubt)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def temp_prefix(name: str) -> str:
    """The prefix of this process's temporary siblings of ``name``: ``.NAME.tmp-PID-``."""
    return f".{name}.tmp-{os.getpid()}-"


def _leftovers(parent: Path, name: str) -> Iterable[tuple[str, int, Path]]:
    pattern = re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-(\d+)(?:-.*)?$")
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    found = []
    for e in entries:
        m = pattern.match(e)
        if m:
            found.append((m.group(1), int(m.group(2)), parent / e))
    return found


def sweep_leftovers(out: Path) -> list[Path]:
    """Remove (or restore) the temporary siblings of ``out`` that dead processes left; returns them.

    ``.NAME.tmp-PID-*``: a result that never completed: removed. ``.NAME.old-PID``: the previous result,
    renamed aside just before a swap: put back when ``out`` is missing, else removed.
    """
    out = Path(out)
    swept = []
    for what, pid, path in _leftovers(out.parent, out.name):
        if pid == os.getpid() or pid_alive(pid) or not path.is_dir() or path.is_symlink():
            continue
        if what == "old" and not out.exists():
            path.rename(out)
        else:
            shutil.rmtree(path, ignore_errors=True)
        swept.append(path)
    return swept


def write_dir(out: Path, write: Callable[[Path], None], *, kind: OutputKind, overwrite: bool = False,
              option: str = "--out") -> Path:
    """Create ``out`` atomically from ``write(tmp)``; returns ``out``.

    Refuses (``kind.error``, before calling ``write``) whatever :func:`check_output_dir` refuses,
    and checks again just before the swap, in case the directory changed meanwhile.
    """
    out = Path(out)
    check_output_dir(out, kind, overwrite, option)
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(out)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), dir=out.parent))
    try:
        write(tmp)
        share(tmp)
        check_output_dir(out, kind, overwrite, option)
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


def share(tmp: Path) -> None:
    """Make a finished temporary directory readable by everyone, as results are meant to be shared:
    ``mkdtemp`` makes the directory private, and safetensors writes its files 0600 whatever the umask."""
    tmp.chmod(0o755)
    for p in tmp.rglob("*"):
        if not p.is_symlink():
            p.chmod(p.stat().st_mode | (0o755 if p.is_dir() else 0o644))


def write_file(path: Path, fill: Callable, mode: str = "w") -> None:
    """Write one file atomically: ``fill(f)`` writes into a temporary sibling opened with ``mode``
    ("w" text, "wb" binary), which then replaces ``path``; readable by everyone."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            fill(f)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temporary sibling, then rename)."""
    write_file(path, lambda f: f.write(text))
