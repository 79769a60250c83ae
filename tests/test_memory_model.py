"""edge.memory: the memory model against hand-computed sizes, llama.cpp's own buffer sizes and
a measured peak RSS; the fit verdicts with injected RAM; the catalog check before a download."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from convert_helpers import TinySpec, make_checkpoint

from edge.convert import convert
from edge.errors import BadOptionError, CatalogError, InsufficientMemoryError
from edge.gguf_file import inspect
from edge.llamacpp import log_lines
from edge.memory import (
    PRESETS,
    CpuFeatures,
    MemorySnapshot,
    SessionParams,
    estimate,
    fit,
    repack_layout,
)
from edge.memory.estimate import compute_bytes, compute_parts, kv_cache_bytes
from edge.memory.fit import GiB
from edge.memory.shapes import synthesize
from edge.quantize import quantize
from edge.runtime import Runtime, RuntimeConfig

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
SPEC = TinySpec(n_embd=256, n_ff=512, n_layers=8, n_head=4, n_head_kv=2, vocab=320)  # head_dim 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A converted f16 tiny Llama and its Q4_0 / Q8_0 / Q4_K_M quantizations."""
    d = tmp_path_factory.mktemp("mem")
    make_checkpoint(d / "hf", SPEC)
    out = {"F16": d / "tiny.f16.gguf"}
    convert(d / "hf", out["F16"], outtype="f16")
    for q in ("Q4_0", "Q8_0", "Q4_K_M"):
        out[q] = d / f"tiny.{q}.gguf"
        quantize(out["F16"], out[q], qtype=q, threads=2)
    return out


def buffer_sizes(lines: list[str]) -> dict[str, float]:
    sizes: dict[str, float] = {}
    for m in re.finditer(r"(\S+)\s+(model|KV|compute|output) buffer size\s*=\s*([\d.]+) MiB", "".join(lines)):
        sizes[f"{m.group(1)} {m.group(2)}"] = sizes.get(f"{m.group(1)} {m.group(2)}", 0.0) + float(m.group(3))
    return sizes


def llama_buffers(path: Path, **kw: object) -> dict[str, float]:
    """Load with llama.cpp and return the buffer sizes (MiB) it logs."""
    import llama_cpp

    with log_lines() as lines:
        llama_cpp.Llama(model_path=str(path), verbose=False, n_threads=2, **kw).close()
    return buffer_sizes(lines)


def test_kv_and_compute_hand_computed(tiny: dict[str, Path]) -> None:
    info = inspect(tiny["F16"])
    # 8 layers × 512 cells (300 padded to 256s) × K and V rows of n_embd_kv = 64·2 = 128 values
    assert kv_cache_bytes(info, 512, "f16", "f16") == 8 * 512 * 2 * 128 * 2
    assert kv_cache_bytes(info, 512, "q8_0", "q8_0") == 8 * 512 * 2 * (128 // 32 * 34)
    assert kv_cache_bytes(info, 512, "q4_0", "f16") == 8 * 512 * (128 // 32 * 18 + 128 * 2)
    # one ubatch of 512 tokens over 512 cells, no flash attention: the graph peaks at the
    # attention (mask 512² f32, scores 512²×4 heads f32, five n_embd rows and K, V of u tokens),
    # the work buffer holds the scores as f16
    u = n_kv = 512
    attn = 4 * n_kv * u + 4 * n_kv * u * 4 + 5 * 4 * 256 * u + 2 * 4 * 128 * u
    work = 2 * n_kv * u * 4
    p = SessionParams(n_ctx=512, n_batch=512, n_ubatch=512)
    assert compute_bytes(info, p, 512) == attn + work
    # flash attention: no scores, an f16 mask; the largest graph is then the FFN
    ffn = 2 * n_kv * u + 3 * 4 * 512 * u + 3 * 4 * 256 * u
    act = 512 // 32 * 34 * u  # the FFN activations quantized for the matmul (work buffer)
    assert compute_bytes(info, SessionParams(n_ctx=512, flash_attn=True), 512) == ffn + act


@pytest.mark.parametrize("which, n_ctx, fa, kv", [("tiny", 256, False, "f16"), ("tiny", 256, True, "q8_0"),
                                                  ("bundled", 2048, False, "q8_0"), ("bundled", 8192, True, "q8_0")])
def test_sizes_match_llama_cpp_buffers(tiny: dict[str, Path], bundled_model: Path, which: str, n_ctx: int,
                                       fa: bool, kv: str) -> None:
    """KV, repacked and mapped weights, and the worst-case graph (every row an output, as
    llama.cpp reserves it) against the sizes llama.cpp itself reports on this machine."""
    path = tiny["Q4_0"] if which == "tiny" else bundled_model
    ggml = {"f16": 1, "q8_0": 8}[kv]
    got = llama_buffers(path, n_ctx=n_ctx, n_batch=512, flash_attn=fa, type_k=ggml, type_v=ggml if fa else 1)
    p = SessionParams(n_ctx=n_ctx, type_k=kv, type_v=kv if fa else "f16", flash_attn=fa, n_outputs=512)
    info = inspect(path)
    e = estimate(info, p, CpuFeatures.detect())
    assert got["CPU KV"] == pytest.approx(e.kv_cache / MiB, abs=0.01)
    assert got.get("CPU_REPACK model", 0.0) == pytest.approx(e.weights_repacked / MiB, abs=0.01)
    assert got["CPU_Mapped model"] == pytest.approx(e.weights_mapped / MiB, abs=2 * 4096 / MiB + 0.01)
    graph, _ = compute_parts(info, p, e.kv_size)
    assert got["CPU compute"] == pytest.approx(graph / MiB, rel=0.06)


def test_bundled_prediction_within_10_percent(bundled_model: Path) -> None:
    """A real session in a child process (edge.cli imported, as `edge run`): a prompt that
    fills 1016 of 1024 cells, 4 tokens generated; VmHWM against the prediction."""
    cfg = {"model": str(bundled_model), "n_ctx": 1024, "n_batch": 512, "kv": "f16", "fa": False,
           "repack": True, "fills": [1016]}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_model.py"), "--child", json.dumps(cfg)],
                         capture_output=True, text=True, cwd=ROOT, timeout=900,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])["marks"]["fill0"]
    e = estimate(inspect(bundled_model), SessionParams(n_ctx=1024, n_filled=1020))
    assert e.peak_rss == pytest.approx(m["VmHWM"], rel=0.10)
    assert e.anon == pytest.approx(m["RssAnon"], rel=0.10)
    assert e.file == pytest.approx(m["RssFile"], rel=0.10)


def test_repack_rules_per_cpu_family() -> None:
    # ggml-cpu/repack.cpp: AVX2 repacks Q4_0, Q4_K, IQ4_NL (rows % 8); ARM by dotprod / i8mm
    avx2, pi4, pi5, i8mm = PRESETS["x86-avx2"], PRESETS["pi4"], PRESETS["pi5"], PRESETS["arm-i8mm"]
    assert repack_layout("Q4_0", 4096, avx2) == "Q4_0 8x8"
    assert repack_layout("Q4_0", 4092, avx2) is None  # rows not a multiple of 8
    assert repack_layout("Q4_K", 4096, avx2) == "Q4_K 8x8"
    assert [repack_layout(t, 4096, avx2) for t in ("Q8_0", "Q6_K", "Q4_1", "Q5_K")] == [None] * 4
    assert repack_layout("Q2_K", 4096, PRESETS["x86-avx512"]) == "Q2_K 8x8"
    assert all(repack_layout(t, 4096, pi4) is None for t in ("Q4_0", "Q4_K", "Q8_0", "Q6_K"))
    assert [repack_layout(t, 4096, pi5) for t in ("Q4_0", "Q4_K", "Q6_K", "Q8_0", "Q4_1")] == [
        "Q4_0 4x4", "Q4_K 8x4", "Q6_K 8x4", "Q8_0 4x4", None]
    assert repack_layout("Q4_0", 4096, i8mm) == "Q4_0 4x8"
    cpu = CpuFeatures.from_system_info("CPU : NEON = 1 | ARM_FMA = 1 | DOTPROD = 1 | MATMUL_INT8 = 0 | "
                                       "SVE_CNT = 16 | REPACK = 1 |", arch="aarch64")
    assert cpu.family == "arm-dotprod" and cpu.sve_bytes == 16
    flags = CpuFeatures.from_cpu_flags({"fp", "asimd", "asimddp", "asimdhp"}, "aarch64")
    assert flags.family == "arm-dotprod"


def test_repack_on_off_parts(tiny: dict[str, Path]) -> None:
    info = inspect(tiny["Q4_0"])
    on = estimate(info, SessionParams(), PRESETS["x86-avx2"])
    off = estimate(info, SessionParams(repack=False), PRESETS["x86-avx2"])
    q4 = sum(t.n_bytes for t in info.tensors if t.type == "Q4_0" and t.name != "token_embd.weight")
    assert on.weights_repacked == q4 and off.weights_repacked == 0
    assert on.weights_mapped_idle > 0.95 * q4  # their mapped sources stay resident but idle
    assert on.peak_rss > off.peak_rss + 0.9 * q4
    assert on.required == pytest.approx(off.required, abs=2 * 4096)  # the copy replaces, not adds
    locked = estimate(info, SessionParams(use_mlock=True), PRESETS["x86-avx2"])
    assert locked.required == locked.peak_rss  # mlock pins the idle pages too


def test_runtime_kv_types_and_repack_switch(tiny: dict[str, Path]) -> None:
    """RuntimeConfig's repack=False reaches llama.cpp (no CPU_REPACK buffer), a q8_0 KV cache
    with flash attention loads and generates, and SessionParams reads the same config."""
    cfgs = [RuntimeConfig(n_ctx=256, threads=2), RuntimeConfig(n_ctx=256, threads=2, repack=False,
                                                               type_k="q8_0", type_v="q8_0", flash_attn=True)]
    seen = []
    for cfg in cfgs:
        with log_lines() as lines:
            rt = Runtime(tiny["Q4_0"], cfg)
        try:
            assert rt.generate("the small model", max_tokens=4, sampling=None).n_gen_tokens >= 1
        finally:
            rt.close()
        sizes = buffer_sizes(lines)
        e = estimate(inspect(tiny["Q4_0"]), SessionParams.from_config(cfg), CpuFeatures.detect())
        assert sizes["CPU KV"] == pytest.approx(e.kv_cache / MiB, abs=0.01)
        seen.append(sizes.get("CPU_REPACK model", 0.0))
    if CpuFeatures.detect().family in ("x86-avx2", "x86-avx512", "arm-dotprod", "arm-i8mm"):
        assert seen[0] > 0  # Q4_0 repacks on these builds
    assert seen[1] == 0.0
    with pytest.raises(BadOptionError, match="flash attention"):
        RuntimeConfig(type_v="q8_0").validate()


def test_synthesized_tensors_match_quantizer(tiny: dict[str, Path]) -> None:
    shape = {"n_layers": 8, "n_embd": 256, "n_head": 4, "n_head_kv": 2, "n_ff": 512,
             "n_vocab": inspect(tiny["F16"]).n_vocab, "context_length": 256}
    for q in ("Q4_0", "Q8_0", "Q4_K_M"):
        real, syn = inspect(tiny[q]), synthesize(shape, q)
        assert {t.name: t.type for t in real.tensors} == {t.name: t.type for t in syn.tensors}, q
        assert sum(t.n_bytes for t in real.tensors) == sum(t.n_bytes for t in syn.tensors)
    with pytest.raises(CatalogError, match="shape needs"):
        synthesize({"n_layers": 2}, "Q4_0")


def test_fit_verdicts_with_injected_ram(tiny: dict[str, Path]) -> None:
    info = inspect(tiny["Q4_0"])
    p = SessionParams(n_ctx=256, process="library")
    need = estimate(info, p, PRESETS["x86-avx2"]).required
    kw = {"params": p, "cpu": PRESETS["x86-avx2"]}
    big = fit(info, memory=MemorySnapshot(16 * GiB, 8 * GiB), **kw)
    assert big.status == "fits" and big.fits and big.max_ctx == info.context_length
    room = need + (256 << 20) + (1 << 20)  # just above need + margin
    assert fit(info, memory=MemorySnapshot(2 * GiB, room), **kw).status == "fits"
    tight = MemorySnapshot(2 * GiB, room - (2 << 20), swap_free=1 * GiB)
    assert fit(info, memory=tight, **kw).status == "swap"
    # 3 MiB short: 4 MiB of disk swap covers it, 4 MiB of zram (a quarter counts) does not
    assert fit(info, memory=MemorySnapshot(2 * GiB, room - (4 << 20), swap_free=4 << 20), **kw).status == "swap"
    zram = MemorySnapshot(2 * GiB, room - (4 << 20), swap_free=4 << 20, zram_free=4 << 20)
    assert zram.swap_usable == 1 << 20 and fit(info, memory=zram, **kw).status == "oom"
    v = fit(info, memory=MemorySnapshot(2 * GiB, 100 << 20), **kw)
    assert v.status == "oom" and v.max_ctx is None and not v.fits
    assert "no context fits" in v.message("tiny") and "--force" in v.message("tiny")
    with pytest.raises(InsufficientMemoryError):
        v.require("tiny")
    v.require("tiny", force=True)


def test_largest_context_is_the_boundary(bundled_model: Path) -> None:
    info, cpu = inspect(bundled_model), PRESETS["x86-avx2"]
    p = SessionParams(n_ctx=8192)
    mem = MemorySnapshot(4 * GiB, 256 * MiB + 330 * MiB)  # 330 MiB after the margin
    v = fit(info, params=p, cpu=cpu, memory=mem)
    assert v.status == "oom" and v.max_ctx is not None and 256 <= v.max_ctx < 8192
    room = mem.available - mem.margin
    assert estimate(info, SessionParams(n_ctx=v.max_ctx), cpu).required <= room
    assert estimate(info, SessionParams(n_ctx=v.max_ctx + 256), cpu).required > room
    line = v.message("smollm2-135m")
    assert f"the largest context that fits is {v.max_ctx}" in line and "--ctx 8192" in line
    assert "\n" not in line


def test_meminfo_from_fake_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal:  4000000 kB\nMemFree: 100000 kB\n"
                                           "MemAvailable:  3000000 kB\nSwapTotal: 2000000 kB\nSwapFree: 1500000 kB\n")
    (tmp_path / "proc/swaps").write_text("Filename Type Size Used Priority\n"
                                         "/dev/zram0 partition 1000000 200000 100\n")
    monkeypatch.setenv("EDGE_SYSFS_ROOT", str(tmp_path))
    m = MemorySnapshot.read()
    assert (m.total, m.available, m.swap_free, m.zram_free) == (4000000 * 1024, 3000000 * 1024,
                                                                 1500000 * 1024, 800000 * 1024)
    assert m.swap_usable == 700000 * 1024 + 200000 * 1024
    assert m.margin == 256 * MiB  # 5% of 3.8 GiB is less than the 256 MiB floor
    assert MemorySnapshot(16 * GiB, 8 * GiB).margin == int(16 * GiB * 0.05)


def test_catalog_entry_too_big_refused_without_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    from edge.catalog import get_entry, models_dir

    def no_network(*a: object, **k: object) -> None:
        raise AssertionError("the fit check must not touch the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    cat = tmp_path / "catalog.toml"
    cat.write_text(
        '[models.huge]\nurl = "http://127.0.0.1:9/huge.gguf"\nfile = "huge.gguf"\nquant = "Q4_K_M"\n'
        "shape = { n_layers = 80, n_embd = 8192, n_head = 64, n_head_kv = 8, n_ff = 28672, "
        "n_vocab = 128256, context_length = 8192 }\n\n"
        '[models.sized]\nurl = "http://127.0.0.1:9/sized.gguf"\nfile = "sized.gguf"\nquant = "Q8_0"\n'
        "size = 9000000000000\n")
    monkeypatch.setenv("EDGE_CATALOG", str(cat))
    mem = MemorySnapshot(8 * GiB, 7 * GiB)
    v = fit(get_entry("huge"), memory=mem, cpu=PRESETS["pi5"])
    assert v.status == "oom" and v.approximate and v.max_ctx is None
    assert v.needed > 40 * GiB  # a 70B at Q4_K_M: ~40 GiB of weights alone
    line = v.message("huge")
    assert line.startswith("huge needs") and "--force" in line and "this device has 6.6 GiB available" in line
    sized = fit(get_entry("sized"), memory=mem, cpu=PRESETS["pi5"])
    assert sized.status == "oom" and sized.needed >= 9_000_000_000_000
    assert not models_dir().exists() or not any(models_dir().iterdir())  # nothing downloaded
    small = fit(get_entry("huge"), memory=MemorySnapshot(512 * GiB, 500 * GiB), cpu=PRESETS["pi5"])
    assert small.status == "fits"


def test_unreadable_meminfo_is_unknown_not_out_of_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          bundled_model: Path) -> None:
    # A device tree whose meminfo has only MemTotal (a container, the bench's Pi fixture):
    # no verdict, so nothing is refused on a reading of "0 bytes available".
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text("MemTotal:  8000000 kB\n")
    monkeypatch.setenv("EDGE_SYSFS_ROOT", str(tmp_path))
    v = fit(bundled_model)
    assert v.status == "unknown" and v.fits and "could not be read" in v.message()
    v.require()  # does not raise
