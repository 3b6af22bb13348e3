"""Measuring models: exact-match generation tasks (more to come: perplexity, harness, UMP)."""
