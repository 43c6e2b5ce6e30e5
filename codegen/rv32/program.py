"""The ahead-of-time call sequence of a fused integer model, and the C project that runs it.

``main`` after fusion is a straight line of ``call_tir`` bindings (and reshapes, which are views).
``Program.of`` turns it into calls over named tensors: the input and output pointers the caller
passes, constant arrays in flash, and arena tensors the static memory planner places (a reshape
shares its source's bytes; the tensor the result is, or is a view of, lives in the caller's output
buffer).  ``header``, ``model_c`` and ``main_c`` render model.h, model.c and the semihosting harness.
microTVM's AOT executor did this on Relay (``tvmgen_<mod>_run``); TVM 0.27 has nothing of it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace

import numpy as np
import tvm
from tvm import relax

from codegen.memory_plan import MemoryPlan, Tensor
from codegen.rv32.kernels import Scratch
from runtime.types import BoundaryTensor

CTYPES = {"int8": "int8_t", "uint8": "uint8_t", "int16": "int16_t", "uint16": "uint16_t", "int32": "int32_t",
          "uint32": "uint32_t", "int64": "int64_t", "uint64": "uint64_t", "bool": "int8_t"}


class ProgramError(ValueError):
    pass


@dataclass(frozen=True)
class Buffer:
    """A tensor of the call sequence.  ``home``: "input", "output", "const" or "arena", or "view"
    for a reshape, which names the buffer whose bytes it reads (``base``)."""
    name: str
    dtype: str
    nbytes: int
    home: str
    base: str | None = None


@dataclass(frozen=True)
class Call:
    kernel: str
    args: tuple[str, ...]       # buffer names, the output last, then the kernel's scratch
    macs: int = 0


@dataclass
class Program:
    name: str                               # C identifier: lowbit_<name>_run
    inputs: list[BoundaryTensor]
    outputs: list[BoundaryTensor]
    buffers: dict[str, Buffer]
    constants: dict[str, np.ndarray]
    calls: list[Call]
    param_types: dict[str, list[str]]       # kernel -> C types of its parameters (tensors, then scratch)
    inplace: dict[str, str]                 # output -> the input it may overwrite (the planner decides)

    @classmethod
    def of(cls, name: str, main: relax.Function, inputs: list[BoundaryTensor], outputs: list[BoundaryTensor],
           scratch: dict[str, tuple[Scratch, ...]], macs: dict[str, int],
           in_place: dict[str, list[int]] | None = None) -> Program:
        buffers: dict[str, Buffer] = {}
        constants: dict[str, np.ndarray] = {}
        const_names: dict[tuple, str] = {}
        env: dict = {}
        for p, t in zip(main.params, inputs, strict=True):
            buffers[t.name] = Buffer(t.name, t.dtype, _nbytes(t.shape, t.dtype), "input")
            env[p] = t.name
        calls: list[Call] = []
        inplace: dict[str, str] = {}
        param_types: dict[str, list[str]] = {}
        def arg(a) -> str:
            if isinstance(a, tvm.ir.GenericConst):
                arr = a.value.numpy()
                key = (str(arr.dtype), arr.shape, hashlib.sha256(arr.tobytes()).hexdigest())   # equal data: one copy
                if key not in const_names:
                    const_names[key] = f"c{len(const_names)}"
                    constants[const_names[key]] = arr
                    buffers[const_names[key]] = Buffer(const_names[key], str(arr.dtype), arr.nbytes, "const")
                return const_names[key]
            if a in env:
                return env[a]
            raise ProgramError(f"argument {a} of a kernel call is neither a constant nor an earlier tensor")

        for block in main.body.blocks:
            for b in block.bindings:
                v, var = b.value, b.var
                ty = var.ty
                if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name == "relax.call_tir":
                    kernel = v.args[0].name_hint
                    args = [arg(a) for a in v.args[1].fields]
                    out = env[var] = var.name
                    buffers[out] = Buffer(out, str(ty.dtype), _nbytes(_shape(ty), str(ty.dtype)), "arena")
                    extra = []
                    for i, s in enumerate(scratch.get(kernel, ())):
                        sname = f"{out}_scratch{i}"
                        buffers[sname] = Buffer(sname, s.dtype, s.bytes, "arena")
                        extra.append(sname)
                    calls.append(Call(kernel, (*args, out, *extra), macs.get(kernel, 0)))
                    for i in (in_place or {}).get(kernel, []):
                        src = buffers[args[i]].base or args[i]
                        if buffers[src].home == "arena":
                            inplace.setdefault(out, src)
                    param_types.setdefault(kernel, [CTYPES[buffers[x].dtype] for x in (*args, out, *extra)])
                elif isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name == "relax.reshape":
                    src = arg(v.args[0])
                    buffers[var.name] = Buffer(var.name, str(ty.dtype), buffers[src].nbytes, "view",
                                               buffers[src].base or src)
                    env[var] = var.name
                elif isinstance(v, relax.Var) and v in env:
                    env[var] = env[v]
                else:
                    what = v.op.name if isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) else type(v).__name__
                    raise ProgramError(f"{what} in the call sequence has no microcontroller lowering")
        # the result (or the tensor it is a view of) is written straight into the caller's buffer
        result = main.body.body
        for r in list(result.fields) if isinstance(result, relax.Tuple) else [result]:
            root = buffers[env[r]].base or env[r]
            if buffers[root].home != "arena":
                raise ProgramError(f"the output is the model's {buffers[root].home} itself; nothing to compute")
            buffers[root] = replace(buffers[root], home="output")
            inplace.pop(root, None)
        return cls(_c_name(name), inputs, outputs, buffers, constants, calls, param_types, inplace)

    def lifetimes(self) -> list[Tensor]:
        """The arena tensors with the steps that write and last read them (views count as reads
        of their base)."""
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        for step, call in enumerate(self.calls):
            for a in call.args:
                root = self.buffers[a].base or a
                if self.buffers[root].home != "arena":
                    continue
                first.setdefault(root, step)
                last[root] = step
        return [Tensor(n, self.buffers[n].nbytes, first[n], last[n]) for n in first]

    def weight_bytes(self) -> int:
        return sum(a.nbytes for a in self.constants.values())

    def macs(self) -> int:
        return sum(c.macs for c in self.calls)


def _shape(ty) -> tuple[int, ...]:
    return tuple(int(d) for d in ty.shape.values)


def _nbytes(shape, dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * max(1, tvm.DataType(dtype).bits // 8)


def _c_name(name: str) -> str:
    ident = re.sub(r"\W", "_", name).strip("_").lower() or "model"
    return ident if not ident[0].isdigit() else f"m_{ident}"


# ------------------------------------------------------------------------------------------
# C rendering
# ------------------------------------------------------------------------------------------

def _array(name: str, arr: np.ndarray) -> str:
    ctype = CTYPES[str(arr.dtype)]
    flat = arr.reshape(-1)
    if arr.dtype == np.bool_:
        flat = flat.astype(np.int8)
    suffix = "LL" if arr.dtype.itemsize == 8 else ""
    items = [f"{int(v)}{suffix}" for v in flat.tolist()]
    if arr.dtype == np.int64:       # -2^63 has no literal
        items = [f"({v[:-2]}LL - 1)" if v == f"{-(2**63)}LL" else v for v in items]
    lines = [", ".join(items[i:i + 24]) for i in range(0, len(items), 24)]
    body = ",\n  ".join(lines)
    return f"static const {ctype} {name}[{max(1, flat.size)}] __attribute__((aligned(8))) = {{\n  {body}\n}};\n"


def _signature(prog: Program) -> str:
    (inp,), (out,) = prog.inputs, prog.outputs
    return (f"int lowbit_{prog.name}_run(const {CTYPES[inp.dtype]} *input, {CTYPES[out.dtype]} *output, "
            "uint8_t *arena)")


def header(prog: Program, plan: MemoryPlan, isa: str, source: str) -> str:
    up = prog.name.upper()
    (inp,), (out,) = prog.inputs, prog.outputs
    lines = [
        f"/* {prog.name}: integer-only inference, generated by lowbit from {source} for {isa}.",
        " * No malloc, no TVM runtime, no float: the caller owns every byte.",
        f" *   input  {inp.name!r}: {CTYPES[inp.dtype]}{list(inp.shape)}, real = scale * (q - zero_point)",
        f" *   output {out.name!r}: {CTYPES[out.dtype]}{list(out.shape)}",
        f" *   arena: {plan.summary()}",
        " * The arena must be 8-byte aligned; run returns 0, or 1 for a misaligned arena. */",
        f"#ifndef LOWBIT_{up}_H",
        f"#define LOWBIT_{up}_H",
        "#include <stdint.h>",
        "",
        f"#define LOWBIT_{up}_INPUT_BYTES {_nbytes(inp.shape, inp.dtype)}",
        f"#define LOWBIT_{up}_INPUT_SCALE {inp.scale!r}f",
        f"#define LOWBIT_{up}_INPUT_ZERO_POINT {inp.zero_point}",
        f"#define LOWBIT_{up}_OUTPUT_BYTES {_nbytes(out.shape, out.dtype)}",
        f"#define LOWBIT_{up}_OUTPUT_SCALE {out.scale!r}f",
        f"#define LOWBIT_{up}_OUTPUT_ZERO_POINT {out.zero_point}",
        f"#define LOWBIT_{up}_ARENA_BYTES {plan.arena}",
        f"#define LOWBIT_{up}_WEIGHT_BYTES {prog.weight_bytes()}",
        f"#define LOWBIT_{up}_KERNEL_CALLS {len(prog.calls)}",
        "",
        f"{_signature(prog)};",
        "",
        "#ifdef LOWBIT_PROFILE",
        "/* instructions retired by each kernel call of the last run (minstret), and the kernels' names */",
        f"extern uint32_t lowbit_{prog.name}_profile[LOWBIT_{up}_KERNEL_CALLS];",
        f"extern const char *const lowbit_{prog.name}_kernels[LOWBIT_{up}_KERNEL_CALLS];",
        "#endif",
        "#endif",
        "",
    ]
    return "\n".join(lines)


def model_c(prog: Program, plan: MemoryPlan) -> str:
    def ref(name: str) -> str:
        b = prog.buffers[name]
        root = b.base or name
        home = prog.buffers[root].home
        ctype = CTYPES[b.dtype]
        if home == "input":
            return f"({ctype} *)input"
        if home == "output":
            return f"({ctype} *)output"
        if home == "const":
            return f"({ctype} *){root}"
        return f"({ctype} *)(arena + {plan.offsets[root]})"

    protos = [f"void {k}({', '.join(t + ' *' for t in types)});" for k, types in sorted(prog.param_types.items())]
    body = []
    for i, c in enumerate(prog.calls):
        body.append(f"  {{ PROFILE_BEGIN(); {c.kernel}({', '.join(ref(a) for a in c.args)}); PROFILE_END({i}); }}")
    kernels = ",\n  ".join(f'"{c.kernel}"' for c in prog.calls)
    return "\n".join([
        f'/* generated by lowbit: the call sequence of {prog.name}; see model.h */',
        '#include "model.h"',
        "",
        *protos,
        "",
        *(_array(n, a) for n, a in prog.constants.items()),
        "#ifdef LOWBIT_PROFILE",
        f"uint32_t lowbit_{prog.name}_profile[LOWBIT_{prog.name.upper()}_KERNEL_CALLS];",
        f"const char *const lowbit_{prog.name}_kernels[LOWBIT_{prog.name.upper()}_KERNEL_CALLS] = {{\n  {kernels}\n}};",
        "static inline uint32_t minstret(void) { uint32_t v; __asm__ volatile(\"csrr %0, minstret\" : \"=r\"(v)); "
        "return v; }",
        "#define PROFILE_BEGIN() uint32_t t0_ = minstret()",
        f"#define PROFILE_END(i) lowbit_{prog.name}_profile[i] = minstret() - t0_",
        "#else",
        "#define PROFILE_BEGIN() do { } while (0)",
        "#define PROFILE_END(i) do { } while (0)",
        "#endif",
        "",
        f"{_signature(prog)} {{",
        "  if ((uintptr_t)arena % 8) return 1;",
        *body,
        "  return 0;",
        "}",
        "",
    ])


def main_c(prog: Program) -> str:
    """The semihosting harness: runs the model on each input of the linked-in file in turn and
    prints each output's bytes (built with -DLOWBIT_PROFILE, also the first run's instructions per
    kernel call and its stack high-water mark).  Returns the first non-zero status of the run."""
    up = prog.name.upper()
    (inp,), (out,) = prog.inputs, prog.outputs
    return f'''/* generated by lowbit: a semihosting test harness for {prog.name} under QEMU (see Makefile) */
#include <stdio.h>
#include "model.h"

/* input.S: .incbin of the input file, any number of inputs back to back */
extern const {CTYPES[inp.dtype]} lowbit_input[], lowbit_input_end[];
static uint8_t arena[LOWBIT_{up}_ARENA_BYTES] __attribute__((aligned(8)));
static {CTYPES[out.dtype]} output[LOWBIT_{up}_OUTPUT_BYTES / sizeof({CTYPES[out.dtype]})];

#ifdef LOWBIT_RVV
/* the vector unit is off at reset: set mstatus.VS before the first vector instruction */
__attribute__((constructor)) static void enable_vector_unit(void) {{ __asm__ volatile("csrs mstatus, %0" :: "r"(1u << 9)); }}
#endif

#ifdef LOWBIT_PROFILE
#define STACK_PROBE 65536   /* bytes below main's frame painted to find the run's deepest stack use */
static uint32_t __attribute__((noinline)) stack_depth(int paint) {{
  volatile uint8_t *sp = (volatile uint8_t *)__builtin_frame_address(0) - 64;
  uint32_t i = 0;
  if (paint) {{ for (i = 0; i < STACK_PROBE; ++i) sp[-(int32_t)i] = 0xA5; return 0; }}
  for (i = STACK_PROBE; i > 0 && sp[-(int32_t)(i - 1)] == 0xA5; --i) {{ }}
  return i;
}}
#endif

int main(void) {{
  /* in bytes: the input's elements may be wider than one (a 16-bit input) */
  const uint8_t *first = (const uint8_t *)lowbit_input;
  uint32_t count = (uint32_t)((const uint8_t *)lowbit_input_end - first) / LOWBIT_{up}_INPUT_BYTES;
  for (uint32_t n = 0; n < count; ++n) {{
#ifdef LOWBIT_PROFILE
    if (n == 0) stack_depth(1);
#endif
    int rc = lowbit_{prog.name}_run((const {CTYPES[inp.dtype]} *)(first + n * LOWBIT_{up}_INPUT_BYTES), output, arena);
    if (rc != 0) return rc;
#ifdef LOWBIT_PROFILE
    if (n == 0) {{
      printf("LOWBIT_STACK %lu\\n", (unsigned long)stack_depth(0));
      for (int i = 0; i < LOWBIT_{up}_KERNEL_CALLS; ++i)
        printf("LOWBIT_PROFILE %d %lu %s\\n", i, (unsigned long)lowbit_{prog.name}_profile[i],
               lowbit_{prog.name}_kernels[i]);
    }}
#endif
    printf("LOWBIT_OUTPUT ");
    for (int i = 0; i < LOWBIT_{up}_OUTPUT_BYTES; ++i) printf("%02x", (unsigned)((const uint8_t *)output)[i]);
    printf("\\n");
  }}
  return 0;
}}
'''
