"""The search: quality first per quant type, then successive halving on speed, then a final
round where the finalists and the untuned defaults are measured interleaved.

- A candidate the memory model says cannot fit (edge.memory.fit at --ctx) is never loaded.
- Quant types whose KL to the source exceeds --max-kld (with an f16 KV cache, no flash
  attention) are dropped before any speed run; KV/flash-attention variants have their own
  KL measured before they may reach a later rung.
- A type over --max-kld that is smaller than every type within it is also tried as a mix
  (edge.tune.mix): its file with the tensor classes that cost most KL per weight taken from
  the smallest type within the budget, until the mix is within MIX_MARGIN of it.
- Rung r measures n_gen·3^r tokens with 1 + r repetitions and keeps the best third.
- Final round: each finalist and the defaults in turn, `final_rounds` times, medians: a
  setting that wins only while the board is cold meets the others at the same heat.
- Every finished measurement is a journal line; a rerun measures only what is missing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge.catalog import resolve_model
from edge.errors import BadOptionError
from edge.gguf_file import ModelInfo, inspect
from edge.paths import cache_dir, edge_home
from edge.tune.journal import Journal
from edge.tune.measure import (
    BaseLogits,
    LoadedModels,
    Speed,
    measure_quality,
    measure_speed,
    tune_texts,
)
from edge.tune.mix import Mix, MixSearch, class_sizes, search_mix, write_mix
from edge.tune.profile import DeviceProfile, device_key
from edge.tune.space import OBJECTIVES, QUANTS, Candidate, build_space, defaults, loader_variants

SOURCE_TYPES = ("F32", "F16", "BF16", "Q8_0")
IMATRIX = "+imatrix"  # suffix of a quant type made with the importance matrix
IMATRIX_CTX = 512  # llama-imatrix's chunk
NO_IMATRIX = ("Q8_0", "F16", "BF16", "F32")  # llama.cpp's quantizer ignores an imatrix for these
# a mix aims below the budget: held-out text read 10-20% above the search text in the runs
# measured (Q4_K_M+imatrix 0.0274 → 0.0321), and KV/flash-attention variants add their own
MIX_MARGIN = 0.8


@dataclass
class TuneOptions:
    objective: str = "tg"
    max_kld: float = 0.05
    budget_minutes: float = 20.0
    n_ctx: int = 2048  # the context the chosen configuration must fit
    quants: list[str] | None = None  # None: QUANTS
    threads: list[int] | None = None  # None: by core count
    text: str | None = None  # quality text (None: Python's documentation)
    kl_chunks: int = 2
    kl_ctx: int = 512
    n_gen: int = 16  # rung 0's tokens; ×3 per rung
    n_prompt: int = 0  # 0: 64 for tg, 512 for pp, 256 for ttft
    final_rounds: int = 5
    cooldown: float | None = None  # °C to wait for before each measurement (Pi)
    force_memory: bool = False
    imatrix: bool = True  # also try each quant type made with an importance matrix
    imatrix_chunks: int = 16  # 512-token chunks of calibration text for it
    mix: bool = True  # also try fast types over the budget with their costliest tensors kept wider

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise BadOptionError(f"--objective {self.objective!r}: use one of {', '.join(OBJECTIVES)}")
        if not self.max_kld > 0:
            raise BadOptionError("--max-kld must be > 0 (e.g. 0.05)")
        if not self.budget_minutes > 0:
            raise BadOptionError("--budget-minutes must be > 0 (e.g. 20)")

    def prompt_tokens(self) -> int:
        return self.n_prompt or {"tg": 64, "pp": 512, "ttft": 256}[self.objective]

    def journal_key(self) -> dict[str, Any]:
        """The options whose change makes earlier figures answer another question."""
        return {"objective": self.objective, "n_ctx": self.n_ctx, "text": self.text, "kl_chunks": self.kl_chunks,
                "kl_ctx": self.kl_ctx, "n_gen": self.n_gen, "n_prompt": self.prompt_tokens(),
                "imatrix_chunks": self.imatrix_chunks}


@dataclass
class Progress:
    stage: str  # "quantize" | "quality" | "speed" | "final" | "held-out"
    what: str
    done: int
    total: int
    elapsed_s: float
    eta_s: float | None
    reused: bool = False


ProgressFn = Callable[[Progress], None]


@dataclass
class TuneResult:
    profile: DeviceProfile
    profile_path: Path
    journal: Path
    measured: int  # measurements taken in this run
    reused: int  # measurements read back from the journal
    skipped_memory: list[str] = field(default_factory=list)  # candidate keys the memory model refused
    dropped_quality: list[str] = field(default_factory=list)  # quant types over --max-kld
    # quant type → "+imatrix" or "plain": the file of the two kept for the speed search (lower KL)
    imatrix_choice: dict[str, str] = field(default_factory=dict)
    # quant type made both ways → [KL plain, KL with the importance matrix] (None: not made)
    imatrix_kl: dict[str, list[float | None]] = field(default_factory=dict)
    mixes: list[dict[str, Any]] = field(default_factory=list)  # MixSearch.to_dict() per type tried
    stopped_by_budget: bool = False
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["profile_path"], d["journal"] = str(self.profile_path), str(self.journal)
        return d


class Tuner:
    """State of one `edge tune` run (see the module docstring for the procedure)."""

    def __init__(self, model: str | None, opts: TuneOptions, progress: ProgressFn | None,
                 check: Callable[[], None] | None):
        from edge.system import default_threads

        self.opts, self.progress, self.check = opts, progress, check
        self.info = inspect(resolve_model(model))
        self.model_path = Path(self.info.path)
        self.source = self._source()
        self.default_threads = default_threads()
        self.files: dict[str, Path] = {self.info.quant.upper(): self.model_path}
        self.files.setdefault(inspect(self.source).quant.upper(), self.source)
        self.workdir = cache_dir() / "tune" / self.info.fingerprint[:16]
        self.device = device_key()
        self.journal = Journal(edge_home() / "tune" / self.device / f"{self.info.fingerprint[:16]}.journal.jsonl",
                               {"model": str(self.model_path), "options": opts.journal_key()})
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + opts.budget_minutes * 60
        self.measured = self.reused = 0
        self._reused_ids: set[int] = set()
        self.durations: list[float] = []
        self.skipped: list[str] = []
        self.dropped: list[str] = []
        self.imatrix_choice: dict[str, str] = {}
        self.imatrix_kl: dict[str, list[float | None]] = {}
        self._imatrix: Path | None | bool = False  # False: not made yet; None: cannot be made
        self.over: dict[str, tuple[float, str]] = {}  # type over --max-kld → (KL, its lower-KL file's name)
        self.mixes: list[MixSearch] = []
        self.stopped_by_budget = False
        self.models = LoadedModels(self.files)
        self.base: BaseLogits | None = None
        self.texts = tune_texts(Path(opts.text).read_text(encoding="utf-8") if opts.text else None)
        self._tokens: dict[int, tuple[list[int], int | None]] = {}
        self._infos: dict[str, ModelInfo] = {}

    def _source(self) -> Path:
        """The reference weights: the model itself when f16/bf16/f32/Q8_0, else its f16 copy."""
        if self.info.quant.upper() in SOURCE_TYPES:
            return self.model_path
        from edge.dequant import f16_copy

        return f16_copy(self.info)

    # ---- bookkeeping ------------------------------------------------------------------
    def _tick(self, stage: str, what: str, done: int, total: int, reused: bool = False) -> None:
        if self.check:
            self.check()
        if self.progress:
            per = sum(self.durations) / len(self.durations) if self.durations else None
            eta = per * max(0, total - done) if per else None
            self.progress(Progress(stage, what, done, total, time.perf_counter() - self.t0, eta, reused))

    def over_budget(self) -> bool:
        if time.perf_counter() > self.deadline:
            self.stopped_by_budget = True
        return self.stopped_by_budget

    def _record(self, kind: str, rec: dict[str, Any], seconds: float) -> dict[str, Any]:
        self.journal.append({"kind": kind, **rec})
        self.measured += 1
        self.durations.append(seconds)
        return rec

    # ---- files ------------------------------------------------------------------------
    def quant_file(self, q: str) -> Path | None:
        """The source quantized to q (cached); None when llama.cpp cannot make it. q ending in
        IMATRIX is made with the importance matrix of the calibration tokens."""
        from edge.errors import EdgeError
        from edge.quantize import quantize

        if q in self.files:
            return self.files[q]
        mix = Mix.parse(q)
        if mix is not None:
            return self._mix_file(mix)
        imatrix = None
        if q.endswith(IMATRIX):
            imatrix = self.imatrix_file()
            if imatrix is None:
                return None
        path = self.workdir / (f"{q[: -len(IMATRIX)]}.{imatrix.stem}.gguf" if imatrix else f"{q}.gguf")
        if not path.exists():
            try:
                quantize(self.source, path, qtype=q.removesuffix(IMATRIX), imatrix=imatrix)
            except EdgeError:
                return None
        self.files[q] = path
        return path

    def _mix_file(self, m: Mix) -> Path | None:
        fast, safe = self.quant_file(m.fast), self.quant_file(m.safe)
        if fast is None or safe is None:
            return None
        path = self.workdir / m.file_name()
        if not path.exists():
            write_mix(fast, safe, path, m.take, note=m.describe())
        self.files[m.name] = path
        return path

    def _drop_file(self, q: str) -> None:
        path = self.files.pop(q, None)
        self._infos.pop(q, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def imatrix_file(self) -> Path | None:
        """The source's importance matrix on the search text's tokens after those the KL
        measurements read (so no KL figure is taken on text it was calibrated on); None
        when the text has no room for a chunk."""
        import hashlib

        from edge.imatrix import collect_imatrix

        if self._imatrix is not False:
            return self._imatrix  # type: ignore[return-value]
        toks, _ = self.tokens(0)
        calib = toks[self.opts.kl_chunks * self.opts.kl_ctx :][: self.opts.imatrix_chunks * IMATRIX_CTX]
        self._imatrix = None
        if len(calib) >= IMATRIX_CTX:
            h = hashlib.sha256(repr(calib).encode()).hexdigest()[:12]
            path = self.workdir / f"imatrix.{h}.gguf"
            if not path.exists():
                self._tick("quality", "importance matrix of the calibration text", 0, 1)
                r = collect_imatrix(self.source, calib, path, n_ctx=IMATRIX_CTX, max_chunks=self.opts.imatrix_chunks,
                                    threads=self.default_threads, dataset="edge tune search text",
                                    force=True, force_memory=True, check=self.check)  # fit: base_logits checked
                if r.interrupted:  # a partial matrix must not be reused by the rerun
                    path.unlink()
                    raise KeyboardInterrupt
            self._imatrix = path
        return self._imatrix  # type: ignore[return-value]

    # ---- memory -----------------------------------------------------------------------
    def fits(self, c: Candidate) -> bool:
        from edge.memory import SessionParams, fit
        from edge.memory.checks import this_cpu

        if self.opts.force_memory:
            return True
        p = SessionParams(n_ctx=self.opts.n_ctx, n_batch=c.n_batch, n_ubatch=c.n_ubatch, type_k=c.type_k,
                          type_v=c.type_v, flash_attn=c.flash_attn, use_mmap=c.use_mmap, use_mlock=c.use_mlock,
                          repack=c.repack, process="resident")
        v = fit(self.model_info(c.quant), params=p, cpu=this_cpu())
        if not v.fits and not self.journal.find("skip", key=c.key):
            self.journal.append({"kind": "skip", "key": c.key, "reason": v.message(c.describe())})
        if not v.fits:
            self.skipped.append(c.key)
        return v.fits

    def required(self, c: Candidate) -> int:
        from edge.memory import SessionParams, estimate
        from edge.memory.checks import this_cpu

        p = SessionParams(n_ctx=self.opts.n_ctx, n_batch=c.n_batch, n_ubatch=c.n_ubatch, type_k=c.type_k,
                          type_v=c.type_v, flash_attn=c.flash_attn, use_mmap=c.use_mmap, use_mlock=c.use_mlock,
                          repack=c.repack)
        return estimate(self.model_info(c.quant), p, this_cpu()).required

    def model_info(self, q: str) -> ModelInfo:
        if q not in self._infos:
            self._infos[q] = inspect(self.files[q])
        return self._infos[q]

    # ---- quality ----------------------------------------------------------------------
    def tokens(self, which: int) -> tuple[list[int], int | None]:
        """Tokens of the search text (0) or the held-out text (1), by the source's tokenizer."""
        if which not in self._tokens:
            self._tokens[which] = self.base_logits().tokens(self.texts[which])
        return self._tokens[which]

    def base_logits(self) -> BaseLogits:
        if self.base is None:
            if not self.opts.force_memory:  # the reference runs too: a 7B's f16 may not fit a Pi
                from edge.memory import SessionParams, fit
                from edge.memory.checks import this_cpu

                p = SessionParams(n_ctx=self.opts.kl_ctx, n_batch=self.opts.kl_ctx, process="resident")
                fit(inspect(self.source), params=p, cpu=this_cpu()).require(
                    f"the reference {self.source.name} (for KL)", flag="a Q8_0 source, or --force,")
            self.base = BaseLogits(self.source, n_ctx=self.opts.kl_ctx, threads=self.default_threads)
        return self.base

    def _reuse(self, record: dict[str, Any]) -> None:
        # counts what an earlier run measured, once each (candidates sharing weights and KV
        # type share one quality record: finding it again in this run is not a reuse)
        if self.journal.from_earlier_run(record) and id(record) not in self._reused_ids:
            self._reused_ids.add(id(record))
            self.reused += 1

    def quality(self, c: Candidate, *, held_out: bool = False) -> dict[str, Any]:
        """KL of c's weights and KV cache to the source (journal first)."""
        kind = "heldout" if held_out else "quality"
        found = self.journal.find(kind, qkey=c.quality_key)
        if found:
            self._reuse(found)
            return found
        if Path(self.files[c.quant]) == self.source and (c.type_k, c.type_v, c.flash_attn) == ("f16", "f16", False):
            rec = {"qkey": c.quality_key, "kld": 0.0, "top1": 1.0, "kld_p99": 0.0, "seconds": 0.0, "reference": True}
            self.journal.append({"kind": kind, **rec})  # the reference itself
            return rec
        toks, bos = self.tokens(1 if held_out else 0)
        chunks = self.opts.kl_chunks * (2 if held_out else 1)
        q = measure_quality(self.files[c.quant], c, self.base_logits(), toks, bos, n_chunks=chunks)
        return self._record(kind, {"qkey": c.quality_key, **q}, q["seconds"])

    def within_budget(self, c: Candidate) -> bool:
        return self.quality(c)["kld"] <= self.opts.max_kld

    # ---- speed ------------------------------------------------------------------------
    def speed(self, c: Candidate, rung: str, n_gen: int, reps: int) -> Speed:
        found = self.journal.find("speed", key=c.key, rung=rung)
        if found:
            self._reuse(found)
            return Speed(**found["speed"])
        if self.opts.cooldown is not None:
            from edge.bench.cooldown import wait_below

            wait_below(self.opts.cooldown, timeout_s=300)
        model = self.models.get(c)
        n_ctx = min(self.opts.n_ctx, self.info.context_length or self.opts.n_ctx)
        s = measure_speed(model, c, n_ctx=n_ctx, n_prompt=min(self.opts.prompt_tokens(), n_ctx - n_gen - 2),
                          n_gen=n_gen, reps=reps, check=self.check)
        self._record("speed", {"key": c.key, "rung": rung, "candidate": c.to_dict(), "speed": s.to_dict()},
                     s.seconds)
        return s

    # ---- stages -----------------------------------------------------------------------
    def stage_quants(self) -> list[str]:
        """Quantize the source to each type and keep those within --max-kld (f16 KV, no FA).
        The model's own type is kept regardless: the defaults are measured on it."""
        own = self.info.quant.upper()
        src = inspect(self.source).quant.upper()
        wanted = [q.upper() for q in (self.opts.quants or QUANTS)]
        order = list(dict.fromkeys([*wanted, src, own]))
        # each type also made with an importance matrix (not the source, nor a 16/32-bit copy)
        variants = [(q, [q] + ([q + IMATRIX] if self.opts.imatrix and q not in (src, own, *NO_IMATRIX)
                               else [])) for q in order]
        total = sum(len(v) for _, v in variants)
        kept: list[str] = []
        done = 0
        for q, names in variants:
            ok: list[tuple[float, str]] = []
            kls: list[float | None] = []
            for name in names:
                self._tick("quality", f"{name}: quantize and KL to the source", done, total)
                done += 1
                kls.append(None)
                if self.quant_file(name) is None:
                    continue  # llama.cpp cannot make this type from these rows
                c = defaults(name, self.default_threads)
                if not self.fits(c):
                    continue
                kls[-1] = kld = self.quality(c)["kld"]
                if kld <= self.opts.max_kld or name == own:
                    ok.append((kld, name))
            if len(names) > 1:
                self.imatrix_kl[q] = kls
            if not ok:
                self.dropped.append(q)
                measured = [(k, n) for k, n in zip(kls, names, strict=True) if k is not None]
                if measured:
                    self.over[q] = min(measured)
                continue
            # same type, same speed: only the file with the lower KL goes on to the speed runs
            best = own if any(n == own for _, n in ok) else min(ok)[1]
            kept.append(best)
            if len(names) > 1:
                self.imatrix_choice[q] = "+imatrix" if best.endswith(IMATRIX) else "plain"
        return kept

    def stage_mixes(self, kept: list[str]) -> list[str]:
        """For each type over the budget whose file is smaller than the smallest kept type's
        (not a 16/32-bit source): the mix search (edge.tune.mix) against that kept type."""
        wide = [q for q in kept if q.removesuffix(IMATRIX) not in SOURCE_TYPES[:3]
                and self.within_budget(defaults(q, self.default_threads))]
        if not self.opts.mix or not wide or not self.over:
            return []
        safe = min(wide, key=lambda q: self.files[q].stat().st_size)
        found: list[str] = []
        for kld, fast in self.over.values():
            if self.files[fast].stat().st_size >= self.files[safe].stat().st_size or self.over_budget():
                continue
            sizes = class_sizes(self.files[fast], self.files[safe])
            asked = [0, len(sizes) + 2]  # mixes measured, and about how many there will be

            def kl_of(m: Mix, kld: float = kld, asked: list[int] = asked) -> float | None:
                if not m.take:
                    return kld
                c = defaults(m.name, self.default_threads)
                rec = self.journal.find("quality", qkey=c.quality_key)
                if rec:  # measured by an earlier run: no need to write the file again
                    self._reuse(rec)
                    return rec["kld"]
                self._tick("quality", f"mix: {m.describe()}", asked[0], max(asked))
                asked[0] += 1
                try:
                    if self.quant_file(m.name) is None or not self.fits(c):
                        return None
                    return self.quality(c)["kld"]
                finally:  # a 7B's mix is GBs: each goes once measured, the chosen one is written again
                    self._drop_file(m.name)

            s = search_mix(fast, safe, sizes, kl_of, target=MIX_MARGIN * self.opts.max_kld, stop=self.over_budget)
            self.mixes.append(s)
            if s.chosen is not None and s.kl[s.chosen.name] <= self.opts.max_kld \
                    and self.quant_file(s.chosen.name) is not None:  # written again for the speed runs
                found.append(s.chosen.name)
        return found

    def space(self, quants: list[str]) -> list[Candidate]:
        from dataclasses import replace

        from edge.device import probe_device

        repacks = {}
        for q in quants:
            c = defaults(q, self.default_threads)
            repacks[q] = self.required(c) != self.required(replace(c, repack=False))
        cands = build_space(quants, cores=probe_device().cores, objective=self.opts.objective, repacks=repacks)
        if self.opts.threads:
            cands = [c for c in cands if c.threads in self.opts.threads]
        d = defaults(self.info.quant.upper(), self.default_threads)
        cands = list(dict.fromkeys([d, *cands]))
        return [c for c in cands if self.fits(c)]

    def halving(self, cands: list[Candidate]) -> list[Candidate]:
        """Successive halving (keep the best third per rung) until three remain."""
        live, rung = cands, 0
        reserve = 0.25 * self.opts.budget_minutes * 60  # for the final round and the held-out check
        while len(live) > 3 and not self.stopped_by_budget:
            n_gen, reps = self.opts.n_gen * 3 ** rung, 1 + rung
            scored: list[tuple[float, Candidate]] = []
            for i, c in enumerate(_round_robin(live)):
                if time.perf_counter() > self.deadline - reserve:
                    self.stopped_by_budget = True
                    break
                self._tick("speed", f"rung {rung}: {c.describe()}", i, len(live))
                scored.append((self.speed(c, f"r{rung}", n_gen, reps).value(self.opts.objective), c))
            scored.sort(key=lambda t: -t[0])
            if self.stopped_by_budget:  # the rung was cut: the unmeasured keep their last rank
                done = {c for _, c in scored}
                return ([c for _, c in scored] + [c for c in live if c not in done])[:3]
            keep = max(3, math.ceil(len(scored) / 3))
            live = []
            for _, c in scored:
                if len(live) >= keep:
                    break
                if self.within_budget(c):  # KV and flash-attention variants: their own KL
                    live.append(c)
            rung += 1
        return live

    def final_round(self, finalists: list[Candidate]) -> dict[Candidate, dict[str, float]]:
        """The finalists, the leader's mmap/mlock variants and the defaults, interleaved."""
        import statistics

        d = defaults(self.info.quant.upper(), self.default_threads)
        if not self.fits(d) and not finalists:
            from edge.errors import InsufficientMemoryError

            raise InsufficientMemoryError(self.journal.find("skip", key=d.key)["reason"]
                                          + " (no configuration edge tune tried fits this device)")
        entrants = [c for c in dict.fromkeys([*finalists, d]) if c in finalists or self.fits(c)]
        if finalists:
            entrants += [v for v in loader_variants(finalists[0]) if self.fits(v)]
        n_gen = self.opts.n_gen * 3
        rounds = self._final_rounds(len(entrants), n_gen)
        got: dict[Candidate, list[Speed]] = {c: [] for c in entrants}
        total = rounds * len(entrants)
        for r in range(rounds):
            for i, c in enumerate(entrants):
                self._tick("final", f"round {r + 1}/{rounds}: {c.describe()}", r * len(entrants) + i, total)
                got[c].append(self.speed(c, f"final{r}", n_gen, 2))
        return {c: {"tg": statistics.median(s.tg_tps for s in ss), "pp": statistics.median(s.pp_tps for s in ss),
                    "ttft": statistics.median(s.ttft_ms for s in ss),
                    "throttled": any(s.throttled for s in ss)} for c, ss in got.items()}

    def _final_rounds(self, n_entrants: int, n_gen: int) -> int:
        """As many interleaved rounds (up to final_rounds, at least 1) as the budget left
        allows, from the time the speed runs so far took per generated token."""
        speeds = [r["speed"] for r in self.journal.of("speed")]
        if not speeds:
            return self.opts.final_rounds
        per_token = sum(s["seconds"] for s in speeds) / sum(s["n_gen"] * (s["reps"] + 1) for s in speeds)
        one_round = n_entrants * per_token * n_gen * 3  # 2 repetitions and the warm-up
        left = self.deadline - time.perf_counter()
        return max(1, min(self.opts.final_rounds, int(left // one_round)))

    def finish(self, final: dict[Candidate, dict[str, float]]) -> DeviceProfile:
        """Winner (best median objective within --max-kld), runners-up, held-out KL, frontier."""
        from datetime import datetime, timezone

        obj = self.opts.objective
        sign = -1 if obj == "ttft" else 1
        ok = [c for c in final if self.within_budget(c)]
        if not ok:
            raise BadOptionError(f"no configuration measured is within --max-kld {self.opts.max_kld}; "
                                 "raise it or add wider --quant types (e.g. Q8_0)")
        ranked = sorted(ok, key=lambda c: -sign * final[c][obj])
        d = defaults(self.info.quant.upper(), self.default_threads)

        def entry(c: Candidate) -> dict[str, Any]:
            q = self.quality(c)
            measured = final.get(c, {"tg": 0.0, "pp": 0.0, "ttft": 0.0, "not_measured": "does not fit"})
            return {**c.to_dict(), "path": str(self.files[c.quant]), **measured, "kld": q["kld"],
                    "top1": q.get("top1"), "required_bytes": self.required(c), "key": c.key}

        winner, dflt = entry(ranked[0]), entry(d)
        for tag, c, e in (("winner", ranked[0], winner), ("defaults", d, dflt)):
            self._tick("held-out", f"{tag}: KL on text the search did not see", 0, 1)
            h = self.quality(c, held_out=True)
            e.update(kld_heldout=h["kld"], top1_heldout=h.get("top1"))
        runners = {}
        for o in OBJECTIVES:
            s = -1 if o == "ttft" else 1
            rest = sorted((c for c in ok if c != ranked[0]), key=lambda c: -s * final[c][o])
            if rest:
                runners[o] = entry(rest[0])
        return DeviceProfile(
            model=str(self.model_path), fingerprint=self.info.fingerprint, device=self.device, objective=obj,
            max_kld=self.opts.max_kld, n_ctx=self.opts.n_ctx, winner=winner,
            defaults=dflt, runners_up=runners, frontier=self.frontier(final),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def frontier(self, final: dict[Candidate, dict[str, float]]) -> list[dict[str, Any]]:
        """Every measured candidate with known KL: its best-rung speed (final medians when it
        reached the final), KL and the memory it needs; `pareto` marks the frontier."""
        best: dict[str, tuple[str, dict[str, Any]]] = {}
        for r in self.journal.of("speed"):
            prev = best.get(r["key"])
            if prev is None or _rung_order(r["rung"]) >= _rung_order(prev[0]):
                best[r["key"]] = (r["rung"], r)
        pts = []
        for key, (_, r) in best.items():
            c = Candidate.from_dict(r["candidate"])
            q = self.journal.find("quality", qkey=c.quality_key)
            if q is None:
                continue
            sp = final.get(c) or {"tg": r["speed"]["tg_tps"], "pp": r["speed"]["pp_tps"], "ttft": r["speed"]["ttft_ms"]}
            pts.append({"key": key, "label": c.describe(), "tg": sp["tg"], "pp": sp["pp"], "ttft": sp["ttft"],
                        "kld": q["kld"], "required_bytes": self.required(c), "final": c in final})
        obj, sign = self.opts.objective, (-1 if self.opts.objective == "ttft" else 1)
        for p in pts:
            p["pareto"] = not any(o["kld"] <= p["kld"] and sign * o[obj] > sign * p[obj] for o in pts)
        return pts

    def close(self) -> None:
        self.models.close()
        if self.base is not None:
            self.base.close()


def _round_robin(cands: list[Candidate]) -> list[Candidate]:
    """One candidate per quant type in turn (each type's in key order): when the budget
    ends a rung early, every type has had its share of the measurements."""
    by_quant: dict[str, list[Candidate]] = {}
    for c in sorted(cands, key=lambda c: c.key):
        by_quant.setdefault(c.quant, []).append(c)
    out: list[Candidate] = []
    while any(by_quant.values()):
        for q in list(by_quant):
            if by_quant[q]:
                out.append(by_quant[q].pop(0))
    return out


def _rung_order(rung: str) -> int:
    return 1000 + int(rung[5:]) if rung.startswith("final") else int(rung[1:])


def tune(model: str | None, options: TuneOptions | None = None, *, progress: ProgressFn | None = None,
         check: Callable[[], None] | None = None) -> TuneResult:
    """Search this device's fastest configuration of MODEL within options.max_kld and save it
    as the device profile. `check` runs between decodes and measurements (raise
    KeyboardInterrupt there to stop: everything measured so far stays in the journal)."""
    opts = options or TuneOptions()
    opts.validate()
    t = Tuner(model, opts, progress, check)
    try:
        quants = t.stage_quants()
        quants += t.stage_mixes(quants)
        finalists = t.halving(t.space(quants))
        prof = t.finish(t.final_round(finalists))
    finally:
        t.close()
    path = prof.save()
    return TuneResult(profile=prof, profile_path=path, journal=t.journal.path, measured=t.measured,
                      reused=t.reused, skipped_memory=sorted(set(t.skipped)), dropped_quality=t.dropped,
                      imatrix_choice=t.imatrix_choice, imatrix_kl=t.imatrix_kl,
                      mixes=[m.to_dict() for m in t.mixes],
                      stopped_by_budget=t.stopped_by_budget, elapsed_s=time.perf_counter() - t.t0)
