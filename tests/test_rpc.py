"""edge worker + --rpc: real llama.cpp RPC workers on 127.0.0.1, the bundled model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from edge.errors import BadOptionError
from edge.rpc import Endpoint, check_worker_bind, parse_endpoints
from tests.conftest import edge_cmd

PROMPT = "Once upon a time"


@pytest.mark.parametrize(("text", "want"), [
    ("127.0.0.1:50052", [Endpoint("127.0.0.1", 50052)]),
    ("a.local:1,b:65535", [Endpoint("a.local", 1), Endpoint("b", 65535)]),
    ("[::1]:50052", [Endpoint("::1", 50052)]),
])
def test_parse_endpoints(text: str, want: list[Endpoint]) -> None:
    got = parse_endpoints(text)
    assert got == want
    assert ",".join(map(str, got)) == text.replace(" ", "")


@pytest.mark.parametrize("text", ["", "host", "host:", ":50052", "h:0", "h:65536", "h:p",
                                  "a:1,a:1", "1.2.3.4:5:6"])
def test_parse_endpoints_rejects(text: str) -> None:
    with pytest.raises(BadOptionError):
        parse_endpoints(text)


def test_worker_bind_rules() -> None:
    assert check_worker_bind("127.0.0.1", False) is False
    assert check_worker_bind("192.168.1.20", True) is True  # warn, but allowed
    with pytest.raises(BadOptionError, match="--i-understand-no-auth"):
        check_worker_bind("0.0.0.0", False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("args", "needle"), [
    (["--rpc", "nope"], "is not HOST:PORT"),
    (["--rpc", "127.0.0.1:70000"], "is not HOST:PORT"),
    (["--rpc", "127.0.0.1:{free}"], "is unreachable"),
    (["--tensor-split", "1,1"], "give --rpc too"),
    (["--rpc", "127.0.0.1:{free}", "--tensor-split", "x"], "not a list of numbers"),
])
def test_bad_rpc_is_one_line_exit_2(env: dict[str, str], args: list[str], needle: str) -> None:
    args = [a.format(free=free_port()) for a in args]
    r = subprocess.run([*edge_cmd(), "run", "-p", "hi", "-n", "2", *args], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and needle in r.stderr and r.stdout == ""


def test_worker_refuses_open_bind(env: dict[str, str]) -> None:
    r = subprocess.run([*edge_cmd(), "worker", "--host", "0.0.0.0", "--port", str(free_port())],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("Error: --host 0.0.0.0")


@pytest.fixture
def start_worker(env: dict[str, str]) -> Iterator[Callable[[], tuple[subprocess.Popen, int]]]:
    procs: list[subprocess.Popen] = []

    def start() -> tuple[subprocess.Popen, int]:
        port = free_port()
        p = subprocess.Popen([*edge_cmd(), "worker", "--port", str(port), "--threads", "1"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert p.poll() is None, "edge worker exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return p, port
            except OSError:
                time.sleep(0.2)
        raise AssertionError("edge worker did not listen within 30 s")

    yield start
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.slow
def test_two_workers_give_the_local_text_in_run_chat_bench(env: dict[str, str], start_worker) -> None:
    from edge.generate import run_prompt
    from edge.runtime import RuntimeConfig
    from edge.sampling import Sampling

    (_, p1), (_, p2) = start_worker(), start_worker()
    r = subprocess.run([*edge_cmd(), "run", "--raw", "--temp", "0", "-n", "16", "--ctx", "256",
                        "-t", "1", "-p", PROMPT, "--json", "--rpc", f"127.0.0.1:{p1},127.0.0.1:{p2}"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    local = run_prompt(None, PROMPT, max_tokens=16, sampling=Sampling(temp=0), mode="raw",
                       config=RuntimeConfig(n_ctx=256, threads=1))
    assert out["text"] == local.stats.text and out["n_gen_tokens"] == 16
    workers = out["rpc"]["workers"]
    assert [w["endpoint"] for w in workers] == [f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"]
    layers = sorted(i for w in workers for i in w["layers"])
    assert layers == list(range(31))  # 30 blocks + the output layer, all remote
    assert all(w["layers"] and w["model_bytes"] > 1 << 20 for w in workers)

    # --tensor-split 3,1 gives the first worker about three times the layers
    r = subprocess.run([*edge_cmd(), "run", "--raw", "--temp", "0", "-n", "4", "--ctx", "64", "-t", "1",
                        "-p", PROMPT, "--json", "--rpc", f"127.0.0.1:{p1},127.0.0.1:{p2}",
                        "--tensor-split", "3,1"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    n1, n2 = (len(w["layers"]) for w in json.loads(r.stdout)["rpc"]["workers"])
    assert n1 + n2 == 31 and 2.5 <= n1 / n2 <= 4

    # edge chat and edge bench take the same --rpc; bench reports the split per worker
    rpc = f"127.0.0.1:{p1},127.0.0.1:{p2}"
    chat = [*edge_cmd(), "chat", "--temp", "0", "-n", "12", "--ctx", "256", "-t", "1"]
    remote = subprocess.run([*chat, "--rpc", rpc], input="Hi!\n", env=env, capture_output=True,
                            text=True, timeout=120)
    here = subprocess.run(chat, input="Hi!\n", env=env, capture_output=True, text=True, timeout=120)
    assert remote.returncode == 0 and remote.stdout.strip() and remote.stdout == here.stdout
    b = subprocess.run([*edge_cmd(), "bench", "--rpc", rpc, "--pp", "8", "--tg", "4", "--reps", "1",
                        "--warmup", "0", "-t", "1", "--ctx", "32", "--json"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert b.returncode == 0, b.stderr
    rec = json.loads(b.stdout)["tests"][0]
    assert rec["config"]["rpc"] == rpc.split(",")
    split = rec["metrics"]["rpc_split"]["workers"]
    assert [len(w["layers"]) for w in split] == [len(w["layers"]) for w in workers]


@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_lost_worker_is_one_line_not_a_hang(env: dict[str, str], start_worker, how: str) -> None:
    worker, port = start_worker()
    env = env | {"EDGE_RPC_TIMEOUT": "3"}
    p = subprocess.Popen([*edge_cmd(), "run", "--raw", "--temp", "0", "-n", "2000", "--ctx", "2048",
                          "-t", "1", "-p", PROMPT, "--rpc", f"127.0.0.1:{port}"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.read(8)  # generation is under way
    os.kill(worker.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    try:
        rc = p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail("edge run hung after its worker was lost")
    err = p.stderr.read().decode()
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("Error: an RPC worker stopped answering")


def test_worker_on_a_busy_port_is_one_line_error(env: dict[str, str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([*edge_cmd(), "worker", "--port", str(port)], env=env,
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1].startswith(f"Error: could not listen on 127.0.0.1:{port}")
