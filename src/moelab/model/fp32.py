"""Buffers that must stay fp32 whatever dtype the model is cast to."""

from __future__ import annotations

import torch
from torch import nn


class FP32Buffers(nn.Module):
    """Mixin: buffers named in ``_fp32_buffers`` keep fp32 through ``.to(dtype)``, ``.half()`` etc.

    Used for the balancing bias (a bf16 bias cannot move by u = 1e-3) and RoPE frequencies.
    Values are taken from the pre-cast fp32 tensor, so nothing is rounded on the way.
    """

    _fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        saved = {name: getattr(self, name) for name in self._fp32_buffers}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            new = getattr(self, name)
            if new is not None and new.dtype != torch.float32:
                setattr(self, name, (new if old.is_meta else old).to(device=new.device, dtype=torch.float32))
        return self
