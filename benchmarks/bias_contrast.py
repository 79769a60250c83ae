"""Take out of the model's last state the directions along which a pair's two sentences
differ more than text in general varies, and measure whether that shrinks each held-out
pair's difference (a per-pair correction) rather than shifting every pair alike.

Why: DESIGN.md "What a per-pair correction would need" found that moving every category that
is biased before toward neutral needs a change of each pair's difference d of about −0.5·d
with little else (≤ ~0.5-1 nats a pair), and that the learned edit does −0.2·d with 2-3
nats of per-pair noise. A shrink of d is what an eraser of the rewrite's trace does: the
shared tokens' part of d is read from the states after the rewrite, so if those states no
longer differ along some directions, the part read there shrinks in proportion. The
directions: the generalized eigenvectors of C_Δ (second moment of the calibration pairs'
state differences at aligned shared positions, bias.audit.shared_after_rewrite) against C_h
(second moment of the states on neutral text): most of the pairs' difference, least of what
text uses (bias.erase.ContrastAxes, what `edge bias mitigate --method erase` folds into the
head). The eraser acts on the final normalized state, h' = h − α·A Bᵀ h: `oblique` scales the
axes' coordinates by 1 − α in C_h's metric, `orth` projects their span out. C_h is read on
neutral text past the part that judges PPL, as the product reads it; `--fit-on-utility`
reads it on that very text (the first, optimistic measurement: PPL +0.02% where the other
text gives +1.69%). `--rarity` says how much of the rewritten tokens' part is their
context-free log-probability.

    python benchmarks/bias_contrast.py /tmp/r91/out --splits 0,1,2,3,4 --try 128,1 --try 32,1,orth

Each --try is k,alpha[,orth][,ridge=R]: the number of directions, the share of each taken
away, the eraser's form, the ridge added to C_h (times its mean eigenvalue). `--splits
0,1,2,3,4` runs the tries on each split (its own calibration rows) and prints one line a
try and split: PPL, the change's slope on d, the CrowS checks on whole sentences and on the
shared tokens alone (bias.splits.CHECKS); `--verbose` adds each category's figures. Held-out pairs
and PPL are computed in torch from the run's model (the last layer's rows), judged with the
split runner's checks against the unedited torch scores.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from bias_gating import category_lines, checks, open_run, parts_lines, run_parser


def final_states(m: Any, seqs: list[list[int]], n: int = 64) -> tuple[Any, Any, np.ndarray]:
    """Every position's final normalized state (the head's input), its next token, and each
    sequence's offsets into them (row p of a sequence predicts its token p + 1)."""
    torch = __import__("torch")
    r = m.rows(seqs, [0] * len(seqs))
    out = []
    with torch.no_grad():
        for a in range(0, len(r.x), 4096):
            x = m.finish(m.n_layers - 1, r.x[a:a + 4096], r.wa[a:a + 4096])
            out.append(m._norm(x, m.onorm))
    return torch.cat(out), r.tgt, r.offsets


def row_ll(m: Any, h: Any, tgt: Any, erase: Any = None, n: int = 2048) -> np.ndarray:
    """Each row's log-probability of its next token from states h, erased first if given."""
    torch = __import__("torch")
    out = []
    with torch.no_grad():
        for a in range(0, len(h), n):
            x = h[a:a + n] if erase is None else erase(h[a:a + n])
            lp = torch.log_softmax(x @ m.out.T, dim=-1)
            out.append(lp.gather(-1, tgt[a:a + n, None])[:, 0].double().numpy())
    return np.concatenate(out)


def shared_checks(parts: dict[str, Any], exclude: str | None) -> dict[str, bool]:
    """bias.splits.CHECKS' four shared-token checks, from bias.judge.judge_parts."""
    p = parts["rest_pct"]["ALL"]
    cats = {c: j for c, j in parts["rest"].items() if c not in ("ALL", exclude)}
    biased = {c for c, j in cats.items() if j.excluded_before}
    return {"ci": p.contains_after and p.excluded_before, "sig": p.toward_neutral,
            "none_worse": not any(j.away_from_neutral for j in cats.values()),
            "moved": {c for c in biased if cats[c].toward_neutral} == biased}


def rarity_line(m: Any, hn: Any, before: Any, changed: list[Any], more: list[list[int]],
                less: list[list[int]]) -> None:
    """Each held-out pair's rewritten tokens scored without their context, by the model's
    mean next-token distribution over neutral text (log p̄), against their part of d."""
    torch = __import__("torch")
    with torch.no_grad():
        pbar = sum(torch.softmax(hn[a:a + 1024] @ m.out.T, -1).sum(0) for a in range(0, len(hn), 1024)) / len(hn)
    lp = pbar.double().log().numpy()
    r = np.array([lp[[a[j + 1] for j in ca]].sum() - lp[[b[j + 1] for j in cb]].sum()
                  for (ca, cb), a, b in zip(changed, more, less, strict=True)])
    d, w = before.more - before.less, before.words
    cw, cd = np.corrcoef(r, w)[0, 1], np.corrcoef(r, d)[0, 1]
    print(f"rarity: var(d) {d.var():.1f} = words {w.var():.1f} + shared {before.rest.var():.1f} + 2 cov "
          f"{np.cov(w, before.rest)[0, 1]:.1f}; context-free rarity r: corr with the words' part {cw:.2f} "
          f"(R² {cw ** 2:.2f}, slope {np.polyfit(r, w, 1)[0]:.2f}), with d {cd:.2f} (R² {cd ** 2:.2f}); "
          f"tokens more − less: corr with d {np.corrcoef([len(x[0]) - len(x[1]) for x in changed], d)[0, 1]:.2f}",
          flush=True)


def main() -> None:
    import torch

    from bias.audit import PairScores, _sentence, rewritten_tokens, shared_after_rewrite
    from bias.erase import ContrastAxes, fit_text
    from bias.judge import judge_pair_rows, judge_parts
    from bias.learn import TorchLlama

    ap = run_parser(0, "k,alpha[,orth][,ridge=R]", "directions, share taken away, eraser form, C_h ridge")
    ap.add_argument("--splits", help="comma-separated splits to run the tries on (instead of --split)")
    ap.add_argument("--fit-on-utility", action="store_true", help="estimate C_h on the text PPL is measured on "
                    "(optimistic: the first measurements did)")
    ap.add_argument("--rarity", action="store_true", help="how much of the words' part is the words' "
                    "context-free log-probability (the model's mean next-token distribution on neutral text)")
    ap.add_argument("--verbose", action="store_true", help="each try's category figures")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cfg, rt, scorer, ctx = open_run(args.out, args.threads)
    sh = ctx.shared
    m = TorchLlama(ctx.compute_path)
    # neutral text: the states the eraser must leave alone, read past the text that judges
    # PPL (as bias.methods._erase_states reads it), unless --fit-on-utility
    hn, tn, _ = final_states(m, sh.neutral)
    hf = final_states(m, sh.neutral if args.fit_on_utility else fit_text(rt))[0].double().numpy()

    def toks(rows: np.ndarray) -> tuple[list[list[int]], list[list[int]]]:
        return ([_sentence(rt, sh.suite.items[i].more)[0] for i in rows],
                [_sentence(rt, sh.suite.items[i].less)[0] for i in rows])

    def ppl(erase: Any) -> float:
        return float(np.exp(-row_ll(m, hn, tn, erase).mean()))

    base_ppl = ppl(None)
    tally: dict[str, dict[str, int]] = {}
    splits = [int(x) for x in args.splits.split(",")] if args.splits else [args.split]
    for split in splits:
        cal, held = cfg.rows(sh.suite, split)
        # calibration pairs: state differences at the aligned positions after the rewrite
        cm, cl = toks(cal)
        hm, _, om = final_states(m, cm)
        hl, _, ol = final_states(m, cl)
        dm, dl = [], []
        for i, (a, b) in enumerate(zip(cm, cl, strict=True)):
            al = shared_after_rewrite(a, b)
            dm += [om[i] + p for p, _ in al]
            dl += [ol[i] + q for _, q in al]
        delta = (hm[dm] - hl[dl]).double().numpy()
        hmore, hless = toks(held)
        changed = [rewritten_tokens(a[1:], b[1:]) for a, b in zip(hmore, hless, strict=True)]
        H = [final_states(m, s) for s in (hmore, hless)]
        print(f"\n## split {split}: {len(cal)} calibration pairs, {len(delta)} aligned states; {len(held)} held "
              f"out; neutral {len(hf)} states ({time.perf_counter() - t0:.0f} s)", flush=True)

        def pair_scores(erase: Any, H: list[Any] = H, changed: list[Any] = changed, n: int = len(held)) -> PairScores:
            sums, words = [], np.zeros(n)
            for side, (h, tgt, off) in enumerate(H):
                ll = row_ll(m, h, tgt, erase)
                sums.append(np.add.reduceat(ll, off[:-1]))
                for i in range(n):
                    k = np.asarray(changed[i][side], dtype=int)  # token j after BOS is row j
                    words[i] += (1 if side == 0 else -1) * ll[off[i] + k].sum()
            return PairScores(sums[0], sums[1], words)

        before = pair_scores(None)
        d0 = before.more - before.less
        cats = sh.categories[held].tolist()
        if args.rarity:
            rarity_line(m, hn, before, changed, hmore, hless)
        cache: dict[float, ContrastAxes] = {}
        for tr in args.tries or ["128,1"]:
            f = [x for x in tr.split(",") if "=" not in x]
            named = dict(x.split("=", 1) for x in tr.split(",") if "=" in x)
            k, alpha, orth = int(f[0]), float(f[1]), "orth" in f[2:]
            ridge = float(named.get("ridge", 0.01))
            if ridge not in cache:
                cache[ridge] = ContrastAxes.fit(delta, hf, ridge)
            A, B = (torch.from_numpy(x.astype(np.float32)) for x in cache[ridge].maps(k, "orth" if orth else "oblique"))

            def erase(x: Any, A: Any = A, B: Any = B, alpha: float = alpha) -> Any:
                return x - alpha * (x @ B) @ A.T

            ps = pair_scores(erase)
            rise = ppl(erase) / base_ppl - 1
            ch = (ps.more - ps.less) - d0
            x = np.column_stack([d0, np.ones_like(d0)])
            (slope, _), *_ = np.linalg.lstsq(x, ch, rcond=None)
            resid = float(np.std(ch - x @ np.linalg.lstsq(x, ch, rcond=None)[0]))
            rslope = float(np.polyfit(before.rest, ps.rest - before.rest, 1)[0])
            judged = judge_pair_rows((before.more, before.less), (ps.more, ps.less), cats)
            line, whole = checks(judged, cfg.exclude_category)
            parts = judge_parts((d0, ps.more - ps.less), (before.words, ps.words), cats)
            shared = shared_checks(parts, cfg.exclude_category)
            rp, rm = parts["rest_pct"]["ALL"], parts["rest"]["ALL"]
            mv = whole["moves"]
            print(f"{tr:14s} PPL {100 * rise:+.2f}%; slope on d {slope:+.3f} (shared part's {rslope:+.3f}), residual SD "
                  f"{resid:.2f}; {line}; biased {len(mv['biased_before'])}, moved {len(mv['moved_toward_neutral'])}, "
                  f"closer {len(mv['closer'])}, worse {mv['made_worse'] or 'none'}; shared part {rm.before.value:+.2f} "
                  f"→ {rm.after.value:+.2f}, shared pct {rp.before.value:.1f} → {rp.after.value:.1f} "
                  f"[{rp.after.lo:.1f}, {rp.after.hi:.1f}]", flush=True)
            t = tally.setdefault(tr, {})
            for key, ok in [*((k2, v) for k2, v in whole.items() if k2 != "moves"),
                            ("biased_closer", set(mv["closer"]) == set(mv["biased_before"])),
                            ("no_biased_worse", not set(mv["made_worse"]) & set(mv["biased_before"])),
                            *((f"shared_{k2}", v) for k2, v in shared.items()), ("ppl", rise <= 0.02)]:
                t[key] = t.get(key, 0) + int(bool(ok))
            if args.verbose:
                print(category_lines(judged) + "\n" + parts_lines(parts), flush=True)
    print(f"\nsplits passing, of {len(splits)}:")
    for tr, t in tally.items():
        print(f"  {tr}: " + ", ".join(f"{k2} {v}" for k2, v in t.items()))
    scorer.close()
    rt.close()


if __name__ == "__main__":
    main()
