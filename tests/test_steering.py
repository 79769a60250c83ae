"""Control-vector GGUFs: format, read-back, application through llama.cpp, mismatches."""

from __future__ import annotations

import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from bias.steering import compute_directions
from edge import cvec
from edge.errors import InvalidModelFileError
from tests.conftest import edge_cmd

N_LAYERS, N_EMBD = 30, 576


def _vec(seed: int = 0, n_layers: int = N_LAYERS, n_embd: int = N_EMBD) -> np.ndarray:
    d = np.random.default_rng(seed).standard_normal((n_layers, n_embd)).astype(np.float32)
    d[0] = 0
    return d


def test_written_file_is_llama_cpp_control_vector_format(tmp_path: Path) -> None:
    d = _vec()
    p = cvec.write(tmp_path / "v.gguf", d, model_hint="llama", coefficients=np.linspace(0, 1, N_LAYERS))
    r = gguf.GGUFReader(str(p))
    assert r.fields["general.architecture"].contents() == "controlvector"
    assert r.fields["controlvector.model_hint"].contents() == "llama"
    assert r.fields["controlvector.layer_count"].contents() == N_LAYERS - 1
    names = [t.name for t in r.tensors]
    assert names == [f"direction.{i}" for i in range(1, N_LAYERS)]  # never direction.0
    t = r.tensors[4]
    assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [N_EMBD]
    np.testing.assert_array_equal(np.asarray(t.data), d[5])
    back = cvec.read(p)
    np.testing.assert_array_equal(back.matrix(N_LAYERS, N_EMBD), d)
    assert back.coefficients[-1] == pytest.approx(1.0)
    assert list(tmp_path.iterdir()) == [p]  # no temp file left behind


@pytest.mark.slow
def test_control_vector_changes_llama_cpp_logits(tmp_path: Path, bundled_model: Path) -> None:
    from edge.runtime import Runtime, RuntimeConfig

    rt = Runtime(bundled_model, RuntimeConfig(n_ctx=128))
    try:
        toks = [rt.llm.token_bos(), *rt.tokenize("The doctor said that", add_bos=False)]
        base = rt.token_logprobs(toks)
        p = cvec.write(tmp_path / "v.gguf", 0.5 * _vec(1))
        cvec.load_correction(rt, p, scale=1.0)
        steered = rt.token_logprobs(toks)
        assert np.abs(steered - base).max() > 0.1
        cvec.load_correction(rt, p, scale=0.0)  # scale 0 is the identity
        np.testing.assert_allclose(rt.token_logprobs(toks), base, atol=1e-4)
        rt.set_control_vector(None)
        np.testing.assert_allclose(rt.token_logprobs(toks), base, atol=1e-4)
    finally:
        rt.close()


@pytest.mark.parametrize("shape,msg", [((N_LAYERS, 64), "n_embd 64"), ((40, N_EMBD), "40 layers")])
def test_vector_for_another_model_is_a_one_line_error(tmp_path: Path, shape: tuple[int, int], msg: str,
                                                      env: dict[str, str]) -> None:
    p = cvec.write(tmp_path / "other.gguf", _vec(2, *shape))
    with pytest.raises(InvalidModelFileError, match=msg):
        cvec.read(p).matrix(N_LAYERS, N_EMBD)
    r = subprocess.run([*edge_cmd(), "run", "--correction", str(p), "-p", "hi", "-n", "2"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and msg in lines[0]


def test_non_control_vector_gguf_rejected(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(model), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InvalidModelFileError, match="model GGUF, not a control vector: pass it as the MODEL"):
        cvec.read(model)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(InvalidModelFileError):
        cvec.read(bad)


def test_directions_mean_and_pca_on_synthetic_states() -> None:
    rng = np.random.default_rng(0)
    n, L, d = 50, 4, 8
    true = np.zeros((L, d))
    true[:, 0] = [0, 1.0, 2.0, 0.0]  # layer 3: no signal
    less = rng.standard_normal((n, L, d)).astype(np.float32)
    more = less + true + 0.1 * rng.standard_normal((n, L, d))
    dm = compute_directions(more, less, "mean")
    np.testing.assert_allclose(dm.vectors[1:3, 0], [1.0, 2.0], atol=0.05)
    assert np.all(dm.vectors[0] == 0)
    assert dm.snr[2] > 5 and dm.snr[3] < 1  # consistent layer vs noise-only layer
    dp = compute_directions(more, less, "pca")
    cos = dp.vectors[2] @ dm.vectors[2] / np.linalg.norm(dp.vectors[2]) / np.linalg.norm(dm.vectors[2])
    assert cos > 0.95
