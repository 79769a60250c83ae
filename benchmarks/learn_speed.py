"""The learned edit's step on the last layer alone: per-position rows (bias.learn.Rows) vs the
padded forward it replaced, on the same CrowS-Pairs calibration pairs, interleaved in one run.

Both fits start from the same random edit and see the same batches (same seed); the script
prints each one's seconds a step (median of --rounds blocks), their ratio, the rows a step
reads, and how far the two forwards' pair differences lie apart under the edit.

    pip install 'edge[learn]'
    python benchmarks/learn_speed.py [--pairs 436] [--steps 10] [--rounds 3] [--setup-rounds 0] [--threads 2] [--model M.gguf]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "crows_pairs" / "crows_pairs_anonymized.csv"


def main() -> None:
    import torch

    from bias.audit import _sentence
    from bias.gate import neutral_windows
    from bias.learn import LearnConfig, PairData, TorchLlama, Trainer, parted_at
    from bias.suites import load_suite
    from edge.runtime import RuntimeConfig
    from edge.session import open_runtime

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a GGUF (default: the bundled model)")
    ap.add_argument("--suite", type=Path, default=DATA)
    ap.add_argument("--pairs", type=int, default=436, help="calibration pairs (a split's share of CrowS-Pairs)")
    ap.add_argument("--steps", type=int, default=10, help="steps a block")
    ap.add_argument("--rounds", type=int, default=3, help="blocks of each, interleaved")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--setup-rounds", type=int, default=0,
                    help="also time building the rows with batches in length order vs the sentences' own, interleaved")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rt = open_runtime(a.model, RuntimeConfig(n_ctx=512, threads=a.threads))
    items = load_suite(f"crows_pairs:{a.suite}").items
    pick = np.random.default_rng(0).permutation(len(items))[: a.pairs]
    more = [_sentence(rt, items[i].more)[0] for i in pick]
    less = [_sentence(rt, items[i].less)[0] for i in pick]
    groups = np.array([items[i].category for i in pick])
    cfg = LearnConfig(eval_every=10 ** 9)  # time the steps, not validation passes
    neutral = neutral_windows(rt, cfg.neutral_windows, cfg.window)  # as bias.methods.fit_learn
    m = TorchLlama(Path(rt.path))
    top = m.n_layers - 1
    t0 = time.perf_counter()
    padded = PairData(more, less, m.streams(more, top), m.streams(less, top), groups)
    t_streams = time.perf_counter() - t0
    first = [parted_at(x, y) for x, y in zip(more, less, strict=True)]
    t0 = time.perf_counter()
    rows = PairData(more, less, [], [], groups, (m.rows(more, first), m.rows(less, first)))
    t_rows = time.perf_counter() - t0
    # validation on 4 pairs: a block's two validation passes (its start and end) stay a small part of it
    val = {"padded": PairData(more[:4], less[:4], padded.xm[:4], padded.xl[:4], groups[:4]),
           "rows": PairData(more[:4], less[:4], [], [], groups[:4], (m.rows(more[:4], first[:4]), m.rows(less[:4], first[:4])))}
    fits = {"padded": Trainer(m, padded, val["padded"], neutral, top, cfg),
            "rows": Trainer(m, rows, val["rows"], neutral, top, cfg)}
    init = torch.Generator().manual_seed(1)
    with torch.no_grad():
        u, b = torch.randn(fits["padded"].U.shape, generator=init) * 0.02, torch.randn(fits["padded"].b.shape, generator=init) * 0.02
        for t in fits.values():
            t.U.copy_(u)
            t.b.copy_(b)
            t.V.copy_(fits["padded"].V)
    gap = np.abs(fits["padded"].diffs(padded) - fits["rows"].diffs(rows)).max()
    seen = {k: [] for k in fits}
    for _ in range(a.rounds):
        for name, t in fits.items():
            t0 = time.perf_counter()
            t.run(a.steps, 1.0, lambda kind, d: None)
            seen[name].append((time.perf_counter() - t0) / a.steps)
    tail = sum(len(x) - 1 for x in more + less)
    kept = sum(len(x) + len(y) - 2 - 2 * f for x, y, f in zip(more, less, first, strict=True))
    pad = sum(2 * max(len(x), len(y)) - 2 for x, y in zip(more, less, strict=True))
    med = {k: float(np.median(v)) for k, v in seen.items() if v}
    print(f"model {rt.path} ({m.n_layers} layers, n_embd {m.n_embd}, vocab {m.out.shape[0]}), {a.threads} threads, "
          f"{a.pairs} pairs, {a.rounds} × {a.steps} steps each, interleaved")
    print(f"positions a pair's sentences predict: {tail}; kept by rows {kept} ({100 * kept / tail:.0f}%); "
          f"the padded forward reads ≥ {pad} (pairs padded to their longer sentence, more in a batch)")
    print(f"set-up: streams entering layer {top} {t_streams:.1f} s, rows (with its attention) {t_rows:.1f} s")
    if a.setup_rounds:
        import bias.learn as bl

        def given(seqs: list[list[int]], n: int) -> list[list[int]]:  # the batching before bias.learn.by_length
            return [list(range(i, min(i + n, len(seqs)))) for i in range(0, len(seqs), n)]

        setup: dict[str, list[float]] = {"given order": [], "by length": []}
        for _ in range(a.setup_rounds):
            for name, batches in (("given order", given), ("by length", bl.by_length)):
                bl.by_length, keep = batches, bl.by_length
                t0 = time.perf_counter()
                m.rows(more, first)
                setup[name].append(time.perf_counter() - t0)
                bl.by_length = keep
        med = {k: float(np.median(v)) for k, v in setup.items()}
        print(f"rows of the {a.pairs} 'more' sentences, seconds: " + ", ".join(
            f"{k} {med[k]:.1f} ({', '.join(f'{x:.1f}' for x in v)})" for k, v in setup.items())
            + f"; by length / given {med['by length'] / med['given order']:.2f}")
    if a.rounds:
        print(f"seconds a step: padded {med['padded']:.3f} (blocks {', '.join(f'{x:.3f}' for x in seen['padded'])}), "
              f"rows {med['rows']:.3f} (blocks {', '.join(f'{x:.3f}' for x in seen['rows'])}); "
              f"rows / padded {med['rows'] / med['padded']:.2f}")
    print(f"pair differences under the same edit, rows vs padded: max |Δ| {gap:.2e} nats")
    rt.close()


if __name__ == "__main__":
    main()
