#!/usr/bin/env bash
# Sample SoC temperature, CPU frequency, governor and the firmware's throttle flags to CSV,
# once a second by default, until Ctrl-C (or --count samples).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

usage() {
  cat <<'USAGE'
Usage: thermal_watch.sh [--dry-run] [--out FILE] [--interval S] [--count N] [--root DIR]

Writes one CSV row per sample: ts (UTC), temp_c, freq_mhz, governor, throttled_raw and the
decoded flags (under_voltage, arm_frequency_capped, throttled, soft_temp_limit, each now and
*_occurred since boot). Flags come from the firmware's get_throttled file or
`vcgencmd get_throttled`; they are empty where the board has neither (x86-64).

Options:
  --out FILE       append to FILE (header written when new) [default: stdout]
  --interval S     seconds between samples [default: 1]
  --count N        stop after N samples [default: run until Ctrl-C]
  --dry-run        print the sources that would be read and one sample, then exit
  --root DIR       read /proc and /sys below DIR (tests) [default: $EDGE_SYSFS_ROOT or /]
  -h, --help       this help

Examples:
  ./thermal_watch.sh --out thermal.csv &
  ./thermal_watch.sh --count 10 --interval 0.5
USAGE
}

OUT="" INTERVAL=1 COUNT=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT="${2:?--out needs a file}"; shift ;;
    --interval) INTERVAL="${2:?--interval needs seconds}"; shift ;;
    --count) COUNT="${2:?--count needs a number}"; shift ;;
    --root) ROOT="${2:?--root needs a directory}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done
[[ $INTERVAL =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)$ ]] && [ "$INTERVAL" != 0 ] || die "--interval '$INTERVAL' must be a positive number of seconds"
[[ $COUNT =~ ^[0-9]+$ ]] || die "--count '$COUNT' must be a whole number"

FLAGS=(under_voltage arm_frequency_capped throttled soft_temp_limit)
BITS=(0 1 2 3)
header() {
  local h="ts,temp_c,freq_mhz,governor,throttled_raw" i
  for i in "${FLAGS[@]}"; do h="$h,$i"; done
  for i in "${FLAGS[@]}"; do h="$h,${i}_occurred"; done
  echo "$h"
}

sample() {
  local t f g raw row b
  t=$(soc_temp_milli)
  f=$(rd sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq)
  g=$(rd sys/devices/system/cpu/cpu0/cpufreq/scaling_governor)
  raw=$(throttled_raw)
  [ -n "$t" ] && t=$(awk -v m="$t" 'BEGIN { printf "%.1f", m / 1000 }')
  [[ $f =~ ^[0-9]+$ ]] && f=$(awk -v k="$f" 'BEGIN { printf "%.0f", k / 1000 }') || f=""
  row="$(date -u +%Y-%m-%dT%H:%M:%SZ),$t,$f,$g,$raw"
  for b in "${BITS[@]}" 16 17 18 19; do
    if [ -n "$raw" ]; then row="$row,$(( (raw >> b) & 1 ))"; else row="$row,"; fi
  done
  # The 4 "now" bits are 0-3 and the "occurred" bits 16-19: same column order as header().
  echo "$row"
}

if [ "$DRY_RUN" = 1 ]; then
  echo "would sample every ${INTERVAL}s to ${OUT:-stdout}$([ "$COUNT" -gt 0 ] && echo " ($COUNT samples)")"
  echo "sources: ${ROOT%/}/sys/class/thermal/thermal_zone*/temp, ${ROOT%/}/sys/devices/system/cpu/cpu0/cpufreq/{scaling_cur_freq,scaling_governor}, get_throttled/vcgencmd"
  header
  sample
  exit 0
fi

if [ -n "$OUT" ]; then
  [ -s "$OUT" ] || header >"$OUT"
  exec >>"$OUT"
else
  header
fi
n=0
trap 'exit 0' INT TERM
while :; do
  sample
  n=$((n + 1))
  [ "$COUNT" -gt 0 ] && [ "$n" -ge "$COUNT" ] && break
  sleep "$INTERVAL"
done
