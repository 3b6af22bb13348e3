"""``python -m moelab ...``: the same command line as ``moelab ...``."""

from moelab.cli import main

main()
