"""Helpers shared by the ``moelab`` command and its sub-apps (``moelab data ...``).

Kept apart from :mod:`moelab.cli` so that sub-apps can use them while ``cli.py`` imports the sub-apps.
"""

from __future__ import annotations

import functools
import warnings

import typer
from rich.console import Console
from rich.markup import escape

from moelab.errors import MoelabError

#: Messages, warnings and progress go to stderr; results (tables, JSON) go to stdout.
err = Console(stderr=True)


def friendly(fn):
    """Run a CLI command so that user errors are one line on stderr, not a stack trace.

    A :class:`MoelabError` prints ``error: <message>`` and exits with status 1; Ctrl-C prints
    ``interrupted`` and exits with 130. Python warnings raised meanwhile print as ``warning: <message>``.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                return fn(*args, **kwargs)
            except MoelabError as e:
                err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None
            except KeyboardInterrupt:
                err.print("interrupted")
                raise typer.Exit(130) from None

    return wrapper


def _show_warning(message, category, filename, lineno, file=None, line=None):
    err.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
