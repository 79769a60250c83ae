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
