"""`edge run` on the real bundled model through real llama.cpp."""

from __future__ import annotations

import json

from click.testing import CliRunner

from edge.cli import cli
from edge.telemetry import read_records


def _run(args: list[str]) -> str:
    res = CliRunner().invoke(cli, ["run", *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_greedy_run_is_deterministic_and_logged() -> None:
    args = ["--temp", "0", "--seed", "1", "-n", "24", "-p", "Name a colour of the sky."]
    first, second = _run(args), _run(args)
    assert first == second
    assert len(first.strip()) > 10
    recs = read_records("latency").records
    assert len(recs) == 2
    m = recs[0]["metrics"]
    assert m["command"] == "run" and m["n_gen_tokens"] > 0 and "text" not in m
    assert recs[0]["model"]["quant"] == "Q4_1" and recs[0]["model"]["arch"] == "llama"
    assert recs[0]["device"]["cores"] >= 1 and recs[0]["config"]["n_ctx"] == 2048


def test_sampled_runs_repeat_with_the_same_seed() -> None:
    args = ["--temp", "0.9", "--seed", "42", "-n", "16", "--raw", "-p", "The weather today is"]
    assert _run(args) == _run(args)


def test_json_fields_are_present_and_plausible() -> None:
    out = json.loads(_run(["--temp", "0", "-n", "12", "-p", "Hello", "--json"]))
    for key in ("text", "n_prompt_tokens", "n_gen_tokens", "load_ms", "ttft_ms", "prompt_tps",
                "gen_tps", "peak_rss_bytes"):
        assert key in out
    assert out["n_gen_tokens"] == 12 or out["stop_reason"] == "eos"
    assert out["gen_tps"] > 0 and out["ttft_ms"] > 0 and out["prompt_tps"] > 0
    assert out["load_ms"] > 0 and out["peak_rss_bytes"] > 50_000_000  # the weights are mapped
    assert out["n_prompt_tokens"] > 5  # the chat template wrapped the prompt
    assert out["prompt_mode"] == "chat"


def test_raw_prompt_is_not_templated() -> None:
    out = json.loads(_run(["--temp", "0", "-n", "4", "--raw", "-p", "Hello", "--json"]))
    assert out["prompt_mode"] == "raw" and out["n_prompt_tokens"] <= 2


def test_context_too_small_for_prompt_is_a_one_line_error() -> None:
    res = CliRunner().invoke(cli, ["run", "--ctx", "16", "-p", "word " * 100])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and "context holds 16" in res.output and "--ctx" in res.output
