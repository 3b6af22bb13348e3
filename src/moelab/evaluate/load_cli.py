"""Loading the model an evaluation command names (``smollm2`` or a checkpoint directory), with one line
saying what was loaded."""

from __future__ import annotations

import time

from rich.markup import escape

from moelab.cli_utils import err
from moelab.errors import MoelabError


def load_model(spec: str, device: str = "cpu"):
    """``(model, tokenizer)`` with the model on ``device`` (checked with :func:`resolve_device` first);
    transformers' own progress bars and notices are silenced."""
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        raise MoelabError("evaluation needs transformers: pip install 'moelab[hf]'") from None
    from moelab.interop.hf_lm import load_causal_lm

    t0 = time.perf_counter()
    model, tokenizer = load_causal_lm(spec)
    model.to(device)
    n = sum(p.numel() for p in model.parameters())
    err.print(f"loaded {escape(spec)}: {type(model).__name__}, {n / 1e6:.1f}M parameters on {device} "
              f"({time.perf_counter() - t0:.1f} s)", highlight=False)
    return model, tokenizer


__all__ = ["load_model"]
