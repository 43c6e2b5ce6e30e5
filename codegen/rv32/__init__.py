"""RISC-V microcontrollers: the integer region as a self-contained C project with a static memory
plan (codegen/rv32/build.py), run under QEMU (codegen/rv32/qemu.py)."""
