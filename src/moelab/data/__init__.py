"""Data: tokenizers (and, later, corpora, packing, FIM, chat formatting)."""
