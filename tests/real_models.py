"""Models shaped like what users export, built here from seeded weights (no downloads).

- ``digits_cnn``: conv-BN-ReLU blocks of 16/16/32/32/64 channels with two max-pools, global average
  pool and a Linear head, at 32x32 (the plain digits CNN people write first);
- ``tiny_vit``: timm's VisionTransformer layout at 32x32 (patch 4, dim 96, depth 4, 3 heads): a conv
  patch embedding, a class token broadcast with ``expand(B, -1, -1)``, fused qkv reshaped by the
  traced batch size, scaled-dot-product attention, pre-norm blocks, the class token's row as the
  pooled output.

Each is exported by torch's dynamo exporter (opset 18) with a symbolic or a fixed batch, and can be
quantized by ORT's ``quantize_static`` (u8 activations, s8 per-channel weights: ORT's defaults) or in
NNCF's layout (s8 activations with zero point 0, per-channel weights).  BatchNorm gets non-trivial
statistics, as a trained network has, so the folded convolutions are not unrealistically uniform.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F

OPSET = 18


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*block(1, 16), *block(16, 16), nn.MaxPool2d(2),
                                      *block(16, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64))
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.head(x)


class Attention(nn.Module):
    """timm's Attention: one qkv Linear, heads split by reshape/permute, fused SDPA, proj."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, img: int = 32, patch: int = 4, dim: int = 96, depth: int = 4, heads: int = 3,
                 in_ch: int = 3, num_classes: int = 10):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_ch, dim, patch, patch)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.blocks(x + self.pos_embed)
        return self.head(self.norm(x)[:, 0])


MODELS = {"digits_cnn": (DigitsCNN, (1, 32, 32)), "tiny_vit": (TinyViT, (3, 32, 32))}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cls, _ = MODELS[name]
    model = cls()
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):      # trained-looking statistics and affine parameters
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


def samples(name: str, n: int, seed: int = 0) -> np.ndarray:
    _, shape = MODELS[name]
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def export(name: str, path: str | Path, *, batch: int | None = None, seed: int = 0, dynamo: bool = True) -> Path:
    """The dynamo export, opset 18 (or ``dynamo=False``: the TorchScript exporter, opset 17), with a
    symbolic batch (``batch=None``) or a fixed one; ``ir_version`` clamped for ORT."""
    model = build(name, seed)
    x = torch.from_numpy(samples(name, batch or 2, seed + 7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not dynamo:
            axes = None if batch else {"input": {0: "batch"}, "output": {0: "batch"}}
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["output"], dynamic_axes=axes)
            proto = onnx.load(str(path))
        else:
            dyn = None if batch else ({0: torch.export.Dim("batch", min=1, max=1024)},)
            proto = torch.onnx.export(model, (x,), dynamo=True, opset_version=OPSET, input_names=["input"],
                                      output_names=["output"], dynamic_shapes=dyn, verbose=False).model_proto
    proto.ir_version = min(proto.ir_version, 10)
    onnx.save(proto, str(path))
    return Path(path)


def quantize_ort(src: str | Path, dst: str | Path, calib: np.ndarray, *, nncf_layout: bool = False) -> Path:
    """ORT's ``quantize_static`` in QDQ format, per-channel s8 weights; activations u8 asymmetric
    (ORT's default) or, with ``nncf_layout``, s8 symmetric with zero point 0 as NNCF writes them."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.it, None)

    extra = {"ActivationSymmetric": True} if nncf_layout else {}
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8 if nncf_layout else QuantType.QUInt8,
                    weight_type=QuantType.QInt8, extra_options=extra)
    return Path(dst)
