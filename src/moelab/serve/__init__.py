"""The HTTP server: an OpenAI-compatible API (FastAPI + uvicorn) with continuous batching over a paged cache.

    moelab serve runs/tiny/model --port 8000          # the command line (src/moelab/serve/cli.py)

Layers inside, lowest first: :mod:`.paged_cache` (blocks, block tables, the cache view the attention reads),
:mod:`.scheduler` (queue, admission, block accounting), :mod:`.engine` (the model thread: chunked prefill,
batched decode, sampling), :mod:`.protocol` / :mod:`.responses` (OpenAI bodies), :mod:`.app` (FastAPI),
:mod:`.server` (loading a checkpoint, uvicorn, graceful stop). Importing this package needs no FastAPI; only
:mod:`.app` and :mod:`.server` do.
"""

from moelab.serve.engine import Engine
from moelab.serve.paged_cache import BlockPool, PagedBatch, PagedSequence
from moelab.serve.request import GenerationRequest

__all__ = ["BlockPool", "Engine", "GenerationRequest", "PagedBatch", "PagedSequence"]
