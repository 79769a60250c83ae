"""edge convert on bad input: one line on stderr, exit 2, and never a file at OUT."""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from convert_helpers import TinySpec, make_checkpoint

from edge.cli import cli


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ckpt") / "hf"
    make_checkpoint(d, TinySpec("spm", n_layers=2, n_head_kv=2))
    return d


def _rewrite_weights(d: Path, edit: Callable[[dict], None]) -> None:
    from safetensors.numpy import load_file, save_file

    w = load_file(str(d / "model.safetensors"))
    edit(w)
    save_file(w, str(d / "model.safetensors"))


def _edit_config(d: Path, **changes: object) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


BREAKAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "no-config": (lambda d: (d / "config.json").unlink(), "has no config.json"),
    "unsupported-arch": (lambda d: _edit_config(d, architectures=["GPT2LMHeadModel"]),
                         "supports LlamaForCausalLM, MistralForCausalLM"),
    "missing-tensor": (lambda d: _rewrite_weights(d, lambda w: w.pop("model.layers.1.mlp.up_proj.weight")),
                       "model.layers.1.mlp.up_proj.weight"),
    "misshapen-tensor": (lambda d: _rewrite_weights(d, lambda w: w.update(
        {"model.layers.0.self_attn.k_proj.weight": w["model.layers.0.self_attn.k_proj.weight"][:8]})),
        "has shape [8, 64] but config.json implies [32, 64]"),
    "extra-layer-tensor": (lambda d: _edit_config(d, num_hidden_layers=1), "has no place"),
    "no-tokenizer": (lambda d: (d / "tokenizer.model").unlink(), "has no tokenizer"),
    "pytorch-bin": (lambda d: [(d / "model.safetensors").rename(d / "pytorch_model.bin")],
                    "convert them to safetensors"),
    "truncated-safetensors": (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:5000]), "truncated or corrupt"),
    "rope-yarn": (lambda d: _edit_config(d, rope_scaling={"type": "yarn", "factor": 4.0}),
                  "rope_scaling type 'yarn' is not supported"),
}


def _assert_clean_failure(result, out: Path, expect: str, code: int = 2) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert expect in result.stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temp left


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_bad_checkpoint(tmp_path: Path, base_ckpt: Path, case: str) -> None:
    d = tmp_path / "hf"
    shutil.copytree(base_ckpt, d)
    breakage, expect = BREAKAGES[case]
    breakage(d)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    result = CliRunner().invoke(cli, ["convert", str(d), "-o", str(out)])
    _assert_clean_failure(result, out, expect)


def test_output_exists_needs_force(tmp_path: Path, base_ckpt: Path) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    result = CliRunner().invoke(cli, ["convert", str(base_ckpt), "-o", str(out)])
    assert result.exit_code == 2 and "pass --force" in result.stderr
    assert out.read_bytes() == b"keep me"
    result = CliRunner().invoke(cli, ["convert", str(base_ckpt), "-o", str(out), "--force", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_tensors"] == 2 * 9 + 3
    assert out.read_bytes()[:4] == b"GGUF"


def test_bad_outtype_is_a_usage_error(tmp_path: Path, base_ckpt: Path) -> None:
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(cli, ["convert", str(base_ckpt), "-o", str(out), "--outtype", "q4_0"])
    assert result.exit_code == 2 and "'q4_0' is not one of" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("exc,code,expect", [
    (OSError(errno.ENOSPC, "No space left on device"), 2, "the disk is full"),
    (KeyboardInterrupt(), 2, "interrupted (Ctrl-C)"),
])
def test_failure_mid_write_leaves_nothing(tmp_path: Path, base_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                          exc: BaseException, code: int, expect: str) -> None:
    import gguf

    real = gguf.GGUFWriter.write_tensor_data
    calls = {"n": 0}

    def failing(self, tensor, *a, **k):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 5:
            raise exc
        return real(self, tensor, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(cli, ["convert", str(base_ckpt), "-o", str(out)])
    assert calls["n"] == 5
    _assert_clean_failure(result, out, expect, code)
