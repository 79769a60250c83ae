"""edge serve --correction: the server generates what a corrected Runtime generates."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import edge_cmd
from tests.test_serve import free_port

PROMPT = "The nurse said that"


def test_served_correction_equals_corrected_runtime(bundled_model: Path, tmp_path: Path,
                                                    env: dict[str, str]) -> None:
    from edge.cvec import load_correction, write
    from edge.runtime import Runtime, RuntimeConfig
    from edge.sampling import Sampling

    rng = np.random.default_rng(0)
    d = rng.standard_normal((30, 576)).astype(np.float32) * 0.5
    cvec = write(tmp_path / "c.gguf", d)

    rt = Runtime(bundled_model, RuntimeConfig(n_ctx=256, threads=1))
    try:
        plain = rt.generate(PROMPT, max_tokens=12, sampling=Sampling(temp=0)).text
        load_correction(rt, cvec, 1.0)
        corrected = rt.generate(PROMPT, max_tokens=12, sampling=Sampling(temp=0)).text
    finally:
        rt.close()
    assert corrected != plain  # the vector is strong enough to matter

    port = free_port()
    proc = subprocess.Popen([*edge_cmd(), "serve", "--port", str(port), "--ctx", "256", "-t", "1",
                             "--correction", str(cvec)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                httpx.get(base + "/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "edge serve did not come up"
                time.sleep(0.2)
        r = httpx.post(base + "/v1/completions", timeout=60,
                       json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == corrected
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.parametrize("content", [b"not a gguf at all"])
def test_bad_correction_file_is_one_line(tmp_path: Path, env: dict[str, str], content: bytes) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    r = subprocess.run([*edge_cmd(), "serve", "--port", str(free_port()), "--correction", str(bad)],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("Error:")
