"""The model zoo: recipes, and an on-demand exporter with a content-keyed cache.

A recipe is everything that determines a model file: the architecture and its
arguments, the training or initialization settings, and the source of the zoo
code itself.  Its hash names the cached files, so changing any of these
produces a new model instead of silently reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from models import data as zdata
from models import nets
from models.train import TrainConfig, calibrate_batchnorm, train_classifier
from runtime.errors import UserError
from runtime.io import cache_lock, cache_root
from runtime.progress import log, stage

FORMAT = 1              # bump when _export changes what it writes
OPSET = 17              # legacy TorchScript exporter (dynamo=False): no onnxscript needed, ir_version 8
MAX_IR_VERSION = 10     # onnxruntime 1.31 loads <= 13; stay well inside
INPUT, OUTPUT = "input", "output"
CALIB_SAMPLES = {"accuracy": 256, "benchmark": 32}


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str                               # "accuracy" (trained on digits) or "benchmark" (seeded weights)
    summary: str
    arch: str                               # class name in models.nets
    arch_kwargs: dict
    sample_shape: tuple                     # one sample, without the batch axis
    sampler: Callable[[np.random.Generator, int], np.ndarray] | None = None
    train: TrainConfig | None = None
    seed: int = 0

    def recipe(self) -> dict:
        src = "".join((Path(__file__).parent / f).read_text() for f in ("nets.py", "data.py", "train.py"))
        import torch

        return {
            "name": self.name, "arch": self.arch, "arch_kwargs": self.arch_kwargs,
            "sample_shape": list(self.sample_shape), "train": asdict(self.train) if self.train else None,
            "seed": self.seed, "format": FORMAT, "opset": OPSET, "torch": torch.__version__,
            "source_sha256": hashlib.sha256(src.encode()).hexdigest(),
        }

    def recipe_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.recipe(), sort_keys=True).encode()).hexdigest()[:12]

    def samples(self, n: int, seed: int) -> np.ndarray:
        """Realistic inputs: digits training images, or the entry's synthetic distribution."""
        rng = np.random.default_rng(seed)
        if self.kind == "accuracy":
            x = zdata.digits("train").x
            return x[rng.choice(len(x), size=min(n, len(x)), replace=False)]
        return self.sampler(rng, n)


def _images(channels: int, size: int):
    return lambda rng, n: zdata.smooth_images(rng, n, channels, size)


_DIGITS_TRAIN_CNN = TrainConfig(epochs=30, lr=3e-3)
_DIGITS_TRAIN_VIT = TrainConfig(epochs=120, lr=2e-3)

ENTRIES = {e.name: e for e in [
    Entry("digits_cnn", "accuracy", "conv-BN-ReLU + residual block + GAP, trained on sklearn digits (16x16)",
          "DigitsCNN", {"width": 32}, (1, 16, 16), train=_DIGITS_TRAIN_CNN),
    Entry("digits_vit", "accuracy", "ViT: 4x4 patches, class token, 4 blocks, dim 64, 4 heads, trained on digits",
          "VisionTransformer",
          {"image": 16, "patch": 4, "dim": 64, "depth": 4, "heads": 4, "num_classes": 10, "in_ch": 1, "mlp_ratio": 2},
          (1, 16, 16), train=_DIGITS_TRAIN_VIT),
    Entry("deit_tiny", "benchmark", "DeiT-tiny: 224x224, patch 16, dim 192, 12 blocks, 3 heads",
          "VisionTransformer",
          {"image": 224, "patch": 16, "dim": 192, "depth": 12, "heads": 3, "num_classes": 1000},
          (3, 224, 224), _images(3, 224)),
    Entry("resnet18", "benchmark", "ResNet-18, 224x224, 1000 classes",
          "ResNet", {"widths": [64, 128, 256, 512], "blocks": [2, 2, 2, 2], "num_classes": 1000},
          (3, 224, 224), _images(3, 224)),
    Entry("ds_cnn", "benchmark", "MLPerf Tiny KWS DS-CNN, 49x10 MFCC, 12 classes",
          "DSCNN", {"width": 64, "blocks": 4, "num_classes": 12}, (1, 49, 10), zdata.mfcc_like),
    Entry("resnet8", "benchmark", "MLPerf Tiny image classification ResNet-8, 32x32 CIFAR",
          "ResNet", {"widths": [16, 32, 64], "blocks": [1, 1, 1], "num_classes": 10, "stem": "cifar"},
          (3, 32, 32), _images(3, 32)),
    Entry("mobilenet_v1_025", "benchmark", "MLPerf Tiny VWW MobileNetV1-0.25, 96x96, 2 classes",
          "MobileNetV1", {"alpha": 0.25, "num_classes": 2}, (3, 96, 96), _images(3, 96)),
    Entry("fc_autoencoder", "benchmark", "MLPerf Tiny anomaly detection FC autoencoder, 640 features",
          "FCAutoencoder", {"features": 640, "hidden": 128, "bottleneck": 8}, (640,), zdata.log_mel_frames),
]}


def get(name: str) -> Entry:
    if name not in ENTRIES:
        raise UserError(f"unknown zoo model {name!r}; `lowbit zoo list` shows: {', '.join(ENTRIES)}")
    return ENTRIES[name]


def cache_dir() -> Path:
    return cache_root() / "zoo"


@dataclass(frozen=True)
class ZooFiles:
    onnx: Path
    calib: Path
    info: Path

    def calibration(self) -> dict[str, np.ndarray]:
        with np.load(self.calib) as z:
            return {k: z[k] for k in z.files}

    def info_dict(self) -> dict:
        return json.loads(self.info.read_text())


def files(name: str) -> ZooFiles:
    e = get(name)
    stem = cache_dir() / f"{e.name}-{e.recipe_hash()}"
    return ZooFiles(stem.with_suffix(".onnx"), stem.with_suffix(".calib.npz"), stem.with_suffix(".json"))


def ensure(name: str) -> ZooFiles:
    """Return the cached model files, building them first if needed (atomically)."""
    f = files(name)
    if f.info.exists():
        return f
    e = get(name)
    with cache_lock(f.onnx), stage(f"zoo build {name}"), tempfile.TemporaryDirectory(dir=f.onnx.parent) as tmp:
        if f.info.exists():         # built by another process while this one waited
            return f
        info = _build(e, Path(tmp) / "model.onnx", Path(tmp) / "calib.npz")
        (Path(tmp) / "info.json").write_text(json.dumps(info, indent=2))
        # the .json is renamed last: its presence marks a complete entry
        os.replace(Path(tmp) / "model.onnx", f.onnx)
        os.replace(Path(tmp) / "calib.npz", f.calib)
        os.replace(Path(tmp) / "info.json", f.info)
    return f


def _build(e: Entry, onnx_path: Path, calib_path: Path) -> dict:
    import torch

    torch.manual_seed(e.seed)
    model = getattr(nets, e.arch)(**e.arch_kwargs)
    info: dict = {"name": e.name, "recipe": e.recipe(), "recipe_hash": e.recipe_hash()}
    t0 = time.perf_counter()
    if e.kind == "accuracy":
        model = train_classifier(model, zdata.digits("train"), e.train, e.seed, desc=f"training {e.name}")
        with torch.no_grad():
            for split in ("test", "perturbed"):
                s = zdata.digits(split)
                info[f"torch_{split}_accuracy"] = float((model(torch.from_numpy(s.x)).argmax(1).numpy() == s.y).mean())
    else:
        model = calibrate_batchnorm(model, e.samples(16, seed=e.seed + 100))
    info["build_seconds"] = round(time.perf_counter() - t0, 2)
    log.info("%s: %s", e.name, {k: v for k, v in info.items() if k != "recipe"})

    _export(model.eval(), e, onnx_path)
    calib = e.samples(CALIB_SAMPLES[e.kind], seed=e.seed + 1)
    with open(calib_path, "wb") as fh:
        np.savez(fh, **{INPUT: calib})
    return info


def _export(model, e: Entry, path: Path) -> None:
    import onnx
    import torch

    dummy = torch.from_numpy(e.samples(2, seed=e.seed + 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    m = onnx.load(str(path))
    if m.ir_version > MAX_IR_VERSION:
        m.ir_version = MAX_IR_VERSION
    m.doc_string = f"lowbit zoo {e.name} ({e.summary}); recipe {e.recipe_hash()}"
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def export(name: str, out: str | os.PathLike, calib_out: str | os.PathLike | None = None) -> ZooFiles:
    """Copy a zoo model (and optionally its calibration set) to user paths, atomically."""
    f = ensure(name)
    for src, dst in ((f.onnx, out), (f.calib, calib_out)):
        if dst is None:
            continue
        dst = Path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
        tmp.write_bytes(src.read_bytes())
        os.replace(tmp, dst)
    return f
