"""Remote runs over TVM RPC, on loopback: an ``rpc_server`` (and an ``rpc_tracker``) started
here stands in for a board.  Outputs must be identical to the local run; an unreachable or
silent server must end in one line and exit 2 within the timeout, never hang."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from conftest import concat_cnn, run_cli
from test_vnni import _mlp

import compiler
from codegen import tune
from compiler.options import CompileOptions
from runtime.errors import UserError
from runtime.remote import Remote


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(*args, ready) -> subprocess.Popen:
    # a session of its own: stopping it stops the workers the server forks for each session too
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 90
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(f"{' '.join(args)} did not come up")
        time.sleep(0.5)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _listening(port):
    def ready():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False
    return ready


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    proc = _start("tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1),
                  ready=_listening(port))
    yield port
    _stop(proc)


@pytest.fixture(scope="module")
def tracker():
    """A tracker and one server registered with it under key ``lowbit-test``."""
    import tvm.rpc

    port = _free_port()
    trk = _start("tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1),
                 ready=_listening(port))

    def registered():
        try:
            return "lowbit-test" in tvm.rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"]
        except (OSError, RuntimeError):
            return False

    srv_port = _free_port()
    srv = _start("tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(srv_port), "--port-end", str(srv_port + 1),
                 "--tracker", f"127.0.0.1:{port}", "--key", "lowbit-test", ready=registered)
    yield port
    _stop(srv)
    _stop(trk)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    d = tmp_path_factory.mktemp("remote")
    onnx.save(concat_cnn(c=8), d / "cnn.onnx")
    rng = np.random.default_rng(1)
    np.savez(d / "calib.npz", x=rng.normal(size=(8, 8, 6, 6)).astype(np.float32))
    np.savez(d / "in.npz", x=rng.normal(size=(1, 8, 6, 6)).astype(np.float32))
    r = run_cli("compile", d / "cnn.onnx", "--calib", d / "calib.npz", "-o", d / "int8")
    assert r.returncode == 0, r.stderr
    r = run_cli("run", d / "int8", "--input", d / "in.npz", "-o", d / "local.npz")
    assert r.returncode == 0, r.stderr
    return d


def _same_as_local(d, out):
    local, remote = np.load(d / "local.npz"), np.load(out)
    assert list(local) == list(remote)
    for k in local:
        np.testing.assert_array_equal(remote[k], local[k])


def test_rpc_run_matches_local_run(artifact, server):
    r = run_cli("run", artifact / "int8", "--input", artifact / "in.npz", "-o", artifact / "rpc.npz",
                "--rpc", f"127.0.0.1:{server}")
    assert r.returncode == 0, r.stderr
    assert f"ran on RPC server 127.0.0.1:{server}" in r.stdout
    _same_as_local(artifact, artifact / "rpc.npz")


def test_tracker_run_matches_local_run(artifact, tracker):
    r = run_cli("run", artifact / "int8", "--input", artifact / "in.npz", "-o", artifact / "trk.npz",
                "--tracker", f"127.0.0.1:{tracker}", "--key", "lowbit-test")
    assert r.returncode == 0, r.stderr
    _same_as_local(artifact, artifact / "trk.npz")


def test_unreachable_server_exits_2_in_one_line(artifact):
    t0 = time.monotonic()
    r = run_cli("run", artifact / "int8", "--input", artifact / "in.npz", "-o", artifact / "x.npz",
                "--rpc", f"127.0.0.1:{_free_port()}", "--rpc-timeout", "3")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "unreachable" in r.stderr
    assert time.monotonic() - t0 < 60
    assert not (artifact / "x.npz").exists()


def test_silent_server_and_unknown_key_time_out(tracker):
    """A peer that accepts and never answers, and a tracker without a board for the key: the
    bounded waits, not TVM's (unbounded) ones, end them."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        for remote, what in ((Remote("127.0.0.1", silent.getsockname()[1], timeout_s=2), "no TVM RPC handshake"),
                             (Remote("127.0.0.1", tracker, key="nobody", timeout_s=2), "no free board")):
            t0 = time.monotonic()
            with pytest.raises(UserError, match=what):
                remote.connect()
            assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("flags, message", [
    ({"rpc": "board"}, "expected HOST:PORT"),
    ({"rpc": "h:1", "tracker": "h:2", "key": "k"}, "both given"),
    ({"tracker": "h:2"}, "--tracker needs --key"),
    ({"key": "k"}, "add --tracker"),
])
def test_bad_remote_flags(flags, message):
    with pytest.raises(UserError, match=message):
        Remote.from_flags(flags.get("rpc"), flags.get("tracker"), flags.get("key"))


def test_bench_over_rpc_times_lowbit_on_the_board(artifact, server):
    r = run_cli("bench", artifact / "cnn.onnx", "--calib", artifact / "calib.npz", "--threads", "1", "--seconds", "0.5",
                "--eval-samples", "2", "--rpc", f"127.0.0.1:{server}", "--json", artifact / "b.json", "-q")
    assert r.returncode == 0, r.stderr
    res, = json.loads((artifact / "b.json").read_text())
    assert res["where"] == f"RPC server 127.0.0.1:{server}" and res["reference"] == "lowbit-fp32"
    rows = {row["name"]: row for row in res["rows"]}
    assert set(rows) == {"lowbit-int8", "lowbit-fp32"} and rows["lowbit-int8"]["cosine"] > 0.99
    assert all(row["median_ms"] > 0 for row in rows.values())


def test_tuning_measures_on_the_trackers_boards(tracker, tmp_path, monkeypatch):
    """meta_schedule's RPC runner takes the board from the tracker: the search's candidates and
    lowbit's own schedule are both timed there."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    calib = {"x": np.random.default_rng(3).normal(size=(8, 64)).astype(np.float32)}
    opts = CompileOptions(calib=calib, tune=2, input_shapes={"x": (2, 64)})
    art = compiler.compile(_mlp(lead=(2,)), options=opts, remote=Remote("127.0.0.1", tracker, key="lowbit-test"))
    assert art.manifest.tuning["measured"] > 0 and art.manifest.tuning["searched"] == art.manifest.tuning["kernels"]
    verdicts = tune.verdicts(art.manifest.target)
    # every kernel's own schedule is timed on the board; of two random candidates per kernel, one
    # may fail to build or run on a loaded machine (a kernel then keeps lowbit's schedule)
    assert verdicts and all(v["ours_us"] is not None for v in verdicts.values())
    assert any(v["tuned_us"] is not None for v in verdicts.values())
