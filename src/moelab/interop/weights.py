"""A checkpoint's safetensors weight files: finding them, checking them, reading tensors from them.

Weights are read with safetensors only: pickles are never opened, and nothing but a regular file (or a
link to one) is opened at all — a named pipe would block, a directory or a looping link would raise a
bare ``OSError``. A file is checked (header present, not a pickle, not truncated) before safetensors sees
it, so every failure is a one-line :class:`~moelab.errors.CheckpointError`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from moelab.common.run_dir_hint import check_not_run_dir
from moelab.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _file_kind(mode: int) -> str | None:
    """What a non-regular file is ("a directory", "a named pipe (FIFO)", ...); None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def _not_regular(path: Path, kind: str) -> CheckpointError:
    return CheckpointError(f"{path} is {kind}, not a regular file; a checkpoint's weight files must be regular "
                           "files (or links to them): replace it with the real file")


def _unreadable(path: Path, e: OSError) -> CheckpointError:
    """A one-line error for an ``OSError`` raised while opening or stat-ing a weight file."""
    if e.errno == errno.ELOOP:
        return CheckpointError(f"{path} is a symbolic link that loops (it leads back to itself); replace it with "
                               "the real file or a link to it")
    if e.errno == errno.ENOENT and os.path.islink(path):
        return CheckpointError(f"{path} is a broken symbolic link (its target {os.readlink(path)} does not "
                               "exist); replace it with the real file")
    if e.errno == errno.ENOENT:
        return CheckpointError(f"{path} does not exist")
    return CheckpointError(f"cannot read {path}: {e.strerror or e}")


def check_regular_file(path: Path) -> None:
    """Raise a :class:`CheckpointError` unless ``path`` is (or links to) a regular file.

    Checked before any weight file is opened: opening a FIFO would block forever, a directory or a
    looping symbolic link would raise a bare ``OSError``.
    """
    try:
        st = os.stat(path)  # follows symbolic links: a link to a regular file (e.g. the HF cache) is fine
    except OSError as e:
        raise _unreadable(path, e) from None
    kind = _file_kind(st.st_mode)
    if kind is not None:
        raise _not_regular(path, kind)


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, from its index if it has one.

    Every file returned is a regular file (or a symbolic link to one); anything else is a :class:`CheckpointError`.
    """
    index = directory / INDEX
    if os.path.lexists(index):
        check_regular_file(index)
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e})") from None
        except OSError as e:
            raise _unreadable(index, e) from None
        bad = [n for n in names if not isinstance(n, str) or Path(n).name != n]
        if bad:
            raise CheckpointError(f"{index} names shard(s) outside the checkpoint directory: {bad[:3]}; "
                                  "shards must be plain file names")
        files = [directory / name for name in names]
        missing = [f.name for f in files if not os.path.lexists(f)]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) that do not exist: {', '.join(missing)}")
        for f in files:
            check_regular_file(f)
        return files
    if os.path.lexists(directory / SINGLE):
        check_regular_file(directory / SINGLE)
        return [directory / SINGLE]
    found = sorted(directory.glob("*.safetensors"))
    if found:
        for f in found:
            check_regular_file(f)
        return found
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle weights ({', '.join(pickles[:3])}); moelab never unpickles "
            "files. Convert them to safetensors (e.g. with transformers: load, then "
            "save_pretrained(..., safe_serialization=True)) and try again")
    check_not_run_dir(directory)
    raise CheckpointError(f"{directory} has no weights: expected {SINGLE} or sharded safetensors with {INDEX}")


def _open_weight_file(path: Path):
    """Open ``path`` for reading in binary mode, refusing anything but a regular file.

    Opened non-blocking, so that a named pipe cannot hang the process, then checked with ``fstat`` on the
    open descriptor (no race between the check and the read).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise _unreadable(path, e) from None
    try:
        kind = _file_kind(os.fstat(fd).st_mode)
    except OSError as e:
        os.close(fd)
        raise _unreadable(path, e) from None
    if kind is not None:
        os.close(fd)
        raise _not_regular(path, kind)
    return os.fdopen(fd, "rb")


def _check_safetensors(path: Path) -> None:
    """Reject non-regular files, pickles and truncated files with a clear message before safetensors sees them."""
    with _open_weight_file(path) as f:
        head = f.read(9)
        if len(head) < 9:
            raise CheckpointError(f"{path} is truncated or empty (no safetensors header)")
        n, size = int.from_bytes(head[:8], "little"), os.fstat(f.fileno()).st_size
        if head[8:9] != b"{":  # a safetensors header is JSON right after its 8-byte length
            if head[:2] == b"PK" or (head[0] == 0x80 and 2 <= head[1] <= 5):
                raise CheckpointError(f"{path} is a pickle/zip file (torch.save), not safetensors; moelab never "
                                      "unpickles files — convert it to safetensors first")
            raise CheckpointError(f"{path} is not a safetensors file (no JSON header)")
        if 8 + n > size:
            raise CheckpointError(f"{path} is not a valid safetensors file (header length {n} for a "
                                  f"{size}-byte file): truncated or corrupt")
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} has a corrupt safetensors header") from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError, ValueError, AttributeError):
        raise CheckpointError(f"{path} has a corrupt safetensors header (bad data_offsets)") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: its header needs {8 + n + end} bytes, the file has {size}")


def check_weight_files(directory: Path) -> list[Path]:
    """:func:`weight_files`, each checked to be a complete safetensors file (not a pickle, not truncated)
    without reading any tensor: for directories handed to another loader (transformers)."""
    files = weight_files(directory)
    for f in files:
        _check_safetensors(f)
    return files


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield (name, tensor, file) for every tensor in the given safetensors files."""
    for path in files:
        _check_safetensors(path)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, f.get_tensor(name), path
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt data
            raise CheckpointError(f"cannot read {path}: {e}") from None


def tensor_count(path: Path) -> int:
    """The number of tensors in a safetensors file (read from its header)."""
    _check_safetensors(path)
    with _open_weight_file(path) as f:
        n = int.from_bytes(f.read(8), "little")
        return sum(1 for k in json.loads(f.read(n)) if k != "__metadata__")


def parse_shard_size(size: int | str) -> int:
    """Bytes of a shard size: an int, or text such as '5GB', '500MB', '2GiB' (decimal units)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", size, flags=re.I)
    if not m:
        raise CheckpointError(f"cannot read shard size {size!r}; use e.g. '5GB' or '500MB'")
    unit = (m.group(2) or "B").upper().replace("IB", "B")
    return int(float(m.group(1)) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit])


def stored_dtype(path: Path) -> torch.dtype:
    """The floating dtype of the first non-router tensor in ``path`` (fp32 if none)."""
    _check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                kind = f.get_slice(name).get_dtype()
                dt = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(kind)
                if dt is not None and not name.endswith(("gate.weight", "e_score_correction_bias")):
                    return dt
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    return torch.float32
