#!/usr/bin/env bash
# Provision a Raspberry Pi (or another Linux box) for edge: build deps, llama-cpp-python
# built with the right CPU flags for this board, edge itself, zram swap, CPU governor.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

usage() {
  cat <<'USAGE'
Usage: setup_pi.sh [--dry-run] [options]

Detects the board (Pi 5 / Pi 4 / other aarch64 / armv7l / x86-64), installs build
dependencies, builds llama-cpp-python from source with CMAKE_ARGS for that CPU, installs
edge into a venv, adds zram swap and sets the CPU governor to "performance".

  Pi 5 (Cortex-A76): -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16
  Pi 4 (Cortex-A72): -DGGML_CPU_ARM_ARCH=armv8-a   (no dotprod on the A72)
  armv7l (32-bit):    refused (64-bit OS recommended); --allow-armv7 builds with neon-vfpv4
  other aarch64 / x86-64: -DGGML_NATIVE=ON (the compiler probes this CPU)

Options:
  --dry-run          print what would be done, change nothing (no root needed)
  --venv DIR         venv to create/use [default: ~/edge-venv]
  --openblas         also build with OpenBLAS (helps prompt processing on large batches)
  --no-rpc           build without GGML_RPC (edge worker / --rpc need it)
  --allow-armv7      build on 32-bit armv7l instead of refusing
  --zram-mib N       size of the zram swap [default: half the RAM, at most 4096]
  --no-zram          leave swap alone
  --no-governor      leave the CPU governor alone
  --root DIR         read /proc and /sys below DIR (tests) [default: $EDGE_SYSFS_ROOT or /]
  -h, --help         this help

Examples:
  sudo ./setup_pi.sh --dry-run
  sudo ./setup_pi.sh --openblas --zram-mib 2048
USAGE
}

VENV="${HOME:-/root}/edge-venv"
OPENBLAS=0 RPC=1 ALLOW_ARMV7=0 ZRAM=1 ZRAM_MIB="" GOVERNOR=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --venv) VENV="${2:?--venv needs a directory}"; shift ;;
    --openblas) OPENBLAS=1 ;;
    --no-rpc) RPC=0 ;;
    --allow-armv7) ALLOW_ARMV7=1 ;;
    --zram-mib) ZRAM_MIB="${2:?--zram-mib needs a number}"; shift ;;
    --no-zram) ZRAM=0 ;;
    --no-governor) GOVERNOR=0 ;;
    --root) ROOT="${2:?--root needs a directory}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done
if [ -n "$ZRAM_MIB" ] && ! [[ $ZRAM_MIB =~ ^[1-9][0-9]*$ ]]; then
  die "--zram-mib '$ZRAM_MIB' is not a positive whole number"
fi

KIND=$(board_kind)
MODEL=$(board_model)
note "board: ${MODEL:-unknown} ($(machine_arch), kind=$KIND, CPU part $(cpu_part || true))"

# The CPU flags are the point of this script: llama.cpp's quantized dot products need
# dotprod (A76) to be fast, and -march=native is unreliable on some Pi toolchains.
case "$KIND" in
  pi5) CMAKE="-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16" ;;
  pi4) CMAKE="-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a" ;;
  aarch64)
    if [ "$(cpu_part)" = 0xd0b ]; then
      CMAKE="-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16"
    else
      CMAKE="-DGGML_NATIVE=ON"
    fi ;;
  armv7)
    if [ "$ALLOW_ARMV7" != 1 ]; then
      echo "refusing: this is a 32-bit ARM system ($(machine_arch))." >&2
      echo "llama.cpp's fast kernels (and most wheels) need a 64-bit OS; install 64-bit" >&2
      echo "Raspberry Pi OS, or rerun with --allow-armv7 for a slow NEON (neon-vfpv4) build." >&2
      exit 3
    fi
    CMAKE="-DGGML_NATIVE=OFF -DCMAKE_C_FLAGS='-mfpu=neon-vfpv4 -mfloat-abi=hard' -DCMAKE_CXX_FLAGS='-mfpu=neon-vfpv4 -mfloat-abi=hard'" ;;
  x86_64) CMAKE="-DGGML_NATIVE=ON" ;;
  *) die "unsupported machine '$(machine_arch)'; edge builds on aarch64, armv7l (--allow-armv7) and x86-64" ;;
esac
[ "$RPC" = 1 ] && CMAKE="$CMAKE -DGGML_RPC=ON"
PKGS=(build-essential cmake git pkg-config python3-dev python3-venv python3-pip)
if [ "$OPENBLAS" = 1 ]; then
  CMAKE="$CMAKE -DGGML_BLAS=ON -DGGML_BLAS_VENDOR=OpenBLAS"
  PKGS+=(libopenblas-dev)
fi
echo "CMAKE_ARGS=$CMAKE"

if [ "$DRY_RUN" != 1 ] && [ "$(id -u)" != 0 ]; then
  die "run as root (sudo) to install packages and set zram/governor, or use --dry-run"
fi

note "build dependencies"
run apt-get update
run env DEBIAN_FRONTEND=noninteractive apt-get install -y "${PKGS[@]}"

note "llama-cpp-python from source, then edge, in $VENV"
run python3 -m venv "$VENV"
run "$VENV/bin/pip" install --upgrade pip wheel setuptools
run env CMAKE_ARGS="$CMAKE" "$VENV/bin/pip" install --no-binary llama-cpp-python --no-cache-dir "llama-cpp-python>=0.3.30,<0.4"
run "$VENV/bin/pip" install "$(cd "$HERE/.." && pwd)"

case "$KIND" in pi5|pi4|aarch64|armv7) ON_SBC=1 ;; *) ON_SBC=0 ;; esac
if [ "$ZRAM" = 1 ] && [ "$ON_SBC" = 1 ]; then
  mib=${ZRAM_MIB:-$(( $(ram_mib) / 2 ))}
  [ "$mib" -gt 4096 ] && [ -z "$ZRAM_MIB" ] && mib=4096
  [ "$mib" -ge 64 ] || mib=64
  note "zram swap: ${mib} MiB (zstd), priority above any SD-card swap"
  run modprobe zram
  if [ "$DRY_RUN" = 1 ]; then
    echo "would run: zramctl --find --size ${mib}M --algorithm zstd"
    echo "would run: mkswap <the zram device> && swapon --priority 100 <the zram device>"
  else
    dev=$(zramctl --find --size "${mib}M" --algorithm zstd)
    mkswap "$dev" >/dev/null
    swapon --priority 100 "$dev"
  fi
elif [ "$ZRAM" = 1 ]; then
  note "zram: skipped (not a single-board computer)"
fi

if [ "$GOVERNOR" = 1 ] && [ "$ON_SBC" = 1 ]; then
  note "CPU governor: performance (until reboot; stable clocks make benchmarks comparable)"
  found=0
  for g in "${ROOT%/}"/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor; do
    [ -e "$g" ] || continue
    found=1
    write_file "$g" performance
  done
  [ "$found" = 1 ] || echo "no cpufreq governor found; skipping"
elif [ "$GOVERNOR" = 1 ]; then
  note "CPU governor: skipped (not a single-board computer)"
fi

note "done: source $VENV/bin/activate && edge bench"
