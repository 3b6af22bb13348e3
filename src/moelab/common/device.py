"""Devices by name: ``auto`` (the GPU when there is one), ``cpu``, ``cuda``, ``cuda:N``, ``mps`` — checked on
this machine before any work, so a wrong name fails in one line.

Used by every command's ``--device`` option and by the ``train.device`` setting.
"""

from __future__ import annotations

import torch

from moelab.errors import ConfigError


def resolve_device(device: str, option: str = "--device") -> str:
    """The torch device ``device`` names (``auto``: cuda when available, else cpu), checked on this machine.

    Raises a :class:`~moelab.errors.ConfigError` for a malformed name, CUDA on a machine without it, or a
    CUDA index the machine does not have.
    """
    text = device.strip()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{option} {device}: not a device; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("torch built without CUDA" if torch.version.cuda is None and torch.version.hip is None
                   else f"{torch.cuda.device_count()} devices")
            raise ConfigError(f"{option} {device}: CUDA is not available on this machine ({why}); use {option} cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            have = "1 CUDA device (cuda:0)" if n == 1 else f"{n} CUDA devices (cuda:0 to cuda:{n - 1})"
            raise ConfigError(f"{option} {device}: this machine has {have}; pick one of them or use {option} cpu")
        return str(dev)
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{option} {device}: MPS is not available on this machine; use {option} cpu")
        return str(dev)
    raise ConfigError(f"{option} {device}: moelab runs on cpu, cuda or mps devices (got {dev.type!r}); "
                      f"use {option} cpu or {option} cuda")
