#!/usr/bin/env bash
# Install edge and llama-cpp-python (built from source with flags for this CPU) into a
# Python environment. The README's set-up, .ci/run and setup_pi.sh all come through here.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

usage() {
  cat <<'USAGE'
Usage: install.sh [--dry-run] [options]

Builds llama-cpp-python from source with the build flags for this CPU, then installs edge
(editable, with the test extra, by default) into the Python of the active venv.

  x86-64:        -DGGML_NATIVE=ON, and CFLAGS/CXXFLAGS -mno-amx-tile -mno-amx-int8
                 -mno-amx-bf16 (some VMs advertise AMX and trap it: SIGILL on prompts)
  Pi 5 / A76:    -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16
  Pi 4:          -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a
  other aarch64: -DGGML_NATIVE=ON
  armv7l:        refused (64-bit OS recommended); --allow-armv7 builds for neon-vfpv4

The wheel it builds is kept in $EDGE_CACHE/wheels/<key>/, where the key covers the
llama-cpp-python version, every flag, the compiler and this CPU: a wheel built with
other flags, or on another CPU, is never reused (pip's own wheel cache is bypassed).

Options:
  --python PY        the Python to install into [default: python3 on PATH, i.e. the venv's]
  --extras LIST      edge's extras [default: test]; "" for none
  --no-editable      install a copy of edge instead of an editable checkout
  --no-rpc           build without GGML_RPC (edge worker / --rpc need it)
  --openblas         also build with OpenBLAS
  --allow-armv7      build on 32-bit armv7l instead of refusing
  --rebuild          build the wheel again even if one with these flags is cached
  --root DIR         read /proc and /sys below DIR (tests) [default: $EDGE_SYSFS_ROOT or /]
  -h, --help         this help

Examples:
  python3 -m venv .venv && . .venv/bin/activate && firmware_scripts/install.sh
  firmware_scripts/install.sh --dry-run
  firmware_scripts/install.sh --python ~/edge-venv/bin/python --no-editable --extras ""
USAGE
}

PY="python3" EXTRAS="test" EDITABLE=1 RPC=1 OPENBLAS=0 ALLOW_ARMV7=0 REBUILD=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --python) PY="${2:?--python needs a path}"; shift ;;
    --extras) EXTRAS="${2?--extras needs a list}"; shift ;;
    --no-editable) EDITABLE=0 ;;
    --no-rpc) RPC=0 ;;
    --openblas) OPENBLAS=1 ;;
    --allow-armv7) ALLOW_ARMV7=1 ;;
    --rebuild) REBUILD=1 ;;
    --root) ROOT="${2:?--root needs a directory}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done

SPEC="llama-cpp-python>=0.3.30,<0.4"  # keep in step with pyproject.toml
SRC="$(cd "$HERE/.." && pwd)"
KIND=$(board_kind)
rc=0
llama_flags "$KIND" "$ALLOW_ARMV7" || rc=$?
if [ "$rc" = 3 ]; then armv7_refusal; exit 3; fi
[ "$rc" = 0 ] || die "unsupported machine '$(machine_arch)'; edge builds on aarch64, armv7l (--allow-armv7) and x86-64"
CMAKE="${CMAKE_ARGS:+$CMAKE_ARGS }$LLAMA_CMAKE"
[ "$RPC" = 1 ] && CMAKE="$CMAKE -DGGML_RPC=ON"
[ "$OPENBLAS" = 1 ] && CMAKE="$CMAKE -DGGML_BLAS=ON -DGGML_BLAS_VENDOR=OpenBLAS"
CC_BIN="${CC:-cc}"
read -ra probe_flags <<<"$LLAMA_CFLAGS"
if [ -n "$LLAMA_CFLAGS" ] && [ "$DRY_RUN" != 1 ] \
   && ! printf 'int main(void){return 0;}\n' | "$CC_BIN" -x c "${probe_flags[@]}" - -o /dev/null 2>/dev/null; then
  # A compiler that does not know these flags cannot emit those instructions either.
  note "$CC_BIN does not accept '$LLAMA_CFLAGS'; building without them"
  LLAMA_CFLAGS=""
fi
BUILD_CFLAGS="${CFLAGS:+$CFLAGS }$LLAMA_CFLAGS"
BUILD_CXXFLAGS="${CXXFLAGS:+$CXXFLAGS }$LLAMA_CFLAGS"
echo "board: $KIND ($(machine_arch))"
echo "CMAKE_ARGS=$CMAKE"
echo "CFLAGS=$BUILD_CFLAGS"
echo "CXXFLAGS=$BUILD_CXXFLAGS"

# What the wheel depends on besides its version: flags, compiler, and (for -march=native
# and explicit ARM arch flags alike) the CPU it was built on.
cpu_id() {
  local f="${ROOT%/}/proc/cpuinfo"
  [ -r "$f" ] && grep -m4 -E '^(model name|flags|Features|CPU part)' "$f" | sort -u
  machine_arch
}
CACHE="${EDGE_CACHE:-${EDGE_HOME:+$EDGE_HOME/cache}}"
CACHE="${CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edge}"
KEY=$( { echo "$CMAKE|$BUILD_CFLAGS|$BUILD_CXXFLAGS"; "$CC_BIN" --version 2>/dev/null | head -n 1; cpu_id; } \
       | sha256sum | cut -c1-16)
WHEELS="$CACHE/wheels/$KEY"
echo "wheel cache: $WHEELS"

if [ "$DRY_RUN" = 1 ]; then
  run "$PY" -m pip download --no-deps --no-binary llama-cpp-python "$SPEC" -d "$CACHE/wheels/sdist"
  run env CMAKE_ARGS="$CMAKE" CFLAGS="$BUILD_CFLAGS" CXXFLAGS="$BUILD_CXXFLAGS" \
    "$PY" -m pip wheel --no-deps --no-cache-dir "$CACHE/wheels/sdist/llama_cpp_python-VERSION.tar.gz" -w "$WHEELS"
else
  "$PY" -m pip install -q --upgrade pip wheel setuptools
  # pip resolves the version (its HTTP cache makes this cheap after the first time).
  "$PY" -m pip download -q --no-deps --no-binary llama-cpp-python "$SPEC" -d "$CACHE/wheels/sdist"
  sdist=$(find "$CACHE/wheels/sdist" -name 'llama_cpp_python-*.tar.gz' | sort -V | tail -n 1)
  [ -n "$sdist" ] || die "pip did not download llama-cpp-python's source; check the network or the index"
  version=$(basename "$sdist" .tar.gz); version=${version#llama_cpp_python-}
  mkdir -p "$WHEELS"  # a new host has no cache yet: find must not fail on a missing dir
  whl=$(find "$WHEELS" -maxdepth 1 -name "llama_cpp_python-$version-*.whl" | head -n 1)
  if [ -z "$whl" ] || [ "$REBUILD" = 1 ]; then
    note "building llama-cpp-python $version from source (about 5 minutes on 2 cores)"
    rm -f "$WHEELS"/llama_cpp_python-"$version"-*.whl
    env CMAKE_ARGS="$CMAKE" CFLAGS="$BUILD_CFLAGS" CXXFLAGS="$BUILD_CXXFLAGS" \
      "$PY" -m pip wheel -q --no-deps --no-cache-dir "$sdist" -w "$WHEELS"
    whl=$(find "$WHEELS" -maxdepth 1 -name "llama_cpp_python-$version-*.whl" | head -n 1)
  else
    note "llama-cpp-python $version: reusing the wheel built with these flags on this CPU"
  fi
  # Its dependencies, then the wheel itself over whatever build was there before.
  "$PY" -m pip install -q "$whl"
  "$PY" -m pip install -q --force-reinstall --no-deps "$whl"
fi

target="$SRC"
[ -n "$EXTRAS" ] && target="${SRC}[${EXTRAS}]"
if [ "$EDITABLE" = 1 ]; then
  run "$PY" -m pip install -q -e "$target"
else
  run "$PY" -m pip install -q "$target"
fi
if [ "$DRY_RUN" != 1 ]; then
  "$PY" - <<'PY'
import platform, sys
import llama_cpp
info = llama_cpp.llama_print_system_info().decode(errors="replace")
feats = [p.rpartition("=")[0].rsplit(":", 1)[-1].strip() for p in info.split("|") if p.strip().endswith("= 1")]
print("llama-cpp-python", llama_cpp.__version__, "|", " ".join(feats))
if platform.machine() == "x86_64" and "AMX_INT8" in feats:
    sys.exit("error: AMX kernels were compiled in despite -mno-amx-*; report this with `edge doctor --json`")
PY
  note "done: run 'edge doctor' to check this host, 'edge chat' to talk to the bundled model"
fi
