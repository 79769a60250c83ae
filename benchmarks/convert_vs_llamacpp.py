"""edge convert vs llama.cpp's convert_hf_to_gguf.py on a TinyLlama-1.1B-shaped checkpoint.

Writes a random f16 checkpoint with TinyLlama-1.1B's shapes (≈2.2 GB, sharded safetensors,
a small SentencePiece tokenizer padded to 32000 ids), converts it to f16 GGUF with both
tools in one run, each in its own process from a warm page cache, and prints wall time and
peak RSS with the ratios edge / llama.cpp (target: ≤ 1.0 on both). It then checks that
both GGUFs hold the same tensors, byte for byte.

llama.cpp's converter comes from the llama-cpp-python sdist (pip download) matching the
installed version, or from --llamacpp DIR (a llama.cpp tree). It needs torch, transformers
and sentencepiece in this Python: pip install torch transformers sentencepiece.

    python benchmarks/convert_vs_llamacpp.py [--workdir DIR] [--llamacpp DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

TINYLLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
    "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16", "hidden_act": "silu",
}
# Run a command as a child and report its wall time and peak RSS (RUSAGE_CHILDREN is per waiter).
MEASURE = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "with open(sys.argv[2], 'wb') as log: rc = subprocess.call(sys.argv[3:], stdout=log, stderr=log)\n"
    "dt = time.perf_counter() - t\n"
    "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
    "open(sys.argv[1], 'w').write(json.dumps({'rc': rc, 'seconds': dt, 'peak_rss': rss}))\n"
)


def write_checkpoint(d: Path, seed: int = 0, config: dict | None = None, shards: int = 2) -> None:
    """Random f16 weights with `config`'s shapes (TinyLlama's by default), in `shards` files."""
    from safetensors.numpy import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from convert_helpers import train_spm

    d.mkdir(parents=True, exist_ok=True)
    train_spm(d, 512)
    c, rng = config or TINYLLAMA, np.random.default_rng(seed)
    (d / "config.json").write_text(json.dumps(c, indent=1))
    h, ff, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * h_dim(c)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    def layers(lo: int, hi: int) -> dict[str, np.ndarray]:
        out = {}
        for i in range(lo, hi):
            p = f"model.layers.{i}."
            out |= {p + "input_layernorm.weight": np.ones(h, np.float16),
                    p + "post_attention_layernorm.weight": np.ones(h, np.float16),
                    p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                    p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                    p + "mlp.gate_proj.weight": rand(ff, h), p + "mlp.up_proj.weight": rand(ff, h),
                    p + "mlp.down_proj.weight": rand(h, ff)}
        return out

    n = c["num_hidden_layers"]
    bounds = [n * k // shards for k in range(shards + 1)]
    weight_map = {}
    for s in range(shards):
        part = layers(bounds[s], bounds[s + 1])
        if s == 0:
            part["model.embed_tokens.weight"] = rand(c["vocab_size"], h)
        if s == shards - 1:
            part |= {"model.norm.weight": np.ones(h, np.float16), "lm_head.weight": rand(c["vocab_size"], h)}
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(d / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, fname)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / ".complete").write_text("ok")


def h_dim(c: dict) -> int:
    return c["hidden_size"] // c["num_attention_heads"]


def llamacpp_tree(workdir: Path, given: str | None) -> Path:
    if given:
        return Path(given)
    import importlib.metadata

    version = importlib.metadata.version("llama_cpp_python")
    dest = workdir / f"llama_cpp_python-{version}"
    tree = dest / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    sdist_dir = workdir / "sdist"
    subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
                    "--no-binary", ":all:", "-d", str(sdist_dir)], check=True)
    archive = next(sdist_dir.glob("llama_cpp_python-*.tar.gz"))
    keep = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/", "vendor/llama.cpp/gguf-py/")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if any(k in m.name for k in keep)]
        tar.extractall(workdir, members=members, filter="data")
    return tree


def measure(name: str, argv: list[str], workdir: Path, env: dict[str, str]) -> dict:
    res, log = workdir / f"{name}.json", workdir / f"{name}.log"
    subprocess.run([sys.executable, "-c", MEASURE, str(res), str(log), *argv], check=True, env=env)
    r = json.loads(res.read_text())
    if r["rc"] != 0:
        sys.exit(f"{name} failed (exit {r['rc']}); see {log}")
    return r


def same_tensors(a: Path, b: Path) -> tuple[int, list[str]]:
    import gguf

    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    tb = {t.name: t for t in rb.tensors}
    diff = [t.name for t in ra.tensors if t.name not in tb or not np.array_equal(t.data, tb[t.name].data)]
    return len(ra.tensors), diff + sorted(set(tb) - {t.name for t in ra.tensors})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/edge-bench-convert")
    ap.add_argument("--llamacpp", default=None, help="a llama.cpp tree with convert_hf_to_gguf.py")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and GGUFs")
    args = ap.parse_args()
    work = Path(args.workdir)
    hf = work / "tinyllama-random-f16"
    if not (hf / ".complete").exists():
        shutil.rmtree(hf, ignore_errors=True)
        print("writing a TinyLlama-1.1B-shaped random f16 checkpoint ...", flush=True)
        write_checkpoint(hf)
    tree = llamacpp_tree(work, args.llamacpp)
    size = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    for f in hf.glob("*.safetensors"):  # warm the page cache so neither run pays for the disk
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    env = dict(os.environ)
    edge_out, ref_out = work / "edge.f16.gguf", work / "llamacpp.f16.gguf"
    edge_exe = str(Path(sys.executable).parent / "edge")
    print("converting with edge ...", flush=True)
    e = measure("edge", [edge_exe, "convert", str(hf), "-o", str(edge_out), "--outtype", "f16", "--force"], work, env)
    print("converting with llama.cpp's convert_hf_to_gguf.py ...", flush=True)
    env_ref = env | {"PYTHONPATH": str(tree / "gguf-py")}  # its own gguf-py, as it expects
    r = measure("llamacpp", [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(hf), "--outfile",
                             str(ref_out), "--outtype", "f16"], work, env_ref)
    n, diff = same_tensors(edge_out, ref_out)
    print(f"\ncheckpoint: {size / 1e9:.2f} GB f16 safetensors (TinyLlama-1.1B shapes, random)")
    print(f"{'tool':<12}{'seconds':>10}{'peak RSS MB':>14}{'GGUF MB':>10}")
    for name, m, out in (("edge", e, edge_out), ("llama.cpp", r, ref_out)):
        print(f"{name:<12}{m['seconds']:>10.1f}{m['peak_rss'] / 1e6:>14.0f}{out.stat().st_size / 1e6:>10.0f}")
    print(f"ratio edge / llama.cpp: time {e['seconds'] / r['seconds']:.2f}x, "
          f"peak RSS {e['peak_rss'] / r['peak_rss']:.2f}x (target <= 1.0 on both)")
    print(f"tensors identical: {n - len(diff)}/{n}" + (f" (differ: {', '.join(diff[:5])})" if diff else ""))
    if not args.keep:
        for p in (edge_out, ref_out):
            p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
