"""Analyses built on top of moelab's models and training loop.

Scaling laws and IsoFLOP sweeps (which train) are :mod:`moelab.scaling`.
"""
