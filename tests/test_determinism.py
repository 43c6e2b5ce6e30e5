"""Determinism: the same model and options give byte-identical artifacts, also from another
process (another hash seed, another TVM thread count, another working directory), and a compiled
integer model gives bit-identical outputs run after run, with one TVM thread and with two.

The manifest records no timestamp, path or host, so every file of an artifact, the
manifest included, is compared whole."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, concat_cnn, mlp_model

import compiler
import runtime
from compiler.options import CompileOptions
from runtime.threads import set_tvm_threads

BUILDS = ("mlp fp32 llvm", "cnn int8 llvm", "cnn int8 rv32")


def _builds() -> dict[str, tuple]:
    calib = {"x": np.random.default_rng(0).normal(size=(16, 4, 6, 6)).astype(np.float32)}
    return {"mlp fp32 llvm": (mlp_model(), CompileOptions()),
            "cnn int8 llvm": (concat_cnn(), CompileOptions(calib=calib)),
            "cnn int8 rv32": (concat_cnn(), CompileOptions(target="rv32", calib=calib))}


INTEGER = "cnn int8 llvm"
RUNS = 3


def save_builds(outdir: str, rv32: bool) -> None:
    """Compile and save every build into ``outdir``/NAME (also run in a second process)."""
    for name, (model, options) in _builds().items():
        if rv32 or options.target != "rv32":
            compiler.compile(model, options=options).save(Path(outdir) / name)


def integer_outputs(outdir: str) -> list[np.ndarray]:
    """The integer build's outputs on one batch, RUNS times."""
    x = np.random.default_rng(1).normal(size=(32, 4, 6, 6)).astype(np.float32)
    art = runtime.load(Path(outdir) / INTEGER)
    return [art.run({"x": x})["y"] for _ in range(RUNS)]


@contextlib.contextmanager
def one_thread():
    """This process's TVM pool at one thread (a started pool can shrink, not grow), as bench
    re-sizes it, and as it was afterwards."""
    import tvm

    num_threads, env = tvm.get_global_func("runtime.NumThreads"), os.environ.get("TVM_NUM_THREADS")
    before = num_threads()
    set_tvm_threads(1)
    assert num_threads() == 1
    try:
        yield
    finally:
        set_tvm_threads(before)
        if env is None:                 # set_tvm_threads writes the variable
            del os.environ["TVM_NUM_THREADS"]
        else:
            os.environ["TVM_NUM_THREADS"] = env


# run from another directory, so nothing may depend on the working directory either
SECOND_PROCESS = """
import sys
sys.path.insert(0, {tests!r})
import numpy as np, tvm
import test_determinism as t
t.save_builds(sys.argv[1], {rv32!r})
np.savez(sys.argv[1] + "/outputs.npz", *t.integer_outputs(sys.argv[1]))
print(tvm.get_global_func("runtime.NumThreads")(), hash("lowbit"))
"""


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """(this process's artifacts, built with one TVM thread; a second process's, with another
    PYTHONHASHSEED and TVM_NUM_THREADS=2, which runs the integer build too: outputs.npz)."""
    from codegen.rv32 import toolchain

    rv32 = toolchain.missing() is None
    here, there = tmp_path_factory.mktemp("here"), tmp_path_factory.mktemp("there")
    with one_thread():
        save_builds(str(here), rv32)
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    env = {**os.environ, "PYTHONHASHSEED": seed, "TVM_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-c", SECOND_PROCESS.format(tests=str(ROOT / "tests"), rv32=rv32),
                        str(there)], capture_output=True, text=True, env=env, cwd=there, timeout=600)
    assert r.returncode == 0, r.stderr
    threads, hashed = map(int, r.stdout.split()[-2:])
    assert threads == 2, "the second process's TVM pool did not take TVM_NUM_THREADS=2"
    assert hashed != hash("lowbit"), "the second process hashed strings as this one does"
    return here, there


@pytest.mark.parametrize("build", BUILDS)
def test_two_compiles_are_byte_identical(artifacts, build, request):
    if build.endswith("rv32"):
        request.getfixturevalue("rv32_toolchain")
    here, there = (d / build for d in artifacts)
    files = sorted(p.name for p in here.iterdir())
    assert files == sorted(p.name for p in there.iterdir())
    assert "manifest.json" in files and len(files) >= 2
    for name in files:
        assert (here / name).read_bytes() == (there / name).read_bytes(), f"{build}: {name} differs"
    manifest = json.loads((here / "manifest.json").read_text())
    assert str(here) not in json.dumps(manifest) and str(there) not in json.dumps(manifest)


def test_integer_outputs_are_bit_identical_across_runs_and_thread_counts(artifacts):
    """Two threads: the second process's runs (its pool sized by TVM_NUM_THREADS, as
    runtime/threads.configure_threads does); one thread: this process's."""
    here, there = artifacts
    art = runtime.load(here / INTEGER)
    assert art.manifest.integer_only
    # its kernels split their loops over TVM's thread pool, so the pool size reaches the arithmetic
    assert b"__TVMBackendParallelLaunch" in (here / INTEGER / art.manifest.library).read_bytes()
    with one_thread():
        one = integer_outputs(str(here))
    with np.load(there / "outputs.npz") as z:
        two = [z[k] for k in z.files]
    assert len(one) == len(two) == RUNS
    for y in one + two:
        np.testing.assert_array_equal(y, one[0])
