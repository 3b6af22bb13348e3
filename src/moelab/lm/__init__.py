"""The model-facing core shared by training, evaluation and analysis: logits of any causal LM
(:mod:`~moelab.lm.logits`), left padding with an attention mask (:mod:`~moelab.lm.padding`) and the
next-token negative log-likelihood (:mod:`~moelab.lm.nll`).

It sits below every stage (train, tune, analysis, evaluate, data, infer) and imports none of them:
only :mod:`moelab.model`, :mod:`moelab.errors` and torch.
"""
