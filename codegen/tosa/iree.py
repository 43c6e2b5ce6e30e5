"""IREE, the compiler and runtime of the TOSA target (iree-base-compiler / iree-base-runtime 3.13,
pinned: the TOSA text format changed incompatibly in 2025, iree-org/iree#19777)."""

from __future__ import annotations

import importlib.util

from runtime.errors import UserError

HOST = "host"           # llvm-cpu for this machine's CPU; otherwise an LLVM target triple


def require() -> None:
    if importlib.util.find_spec("iree.compiler") is None:
        raise UserError("the tosa target needs IREE: pip install iree-base-compiler==3.13.0 "
                        "iree-base-runtime==3.13.0 (make setup does)")


def flags(target: str) -> list[str]:
    """iree-compile's flags for ``--iree-target``: ``host`` or a triple such as aarch64-linux-gnu."""
    if target == HOST:
        return ["--iree-llvmcpu-target-cpu=host"]
    if target.count("-") < 2 or " " in target:
        raise UserError(f"--iree-target {target}: give 'host' or an LLVM target triple, e.g. aarch64-linux-gnu")
    return [f"--iree-llvmcpu-target-triple={target}"]


def compile_tosa(text: str, target: str, source: str) -> bytes:
    from iree.compiler.tools import CompilerToolError, compile_str

    try:
        return compile_str(text, input_type="tosa", target_backends=["llvm-cpu"], extra_args=flags(target))
    except CompilerToolError as exc:
        first = next((ln for ln in str(exc).splitlines() if "error:" in ln), str(exc).splitlines()[0])
        raise UserError(f"{source}: iree-compile refused the TOSA lowbit wrote ({first.strip()}); "
                        "this is a lowbit bug, please report it with the model") from None
