"""DeepSeek LLM scaling laws and the IsoFLOP sweep (docs/methods.md §10). Built on training, so above it.

* :mod:`moelab.scaling.laws` — the non-embedding FLOPs/token ``M``, compute ``C = M·D``, the
  hyper-parameter laws (η_opt, B_opt) and the compute-optimal allocation (M_opt, D_opt);
* :mod:`moelab.scaling.shapes` — a concrete (L, d) for an M, and ``suggest`` for a budget;
* :mod:`moelab.scaling.isoflop_plan` — the settings of an IsoFLOP sweep and its runs;
* :mod:`moelab.scaling.isoflop_fit` — the per-budget parabolas and the power-law fit;
* :mod:`moelab.scaling.plots` — the IsoFLOP figure;
* :mod:`moelab.scaling.isoflop` — the sweep itself (trains), its files and re-fits;
* :mod:`moelab.scaling.cli` — the ``moelab scaling`` commands.
"""
