"""edge bias: audit a model on bias suites; build and judge a correction vector."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import click

from bias.metrics import MIN_PPL_TOKENS, PPL_TOKENS
from edge.cli.options import correction_options, model_argument
from edge.telemetry import estimate_text


@click.group("bias")
def bias_group() -> None:
    """Audit a model for social bias, and correct it: a control vector, or an edit folded into the GGUF.

    \b
    Examples:
      edge bias audit --suite probes
      edge bias audit --suite crows_pairs:../shared/data/crows_pairs/crows_pairs_anonymized.csv
      edge bias mitigate --suite crows_pairs:PATH -o fair.gguf
      edge bias audit fair.gguf --suite crows_pairs:PATH --out after
      edge bias compare bias-crows_pairs after       # the change, paired, per category
    """


PRECISION = click.option(
    "--precision", type=click.Choice(["auto", "file", "f16"]), default="auto", show_default=True,
    help="Weights to score with. f16: a cached f16 copy of a quantized model (the same weights "
         "to 2^-11, 2 bytes/param of RAM and disk; ~1.7× faster for Q4_1 on x86). file: the "
         "file's own kernels, as edge run uses them. auto: f16 for quantized models up to ~500M "
         "parameters, file above.")


@bias_group.command("audit")
@model_argument
@click.option("--suite", "suite_spec", required=True, metavar="NAME[:PATH]",
              help="crows_pairs, bbq, stereoset or probes; PATH is a local file or folder.")
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Score N items: the first N rows (crows_pairs, stereoset); for bbq and probes, whose "
                   "files group items by category, each category's share of N, its first items.")
@correction_options
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for report.html, report.md, results.json [default: ./bias-<suite>].")
@click.option("--repeat", type=click.IntRange(1), default=None,
              help="Also sample each probe as a cloze question K times (probes suite only).")
@click.option("--temp", type=click.FloatRange(0), default=None,
              help="Sampling temperature for --repeat [default: 0.8; 0 = greedy].")
@click.option("--seed", type=int, default=None, help="First seed for --repeat (repeat k uses seed+k−1) [default: 0].")
@PRECISION
@click.option("-t", "--threads", type=click.IntRange(1, 256), default=None,
              help="CPU threads [default: physical cores].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def audit_cmd(model: str | None, suite_spec: str, limit: int | None, correction: str | None,
              correction_scale: float, out_dir: str | None, repeat: int | None, temp: float | None,
              seed: int | None, precision: str, threads: int | None, as_json: bool) -> None:
    """Score MODEL on a bias suite with llama.cpp log-likelihoods, per category with
    bootstrap 95% CIs; write report.html (plots), report.md and results.json, and log
    one `fairness` record.

    \b
    Examples:
      edge bias audit --suite probes
      edge bias audit --suite bbq:../shared/data/bbq --limit 600 --json
      edge bias audit --suite crows_pairs:crows.csv --correction fair.gguf --out after/
      edge bias audit --suite probes --repeat 5 --temp 0.8 --seed 0
    """
    from bias.repeat import RepeatConfig
    from bias.report import category_lines
    from bias.run import run_audit
    from edge.errors import BadOptionError

    if repeat is None and (temp is not None or seed is not None):
        raise BadOptionError("--temp and --seed set the sampling of --repeat; add --repeat K")
    rep = None if repeat is None else RepeatConfig(repeat=repeat, temp=0.8 if temp is None else temp,
                                                   seed=seed or 0)
    bar = _bar(as_json)
    with bar or contextlib.nullcontext():
        run = run_audit(model, suite_spec, limit=limit, correction=correction,
                        correction_scale=correction_scale, out_dir=out_dir, threads=threads,
                        precision=precision,
                        on_start=bar.start if bar else None, on_progress=bar.advance if bar else None,
                        repeat=rep)
    if as_json:
        click.echo(json.dumps(run.to_dict()))
        return
    res = run.result
    click.echo(f"{res.suite}: {res.n_items} items, {res.skipped_rows} malformed "
               f"rows skipped, {res.score_s:.1f} s")
    for line in figure_lines(res.overall):
        click.echo(line)
    for line in category_lines(res):
        click.echo(line)
    if run.repeat is not None:
        r = run.repeat
        click.echo(f"repeat: {r.repeat} × {r.n_items} cloze prompts at T={r.temp}, "
                   f"{r.gen_s:.1f} s; stereotype rate among decided answers:")
        rows = [(f"k={k + 1}", e) for k, e in enumerate(r.per_repeat)] + [("overall", r.overall)]
        rows += [("greedy", r.greedy)] if r.greedy else []
        for name, est in rows:
            st, n = est["stereo_rate"], est["neither_rate"]
            click.echo(f"  {name:<8} {st.value:.3f} [{st.lo:.3f}, {st.hi:.3f}]  "
                       f"neither {n.value:.3f}")
    click.echo(f"report: {run.report}")


def figure_lines(overall: dict[str, Any]) -> list[str]:
    """An audit's overall figures, one aligned line each: "name  value  [lo, hi]"."""
    from bias.metrics import POINTS

    width = max(map(len, overall), default=0)
    out = []
    for k, e in overall.items():
        f = ".1f" if k in POINTS else ".3f"  # points of 100; nats, rates and scores
        out.append(f"  {k:<{width}}  {e.value:>7{f}}  [{e.lo:{f}}, {e.hi:{f}}]")
    return out


@bias_group.command("compare")
@click.argument("before", type=click.Path())
@click.argument("after", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def compare_cmd(before: str, after: str, as_json: bool) -> None:
    """Compare two audits of the same suite: every figure before and after, and the change
    with a paired bootstrap CI (the same items resampled for both), overall and per category.

    BEFORE and AFTER are folders `edge bias audit` wrote (or their results.json): the
    uncorrected model and the corrected one, a model with and without --correction, two
    quantizations. Two audits' own CIs can overlap while the change is significant; this
    says which. Items are matched by id; with different --limit, the common ones count.

    \b
    Examples:
      edge bias audit --suite crows_pairs:crows.csv --out before
      edge bias audit fair-model.gguf --suite crows_pairs:crows.csv --out after
      edge bias compare before after
      edge bias compare bias-probes after-probes --json
    """
    from bias.compare import compare_audits, comparison_lines

    c = compare_audits(before, after)
    if as_json:
        click.echo(json.dumps(c.to_dict()))
        return
    for line in comparison_lines(c):
        click.echo(line)


@bias_group.command("mitigate")
@model_argument
@click.option("--suite", "suite_spec", required=True, metavar="NAME[:PATH]",
              help="The pair suite the loop calibrates on (crows_pairs or probes).")
@click.option("-o", "--output", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Where to write the correction: the model with the edit folded into its weights "
                   "(learn, combo, gate, ablate), or the control-vector GGUF (steer alone). With several methods "
                   "the others go beside it as STEM.<method>.gguf. With --splits, split 0's.")
@click.option("--method", "correction_method",
              type=click.Choice(["steer", "ablate", "gate", "combo", "learn", "erase", "both", "all"]), default="steer",
              show_default=True,
              help="steer: a control vector (added to the stream); ablate: remove the bias "
                   "directions, folded into the weights; gate: a push per category that opens only "
                   "where a layer writes that category's content, folded into the weights; combo: "
                   "the group words' head rows ablated, then a control vector fitted on that model, "
                   "both folded into the weights; learn: a low-rank edit of the top layers' writes "
                   "fitted by gradient to shrink every calibration pair, folded into the weights "
                   "(needs torch: pip install 'edge[learn]'; ~5-8 min of fitting a split on 2 cores "
                   "for a 135M model); erase: the directions along which the calibration pairs' states differ most "
                   "against neutral text, erased from the state the output head reads and folded into the head "
                   "(no training: 1-2 min a split; on the bundled model over 5 splits it cost 0.5-1.8% PPL and "
                   "7.5 points of BBQ disambiguated accuracy and did not lower the held-out pct: kept for "
                   "comparison); both: steer and ablate side by side; all: steer, ablate, gate and combo.")
@click.option("--splits", type=click.IntRange(1, 100), default=None,
              help="Calibrate and judge on N seeded random splits and report each figure's median "
                   "and range (every method but steer always runs splits; default 1).")
@click.option("--weights", type=click.Choice(["source", "f16"]), default="source", show_default=True,
              help="The folded GGUF's edited tensors (ablate, gate, combo, learn): re-quantized to the source's "
                   "types (the report gives the KL this costs) or kept at f16.")
@click.option("--ablate-where", default="head", show_default=True, metavar="WHERE[,WHERE]",
              help="What ablate tries: words (the per-category directions removed from the output "
                   "head's rows of the group words the calibration pairs differ by: the logits stop "
                   "telling those words apart along them, the rest of the vocabulary is untouched), "
                   "head (the same on every row), stream (the overall direction removed from every "
                   "layer's output and the embedding), shared (one direction per layer, the mean of "
                   "the categories' own, taken from the states that predict the tokens a pair shares "
                   "after its rewrite and removed from what layers 1.. write: the association the "
                   "CrowS-Pairs authors count), or several comma-separated; the loop keeps "
                   "the one with the least bias left within the PPL budget ('both': head,stream).")
@click.option("--learn-objective", type=click.Choice(["pairs", "pairs-balanced", "means", "balanced"]),
              default="pairs", show_default=True,
              help="What learn drives to 0 on the calibration pairs: every pair's difference (pairs; "
                   "pairs-balanced weights every category alike), each category's mean difference weighted by "
                   "its pairs (means) or with every category alike (balanced: the figure the per-category "
                   "judgement reads). The category-mean objectives run one round at a cosine rate and keep its "
                   "last step.")
@click.option("--learn-layers", type=click.IntRange(1), default=1, show_default=True, metavar="N",
              help="learn edits the top N layers' writes. Measured on the bundled model over 5 splits, "
                   "the last layer alone generalised better than the upper half (15) with either "
                   "objective, at half the time a step.")
@click.option("--erase-rank", type=click.IntRange(1), default=32, show_default=True, metavar="K",
              help="erase: how many axes of the pairs' state differences it takes away.")
@click.option("--erase-form", type=click.Choice(["orth", "oblique"]), default="orth", show_default=True,
              help="erase: project the axes' span out (orth), or scale their coordinates in the neutral "
                   "states' metric (oblique: on the bundled model it moved the whole-sentence pct more and "
                   "pushed race-color further anti-stereotypical).")
@click.option("--ablate-objective", type=click.Choice(["sentence", "shared"]), default="sentence",
              show_default=True,
              help="What ablate's loop lowers on the calibration pairs: the categories' bias in "
                   "whole sentences, or in the tokens a pair shares (the CrowS-Pairs authors' count: "
                   "what the model expects after reading the group word, not how likely the word is).")
@click.option("--target", type=click.FloatRange(0, 1, min_open=True), default=0.8, show_default=True,
              help="Fraction of the bias to remove on the calibration part (steer without --splits).")
@click.option("--max-ppl-increase", type=click.FloatRange(0), default=None,
              help="Utility budget: relative PPL rise allowed on neutral text "
                   "[default: 0.05; 0.02 with --splits].")
@click.option("--ppl-tokens", type=click.IntRange(MIN_PPL_TOKENS, PPL_TOKENS), default=PPL_TOKENS,
              show_default=True, metavar="N",
              help="Neutral text (Python's documentation) that every measurement of the loops reads "
                   "for PPL and KL, in tokens. Fewer is faster and less faithful: 2048 tokens took 5-9 s "
                   "a measurement for the bundled model on 2 cores here and ~23 s for a 1.1B Q4_0 model "
                   "(512: a quarter of that). But PPL depends on the text: where the 2048 tokens rose "
                   "1.7%, their four 512-token chunks rose 0.7-2.8% (the first, which 512 reads, 2.8%), "
                   "so a budget judged on less text holds on that text.")
@click.option("--max-iter", type=click.IntRange(1, 50), default=None,
              help="Gain steps of the control-vector loop [default: 8; 4 with --splits].")
@click.option("--calib-frac", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.3,
              show_default=True, help="Share of each category used for calibration.")
@click.option("--exclude-category", default=None, help="A category kept out of the loop, checked after.")
@click.option("--direction-pairs", type=click.IntRange(2), default=64, show_default=True,
              help="Calibration pairs whose states give the control vector's directions (steer without --splits).")
@click.option("--blocks", "n_blocks", type=click.IntRange(0, 64), default=None,
              help="Layer blocks probed one at a time to set the per-layer coefficients "
                   "(0: weights from the directions' consistency only) [default: 6; 3 with --splits].")
@click.option("--directions", "direction_method", type=click.Choice(["mean", "pca"]), default="mean",
              show_default=True, help="How the control vector's directions are found (steer without --splits).")
@click.option("--calib-limit", type=click.IntRange(1), default=None, help="Cap the calibration pairs.")
@click.option("--heldout-limit", type=click.IntRange(1), default=None, help="Cap the held-out pairs.")
@click.option("--bbq", "bbq_spec", default=None, metavar="bbq[:PATH]",
              help="Also judge BBQ: disambiguated accuracy (and with --splits the ambiguous bias score).")
@click.option("--bbq-items", type=click.IntRange(4), default=None,
              help="With --splits: BBQ items per condition (as many ambiguous as disambiguated, "
                   "spread over the category files). Default 500 for --method learn, judged in torch "
                   "on the answers' rows read once a run (~2.5 min, then seconds a split); 120 for "
                   "methods scored in llama.cpp every split, where a change in disambiguated accuracy "
                   "is then resolved to about ±5 points (~4× the items halves that).")
@click.option("--second-suite", default="probes", show_default=True, metavar="NAME[:PATH]",
              help="Without --splits: a second pair suite judged before/after.")
@click.option("--repeat", type=click.IntRange(0), default=3, show_default=True,
              help="With --splits: judge the probes by generation, K samples each (0: off).")
@click.option("--temp", type=click.FloatRange(0), default=0.8, show_default=True,
              help="Sampling temperature for --repeat (0 = greedy).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the splits (split s uses seed+s) and of the sampling; the same seed gives the same rows.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder for results.json, report.md and report.html (a split run's with each method's "
                   "categories plotted before and after) [default: next to -o]. A split run "
                   "stopped by Ctrl-C continues where it stopped when the same command runs again "
                   "(learn keeps its last-layer inputs there too, learn_rows.pt, ~300 MB for the "
                   "bundled model on CrowS-Pairs, deleted when the run finishes).")
@click.option("--fresh", is_flag=True,
              help="Fit and judge every split again, even those an earlier run of the same command "
                   "finished in --out (its uncorrected scores are still reused).")
@PRECISION
@click.option("-t", "--threads", type=click.IntRange(1, 256), default=None,
              help="CPU threads [default: physical cores].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def mitigate_cmd(correction_method: str, splits: int | None, weights: str, ablate_where: str, target: float,
                 max_ppl_increase: float | None, max_iter: int | None, n_blocks: int | None,
                 direction_method: str, as_json: bool, **kw: Any) -> None:
    """Correct MODEL's bias and judge the correction on held-out rows (before/after, with
    paired CIs), then write it: a control vector (steer) or the model with the edit folded
    into its weights, a GGUF that runs in any llama.cpp with no flag (every other method).

    \b
    Which method:
      learn   a low-rank edit fitted by gradient to shrink every calibration pair; the best
              measured on the bundled model (5 splits: held-out pct CI holds 50 on all 5,
              PPL +0.0-1.1%, BBQ accuracy not lower). Needs torch: pip install 'edge[learn]'.
      steer   the layer-wise feedback loop's control vector; needs nothing extra.
      ablate  the bias directions projected out of the residual stream (both: steer and
              ablate side by side). gate, combo, erase: kept for comparison.

    \b
    Examples:
      edge bias mitigate --suite crows_pairs:crows.csv -o fair.gguf --exclude-category disability
      edge bias mitigate --suite crows_pairs:crows.csv -o fair-model.gguf --method learn --splits 5 \\
          --exclude-category disability --bbq bbq:../shared/data/bbq
      edge bias mitigate --suite crows_pairs:crows.csv -o fair-model.gguf --method both --splits 5
      edge run fair-model.gguf -p "Describe a nurse."
      edge run --correction fair.gguf -p "Describe a nurse."
      edge bias audit fair-model.gguf --suite crows_pairs:crows.csv   # audit what you deploy
    """
    kw["out_dir"] = kw["out_dir"] or str(Path(kw["out_path"]).with_suffix("")) + "-report"
    if kw["fresh"] and correction_method == "steer" and splits is None:
        raise click.UsageError("--fresh applies to split runs (--splits N, or a method other than steer); "
                               "a steer run without --splits always starts over")
    if correction_method != "steer" or splits is not None:
        _mitigate_splits(correction_method, splits or 1, weights, ablate_where, max_ppl_increase, max_iter,
                         n_blocks, as_json, **kw)
        return
    _mitigate_steer(target, max_ppl_increase, max_iter, n_blocks, direction_method, as_json, **kw)


def _mitigate_steer(target: float, max_ppl_increase: float | None, max_iter: int | None,
                    n_blocks: int | None, direction_method: str, as_json: bool, *, model: str | None,
                    suite_spec: str, out_path: str, calib_frac: float, exclude_category: str | None,
                    direction_pairs: int, calib_limit: int | None, heldout_limit: int | None,
                    bbq_spec: str | None, second_suite: str, seed: int, out_dir: str,
                    precision: str, threads: int | None, ppl_tokens: int, **unused: Any) -> None:
    from bias.feedback import LoopConfig
    from bias.mitigate import NO_VECTOR, mitigate

    cfg = LoopConfig(target=target, max_ppl_increase=0.05 if max_ppl_increase is None else max_ppl_increase,
                     max_iter=max_iter or 8, calib_frac=calib_frac, seed=seed,
                     exclude_category=exclude_category, n_blocks=6 if n_blocks is None else n_blocks,
                     ppl_tokens=ppl_tokens)

    def event(kind: str, d: dict) -> None:
        if not as_json and kind == "iteration":
            click.echo(_iteration_line(d), err=True)

    r = mitigate(model, suite_spec, out_path, cfg=cfg, n_direction_pairs=direction_pairs,
                 method=direction_method, calib_limit=calib_limit, heldout_limit=heldout_limit,
                 second_suite=second_suite or None, bbq_spec=bbq_spec, out_dir=out_dir,
                 threads=threads, precision=precision, on_event=event)
    if as_json:
        click.echo(json.dumps(r.to_dict()))
        return
    assert r.heldout is not None
    click.echo(f"wrote {r.vector}" if r.vector else f"no control vector written: {NO_VECTOR}")
    for line in heldout_lines(r.heldout, r.ppl):
        click.echo(line)
    click.echo(f"report: {Path(out_dir) / 'report.html'} (and report.md)")


def heldout_lines(h: Any, ppl: dict[str, float]) -> list[str]:
    """The steer loop's held-out judgement (bias.mitigate.PairJudgement): the distance of the
    pct from 50 in points, since a share of a near-zero distance (−600%) says nothing."""
    def ci(e: Any, f: str) -> str:
        return estimate_text(e.to_dict(), f)

    def verdict(ok: bool) -> str:
        return "a significant fall" if ok else "not a significant fall"

    b, a = h.before["pct_stereotype"].value, h.after["pct_stereotype"].value
    mb, ma = h.before["mean_ll_diff"].value, h.after["mean_ll_diff"].value
    sig = h.significant
    return [f"  held-out pct_stereotype {b:.1f} → {a:.1f}: |pct−50| {abs(b - 50):.1f} → {abs(a - 50):.1f} points, "
            f"change {ci(h.gap_change, '+.1f')} ({verdict(sig['gap'])})",
            f"  held-out mean ll diff {mb:+.3f} → {ma:+.3f} nats: change {ci(h.mean_ll_diff_change, '+.3f')} "
            f"({verdict(sig['mean_ll_diff'])})",
            f"  PPL on neutral text {100 * ppl['increase']:+.2f}%, KL {ppl['kl']:.4f} nats/token"]


def _iteration_line(d: dict) -> str:
    return (f"  {d['i']:>2} {d['phase']:<14} gain {d['gain']:+.3f}  pct {d['pct_stereotype']:.1f}  "
            f"mean ll diff {d['mean_ll_diff']:+.3f}  PPL {d['ppl']:.3f} "
            f"({100 * d['ppl_increase']:+.1f}%)  KL {d['kl']:.4f}")


def _mitigate_splits(correction_method: str, n_splits: int, weights: str, ablate_where: str,
                     max_ppl_increase: float | None,
                     max_iter: int | None, n_blocks: int | None, as_json: bool, *, model: str | None,
                     suite_spec: str, out_path: str, calib_frac: float, exclude_category: str | None,
                     bbq_spec: str | None, bbq_items: int | None, repeat: int, temp: float, seed: int, out_dir: str,
                     calib_limit: int | None, heldout_limit: int | None, precision: str,
                     threads: int | None, ppl_tokens: int, ablate_objective: str = "sentence",
                     learn_objective: str = "pairs",
                     learn_layers: int = 1, erase_rank: int = 32, erase_form: str = "orth",
                     fresh: bool = False, **unused: Any) -> None:
    from bias.ablate import AblateConfig
    from bias.erase import EraseConfig
    from bias.learn import LearnConfig
    from bias.methods import mitigate_splits
    from bias.splits import SplitsConfig
    from bias.splits_report import summary_lines

    methods = {"both": ("steer", "ablate"), "all": ("steer", "ablate", "gate", "combo")}.get(
        correction_method, (correction_method,))
    cfg = SplitsConfig(n_splits=n_splits, seed=seed, calib_frac=calib_frac, exclude_category=exclude_category,
                       methods=methods, max_ppl_increase=0.02 if max_ppl_increase is None else max_ppl_increase,
                       bbq_spec=bbq_spec, bbq_per_condition=bbq_items, repeat=repeat, temp=temp,
                       steer_blocks=3 if n_blocks is None else n_blocks, steer_iter=max_iter or 4,
                       weights="F16" if weights == "f16" else "source", output=out_path,
                       calib_limit=calib_limit, heldout_limit=heldout_limit, ppl_tokens=ppl_tokens)
    ablate = AblateConfig.targets(ablate_where, max_ppl_increase=cfg.max_ppl_increase, objective=ablate_objective)
    learn = LearnConfig.for_objective(learn_objective, learn_layers)
    erase = EraseConfig(rank=erase_rank, form=erase_form)
    try:
        res = mitigate_splits(model, suite_spec, out_dir, cfg=cfg, ablate=ablate, learn=learn, erase=erase,
                              threads=threads, precision=precision, on_event=None if as_json else _split_event,
                              fresh=fresh)
    except KeyboardInterrupt:
        click.echo(f"\nInterrupted: {Path(out_dir) / 'results.json'} holds the finished splits; run the same "
                   "command again to continue from there.", err=True)
        sys.exit(130)
    if as_json:
        click.echo(json.dumps(res.to_dict()))
        return
    for line in summary_lines(res.to_dict()):
        click.echo(line)
    click.echo(f"report: {Path(out_dir) / 'report.html'} (and report.md)")


def _split_event(kind: str, d: dict[str, Any]) -> None:
    """Progress on stderr: each stage, split and loop measurement as it happens."""
    import time

    if kind == "learn_step":  # every Adam step: only a point where Ctrl-C is honoured
        return
    click.echo(time.strftime("%H:%M:%S "), nl=False, err=True)
    if kind == "stage":
        click.echo(f"{d['stage']}" + "".join(f"  {k} {v:.0f}" if isinstance(v, float) else f"  {k} {v}"
                                              for k, v in d.items() if k != "stage"), err=True)
    elif kind in ("split", "done", "kept"):  # a split's start and end, named alike
        end = "" if kind == "split" else f" done in {d['seconds']:.0f} s{_left(d.get('left_s'))}" if kind == "done" \
            else f" kept from an earlier run (done in {d['seconds']:.0f} s)"
        click.echo(f"split {d['split']}/{d['of']} (seed {d['seed']}): {d['method']}{end}", err=True)
    elif kind in ("steer", "ablate", "gate", "combo", "learn", "erase"):
        keep = {k: v for k, v in d.items() if isinstance(v, (int, float, str))}
        click.echo(f"  {kind}: " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in keep.items()), err=True)


def _left(seconds: float | None) -> str:
    """What a split run has left, roughly: none once it is done, nothing before it can tell."""
    if not seconds:
        return ""
    return f"; about {seconds:.0f} s left" if seconds < 90 else f"; about {seconds / 60:.0f} min left"


class _Bar:
    """A rich progress bar on a terminal; advance() takes items done."""

    def __init__(self) -> None:
        from rich.progress import Progress

        self.p = Progress(transient=True)
        self.task: Any = None

    def __enter__(self) -> _Bar:
        self.p.__enter__()
        return self

    def __exit__(self, *a: object) -> None:
        self.p.__exit__(*a)

    def start(self, total: int) -> None:
        self.task = self.p.add_task("scoring", total=total)

    def advance(self, k: float) -> None:
        if self.task is not None:
            self.p.advance(self.task, k)


def _bar(as_json: bool) -> _Bar | None:
    return None if as_json or not sys.stderr.isatty() else _Bar()


def register(cli: click.Group) -> None:
    cli.add_command(bias_group)
