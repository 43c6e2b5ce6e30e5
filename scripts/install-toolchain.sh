#!/usr/bin/env bash
# Install the Debian cross toolchains when missing: bare-metal RISC-V (gcc + picolibc, QEMU) for the
# microcontroller backend, and the AArch64 Linux gcc that links --target aarch64-linux libraries.
set -euo pipefail
PKGS=(gcc-riscv64-unknown-elf picolibc-riscv64-unknown-elf qemu-system-misc gcc-aarch64-linux-gnu
      libc6-dev-arm64-cross)
have() {
    command -v riscv64-unknown-elf-gcc >/dev/null && command -v qemu-system-riscv32 >/dev/null \
        && test -f /usr/lib/picolibc/riscv64-unknown-elf/lib/libc.a \
        && command -v aarch64-linux-gnu-gcc >/dev/null && test -f /usr/aarch64-linux-gnu/lib/crti.o
}
have && exit 0
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then SUDO=sudo; else
        echo "error: a cross toolchain is missing and installing it needs root: apt-get install ${PKGS[*]}" >&2
        exit 2
    fi
fi
echo "installing the cross toolchains: ${PKGS[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
have
