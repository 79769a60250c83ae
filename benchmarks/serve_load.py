"""Load test of `edge serve` on loopback: N concurrent clients × M chat requests each.

Starts its own server on 127.0.0.1 (a free port, a temporary EDGE_HOME), warms it up
with one request, then runs the clients and prints: requests by outcome (only 429s are
allowed besides 200s), client-side latency p50/p90/p99, generated tokens/s overall, the
server's RSS before (after warm-up) and after the run, and whether every request left one
latency record. Bounded in count (clients × requests) and in time (--max-seconds: clients
stop starting new requests past it). Traffic goes to 127.0.0.1 only.

    python benchmarks/serve_load.py                        # 8 × 20, max_tokens 16
    python benchmarks/serve_load.py --queue 2              # fewer places: expect 429s
    python benchmarks/serve_load.py --stream --json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil

HOST = "127.0.0.1"  # never anything else: this is a load generator
PROMPTS = ["Name a colour.", "What is 2+2?", "Say hello in French.", "Name a planet.",
           "Give one word that rhymes with cat.", "What is the capital of Italy?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(port: int, home: str, args: argparse.Namespace) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "edge"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edge"]
    cmd += ["serve", "--host", HOST, "--port", str(port), "--ctx", str(args.ctx),
            "--queue", str(args.queue)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, EDGE_HOME=home)
    env.pop("EDGE_API_KEY", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"edge serve exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("edge serve did not come up within 120 s")


def one_request(client: httpx.Client, base: str, i: int, args: argparse.Namespace) -> tuple[int, float, int]:
    body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": args.max_tokens, "temperature": 0.7, "seed": i, "stream": args.stream}
    t0 = time.perf_counter()
    try:
        if args.stream:
            n = 0
            with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {") and '"content"' in line:
                        n += 1
                status = r.status_code
            return status, time.perf_counter() - t0, max(0, n - 1)  # minus the role chunk
        r = client.post(base + "/v1/chat/completions", json=body)
        toks = r.json().get("usage", {}).get("completion_tokens", 0) if r.status_code == 200 else 0
        return r.status_code, time.perf_counter() - t0, toks
    except httpx.HTTPError as e:
        return -1 if not isinstance(e, httpx.TimeoutException) else -2, time.perf_counter() - t0, 0


def run(args: argparse.Namespace) -> dict:
    port = free_port()
    base = f"http://{HOST}:{port}"
    with tempfile.TemporaryDirectory(prefix="edge-serve-load-") as home:
        proc = start_server(port, home, args)
        ps = psutil.Process(proc.pid)
        try:
            with httpx.Client(timeout=args.request_timeout) as c:
                one_request(c, base, 0, args)  # warm-up: buffers allocated, caches filled
            rss_before = ps.memory_info().rss
            stop_at = time.monotonic() + args.max_seconds
            results: list[tuple[int, float, int]] = []
            lock = threading.Lock()

            def client_loop(k: int) -> None:
                with httpx.Client(timeout=args.request_timeout) as c:
                    for j in range(args.requests):
                        if time.monotonic() > stop_at:
                            return
                        res = one_request(c, base, k * args.requests + j + 1, args)
                        with lock:
                            results.append(res)
                        if res[0] == 429:
                            time.sleep(args.backoff)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(client_loop, range(args.clients)))
            wall = time.perf_counter() - t0
            time.sleep(0.5)
            rss_after = ps.memory_info().rss
            metrics = httpx.get(base + "/metrics", timeout=10).text
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        logged = 0
        for p in Path(home, "logs").glob("runs-*.jsonl"):
            logged += sum(1 for line in p.read_text().splitlines()
                          if '"kind": "latency"' in line or '"kind":"latency"' in line)
    status = Counter(r[0] for r in results)
    ok = [r for r in results if r[0] == 200]
    lat = np.array([r[1] for r in ok]) if ok else np.zeros(1)
    tokens = sum(r[2] for r in ok)
    return {
        "clients": args.clients, "requests_per_client": args.requests, "sent": len(results),
        "planned": args.clients * args.requests, "stream": args.stream, "max_tokens": args.max_tokens,
        "queue": args.queue, "status": {str(k): v for k, v in sorted(status.items())},
        "errors": sum(v for k, v in status.items() if k not in (200, 429)),
        "p50_s": round(float(np.percentile(lat, 50)), 3), "p90_s": round(float(np.percentile(lat, 90)), 3),
        "p99_s": round(float(np.percentile(lat, 99)), 3), "max_s": round(float(lat.max()), 3),
        "wall_s": round(wall, 2), "gen_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
        "rss_before_mib": round(rss_before / 2**20, 1), "rss_after_mib": round(rss_after / 2**20, 1),
        "rss_change_pct": round((rss_after / rss_before - 1) * 100, 2),
        "latency_records": logged, "latency_records_expected": len(ok) + 1,  # + warm-up
        "metrics_rejected": next((float(line.split()[1]) for line in metrics.splitlines()
                                  if line.startswith("edge_rejected_total ")), None),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=20, help="per client")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--queue", type=int, default=8, help="edge serve --queue")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1, help="server threads (1: fair on a shared machine)")
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=600, help="stop starting requests after this")
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--backoff", type=float, default=0.2, help="client pause after a 429")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not (1 <= args.clients <= 64 and 1 <= args.requests <= 1000):
        ap.error("keep it bounded: 1-64 clients, 1-1000 requests each")
    out = run(args)
    if args.json:
        print(json.dumps(out))
        return
    print(f"edge serve load: {out['clients']} clients x {out['requests_per_client']} requests "
          f"(sent {out['sent']}/{out['planned']}), max_tokens {out['max_tokens']}, "
          f"queue {out['queue']}, stream={out['stream']}")
    print(f"  status         {out['status']}   errors (not 200/429): {out['errors']}")
    print(f"  latency        p50 {out['p50_s']} s   p90 {out['p90_s']} s   p99 {out['p99_s']} s   "
          f"max {out['max_s']} s")
    print(f"  throughput     {out['gen_tokens']} tokens in {out['wall_s']} s = {out['tokens_per_s']} tok/s")
    print(f"  server RSS     {out['rss_before_mib']} MiB -> {out['rss_after_mib']} MiB "
          f"({out['rss_change_pct']:+.2f}%, target within ±10%)")
    print(f"  latency log    {out['latency_records']} records for {out['latency_records_expected']} "
          "answered requests")
    sys.exit(0 if out["errors"] == 0 and abs(out["rss_change_pct"]) <= 10 else 1)


if __name__ == "__main__":
    main()
