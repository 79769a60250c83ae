"""The corrections as the split runner fits them: `steer` (control vector, the feedback loop
of bias.feedback), `ablate` (directional ablation folded into the weights, bias.ablate +
edge.fold), `gate` (gated per-category pushes folded into the weights, bias.gate), `combo`
(the group words' head rows ablated, then a control vector fitted on that model, both
folded into the weights), `learn` (a low-rank edit of the upper layers' writes fitted by
gradient, folded into the weights, bias.learn), `erase` (a contrast eraser of the state the
head reads, folded into the head, bias.erase), and `mitigate_splits`, the library entry
point of `edge bias mitigate --method … --splits N`.

All fit on one split's calibration rows from the same shared pair states. Scoring uses
the weights the audit uses (the f16 copy of a quantized model); generation uses what a
device would run: the model file with the control vector, or the folded GGUF
re-quantized to the source's types.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bias.ablate import (
    AblateConfig,
    AblationSpec,
    BiasDirections,
    balanced,
    compute_directions,
    group_tokens,
    make_plan,
    run_ablate_loop,
)
from bias.audit import (
    PairScores,
    bbq_requests,
    open_scorer,
    score_bbq,
    score_pair_parts,
    score_pairs,
)
from bias.erase import ContrastAxes, EraseConfig, aligned_differences, fit_text
from bias.feedback import LoopConfig, run_loop, utility_chunks
from bias.gate import (
    GateConfig,
    GateEdits,
    ScaleStep,
    best_step,
    gate_edits,
    neutral_windows,
    next_scale,
    signed,
)
from bias.learn import KeptRows, LearnConfig, import_torch, learn_edit, save_edit
from bias.mitigate import load_inputs
from bias.repeat import RepeatConfig, sample_suite
from bias.scorer import BatchScorer
from bias.shared import Shared, compute_shared, read_shared_positions
from bias.splits import BBQ_ITEMS, Correction, SplitsConfig, SplitsResult, run_metrics, run_splits
from bias.steering import compute_directions as steering_directions
from bias.suites import Suite
from edge import telemetry
from edge.cvec import write as write_cvec
from edge.errors import BadOptionError
from edge.fold import FoldPlan, ResidualEdit, fold_gguf, requant_cost
from edge.interrupt import InterruptGuard
from edge.runtime import Runtime, RuntimeConfig

Event = Callable[[str, dict[str, Any]], None]


@dataclass
class Context:
    rt: Runtime
    scorer: BatchScorer  # the uncorrected scorer (on the compute weights)
    shared: Shared
    cfg: SplitsConfig
    ablate: AblateConfig
    compute_path: Path  # the weights scoring runs on (f16 copy or the file)
    source_path: Path  # the model file
    threads: int
    emit: Event
    gate: GateConfig = field(default_factory=GateConfig)
    learn: LearnConfig = field(default_factory=LearnConfig)
    erase: EraseConfig = field(default_factory=EraseConfig)
    cache: dict[str, Any] = field(default_factory=dict)  # what every split reuses (neutral states)
    out_dir: Path | None = None  # the run's folder, where what every split reuses is kept


def _utility(ctx: Context, scorer: BatchScorer) -> tuple[float, float]:
    u = ctx.shared.utility
    u.scorer, old = scorer, u.scorer
    try:
        return u()
    finally:
        u.scorer = old


def fit_steer(ctx: Context, cal: np.ndarray, work: Path, index: int) -> Correction:
    sh, sc, rt = ctx.shared, ctx.scorer, ctx.rt
    st = sh.states_of(cal)
    dirs = steering_directions(st.h_more, st.h_less, "mean")
    loop_cfg = LoopConfig(max_ppl_increase=ctx.cfg.max_ppl_increase, max_iter=ctx.cfg.steer_iter,
                          n_blocks=ctx.cfg.steer_blocks, exclude_category=ctx.cfg.exclude_category,
                          ppl_tokens=ctx.cfg.ppl_tokens)
    loop = run_loop(sc, sh.suite.subset(cal.tolist()), dirs, loop_cfg, sh.neutral,
                    lambda kind, d: ctx.emit("steer", d), base=(sh.base[0][cal], sh.base[1][cal], sh.utility))
    if not loop.kept:  # no file (a zero vector would read as a correction); judged by the shared scores
        return Correction.identity("steer", {"loop": loop.to_dict(), "vector": None})
    vec = dirs.vectors * loop.coefficients[:, None].astype(np.float32)
    target = ctx.cfg.outputs().get("steer") if index == 0 else None
    path = write_cvec(target or work / "steer.gguf", vec, model_hint=rt.info.arch or "llama",
                      coefficients=loop.coefficients, source="edge bias mitigate --method steer")

    def with_vec(fn: Callable[[], Any]) -> Any:
        sc.set_control_vector(vec)
        try:
            return fn()
        finally:
            sc.set_control_vector(None)

    def generate(probes: Suite, rep: RepeatConfig) -> list[dict[str, Any]]:
        rt.set_control_vector(vec)
        try:
            return sample_suite(rt, probes, rep).items
        finally:
            rt.set_control_vector(None)

    return Correction("steer", lambda s: with_vec(lambda: score_pair_parts(sc, s)),
                      lambda s: with_vec(lambda: score_bbq(sc, s)),
                      lambda: with_vec(lambda: _utility(ctx, sc)), generate,
                      {"loop": loop.to_dict(), "vector": str(path)})


class _Folded:
    """A scorer on a folded copy of the compute weights, replaced per trial: the edited
    tensors in F16, the rest copied (for a model scored on its own quantized file, the
    arithmetic of its uncorrected scores, and a file the size of the source's)."""

    def __init__(self, ctx: Context, path: Path) -> None:
        self.ctx, self.path, self.scorer = ctx, path, None

    def load(self, dirs: BiasDirections, spec: AblationSpec) -> BatchScorer:
        return self.load_plan(make_plan(dirs, spec), _ablate_note(spec))

    def write_plan(self, plan: FoldPlan, note: str) -> None:
        self.close()
        fold_gguf(self.ctx.compute_path, self.path, plan, weight_type="F16-edited", force=True, note=note)

    def load_plan(self, plan: FoldPlan, note: str) -> BatchScorer:
        self.write_plan(plan, note)
        return self.get()

    def get(self) -> BatchScorer:
        """The scorer on the fold last written, loaded on first use (a fit judged in torch
        needs none: llama.cpp then holds one model fewer while the deployed file is measured)."""
        if self.scorer is None:
            self.scorer = BatchScorer(self.ctx.rt, model_path=self.path)
        return self.scorer

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
            self.scorer = None


def _ablate_note(spec: AblationSpec) -> str:
    return f"edge bias ablate: {spec.describe()}"


def _directions(ctx: Context, cal: np.ndarray, kind: str) -> BiasDirections:
    """The split's ablation directions ("category", "overall", or "balanced": from the
    states at the shared tokens) with the group words of its calibration pairs (the rows a
    words edit touches)."""
    sh = ctx.shared
    st = sh.states_of(cal)
    items = sh.suite.subset(cal.tolist()).items
    words = group_tokens(lambda t: ctx.rt.tokenize(t, add_bos=False), [(it.more, it.less) for it in items])
    head = None if st.o_more is None else st.head
    if kind == "balanced":
        hm, hl, ok = _shared_positions(ctx)
        keep = ok[cal]  # pairs with shared tokens after the rewrite
        c = cal[keep]
        args = (hm[c], hl[c], st.e_more[keep], st.e_less[keep])
        per = compute_directions(*args, sh.categories[c], min_pairs=ctx.ablate.min_pairs)
        if not per.layers.any():  # no category has min_pairs: the pooled mean, one "category"
            per = compute_directions(*args)
        return replace(balanced(per, hm[c], hl[c]), head_rows=words)
    d = compute_directions(st.h_more, st.h_less, st.e_more, st.e_less,
                           sh.categories[cal] if kind == "category" else None, min_pairs=ctx.ablate.min_pairs,
                           head=head)
    return replace(d, head_rows=words)


def _shared_positions(ctx: Context) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """States at the shared tokens of every row some split calibrates on: read once per run
    (~2 minutes for CrowS' 5 splits here) and kept in the run's folder."""
    if "shared_positions" not in ctx.cache:
        sh, cfg = ctx.shared, ctx.cfg
        rows = np.unique(np.concatenate([cfg.rows(sh.suite, s)[0] for s in range(cfg.n_splits)]))
        ctx.cache["shared_positions"] = read_shared_positions(
            ctx.rt, sh.suite, str(ctx.compute_path), threads=ctx.threads, rows=rows, cache_dir=ctx.out_dir,
            on_read=lambda: ctx.emit("stage", {"stage": "states at the shared tokens", "pairs": len(rows)}))
    return ctx.cache["shared_positions"]


def fit_ablate(ctx: Context, cal: np.ndarray, work: Path, index: int) -> Correction:
    sh = ctx.shared
    cats = sh.categories[cal]
    calib = sh.suite.subset(cal.tolist())
    dirs = {k: _directions(ctx, cal, k) for k in sorted({kind for kind, _ in ctx.ablate.candidates})}
    folded = _Folded(ctx, work / "ablate.f16.gguf")
    # the shared objective: more's score less its rewritten tokens' part, so that every
    # figure of the loop (a function of the difference) counts the shared tokens alone
    shared = ctx.ablate.objective == "shared"
    if shared and sh.base_words is None:
        raise BadOptionError("--ablate-objective shared needs the rewritten tokens' part of the scores")

    def measure(spec: AblationSpec, d: BiasDirections,
                pairs: bool) -> tuple[np.ndarray | None, np.ndarray | None, float, float]:
        sc = folded.load(d, spec)
        m, ls = None, None
        if pairs and shared:
            s = score_pair_parts(sc, calib)
            m, ls = s.more - s.words, s.less
        elif pairs:
            m, ls = score_pairs(sc, calib)
        return (m, ls, *_utility(ctx, sc))

    base = (sh.base[0][cal] - (sh.base_words[cal] if shared else 0), sh.base[1][cal])
    res = run_ablate_loop(dirs, base, sh.base_ppl, cats, measure, ctx.ablate,
                          lambda kind, d: ctx.emit("ablate", d))
    fit: dict[str, Any] = {"loop": res.to_dict()}
    if res.best is None:  # nothing helped within budget: the uncorrected model, as measured
        folded.close()
        if not ctx.cfg.keep_models:
            folded.path.unlink(missing_ok=True)
        return Correction.identity("ablate", fit)
    best, d = res.best, dirs[res.best.directions]
    plan, note = make_plan(d, best.spec), _ablate_note(best.spec)
    folded.write_plan(plan, note)
    d.save(work / "ablate_directions.npz", best.spec)
    return _folded_correction(ctx, "ablate", folded, plan, note, work, index, fit)


def _folded_correction(ctx: Context, method: str, folded: _Folded, plan: FoldPlan,
                       note: str, work: Path, index: int, fit: dict[str, Any]) -> Correction:
    """A correction folded into the weights: judged on the fold the fit scored (the edit at F16); the
    deployable file (what a device runs, and what generation is judged on) is written only
    where it is used: split 0 (-o) and the splits judged by generation."""
    target = ctx.cfg.outputs().get(method) if index == 0 else None
    deploy = None
    if target or index < ctx.cfg.gen_splits:
        deploy = _deploy(ctx, folded.path, Path(target) if target else work / f"{method}.gguf", plan, note, fit)

    def generate(probes: Suite, rep: RepeatConfig) -> list[dict[str, Any]]:
        assert deploy is not None
        grt = Runtime(deploy, RuntimeConfig(n_ctx=512, threads=ctx.threads))
        try:
            return sample_suite(grt, probes, rep).items
        finally:
            grt.close()

    def close() -> None:
        folded.close()
        if not ctx.cfg.keep_models:
            for p in (folded.path, deploy):
                if p is not None and p != target:
                    p.unlink(missing_ok=True)

    return Correction(method, lambda s: score_pair_parts(folded.get(), s), lambda s: score_bbq(folded.get(), s),
                      lambda: _utility(ctx, folded.get()), generate, fit, close)


def _neutral_states(ctx: Context) -> np.ndarray:
    """Token-mean states of short neutral windows on the scoring weights (once per run)."""
    if "neutral_h" not in ctx.cache:
        from edge.hidden import HiddenStates

        with HiddenStates(ctx.compute_path, threads=ctx.threads) as hs:
            ctx.cache["neutral_h"] = hs.token_means(neutral_windows(ctx.rt, ctx.gate.neutral_windows))
    return ctx.cache["neutral_h"]


def gate_edits_for(ctx: Context, cal: np.ndarray) -> tuple[GateEdits, np.ndarray]:
    """The split's per-category edits at unit scale, signed toward 0, and the calibration
    rows' uncorrected ll differences they were signed from."""
    sh = ctx.shared
    cats = sh.categories[cal]
    d_cal = sh.base[0][cal] - sh.base[1][cal]
    edits = gate_edits(sh.states_of(cal), cats, _neutral_states(ctx), ctx.gate, ctx.cfg.exclude_category)
    return signed(edits, d_cal, cats), d_cal


def fit_gate(ctx: Context, cal: np.ndarray, work: Path, index: int) -> Correction:
    sh, cfg = ctx.shared, ctx.gate
    edits, d_cal = gate_edits_for(ctx, cal)
    if not edits.names:
        return Correction.identity("gate", {"categories": []})
    folded = _Folded(ctx, work / "gate.f16.gguf")
    calib = sh.suite.subset(cal.tolist())
    pct0 = float(100 * np.mean(d_cal > 0))
    steps: list[ScaleStep] = []
    scale: float | None = 1.0
    while scale is not None and len(steps) < cfg.max_steps:
        ctx.emit("gate", {"scale": scale})
        sc = folded.load_plan(edits.plan(np.full(len(edits.names), scale)), f"edge bias gate ×{scale:.3g}")
        m, ls = score_pairs(sc, calib)
        ppl, kl = _utility(ctx, sc)
        steps.append(ScaleStep(scale, float(100 * np.mean(m - ls > 0)), ppl / sh.base_ppl - 1, kl))
        ctx.emit("gate", steps[-1].to_dict())
        scale = next_scale(steps, pct0, cfg)
    best = best_step(steps, cfg)
    if best is None:  # nothing within budget: the uncorrected model, as measured
        folded.close()
        folded.path.unlink(missing_ok=True)
        return Correction.identity("gate", {"categories": edits.names, "steps": [s.to_dict() for s in steps]})
    a = np.full(len(edits.names), best.scale)
    plan = edits.plan(a)
    if best is not steps[-1]:
        folded.write_plan(plan, f"edge bias gate ×{best.scale:.3g}")
    fit = {"categories": edits.names, "signs": edits.signs.tolist(), "layers": edits.layers,
           "gate_on_own_sentences": edits.selectivity, "scale": best.scale, "coefficients": a.tolist(),
           "steps": [s.to_dict() for s in steps]}
    edits.save(work / "gate_edits.npz", a)
    return _folded_correction(ctx, "gate", folded, plan, f"edge bias gate: {len(edits.names)} categories", work,
                              index, fit)


def fit_combo(ctx: Context, cal: np.ndarray, work: Path, index: int) -> Correction:
    """`combo`: the group words' head rows lose the per-category contrasts (λ = 1: removed,
    not reversed, so almost no PPL), then the control-vector loop runs on that model in what
    is left of the PPL budget. The words edit moves the anti-stereotypical category up and
    the vector shifts the pct down; both go into one GGUF (the vector as each layer's
    ffn_down bias), so a device runs it with no flag."""
    sh = ctx.shared
    st, calib = sh.states_of(cal), sh.suite.subset(cal.tolist())
    d = _directions(ctx, cal, "category")
    n_words = 0 if d.head_rows is None else len(d.head_rows)
    spec = AblateConfig(words_strength=1.0).spec("words", d.n_layers)  # remove, never reverse
    wplan = make_plan(d, spec)
    folded = _Folded(ctx, work / "combo.f16.gguf")
    sc = folded.load_plan(wplan, _ablate_note(spec))
    ppl_w, kl_w = _utility(ctx, sc)
    rise_w = ppl_w / sh.base_ppl - 1
    ctx.emit("combo", {"words": spec.describe(), "group_tokens": n_words, "ppl_increase": rise_w, "kl": kl_w})
    left = (1 + ctx.cfg.max_ppl_increase) / (1 + rise_w) - 1  # the vector's share of the budget
    dirs = steering_directions(st.h_more, st.h_less, "mean")
    loop_cfg = LoopConfig(max_ppl_increase=max(left, 0.0), max_iter=ctx.cfg.steer_iter,
                          n_blocks=ctx.cfg.steer_blocks, exclude_category=ctx.cfg.exclude_category,
                          ppl_tokens=ctx.cfg.ppl_tokens)
    loop = run_loop(sc, calib, dirs, loop_cfg, sh.neutral, lambda kind, dd: ctx.emit("combo", dd))
    vec = dirs.vectors * loop.coefficients[:, None].astype(np.float32)
    plan = combo_plan(wplan, vec)
    note = f"edge bias combo: {spec.describe()} + control vector ×{loop.gain:.3g}"
    folded.write_plan(plan, note)
    d.save(work / "combo_words.npz", spec)
    np.save(work / "combo_vector.npy", vec)  # with the words: the plan again (combo_plan)
    fit = {"words": {"spec": spec.to_dict(), "group_tokens": n_words, "ppl_increase": rise_w, "kl": kl_w,
                     "directions": d.to_dict()},
           "loop": loop.to_dict(), "vector_budget": left}
    return _folded_correction(ctx, "combo", folded, plan, note, work, index, fit)


def _erase_states(ctx: Context) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Per row some split calibrates on, its aligned state differences at the head's input;
    and the head's inputs on neutral text past what the utility's PPL reads (so the eraser
    is not fitted on the text that judges it). Read once per run in llama.cpp."""
    if "erase_states" not in ctx.cache:
        from bias.audit import _sentence
        from edge.hidden import HiddenStates

        sh, cfg = ctx.shared, ctx.cfg
        rows = np.unique(np.concatenate([cfg.rows(sh.suite, s)[0] for s in range(cfg.n_splits)]))
        toks = [(_sentence(ctx.rt, sh.suite.items[i].more)[0], _sentence(ctx.rt, sh.suite.items[i].less)[0])
                for i in rows]
        neutral = fit_text(ctx.rt)
        ctx.emit("stage", {"stage": "erase: states the head reads", "pairs": len(rows), "neutral_chunks": len(neutral)})
        with HiddenStates(ctx.compute_path, threads=ctx.threads) as hs:
            h = hs.head_inputs([t for pair in toks for t in pair])
            hn = np.concatenate(hs.head_inputs(neutral))
        diffs = aligned_differences(h[0::2], h[1::2], [a for a, _ in toks], [b for _, b in toks])
        ctx.cache["erase_states"] = ({int(i): d for i, d in zip(rows, diffs, strict=True)}, hn)
    return ctx.cache["erase_states"]


def fit_erase(ctx: Context, cal: np.ndarray, work: Path, index: int) -> Correction:
    """The contrast eraser of the calibration rows' state differences, folded into the head;
    its strength halved while the PPL rise is over the budget."""
    diffs, neutral = _erase_states(ctx)
    ec = ctx.erase
    delta = np.concatenate([diffs[int(i)] for i in cal])
    axes = ContrastAxes.fit(delta, neutral, ec.ridge)
    folded = _Folded(ctx, work / "erase.f16.gguf")
    strength, tries = ec.strength, []
    for _ in range(ec.halvings + 1):
        plan, note = FoldPlan(output=axes.head_edit(ec.rank, ec.form, strength)), f"edge bias erase: {ec.describe(strength)}"
        sc = folded.load_plan(plan, note)
        ppl, kl = _utility(ctx, sc)
        rise = ppl / ctx.shared.base_ppl - 1
        tries.append({"strength": strength, "ppl_increase": rise, "kl": kl})
        ctx.emit("erase", {"axes": ec.rank, "form": ec.form, "strength": strength, "ppl_increase": rise, "kl": kl})
        if rise <= ctx.cfg.max_ppl_increase:
            break
        strength /= 2
    fit = {"config": asdict(ec), "aligned_states": len(delta), "neutral_states": len(neutral),
           "share_of_contrast": axes.share(ec.rank), "tries": tries, "strength": strength}
    if tries[-1]["ppl_increase"] > ctx.cfg.max_ppl_increase:
        folded.close()
        if not ctx.cfg.keep_models:
            folded.path.unlink(missing_ok=True)
        return Correction.identity("erase", fit)
    a, b = axes.maps(ec.rank, ec.form)
    np.savez(work / "erase_edit.npz", a=a, b=b, strength=strength)
    return _folded_correction(ctx, "erase", folded, plan, note, work, index, fit)


ROWS_FILE = "learn_rows.pt"  # learn's last-layer inputs, kept in --out until the run finishes


def _torch_rows(ctx: Context) -> tuple[Any, Any]:
    """The compute weights in torch, once per run, with every pair's last-layer rows (each
    sentence the splits calibrate or judge on, read through the lower layers once rather
    than once a split, with the fit's neutral windows) and the neutral chunks' utility."""
    if "torch" not in ctx.cache:
        from bias.audit import _sentence
        from bias.learn import TorchLlama, TorchUtility, check_memory, predicted_positions

        L = ctx.rt.info.n_layers or 0
        last = ctx.learn.start(L) == L - 1  # deeper edits read streams per split instead
        seqs: list[list[int]] = []
        bbq = ctx.shared.bbq if last else None
        reqs = bbq_requests(ctx.rt, bbq) if bbq is not None else []
        if last:
            used = sorted({int(i) for s in range(ctx.cfg.n_splits) for part in ctx.cfg.rows(ctx.shared.suite, s)
                           for i in part})
            seqs = [_sentence(ctx.rt, t)[0] for i in used for t in (ctx.shared.suite.items[i].more,
                                                                    ctx.shared.suite.items[i].less)]
        start = ctx.learn.start(L)
        # the fit's neutral windows and the utility's chunks each keep log-probs over the vocabulary
        windows = predicted_positions(_learn_windows(ctx))
        utility = predicted_positions(ctx.shared.neutral)
        check_memory(ctx.compute_path, rows=predicted_positions(seqs) + windows + utility + sum(len(t) - f for t, f in reqs),
                     keep_from=start, vocab_rows=utility + windows)
        m = TorchLlama(ctx.compute_path, keep_from=start)
        file = ctx.out_dir / ROWS_FILE if ctx.out_dir is not None and last else None
        key = KeptRows.key(ctx.compute_path, seqs, reqs, ctx.shared.neutral) if file is not None else ""
        kept = KeptRows.load(file, key) if file is not None else None
        if kept is not None:
            ctx.emit("stage", {"stage": f"learn: last-layer inputs kept from an earlier run ({file.name})"})
            kept.restore(m)
        elif last:
            ctx.emit("stage", {"stage": "learn: every pair's last-layer inputs", "sentences": len(seqs)})
            # the fit's neutral windows and the utility's chunks in the same pass, batched apart
            m.read_rows(seqs, _learn_windows(ctx), ctx.shared.neutral)
        if last:
            ctx.cache["torch_utility"] = TorchUtility(m, ctx.shared.neutral)
        answers = kept.answers if kept is not None else None
        if reqs and answers is None:
            ctx.emit("stage", {"stage": "learn: BBQ answers' last-layer inputs", "items": len(reqs) // 3})
            answers = m.answer_rows(reqs)
        if answers is not None:
            ctx.cache["torch_bbq"] = (answers, m.row_sums(answers).reshape(-1, 3))
        if file is not None and kept is None:
            try:
                KeptRows.of(m, answers).save(file, key)
            except OSError as e:  # a disk too full for the cache must not stop the run
                ctx.emit("stage", {"stage": f"learn: could not keep the last-layer inputs ({e.strerror or e})"})
        ctx.cache["torch"] = m
    return ctx.cache["torch"], ctx.cache.get("torch_utility")


def _learn_windows(ctx: Context) -> list[list[int]]:
    """The neutral windows whose next-token distributions a learn fit keeps (its KL term),
    tokenized once a run."""
    if "learn_windows" not in ctx.cache:
        ctx.cache["learn_windows"] = neutral_windows(ctx.rt, ctx.learn.neutral_windows, ctx.learn.window)
    return ctx.cache["learn_windows"]


def _torch_bbq(ctx: Context) -> dict[str, Any]:
    """Correction fields that judge BBQ on its answers' kept last-layer rows (fit_learn's
    edit), before from the same rows: {} when the run keeps none."""
    if "torch_bbq" not in ctx.cache:
        return {}
    rows, before = ctx.cache["torch_bbq"]
    m = ctx.cache["torch"]

    def check(s: Suite) -> None:
        if s is not ctx.shared.bbq:
            raise ValueError("the kept BBQ rows are the run's own sample; score another suite in llama.cpp")

    def after(s: Suite, e: Any) -> np.ndarray:
        check(s)
        return m.row_sums(rows, e).reshape(-1, 3)

    def unedited(s: Suite) -> np.ndarray:
        check(s)
        return before

    return {"before_bbq": unedited, "score_bbq": after}


def fit_learn(ctx: Context, cal: np.ndarray, work: Path, index: int) -> Correction:
    """`learn`: bias.learn's edit fitted on the calibration pairs. An edit of the last layer
    alone (the default) is measured and judged in torch on rows every split shares: each
    round's PPL, the held-out pairs before and after; BBQ and generation run in llama.cpp on
    its fold, and split 0's deployed GGUF is scored on the held-out pairs in plain llama.cpp
    beside the torch figure. Deeper edits are measured by llama.cpp on each round's fold."""
    from bias.audit import _sentence
    from bias.learn import edit_of, pair_parts
    from bias.swap import sourced_swaps

    sh, rt = ctx.shared, ctx.rt
    m, tu = _torch_rows(ctx)
    items = [sh.suite.items[i] for i in cal]
    more = [_sentence(rt, it.more)[0] for it in items]
    less = [_sentence(rt, it.less)[0] for it in items]
    folded = _Folded(ctx, work / "learn.f16.gguf")
    loaded: list[FoldPlan | None] = [None]  # the plan in `folded` now

    def measure(plan: FoldPlan, note: str) -> tuple[float, float]:
        if tu is not None:
            ppl, kl = tu(edit_of(plan))
            return ppl / tu.base_ppl - 1, kl
        loaded[0] = plan
        ppl, kl = _utility(ctx, folded.load_plan(plan, note))
        return ppl / sh.base_ppl - 1, kl

    def augment(train: np.ndarray) -> tuple[list[list[int]], list[list[int]], list[str]]:
        its = [items[i] for i in train]
        sw = sourced_swaps([it.category for it in its], [it.more for it in its], [it.less for it in its],
                           ctx.learn.swaps, seed=ctx.learn.seed)
        return ([_sentence(rt, a)[0] for _, (a, _) in sw], [_sentence(rt, b)[0] for _, (_, b) in sw],
                [its[i].category for i, _ in sw])

    res = learn_edit(ctx.compute_path, more, less, _learn_windows(ctx),
                     measure, ctx.cfg.max_ppl_increase, ctx.learn, threads=ctx.threads,
                     reference=sh.base[0][cal] - sh.base[1][cal], emit=ctx.emit,
                     augment=augment if ctx.learn.swaps else None, groups=[it.category for it in items], model=m)
    fit: dict[str, Any] = {"config": asdict(ctx.learn), **res.to_dict()}
    tb = _torch_bbq(ctx)
    if res.plan is None:  # no round within budget: the uncorrected model, as measured
        folded.close()
        folded.path.unlink(missing_ok=True)
        ident = Correction.identity("learn", fit)
        return replace(ident, before_bbq=tb["before_bbq"]) if tb else ident
    note = res.notes[res.chosen]
    if loaded[0] is not res.plan:
        folded.write_plan(res.plan, note)
    save_edit(res.plan, work / "learn_edit.npz")
    corr = _folded_correction(ctx, "learn", folded, res.plan, note, work, index, fit)
    if tu is None:
        return corr
    edit = edit_of(res.plan)

    def parts(suite: Suite, e: Any, model: Any = m) -> PairScores:
        toks = [(_sentence(rt, it.more)[0], _sentence(rt, it.less)[0]) for it in suite.items]
        return PairScores(*pair_parts(model, [a for a, _ in toks], [b for _, b in toks], e))

    def before(suite: Suite) -> PairScores:
        # the uncorrected pairs, scored once a run: every split's held-out rows read the same
        seen = ctx.cache.setdefault("torch_before", {})
        new = [it for it in suite.items if (it.more, it.less) not in seen]
        if new:
            got = parts(replace(suite, items=new), None)
            seen.update({(it.more, it.less): x for it, *x in zip(new, got.more, got.less, got.words, strict=True)})
        more, less, words = (np.array([seen[(it.more, it.less)][k] for it in suite.items]) for k in range(3))
        return PairScores(more, less, words)

    deployed = corr.fit.get("fold", {}).get("path")
    requantized = bool(deployed) and ctx.cfg.weights != "F16" and ctx.compute_path != ctx.source_path
    bbq = {"before_bbq": tb["before_bbq"], "score_bbq": lambda s: tb["score_bbq"](s, edit)} if tb else {}
    return replace(corr, score_pairs=lambda s: parts(s, edit), before_pairs=before, **bbq,
                   utility=lambda: tu(edit), base_ppl=tu.base_ppl, engine="torch",
                   score_deployed=None if not deployed else lambda s: _score_file(ctx, Path(deployed), s),
                   score_source=None if not requantized else lambda s: _score_file(ctx, ctx.source_path, s),
                   score_device=(lambda s: _device_reads(ctx, s, edit, parts)) if requantized else None)


def _device_reads(ctx: Context, suite: Suite, edit: Any,
                  parts: Callable[..., PairScores]) -> tuple[list[PairScores], list[PairScores]]:
    """The pairs before and after `edit` in llama.cpp's arithmetic on the source's own weights
    (a second model, for this once), read twice: the second reading's bits differ
    (bias.arith.redraw), so the two tell the noise's chaotic part apart."""
    from bias.arith import redraw
    from bias.learn import TorchLlama, check_memory

    L = ctx.rt.info.n_layers or 0
    check_memory(ctx.source_path, keep_from=L - 1)  # its pairs are read on the last layer's rows
    dm = TorchLlama(ctx.source_path, "llama.cpp", keep_from=L - 1)
    reads: tuple[list[PairScores], list[PairScores]] = ([], [])
    for r in range(2):
        if r:
            redraw(dm, r)
        reads[0].append(parts(suite, None, dm))
        reads[1].append(parts(suite, edit, dm))
    return reads


def _score_file(ctx: Context, path: Path, suite: Suite) -> PairScores:
    """The pairs as plain llama.cpp scores them on a model file (no control vector, its own weights)."""
    frt = Runtime(path, RuntimeConfig(n_ctx=512, threads=ctx.threads))
    try:
        sc = BatchScorer(frt)
        try:
            return score_pair_parts(sc, suite)
        finally:
            sc.close()
    finally:
        frt.close()


def combo_plan(words: FoldPlan, vec: np.ndarray) -> FoldPlan:
    """combo's fold: the words plan's head edit, and the control vector (n_layers, n_embd)
    as a constant each layer from 1 on writes (as llama.cpp applies a control vector: never at 0)."""
    return FoldPlan({il: ResidualEdit.constant(vec[il]) for il in range(1, len(vec)) if vec[il].any()},
                    output=words.output)


def _deploy(ctx: Context, f16: Path, dst: Path, plan: FoldPlan, note: str, fit: dict[str, Any]) -> Path:
    """Fold the chosen edit into the model file itself (re-quantized to its own types, or
    F16 on request) and measure what re-quantization cost against the fold the run scored (the edit at F16)."""
    fr = fold_gguf(ctx.source_path, dst, plan, weight_type=ctx.cfg.weights, force=True, note=note)
    if ctx.cfg.weights == "source":
        fr.requant_kl = requant_cost(f16, dst, _neutral_text(ctx), threads=ctx.threads)
    fit["fold"] = fr.to_dict()
    return dst


def _neutral_text(ctx: Context) -> str:
    # the default utility text whatever --ppl-tokens says: measured once a run, and
    # llama-perplexity's scheme needs two or more 512-token chunks
    return "".join(ctx.rt.detokenize(c[1:]) for c in utility_chunks(ctx.rt))


def mitigate_splits(model: str | None, suite_spec: str, out_dir: str | Path, *,
                    cfg: SplitsConfig | None = None, ablate: AblateConfig | None = None,
                    gate: GateConfig | None = None, learn: LearnConfig | None = None,
                    erase: EraseConfig | None = None, threads: int | None = None, precision: str = "auto",
                    on_event: Event | None = None, fresh: bool = False) -> SplitsResult:
    """`edge bias mitigate --method … --splits N`: shared work once, then every split. A rerun
    with the same settings in the same out_dir keeps the splits an earlier run finished
    (bias.splits.earlier_splits) unless `fresh`."""
    cfg = cfg or SplitsConfig()
    cfg.validate()
    ablate = ablate or AblateConfig(max_ppl_increase=cfg.max_ppl_increase)
    suite = load_inputs(suite_spec, output=cfg.output, exclude_category=cfg.exclude_category, bbq_spec=cfg.bbq_spec,
                        calib_frac=cfg.calib_frac)
    # Ctrl-C inside llama.cpp's ctypes callbacks (logging, cb_eval) would be dropped: SIGINT
    # sets a flag instead, and every progress event is a point where it stops the run.
    with InterruptGuard() as guard:
        def emit(kind: str, data: dict[str, Any]) -> None:
            guard.check()
            if on_event is not None:
                on_event(kind, data)

        gate = gate or GateConfig(max_ppl_increase=cfg.max_ppl_increase)
        learn = learn or LearnConfig()
        erase = erase or EraseConfig()
        erase.validate()
        if "learn" in cfg.methods:  # before the shared work: a missing torch is said at once
            learn.validate()
            import_torch()
        return _mitigate_splits(model, suite, out_dir, cfg, ablate, gate, learn, erase, threads, precision, emit,
                                fresh)


def open_context(rt: Runtime, scorer: BatchScorer, suite: Suite, out_dir: str | Path, cfg: SplitsConfig,
                 ablate: AblateConfig, gate: GateConfig, emit: Event, bbq_scored: bool = True) -> Context:
    """The shared work of a split run (from out_dir's cache when it holds it) and the
    context every fitter reads: states only for rows some split calibrates on, scores only
    for rows some split uses; BBQ scored in llama.cpp unless every method judges it in its own engine."""
    compute = Path(scorer.compute.get("path", rt.path))
    rows = [cfg.rows(suite, s) for s in range(cfg.n_splits)]
    # learn and erase read no pair states of the stream
    cal_rows = (np.unique(np.concatenate([c for c, _ in rows])) if set(cfg.methods) - {"learn", "erase"}
                else np.array([], int))
    used = np.unique(np.concatenate([np.concatenate([c, h]) for c, h in rows]))
    sh = compute_shared(rt, scorer, suite, states_model=str(compute), threads=rt.threads,
                        bbq_spec=cfg.bbq_spec, bbq_per_condition=cfg.bbq_per_condition,
                        probes_spec=cfg.probes_spec, repeat=cfg.repeat_config(), seed=cfg.seed,
                        state_rows=cal_rows, score_rows=used, on_event=emit, cache_dir=Path(out_dir),
                        bbq_scored=bbq_scored, ppl_tokens=cfg.ppl_tokens)
    return Context(rt, scorer, sh, cfg, ablate, compute, Path(rt.path), rt.threads, emit, gate,
                   out_dir=Path(out_dir))


def bbq_engine(methods: tuple[str, ...], learn: LearnConfig, n_layers: int) -> str:
    """Where a split run judges BBQ: "torch" when learn runs alone on the last layer alone
    (fit_learn judges on the answers' rows read once), else "llama.cpp" (scored every split)."""
    last = n_layers > 0 and learn.start(n_layers) == n_layers - 1
    return "torch" if set(methods) == {"learn"} and last else "llama.cpp"


def log_run(res: SplitsResult, rt: Runtime, scorer: BatchScorer, out_dir: Path) -> None:
    """One `fairness` run-log record per method with a finished split (edge logs, edge report);
    none for a rerun that only kept what an earlier run (which logged it) had finished."""
    kept = res.shared.get("kept_from_earlier_run", {}).get("results", 0)
    if kept and kept == sum(len(s["methods"]) for s in res.splits):
        return
    for m in res.config["methods"]:
        metrics = run_metrics(res, m, out_dir / "results.json")
        if metrics is not None:
            telemetry.log("fairness", metrics, model=rt.info, config=rt.config_record(compute=scorer.record()))


def _mitigate_splits(model: str | None, suite: Suite, out_dir: str | Path, cfg: SplitsConfig,
                     ablate: AblateConfig, gate: GateConfig, learn: LearnConfig, erase: EraseConfig,
                     threads: int | None, precision: str, emit: Event, fresh: bool = False) -> SplitsResult:
    from edge.session import open_runtime

    t0 = time.perf_counter()
    rt = open_runtime(model, RuntimeConfig(n_ctx=512, threads=threads))
    scorer = None
    try:
        scorer = open_scorer(rt, precision)
        engine = bbq_engine(cfg.methods, learn, rt.info.n_layers or 0)
        cfg = replace(cfg, bbq_per_condition=cfg.bbq_per_condition or BBQ_ITEMS[engine])
        ctx = open_context(rt, scorer, suite, out_dir, cfg, ablate, gate, emit, bbq_scored=engine == "llama.cpp")
        ctx.learn, ctx.erase = learn, erase
        info = {"seconds": time.perf_counter() - t0, "ablate_config": asdict(ablate), "gate_config": asdict(gate),
                "learn_config": asdict(learn), "erase_config": asdict(erase),
                "compute": scorer.record(), "model": str(rt.path), "suite": suite.source}
        emit("stage", {"stage": "shared done", "seconds": info["seconds"]})
        fitters = {"steer": fit_steer, "ablate": fit_ablate, "gate": fit_gate, "combo": fit_combo,
                   "learn": fit_learn, "erase": fit_erase}
        res = run_splits(ctx.shared, lambda m, cal, work, i: fitters[m](ctx, cal, work, i), cfg, out_dir, emit,
                         info, on_end=lambda res: log_run(res, rt, scorer, Path(out_dir)), fresh=fresh)
        # kept only for a rerun after a stop: a finished run keeps its results, not ~300 MB of inputs
        (Path(out_dir) / ROWS_FILE).unlink(missing_ok=True)
        return res
    finally:
        if scorer is not None:
            scorer.close()
        rt.close()
