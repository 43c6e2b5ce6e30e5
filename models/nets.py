"""PyTorch definitions of the zoo architectures, written for lowbit.

They follow the published shapes (ResNet, DeiT, the MLPerf Tiny reference
models) but are our own code.  Every forward is written so that the legacy
TorchScript exporter emits a graph with no Shape/Gather arithmetic: reshapes
use -1 for the batch, and the class token is broadcast with an add instead of
``expand(x.shape[0], ...)``.  A dynamic batch axis then stays a clean symbolic
dimension after import.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1-projection shortcut (He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(cin, cout, 3, stride),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with basic blocks.  ``stem="imagenet"`` is the 7x7/2 + max-pool stem
    of ResNet-18; ``stem="cifar"`` is a single 3x3 conv (MLPerf Tiny ResNet-8)."""

    def __init__(self, widths, blocks, num_classes: int, in_ch: int = 3, stem: str = "imagenet"):
        super().__init__()
        if stem == "imagenet":
            self.stem = nn.Sequential(conv_bn_relu(in_ch, widths[0], 7, 2), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = conv_bn_relu(in_ch, widths[0], 3, 1)
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.head(x.mean((2, 3)))


class DigitsCNN(nn.Module):
    """Small conv net for 16x16 digits: conv-BN-ReLU blocks, one residual block, global average pool."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, width // 2),
            conv_bn_relu(width // 2, width, stride=2),
            BasicBlock(width, width),
            conv_bn_relu(width, 2 * width, stride=2),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class Attention(nn.Module):
    """Multi-head self-attention written out as MatMul(Q, K^T)*scale -> Softmax -> MatMul(., V)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        tokens, dim = x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(-1, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(-1, tokens, dim)
        return self.proj(out)


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: x + MHA(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT/DeiT classifier: patch embedding, class token, learned positions, encoder blocks."""

    def __init__(self, image: int, patch: int, dim: int, depth: int, heads: int, num_classes: int,
                 in_ch: int = 3, mlp_ratio: int = 4):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_ch, dim, patch, patch)
        num_patches = (image // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = x[:, :1] * 0 + self.cls_token  # broadcast over a symbolic batch without Shape ops
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class DSCNN(nn.Module):
    """MLPerf Tiny keyword spotting DS-CNN: a 10x4 strided conv, then depthwise-separable blocks."""

    def __init__(self, width: int = 64, blocks: int = 4, num_classes: int = 12):
        super().__init__()
        layers = [nn.Conv2d(1, width, (10, 4), (2, 2), (5, 1), bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        for _ in range(blocks):
            layers += [conv_bn_relu(width, width, 3, groups=width), conv_bn_relu(width, width, 1)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class MobileNetV1(nn.Module):
    """MobileNetV1 with width multiplier alpha (MLPerf Tiny visual wake words uses 0.25 at 96x96)."""

    # (output channels at alpha=1, stride) of each depthwise-separable block
    PLAN = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]

    def __init__(self, alpha: float = 0.25, num_classes: int = 2):
        super().__init__()
        cin = int(32 * alpha)
        layers = [conv_bn_relu(3, cin, 3, 2)]
        for cout, stride in self.PLAN:
            cout = int(cout * alpha)
            layers += [conv_bn_relu(cin, cin, 3, stride, groups=cin), conv_bn_relu(cin, cout, 1)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class FCAutoencoder(nn.Module):
    """MLPerf Tiny anomaly detection autoencoder: 640 -> 4x128 -> 8 -> 4x128 -> 640, Dense-BN-ReLU."""

    def __init__(self, features: int = 640, hidden: int = 128, bottleneck: int = 8):
        super().__init__()
        sizes = [features] + [hidden] * 4 + [bottleneck] + [hidden] * 4
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(hidden, features)

    def forward(self, x):
        return self.out(self.body(x))
