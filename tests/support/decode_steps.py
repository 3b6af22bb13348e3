"""Per-step logits of a prefill + decode run, with the growable cache or through a StaticDecoder: what the decode
tests compare (tests/infer). On sys.path through pytest's ``pythonpath = ["tests/support"]``."""

from __future__ import annotations

import torch

from moelab.infer.static import StaticDecoder


@torch.inference_mode()
def step_logits(model, ids, feed, mask=None, static=False, decoders=None, **decoder_kw) -> list[torch.Tensor]:
    """Prefill ``ids`` ``[B, T]``, then feed the columns of ``feed`` ``[B, n]`` one per step: the logits ``[B, V]``
    after the prefill and after each fed column, with the growable cache or (``static``) a static one of exact
    capacity stepped by a :class:`StaticDecoder` made with ``decoder_kw`` (appended to ``decoders`` if given)."""
    B, T = ids.shape
    cache = model.new_static_cache(B, T + feed.shape[1]) if static else model.new_cache()
    out = [model(ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits[:, -1]]
    decoder = StaticDecoder(model, cache, mask, **decoder_kw) if static else None
    if decoders is not None:
        decoders.append(decoder)
    for t in range(feed.shape[1]):
        if decoder is not None:
            out.append(decoder(feed[:, t]).clone())
            continue
        if mask is not None:
            mask = torch.cat((mask, mask.new_ones(B, 1)), dim=1)
        out.append(model(feed[:, t:t + 1], attention_mask=mask, cache=cache).logits[:, -1])
    return out


def assert_logits_close(got, ref, atol=1e-5):
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, atol=atol, rtol=0)
