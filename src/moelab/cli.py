"""The ``moelab`` command's entry point (``moelab = "moelab.cli:main"``; ``python -m moelab.cli``).

The commands live in :mod:`moelab.app_cli`; importing them imports torch, which takes a few seconds. They
are imported here under a Ctrl-C guard, so that an interrupt during start-up prints ``interrupted`` (exit
130) instead of a stack trace, as it does once a command runs. ``from moelab.cli import app`` still
gives the typer app.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from moelab.app_cli import app
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    app()


def __getattr__(name: str):
    if name == "app":
        from moelab.app_cli import app
        return app
    raise AttributeError(f"module 'moelab.cli' has no attribute {name!r}")


if __name__ == "__main__":
    main()
