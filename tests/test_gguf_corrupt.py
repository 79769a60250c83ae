"""A corpus of broken GGUF files: every one is refused in one line, exit 2, before llama.cpp.

Each case runs `edge run` as a real process, so a segfault would show as a signal.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from edge.errors import InvalidModelFileError
from edge.gguf_file import inspect
from tests.conftest import edge_cmd


def _header_end(path: Path) -> int:
    """Byte where tensor data starts (end of the tensor table, aligned)."""
    info = inspect(path)
    return info.file_size - sum(t.n_bytes for t in info.tensors) - 64  # rough: inside the table


def _build_corpus(src: Path, out: Path) -> dict[str, Path]:
    data = src.read_bytes()
    size = len(data)
    cases: dict[str, bytes] = {}
    # Truncations: inside the magic, the counts, the metadata, the tensor table, the data.
    offsets = [0, 3, 10, 20, 100, 5_000, 200_000, 1_500_000, _header_end(src), size // 3,
               size // 2, size - 4096, size - 1]
    for off in offsets:
        cases[f"truncated_at_{off}"] = data[:off]
    cases["wrong_magic"] = b"GGUX" + data[4:4096]
    cases["bad_version"] = data[:4] + struct.pack("<I", 99) + data[8:4096]
    cases["absurd_tensor_count"] = data[:8] + struct.pack("<Q", 2**62) + data[16:4096]
    cases["absurd_kv_count"] = data[:16] + struct.pack("<Q", 2**61) + data[24:4096]
    cases["random_bytes"] = bytes(range(256)) * 64
    cases["empty"] = b""
    # Tensor offset past EOF: rewrite the last tensor's offset field in the table.
    info = inspect(src)
    last = info.tensors[-1].name.encode()
    pos = data.rfind(struct.pack("<Q", len(last)) + last)
    n_dims = struct.unpack_from("<I", data, pos + 8 + len(last))[0]
    off_pos = pos + 8 + len(last) + 4 + 8 * n_dims + 4
    bad = bytearray(data)
    bad[off_pos : off_pos + 8] = struct.pack("<Q", size * 4 // 32 * 32)
    cases["tensor_offset_past_eof"] = bytes(bad)
    paths = {}
    for name, blob in cases.items():
        p = out / f"{name}.gguf"
        p.write_bytes(blob)
        paths[name] = p
    return paths


@pytest.fixture(scope="module")
def corpus(bundled_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _build_corpus(bundled_model, tmp_path_factory.mktemp("corrupt"))


def test_corpus_is_rejected_by_the_preflight(corpus: dict[str, Path]) -> None:
    assert len([n for n in corpus if n.startswith("truncated")]) >= 10
    for name, path in corpus.items():
        with pytest.raises(InvalidModelFileError) as exc:
            inspect(path)
        msg = str(exc.value)
        assert str(path) in msg and "\n" not in msg, name


def test_every_corrupt_file_exits_2_with_one_line(corpus: dict[str, Path], env: dict[str, str]) -> None:
    for name, path in corpus.items():
        res = subprocess.run([*edge_cmd(), "run", str(path), "-p", "hi", "-n", "1"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2, (name, res.returncode, res.stderr[-500:])
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), (name, res.stderr)
        assert res.stdout == ""


def test_the_intact_model_passes(bundled_model: Path) -> None:
    info = inspect(bundled_model)
    assert info.arch == "llama" and info.n_layers == 30 and info.n_vocab == 49152
    assert info.quant == "Q4_1" and info.has_chat_template
    assert 130e6 < info.params < 140e6
