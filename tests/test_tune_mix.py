"""Mixed files in `edge tune`: the GGUF written from two of llama.cpp's quantizations, the
greedy choice of which tensor classes to keep wider, and the stage inside a tune run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from convert_helpers import TinySpec, make_checkpoint

from edge.convert import convert
from edge.gguf_file import inspect
from edge.quantize import quantize
from edge.runtime import Runtime, RuntimeConfig
from edge.tune import TuneOptions
from edge.tune.mix import Mix, class_sizes, search_mix, tensor_class, write_mix
from edge.tune.search import MIX_MARGIN, Tuner

SPEC = TinySpec(n_embd=256, n_ff=512, n_layers=2, n_head=4, n_head_kv=2, vocab=320)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("mix")
    make_checkpoint(d / "hf", SPEC)
    out = {"F16": d / "tiny.f16.gguf", "Q8_0": d / "tiny.q8_0.gguf", "Q4_0": d / "tiny.q4_0.gguf"}
    convert(d / "hf", out["F16"], outtype="f16")
    for q in ("Q8_0", "Q4_0"):
        quantize(out["F16"], out[q], qtype=q)
    return out


def _logits(path: Path) -> np.ndarray:
    rt = Runtime(path, RuntimeConfig(n_ctx=64, n_batch=64, threads=1))
    try:
        return rt.logits(list(range(1, 40)))
    finally:
        rt.close()


def test_a_mix_takes_each_class_from_the_file_named_for_it(files: dict[str, Path], tmp_path: Path) -> None:
    sizes = class_sizes(files["Q4_0"], files["Q8_0"])
    assert "attn_v" in sizes and "ffn_down" in sizes
    assert sizes["ffn_down"] == SPEC.n_layers * SPEC.n_embd * SPEC.n_ff
    part = write_mix(files["Q4_0"], files["Q8_0"], tmp_path / "part.gguf", ["attn_v", "ffn_down"], note="x")
    types = {t.name: t.type for t in inspect(part).tensors}
    q4, q8 = ({t.name: t.type for t in inspect(files[q]).tensors} for q in ("Q4_0", "Q8_0"))
    for name, ty in types.items():
        want = q8 if tensor_class(name) in ("attn_v", "ffn_down") else q4
        assert ty == want[name], name
    assert types["blk.1.attn_v.weight"] != q4["blk.1.attn_v.weight"]  # the mix did change something
    # every class from the wider file: llama.cpp computes exactly what it computes on that file
    whole = write_mix(files["Q4_0"], files["Q8_0"], tmp_path / "all.gguf", sizes)
    assert np.array_equal(_logits(whole), _logits(files["Q8_0"]))
    mixed, narrow = _logits(part), _logits(files["Q4_0"])
    assert not np.array_equal(mixed, narrow) and not np.array_equal(mixed, _logits(files["Q8_0"]))


def test_greedy_ranks_classes_by_kl_saved_per_weight() -> None:
    sizes = {"a": 100, "b": 10, "c": 100, "d": 50}
    saves = {"a": 0.04, "b": 0.02, "c": 0.01, "d": -0.001}  # b saves most per weight; d hurts
    seen: list[str] = []

    def kl(m: Mix) -> float:
        seen.append(m.name)
        return 0.1 - sum(saves[c] for c in m.take)

    s = search_mix("Q4_0", "Q8_0", sizes, kl, target=0.045)
    assert s.order == ["b", "a", "c"]  # d saved nothing: never taken
    assert s.chosen == Mix("Q4_0", "Q8_0", ("a", "b")) and s.kl[s.chosen.name] == pytest.approx(0.04)
    assert len(seen) == 1 + 4 + 1  # the fast file, each class alone, then b+a
    one = search_mix("Q4_0", "Q8_0", sizes, kl, target=0.065)  # a alone is enough; none smaller is
    assert one.chosen == Mix("Q4_0", "Q8_0", ("a",))
    none = search_mix("Q4_0", "Q8_0", sizes, kl, target=0.02)
    assert none.chosen is None and none.order == ["b", "a", "c"]
    assert Mix.parse(s.chosen.name) == s.chosen and Mix.parse("Q4_0") is None
    assert Mix.parse("IQ4_NL+imatrix~Q4_1[attn_v,ffn_down]") == Mix("IQ4_NL+imatrix", "Q4_1", ("attn_v", "ffn_down"))


def test_tune_tries_a_mix_of_a_type_over_the_budget(files: dict[str, Path]) -> None:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))[:40_000]
    path = files["F16"].parent / "docs.txt"
    path.write_text(text)
    opts = TuneOptions(quants=["Q8_0", "Q4_0"], threads=[1], kl_ctx=64, kl_chunks=1, n_gen=4, n_ctx=256,
                       final_rounds=1, budget_minutes=30, max_kld=10.0, text=str(path), imatrix=False)
    t = Tuner(str(files["F16"]), opts, None, None)
    try:
        t.stage_quants()
        kl8, kl4 = (t.quality(t_c)["kld"] for t_c in (_c("Q8_0"), _c("Q4_0")))
        assert kl8 < kl4
        # a budget Q4_0 misses and Q8_0 meets, its target halfway between them
        t.opts.max_kld = (kl8 + kl4) / 2 / MIX_MARGIN
        if kl4 <= t.opts.max_kld:
            pytest.skip("Q4_0 of this random model is within a budget that puts the target halfway")
        kept = t.stage_quants()
        assert "Q4_0" in t.over and "Q4_0" not in kept
        mixes = t.stage_mixes(kept)
        (s,) = t.mixes
        assert (s.fast, s.safe) == ("Q4_0", "Q8_0")
        assert s.chosen is not None and mixes == [s.chosen.name]
        assert s.kl[s.chosen.name] <= MIX_MARGIN * t.opts.max_kld
        # of the mix files measured only the chosen one is left, ready for the speed runs
        m = t.files[s.chosen.name]
        assert [p.name for p in t.workdir.glob("mix.*.gguf")] == [m.name] == [s.chosen.file_name()]
        # it holds what its name says, and its KL is the one its quality record has
        taken = {tensor_class(x.name) for x in inspect(m).tensors if x.type == "Q8_0"}
        assert set(s.chosen.take) <= taken
        assert t.quality(_c(s.chosen.name))["kld"] == s.kl[s.chosen.name]
        # and the speed search takes it like any file
        mine = [c for c in t.space(kept + mixes) if c.quant == s.chosen.name]
        assert mine and t.speed(mine[0], "r0", 4, 1).tg_tps > 0
    finally:
        t.close()


def _c(q: str):  # noqa: ANN202
    from edge.tune.space import defaults

    return defaults(q, 1)
