"""Running a TOSA artifact: its ``.vmfb`` on IREE's runtime (local-task), the host quantizing the
inputs and dequantizing the outputs with the boundary parameters in the manifest."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np

from runtime.errors import UserError
from runtime.runner import Runner
from runtime.types import BoundaryTensor

# TOSA's integer tensors are signed: an unsigned boundary tensor crosses as its signed view, value - 2^(b-1)
SIGNED_VIEW = {"uint8": ("int8", 128), "uint16": ("int16", 32768)}


def to_view(q: np.ndarray) -> np.ndarray:
    signed, off = SIGNED_VIEW.get(str(q.dtype), (None, 0))
    return q if signed is None else (q.astype(np.int32) - off).astype(signed)


def from_view(q: np.ndarray, dtype: str) -> np.ndarray:
    _, off = SIGNED_VIEW.get(dtype, (None, 0))
    return q if not off else (q.astype(np.int32) + off).astype(dtype)


class Iree(Runner):
    def __init__(self):
        self._contexts = weakref.WeakKeyDictionary()    # a fresh build's module, loaded once

    def load(self, directory: Path, manifest, driver: str = "local-task"):
        import iree.runtime as rt

        ctx = rt.SystemContext(config=rt.Config(driver))
        ctx.add_vm_module(rt.VmModule.copy_buffer(ctx.instance, (directory / manifest.build["module"]).read_bytes()))
        return ctx

    def context(self, artifact):
        if artifact._module is not None:
            return artifact._module
        if artifact not in self._contexts:
            self._contexts[artifact] = self.load(artifact.directory(), artifact.manifest)
        return self._contexts[artifact]

    def run(self, artifact, feeds: list[np.ndarray]) -> list[np.ndarray]:
        return self.run_on(self.context(artifact), artifact.manifest, feeds)

    def run_on(self, ctx, manifest, feeds: list[np.ndarray]) -> list[np.ndarray]:
        """Quantize ``feeds``, run the module in ``ctx`` (one call per sample of the build's batch),
        dequantize the outputs."""
        block = manifest.build
        ins = [BoundaryTensor.from_dict(d) for d in block["inputs"]]
        outs = [BoundaryTensor.from_dict(d) for d in block["outputs"]]
        qs = []
        for t, x in zip(ins, feeds, strict=True):
            x = np.asarray(x)
            if x.shape[1:] != t.shape[1:] or x.shape[0] % t.shape[0]:
                raise UserError(f"input {t.name!r}: shape {x.shape}, the TOSA build takes {t.shape} (any multiple "
                                "of its batch)")
            qs.append(to_view(t.quantize(x)))
        # the module takes the batch it was compiled for: the samples go through it that many at a time
        step = ins[0].shape[0]
        got = [_call(ctx, [q[i:i + step] for q in qs]) for i in range(0, len(qs[0]), step)]
        return [t.dequantize(from_view(np.concatenate([g[k] for g in got]), t.dtype)) for k, t in enumerate(outs)]


def _call(ctx, qs: list[np.ndarray]) -> list[np.ndarray]:
    out = ctx.modules.module.main(*qs)
    return [np.asarray(o.to_host()) for o in (out if isinstance(out, (list, tuple)) else [out])]


def timing_runner(artifact, threads: int):
    """``feeds -> outputs`` on a context of its own for ``lowbit bench``: IREE's local-sync driver
    (the caller's thread) for one thread, local-task (a worker per core; IREE fixes its task
    topology when the driver is first made, once per process) for more."""
    m = artifact.manifest
    ctx = RUNNER.load(artifact.directory(), m, "local-sync" if threads == 1 else "local-task")
    names = [s.name for s in m.inputs]
    return lambda feeds: dict(zip([s.name for s in m.outputs], RUNNER.run_on(ctx, m, [feeds[n] for n in names]),
                                  strict=True))


RUNNER = Iree()
