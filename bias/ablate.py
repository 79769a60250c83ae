"""Directional ablation of bias directions, folded into the model's weights.

Directions come from calibration pairs as for steering (bias.steering: the token-mean
residual stream leaving each layer, more − less), one per layer or one per category and
layer. Instead of adding a vector, the correction removes a fraction λ of the stream's
component along them: every matrix that writes to the stream (the token embedding,
attention output and MLP down projection of each chosen layer) is multiplied by
P = I − λ Q Qᵀ (Q an orthonormal basis of the layer's directions) through edge.fold, so the
corrected model is a plain GGUF. A pair's log-likelihood difference then shrinks by what
of it travels along the directions, instead of every pair moving by one shift
(`pair_diagnostics` tells which of the two a correction did).

The output head is a writer's mirror image: its rows (one per token) decide how likely
each group word is, and a CrowS-Pairs difference is largely that. Its directions are the
per-category mean of (head rows of more's tokens − those of less's), the group words'
contrast as the logits see it; projecting them out of the head's rows is the "neutralize"
step of hard debiasing (Bolukbasi et al., 2016) applied to the unembedding, and it is the
candidate the loop tries by default (AblateConfig). The "words" candidate edits only the
rows of the group words the calibration pairs differ by (group_tokens): the same moves of
the categories for a thirtieth of the PPL, since the rest of the vocabulary keeps its logits.

An oblique variant (`leace_edit`, LEACE-style) removes the class-mean difference along
Σ⁻¹δ instead of δ, the least-squares-optimal linear eraser for a binary concept.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bias import metrics as M
from edge.errors import BadOptionError
from edge.fold import FoldPlan, ResidualEdit


@dataclass
class BiasDirections:
    """Per layer, k directions (n_layers, k, n_embd), and the embedding's (k, n_embd).

    Row j is the mean of h(more) − h(less) over the pairs of label j ("all", or a category);
    rows of categories with fewer than `min_pairs` calibration pairs are zero (a mean of a
    handful of 576-d differences is mostly noise)."""

    layers: np.ndarray
    embedding: np.ndarray
    labels: list[str]
    counts: list[int]
    snr: np.ndarray  # (n_layers, k): |mean projection| / SD of the per-pair projections
    # (k, n_embd) in the output head's row space: the mean of (head rows of more's tokens −
    # those of less's), i.e. the contrast between the group words as the logits see it
    head: np.ndarray | None = None
    # the group words' token ids (group_tokens): the rows a "words" ablation edits
    head_rows: np.ndarray | None = None

    @property
    def n_layers(self) -> int:
        return int(self.layers.shape[0])

    def to_dict(self) -> dict[str, Any]:
        return {"labels": self.labels, "counts": self.counts,
                "snr": [[round(float(x), 4) for x in row] for row in self.snr],
                "group_tokens": None if self.head_rows is None else len(self.head_rows)}

    def save(self, path: Path, spec: AblationSpec) -> None:
        """The directions and the chosen spec, enough to rebuild the fold plan (load)."""
        np.savez_compressed(path, layers=self.layers, embedding=self.embedding,
                            head=self.head if self.head is not None else self.embedding,
                            head_rows=self.head_rows if self.head_rows is not None else np.zeros(0, np.int64),
                            labels=np.array(self.labels), counts=np.array(self.counts), snr=self.snr,
                            spec=np.array(json.dumps(spec.to_dict())))

    @classmethod
    def load(cls, path: Path) -> tuple[BiasDirections, AblationSpec]:
        with np.load(path) as z:
            f = z.files
            rows = z["head_rows"] if "head_rows" in f and len(z["head_rows"]) else None
            d = cls(z["layers"], z["embedding"], [str(x) for x in z["labels"]],
                    [int(x) for x in z["counts"]] if "counts" in f else [],
                    z["snr"] if "snr" in f else np.zeros((len(z["layers"]), len(z["labels"]))),
                    z["head"] if "head" in f else z["embedding"], rows)  # no head saved: a tied model's
            text = str(z["spec"])
        sd = json.loads(text) if text.startswith("{\"") else ast.literal_eval(text)  # runs before 12-02: a repr
        return d, AblationSpec(**{**sd, "layers": tuple(sd["layers"])})


def group_tokens(tokenize: Callable[[str], list[int]], pairs: Sequence[tuple[str, str]], *,
                 min_share: float = 0.5) -> np.ndarray:
    """The group words' token ids: tokens that one sentence of a pair has and the other has
    not (counted with multiplicity), kept when at least `min_share` of their occurrences
    in the pairs are such differences ("gay"/"straight", "he"/"she", names' pieces). The
    share drops the function words a rewrite happens to change ("." " a" " of"): on
    SmolLM2's tokenizer and 436 calibration pairs they were 154 of 586 difference tokens but
    359 of the 437 neutral-text tokens (of 3,911) the rows would have reached."""
    from collections import Counter

    diff: Counter[int] = Counter()
    total: Counter[int] = Counter()
    for more, less in pairs:
        a, b = Counter(tokenize(more)), Counter(tokenize(less))
        diff.update((a - b) + (b - a))
        total.update(a + b)
    return np.array(sorted(t for t, n in diff.items() if n >= min_share * total[t]), dtype=np.int64)


def top_axes(x: np.ndarray, k: int) -> np.ndarray:
    """The k leading axes (k, n_embd) of the uncentred second moment of states x (n, n_embd):
    the stream's mean and its few massive dimensions."""
    if k <= 0:
        return np.zeros((0, x.shape[-1]))
    _, vecs = np.linalg.eigh(x.T @ x / len(x))
    return vecs[:, ::-1][:, :k].T


def _orthogonal(v: np.ndarray, axes: np.ndarray) -> np.ndarray:
    return v - (v @ axes.T) @ axes if len(axes) else v


def compute_directions(h_more: np.ndarray, h_less: np.ndarray, e_more: np.ndarray, e_less: np.ndarray,
                       categories: Sequence[str] | None = None, *, min_pairs: int = 12,
                       protect: int = 3, head: tuple[np.ndarray, np.ndarray] | None = None) -> BiasDirections:
    """Directions from pair states: h_* (n, n_layers, n_embd), e_* (n, n_embd) token-mean
    embeddings, `head` the token-mean output-head rows (more, less) of an untied model (a
    tied head's rows are e). With `categories`, one direction per category (per layer),
    else one overall.

    `protect`: each direction is made orthogonal to the layer's `protect` leading axes of
    the stream (top_axes). Measured on SmolLM2-135M: the raw mean difference has cosine
    0.1-0.26 with the stream's mean (norm 100-630 against a difference of 1-13), so
    removing it took 4-7% of every token's squared norm and PPL rose ×10-270; without
    those 3 axes it takes 0.02-0.15%, keeps 84-94% of the difference and its per-pair
    signal-to-noise rises (0.14 → 0.71 at layer 5)."""
    diff = (np.asarray(h_more, np.float64) - np.asarray(h_less, np.float64))
    ediff = np.asarray(e_more, np.float64) - np.asarray(e_less, np.float64)
    n = len(diff)
    if n == 0:
        raise BadOptionError("directions need at least one calibration pair")
    cats = np.asarray(categories) if categories is not None else np.array(["all"] * n)
    labels = sorted(set(cats.tolist()))
    L, d = diff.shape[1:]
    vecs = np.zeros((L, len(labels), d))
    evecs = np.zeros((len(labels), d))
    snr = np.zeros((L, len(labels)))
    counts = []
    states = np.concatenate([np.asarray(h_more, np.float64), np.asarray(h_less, np.float64)])
    axes = [top_axes(states[:, il], protect) for il in range(L)]
    eaxes = top_axes(np.concatenate([np.asarray(e_more, np.float64), np.asarray(e_less, np.float64)]), protect)
    o_more, o_less = (np.asarray(x, np.float64) for x in (head or (e_more, e_less)))
    odiff = o_more - o_less
    oaxes = eaxes if head is None else top_axes(np.concatenate([o_more, o_less]), protect)
    hvecs = np.zeros((len(labels), d))
    for j, c in enumerate(labels):
        m = cats == c
        counts.append(int(m.sum()))
        if m.sum() < min_pairs and categories is not None:
            continue
        vecs[:, j] = [_orthogonal(diff[m, il].mean(0), axes[il]) for il in range(L)]
        evecs[j] = _orthogonal(ediff[m].mean(0), eaxes)
        hvecs[j] = _orthogonal(odiff[m].mean(0), oaxes)
        unit = vecs[:, j] / np.maximum(np.linalg.norm(vecs[:, j], axis=1), 1e-12)[:, None]
        proj = np.einsum("nld,ld->nl", diff[m], unit)
        snr[:, j] = np.abs(proj.mean(0)) / np.maximum(proj.std(0), 1e-12)
    return BiasDirections(vecs.astype(np.float32), evecs.astype(np.float32), labels, counts, snr,
                          hvecs.astype(np.float32))


def balanced(per_category: BiasDirections, h_more: np.ndarray, h_less: np.ndarray) -> BiasDirections:
    """One direction per layer, the mean of the categories' own (those with enough pairs to
    have one): every category weighs the same, where the overall mean is race-color's (a
    third of CrowS). Its SNR is over all the pairs `h_*` (n, n_layers, n_embd)."""
    used = np.linalg.norm(per_category.layers, axis=2).sum(0) > 0
    if not used.any():
        raise BadOptionError("no category has enough calibration pairs for a direction (--calib-frac)")
    vec = per_category.layers[:, used].mean(1, keepdims=True).astype(np.float64)
    unit = vec[:, 0] / np.maximum(np.linalg.norm(vec[:, 0], axis=1), 1e-12)[:, None]
    proj = np.einsum("nld,ld->nl", np.asarray(h_more, np.float64) - np.asarray(h_less, np.float64), unit)
    snr = (np.abs(proj.mean(0)) / np.maximum(proj.std(0), 1e-12))[:, None]
    pc = per_category
    return replace(pc, layers=vec.astype(np.float32), embedding=pc.embedding[used].mean(0, keepdims=True),
                   labels=["balanced"],
                   counts=[int(sum(c for c, u in zip(pc.counts, used, strict=True) if u))], snr=snr)


@dataclass(frozen=True)
class AblationSpec:
    """Where and how strongly: writers of `layers` (and the embedding) lose `strength` of
    their component along the directions. `source_layer` set: one direction set (that
    layer's) is removed from every writer, so the stream never carries it (as refusal
    ablation does); unset: layer il's writers use layer il's directions."""

    layers: tuple[int, ...]
    strength: float = 1.0
    embedding: bool = True
    source_layer: int | None = None
    head: bool = False  # also project the output head's rows (the logits read P·h)
    words: bool = False  # the head edit only on the group words' rows (BiasDirections.head_rows)

    def describe(self) -> str:
        a, b = (min(self.layers), max(self.layers)) if self.layers else (0, -1)
        src = f", directions of layer {self.source_layer}" if self.source_layer is not None else ""
        parts = [f"layers {a}-{b}"] if self.layers else []
        parts += ["embedding"] * self.embedding + ["output head" + " (group words)" * self.words] * self.head
        return f"{' + '.join(parts) or 'nothing'}, λ={self.strength:.3g}{src}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _basis(rows: np.ndarray) -> np.ndarray:
    keep = np.linalg.norm(rows, axis=1) > 0
    return rows[keep]


def make_plan(dirs: BiasDirections, spec: AblationSpec) -> FoldPlan:
    """The FoldPlan of a spec: an orthogonal projection at strength λ per edited writer
    (λ = 1 removes the component; up to 2 reverses it, which only a words edit asks for)."""
    if not 0 <= spec.strength <= (MAX_WORDS_STRENGTH if spec.words else 1):
        raise BadOptionError(f"ablation strength {spec.strength} must be in [0, 1] "
                             f"(up to {MAX_WORDS_STRENGTH} for the group words' head rows)")
    if spec.words and dirs.head_rows is None:
        raise BadOptionError("a words ablation needs the group words' token ids (BiasDirections.head_rows)")
    plan = FoldPlan()
    if spec.source_layer is not None:
        rows = _basis(dirs.layers[spec.source_layer])
        if not len(rows):
            return plan
        edit = ResidualEdit.projection(rows, spec.strength)
        plan.layers = {il: edit for il in spec.layers}
        plan.embedding = edit if spec.embedding else None
        return plan
    for il in spec.layers:
        rows = _basis(dirs.layers[il])
        if len(rows):
            plan.layers[il] = ResidualEdit.projection(rows, spec.strength)
    rows = _basis(dirs.embedding)
    if spec.embedding and len(rows):
        plan.embedding = ResidualEdit.projection(rows, spec.strength)
    rows = _basis(dirs.head) if spec.head and dirs.head is not None else rows[:0]
    if len(rows):
        plan.output = ResidualEdit.projection(rows, spec.strength)
        if spec.words:
            plan.output = replace(plan.output, rows=dirs.head_rows)
    return plan


def leace_edit(x_more: np.ndarray, x_less: np.ndarray, *, shrink: float = 0.1) -> ResidualEdit:
    """LEACE-style eraser for the binary concept more/less from states (n, n_embd): x ↦
    x − δ vᵀ(x − μ), v = Σ⁻¹δ / δᵀΣ⁻¹δ (Σ the pooled covariance, shrunk toward a multiple of
    I by `shrink` since n is small against n_embd). After it, the two classes have equal
    means along every direction, and it moves x as little as possible in Σ's metric."""
    a, b = np.asarray(x_more, np.float64), np.asarray(x_less, np.float64)
    x = np.concatenate([a, b])
    mu = x.mean(0)
    delta = a.mean(0) - b.mean(0)
    cov = np.cov(x, rowvar=False)
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov))
    w = np.linalg.solve(cov, delta)
    v = w / float(delta @ w)
    return ResidualEdit(delta[:, None], v[:, None], (delta * float(v @ mu)).astype(np.float32))


# ---- per-pair diagnostics ----------------------------------------------------------------
@dataclass
class PairDiagnostics:
    """How a correction moved each pair's difference Δ = ll(more) − ll(less).

    A shift moves every Δ by about the same amount (slope ≈ 0, correlation ≈ 0); a shrink
    scales them toward 0 (slope < 0: the change opposes the initial difference, with
    |slope| the fraction removed; correlation strongly negative)."""

    n: int
    slope: float  # least-squares slope of (Δ_after − Δ_before) on Δ_before
    corr: float  # their correlation
    mean_change: float  # mean of Δ_after − Δ_before (nats)
    sd_change: float
    flips_to_anti: int  # pairs whose sign went from > 0 to < 0
    flips_to_stereo: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def pair_diagnostics(before: tuple[np.ndarray, np.ndarray], after: tuple[np.ndarray, np.ndarray]) -> PairDiagnostics:
    d0 = np.asarray(before[0], np.float64) - np.asarray(before[1], np.float64)
    d1 = np.asarray(after[0], np.float64) - np.asarray(after[1], np.float64)
    ch = d1 - d0
    var = float(d0.var())
    slope = float(((d0 - d0.mean()) * (ch - ch.mean())).mean() / var) if var > 0 else 0.0
    sd = float(ch.std())
    corr = float(np.corrcoef(d0, ch)[0, 1]) if var > 0 and sd > 0 else 0.0
    return PairDiagnostics(len(d0), slope, corr, float(ch.mean()), sd,
                           int(((d0 > 0) & (d1 < 0)).sum()), int(((d0 < 0) & (d1 > 0)).sum()))


# ---- the loop: which directions, layers and strength, from measurements -----------------
def category_rms(more: np.ndarray, less: np.ndarray, categories: Sequence[str]) -> float:
    """√(Σ_c n_c m_c² / N), m_c a category's mean ll difference: the bias the categories show,
    without letting an anti-stereotypical category cancel a stereotypical one (one shift
    could zero the overall mean while both categories stay biased)."""
    d = np.asarray(more, np.float64) - np.asarray(less, np.float64)
    cats = np.asarray(categories)
    tot = sum(float((cats == c).sum()) * float(d[cats == c].mean()) ** 2 for c in set(cats.tolist()))
    return float(np.sqrt(tot / max(len(d), 1)))


# Where an ablation can act, with the direction set that goes there: the head takes one
# direction per category (the group words' contrasts), the stream the overall one; "words"
# is the head edit on the group words' rows alone; "shared" the balanced direction of the
# states that predict the shared tokens (bias.audit.shared_after_rewrite) out of what
# layers 1.. write, the one edit measured to lower the shared tokens' part (DESIGN.md).
TARGETS = {"words": ("category", "words"), "head": ("category", "head"), "stream": ("overall", "stream"),
           "shared": ("balanced", "shared")}
KINDS = ("category", "overall", "balanced")
OBJECTIVES = ("sentence", "shared")
MAX_WORDS_STRENGTH = 2.0


@dataclass
class AblateConfig:
    max_ppl_increase: float = 0.02
    # Candidates, each scaled into the budget and then measured: (direction set, where),
    # one of TARGETS' values. "stream": every layer's
    # writers and the embedding; "head": the output head's rows. Measured on SmolLM2-135M
    # (split 0, 436 calibration pairs, held-out change of the mean ll difference): per-
    # category directions in the head cost +3.1% PPL at λ = 1 and took sexual-orientation
    # from +4.31 to +1.84 nats and race-color from −1.06 to −0.56 (a shrink: pair slope
    # −0.06, corr −0.22); in the stream they cost +44% PPL, and the overall direction there
    # +3.2% for almost no fall of the per-category bias. So the head is the default, and the
    # stream a candidate on request (each candidate costs a probe and a trial per split).
    candidates: tuple[tuple[str, str], ...] = (TARGETS["head"],)
    embedding: bool = True  # "stream" includes the token embedding
    min_pairs: int = 12  # a category needs this many calibration pairs for its own direction
    max_steps: int = 2  # strength steps after the candidates
    # where "words" starts (its probe's λ). Past 1 the group words' contrast is reversed,
    # not removed: at up to 2 (5 splits, SmolLM2) race-color's mean went −1.29 → −0.43 but
    # its pct 47.9 → 55.1 (made stereotypical by pct on 3/5), and on one split the loop found
    # nothing better than the uncorrected model. 1 only removes.
    words_strength: float = 1.0
    # What the objective counts of each calibration pair: "sentence", the whole sentences'
    # ll difference; "shared", the part the tokens both sentences share carry (CrowS-Pairs'
    # own count, PairScores.rest). On 3 of 5 CrowS splits the shared candidate lowered the
    # shared part and not the sentences' category bias, so a sentence objective kept nothing.
    objective: str = "sentence"

    def validate(self) -> None:
        if self.max_ppl_increase < 0:
            raise BadOptionError("--max-ppl-increase must be ≥ 0")
        if self.objective not in OBJECTIVES:
            raise BadOptionError(f"--ablate-objective {self.objective}: use {' or '.join(OBJECTIVES)}")
        for kind, where in self.candidates:
            if kind not in KINDS:
                raise BadOptionError(f"direction set {kind!r}: use {', '.join(KINDS)}")
            if where not in TARGETS:
                raise BadOptionError(f"ablation target {where!r}: use {' or '.join(TARGETS)}")
        if not 0 < self.words_strength <= MAX_WORDS_STRENGTH:
            raise BadOptionError(f"words strength {self.words_strength}: use (0, {MAX_WORDS_STRENGTH}]")

    def spec(self, where: str, n_layers: int) -> AblationSpec:
        """The candidate at full strength."""
        if where == "words":
            return AblationSpec((), self.words_strength, embedding=False, head=True, words=True)
        if where == "head":
            return AblationSpec((), 1.0, embedding=False, head=True)
        if where == "shared":  # layers 1.., the span measured (bias_shared_erase.py); gate also leaves 0
            return AblationSpec(tuple(range(1, n_layers)), 1.0, embedding=False)
        return AblationSpec(tuple(range(n_layers)), 1.0, self.embedding)

    @classmethod
    def targets(cls, where: str, **kw: Any) -> AblateConfig:
        """`--ablate-where words|head|stream|shared`, or several comma-separated ("both": head,stream)
        as a config."""
        names = ["head", "stream"] if where == "both" else [w.strip() for w in where.split(",")]
        bad = [w for w in names if w not in TARGETS]
        if bad or not names:
            raise BadOptionError(f"--ablate-where {where}: use {', '.join(TARGETS)} or a comma-separated list")
        return cls(candidates=tuple(TARGETS[w] for w in dict.fromkeys(names)), **kw)


@dataclass
class Trial:
    """One measured correction on the calibration rows."""

    spec: AblationSpec
    directions: str  # "overall" or "category"
    objective: float  # category_rms of the calibration rows
    pct_stereotype: float
    mean_ll_diff: float
    ppl: float
    ppl_increase: float
    kl: float
    diagnostics: PairDiagnostics | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        d["describe"] = self.spec.describe()
        return d


# (spec, directions, score the pairs?) → (ll_more, ll_less, PPL, KL); the pairs are None
# when not asked for (a PPL-only probe)
Measure = Callable[[AblationSpec, BiasDirections, bool],
                   tuple[np.ndarray | None, np.ndarray | None, float, float]]


@dataclass
class AblateResult:
    best: Trial | None  # None: no trial lowered the objective within the PPL budget
    trials: list[Trial]
    base_objective: float
    base_ppl: float
    directions: dict[str, BiasDirections]
    probes: list[dict[str, Any]] = field(default_factory=list)  # PPL-only, at λ = 1
    counts: str = "sentence"  # what the trials' figures count (AblateConfig.objective)

    @property
    def chosen_directions(self) -> BiasDirections | None:
        return None if self.best is None else self.directions[self.best.directions]

    def to_dict(self) -> dict[str, Any]:
        return {"best": None if self.best is None else self.best.to_dict(),
                "trials": [t.to_dict() for t in self.trials], "probes": self.probes, "counts": self.counts,
                "base_objective": self.base_objective, "base_ppl": self.base_ppl,
                "directions": {k: d.to_dict() for k, d in self.directions.items()}}


def run_ablate_loop(directions: dict[str, BiasDirections], base: tuple[np.ndarray, np.ndarray],
                    base_ppl: float, categories: Sequence[str], measure: Measure, cfg: AblateConfig,
                    on_event: Callable[[str, dict[str, Any]], None] | None = None) -> AblateResult:
    """Each candidate is first scaled into the PPL budget, then measured on the calibration
    pairs; the one with the lowest objective (category_rms of the calibration rows) wins.
    PPL grows ~quadratically in λ (a projection is smooth in λ and the uncorrected model is
    a minimum of the text's loss), so a PPL-only probe at λ = 1 (no pair scoring: a fifth of
    a trial's time) gives λ = √(0.95·budget / rise); a measured rise still over budget takes
    another step of the same rule. Comparing candidates at the strength they can have, not
    at λ = 1, is what the budget asks."""
    cfg.validate()
    emit = on_event or (lambda kind, data: None)
    cats = list(categories)
    obj0 = category_rms(*base, cats)
    trials: list[Trial] = []
    probes: list[dict[str, Any]] = []
    budget = cfg.max_ppl_increase

    def trial(spec: AblationSpec, kind: str) -> Trial:
        m, ls, ppl, kl = measure(spec, directions[kind], True)
        assert m is not None and ls is not None
        t = Trial(spec, kind, category_rms(m, ls, cats), float(M.pct_stereotype(m, ls)),
                  float(M.mean_ll_diff(m, ls)), ppl, ppl / base_ppl - 1, kl, pair_diagnostics(base, (m, ls)))
        trials.append(t)
        emit("trial", t.to_dict())
        return t

    def into_budget(lam: float, rise: float) -> float:
        return lam if rise <= budget else lam * float(np.sqrt(0.95 * budget / rise))

    n_layers = next(iter(directions.values())).n_layers
    for kind, where in cfg.candidates:
        spec = cfg.spec(where, n_layers)
        _, _, ppl, kl = measure(spec, directions[kind], False)
        probe = {"directions": kind, "describe": spec.describe(), "ppl": ppl, "ppl_increase": ppl / base_ppl - 1,
                 "kl": kl}
        probes.append(probe)
        emit("probe", probe)
        lam = into_budget(spec.strength, probe["ppl_increase"])
        t = trial(replace(spec, strength=round(lam, 4)), kind)
        for _ in range(cfg.max_steps):
            if t.ppl_increase <= budget:
                break
            t = trial(replace(spec, strength=round(into_budget(t.spec.strength, t.ppl_increase), 4)), kind)
    ok = [t for t in trials if t.ppl_increase <= budget and t.objective < obj0]
    best = min(ok, key=lambda t: t.objective) if ok else None
    return AblateResult(best, trials, obj0, base_ppl, directions, probes, cfg.objective)
