"""`edge chat` as a person uses it: a real terminal (pexpect), and as a pipe."""

from __future__ import annotations

import re
import subprocess

import pexpect
import pytest

from tests.conftest import edge_cmd

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_chat_in_a_terminal(env: dict[str, str]) -> None:
    cmd = edge_cmd()
    child = pexpect.spawn(cmd[0], [*cmd[1:], "chat", "-n", "400", "--temp", "0.7", "--seed", "3"],
                          env=env, encoding="utf-8", timeout=180, dimensions=(40, 120))
    try:
        child.expect("/help for commands")
        child.expect(">>> ")
        child.sendline("What is the capital of France? Answer in one word.")
        child.expect(r"\n(.+)\r\n\r\n>>> ")  # a streamed answer, then a fresh prompt
        assert len(child.match.group(1).strip()) > 0

        # Ctrl-C mid-answer stops it and keeps the session.
        child.sendline("Write a very long story about a dragon and a knight, with many chapters.")
        child.expect(r"chapters\.\r\n")  # our own line, echoed by the terminal
        child.expect(r"\w+ \w+ \w+")  # the answer has started streaming
        child.sendintr()
        child.expect(r"\[stopped\]")
        child.expect(">>> ")

        child.sendline("/stats")
        child.expect(r"turns 2 · context (\d+)/2048 tokens")
        assert int(child.match.group(1)) > 20
        child.expect(r"stop: interrupted")
        child.expect(">>> ")

        child.sendline("/reset")
        child.expect(r"\(conversation cleared\)")
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect(r"context 0/2048")
        child.expect(">>> ")

        child.sendeof()  # Ctrl-D
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, ANSI.sub("", child.before or "")


def test_piped_chat_prints_only_answers(env: dict[str, str]) -> None:
    out = subprocess.run([*edge_cmd(), "chat", "--temp", "0", "-n", "24"], input="Hello!\nWhat is 2+2?\n",
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert len(lines) >= 2 and ">>>" not in out.stdout and "/help" not in out.stdout
    assert out.stderr == ""


@pytest.mark.slow
def test_thirty_turns_in_a_tiny_context_never_fail(env: dict[str, str]) -> None:
    # 256 tokens hold ~3 turns of 48-token answers: history is cut on almost every turn
    turns = [f"Tell me one fact about the number {i}." for i in range(30)]
    script = "\n".join(turns + ["/stats"]) + "\n"
    out = subprocess.run([*edge_cmd(), "chat", "--ctx", "256", "-n", "48", "--temp", "0", "--threads", "2"], input=script,
                         env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Error" not in out.stdout and out.stderr == ""
    stats = re.search(r"turns (\d+) · context (\d+)/256 tokens .* (\d+) old messages trimmed", out.stdout)
    assert stats, out.stdout[-500:]
    turns_done, used, trimmed = map(int, stats.groups())
    assert turns_done == 30 and used <= 256 and trimmed >= 30  # history was cut, repeatedly


def test_session_trims_keeps_reuse_and_saves(runtime, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json as _json

    from edge.chat import ChatSession
    from edge.sampling import Sampling

    s = ChatSession(runtime, system="Be brief.", max_tokens=8, sampling=Sampling(temp=0))
    s.reserve = runtime.n_ctx - 120  # pretend the context is tiny: ~120 tokens of history
    for i in range(6):
        "".join(s.send(f"Say the number {i}."))
        assert runtime.last.n_prompt_tokens + s.reserve <= runtime.n_ctx
    assert s.trimmed > 0 and s.messages[0]["role"] == "user"
    assert s.messages[-1]["role"] == "assistant" and s.turns == 6
    saved = _json.loads(s.save(tmp_path / "chat.json").read_text())
    assert saved["messages"][0] == {"role": "system", "content": "Be brief."}
    assert saved["messages"][-2]["content"] == "Say the number 5."
    md = s.save(tmp_path / "chat.md").read_text()
    assert md.startswith("**system**: Be brief.") and "**user**: Say the number 5." in md
    s.reset()
    assert s.messages == [] and s.system == "Be brief."


def test_piped_chat_with_a_correction_vector(env: dict[str, str], tmp_path, bundled_model) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    from edge.cvec import write
    from edge.gguf_file import inspect

    info = inspect(bundled_model)
    rng = np.random.default_rng(1)
    vec = tmp_path / "v.gguf"
    write(vec, rng.standard_normal((info.n_layers, info.n_embd)).astype(np.float32))

    def chat(*extra: str) -> str:
        out = subprocess.run([*edge_cmd(), "chat", "--temp", "0", "-n", "12", "--threads", "1", *extra],
                             input="Name a fruit.\n", env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    plain = chat()
    assert chat("--correction", str(vec), "--correction-scale", "0") == plain
    assert chat("--correction", str(vec), "--correction-scale", "4") != plain
    bad = subprocess.run([*edge_cmd(), "chat", "--correction", str(tmp_path / "none.gguf")], input="hi\n",
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
