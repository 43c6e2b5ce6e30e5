"""Compile options, shared by the CLI and the Python API."""

from __future__ import annotations

from dataclasses import dataclass, field

from compiler.errors import UserError

TARGETS = ("llvm",)


@dataclass(frozen=True)
class CompileOptions:
    target: str = "llvm"
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self):
        if self.target not in TARGETS:
            raise UserError(f"unknown target {self.target!r}; choose one of: {', '.join(TARGETS)}")


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``name=1,3,224,224`` -> ("name", (1, 3, 224, 224))."""
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d <= 0 for d in shape):
        raise UserError(f"--input-shape {text!r}: expected NAME=D1,D2,... with positive integers, e.g. input=1,3,224,224")
    return name, shape
