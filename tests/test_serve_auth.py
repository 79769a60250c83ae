"""edge serve's guards: API keys, non-loopback binds, the queue bound (no generation)."""

from __future__ import annotations

import subprocess

import pytest

from edge.errors import BadOptionError
from edge.serve import check_bind, is_loopback
from tests.conftest import edge_cmd


@pytest.mark.parametrize(("host", "loop"), [
    ("127.0.0.1", True), ("127.3.4.5", True), ("localhost", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("192.168.1.10", False), ("pi5.local", False), ("::", False),
])
def test_is_loopback(host: str, loop: bool) -> None:
    assert is_loopback(host) is loop


def test_non_loopback_needs_key_or_explicit_ok() -> None:
    check_bind("127.0.0.1", None, False)
    check_bind("0.0.0.0", "secret", False)
    check_bind("0.0.0.0", None, True)
    with pytest.raises(BadOptionError, match="--api-key"):
        check_bind("0.0.0.0", None, False)


def test_cli_refuses_open_bind_before_loading(env: dict[str, str]) -> None:
    env.pop("EDGE_API_KEY", None)
    r = subprocess.run([*edge_cmd(), "serve", "--host", "0.0.0.0", "--port", "1"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: --host 0.0.0.0")


@pytest.fixture(scope="module")
def client(runtime):
    """The app in-process over the shared runtime; these requests never generate."""
    from fastapi.testclient import TestClient

    from edge.serve.app import create_app
    from edge.serve.engine import ServeEngine

    engine = ServeEngine(runtime, model_id="m", max_queue=0)
    with TestClient(create_app(engine, api_key="s3cret", aliases=("alias",))) as c:
        yield c, engine


def test_api_key_is_required_except_on_health(client) -> None:
    c, _ = client
    assert c.get("/health").status_code == 200
    r = c.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/metrics").status_code == 401
    ok = c.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "m"


def test_queue_bound_is_exact(client) -> None:
    from edge.serve.engine import QueueFullError

    _, engine = client
    engine.admit()  # the one running place (max_queue 0)
    try:
        with pytest.raises(QueueFullError, match="busy"):
            engine.admit()
    finally:
        engine._release()
    assert engine.in_flight == 0


def test_metrics_show_the_last_fairness_audit_of_this_model(bundled_model) -> None:
    from edge import telemetry
    from edge.gguf_file import inspect
    from edge.serve.metrics import ServeMetrics, last_fairness

    info = inspect(bundled_model)
    telemetry.log("fairness", {"suite": "x", "bias_score": 0.30, "n_items": 10}, model=info)
    telemetry.log("fairness", {"suite": "x", "bias_score": 0.12, "accuracy": 0.9}, model=info)
    assert last_fairness(info.fingerprint) == {"bias_score": 0.12, "accuracy": 0.9}
    assert last_fairness("another-model") == {}
    text = ServeMetrics().render(in_flight=0, max_queue=1, model_id="m",
                                 fairness=last_fairness(info.fingerprint))
    assert 'edge_fairness{metric="bias_score"} 0.12' in text
    assert 'edge_fairness{metric="accuracy"} 0.9' in text


def test_histogram_buckets_are_cumulative() -> None:
    from edge.serve.metrics import ServeMetrics

    m = ServeMetrics()
    for s in (0.01, 0.3, 0.3, 7.0, 1000.0):
        m.observe_request("/v1/x", 200, s)
    text = m.render(in_flight=0, max_queue=0, model_id="m")
    counts = {line.split('le="')[1].split('"')[0]: float(line.split()[-1])
              for line in text.splitlines() if line.startswith("edge_request_duration_seconds_bucket")}
    assert counts["0.05"] == 1 and counts["0.5"] == 3 and counts["10"] == 4
    assert counts["300"] == 4 and counts["+Inf"] == 5
    assert 'edge_requests_total{endpoint="/v1/x",status="200"} 5' in text
