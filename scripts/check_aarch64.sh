#!/usr/bin/env bash
# The native kernels built for aarch64 (a Raspberry Pi) give the bytes of this machine's build.
#
#   scripts/check_aarch64.sh
#
# Builds native/ twice with CMake, for this machine and with Debian's aarch64 cross compiler, each with
# native/check_driver.c, and runs scripts/check_aarch64.py: the same cases (every trainable format;
# perturb, restore, updates with the sidecar and with replay) on both builds, the aarch64 one under
# qemu-aarch64, compared byte for byte.  Its last line is JSON with formats_identical and
# formats_differing.  Installs gcc-aarch64-linux-gnu (with libc6-dev-arm64-cross), libgomp1-arm64-cross
# and qemu-user with apt-get when they are missing (as root); exits 77 with one line saying why when it
# cannot.
# PYTHON (default python3) must import qes_edge, numpy and gguf.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python3}"
sysroot=/usr/aarch64-linux-gnu
cannot=77

qemu() { command -v qemu-aarch64 || command -v qemu-aarch64-static; }

missing=()
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
[ -e "$sysroot/include/stdio.h" ] || missing+=(libc6-dev-arm64-cross)
[ -e "$sysroot/lib/libgomp.so.1" ] || missing+=(libgomp1-arm64-cross)
qemu >/dev/null || missing+=(qemu-user)
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "check_aarch64: needs the Debian packages ${missing[*]}: sudo apt-get install ${missing[*]}" >&2
    exit "$cannot"
  fi
  echo "check_aarch64: installing ${missing[*]}" >&2
  log="$(mktemp)"
  install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >>"$log" 2>&1; }
  if ! install "${missing[@]}" && ! { apt-get update -q >>"$log" 2>&1 && install "${missing[@]}"; }; then
    echo "check_aarch64: apt-get cannot install ${missing[*]}: $(grep -E '^E:' "$log" | tail -1)" >&2
    rm -f "$log"
    exit "$cannot"
  fi
  rm -f "$log"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/qes-check-aarch64.XXXXXX")"
trap 'rm -rf "$work"' EXIT

build() {  # build NAME [cmake arguments]: the library and the driver into $work/NAME/out
  local name="$1"; shift
  if ! { cmake -S . -B "$work/$name" -DCMAKE_BUILD_TYPE=Release -DQES_BUILD_CHECK_DRIVER=ON \
           -DQES_KERNELS_OUTPUT_DIR="$work/$name/out" "$@" && cmake --build "$work/$name"; } \
         >"$work/$name.log" 2>&1; then
    echo "check_aarch64: the $name build failed: $(grep -E 'error:|cannot find|CMake Error' "$work/$name.log" \
      | sort -u | head -2 | tr -s ' \n' ' ')" >&2
    exit 1
  fi
}
build host
build aarch64 -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
  -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_FIND_ROOT_PATH="$sysroot"
if ! grep -q "OpenMP_C: " "$work/aarch64.log"; then
  echo "check_aarch64: the aarch64 build found no OpenMP (libgomp1-arm64-cross)" >&2
  exit 1
fi

"$python" scripts/check_aarch64.py --driver "$work/host/out/qes_check_driver" \
  --aarch64-driver "$work/aarch64/out/qes_check_driver" --runner "$(qemu) -L $sysroot"
