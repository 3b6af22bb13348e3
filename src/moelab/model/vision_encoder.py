"""A SigLIP-style ViT (DeepSeek-VL2's image encoder, docs/methods.md §12) without its pooling head:
outputs equal transformers' ``SiglipVisionModel(vision_use_head=False)`` on the same weights (tested),
and its parameter names are that model's, so its weights load as they are.

Legend: B images (views), P = ⌊T/p⌋² patches of a T×T view with patch p, C width, h heads.

    pixels_B3TT -> Conv2d(3, C, p, stride p) -> [B, P, C] + position embedding [P, C]
    L × (x + Attn(LN1(x)); x + MLP(LN2(x)))       Attn: h heads, biases, softmax((q k^T)/√(C/h));
                                                  MLP: fc1 -> GELU (tanh approximation) -> fc2
    -> LayerNorm -> [B, P, C]                      (SigLIP-SO400M/14@384: C 1152, L 27, h 16, MLP 4304, P 729)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.n_patches, cfg.hidden_size)

    def forward(self, pixels_B3TT: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels_B3TT.to(self.patch_embedding.weight.dtype))      # [B, C, g, g]
        return x.flatten(2).transpose(1, 2) + self.position_embedding.weight               # [B, P, C]


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        C = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(C, C) for _ in range(4))

    def forward(self, x_BPC: torch.Tensor) -> torch.Tensor:
        B, P, C = x_BPC.shape

        def split(t):
            return t.view(B, P, self.heads, C // self.heads).transpose(1, 2)              # [B, h, P, C/h]

        y = F.scaled_dot_product_attention(split(self.q_proj(x_BPC)), split(self.k_proj(x_BPC)),
                                           split(self.v_proj(x_BPC)))
        return self.out_proj(y.transpose(1, 2).reshape(B, P, C))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionEncoder(nn.Module):
    """forward(pixels ``[B, 3, T, T]``) -> ``[B, P, C]`` (module docstring)."""

    def __init__(self, cfg: VisionConfig = VisionConfig()):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels_B3TT: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels_B3TT)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


__all__ = ["VisionConfig", "VisionEncoder"]
