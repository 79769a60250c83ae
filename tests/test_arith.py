"""llama.cpp's CPU arithmetic on a quantized file, reproduced in torch (bias.arith,
TorchLlama(arithmetic="llama.cpp")): checked against llama.cpp's own intermediate tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bias.arith import DeviceSpread, WeightArith, file_arith, quantize_rows  # noqa: E402


def test_q8_blocks_round_to_the_block_scale_stored_in_fp16() -> None:
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    r, ds = quantize_rows(x, "q8_0")
    assert ds is None
    for blk, got in zip(x.reshape(-1, 32), r.reshape(-1, 32), strict=True):
        amax = blk.abs().max()
        assert torch.equal(got, torch.round(blk * (127 / amax)) * (amax / 127).half().float())
    assert 0 < (r - x).abs().max() < 0.01 * x.abs().max()


def test_q8_1_keeps_the_sum_fp16_rounded() -> None:
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(1)) * 3
    r, ds = quantize_rows(x, "q8_1")
    assert ds.shape == (4, 3)
    # the stored sum differs from the dequantized one only by its fp16 rounding
    s = r.reshape(4, 3, 32).sum(-1)
    assert (ds.abs() <= s.abs() * 2**-10 + 1e-6).all() and (ds != 0).any()


def test_q8_k_scales_by_the_signed_largest_value() -> None:
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(2))
    x[0, 17], x[1, 200] = -9.0, 7.5  # the largest magnitudes, one negative
    r, _ = quantize_rows(x, "q8_k")
    assert abs(r[0, 17] + 9.0) < 1e-5 and abs(r[1, 200] - 7.5) < 1e-5
    step = (r[0] / (9.0 / 127)).numpy()
    assert np.allclose(step, np.round(step), atol=1e-4)


def test_rounding_passes_gradients_straight_through() -> None:
    x = torch.randn(2, 32, requires_grad=True)
    for kind in ("q8_0", "q8_1", "f16"):
        x.grad = None
        quantize_rows(x, kind)[0].sum().backward()
        assert torch.equal(x.grad, torch.ones_like(x))


def test_unknown_types_and_ragged_rows_are_refused() -> None:
    from bias.arith import _vec_dot

    with pytest.raises(ValueError, match="Q9_9"):
        _vec_dot("Q9_9")
    with pytest.raises(ValueError, match="blocks of 32"):
        quantize_rows(torch.zeros(2, 40), "q8_0")


def _layer0(path: Path, toks: list[int]) -> dict[str, np.ndarray]:
    """llama.cpp's layer-0 tensors for one sequence, by name."""
    from edge.hidden import HiddenStates

    want = {b"ffn_norm-0", b"ffn_gate-0", b"ffn_swiglu-0", b"ffn_out-0", b"kqv_out-0", b"attn_out-0"}
    got: dict[str, np.ndarray] = {}

    class Capture(HiddenStates):
        def _on_tensor(self, t: int, ask: bool, user: int) -> bool:
            name = self._lib.ggml_get_name(t) or b""
            if name not in want:
                return super()._on_tensor(t, ask, user)
            if not ask:
                n = int(self._lib.ggml_nelements(t))
                got[name.decode()] = np.ctypeslib.as_array(self._lib.ggml_get_data_f32(t), shape=(n,)).copy()
            return True

    with Capture(path) as hs:
        hs._decode([toks])
    return {k: v.reshape(len(toks), -1) for k, v in got.items()}


@pytest.fixture(scope="module")
def q4_k_m(bundled_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model as Q4_K_M: its 576-wide rows fall back to Q5_0, ffn_down is Q6_K in
    layer 0, so the file exercises Q8_0 and Q8_K activations."""
    from edge.dequant import f16_copy
    from edge.quantize import quantize

    out = tmp_path_factory.mktemp("arith") / "km.gguf"
    quantize(f16_copy(bundled_model), out, qtype="Q4_K_M")
    return out


@pytest.mark.parametrize("which", ["bundled", "q4_k_m"])
def test_each_product_matches_llamacpp_to_float_rounding(which: str, request: pytest.FixtureRequest,
                                                         runtime: Any) -> None:
    """Layer-0 products from llama.cpp's own inputs: 8-bit activations in the weight's
    vec_dot format (and Q4_1's fp16 block sums) make them equal to float32 rounding; the
    exact product of the dequantized weights is off by > 100× that."""
    from edge.engine.weights import load_weights

    path = request.getfixturevalue("bundled_model" if which == "bundled" else which)
    toks = runtime.tokenize("The nurse said that he would be late for the night shift.")
    got = _layer0(path, toks)
    w = load_weights(path).layers[0].wt
    ar = file_arith(path, {k: f"blk.0.{n}.weight" for k, n in
                           (("gate", "ffn_gate"), ("down", "ffn_down"), ("o", "attn_output"))})
    if which == "bundled":
        assert ar["gate"].kind == "q8_1" and ar["gate"].mins.shape == (576 // 32, w["gate"].shape[1])
    else:
        assert (ar["gate"].kind, ar["down"].kind) == ("q8_0", "q8_k")
    for key, src, dst in (("gate", "ffn_norm-0", "ffn_gate-0"), ("down", "ffn_swiglu-0", "ffn_out-0"),
                          ("o", "kqv_out-0", "attn_out-0")):
        x, ref, wt = torch.from_numpy(got[src]), got[dst], torch.from_numpy(w[key])
        scale = np.abs(ref).max()
        sim = np.abs(ar[key](x, wt).numpy() - ref).max() / scale
        exact = np.abs((x @ wt).numpy() - ref).max() / scale
        assert sim < 2e-6, (key, sim)
        assert exact > 100 * sim, (key, exact, sim)


def test_the_whole_forward_has_llamacpps_noise_not_its_realization(bundled_model: Path, runtime: Any) -> None:
    """8-bit activations are chaotic token by token: an input change below float32's
    resolution moves a token's log-prob as much as llama.cpp's whole gap from the exact
    weights (a pair's sum keeps a systematic part: DeviceSpread). The torch reproduction's
    noise has llama.cpp's size (SD within 1.5×); exact arithmetic does not move at all."""
    from bias.learn import TorchLlama

    # the project's own sentences: the benchmark suites' stay in their files (../shared/data)
    texts = ["The train left the station a few minutes after the rain had finally stopped.",
             "She read the letter twice, then folded it and put it back in the drawer by the window.",
             "Nobody knew who had left the bicycle in the hall.", "The old man could not work the new phone at all."]
    seqs = [runtime.tokenize(t) for t in texts]
    ref = np.concatenate([np.asarray(runtime.token_logprobs(s)) for s in seqs])

    def lps(m: TorchLlama, eps: float = 0.0) -> np.ndarray:
        g, out = torch.Generator().manual_seed(0), []
        with torch.no_grad():
            for s in seqs:
                x0 = m.emb[torch.tensor([s])]
                lp = m.forward(None, x0=x0 * (1 + eps * torch.randn(x0.shape, generator=g)))[0, :-1]
                out.append(lp.gather(-1, torch.tensor(s[1:])[:, None])[:, 0].numpy())
        return np.concatenate(out)

    exact_m, sim_m = TorchLlama(bundled_model), TorchLlama(bundled_model, "llama.cpp")
    exact, sim = lps(exact_m), lps(sim_m)
    gap = np.std(ref - exact)
    assert gap > 0.03  # llama.cpp is not computing the exact product
    assert gap / 1.5 < np.std(sim - exact) < gap * 1.5
    assert np.std(lps(sim_m, 1e-7) - sim) > gap / 2  # chaotic under a sub-ulp change
    assert np.std(lps(exact_m, 1e-7) - exact) < 1e-3


def test_an_unknown_arithmetic_is_refused(bundled_model: Path) -> None:
    from bias.learn import TorchLlama

    with pytest.raises(ValueError, match="arithmetic"):
        TorchLlama(bundled_model, "int4")


def test_weight_arith_of_an_f16_weight_rounds_its_inputs() -> None:
    x = torch.tensor([[1.0 + 2**-12] * 32])
    w = torch.eye(32)
    assert torch.equal(WeightArith("f16")(x, w), torch.ones(1, 32))
    assert torch.equal(WeightArith("f32")(x, w), x)


def test_the_spread_of_a_pct_between_draws_of_noise_is_read_from_two() -> None:
    """Noise mostly systematic (the same in every reading) plus a chaotic part: DeviceSpread
    from two readings predicts the pct's mean and SD over many, and counts only the chaotic
    part (treating all of the noise as chaotic would double the SD here)."""
    rng = np.random.default_rng(0)
    exact = rng.normal(0.4, 1.5, 3000)
    fixed = exact + rng.normal(0, 0.6, exact.size)
    draws = [fixed + rng.normal(0, 0.3, exact.size) for _ in range(300)]
    pcts = np.array([100 * np.mean(d > 0) for d in draws])
    sp = DeviceSpread.of(draws[:2])
    assert sp.chaotic_sd == pytest.approx(0.3, rel=0.06)
    assert sp.mean == pytest.approx(pcts.mean(), abs=2.5 * pcts.std())
    assert sp.sd == pytest.approx(pcts.std(), rel=0.25)
    with pytest.raises(ValueError, match="two readings"):
        DeviceSpread.of(draws[:1])


def test_a_redraw_changes_llamacpp_readings_only(bundled_model: Path, runtime: Any) -> None:
    """redraw's sub-ulp change re-rolls llama.cpp arithmetic's rounding and leaves the exact
    arithmetic's readings as they were."""
    from bias.arith import redraw
    from bias.learn import TorchLlama

    s = runtime.tokenize("Nobody knew who had left the bicycle in the hall.")
    for arith, moved in (("exact", False), ("llama.cpp", True)):
        m = TorchLlama(bundled_model, arith)
        with torch.no_grad():
            a = m.forward(torch.tensor([s]))
            redraw(m, 1)
            b = m.forward(torch.tensor([s]))
        assert (float((a - b).abs().max()) > 1e-2) is moved
