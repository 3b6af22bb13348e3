"""Analyses built on top of moelab's models and training loop.

* :mod:`moelab.analysis.scaling` — DeepSeek LLM scaling laws: the non-embedding FLOPs/token ``M``,
  compute ``C = M·D``, the hyper-parameter laws (η_opt, B_opt) and the compute-optimal allocation
  (M_opt, D_opt) (docs/methods.md §10).
* :mod:`moelab.analysis.isoflop` — an IsoFLOP sweep on a local token directory, the parabola and
  power-law fits, and the plot.
* :mod:`moelab.analysis.scaling_cli` — the ``moelab scaling`` commands.
"""
