"""Does the installed llama.cpp run on this host? Checked once per install, in a child.

Some x86 VMs advertise AMX and trap its tile instructions, so a llama.cpp built with
-march=native dies with SIGILL on the first batched prompt, while single-token decodes
run; a wheel built on a Pi 5 dies the same way on a Pi 4. The only reliable test is to
run a batched prompt and a few tokens in a child process and look at how it ended. The
verdict is cached under EDGE_CACHE, keyed by the size and mtime of every file of the
loaded library, so later runs pay one stat per file; a reinstall changes the key.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge.errors import HostCheckError
from edge.paths import atomic_write, cache_dir

CHILD_TIMEOUT_S = 300.0
PROMPT_TOKENS = 72  # ≥ 64: a batch large enough for the tiled (AMX, repacked) kernels
GEN_TOKENS = 4
VERDICT_FILE = "hostcheck.json"
AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

# llama.cpp's system-info feature → the /proc/cpuinfo flag the CPU must have for it.
CPU_FLAG_FOR = {
    "SSSE3": "ssse3", "AVX": "avx", "AVX2": "avx2", "F16C": "f16c", "FMA": "fma",
    "BMI2": "bmi2", "AVX_VNNI": "avx_vnni", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
    "NEON": "asimd", "FP16_VA": "asimdhp", "DOTPROD": "asimddp", "MATMUL_INT8": "i8mm",
    "SVE": "sve", "SME": "sme",
}


@dataclass
class Verdict:
    """How the child check ended; `ok` False carries one line of why and the fix."""

    ok: bool
    key: str
    reason: str = ""  # "" | "SIGILL" | "SIGSEGV" | ... | "exit 1" | "timeout" | "error"
    detail: str = ""
    fix: str = ""
    seconds: float = 0.0
    system_info: str = ""
    prompt_tokens: int = 0
    gen_tokens: int = 0
    prompt_tps: float = 0.0
    checked_at: str = ""
    features: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def library_dir() -> Path | None:
    """llama-cpp-python's folder of shared libraries, found without importing (loading) it."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        return None
    lib = Path(spec.origin).parent / "lib"
    return lib if lib.is_dir() else Path(spec.origin).parent


def library_files() -> list[Path]:
    d = library_dir()
    if d is None:
        return []
    with os.scandir(d) as it:  # one listing; DirEntry caches the symlink test
        return sorted(Path(e.path) for e in it
                      if not e.is_symlink() and e.is_file()
                      and (".so" in e.name or e.name.endswith((".dylib", ".dll"))))


def library_key() -> str:
    """Size and mtime of every library file: a rebuild or reinstall changes it."""
    h = hashlib.sha256(str(library_dir()).encode())
    for p in library_files():
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def parse_features(system_info: str) -> list[str]:
    """'CPU : SSE3 = 1 | AVX = 1 | AMX_INT8 = 0 | …' → ['SSE3', 'AVX'] (those set to 1)."""
    out = []
    for part in system_info.replace("\n", "|").split("|"):
        name, eq, val = part.rpartition("=")
        name = name.rsplit(":", 1)[-1].strip()
        if eq and name and val.strip() == "1":
            out.append(name)
    return out


def cpu_flags(root: str | os.PathLike[str] = "/") -> set[str]:
    """The flags (x86) or Features (ARM) of the first CPU in /proc/cpuinfo."""
    try:
        text = (Path(root) / "proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, sep, val = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(val.split())
    return set()


def missing_features(features: list[str], flags: set[str]) -> list[str]:
    """Features the library was built with that this CPU does not advertise."""
    if not flags:
        return []
    return [f for f in features if f in CPU_FLAG_FOR and CPU_FLAG_FOR[f] not in flags]


def reinstall_command() -> str:
    """The exact command that rebuilds llama-cpp-python right for this host."""
    script = Path(__file__).resolve().parent.parent / "firmware_scripts" / "install.sh"
    if script.is_file():  # a source checkout: its installer knows every board's flags
        return f"{script} --python {sys.executable} --rebuild"
    version = _installed_version() or ">=0.3.30,<0.4"
    pin = f"=={version}" if version[0].isdigit() else version
    cmake = "-DGGML_NATIVE=ON -DGGML_RPC=ON"
    flags = f'CFLAGS="{AMX_FLAGS}" CXXFLAGS="{AMX_FLAGS}" ' if platform.machine() in ("x86_64", "AMD64") else ""
    return (f'CMAKE_ARGS="{cmake}" {flags}{sys.executable} -m pip install --force-reinstall --no-deps '
            f'--no-cache-dir --no-binary llama-cpp-python "llama-cpp-python{pin}"')


def _installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def _cause(reason: str, features: list[str], flags: set[str]) -> str:
    missing = missing_features(features, flags)
    if reason == "SIGILL" and "AMX_INT8" in features and "AMX_INT8" not in missing:
        return ("llama.cpp died with SIGILL (illegal instruction) on a batched prompt: it was built "
                "with AMX kernels and this CPU advertises AMX but traps it (common in VMs)")
    if missing:
        return (f"llama.cpp was built for another CPU: it uses {', '.join(missing)}, which this CPU "
                f"lacks (a wheel built on another machine?), and died with {reason}")
    if reason.startswith("SIG"):
        return f"llama.cpp died with {reason} running a test prompt in a child process"
    return f"the llama.cpp test inference failed ({reason})"


def child_argv(model: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "edge.hostcheck", "--child", str(model)]


def run_check(model: str | os.PathLike[str] | None = None, *, argv: list[str] | None = None,
              timeout: float = CHILD_TIMEOUT_S, threads: int | None = None) -> Verdict:
    """Run the test inference in a child process and say how it ended. Never raises for
    a crash of the child: that is the verdict."""
    if model is None:
        from edge.catalog import default_entry

        model = default_entry().local_path
    key = library_key()
    env = dict(os.environ)
    if threads:
        env["EDGE_HOSTCHECK_THREADS"] = str(threads)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv or child_argv(model), capture_output=True, text=True,
                           timeout=timeout, env=env)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = None, _text(e.stdout), _text(e.stderr)
    seconds = time.perf_counter() - t0
    facts: dict[str, Any] = {}
    for line in out.splitlines():  # one JSON object per line; the last word wins
        try:
            facts.update(json.loads(line))
        except ValueError:
            continue
    system_info = str(facts.get("system_info", ""))
    v = Verdict(ok=rc == 0 and bool(facts.get("ok")), key=key, seconds=round(seconds, 3),
                system_info=system_info, features=parse_features(system_info),
                prompt_tokens=int(facts.get("prompt_tokens", 0)),
                gen_tokens=int(facts.get("gen_tokens", 0)),
                prompt_tps=float(facts.get("prompt_tps", 0.0)),
                checked_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if v.ok:
        return v
    if rc is None:
        v.reason = "timeout"
    elif rc < 0:
        try:
            v.reason = signal.Signals(-rc).name
        except ValueError:
            v.reason = f"signal {-rc}"
    else:
        v.reason = f"exit {rc}"
    last_err = next((ln for ln in reversed(err.strip().splitlines()) if ln.strip()), "")
    v.detail = _cause(v.reason, v.features, cpu_flags())
    if rc is not None and rc > 0 and last_err:
        v.detail += f": {last_err[:200]}"
    v.fix = reinstall_command()
    return v


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def verdict_path() -> Path:
    return cache_dir() / VERDICT_FILE


def cached_verdict(key: str | None = None) -> Verdict | None:
    try:
        d = json.loads(verdict_path().read_text())
        v = Verdict(**d)
    except (OSError, ValueError, TypeError):
        return None
    return v if v.key == (key or library_key()) else None


def save_verdict(v: Verdict) -> None:
    try:
        with atomic_write(verdict_path(), "w") as f:
            json.dump(v.to_dict(), f, indent=1)
    except OSError:
        pass  # an unwritable cache only means the check runs again next time


def ensure_llama_works() -> Verdict:
    """Before the first llama.cpp load after an install: run the child check once; raise
    HostCheckError (exit 2, one line with the cause and the fix) while it fails."""
    if os.environ.get("EDGE_HOSTCHECK_CHILD"):
        return Verdict(ok=True, key="")  # we are the check
    key = library_key()
    v = cached_verdict(key)
    if v is None:
        v = run_check()
        save_verdict(v)
    if not v.ok:
        raise HostCheckError(f"{v.detail}. Fix: {v.fix}  (details: edge doctor)")
    return v


# ---- the child --------------------------------------------------------------------------
_TEXT = ("The quick brown fox jumps over the lazy dog while the small language model on the "
         "edge device counts how many tokens it can read in one batch. ")


def _child(model: str) -> None:
    os.environ["EDGE_HOSTCHECK_CHILD"] = "1"
    import llama_cpp

    def say(**kw: Any) -> None:
        print(json.dumps(kw), flush=True)  # flushed: a crash must not lose what was known

    say(system_info=llama_cpp.llama_print_system_info().decode(errors="replace"))
    threads = int(os.environ.get("EDGE_HOSTCHECK_THREADS") or 0) or None
    if threads is None:
        from edge.system import default_threads

        threads = default_threads()
    llm = llama_cpp.Llama(model_path=model, n_ctx=256, n_batch=128, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    tokens = llm.tokenize((_TEXT * 4).encode())[:PROMPT_TOKENS]
    say(stage="prompt", prompt_tokens=len(tokens))
    t0 = time.perf_counter()
    llm.eval(tokens)  # one batched decode: where trapped AMX tiles crash
    prompt_s = time.perf_counter() - t0
    n = 0
    for _tok in llm.generate(tokens, temp=0.0, reset=False):
        n += 1
        if n >= GEN_TOKENS:
            break
    say(ok=True, prompt_tokens=len(tokens), gen_tokens=n, prompt_tps=round(len(tokens) / prompt_s, 1))
    llm.close()


if __name__ == "__main__":  # python -m edge.hostcheck --child MODEL
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child(sys.argv[2])
    else:
        print("usage: python -m edge.hostcheck --child MODEL (edge runs this itself; see edge doctor)",
              file=sys.stderr)
        sys.exit(2)
