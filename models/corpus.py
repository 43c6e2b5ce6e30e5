"""The real-model corpus: the architectures users export, from the libraries they export them from.

Each recipe names a torchvision model function or a Hugging Face transformers model class with its
config.  Weights are seeded and random (nothing is downloaded); BatchNorm gets running statistics
measured on photo crops and non-trivial affine parameters, LayerNorm non-trivial affine parameters
and LayerScale trained-like magnitudes, so that activation ranges look like a trained network's.

Every recipe is exported the two ways users export: torch's dynamo exporter at opset 18 (which
writes its weights as external data, ``model.onnx.data``, as users get them) and the TorchScript
exporter at opset 17, at a static batch of 1; a few recipes also get a dynamic-batch export.  The
files are cached under ``$LOWBIT_CACHE/corpus`` by the hash of everything that determines them.

Data: ImageNet-normalised crops of the photos that ship in scikit-image and scikit-learn
(``models.data.photo_crops``), and for text models seeded token ids with padded attention masks.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from models import data as zdata
from runtime.errors import UserError
from runtime.io import cache_lock, cache_root
from runtime.progress import log, stage

FORMAT = 1                      # bump when the export code changes what it writes
MAX_IR_VERSION = 10             # onnxruntime 1.31 loads <= 13; stay well inside
CALIB_SAMPLES = 32
EVAL_SAMPLES = 32
CALIB_SEED, EVAL_SEED, BUILD_SEED = 1, 2, 3

Library = Literal["torchvision", "transformers"]
Kind = Literal["cnn", "vit", "text"]
Exporter = Literal["dynamo", "torchscript"]
EXPORTERS: dict[Exporter, int] = {"dynamo": 18, "torchscript": 17}     # exporter -> opset


@dataclass(frozen=True)
class Recipe:
    name: str
    family: str
    library: Library
    builder: str                # torchvision.models function, or "ModelClass:ConfigClass" in transformers
    kind: Kind
    config: dict = field(default_factory=dict, hash=False)
    size: int = 224             # image side, or text sequence length
    dynamic: bool = False       # also export a dynamic-batch variant
    seed: int = 0

    def inputs(self) -> list[str]:
        return ["input_ids", "attention_mask"] if self.kind == "text" else ["pixel_values"]

    def samples(self, n: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        if self.kind == "text":
            return zdata.token_batch(rng, n, self.size, self.config.get("vocab_size", 30522))
        return {"pixel_values": zdata.photo_crops(rng, n, self.size)}


@dataclass(frozen=True)
class Variant:
    """One ONNX file: a recipe through one exporter, at batch 1 or with a dynamic batch."""
    recipe: Recipe
    exporter: Exporter
    dynamic: bool = False

    @property
    def name(self) -> str:
        return f"{self.recipe.name}.{self.exporter}" + (".dynbatch" if self.dynamic else "")

    def key(self) -> dict:
        """Everything that determines the file: the recipe, the exporter and its settings, the library
        versions, and this module's and the data module's source."""
        from importlib.metadata import version

        src = Path(__file__).read_bytes() + (Path(__file__).parent / "data.py").read_bytes()
        return {"recipe": _recipe_dict(self.recipe), "exporter": self.exporter, "opset": EXPORTERS[self.exporter],
                "dynamic": self.dynamic, "format": FORMAT,
                "versions": {p: version(p) for p in ("torch", self.recipe.library, "onnxscript")},
                "source_sha256": hashlib.sha256(src).hexdigest()}

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:12]


def _recipe_dict(r: Recipe) -> dict:
    return {"name": r.name, "family": r.family, "library": r.library, "builder": r.builder, "kind": r.kind,
            "config": r.config, "size": r.size, "seed": r.seed}


def _tv(name, family, kind="cnn", dynamic=False, **config):
    return Recipe(name, family, "torchvision", name, kind, config, dynamic=dynamic)


def _hf(name, family, builder, kind, size=224, dynamic=False, **config):
    return Recipe(name, family, "transformers", builder, kind, config, size=size, dynamic=dynamic)


# DeiT-tiny / ViT-tiny dimensions (timm's deit_tiny_patch16_224): what fits the 2-core machine's budget
_TINY_VIT = {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768,
             "image_size": 224, "patch_size": 16, "num_labels": 1000}

RECIPES: dict[str, Recipe] = {r.name: r for r in [
    _tv("resnet18", "ResNet", dynamic=True),
    _tv("resnet50", "ResNet"),
    _tv("mobilenet_v2", "MobileNetV2", dynamic=True),
    _tv("mobilenet_v3_large", "MobileNetV3"),
    _tv("efficientnet_b0", "EfficientNet"),
    _tv("regnet_y_400mf", "RegNetY"),
    _tv("convnext_tiny", "ConvNeXt"),
    _tv("densenet121", "DenseNet"),
    _tv("googlenet", "GoogLeNet", aux_logits=False, init_weights=True),
    _tv("shufflenet_v2_x1_0", "ShuffleNetV2"),
    _tv("squeezenet1_1", "SqueezeNet"),
    _tv("swin_t", "Swin", kind="vit"),
    _hf("vit_tiny", "ViT", "ViTForImageClassification:ViTConfig", "vit", **_TINY_VIT),
    _hf("deit_tiny", "DeiT", "DeiTForImageClassification:DeiTConfig", "vit", dynamic=True, **_TINY_VIT),
    _hf("mobilevit_xxs", "MobileViT", "MobileViTForImageClassification:MobileViTConfig", "vit", size=256,
        hidden_sizes=[64, 80, 96], neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320], expand_ratio=2.0,
        num_labels=1000),
    _hf("bert_base", "BERT", "BertForSequenceClassification:BertConfig", "text", size=128, dynamic=True,
        num_labels=2),
    _hf("distilbert_base", "DistilBERT", "DistilBertForSequenceClassification:DistilBertConfig", "text", size=128,
        num_labels=2),
]}


def variants() -> list[Variant]:
    """Every corpus file: each recipe by both exporters at batch 1, plus dynamic-batch exports."""
    out = []
    for r in RECIPES.values():
        out += [Variant(r, e) for e in EXPORTERS]
        if r.dynamic:
            out += [Variant(r, e, dynamic=True) for e in EXPORTERS]
    return out


def find(names: list[str] | None) -> list[Variant]:
    """The variants named (a recipe name selects all of its variants); all when ``names`` is empty."""
    every = variants()
    if not names:
        return every
    picked = [v for v in every if v.name in names or v.recipe.name in names]
    unknown = [n for n in names if not any(n in (v.name, v.recipe.name) for v in every)]
    if unknown:
        raise UserError(f"unknown corpus model {unknown[0]!r}; `lowbit corpus list` shows them")
    return picked


def cache_dir() -> Path:
    return cache_root() / "corpus"


@dataclass(frozen=True)
class CorpusFiles:
    variant: Variant
    dir: Path

    @property
    def onnx(self) -> Path:
        return self.dir / "model.onnx"

    @property
    def info(self) -> Path:
        return self.dir / "info.json"

    def calibration(self) -> dict[str, np.ndarray]:
        return _load_npz(self.dir / "calib.npz")

    def evaluation(self) -> dict[str, np.ndarray]:
        return _load_npz(self.dir / "eval.npz")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def files(v: Variant) -> CorpusFiles:
    return CorpusFiles(v, cache_dir() / f"{v.name}-{v.hash()}")


def ensure(v: Variant) -> CorpusFiles:
    """The cached files of ``v``, exported first if needed; a directory appears complete or not at all."""
    f = files(v)
    if f.info.exists():
        return f
    with cache_lock(f.dir), stage(f"corpus build {v.name}"), tempfile.TemporaryDirectory(dir=f.dir.parent) as tmp:
        if f.info.exists():         # built by another process while this one waited
            return f
        _build(v, Path(tmp))
        os.replace(tmp, f.dir)
        os.mkdir(tmp)               # TemporaryDirectory removes its (now empty) directory on exit
    return f


def _torch_libraries():
    """torchvision's wheel on the index is a CUDA build whose import fails registering CUDA-only ops
    (``torchvision::nms``); its model definitions are pure Python and need none of them.  Empty
    stand-ins for the two registration modules let it import on the CPU torch (transformers imports
    torchvision when it is installed, so this comes first for both)."""
    for m in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(m, types.ModuleType(m))
    import torchvision.models
    import transformers

    return torchvision.models, transformers


def missing() -> str | None:
    """The import error that keeps the corpus from being built here (a library absent), or None."""
    try:
        _torch_libraries()
    except ImportError as e:
        return str(e)
    return None


def _model(r: Recipe):
    import torch

    tv, hf = _torch_libraries()
    torch.manual_seed(r.seed)
    if r.library == "torchvision":
        return getattr(tv, r.builder)(weights=None, **r.config)
    model_cls, config_cls = (getattr(hf, n) for n in r.builder.split(":"))
    model = model_cls(config_cls(**r.config))

    # a transformers model returns a ModelOutput; users wrap it to export the logits tensor, with the
    # inputs as named arguments (what the exporters name the graph inputs after)
    class TextLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    class ImageLogits(TextLogits):
        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values).logits

    return TextLogits() if r.kind == "text" else ImageLogits()


def _realistic(model, r: Recipe):
    """Trained-like parameters on a seeded random network.  Fresh BatchNorm has mean 0, var 1 and an
    identity affine (and ResNets may zero a block's last gamma), LayerScale starts at 1e-6: folded or
    not, that makes every layer unrealistically uniform.  BN and LayerNorm get affine parameters
    drawn around the identity, LayerScale trained magnitudes, then BN running statistics are
    measured on photo crops (train mode, cumulative average)."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(r.seed + 7)
    norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, norms) and getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        for name, p in model.named_parameters():
            if name.split(".")[-1] in ("layer_scale", "layer_scale_parameter", "gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.45 + 0.05)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        x = torch.from_numpy(r.samples(16, BUILD_SEED)["pixel_values"])
        model.train()
        with torch.no_grad():
            for i in range(0, len(x), 4):
                model(x[i : i + 4])
    return model.eval()


def _build(v: Variant, out: Path) -> None:
    import onnx
    import torch

    r = v.recipe
    model = _realistic(_model(r), r)
    names = r.inputs()
    batch = 2 if v.dynamic else 1
    example = r.samples(batch, BUILD_SEED + 1)
    args = tuple(torch.from_numpy(example[n]) for n in names)
    path = out / "model.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if v.exporter == "dynamo":
            # the dynamo exporter's default: weights in model.onnx.data beside the graph (external data)
            shapes = tuple({0: torch.export.Dim.DYNAMIC} for _ in names) if v.dynamic else None
            torch.onnx.export(model, args, str(path), dynamo=True, opset_version=EXPORTERS["dynamo"],
                              input_names=names, output_names=["logits"], dynamic_shapes=shapes, verbose=False)
        else:
            torch.onnx.export(model, args, str(path), dynamo=False, opset_version=EXPORTERS["torchscript"],
                              input_names=names, output_names=["logits"],
                              dynamic_axes={n: {0: "batch"} for n in [*names, "logits"]} if v.dynamic else None)
        reference = model(*args).numpy()
    m = onnx.load(str(path), load_external_data=False)
    m.ir_version = min(m.ir_version, MAX_IR_VERSION)
    m.doc_string = f"lowbit corpus {v.name}: {r.library} {r.builder}, seeded weights; recipe {v.hash()}"
    onnx.save(m, str(path))
    for split, n, seed in (("calib", CALIB_SAMPLES, CALIB_SEED), ("eval", EVAL_SAMPLES, EVAL_SEED)):
        with open(out / f"{split}.npz", "wb") as fh:
            np.savez(fh, **r.samples(n, seed))
    info = {"name": v.name, "key": v.key(), "hash": v.hash(), "files": sorted(p.name for p in out.iterdir()),
            "torch_logits_example": reference.ravel()[:8].tolist()}
    (out / "info.json").write_text(json.dumps(info, indent=2))
    log.info("%s: %s", v.name, ", ".join(info["files"]))
