"""MODEL resolution and `edge models pull` against a local HTTP server (never the internet)."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from click.testing import CliRunner

from edge import catalog
from edge.cli import cli
from edge.errors import DownloadError, ModelNotFoundError

PAYLOAD = bytes(range(256)) * 4096 + b"tail"  # ~1 MiB, not a multiple of the chunk size


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD with Range support; counts bytes sent per request."""

    sent: list[int] = []

    def do_GET(self) -> None:  # noqa: N802
        start = 0
        rng = self.headers.get("Range")
        if self.path == "/missing":
            self.send_error(404)
            return
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # counted before the write: a client that has read every byte may assert on `sent`
        # before this thread gets to run again (seen once in CI on a loaded machine)
        self.sent.append(len(body))
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    _RangeHandler.sent = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _user_catalog(home: Path, url: str, sha: str, size: int | None = len(PAYLOAD)) -> None:
    size_line = f"size = {size}\n" if size is not None else ""
    (home / "catalog.toml").write_text(
        f'[models.tiny]\nurl = "{url}"\nfile = "tiny.gguf"\nsha256 = "{sha}"\n{size_line}license = "MIT"\n'
    )


GOOD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_pull_downloads_and_verifies(edge_home: Path, server: str) -> None:
    _user_catalog(edge_home, f"{server}/tiny.gguf", GOOD_SHA)
    res = CliRunner().invoke(cli, ["models", "pull", "tiny"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    path = edge_home / "models" / "tiny.gguf"
    assert path.read_bytes() == PAYLOAD and GOOD_SHA in res.output
    assert catalog.resolve_model("tiny") == path


def test_pull_resumes_from_a_partial_file(edge_home: Path, server: str) -> None:
    _user_catalog(edge_home, f"{server}/tiny.gguf", GOOD_SHA)
    part = edge_home / "models" / "tiny.gguf.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:300_000])
    path, digest = catalog.pull("tiny")
    assert digest == GOOD_SHA and path.read_bytes() == PAYLOAD and not part.exists()
    assert _RangeHandler.sent == [len(PAYLOAD) - 300_000]  # only the missing bytes were sent


def test_checksum_mismatch_leaves_nothing(edge_home: Path, server: str) -> None:
    _user_catalog(edge_home, f"{server}/tiny.gguf", "0" * 64)
    res = CliRunner().invoke(cli, ["models", "pull", "tiny"])
    assert res.exit_code == 2 and "failed its check" in res.output and res.output.count("\n") == 1
    assert list((edge_home / "models").iterdir()) == []


def test_interrupted_download_keeps_the_part_for_resume(edge_home: Path, server: str) -> None:
    _user_catalog(edge_home, f"{server}/tiny.gguf", GOOD_SHA)
    real_open = open
    writes = {"n": 0}

    class FailingFile:
        def __init__(self, f):  # type: ignore[no-untyped-def]
            self.f = f

        def __enter__(self):  # type: ignore[no-untyped-def]
            return self

        def __exit__(self, *a):  # type: ignore[no-untyped-def]
            self.f.close()

        def write(self, b: bytes) -> int:
            writes["n"] += 1
            if writes["n"] > 1:
                raise OSError(28, "No space left on device")
            return self.f.write(b)

    def fake_open(path, mode="r", *a, **k):  # type: ignore[no-untyped-def]
        f = real_open(path, mode, *a, **k)
        return FailingFile(f) if str(path).endswith(".part") and "b" in mode and "r" not in mode else f

    with mock.patch("builtins.open", fake_open), pytest.raises(DownloadError, match="again to resume"):
        catalog.pull("tiny")
    part = edge_home / "models" / "tiny.gguf.part"
    assert part.exists() and 0 < part.stat().st_size < len(PAYLOAD)
    assert not (edge_home / "models" / "tiny.gguf").exists()
    path, digest = catalog.pull("tiny")  # the next pull completes it
    assert digest == GOOD_SHA and path.read_bytes() == PAYLOAD


def test_unreachable_and_404_are_one_line_errors(edge_home: Path, server: str) -> None:
    _user_catalog(edge_home, f"{server}/missing", GOOD_SHA)
    with pytest.raises(DownloadError, match="HTTP 404"):
        catalog.pull("tiny")
    _user_catalog(edge_home, "http://127.0.0.1:9/nothing", GOOD_SHA)
    with pytest.raises(DownloadError, match="cannot reach"):
        catalog.pull("tiny", timeout=5)


def test_no_checksum_in_catalog_records_the_digest(edge_home: Path, server: str) -> None:
    _user_catalog(edge_home, f"{server}/tiny.gguf", "", size=None)
    path, digest = catalog.pull("tiny")
    assert (edge_home / "models" / "tiny.gguf.sha256").read_text().startswith(digest)


def test_resolution(bundled_model: Path, tmp_path: Path) -> None:
    assert catalog.resolve_model(None) == bundled_model
    assert catalog.resolve_model("smollm2-135m") == bundled_model
    assert catalog.resolve_model(str(bundled_model)) == bundled_model
    with pytest.raises(ModelNotFoundError, match="Did you mean 'smollm2-135m'"):
        catalog.resolve_model("smollm2-135")
    with pytest.raises(ModelNotFoundError, match="no such file"):
        catalog.resolve_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotFoundError, match="edge models pull llama2-7b-chat-q4km"):
        catalog.resolve_model("llama2-7b-chat-q4km")


def test_models_list_and_info(bundled_model: Path) -> None:
    rows = json.loads(CliRunner().invoke(cli, ["models", "list", "--json"]).output)
    names = {r["name"]: r for r in rows}
    assert names["smollm2-135m"]["default"] and names["smollm2-135m"]["available"]
    assert names["llama2-7b-chat-q4km"]["size"] == 4081004224
    # an 80-column terminal: every description whole, below the table, not squeezed into a column
    for width, inline in ((80, False), (200, True)):
        out = CliRunner().invoke(cli, ["models", "list"], env={"COLUMNS": str(width)}).output
        flat = " ".join(out.split())
        assert all(r["description"] in flat for r in rows) and ("description" in out) == inline
    info = json.loads(CliRunner().invoke(cli, ["models", "info", "--json"]).output)
    assert info["arch"] == "llama" and info["n_layers"] == 30 and info["chat_template"] is True
    text = CliRunner().invoke(cli, ["models", "info"]).output
    assert "Q4_1" in text and "49152" in text and "9 / 3" in text


def test_pull_refuses_a_model_too_big_before_any_byte(edge_home: Path, server: str) -> None:
    """A catalog entry whose (fake) size is beyond this machine's RAM: one line with the
    numbers, exit 2, nothing fetched; --force downloads anyway."""
    _user_catalog(edge_home, f"{server}/model", GOOD_SHA, size=1 << 50)  # 1 PiB
    (edge_home / "catalog.toml").write_text((edge_home / "catalog.toml").read_text() + 'quant = "Q4_0"\n')
    res = CliRunner().invoke(cli, ["models", "pull", "tiny"])
    assert res.exit_code == 2
    line = res.output.strip()
    assert "\n" not in line and line.startswith("Error: tiny needs") and "GiB" in line and "--force" in line
    assert _RangeHandler.sent == []  # the server saw no request
    assert not (edge_home / "models").exists() or not any((edge_home / "models").iterdir())
    res = CliRunner().invoke(cli, ["models", "pull", "tiny", "--force"])
    assert res.exit_code == 2 and _RangeHandler.sent  # bytes came; the size check then fails
    assert "tiny needs" not in res.output


def test_models_list_says_what_fits(edge_home: Path, bundled_model: Path) -> None:
    (edge_home / "catalog.toml").write_text(
        '[models.huge]\nurl = "http://127.0.0.1:9/huge.gguf"\nfile = "huge.gguf"\nquant = "Q4_K_M"\n'
        "shape = { n_layers = 80, n_embd = 8192, n_head = 64, n_head_kv = 8, n_ff = 28672, "
        "n_vocab = 128256, context_length = 8192 }\n")
    rows = {r["name"]: r for r in json.loads(CliRunner().invoke(cli, ["models", "list", "--json"]).output)}
    assert rows["smollm2-135m"]["fits"] == "fits" and rows["smollm2-135m"]["needs_bytes"] < 1 << 30
    assert rows["huge"]["fits"] in ("swap", "oom") and rows["huge"]["needs_bytes"] > 40 << 30
