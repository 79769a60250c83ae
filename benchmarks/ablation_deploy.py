"""Issue 16: what folding an ablation into a quantized model costs, and does it run in plain
llama.cpp?

From a finished `edge bias mitigate --splits` run's shared states (RUN/shared.npz), takes
split 0's calibration rows, computes the overall bias directions, folds them at strength
--strength into the model the run scored (the f16 copy) and into the model file itself,
re-quantized to its own types. Prints the fold record with the re-quantization KL against
the F16 fold, the same KL of the unedited file against its own f16 copy (what the
quantized kernels cost anyway), and a greedy answer from llama-cpp-python on the folded file.

    python benchmarks/ablation_deploy.py RUN_OUT_DIR --suite crows_pairs:PATH \
        --exclude-category disability --calib-limit 200 [--strength 0.5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from bias.ablate import AblationSpec, compute_directions, make_plan
    from bias.feedback import neutral_chunks
    from bias.splits import SplitsConfig
    from bias.suites import load_suite
    from edge.fold import fold_gguf, requant_cost
    from edge.runtime import Runtime, RuntimeConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--suite", required=True)
    ap.add_argument("--exclude-category", default=None)
    ap.add_argument("--calib-limit", type=int, default=None)
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    res = json.loads((a.run / "results.json").read_text())
    suite = load_suite(a.suite)
    cfg = SplitsConfig(n_splits=1, exclude_category=a.exclude_category, calib_limit=a.calib_limit)
    cal, _ = cfg.rows(suite, 0)
    z = np.load(a.run / "shared.npz")
    d = compute_directions(z["h_more"][cal], z["h_less"][cal], z["e_more"][cal], z["e_less"][cal])
    plan = make_plan(d, AblationSpec(tuple(range(d.n_layers)), a.strength))
    src, f16_src = Path(res["shared"]["model"]), Path(res["shared"]["compute"]["path"])
    with tempfile.TemporaryDirectory() as tmp:
        f16, q = Path(tmp) / "fold.f16.gguf", Path(tmp) / "fold.gguf"
        t0 = time.perf_counter()
        fold_gguf(f16_src, f16, plan, weight_type="F16")
        r = fold_gguf(src, q, plan, weight_type="source")
        rt = Runtime(src, RuntimeConfig(n_ctx=512, threads=a.threads))
        text = "".join(rt.detokenize(c[1:]) for c in neutral_chunks(rt))
        rt.close()
        r.requant_kl = requant_cost(f16, q, text, threads=a.threads)
        out = r.to_dict()
        out.pop("tensors")
        out["seconds_total"] = time.perf_counter() - t0
        out["unedited_file_vs_f16_copy"] = requant_cost(f16_src, src, text, threads=a.threads)
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(q), n_ctx=256, verbose=False, n_threads=a.threads)
        out["plain_llama_cpp_answer"] = llm("The capital of France is", max_tokens=8, temperature=0)["choices"][0]["text"]
        del llm
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
