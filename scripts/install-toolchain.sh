#!/usr/bin/env bash
# Install Debian's bare-metal RISC-V toolchain (gcc + picolibc) and QEMU when missing.
set -euo pipefail
PKGS=(gcc-riscv64-unknown-elf picolibc-riscv64-unknown-elf qemu-system-misc)
have() {
    command -v riscv64-unknown-elf-gcc >/dev/null && command -v qemu-system-riscv32 >/dev/null \
        && test -f /usr/lib/picolibc/riscv64-unknown-elf/lib/libc.a
}
have && exit 0
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then SUDO=sudo; else
        echo "error: the RISC-V toolchain is missing and installing it needs root: apt-get install ${PKGS[*]}" >&2
        exit 2
    fi
fi
echo "installing the RISC-V toolchain: ${PKGS[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
have
