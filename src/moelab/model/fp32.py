"""Buffers that must stay fp32 whatever dtype the model is cast to."""

from __future__ import annotations

import torch
from torch import nn


class FP32Buffers(nn.Module):
    """Mixin: buffers named in ``_fp32_buffers`` and parameters named in ``_fp32_params`` keep fp32
    through ``.to(dtype)``, ``.half()`` etc.

    Used for the balancing bias (a bf16 bias cannot move by u = 1e-3), the router weight (routing
    decisions are made in fp32, as transformers keeps ``gate.weight`` fp32) and RoPE frequencies.
    Values are taken from the pre-cast fp32 tensor, so nothing is rounded on the way.
    """

    _fp32_buffers: tuple[str, ...] = ()
    _fp32_params: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        saved = {name: getattr(self, name) for name in self._fp32_buffers}
        saved_params = {name: getattr(self, name).data for name in self._fp32_params}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            new = getattr(self, name)
            if new is not None and new.dtype != torch.float32:
                setattr(self, name, (new if old.is_meta else old).to(device=new.device, dtype=torch.float32))
        for name, old in saved_params.items():
            param = getattr(self, name)
            if param.dtype != torch.float32:
                param.data = (param.data if old.is_meta else old).to(device=param.device, dtype=torch.float32)
        return self
