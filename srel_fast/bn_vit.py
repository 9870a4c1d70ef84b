"""BN-ViT: a DeiT with BatchNorm instead of LayerNorm (SRe2L, Sec. 2.1).

SRe2L recovers from a ViT by following Yao et al., "Leveraging Batch
Normalization for Vision Transformers" (ICCVW 2021): every LayerNorm of
DeiT is replaced by a BatchNorm over the token dimension, and one more BN is
put between the two linear layers of each feed-forward block. This module
places that extra BN right after the first linear layer, before the GELU:

    block(x) = x + Attn(TokenBN_1(x))
    block(x) = x + Linear_2(GELU(TokenBN_ffn(Linear_1(TokenBN_2(x)))))

``TokenBN`` applies ``BatchNorm1d(D)`` to ``x.transpose(1, 2)`` of (B, N, D)
tokens (cls token included), so its statistics are per embedding channel
over all images and tokens of the batch, exactly what recovery matches. The
transposed view is (B, D, N) with D as the innermost stride, which the fused
kernels read in place as their channel-last ("cl") layout: no copy.
There is no LayerNorm anywhere: ``3 * depth + 1`` BatchNorm1d layers
(two replacing the block LayerNorms, one in the FFN, one replacing the final
LayerNorm before the head).

Variants (``ModelSpec.arch``):

- ``bn-vit-tiny``: DeiT-Tiny. Patch 16, dim 192, depth 12, heads 3, MLP
  ratio 4, cls token, learned position embedding, image size and input
  channels from the spec (224 x 224 x 3 for ImageNet). 5.7 M parameters.
- ``bn-vit-tiny-small``: for 8..64 px inputs (Fashion-MNIST, CIFAR,
  Tiny-ImageNet, digits). Patch 4 (patch 2 below 16 px, e.g. 8x8 digits),
  dim 96, depth 4, heads 3 (head dim 32), MLP ratio 4, cls token, learned
  position embedding. On 28x28 Fashion-MNIST: 49 + 1 tokens, 0.46 M
  parameters, about 24 MFLOPs per image forward; on the shared 2-core CPU
  box one epoch over 6,000 images (batch 128) took 30 to 90 s, and 3 epochs
  of AdamW (lr 2e-3, wd 0.05) reach 48.9 % Fashion-MNIST test top-1, 10
  epochs 70.9 % (docs/results).

``ModelSpec.width`` is not used by either variant (it is a ConvNet knob).
Weights are initialised like DeiT/timm (truncated normal, std 0.02, for the
linear layers and the position embedding and cls token; zero biases; BN
weight 1, bias 0).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError


@dataclass(frozen=True)
class BNViTConfig:
    patch: int
    dim: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0

    def to_dict(self) -> dict:
        return asdict(self)


def bn_vit_config(arch: str, image_size: int) -> BNViTConfig:
    if arch == "bn-vit-tiny":
        return BNViTConfig(patch=16, dim=192, depth=12, heads=3)
    if arch == "bn-vit-tiny-small":
        return BNViTConfig(patch=4 if image_size >= 16 else 2, dim=96, depth=4, heads=3)
    raise UserError(f"unknown BN-ViT arch {arch!r}; use bn-vit-tiny or bn-vit-tiny-small.")


class TokenBN(nn.Module):
    """BatchNorm1d(D) over (B, N, D) tokens: statistics per channel over batch and tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise UserError(f"BN-ViT: dim {dim} is not divisible by {heads} heads.")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class BNMlp(nn.Module):
    """Linear -> BN -> GELU -> Linear (the extra BN of BN-ViT)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.norm = TokenBN(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.norm(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = TokenBN(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = TokenBN(dim)
        self.mlp = BNMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BNViT(nn.Module):
    def __init__(self, cfg: BNViTConfig, num_classes: int, in_channels: int = 3, image_size: int = 224):
        super().__init__()
        if image_size % cfg.patch:
            raise UserError(f"BN-ViT: image size {image_size} is not a multiple of the patch size {cfg.patch}.")
        self.cfg = cfg
        self.image_size = image_size
        n_tokens = (image_size // cfg.patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, cfg.dim, cfg.patch, cfg.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens + 1, cfg.dim))
        self.blocks = nn.Sequential(*[Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm = TokenBN(cfg.dim)
        self.head = nn.Linear(cfg.dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised cls-token feature (the head's input)."""
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"BN-ViT built for {self.image_size}px input got {tuple(x.shape[-2:])}")
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed
        t = self.norm(self.blocks(t))
        return t[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def build_bn_vit(spec) -> nn.Module:
    """``spec``: a srel_fast.models.ModelSpec with arch bn-vit-tiny or bn-vit-tiny-small."""
    cfg = bn_vit_config(spec.arch, spec.image_size)
    return BNViT(cfg, spec.num_classes, spec.in_channels, spec.image_size)
