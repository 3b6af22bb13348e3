"""Measuring models: perplexity and bits per byte (``perplexity``), a task harness with exact-match
generation and multiple-choice log-likelihood (``harness``, ``exact_match``), and the UMP-style
evaluation of unreasonable problems with the CCC prompt (``ump_data``, ``ump_prompts``, ``ump``, ``ump_judge``).
Works on moelab models and on any transformers causal LM (``lm``)."""
