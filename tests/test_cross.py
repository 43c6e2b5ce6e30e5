"""--target aarch64-linux: LLVM's AArch64 object code linked by Debian's cross gcc into a library
TVM's runtime on an Arm board loads.  The ELF must say AArch64; this x86 machine must refuse to run
it with one line instead of failing in dlopen; a missing cross toolchain names its apt packages.
``make test`` installs the toolchain (scripts/install-toolchain.sh), so nothing here skips: without
it the compile fails with that one line."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import onnx
import pytest
from conftest import concat_cnn, run_cli

import compiler
from codegen import llvm
from compiler.options import CompileOptions
from runtime.errors import UserError

EM_AARCH64 = 183          # ELF e_machine


def _elf_machine(path) -> int:
    head = open(path, "rb").read(20)
    assert head[:4] == b"\x7fELF" and head[4] == 2, "not a 64-bit ELF"   # EI_CLASS 2: ELFCLASS64
    return struct.unpack("<H", head[18:20])[0]


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    d = tmp_path_factory.mktemp("cross")
    onnx.save(concat_cnn(c=8), d / "cnn.onnx")
    np.savez(d / "calib.npz", x=np.random.default_rng(0).normal(size=(8, 8, 6, 6)).astype(np.float32))
    return d


def test_aarch64_artifact_links_and_is_an_aarch64_elf(cnn):
    out = cnn / "a64"
    r = run_cli("compile", cnn / "cnn.onnx", "--calib", cnn / "calib.npz", "--target", "aarch64-linux", "-o", out)
    assert r.returncode == 0, r.stderr
    assert _elf_machine(out / "model.so") == EM_AARCH64
    r = run_cli("inspect", out)
    assert r.returncode == 0, r.stderr
    assert '"mtriple": "aarch64-linux-gnu"' in r.stdout and "+dotprod" in r.stdout
    assert "integer-only: yes" in r.stdout
    np.savez(cnn / "in.npz", x=np.zeros((1, 8, 6, 6), np.float32))
    r = run_cli("run", out, "--input", cnn / "in.npz", "-o", cnn / "out.npz")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "aarch64-linux-gnu" in r.stderr and "--rpc" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (cnn / "out.npz").exists()


def test_board_cpu_picks_features():
    assert llvm.target_dict("aarch64-linux", None)["mattr"] == ["+neon", "+dotprod"]
    assert llvm.target_dict("aarch64-linux", "cortex-a72") == {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                                               "mcpu": "cortex-a72"}
    with pytest.raises(UserError, match="not a CPU LLVM knows for aarch64-linux"):
        CompileOptions(target="aarch64-linux", target_options={"mcpu": "haswell"})
    with pytest.raises(UserError, match="unknown target 'riscv'"):
        CompileOptions(target="riscv")


def test_missing_cross_toolchain_names_the_packages(cnn, monkeypatch):
    gone = dataclasses.replace(llvm.CROSS["aarch64-linux"], linker="no-such-aarch64-gcc")
    monkeypatch.setitem(llvm.CROSS, "aarch64-linux", gone)
    with pytest.raises(UserError, match="apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross"):
        compiler.compile(cnn / "cnn.onnx", options=CompileOptions(target="aarch64-linux"))
