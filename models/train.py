"""Training and data-dependent initialization for the zoo models."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.data import LabeledSet
from runtime.progress import bar


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    lr: float
    batch: int = 64
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    max_shift: int = 2          # augmentation: random translation in pixels (16x16 images)
    noise: float = 0.15         # augmentation: Gaussian noise std


def _augment(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    if cfg.max_shift:
        pad = cfg.max_shift
        padded = nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0)
        dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
        x = padded[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]
    if cfg.noise:
        x = x + cfg.noise * torch.randn(x.shape, generator=gen)
    return x


def train_classifier(model: nn.Module, data: LabeledSet, cfg: TrainConfig, seed: int, desc: str) -> nn.Module:
    """AdamW with a one-cycle schedule, on one thread: torch's reductions split by thread count, so
    the weights would differ from machine to machine (and pytest's parallel workers would contend
    for the cores); the models are small enough that threads gain little."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(model, data, cfg, seed, desc)
    finally:
        torch.set_num_threads(threads)


def _train(model: nn.Module, data: LabeledSet, cfg: TrainConfig, seed: int, desc: str) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    steps_per_epoch = (len(x) + cfg.batch - 1) // cfg.batch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    model.train()
    for _ in bar(range(cfg.epochs), desc=desc):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), cfg.batch):
            idx = order[i : i + cfg.batch]
            loss = loss_fn(model(_augment(x[idx], cfg, gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def calibrate_batchnorm(model: nn.Module, samples: np.ndarray, batch: int = 8) -> nn.Module:
    """Set BatchNorm running statistics from data (cumulative average over ``samples``).

    Seeded random weights with BN's default mean 0 / var 1 make activations
    explode or vanish with depth; matching the statistics to realistic inputs
    gives the benchmark models realistic activation ranges to quantize.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(samples), batch):
            model(torch.from_numpy(samples[i : i + batch]))
    return model.eval()
