#!/usr/bin/env bash
# Shared helpers for the Raspberry Pi scripts; sourced, never run.
# Every /proc and /sys read goes below $ROOT so tests can point the scripts at a fake tree
# (EDGE_SYSFS_ROOT, the same variable edge's device probe honours).

ROOT="${EDGE_SYSFS_ROOT:-/}"
DRY_RUN=0

die() { echo "error: $*" >&2; exit 2; }
note() { echo "== $*"; }

# rd REL: the stripped contents of $ROOT/REL, or nothing when missing/unreadable.
rd() {
  local f="${ROOT%/}/$1"
  [ -r "$f" ] || return 0
  tr -d '\0' <"$f" 2>/dev/null | sed -e 's/[[:space:]]*$//' | head -n 1
}

# run CMD...: execute, or under --dry-run print what would be executed.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    local a line="would run:"
    for a in "$@"; do
      # plain words stay readable (1,2,4); anything else is shell-quoted
      if [[ $a =~ ^[A-Za-z0-9_./,:=+@%-]+$ ]]; then line="$line $a"; else line="$line $(printf '%q' "$a")"; fi
    done
    echo "$line"
  else
    "$@"
  fi
}

# write_file PATH TEXT: write TEXT to a file (sysfs knobs, configs), or say so in --dry-run.
write_file() {
  if [ "$DRY_RUN" = 1 ]; then
    echo "would write '$2' to $1"
  else
    printf '%s\n' "$2" >"$1"
  fi
}

machine_arch() { echo "${EDGE_ARCH:-$(uname -m)}"; }

board_model() { rd proc/device-tree/model; }

# cpu_part: the ARM "CPU part" of the first core (0xd08 = Cortex-A72, 0xd0b = Cortex-A76).
cpu_part() {
  local f="${ROOT%/}/proc/cpuinfo"
  [ -r "$f" ] || return 0
  awk -F: '/^CPU part/ { gsub(/[[:space:]]/, "", $2); print tolower($2); exit }' "$f"
}

ram_mib() {
  local f="${ROOT%/}/proc/meminfo"
  [ -r "$f" ] || { echo 0; return; }
  awk '/^MemTotal:/ { if ($2 ~ /^[0-9]+$/) { print int($2 / 1024); found = 1 } } END { if (!found) print 0 }' "$f"
}

cpu_count() {
  local f="${ROOT%/}/proc/cpuinfo" n=0
  [ -r "$f" ] && n=$(grep -c '^processor' "$f")
  if [ "$n" -gt 0 ]; then echo "$n"; else echo 1; fi
}

# board_kind: pi5 | pi4 | aarch64 | armv7 | x86_64 | unknown
board_kind() {
  local arch model
  arch=$(machine_arch)
  model=$(board_model)
  case "$arch" in
    aarch64|arm64)
      case "$model" in
        # "Raspberry Pi 5" also matches the Pi 500 keyboard, "Raspberry Pi 4" the Pi 400
        *"Raspberry Pi 5"*|*"Compute Module 5"*) echo pi5 ;;
        *"Raspberry Pi 4"*|*"Compute Module 4"*) echo pi4 ;;
        *) echo aarch64 ;;
      esac ;;
    armv7l|armv7*|armv6l) echo armv7 ;;
    x86_64|amd64) echo x86_64 ;;
    *) echo unknown ;;
  esac
}

# soc_temp_milli: the SoC temperature in m°C (first cpu/soc zone, else zone 0), or nothing.
soc_temp_milli() {
  local z t typ first=""
  for z in "${ROOT%/}"/sys/class/thermal/thermal_zone*; do
    [ -r "$z/temp" ] || continue
    t=$(tr -d '[:space:]' <"$z/temp")
    case "$t" in ''|*[!0-9-]*) continue ;; esac
    [ -n "$first" ] || first=$t
    typ=$(tr -d '[:space:]' <"$z/type" 2>/dev/null || true)
    case "$typ" in cpu*|soc*|x86_pkg*|bcm2*) echo "$t"; return ;; esac
  done
  [ -z "$first" ] || echo "$first"
}

# throttled_raw: the firmware's get_throttled value (decimal), or nothing when unknown.
throttled_raw() {
  local v
  v=$(rd "sys/devices/platform/soc/soc:firmware/get_throttled")
  if [ -z "$v" ] && [ "${ROOT%/}" = "" ] && command -v vcgencmd >/dev/null 2>&1; then
    v=$(vcgencmd get_throttled 2>/dev/null | sed 's/.*=//')
  fi
  v=${v##*=}
  if [[ $v =~ ^(0x[0-9a-fA-F]+|[0-9]+)$ ]]; then echo $((v)); fi
}

# llama_flags KIND [ALLOW_ARMV7]: set LLAMA_CMAKE (CMAKE_ARGS) and LLAMA_CFLAGS (for CFLAGS and
# CXXFLAGS; CMake reads them from the environment, while C flags inside CMAKE_ARGS did not
# reach the compiler) for building llama.cpp on this board. Returns 3 for a refused armv7.
# shellcheck disable=SC2034  # the callers read LLAMA_CMAKE and LLAMA_CFLAGS
llama_flags() {
  LLAMA_CMAKE="" LLAMA_CFLAGS=""
  case "$1" in
    # llama.cpp's quantized dot products need dotprod (A76) to be fast, and -march=native
    # is unreliable on some Pi toolchains, so Pi builds name the architecture.
    pi5) LLAMA_CMAKE="-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16" ;;
    pi4) LLAMA_CMAKE="-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a" ;;
    aarch64)
      if [ "$(cpu_part)" = 0xd0b ]; then
        LLAMA_CMAKE="-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16"
      else
        LLAMA_CMAKE="-DGGML_NATIVE=ON"
      fi ;;
    armv7)
      [ "${2:-0}" = 1 ] || return 3
      LLAMA_CMAKE="-DGGML_NATIVE=OFF"
      LLAMA_CFLAGS="-mfpu=neon-vfpv4 -mfloat-abi=hard" ;;
    # Some x86 VMs advertise AMX and trap its tile instructions (SIGILL on the first
    # batched prompt): keep -march=native but never compile ggml's AMX kernels.
    x86_64)
      LLAMA_CMAKE="-DGGML_NATIVE=ON"
      LLAMA_CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" ;;
    *) return 2 ;;
  esac
}

# armv7_refusal: why a 32-bit ARM OS is refused, and what to do (stderr).
armv7_refusal() {
  echo "refusing: this is a 32-bit ARM system ($(machine_arch))." >&2
  echo "llama.cpp's fast kernels (and most wheels) need a 64-bit OS; install 64-bit" >&2
  echo "Raspberry Pi OS, or rerun with --allow-armv7 for a slow NEON (neon-vfpv4) build." >&2
}
