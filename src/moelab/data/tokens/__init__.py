"""Token directories: ``prepare`` turns corpora into flat token files; ``TokenData`` reads them.

Format ``moelab-tokens-v1`` (one directory)::

    tokenizer.json, tokenizer_config.json   the tokenizer (opens in transformers' AutoTokenizer)
    train.bin, val.bin                      token ids, flat, native byte order; uint16 if vocab_size
                                            <= 65535, else uint32. Every document is its tokens then
                                            EOS (id 1); no BOS, no padding.
    train.idx.npy, val.idx.npy              int64 [n_docs + 1]: document d is bin[idx[d]:idx[d+1]]
                                            (its last token is the EOS)
    meta.json                               format, dtype, vocab and special ids, per-split documents /
                                            tokens / bytes, bytes per token, sources, skips, seed

Modules: :mod:`.meta` (the format's constants, ``meta.json``, the summary table), :mod:`.prepare` (the
corpus -> directory pipeline and its val split), :mod:`.encode` (the chunked encoder writing ``.bin`` /
``.idx.npy``), :mod:`.reader` (:class:`TokenData`: memory-mapped batches ``x``, ``y`` int64 ``[B, T]``).
"""

from moelab.data.tokens.encode import MAX_CHUNK_BYTES
from moelab.data.tokens.meta import BOS_ID, EOS_ID, FORMAT, PAD_ID, SPLITS, read_meta, summary_table
from moelab.data.tokens.prepare import prepare
from moelab.data.tokens.reader import TokenData

__all__ = ["BOS_ID", "EOS_ID", "FORMAT", "MAX_CHUNK_BYTES", "PAD_ID", "SPLITS", "TokenData", "prepare",
           "read_meta", "summary_table"]
