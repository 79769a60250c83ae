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
  other aarch64:      -DGGML_NATIVE=ON (the compiler probes this CPU)
  x86-64:             -DGGML_NATIVE=ON without AMX (-mno-amx-*: some VMs trap it)
The build itself is install.sh's, which caches the wheel keyed by flags and CPU.

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

# The CPU flags are the point of this script (lib.sh's llama_flags, shared with install.sh).
rc=0
llama_flags "$KIND" "$ALLOW_ARMV7" || rc=$?
if [ "$rc" = 3 ]; then armv7_refusal; exit 3; fi
[ "$rc" = 0 ] || die "unsupported machine '$(machine_arch)'; edge builds on aarch64, armv7l (--allow-armv7) and x86-64"
CMAKE="$LLAMA_CMAKE"
[ "$RPC" = 1 ] && CMAKE="$CMAKE -DGGML_RPC=ON"
PKGS=(build-essential cmake git pkg-config python3-dev python3-venv python3-pip)
if [ "$OPENBLAS" = 1 ]; then
  CMAKE="$CMAKE -DGGML_BLAS=ON -DGGML_BLAS_VENDOR=OpenBLAS"
  PKGS+=(libopenblas-dev)
fi
echo "CMAKE_ARGS=$CMAKE"
[ -z "$LLAMA_CFLAGS" ] || echo "CFLAGS=CXXFLAGS=$LLAMA_CFLAGS"

if [ "$DRY_RUN" != 1 ] && [ "$(id -u)" != 0 ]; then
  die "run as root (sudo) to install packages and set zram/governor, or use --dry-run"
fi

note "build dependencies"
run apt-get update
run env DEBIAN_FRONTEND=noninteractive apt-get install -y "${PKGS[@]}"

note "llama-cpp-python from source, then edge, in $VENV"
run python3 -m venv "$VENV"
INSTALL=("$HERE/install.sh" --python "$VENV/bin/python" --no-editable --extras "")
[ "$RPC" = 1 ] || INSTALL+=(--no-rpc)
[ "$OPENBLAS" = 1 ] && INSTALL+=(--openblas)
[ "$ALLOW_ARMV7" = 1 ] && INSTALL+=(--allow-armv7)
# install.sh builds the wheel with the same flags (lib.sh) and keeps it keyed by them.
run "${INSTALL[@]}"

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
