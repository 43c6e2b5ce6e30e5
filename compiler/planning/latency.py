"""Latency tables for the bit-width ILP: every weighted layer's kernel time at each bit-width,
measured on the target.  HAWQ-V3 (§3.4) budgets latency the same way: a per-layer lookup table
measured on the hardware, summed by the ILP.

The model is built once per bit-width with every layer at that width.  One inference through the
Relax VM, with its instrument hook, copies the arguments of each layer kernel's launch; each
kernel is then timed alone by TVM's ``time_evaluator``, round-robin over the builds so that the
machine's drift hits every width alike, and the median over rounds is kept.  A layer's latency at
b bits is its kernel's time in the b-bit build.  The requantize and whatever else fusion put in
that kernel are included; they cost the same at every width, so the ILP's trade-offs are exact
and its totals are the time spent in the layers' kernels.  Layers that share a kernel split its
time in proportion to their MACs.

Tables are cached as JSON under $LOWBIT_CACHE/latency, keyed by the model, target, shapes,
quantization options, widths and the compiler's own source.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from compiler.planning.bitplan import BITS, Layer
from runtime.artifact import Artifact
from runtime.errors import UserError
from runtime.io import cache_root

ROUNDS = 15
MIN_SAMPLE_MS = 1.0         # each timed sample repeats a kernel until it lasts this long
ROOT = Path(__file__).resolve().parents[2]         # the checkout: compiler/planning/latency.py
SOURCES = ("compiler", "passes", "codegen")


def _source_hash() -> str:
    """The compiler's own code: a table measured with other kernels is stale."""
    h = hashlib.sha256()
    for pkg in SOURCES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            h.update(f.relative_to(ROOT).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _launch_args(artifact: Artifact, feeds: Mapping[str, np.ndarray], kernels: set[str]) -> dict[str, list]:
    """Copies of the arguments each of ``kernels`` is launched with in one inference."""
    import tvm

    captured: dict[str, list] = {}

    def hook(func, symbol, before_run, ret_value, *args):
        if before_run and symbol in kernels and symbol not in captured:
            captured[symbol] = [tvm.runtime.tensor(a.numpy()) if hasattr(a, "numpy") else a for a in args]
        return 0                                            # VMInstrumentReturnKind.NO_OP

    artifact.vm.set_instrument(hook)
    artifact.run(feeds)
    artifact.vm.set_instrument(lambda *args: 0)
    missing = kernels - captured.keys()
    if missing:
        raise RuntimeError(f"kernels never launched in one inference: {', '.join(sorted(missing))}")
    return captured


def kernel_times(artifacts: Mapping[int, Artifact], feeds: Mapping[str, np.ndarray],
                 kernels: Mapping[int, set[str]], rounds: int = ROUNDS) -> dict[int, dict[str, float]]:
    """Median ms per launch of each build's ``kernels``, timed round-robin over the builds."""
    import tvm

    dev = tvm.cpu()
    timers = []
    for b, art in artifacts.items():
        args, lib = _launch_args(art, feeds, kernels[b]), art.kernel_library()
        for k in sorted(kernels[b]):
            once = lib.time_evaluator(k, dev, number=1, repeat=3)(*args[k]).median * 1e3
            number = max(1, int(MIN_SAMPLE_MS / max(once, 1e-6)))
            timers.append((b, k, lib.time_evaluator(k, dev, number=number, repeat=1), args[k]))
    samples: dict[tuple[int, str], list[float]] = {(b, k): [] for b, k, _, _ in timers}
    for r in range(rounds):
        for b, k, timer, args in timers[r % len(timers):] + timers[:r % len(timers)]:
            samples[b, k].append(timer(*args).mean * 1e3)
    out: dict[int, dict[str, float]] = {b: {} for b in artifacts}
    for (b, k), ms in samples.items():
        out[b][k] = float(np.median(ms))
    return out


def layer_kernels(artifact: Artifact, layers: Sequence[Layer]) -> list[str]:
    """The kernel computing each layer, from the manifest's per-layer weights (in graph order)."""
    weights = (artifact.manifest.quantization or {}).get("weights", [])
    kernels = [w.get("kernel") for w in weights]
    if not artifact.manifest.integer_only or len(kernels) != len(layers) or None in kernels:
        raise UserError(f"{artifact.manifest.model}: {len(kernels)} of {len(layers)} layers were lowered to "
                        "integer kernels of their own, so per-layer times cannot be measured; drop --latency-budget")
    return kernels


def measure(build: Callable[[int], Artifact], layers: Sequence[Layer], feeds: Mapping[str, np.ndarray],
            choices: Sequence[int] = BITS, rounds: int = ROUNDS) -> dict[str, dict[int, float]]:
    """layer name -> bits -> ms: each layer's share of its kernel's time in the all-b-bit build."""
    artifacts, owners = {}, {}
    for b in choices:                                   # a build without per-layer kernels stops it early
        artifacts[b] = build(b)
        owners[b] = layer_kernels(artifacts[b], layers)
    times = kernel_times(artifacts, feeds, {b: set(ks) for b, ks in owners.items()}, rounds)
    table: dict[str, dict[int, float]] = {layer.name: {} for layer in layers}
    for b, ks in owners.items():
        macs: dict[str, int] = {}
        for layer, k in zip(layers, ks, strict=True):
            macs[k] = macs.get(k, 0) + max(layer.macs, 1)
        for layer, k in zip(layers, ks, strict=True):
            table[layer.name][b] = times[b][k] * max(layer.macs, 1) / macs[k]
    return table


def cached(key: Mapping, compute: Callable[[], dict[str, dict[int, float]]]) -> dict[str, dict[int, float]]:
    """``compute()``'s table, or the one stored under ``key`` (plus the compiler's source hash)."""
    digest = hashlib.sha256(json.dumps({**key, "source": _source_hash()}, sort_keys=True,
                                       default=str).encode()).hexdigest()[:20]
    path = cache_root() / "latency" / f"{digest}.json"
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            return {name: {int(b): float(ms) for b, ms in row.items()} for name, row in stored["layers"].items()}
        except (ValueError, KeyError, AttributeError):
            pass                                            # a damaged entry is measured again
    table = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"key": dict(key), "layers": table}, indent=1, default=str))
    os.replace(tmp, path)
    return table


def sample_feeds(specs, calib: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One inference's inputs from the calibration data: a fixed batch as compiled, else one sample."""
    feeds = {}
    for spec in specs:
        data = np.asarray(calib[spec.name])
        n = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) else 1
        feeds[spec.name] = data[np.arange(n) % len(data)].astype(spec.dtype)
    return feeds


def digest_feeds(calib: Mapping[str, np.ndarray]) -> str:
    """The calibration data's identity, for the cache key: it sets the scales, hence the kernels."""
    h = hashlib.sha256()
    for name in sorted(calib):
        h.update(name.encode() + np.ascontiguousarray(calib[name]).tobytes())
    return h.hexdigest()[:16]
