#!/usr/bin/env bash
# The Pi benchmark matrix: every model (quant type) × thread count through `edge bench`,
# with a cooldown before each test and a thermal log alongside, into a dated folder.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

usage() {
  cat <<'USAGE'
Usage: pi_bench.sh [--dry-run] [options] MODEL.gguf [MODEL.gguf ...]
       pi_bench.sh [--dry-run] [options] --models-dir DIR [--quants Q4_0,Q8_0]

Runs `edge bench` for each model (one per quant type) over the thread counts, waiting for
the SoC to cool before each test, while thermal_watch.sh logs temperature, frequency and
throttle flags. Results go to OUT_DIR/<UTC date-time>-<hostname>/:
  device.txt  board, CPU, RAM, governor, temperature at the start
  <quant>.jsonl  edge bench records per model;  all.jsonl  all of them
  thermal.csv    one row per second;           report/    `edge report` HTML (if available)

Options:
  --models-dir DIR   benchmark every *.gguf in DIR
  --quants LIST      only models whose file name contains one of these quant types
  --threads LIST     thread counts [default: 1,2,4,... up to the core count]
  --pp N --tg N      prompt / generated tokens per test [default: 128 / 64]
  --reps N           repetitions per test [default: 3]
  --cooldown C       wait until the SoC is below C °C before each test
                     [default: 50 on a Pi / ARM board, off elsewhere; 0 = off]
  --out-dir DIR      where the dated folder goes [default: ./bench-results]
  --edge CMD         the edge command [default: edge]
  --dry-run          print the plan and the commands, run nothing
  --root DIR         read /proc and /sys below DIR (tests) [default: $EDGE_SYSFS_ROOT or /]
  -h, --help         this help

Examples:
  ./pi_bench.sh --models-dir ~/models --quants Q4_0,Q4_K_M,Q8_0 --threads 1,2,4
  ./pi_bench.sh --dry-run smollm2-q4_0.gguf smollm2-q8_0.gguf
USAGE
}

MODELS=() MODELS_DIR="" QUANTS="" THREADS="" PP=128 TG=64 REPS=3 COOLDOWN="" OUT_DIR="./bench-results" EDGE=edge
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --models-dir) MODELS_DIR="${2:?--models-dir needs a directory}"; shift ;;
    --quants) QUANTS="${2:?--quants needs a list}"; shift ;;
    --threads) THREADS="${2:?--threads needs a list}"; shift ;;
    --pp) PP="${2:?--pp needs a number}"; shift ;;
    --tg) TG="${2:?--tg needs a number}"; shift ;;
    --reps) REPS="${2:?--reps needs a number}"; shift ;;
    --cooldown) COOLDOWN="${2:?--cooldown needs °C}"; shift ;;
    --out-dir) OUT_DIR="${2:?--out-dir needs a directory}"; shift ;;
    --edge) EDGE="${2:?--edge needs a command}"; shift ;;
    --root) ROOT="${2:?--root needs a directory}"; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) MODELS+=("$1") ;;
  esac
  shift
done

for v in PP TG REPS; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "--$(echo "$v" | tr '[:upper:]' '[:lower:]') '${!v}' must be a whole number ≥ 1"
done
if [ -n "$MODELS_DIR" ]; then
  [ -d "$MODELS_DIR" ] || die "--models-dir '$MODELS_DIR' is not a directory"
  for f in "$MODELS_DIR"/*.gguf; do [ -e "$f" ] && MODELS+=("$f"); done
fi
[ ${#MODELS[@]} -gt 0 ] || die "no models: give GGUF files or --models-dir DIR (see --help)"

# quant_of FILE: the quant type in a GGUF file name (Q4_K_M, Q8_0, F16, IQ4_XS ...).
quant_of() {
  local q
  q=$(basename "$1" .gguf | tr '[:lower:]' '[:upper:]' | grep -oE '(IQ[0-9]_[A-Z0-9_]+|Q[0-9]_[A-Z0-9_]+|Q[0-9]_[0-9]|BF16|F16|F32)' | tail -n 1 || true)
  echo "${q:-$(basename "$1" .gguf)}"
}

SELECTED=()
for m in "${MODELS[@]}"; do
  [ -f "$m" ] || die "model '$m' is not a file"
  if [ -n "$QUANTS" ]; then
    keep=0
    IFS=, read -r -a qs <<<"$QUANTS"
    for q in "${qs[@]}"; do
      [ "$(quant_of "$m")" = "$(echo "$q" | tr '[:lower:]' '[:upper:]')" ] && keep=1
    done
    [ "$keep" = 1 ] || continue
  fi
  SELECTED+=("$m")
done
[ ${#SELECTED[@]} -gt 0 ] || die "no model matches --quants '$QUANTS'"

CORES=$(cpu_count)
if [ -z "$THREADS" ]; then
  THREADS=1 t=2
  while [ "$t" -le "$CORES" ]; do THREADS="$THREADS,$t"; t=$((t * 2)); done
fi
[[ $THREADS =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "--threads '$THREADS' must look like 1,2,4"

KIND=$(board_kind)
if [ -z "$COOLDOWN" ]; then
  case "$KIND" in pi5|pi4|aarch64|armv7) COOLDOWN=50 ;; *) COOLDOWN=0 ;; esac
fi
[[ $COOLDOWN =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--cooldown '$COOLDOWN' must be a temperature in °C"
COOL_ARGS=()
[ "$COOLDOWN" != 0 ] && COOL_ARGS=(--cooldown "$COOLDOWN")

DEST="$OUT_DIR/$(date -u +%Y%m%d-%H%M%S)-$(hostname 2>/dev/null || echo host)"
temp=$(soc_temp_milli)
model_name=$(board_model)
note "board: ${model_name:-unknown} (kind=$KIND, $CORES cores, $(ram_mib) MiB RAM, governor $(rd sys/devices/system/cpu/cpu0/cpufreq/scaling_governor))"
cool_text="off"
[ "$COOLDOWN" != 0 ] && cool_text="below ${COOLDOWN} °C"
note "plan: ${#SELECTED[@]} model(s) × threads $THREADS, pp$PP tg$TG ×$REPS, cooldown $cool_text → $DEST"
[ -n "$temp" ] && note "SoC now: $(awk -v m="$temp" 'BEGIN { printf "%.1f", m / 1000 }') °C"

run mkdir -p "$DEST"
if [ "$DRY_RUN" != 1 ]; then
  {
    echo "board: $(board_model)"; echo "kind: $KIND"; echo "arch: $(machine_arch)"
    echo "cores: $CORES"; echo "ram_mib: $(ram_mib)"
    echo "governor: $(rd sys/devices/system/cpu/cpu0/cpufreq/scaling_governor)"
    echo "temp_milli_c: $temp"; echo "throttled_raw: $(throttled_raw)"
    echo "cmd: $0 $*"
  } >"$DEST/device.txt"
  "$HERE/thermal_watch.sh" --root "$ROOT" --out "$DEST/thermal.csv" &
  WATCH=$!
  trap 'kill "$WATCH" 2>/dev/null || true' EXIT
else
  echo "would write $DEST/device.txt"
  echo "would run in background: $HERE/thermal_watch.sh --root $ROOT --out $DEST/thermal.csv"
fi

for m in "${SELECTED[@]}"; do
  q=$(quant_of "$m")
  note "$q: $m"
  run "$EDGE" bench "$m" --threads "$THREADS" --pp "$PP" --tg "$TG" --reps "$REPS" "${COOL_ARGS[@]}" --out "$DEST/$q.jsonl"
done

if [ "$DRY_RUN" = 1 ]; then
  echo "would write $DEST/all.jsonl"
else
  cat "$DEST"/*.jsonl >"$DEST/all.jsonl.tmp" && mv "$DEST/all.jsonl.tmp" "$DEST/all.jsonl"
fi
run "$EDGE" report -o "$DEST/report" || echo "(edge report failed; the JSONL files are complete)"
note "results in $DEST"
