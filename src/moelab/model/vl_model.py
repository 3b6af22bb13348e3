"""A DeepSeek-VL2-style vision-language model (docs/methods.md §12): the image encoder, the adaptor and any
moelab language model, with image features written into the ``<image>`` positions of the text.

Legend: V views of one image (1 global + tw·th local), g tokens per tile side after compression, D the
language model's width, N = g(g + 1) + 1 + g·th·(g·tw + 1) the image's tokens (:mod:`moelab.vision.tiling`).

    feats_VgD = projector(encoder(views_V3TT))                   [V, g·g, D]
    global    g rows of g vectors, each row + image_newline      g·(g + 1)
    separator view_separator                                     1
    local     the tiles' vectors as one (g·th) × (g·tw) grid, each row + image_newline   g·th·(g·tw + 1)
    embeds    the text's embeddings with the <image> positions filled in order (masked_scatter)

``image_newline`` and ``view_separator`` are learned D-vectors (randn/√D), not vocabulary tokens.

    model = VisionLanguageModel.from_config(load_vl_config("configs/vl-tiny.toml"), seed=0)   # a fresh model
    model.vl_config, model.processor_settings()      # its VLConfig; VLProcessor's tile/patch/downsample/max_tiles
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moelab.errors import ConfigError, MoelabError
from moelab.model.transformer import DeepSeekForCausalLM
from moelab.model.vision_encoder import VisionConfig, VisionEncoder
from moelab.model.vision_projector import VisionProjector
from moelab.model.vl_config import ProjectorSettings, VLConfig


class VisionLanguageModel(nn.Module):
    """forward(input_ids ``[B, T]``, images: per image (views ``[V, 3, T, T]``, (tw, th))) -> LM output."""

    def __init__(self, language_model: nn.Module, vision: VisionConfig, image_token_id: int, downsample: int = 2,
                 seed: int = 0, *, config: VLConfig | None = None):
        super().__init__()
        D = language_model.config.hidden_size
        self.language = language_model
        self.vision = VisionEncoder(vision)
        self.projector = VisionProjector(vision.hidden_size, D, downsample)
        g = torch.Generator().manual_seed(seed)
        self.image_newline = nn.Parameter(torch.randn(D, generator=g) / math.sqrt(D))
        self.view_separator = nn.Parameter(torch.randn(D, generator=g) / math.sqrt(D))
        self.image_token_id = image_token_id
        self._config = config

    @classmethod
    def from_config(cls, cfg: VLConfig, seed: int = 0, *, dtype: torch.dtype = torch.float32, device="cpu",
                    image_token_id: int | None = None) -> VisionLanguageModel:
        """A freshly initialised model: the language model as :meth:`DeepSeekForCausalLM.from_config` draws it,
        the encoder and adaptor with PyTorch's default initialisation, all from ``seed`` (the global RNG is left
        as it was). ``image_token_id`` overrides ``cfg.image_token_id``; one of them must be set."""
        token = cfg.image_token_id if image_token_id is None else image_token_id
        if token is None:
            raise ConfigError("the config has no image_token_id: set [processor] image_token_id to the tokenizer's "
                              "<image> id, or build with VLConfig.with_image_token(tokenizer.token_to_id('<image>'))")
        if token != cfg.image_token_id:
            cfg = cfg.with_image_token(token)
        language = DeepSeekForCausalLM.from_config(cfg.language, seed=seed, device=device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(language, cfg.vision, token, cfg.downsample, seed=seed, config=cfg)
        return model.to(device=device, dtype=dtype)

    @property
    def config(self):
        """The language model's :class:`~moelab.config.ModelConfig` (context, experts: what training reads);
        the whole model's configuration is :attr:`vl_config`."""
        return self.language.config

    @property
    def device(self) -> torch.device:
        return self.language.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language.dtype

    @property
    def vl_config(self) -> VLConfig:
        """The model's :class:`VLConfig` (built from its parts, with default processor settings, when the
        model was assembled by hand)."""
        if self._config is not None:
            return self._config
        projector = ProjectorSettings(downsample_ratio=self.projector.downsample)
        return VLConfig(self.language.config, self.vision.config, projector, image_token_id=self.image_token_id)

    def processor_settings(self) -> dict[str, int]:
        """Keyword arguments of :class:`moelab.vision.processor.VLProcessor` for this model's images."""
        return self.vl_config.processor_settings()

    def image_embeddings(self, views_V3TT: torch.Tensor, tiles: tuple[int, int]) -> torch.Tensor:
        """``[N, D]``: one image's vectors in the order of the module docstring."""
        tw, th = tiles
        if views_V3TT.shape[0] != 1 + tw * th:
            raise MoelabError(f"{views_V3TT.shape[0]} views for a {tw}×{th} tile grid (need 1 + {tw * th})")
        feats = self.projector(self.vision(views_V3TT))                          # [V, g·g, D]
        V, GG, D = feats.shape
        g = math.isqrt(GG)
        nl = self.image_newline.to(feats.dtype)

        def rows(grid_RCD: torch.Tensor) -> torch.Tensor:                       # + a newline after each row
            R = grid_RCD.shape[0]
            return torch.cat([grid_RCD, nl.expand(R, 1, D)], dim=1).reshape(-1, D)

        glob = rows(feats[0].view(g, g, D))
        local = feats[1:].view(th, tw, g, g, D).permute(0, 2, 1, 3, 4).reshape(th * g, tw * g, D)
        return torch.cat([glob, self.view_separator.to(feats.dtype)[None], rows(local)])

    def embed(self, input_ids: torch.Tensor, images: list[tuple[torch.Tensor, tuple[int, int]]]) -> torch.Tensor:
        """The text embeddings with every ``<image>`` position filled, images in order."""
        embeds = self.language.model.embed_tokens(input_ids)
        slots = input_ids == self.image_token_id
        if not images:
            if bool(slots.any()):
                raise MoelabError(f"{int(slots.sum())} <image> positions but no image")
            return embeds
        feats = torch.cat([self.image_embeddings(v, t) for v, t in images]).to(embeds.dtype)
        if int(slots.sum()) != feats.shape[0]:
            raise MoelabError(f"the text has {int(slots.sum())} <image> positions but the images make "
                              f"{feats.shape[0]} tokens; expand each <image> to its layout's N tokens")
        return embeds.masked_scatter(slots[..., None], feats)

    def forward(self, input_ids: torch.Tensor, images: list[tuple[torch.Tensor, tuple[int, int]]] | None = None,
                attention_mask: torch.Tensor | None = None):
        return self.language(None, attention_mask, inputs_embeds=self.embed(input_ids, images or []))


__all__ = ["VisionLanguageModel"]
