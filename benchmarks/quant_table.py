"""Each quant type's size, bits/weight, perplexity, KL divergence vs f16 and tg speed, in one
Markdown table, measured in one run on this machine.

The f16 reference is --model, or (default) the bundled SmolLM2-135M-Instruct turned back
into an f16 GGUF (export to Hugging Face, then edge convert). Every type is quantized from
that f16 with edge quantize, scored with edge eval ppl --base f16 on --text, and timed
generating --tg tokens greedily.

    python benchmarks/quant_table.py [--model F16.gguf] [--types Q8_0,Q4_K_M,...]
        [--text FILE] [--ctx 512] [--chunks 4] [--tg 64] [--threads N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_TYPES = "Q8_0,Q6_K,Q5_K_M,Q5_0,Q4_K_M,Q4_0,Q3_K_M,Q2_K"
DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"


def reference_f16(workdir: Path) -> Path:
    from edge.catalog import default_entry
    from edge.convert import convert
    from edge.export_hf import export_hf

    out = workdir / "smollm2-135m.f16.gguf"
    if not out.exists():
        print("making an f16 GGUF of the bundled model (export → convert) ...", file=sys.stderr)
        export_hf(default_entry().local_path, workdir / "hf", force=True)
        convert(workdir / "hf", out, outtype="f16")
    return out


def tg_speed(path: Path, n: int, threads: int | None) -> float:
    from edge.runtime import Runtime, RuntimeConfig
    from edge.sampling import Sampling

    rt = Runtime(path, RuntimeConfig(n_ctx=256, threads=threads))
    try:
        stats = rt.generate("The history of the city begins", max_tokens=n,
                            sampling=Sampling(temp=0.0, repeat_penalty=1.0))
        return stats.gen_tps
    finally:
        rt.close()


def main() -> None:
    from edge.evaluate import perplexity
    from edge.gguf_file import inspect
    from edge.quantize import quantize

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="f16 (or f32) GGUF to quantize [default: bundled model as f16]")
    ap.add_argument("--types", default=DEFAULT_TYPES)
    ap.add_argument("--text", default=DEFAULT_TEXT)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default="/tmp/edge-quant-table")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ref = Path(args.model) if args.model else reference_f16(work)
    params = inspect(ref).params or 1
    rows = []
    for qtype in ["F16", *args.types.split(",")]:
        path = ref
        if qtype != "F16":
            path = work / f"{ref.stem.replace('.f16', '')}.{qtype}.gguf"
            quantize(ref, path, qtype=qtype, threads=args.threads, force=True)
        print(f"{qtype}: scoring ...", file=sys.stderr, flush=True)
        r = perplexity(path, args.text, n_ctx=args.ctx, base=None if qtype == "F16" else ref,
                       threads=args.threads, max_chunks=args.chunks, log=False)
        size = path.stat().st_size
        rows.append((qtype, size, size * 8 / params, r, tg_speed(path, args.tg, args.threads)))
    base_ppl = rows[0][3].ppl
    print(f"\nModel: {ref.name} ({params / 1e6:.0f}M parameters); text: {args.text}, ctx {args.ctx}, "
          f"{rows[0][3].n_chunks} chunks ({rows[0][3].n_scored} tokens scored); tg {args.tg} tokens\n")
    print("| type | size MB | bits/weight | PPL | ΔPPL vs f16 | mean KLD vs f16 | same top-1 | tg t/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for qtype, size, bpw, r, tps in rows:
        kld = "0" if r.kld_mean is None else f"{r.kld_mean:.5f} ± {r.kld_err:.5f}"
        top = "100%" if r.top1_agreement is None else f"{r.top1_agreement:.1%}"
        print(f"| {qtype} | {size / 1e6:.1f} | {bpw:.2f} | {r.ppl:.3f} ± {r.ppl_err:.3f} | "
              f"{r.ppl - base_ppl:+.3f} | {kld} | {top} | {tps:.1f} |")


if __name__ == "__main__":
    main()
