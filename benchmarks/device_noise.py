"""How far can a re-quantized file's held-out pct sit from the engine's, from llama.cpp's
arithmetic alone? (issue 16: "the ablated GGUF ... reproduces the engine's corrected scores,
pct within 0.5 points")

llama.cpp quantizes a quantized weight's input rows to 8 bits (bias.arith). That rounding is
chaotic: an input change below float32's resolution moves each token's log-prob by ~0.1 nats
(SD), the whole of the gap between a Q4_1 file in llama.cpp and its exact weights. Summed
over a sentence, most of it is systematic all the same. This reads both parts: the learned edit of one split of a `--splits` run, scored on that
split's held-out pairs

  - in the engine's exact arithmetic (the run's own judge),
  - in llama.cpp's arithmetic reproduced in torch, in R realizations (the embeddings times
    1 + 1e-7·N(0, 1): below float32's resolution of a weight, above that of a sum of them),
  - in plain llama.cpp on the source file and on the edit folded into it, re-quantized,

and prints the pct before and after, and the change, for each: the realizations' mean is what
a file should read, their SD how far it moves between builds and hosts, with nothing about
the correction changed; and what a run's two readings (bias.arith.DeviceSpread) predict.

    python benchmarks/device_noise.py RUN [--split 0] [--realizations 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="an `edge bias mitigate --method learn --splits N` output folder")
    ap.add_argument("--split", type=int, default=0)
    ap.add_argument("--realizations", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", type=Path, help="write every arithmetic's pair differences here (.npz)")
    args = ap.parse_args()

    import torch
    from bias_gating import open_run

    from bias.arith import DeviceSpread, redraw
    from bias.audit import _sentence
    from bias.learn import TorchLlama, edit_of, load_edit, pair_parts
    from bias.methods import _score_file
    from bias.metrics import pct_stereotype
    from edge.fold import fold_gguf

    torch.set_num_threads(args.threads)
    cfg, rt, scorer, ctx = open_run(args.run, args.threads)
    sh = ctx.shared
    held = cfg.rows(sh.suite, args.split)[1]
    items = [sh.suite.items[int(i)] for i in held]
    more = [_sentence(rt, it.more)[0] for it in items]
    less = [_sentence(rt, it.less)[0] for it in items]
    plan = load_edit(args.run / f"split{args.split}" / "learn_edit.npz")
    edit = edit_of(plan)
    rows: list[tuple[str, float, float]] = []
    diffs: dict[str, np.ndarray] = {}  # (2, pairs): each arithmetic's pair differences, before and after

    def pct(a: np.ndarray, b: np.ndarray) -> float:
        return float(pct_stereotype(a, b))

    def engine(name: str, key: str, m: TorchLlama) -> None:
        t = time.time()
        b, a = pair_parts(m, more, less, None), pair_parts(m, more, less, edit)
        rows.append((name, pct(b[0], b[1]), pct(a[0], a[1])))
        diffs[key] = np.stack([b[0] - b[1], a[0] - a[1]])
        print(f"  {name}: {rows[-1][1]:.2f} → {rows[-1][2]:.2f} ({time.time() - t:.0f} s)", flush=True)

    print(f"split {args.split}: {len(held)} held-out pairs; source {ctx.source_path.name}")
    engine("engine, exact arithmetic (the run's judge)", "engine", TorchLlama(ctx.compute_path))
    sim = TorchLlama(ctx.source_path, "llama.cpp")
    emb = sim.emb
    sim_keys = [f"llama.cpp_arithmetic_in_torch{r}" for r in range(args.realizations)]
    for r, key in enumerate(sim_keys):
        sim.emb = emb
        if r:
            redraw(sim, r)  # as a run's second reading does
        engine(f"llama.cpp arithmetic in torch, realization {r}", key, sim)
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "deployed.gguf"
        fold_gguf(ctx.source_path, dst, plan, weight_type="source", force=True, note="device_noise")
        suite = sh.suite.subset(held.tolist())
        t = time.time()
        src, dep = _score_file(ctx, ctx.source_path, suite), _score_file(ctx, dst, suite)
        rows.append(("plain llama.cpp: source file, edit folded (re-quantized)",
                     pct(src.more, src.less), pct(dep.more, dep.less)))
        diffs["llama.cpp"] = np.stack([src.more - src.less, dep.more - dep.less])
        print(f"  {rows[-1][0]}: {rows[-1][1]:.2f} → {rows[-1][2]:.2f} ({time.time() - t:.0f} s)")
    sims = np.array([[b, a] for _, b, a in rows[1:-1]])  # the realizations, between exact and plain
    ex, lc = rows[0], rows[-1]
    print("\n| arithmetic | pct before | pct after | change |\n|---|---|---|---|")
    for n, b, a in rows:
        print(f"| {n} | {b:.2f} | {a:.2f} | {a - b:+.2f} |")
    sd = sims.std(0, ddof=1) if len(sims) > 1 else np.full(2, np.nan)
    sdc = np.std(sims[:, 1] - sims[:, 0], ddof=1) if len(sims) > 1 else np.nan
    print(f"\nrealizations ({len(sims)}): mean {sims[:, 0].mean():.2f} → {sims[:, 1].mean():.2f}; SD before "
          f"{sd[0]:.2f}, after {sd[1]:.2f}, change {sdc:.2f} points")
    print(f"plain llama.cpp against the exact engine: before {lc[1] - ex[1]:+.2f}, after {lc[2] - ex[2]:+.2f}, "
          f"change {(lc[2] - lc[1]) - (ex[2] - ex[1]):+.2f} points")
    if len(sims) > 1:
        reads = [diffs[k] for k in sim_keys[:2]]
        pb, pa = (DeviceSpread.of([r[k] for r in reads]) for k in (0, 1))
        print(f"predicted from realizations 0 and 1 alone (bias.arith.DeviceSpread, as a run reports it): "
              f"{pb.mean:.2f} ± {pb.sd:.2f} → {pa.mean:.2f} ± {pa.sd:.2f} (chaotic SD {pb.chaotic_sd:.2f} / "
              f"{pa.chaotic_sd:.2f} nats a pair)")
        e = np.stack([diffs[k][0] - diffs["engine"][0] for k in sim_keys])
        el = diffs["llama.cpp"][0] - diffs["engine"][0]
        print(f"noise (device − exact, before): SD {e.std(1).mean():.2f} nats a pair; correlation between "
              f"realizations {np.corrcoef(e)[np.triu_indices(len(e), 1)].mean():.2f}, with plain llama.cpp's "
              f"{np.mean([np.corrcoef(el, x)[0, 1] for x in e]):.2f}")
    if args.save:
        np.savez(args.save, **diffs)
    scorer.close()
    rt.close()


if __name__ == "__main__":
    main()
