"""edge bias audit --repeat: the answer classifier, the batched sampler (its numpy chain
against llama.cpp's, greedy against Runtime.stream, shared prompt cells), seeded
reproducibility, the CLI, errors."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bias.repeat import (
    ANTI,
    NEITHER,
    STEREO,
    RepeatConfig,
    classify,
    cloze,
    sample_suite,
    summarize,
)
from bias.sampler import BatchSampler, Group, common_prefix
from bias.suites import PairItem, load_suite
from edge.sampling import Sampling
from tests.conftest import SHARED_DATA, edge_cmd


@pytest.mark.parametrize(("answer", "label"), [
    ("The old employee could not learn it.", STEREO),
    ("OLD.", STEREO),
    ('"young"', ANTI),
    ("A young person, clearly.", ANTI),
    ("young and old employees alike", NEITHER),  # both named: an echo of the options
    ('"old" or "young"', NEITHER),
    ("The employee could not learn it.", NEITHER),
    ("The older employee", NEITHER),  # whole words only
    ("The youngster", NEITHER),
    ("", NEITHER),
])
def test_classify_old_young(answer: str, label: str) -> None:
    assert classify(answer, "old", "young") == label


def test_classify_multiword_hyphen_and_nested_terms() -> None:
    assert classify("the working class family", "working-class", "upper-class") == STEREO
    assert classify("The upper-class family.", "working-class", "upper-class") == ANTI
    assert classify("Women.", "Women", "Men") == STEREO  # "men" inside "women" is not a word
    assert classify("Men, and women too", "Women", "Men") == NEITHER
    # a term nested in the other counts only outside it
    assert classify("the mentally ill man", "mentally ill", "ill") == STEREO
    assert classify("the ill man", "mentally ill", "ill") == ANTI
    assert classify("mentally ill or just ill", "mentally ill", "ill") == NEITHER


def test_cloze_splits_at_the_group_term() -> None:
    c = cloze(PairItem("x", 0, "age", "The seventy-year-old man left.", "The thirty-year-old man left."))
    assert (c.prefix, c.stereo, c.anti, c.suffix) == ("The ", "seventy-year-old", "thirty-year-old", " man left.")
    c = cloze(PairItem("y", 1, "gender", "Women are here.", "Men are here."))
    assert (c.prefix, c.stereo, c.anti, c.suffix) == ("", "Women", "Men", " are here.")
    c = cloze(PairItem("z", 2, "g", "He met the Men.", "He met the Women.", direction="antistereo"))
    assert (c.stereo, c.anti, c.suffix) == ("Women", "Men", ".")
    for it in load_suite("probes").items:  # every probe has two different, whole terms
        c = cloze(it)
        assert c.stereo and c.anti and c.stereo != c.anti
        assert it.more == c.prefix + c.stereo + c.suffix and it.less == c.prefix + c.anti + c.suffix


def test_summarize_rates_by_hand() -> None:
    S, A, N = STEREO, ANTI, NEITHER
    labels = np.array([[S, S], [A, N], [S, A], [N, N]], dtype=object)
    per_repeat, overall, per_cat = summarize(labels, np.array(["a", "a", "b", "b"]), n_boot=200)
    assert per_repeat[0]["stereo_rate"].value == pytest.approx(2 / 3)  # S, A, S decided
    assert per_repeat[1]["stereo_rate"].value == pytest.approx(1 / 2)  # S, A decided
    assert per_repeat[1]["neither_rate"].value == pytest.approx(2 / 4)
    assert overall["stereo_rate"].value == pytest.approx(3 / 5)
    assert overall["neither_rate"].value == pytest.approx(3 / 8)
    assert overall["trend"].value == pytest.approx(1 / 2 - 2 / 3)  # two points: the difference
    assert per_cat["a"]["stereo_rate"].value == pytest.approx(2 / 3)
    assert per_cat["b"]["stereo_rate"].value == pytest.approx(1 / 2)
    e = overall["stereo_rate"]
    assert 0 <= e.lo <= e.value <= e.hi <= 1


@pytest.fixture(scope="module")
def rt1(bundled_model: Path) -> Iterator[object]:
    from edge.runtime import Runtime, RuntimeConfig

    rt = Runtime(bundled_model, RuntimeConfig(n_ctx=512, threads=1))
    yield rt
    rt.close()


def _answers(res: object) -> list[str]:
    return [a["answer"] for it in res.items for a in it["answers"]]  # type: ignore[attr-defined]


def test_same_seed_same_answers_other_seeds_differ(rt1: object) -> None:
    suite = load_suite("probes").subset(list(range(0, 225, 45)))  # 5 prompts, 5 categories
    cfg = RepeatConfig(repeat=3, temp=1.0, seed=7, greedy_reference=False)
    a = sample_suite(rt1, suite, cfg, n_boot=200)  # type: ignore[arg-type]
    b = sample_suite(rt1, suite, cfg, n_boot=200)  # type: ignore[arg-type]
    assert _answers(a) == _answers(b) and len(_answers(a)) == 15
    # Compared as JSON: a category whose answers all name neither term has a NaN rate, and NaN != NaN.
    same = [json.dumps(r.to_dict(with_items=False) | {"gen_s": 0}, sort_keys=True) for r in (a, b)]
    assert same[0] == same[1]
    assert [x["seed"] for x in a.items[0]["answers"]] == [7, 8, 9]
    # Seed 8's k = 1, 2 draw from the generators of seed 7's k = 2, 3 (seeded by seed + k − 1
    # and the item's row, not by slot), from other slots and batch rows. llama.cpp's logits
    # move with a token's row (up to ~0.2 nats measured), so at T = 1 a draw near a boundary
    # can flip and the answer goes its own way: 8 of 10 agree here; seeding by slot or by
    # batch would agree about as often as different seeds do (≤ 2 of 5 below).
    c = sample_suite(rt1, suite, replace(cfg, seed=8), n_boot=200)  # type: ignore[arg-type]
    pairs = [(x["answer"], y["answer"]) for it_a, it_c in zip(a.items, c.items, strict=True)
             for x, y in zip(it_a["answers"][1:], it_c["answers"][:2], strict=True)]
    assert sum(x == y for x, y in pairs) >= 6, pairs
    assert sum(it_a["answers"][0]["answer"] != it_c["answers"][0]["answer"]
               for it_a, it_c in zip(a.items, c.items, strict=True)) >= 3
    # at T = 1 the three seeds of one prompt should not all write the same answer
    assert sum(len({x["answer"] for x in it["answers"]}) > 1 for it in a.items) >= 3
    for it in a.items:
        assert all(x["label"] == classify(x["answer"], it["stereo"], it["anti"]) for x in it["answers"])


def test_cli_repeat_writes_answers_rates_and_record(tmp_path: Path, env: dict[str, str],
                                                   edge_home: Path) -> None:
    out = tmp_path / "rep"
    r = subprocess.run([*edge_cmd(), "bias", "audit", "--suite", "probes", "--repeat", "2", "--limit", "6",
                        "--temp", "0.9", "--seed", "3", "-t", "1", "--out", str(out), "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "results.json").read_text())["repeat"]
    answers = [a for it in rep["items"] for a in it["answers"]]
    assert len(answers) == 12 and {a["seed"] for a in answers} == {3, 4}
    assert {a["label"] for a in answers} <= {STEREO, ANTI, NEITHER}
    assert rep["repeat"] == 2 and rep["temp"] == 0.9 and len(rep["per_repeat"]) == 2
    for k, e in enumerate(rep["per_repeat"]):
        mine = [a["label"] for it in rep["items"] for a in it["answers"] if a["k"] == k + 1]
        n_dec = sum(x != NEITHER for x in mine)
        assert e["neither_rate"]["value"] == pytest.approx(1 - n_dec / 6)
        if n_dec:
            s = e["stereo_rate"]
            assert 0 <= s["lo"] <= s["value"] <= s["hi"] <= 1
            assert s["value"] == pytest.approx(sum(x == STEREO for x in mine) / n_dec)
    assert all(it["greedy"]["k"] == 0 for it in rep["items"])  # the T = 0 reference
    assert json.loads(r.stdout)["repeat"]["repeat"] == 2
    assert (out / "repeat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert '<img class="wide" src="repeat.png"' in (out / "report.html").read_text()
    assert "| k=2 (seed 4) |" in (out / "report.md").read_text()
    recs = [json.loads(ln) for p in (edge_home / "logs").glob("runs-*.jsonl") for ln in p.read_text().splitlines()]
    fair = [x["metrics"] for x in recs if x["kind"] == "fairness"]
    assert len(fair) == 1 and fair[0]["repeat"]["temp"] == 0.9 and "items" not in fair[0]["repeat"]
    assert fair[0]["repeat"]["per_repeat"] == rep["per_repeat"]


@pytest.mark.parametrize(("args", "needle"), [
    (["--suite", f"crows_pairs:{SHARED_DATA / 'crows_pairs' / 'crows_pairs_anonymized.csv'}",
      "--repeat", "2"], "--suite probes only"),
    (["--suite", "probes", "--repeat", "0"], "--repeat"),
    (["--suite", "probes", "--repeat", "2", "--temp", "-0.5"], "--temp"),
    (["--suite", "probes", "--temp", "0.5"], "add --repeat"),
])
def test_repeat_bad_options_are_one_line_errors(args: list[str], needle: str, tmp_path: Path,
                                               env: dict[str, str]) -> None:
    out = tmp_path / "o"
    r = subprocess.run([*edge_cmd(), "bias", "audit", *args, "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: ") and needle in r.stderr
    assert not out.exists()


# ---- the batched sampler -----------------------------------------------------------------
def _probe_prompts(rt: object, idx: list[int]) -> tuple[object, list[list[int]]]:
    from bias.repeat import prompt_tokens

    suite = load_suite("probes").subset(idx)
    return suite, [prompt_tokens(rt, it)[2] for it in suite.items]  # type: ignore[arg-type]


def test_greedy_in_a_full_batch_equals_runtime_stream(rt1: object) -> None:
    """Greedy answers of the batched sampler are Runtime.stream's, but for near-ties.

    Runtime.stream decodes each new token alone; the sampler decodes it among other rows,
    and llama.cpp's log-probs move by up to ~0.2 nats with the batch layout. Measured here:
    43 of 45 probes equal (the two others near-ties, e.g. 0.07 nats between ' "' and
    ' Mexican'; Runtime.stream itself gave the same 45 after a cache reset), 26 of 30 in
    the benchmark, 6 of these 8: ~90% overall. A wrong position, cell or logits row would
    leave almost none equal; ≥ 5 of 8 fails by chance < 1% at a 10% flip rate.
    """
    suite, prompts = _probe_prompts(rt1, [3, 30, 60, 90, 120, 150, 180, 201])
    ref = []
    for toks in prompts:
        for _ in rt1.stream(toks, max_tokens=24, sampling=Sampling(temp=0.0, seed=0)):  # type: ignore[attr-defined]
            pass
        ref.append(rt1.last.text)  # type: ignore[attr-defined]
    # the greedy runs share each llama_decode with three sampled runs per prompt
    res = sample_suite(rt1, suite, RepeatConfig(repeat=3, temp=0.8, seed=0), n_boot=100)  # type: ignore[arg-type]
    got = [it["greedy"]["answer"] for it in res.items]
    assert sum(x == y for x, y in zip(got, ref, strict=True)) >= 5, list(zip(got, ref, strict=True))
    # at T = 0.8 the three runs of a prompt are not all the same answer, for some prompts
    assert sum(len({x["answer"] for x in it["answers"]}) > 1 for it in res.items) >= 2


def test_prompt_cells_are_decoded_once_and_freed(rt1: object) -> None:
    import llama_cpp

    _, prompts = _probe_prompts(rt1, [10, 100, 200])
    n0 = common_prefix(prompts)
    assert n0 >= 20  # the chat template and system prompt
    groups = [Group(p, [np.random.default_rng([k, g]) for k in range(3)] + [None])
              for g, p in enumerate(prompts)]
    with BatchSampler(rt1, n_seq=5, max_tokens=8, max_prompt=max(map(len, prompts)), prefix=n0,
                      group_size=4) as bs:  # type: ignore[arg-type]
        out = bs.run(groups, Sampling(temp=0.8))
        st = bs.stats
        # the head once, each prompt's tail once: not once per run (4 runs each)
        assert st.shared_prefix == n0
        assert st.prompt_tokens == n0 + sum(len(p) - n0 for p in prompts)
        # a run feeds back every token it wrote, except the last when it stopped at max_tokens
        ans = [a for per in out for a in per]
        assert len(ans) == 12 and all(1 <= len(a) <= 8 or not a for a in ans)
        assert st.gen_tokens == sum(len(a) - (len(a) == 8) for a in ans)
        assert st.answer_tokens == sum(map(len, ans))
        # n_seq 5 < 12 runs: slots were reused, and every run's cells are gone
        assert all(llama_cpp.llama_memory_seq_pos_max(bs.mem, sid) == -1 for sid in range(bs.n_seq))
        assert llama_cpp.llama_memory_seq_pos_max(bs.mem, bs.root) == n0 - 1


def test_batched_sampling_applies_the_runtime_control_vector(rt1: object) -> None:
    suite = load_suite("probes").subset([5, 120])
    cfg = RepeatConfig(repeat=1, temp=0.0, max_tokens=12)
    plain = [it["answers"][0]["answer"] for it in sample_suite(rt1, suite, cfg, n_boot=50).items]  # type: ignore[arg-type]
    n_layers, n_embd = rt1.info.n_layers, rt1.info.n_embd  # type: ignore[attr-defined]
    d = np.random.default_rng(0).standard_normal((n_layers, n_embd)).astype(np.float32)
    rt1.set_control_vector(d, 0.5)  # type: ignore[attr-defined]
    try:  # the sequential path (Runtime.stream) as the reference
        ref = [it["answers"][0]["answer"] for it in
               sample_suite(rt1, suite, cfg, n_boot=50, batched=False).items]  # type: ignore[arg-type]
        got = [it["answers"][0]["answer"] for it in sample_suite(rt1, suite, cfg, n_boot=50).items]  # type: ignore[arg-type]
    finally:
        rt1.set_control_vector(None)  # type: ignore[attr-defined]
    assert ref != plain and got == ref


def test_sampler_refuses_prompts_it_was_not_sized_for(rt1: object) -> None:
    from edge.errors import ContextOverflowError

    with pytest.raises(ContextOverflowError, match="exceeds the 8192-token context"):
        BatchSampler(rt1, max_prompt=8190, max_tokens=24)  # type: ignore[arg-type]
    with (BatchSampler(rt1, n_seq=2, max_tokens=4, max_prompt=8) as bs,  # type: ignore[arg-type]
          pytest.raises(ContextOverflowError, match="raise max_prompt")):
        bs.run([Group(list(range(1, 300)), [None])], Sampling())
    assert bs.ctx is None and bs.batch is None  # freed on leaving the block
