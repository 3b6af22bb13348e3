"""Parameter accounting of a vision-language model (:class:`~moelab.model.vl_config.VLConfig`), on the meta
device (nothing is allocated: DeepSeek-VL2's 27.5B are counted in about a second).

Legend: C encoder width, I its MLP width, L its layers, P = (T/p)² patches, d the downsampling, D the
language model's width.

    vision encoder   patch conv 3·p²·C + C, position [P, C], L × (4(C² + C) + 2·C·I + I + C + 4C), final LN 2C
    pooling head     the SigLIP attention-pooling head (timm ``attn_pool``: latent C, q C² + C, kv 2C² + 2C,
                     proj C² + C, LN 2C, MLP 2·C·I + I + C). The released DeepSeek-VL2 checkpoints store it
                     (``vision.attn_pool.*``) but never run it (ignore_head); moelab does not build it.
    adaptor          Linear(C·d² -> D) + Linear(D -> D) (weights and biases) + image_newline D + view_separator D
    total            language model + encoder + adaptor                     (what moelab builds)
    released total   total + pooling head                                   (what the released files hold)
    activated        the language model's activated parameters (moelab's convention: both embeddings in,
                     K/E of the routed experts) + encoder + adaptor
    activated, papers' convention   activated − the input embedding (a lookup, not a matrix product; kept
                     when tied to the LM head)

Against arXiv 2412.10302 (docs/methods.md §12), the released total and the papers' activated count land
within 2% for Tiny (3.37B/1.0B) and Base (27.5B/4.5B); Small's total does too (16.1B), its activated count
is 2.88B against 2.8B (+2.8%: DeepSeek-V2-Lite's own 2.4B is itself 2.45B counted this way).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from moelab.model.accounting import ModelBudget, model_budget
from moelab.model.vision_encoder import VisionConfig, VisionEncoder
from moelab.model.vision_projector import VisionProjector
from moelab.model.vl_config import VLConfig


@dataclass
class VLBudget:
    language: ModelBudget
    vision_params: int              # the SigLIP encoder moelab builds (no pooling head)
    pooling_head_params: int        # the released attn_pool head: stored in the release, never run, not built
    adaptor_params: int             # projector + image_newline + view_separator
    total_params: int               # language + vision + adaptor
    released_total_params: int      # total + pooling head
    activated_params: int           # language activated + vision + adaptor
    activated_params_papers: int    # activated − input embedding (the convention the VL2 paper's numbers fit)

    def as_dict(self) -> dict:
        """The VL numbers (the language model's own budget is :attr:`language`)."""
        return {k: v for k, v in asdict(self).items() if k != "language"}


def pooling_head_params(v: VisionConfig) -> int:
    """Parameters of the SigLIP attention-pooling head (module docstring)."""
    C, I = v.hidden_size, v.intermediate_size
    return C + (C * C + C) + (2 * C * C + 2 * C) + (C * C + C) + 2 * C + (2 * C * I + I + C)


def vl_budget(cfg: VLConfig, seq_len: int | None = None) -> VLBudget:
    """Parameter counts of ``cfg`` (module docstring); ``seq_len`` goes to the language model's FLOPs."""
    lm = model_budget(cfg.language, seq_len=seq_len)
    D = cfg.language.hidden_size
    with torch.device("meta"):
        vision = sum(p.numel() for p in VisionEncoder(cfg.vision).parameters())
        adaptor = sum(p.numel() for p in VisionProjector(cfg.vision.hidden_size, D, cfg.downsample).parameters())
    adaptor += 2 * D                                    # image_newline, view_separator
    total = lm.total_params + vision + adaptor
    activated = lm.activated_params + vision + adaptor
    input_embedding = 0 if cfg.language.tie_word_embeddings else cfg.language.vocab_size * D   # tied: the LM head
    head = pooling_head_params(cfg.vision)
    return VLBudget(language=lm, vision_params=vision, pooling_head_params=head, adaptor_params=adaptor,
                    total_params=total, released_total_params=total + head, activated_params=activated,
                    activated_params_papers=activated - input_embedding)


__all__ = ["VLBudget", "pooling_head_params", "vl_budget"]
