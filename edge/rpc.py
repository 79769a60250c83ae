"""llama.cpp's RPC backend through the ggml libraries that llama-cpp-python ships.

`edge worker` serves this device's CPU to other machines (ggml_backend_rpc_start_server);
`--rpc HOST:PORT,...` registers those workers (ggml_backend_rpc_add_server +
ggml_backend_register) and loads a model onto them. Two things llama.cpp does not do for
us, measured with llama-cpp-python 0.3.36:
- CPU-only workers' RPC devices are not picked by the default device selection, so
  llama_model_params.devices is set explicitly (a NULL-terminated array of them);
- an unreachable or dead worker is a GGML_ABORT (the process aborts), so endpoints are
  probed first, and an abort callback turns a worker lost mid-run into one line + exit 2.
The protocol has no authentication: workers bind to loopback unless told otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from edge.errors import BadOptionError, EdgeError


class RpcError(EdgeError):
    """An RPC worker is unreachable, or the RPC backend is missing from this build."""


DEFAULT_PORT = 50052
PROBE_TIMEOUT_S = 3.0
_ENDPOINT = re.compile(r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoints(text: str | list[str]) -> list[Endpoint]:
    """'HOST:PORT,HOST:PORT' (or a list of them) → endpoints; BadOptionError otherwise."""
    items = text if isinstance(text, list) else text.split(",")
    out: list[Endpoint] = []
    for raw in (i.strip() for i in items):
        m = _ENDPOINT.match(raw)
        port = int(m["port"]) if m else 0
        if not m or not 1 <= port <= 65535:
            raise BadOptionError(f"--rpc '{raw}' is not HOST:PORT (e.g. 192.168.1.20:{DEFAULT_PORT})")
        ep = Endpoint(m["v6"] or m["host"], port)
        if ep in out:
            raise BadOptionError(f"--rpc lists {ep} twice")
        out.append(ep)
    if not out:
        raise BadOptionError("--rpc needs at least one HOST:PORT")
    return out


def probe(endpoints: list[Endpoint], timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail with one line, now, for an endpoint llama.cpp would abort the process on."""
    for ep in endpoints:
        try:
            with socket.create_connection((ep.host, ep.port), timeout=timeout):
                pass
        except OSError as e:
            reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
            raise RpcError(f"RPC worker {ep} is unreachable ({reason}); start `edge worker "
                           f"--port {ep.port}` there, or leave it out of --rpc") from None


# ---- the ggml libraries -----------------------------------------------------------------
def lib_dir() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


@lru_cache(maxsize=1)
def _libs() -> dict[str, Any]:
    import llama_cpp  # noqa: F401  (loads libllama and the ggml libraries first)

    d = lib_dir()
    if not any(d.glob("libggml-rpc.so*")):
        raise RpcError(f"this llama-cpp-python has no RPC backend (no libggml-rpc.so in {d}); "
                       "reinstall it with CMAKE_ARGS=-DGGML_RPC=ON (see firmware_scripts/setup_pi.sh)")
    base, ggml, rpc = (_loaded(d, n) for n in ("libggml-base", "libggml", "libggml-rpc"))
    vp, sz, cp = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
    sigs: list[tuple[Any, str, Any, list[Any]]] = [
        (rpc, "ggml_backend_rpc_add_server", vp, [cp]),
        (rpc, "ggml_backend_rpc_start_server", None, [cp, cp, sz, sz, ctypes.POINTER(vp)]),
        (ggml, "ggml_backend_register", None, [vp]),
        (ggml, "ggml_backend_dev_by_type", vp, [ctypes.c_int]),
        (base, "ggml_backend_reg_dev_count", sz, [vp]),
        (base, "ggml_backend_reg_dev_get", vp, [vp, sz]),
        (base, "ggml_backend_dev_name", cp, [vp]),
        (base, "ggml_backend_dev_description", cp, [vp]),
        (base, "ggml_backend_dev_memory", None, [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)]),
        (base, "ggml_set_abort_callback", vp, [vp]),
    ]
    fns: dict[str, Any] = {}
    for lib, name, res, args in sigs:
        try:
            f = getattr(lib, name)
        except AttributeError:
            raise RpcError(f"{name} is missing from {lib._name}; this llama-cpp-python is "
                           "too old for edge's RPC support (need ≥ 0.3.30)") from None
        f.restype, f.argtypes = res, args
        fns[name] = f
    return fns


def _loaded(d: Path, stem: str) -> ctypes.CDLL:
    """The copy of a library that libllama already loaded. Wheels hold the .so, .so.0 and
    .so.X.Y.Z names as separate files, so opening another name would load a second ggml
    with its own registry and abort callback."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    found = re.findall(rf"({re.escape(str(d))}/{re.escape(stem)}\.so[.0-9]*)$", maps, re.M)
    return ctypes.CDLL(sorted(found, key=len)[0] if found else str(d / f"{stem}.so"))


@dataclass
class RpcDevice:
    name: str  # llama.cpp's name ("RPC0", ...); the endpoint tells workers apart
    endpoint: str
    free_bytes: int
    total_bytes: int


_registered: dict[str, list[int]] = {}  # endpoint -> device handles, registered once
_lock = threading.Lock()


def register(endpoints: list[Endpoint]) -> list[int]:
    """Add each worker to ggml's registry (once per process) and return its devices."""
    fns = _libs()
    probe(endpoints)
    install_abort_handler()
    devices: list[int] = []
    with _lock:
        for ep in endpoints:
            key = str(ep)
            if key not in _registered:
                reg = fns["ggml_backend_rpc_add_server"](key.encode())
                n = fns["ggml_backend_reg_dev_count"](reg) if reg else 0
                if not n:
                    raise RpcError(f"RPC worker {ep} answered but offers no device; check that "
                                   "it runs the same llama.cpp version (edge --version there)")
                fns["ggml_backend_register"](reg)
                _registered[key] = [fns["ggml_backend_reg_dev_get"](reg, i) for i in range(n)]
            devices += _registered[key]
    return devices


def rpc_timeout_s() -> float:
    """How long one RPC reply may take before the worker counts as lost (EDGE_RPC_TIMEOUT)."""
    try:
        return max(1.0, float(os.environ.get("EDGE_RPC_TIMEOUT", "120")))
    except ValueError:
        return 120.0


def bound_waits(endpoints: list[Endpoint]) -> int:
    """Put a receive/send timeout on llama.cpp's sockets to these workers (Linux).

    The RPC client blocks without limit on a worker that froze or a network that went
    away; with SO_RCVTIMEO its read fails instead, which llama.cpp reports as a lost
    server (GGML_ABORT → the abort handler's one line). Returns the sockets changed."""
    import struct

    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        return 0
    wanted = set()
    for ep in endpoints:
        with contextlib.suppress(OSError):
            wanted |= {(a[4][0], ep.port) for a in socket.getaddrinfo(ep.host, ep.port)}
    secs = rpc_timeout_s()
    tv = struct.pack("ll", int(secs), int((secs % 1) * 1e6))
    n = 0
    for entry in fd_dir.iterdir():
        try:
            if not os.readlink(entry).startswith("socket:"):
                continue
            fd = int(entry.name)
            sock = socket.socket(fileno=fd)
        except (OSError, ValueError):
            continue
        try:
            if sock.type == socket.SOCK_STREAM and tuple(sock.getpeername()[:2]) in wanted:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
                n += 1
        except OSError:
            pass
        finally:
            sock.detach()  # the fd stays llama.cpp's
    return n


def describe(devices: list[int]) -> list[RpcDevice]:
    fns = _libs()
    out = []
    for d in devices:
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        fns["ggml_backend_dev_memory"](d, ctypes.byref(free), ctypes.byref(total))
        out.append(RpcDevice(fns["ggml_backend_dev_name"](d).decode(),
                             fns["ggml_backend_dev_description"](d).decode(), free.value, total.value))
    return out


@dataclass
class RpcSplit:
    """Where llama.cpp put a model, from its load log: layers and buffer bytes per device."""

    devices: list[RpcDevice]
    layers: dict[str, list[int]]  # device name ("RPC0", "CPU") -> layer indices
    buffers: dict[str, dict[str, int]]  # buffer name ("RPC0[host:port]", "CPU_Mapped") -> kind -> bytes

    def by_endpoint(self) -> list[dict[str, Any]]:
        rows = []
        for d in self.devices:
            nbytes = {k: sum(v.get(k, 0) for name, v in self.buffers.items()
                             if name.endswith(f"[{d.endpoint}]")) for k in ("model", "KV", "compute")}
            rows.append({"endpoint": d.endpoint, "device": d.name, "layers": self.layers.get(d.name, []),
                         "model_bytes": nbytes["model"], "kv_bytes": nbytes["KV"],
                         "compute_bytes": nbytes["compute"]})
        return rows

    def to_dict(self) -> dict[str, Any]:
        local = {name: v for name, v in self.buffers.items() if "[" not in name}
        return {"workers": self.by_endpoint(), "local_buffers": local}


_LAYER = re.compile(r"layer\s+(\d+) assigned to device (\S+?),")
_BUFFER = re.compile(r"(\S+)\s+(model|KV|compute|output) buffer size =\s+([\d.]+) MiB")
_last_split: RpcSplit | None = None
_load_lock = threading.Lock()


def last_split() -> RpcSplit | None:
    """The split of the model loaded last with --rpc in this process."""
    return _last_split


def _parse_split(log: str, devices: list[int]) -> RpcSplit:
    layers: dict[str, list[int]] = {}
    for m in _LAYER.finditer(log):
        layers.setdefault(m[2], []).append(int(m[1]))
    buffers: dict[str, dict[str, int]] = {}
    for m in _BUFFER.finditer(log):
        kinds = buffers.setdefault(m[1], {})
        kinds[m[2]] = kinds.get(m[2], 0) + int(float(m[3]) * 2**20)
    return RpcSplit(describe(devices), layers, buffers)


@contextlib.contextmanager
def offload_to(endpoints: list[str] | str,
               tensor_split: list[float] | None = None) -> Iterator[list[int]]:
    """While active, llama_cpp.Llama(...) built with n_gpu_layers=-1 puts its layers on the
    workers: llama-cpp-python has no `devices` argument, so the default model params it
    starts from get the NULL-terminated device array (restored on exit). llama.cpp's load
    log is read meanwhile for the split report (last_split())."""
    global _last_split
    import llama_cpp.llama_cpp as C

    from edge.llamacpp import log_lines

    eps = parse_endpoints(endpoints)
    devices = register(eps)
    if tensor_split is not None and (len(tensor_split) != len(devices) or sum(tensor_split) <= 0
                                     or min(tensor_split) < 0):
        raise BadOptionError(
            f"--tensor-split needs {len(devices)} non-negative shares, one per RPC device "
            f"({', '.join(str(e) for e in eps)}), e.g. --tensor-split {','.join(['1'] * len(devices))}")
    arr = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
    original = C.llama_model_default_params

    def params() -> Any:
        p = original()
        p.devices = ctypes.cast(arr, ctypes.c_void_p)
        return p

    with _load_lock, log_lines() as lines:
        C.llama_model_default_params = params
        try:
            yield devices
        finally:
            C.llama_model_default_params = original
        _last_split = _parse_split("".join(lines), devices)
        bound_waits(eps)  # the model's connections exist only now


# ---- a worker lost mid-run ------------------------------------------------------------
_ABORT_CB = ctypes.CFUNCTYPE(None, ctypes.c_char_p)


@_ABORT_CB
def _on_abort(message: bytes | None) -> None:
    # Called by GGML_ABORT just before abort(): the process cannot continue, so say what
    # happened in one line and exit with edge's usual code instead of a core dump.
    text = (message or b"").decode("utf-8", "replace").strip()
    if "RPC" in text or "rpc" in text:
        line = ("Error: an RPC worker stopped answering (" + text.split(": ", 1)[-1] +
                "); check the workers (edge worker) and the network, then retry")
    else:
        line = f"Error: llama.cpp aborted: {text}"
    os.write(2, (" ".join(line.split()) + "\n").encode())
    os._exit(2)


_handler_installed = False


def install_abort_handler() -> None:
    global _handler_installed
    if not _handler_installed:
        _libs()["ggml_set_abort_callback"](ctypes.cast(_on_abort, ctypes.c_void_p))
        _handler_installed = True


# ---- edge worker ------------------------------------------------------------------------
def check_worker_bind(host: str, accept_no_auth: bool) -> bool:
    """True when the bind needs the no-authentication warning; refuses it unless accepted."""
    from edge.netaddr import is_loopback

    if is_loopback(host):
        return False
    if not accept_no_auth:
        raise BadOptionError(
            f"--host {host} would let anyone who can reach this device run code on its CPU "
            "(the RPC protocol has no authentication); add --i-understand-no-auth on a "
            "trusted network only")
    return True


def start_worker(host: str = "127.0.0.1", port: int = DEFAULT_PORT, threads: int | None = None,
                 cache_dir: str | None = None) -> None:
    """Serve this device's CPU to RPC clients until the process is stopped.

    ggml_backend_rpc_start_server blocks for ever, so it runs on a daemon thread and the
    main thread waits (Ctrl-C and SIGTERM still work). It returns only when it could not
    listen."""
    from edge.hostcheck import ensure_llama_works
    from edge.system import default_threads

    ensure_llama_works()  # the worker computes for its clients: it must not trap either
    fns = _libs()
    cpu = fns["ggml_backend_dev_by_type"](0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not cpu:
        raise RpcError("ggml has no CPU device here; reinstall llama-cpp-python")
    devs = (ctypes.c_void_p * 1)(cpu)
    endpoint = str(Endpoint(host, port)).encode()
    cdir = cache_dir.encode() if cache_dir else None
    n = threads or default_threads()
    sys.stdout.flush()
    t = threading.Thread(target=fns["ggml_backend_rpc_start_server"],
                         args=(endpoint, cdir, n, 1, devs), daemon=True, name="edge-rpc")
    t.start()
    while t.is_alive():
        t.join(0.5)
    raise RpcError(f"could not listen on {host}:{port} (in use, or not an address of this "
                   "device); choose another --port or --host")
