"""edge serve end to end: a real server process on 127.0.0.1, the official openai client,
the bundled model. The server runs with --queue 0 so one busy request is enough for 429."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import edge_cmd

PROMPT = "Name one colour of the rainbow."
N_CTX = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    import os

    home = tmp_path_factory.mktemp("serve_home")
    env = dict(os.environ, EDGE_HOME=str(home))
    env.pop("EDGE_API_KEY", None)
    port = free_port()
    proc = subprocess.Popen(
        [*edge_cmd(), "serve", "--host", "127.0.0.1", "--port", str(port), "--ctx", str(N_CTX),
         "--queue", "0", "--threads", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"edge serve exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("edge serve did not come up within 60 s")
    yield {"base": base, "home": home, "proc": proc}
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def latency_records(home: Path) -> list[dict]:
    out = []
    for p in sorted((home / "logs").glob("runs-*.jsonl")):
        out += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return [r for r in out if r["kind"] == "latency" and r["metrics"]["command"] == "serve"]


def wait_idle(base: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{base}/health", timeout=5).json()["in_flight"] == 0:
            return
        time.sleep(0.1)
    pytest.fail("the server never became idle")


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_openai_client_chat_equals_edge_run(server: dict) -> None:
    from openai import OpenAI

    from edge.generate import run_prompt
    from edge.runtime import RuntimeConfig
    from edge.sampling import Sampling

    client = OpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0, timeout=120)
    msgs = [{"role": "user", "content": PROMPT}]
    plain = client.chat.completions.create(model="smollm2-135m", messages=msgs, temperature=0,
                                           max_tokens=24)
    stream = client.chat.completions.create(model="smollm2-135m", messages=msgs, temperature=0,
                                            max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    local = run_prompt(None, PROMPT, max_tokens=24, sampling=Sampling(temp=0), mode="chat",
                       config=RuntimeConfig(n_ctx=N_CTX, threads=1))

    assert local.stats.text.strip()
    assert plain.choices[0].message.content == local.stats.text
    assert streamed == local.stats.text
    assert plain.usage.completion_tokens == local.stats.n_gen_tokens
    assert chunks[-1].usage.completion_tokens == local.stats.n_gen_tokens
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [plain.choices[0].finish_reason]
    assert [m.id for m in client.models.list().data] == ["smollm2-135m"]
    recs = latency_records(server["home"])
    assert len(recs) >= 2 and recs[-1]["metrics"]["n_gen_tokens"] == local.stats.n_gen_tokens


def test_completions_endpoint_is_raw_text(server: dict) -> None:
    from edge.generate import run_prompt
    from edge.runtime import RuntimeConfig
    from edge.sampling import Sampling

    r = httpx.post(server["base"] + "/v1/completions", timeout=120,
                   json={"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    local = run_prompt(None, "Once upon a time", max_tokens=12, sampling=Sampling(temp=0),
                       mode="raw", config=RuntimeConfig(n_ctx=N_CTX, threads=1))
    assert r.json()["choices"][0]["text"] == local.stats.text


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"{not json", 400, "invalid_json"),
    (json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}).encode(),
     404, "model_not_found"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100_000}).encode(),
     400, "context_length_exceeded"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": -1}).encode(),
     400, None),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, None),
])
def test_bad_requests_get_json_4xx(server: dict, body: bytes, status: int, code: str | None) -> None:
    r = httpx.post(server["base"] + "/v1/chat/completions", content=body, timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["code"] == code


def test_openai_client_raises_on_unknown_model(server: dict) -> None:
    import openai

    client = openai.OpenAI(base_url=server["base"] + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])


def test_queue_full_429_and_disconnect_cancels(server: dict) -> None:
    base = server["base"]
    wait_idle(base)
    before = latency_records(server["home"])
    body = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as c, c.stream("POST", base + "/v1/chat/completions",
                                                   json=body) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        got = [next(lines) for _ in range(6)]  # role chunk + a few tokens
        assert any('"content"' in g for g in got)
        busy = httpx.post(base + "/v1/chat/completions", json=body | {"stream": False}, timeout=30)
        assert busy.status_code == 429
        assert busy.json()["error"]["code"] == "queue_full"
    # leaving the `with` closed the connection mid-stream
    wait_idle(base)
    m = httpx.get(base + "/metrics", timeout=10).text
    assert metric(m, "edge_cancelled_total") == 1
    assert metric(m, "edge_rejected_total") >= 1
    assert metric(m, 'edge_requests_total{endpoint="/v1/chat/completions",status="499"}') == 1
    new = latency_records(server["home"])[len(before):]
    assert len(new) == 1
    assert new[0]["metrics"]["stop_reason"] == "interrupted"
    assert 0 < new[0]["metrics"]["n_gen_tokens"] < 400
    # and the server still answers afterwards
    ok = httpx.post(base + "/v1/chat/completions", timeout=60,
                    json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert ok.status_code == 200


def test_metrics_is_prometheus_text(server: dict) -> None:
    r = httpx.get(server["base"] + "/metrics", timeout=10)
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert "# TYPE edge_request_duration_seconds histogram" in text
    assert metric(text, 'edge_request_duration_seconds_bucket{le="+Inf"}') == metric(
        text, "edge_request_duration_seconds_count")
    assert metric(text, "edge_generated_tokens_total") > 0
    assert 'edge_model_info{model="smollm2-135m"} 1' in text
