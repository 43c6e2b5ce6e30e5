"""Running and timing an artifact on a remote board through TVM RPC.

The board runs TVM's runtime and ``python -m tvm.exec.rpc_server``; lowbit uploads the
artifact's library, loads it there in a Relax VM, and sends inputs over.  With a tracker
(``python -m tvm.exec.rpc_tracker``) boards register under a key and each session takes a free
one, which is how runs and tuning measurements spread over a fleet.

Every network step is bounded by ``timeout_s``: a host that refuses, drops packets, or accepts
and never answers the handshake (or a tracker with no free board for the key) ends in one
``UserError`` line, never a hang.
"""

from __future__ import annotations

import itertools
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from runtime.errors import UserError
from runtime.io import check_inputs

T = TypeVar("T")
_uploads = itertools.count()
DEFAULT_TIMEOUT_S = 15.0


def parse_address(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{flag} {text!r}: expected HOST:PORT, e.g. 192.168.1.20:9090")
    return host, int(port)


@dataclass(frozen=True)
class Remote:
    """Where to run: an RPC server (``key`` None) or a tracker and the key of its boards."""
    host: str
    port: int
    key: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def from_flags(cls, rpc: str | None, tracker: str | None, key: str | None,
                   timeout_s: float = DEFAULT_TIMEOUT_S) -> Remote | None:
        """``--rpc HOST:PORT`` or ``--tracker HOST:PORT --key KEY`` (or neither: None)."""
        if rpc and tracker:
            raise UserError("--rpc and --tracker both given; a run goes to one server, or through one tracker")
        if tracker and not key:
            raise UserError("--tracker needs --key: the key the boards registered with (rpc_server --key KEY)")
        if key and not tracker:
            raise UserError("--key names boards registered with a tracker; add --tracker HOST:PORT")
        if rpc:
            return cls(*parse_address(rpc, "--rpc"), timeout_s=timeout_s)
        if tracker:
            return cls(*parse_address(tracker, "--tracker"), key=key, timeout_s=timeout_s)
        return None

    def describe(self) -> str:
        return f"tracker {self.host}:{self.port} key {self.key}" if self.key else f"RPC server {self.host}:{self.port}"

    def connect(self):
        """An RPC session with a board, within ``timeout_s``."""
        try:                                # TVM retries a refused connect for a minute; ask once, bounded
            socket.create_connection((self.host, self.port), timeout=self.timeout_s).close()
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            raise UserError(f"{self.describe()}: unreachable ({why}); start one with python -m tvm.exec."
                            f"{'rpc_tracker' if self.key else 'rpc_server'} --host 0.0.0.0 --port {self.port}, "
                            "or check the address") from None
        import tvm.rpc

        if self.key:
            what = f"no free board with key {self.key!r}"
            return _bounded(lambda: tvm.rpc.connect_tracker(self.host, self.port).request(self.key, max_retry=1),
                            self.timeout_s, f"{self.describe()}: {what}")
        return _bounded(lambda: tvm.rpc.connect(self.host, self.port), self.timeout_s,
                        f"{self.describe()}: no TVM RPC handshake")

    def load(self, artifact, session=None) -> RemoteModel:
        """Upload ``artifact``'s library and load it in a VM on the board, in ``session`` or a new
        one (an RPC server serves one session at a time: load several artifacts in one)."""
        session = session or self.connect()
        # unique per upload: a board's server keeps loaded libraries by path
        name = f"lowbit-{artifact.manifest.model_sha256[:12]}-{os.getpid()}-{next(_uploads)}.so"
        with tempfile.TemporaryDirectory() as tmp:
            library = artifact.library_file(Path(tmp))
            _bounded(lambda: session.upload(str(library), name), 10 * self.timeout_s,
                     f"{self.describe()}: uploading {library.name}")
        try:
            module = session.load_module(name)
        except Exception as exc:            # noqa: BLE001 - the board's loader error, shortened
            arch = artifact.manifest.target.get("mtriple", "this machine's architecture")
            raise UserError(f"{self.describe()}: the board could not load the library built for {arch} "
                            f"({str(exc).strip().splitlines()[-1]}); compile with the board's --target") from None
        return RemoteModel(artifact.manifest, session, module)


class RemoteModel:
    """An artifact loaded on a board: ``run`` like ``Artifact.run``, ``time_ms`` by the board's clock."""

    def __init__(self, manifest, session, module):
        from tvm import relax

        self.manifest = manifest
        self.session = session
        self.device = session.cpu()
        self.vm = relax.VirtualMachine(module, self.device)
        self._timers: dict[tuple[int, int], Callable[[], float]] = {}

    def _args(self, inputs):
        import tvm


        feeds = check_inputs(inputs, self.manifest.inputs, where="inputs")
        return [tvm.runtime.tensor(feeds[s.name], self.device) for s in self.manifest.inputs]

    def run(self, inputs: Mapping[str, np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        out = self.vm["main"](*self._args(inputs))
        outs = list(out) if not hasattr(out, "numpy") else [out]
        return {s.name: o.numpy() for s, o in zip(self.manifest.outputs, outs, strict=True)}

    __call__ = run                          # a bench runner: outputs from inputs, and time_ms

    def time_ms(self, inputs: Mapping[str, np.ndarray], calls: int) -> float:
        """Milliseconds per call of ``calls`` back-to-back runs on the board: the network round
        trip is outside the measurement."""
        key = (id(inputs), calls)
        if key not in self._timers:
            args = self._args(inputs)
            timer = self.vm.time_evaluator("main", self.device, number=calls, repeat=1)
            self._timers[key] = lambda: timer(*args).mean * 1e3
        return self._timers[key]()


def stuck() -> bool:
    """Whether a bounded call gave up on a TVM socket call that still blocks: the interpreter
    cannot finish such a thread, so the CLI exits without waiting for it."""
    return any(t.name == THREAD and t.is_alive() for t in threading.enumerate())


THREAD = "lowbit-rpc"


def _bounded(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """``fn()``, or a ``UserError`` naming ``what`` once ``timeout_s`` passes.  TVM's socket calls
    cannot be interrupted, so a call that hangs is left in a daemon thread."""
    box: dict = {}

    def call():
        try:
            box["value"] = fn()
        except BaseException as exc:        # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=call, daemon=True, name=THREAD)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise UserError(f"{what}: no answer within {timeout_s:g} s (--rpc-timeout)")
    if "error" in box:
        exc = box["error"]
        raise UserError(f"{what}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}") \
            from None
    return box["value"]
