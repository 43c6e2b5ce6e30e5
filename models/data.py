"""Datasets for the zoo: scikit-learn's digits (real data) and synthetic inputs
with realistic statistics for the benchmark architectures.

Everything is a pure function of a seed, so a recipe hash pins the data too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

DIGITS_SIZE = 16        # 8x8 digits upscaled 2x: enough room for two stride-2 stages / 4x4 patches
SPLIT_SEED = 0
PERTURB_SEED = 1234


@dataclass(frozen=True)
class LabeledSet:
    x: np.ndarray       # float32, (N, 1, 16, 16), values in [-1, 1] before noise
    y: np.ndarray       # int64, (N,)


def _upscale(images8: np.ndarray) -> np.ndarray:
    """(N, 8, 8) in [0, 16] -> (N, 1, 16, 16) in [-1, 1], bilinear."""
    up = ndimage.zoom(images8.astype(np.float32) / 16.0, (1, DIGITS_SIZE / 8, DIGITS_SIZE / 8), order=1)
    return (up * 2.0 - 1.0)[:, None].astype(np.float32)


def _split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    return train_test_split(d.images, d.target, test_size=0.2, stratify=d.target, random_state=SPLIT_SEED)


def digits(split: str) -> LabeledSet:
    """``train`` (1437 images), ``test`` (360) or ``perturbed`` (the test set shifted and noised)."""
    xtr, xte, ytr, yte = _split()
    if split == "train":
        return LabeledSet(_upscale(xtr), ytr.astype(np.int64))
    if split == "test":
        return LabeledSet(_upscale(xte), yte.astype(np.int64))
    if split == "perturbed":
        return LabeledSet(perturb(xte, np.random.default_rng(PERTURB_SEED)), yte.astype(np.int64))
    raise ValueError(f"unknown digits split {split!r}")


def perturb(images8: np.ndarray, rng: np.random.Generator, noise: float = 0.25) -> np.ndarray:
    """Shift each 8x8 image by up to one pixel (zero fill), upscale, add Gaussian noise.

    The clean test set saturates near 100%, so agreement between precisions is
    measured on these harder inputs, where decisions sit closer to boundaries.
    """
    shifted = np.zeros_like(images8)
    for i, img in enumerate(images8):
        dy, dx = rng.integers(-1, 2, size=2)
        shifted[i] = ndimage.shift(img, (dy, dx), order=0, mode="constant", cval=0.0)
    up = _upscale(shifted)
    return (up + rng.normal(0.0, noise, size=up.shape)).astype(np.float32)


def smooth_images(rng: np.random.Generator, n: int, channels: int, size: int) -> np.ndarray:
    """Natural-image-like tensors: a few octaves of upsampled noise (a 1/f-ish spectrum),
    normalized like ImageNet inputs, so activations have realistic spatial correlation."""
    out = np.zeros((n, channels, size, size), np.float32)
    for octave, weight in ((4, 1.0), (16, 0.5), (size, 0.2)):
        coarse = rng.normal(size=(n, channels, octave, octave)).astype(np.float32)
        out += weight * ndimage.zoom(coarse, (1, 1, size / octave, size / octave), order=1)
    out += rng.normal(0.0, 0.1, size=(1, channels, 1, 1)).astype(np.float32)  # per-channel colour cast
    return out / out.std()


def mfcc_like(rng: np.random.Generator, n: int, frames: int = 49, coeffs: int = 10) -> np.ndarray:
    """(n, 1, frames, coeffs): MFCC-like features, energy decaying over the coefficients and
    smooth over time (what the DS-CNN keyword spotter sees)."""
    scale = 1.0 / (1.0 + np.arange(coeffs, dtype=np.float32))
    x = rng.normal(size=(n, 1, frames, coeffs)).astype(np.float32)
    x = ndimage.uniform_filter1d(x, size=3, axis=2) * scale * 3.0
    return x.astype(np.float32)


def log_mel_frames(rng: np.random.Generator, n: int, features: int = 640, mels: int = 128) -> np.ndarray:
    """(n, 640): five stacked 128-bin log-mel frames, smooth across bins, as the MLPerf Tiny
    anomaly detection autoencoder consumes them."""
    frames = features // mels
    base = ndimage.uniform_filter1d(rng.normal(size=(n, 1, mels)), size=9, axis=2) * 3.0
    x = base + 0.3 * rng.normal(size=(n, frames, mels))
    return x.reshape(n, features).astype(np.float32)


# --- real photos, shipped offline in the scikit-image and scikit-learn wheels ------------------------------

# skimage.data's colour images that need no download, and sklearn's two sample images
_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field",
                   "immunohistochemistry", "retina", "colorwheel")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def photos() -> list[np.ndarray]:
    """The offline colour photos as (H, W, 3) uint8 arrays, in a fixed order."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = [getattr(skimage.data, name)()[..., :3] for name in _SKIMAGE_PHOTOS]
    return out + list(load_sample_images().images)


def photo_crops(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(n, 3, size, size) float32: random square crops (30-100% of the short side, random
    position and horizontal flip) of the offline photos, resized bilinearly and normalized with
    ImageNet's mean and std, as torchvision's and HF's image processors feed a classifier."""
    images = photos()
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        img = images[rng.integers(len(images))]
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.3, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = img[y : y + side, x : x + side].astype(np.float32) / 255.0
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = ndimage.zoom(crop, (size / side, size / side, 1), order=1)[:size, :size]
        out[i] = ((crop - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    return out


def token_batch(rng: np.random.Generator, n: int, seq: int, vocab: int, cls: int = 101, sep: int = 102,
                pad: int = 0) -> dict[str, np.ndarray]:
    """BERT-style inputs: ``input_ids`` of [CLS] tokens... [SEP] then padding, with lengths drawn from
    a quarter to all of ``seq``, and the matching ``attention_mask`` (int64, as tokenizers return)."""
    ids = np.full((n, seq), pad, np.int64)
    mask = np.zeros((n, seq), np.int64)
    for i in range(n):
        length = int(rng.integers(max(3, seq // 4), seq + 1))
        ids[i, 0], ids[i, length - 1] = cls, sep
        ids[i, 1 : length - 1] = rng.integers(1000, vocab, size=length - 2)
        mask[i, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}
