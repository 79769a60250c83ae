"""`edge bench`: a model × threads sweep of pp / tg / TTFT / load / RSS, with device state.

Every finished test is appended to the run log at once (a `bench` telemetry record), so
Ctrl-C mid-sweep loses only the test in progress; `--out` is written (atomically) with
the finished tests also when the sweep is interrupted.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edge import telemetry
from edge.bench import cooldown as cooldown_mod
from edge.bench.llama_ops import BenchContext
from edge.bench.output import check_out_path, write_records
from edge.catalog import resolve_model
from edge.device import DeviceState, probe_state
from edge.errors import BadOptionError
from edge.interrupt import InterruptGuard
from edge.runtime import RuntimeConfig
from edge.session import open_session
from edge.system import peak_rss_bytes

MAX_THREADS = 256
ENGINES = ("llama", "native")


@dataclass
class BenchConfig:
    """One sweep: every model × every thread count, each a test of pp then tg."""

    models: Sequence[str | None] = (None,)
    threads: Sequence[int] = (2,)
    n_prompt: int = 128
    n_gen: int = 64
    reps: int = 3
    warmup: int = 1
    n_ctx: int = 512
    cooldown_c: float | None = None
    cooldown_timeout_s: float = 600.0
    out: Path | None = None
    rpc: list[str] | None = None  # `edge worker` endpoints that get the layers (edge.rpc)
    tensor_split: list[float] | None = None  # share of the layers per RPC device
    engine: str = "llama"  # or "native": edge's numpy engine (edge.bench.native_ops)
    sparse_profile: Path | None = None  # R-Sparse profile for native decode
    tune: bool = True  # use this device's `edge tune` profile for a model when there is one
    threads_default: bool = False  # `threads` was not given: a tuned profile may choose it
    check_memory: bool = True  # refuse a model that would swap at --ctx (edge.memory)

    def _validate_engine(self) -> None:
        if self.engine not in ENGINES:
            raise BadOptionError(f"--engine {self.engine!r} is unknown; use one of {', '.join(ENGINES)}")
        if self.sparse_profile is not None and self.engine != "native":
            raise BadOptionError("--sparse-profile runs on edge's own engine; add --engine native")
        if (self.rpc or self.tensor_split) and self.engine != "llama":
            raise BadOptionError("--rpc/--tensor-split offload llama.cpp layers; they do not apply to --engine native")

    def validate(self) -> None:
        self._validate_engine()
        if not self.threads:
            raise BadOptionError("--threads needs at least one value, e.g. --threads 1,2,4")
        for t in self.threads:
            if not 1 <= t <= MAX_THREADS:
                raise BadOptionError(f"--threads {t} is out of range; use 1 to {MAX_THREADS}")
        checks = [
            (self.n_prompt >= 1, f"--pp {self.n_prompt} must be ≥ 1 (prompt tokens per test)"),
            (self.n_gen >= 1, f"--tg {self.n_gen} must be ≥ 1 (generated tokens per test)"),
            (self.reps >= 1, f"--reps {self.reps} must be ≥ 1"),
            (self.warmup >= 0, f"--warmup {self.warmup} must be ≥ 0"),
            (self.n_ctx > max(self.n_prompt, self.n_gen),
             f"--ctx {self.n_ctx} must exceed --pp {self.n_prompt} and --tg {self.n_gen}; "
             f"use --ctx {max(self.n_prompt, self.n_gen) + 1} or more"),
        ]
        for ok, msg in checks:
            if not ok:
                raise BadOptionError(msg)
        if self.cooldown_c is not None and not 0 < self.cooldown_c < 150:
            raise BadOptionError(f"--cooldown {self.cooldown_c} °C is not a plausible SoC limit; use e.g. 50")

    @property
    def test_name(self) -> str:
        return f"pp{self.n_prompt}+tg{self.n_gen}"


def mean_std(samples: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n-1), as llama-bench reports them."""
    if not samples:
        return 0.0, 0.0
    mean = statistics.fmean(samples)
    return mean, statistics.stdev(samples) if len(samples) > 1 else 0.0


def throttled_during(before: DeviceState, after: DeviceState) -> bool | None:
    """True if the firmware reported throttling now, or a new since-boot flag appeared.

    None when the board has no throttle report (x86, no vcgencmd): unknown, not "no".
    """
    if after.throttled is None:
        return None
    now_bits = ("under_voltage", "arm_frequency_capped", "throttled", "soft_temp_limit")
    if any(after.throttled[k] for k in now_bits):
        return True
    prev = before.throttled or {}
    return any(v and not prev.get(k, False) for k, v in after.throttled.items())


@dataclass
class TestResult:
    """One model × threads test; `record` is the telemetry record that was logged."""

    record: dict[str, Any]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.record["metrics"]


@dataclass
class BenchResult:
    run_id: str
    tests: list[TestResult] = field(default_factory=list)
    planned: int = 0
    out: Path | None = None

    @property
    def records(self) -> list[dict[str, Any]]:
        return [t.record for t in self.tests]


Hook = Callable[[str, int, int], None]  # (what, timed steps done, timed steps planned)


def _measure(bctx: BenchContext, cfg: BenchConfig, tick: Callable[[], None]) -> dict[str, Any]:
    for _ in range(cfg.warmup):  # as llama-bench: one full prompt and one token
        bctx.clear()
        bctx.prompt(cfg.n_prompt)
        bctx.generate(1)
    pp_s, ttft_s, tg_s, perf_pp, perf_tg = [], [], [], [], []
    for _ in range(cfg.reps):
        bctx.clear()
        bctx.perf_reset()
        t0 = time.perf_counter()
        pp = bctx.prompt(cfg.n_prompt)
        bctx.first_token()
        ttft_s.append(time.perf_counter() - t0)
        pp_s.append(cfg.n_prompt / pp)
        p = bctx.perf()
        if p.t_p_eval_ms > 0:
            perf_pp.append(p.n_p_eval / p.t_p_eval_ms * 1000)
        tick()
    for _ in range(cfg.reps):
        bctx.clear()
        bctx.perf_reset()
        tg = bctx.generate(cfg.n_gen)
        tg_s.append(cfg.n_gen / tg)
        p = bctx.perf()
        if p.t_eval_ms > 0:
            perf_tg.append(p.n_eval / p.t_eval_ms * 1000)
        tick()
    pp_m, pp_sd = mean_std(pp_s)
    tg_m, tg_sd = mean_std(tg_s)
    ttft_m, ttft_sd = mean_std([s * 1000 for s in ttft_s])
    return {
        "pp_tps": pp_m, "pp_tps_std": pp_sd, "pp_tps_samples": pp_s,
        "tg_tps": tg_m, "tg_tps_std": tg_sd, "tg_tps_samples": tg_s,
        "ttft_ms": ttft_m, "ttft_ms_std": ttft_sd,
        # llama.cpp's internal timers for the same decodes (see benchmarks/bench_overhead.py)
        "llama_perf_pp_tps": mean_std(perf_pp)[0] if perf_pp else None,
        "llama_perf_tg_tps": mean_std(perf_tg)[0] if perf_tg else None,
    }


def _current_rss() -> int | None:
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:  # pragma: no cover - psutil missing or denied
        return None


def run_bench(cfg: BenchConfig, *, on_progress: Hook | None = None,
              on_test: Callable[[TestResult], None] | None = None,
              on_notice: Callable[[str], None] | None = None,
              sleep: Callable[[float], None] = time.sleep) -> BenchResult:
    """Run the sweep; each finished test is logged at once and passed to `on_test`.

    A model with an `edge tune` profile on this device is benchmarked as tuned (its file,
    KV types, batch sizes, flash attention, repack, mmap; its thread count unless threads
    were given), `on_notice` getting the one line saying so; cfg.tune=False ignores it.
    Each llama.cpp model is checked to fit in memory at --ctx before it loads.

    Bad input (unknown model, bad numbers, an unwritable --out) fails before any test
    runs. On KeyboardInterrupt the finished tests are written to `cfg.out` and the
    interrupt propagates.
    """
    cfg.validate()
    paths = [resolve_model(m) for m in cfg.models]  # fail on an unknown model before any work
    if cfg.out is not None:
        check_out_path(cfg.out)
    if cfg.cooldown_c is not None:
        cooldown_mod.require_sensor()
    profile_info = None
    if cfg.sparse_profile is not None:  # a profile for another model fails before any work
        from edge.bench import native_ops

        profile_info = native_ops.check_profile(cfg.sparse_profile, paths)
    result = BenchResult(run_id=telemetry.new_run_id(), planned=len(paths) * len(cfg.threads),
                         out=cfg.out)
    done = 0
    guard = InterruptGuard()

    def guarded_sleep(s: float) -> None:
        guard.check()
        sleep(s)
        guard.check()

    try:
        with guard:
            for path in paths:
                path, rcfg, threads_list, tuned = _plan(path, cfg, on_notice)
                # one session per model, shared by its thread counts; llama.cpp's holds the
                # weights only (each test makes its own context at --ctx)
                rt = open_session(path, replace(rcfg, n_ctx=16, threads=threads_list[0], check_memory=False),
                                  engine=cfg.engine, sparse_profile=cfg.sparse_profile)
                try:
                    for threads in threads_list:
                        guard.check()
                        test = _one_test(rt, threads, cfg, result, guarded_sleep, on_progress, done,
                                         guard.check, profile_info, rcfg if tuned else None)
                        result.tests.append(test)
                        done += 1
                        if on_test:
                            on_test(test)
                finally:
                    rt.close()
                guard.check()
    finally:
        # Interrupted or not, --out holds every finished test (and nothing half-done).
        if cfg.out is not None and result.tests:
            write_records(cfg.out, result.records)
    return result


def _plan(path: Path, cfg: BenchConfig, on_notice: Callable[[str], None] | None,
          ) -> tuple[Path, RuntimeConfig, list[int], bool]:
    """(file to load, its settings, thread counts, tuned?) for one model: the tuned
    profile's when there is one, after the memory check at the benchmark's context."""
    rcfg = RuntimeConfig(n_ctx=cfg.n_ctx, threads=None if cfg.threads_default else cfg.threads[0],
                         rpc=cfg.rpc, tensor_split=cfg.tensor_split)
    threads = list(cfg.threads)
    llama_local = cfg.engine == "llama" and not cfg.rpc
    prof = None
    if cfg.tune and llama_local:
        from edge.tune.profile import apply_profile

        path, rcfg, prof = apply_profile(path, rcfg)
        if prof is not None:
            if on_notice:
                on_notice(f"{path.name}: {prof.notice()}")
            if cfg.threads_default and rcfg.threads:
                threads = [rcfg.threads]
    if cfg.check_memory and llama_local:
        from edge.memory.checks import check_load

        check_load(path, replace(rcfg, threads=max(threads)))
    return path, rcfg, threads, prof is not None


def _context(gen: Any, cfg: BenchConfig, threads: int, profile: dict[str, Any] | None,
             rcfg: RuntimeConfig | None = None) -> Any:
    """The engine's benchmark context: llama-bench's steps on llama.cpp, or the native ones.
    `rcfg`: a tuned profile's settings (batch sizes, KV types, flash attention), or None."""
    if gen.engine == "native":
        from edge.bench.native_ops import NativeBenchContext

        return NativeBenchContext(gen, n_ctx=cfg.n_ctx, threads=threads, profile=profile)
    if rcfg is None:
        return BenchContext(gen.model, n_ctx=cfg.n_ctx, threads=threads)  # llama-bench's defaults
    return BenchContext(gen.model, n_ctx=cfg.n_ctx, threads=threads, n_batch=rcfg.n_batch,
                        n_ubatch=rcfg.n_ubatch, flash_attn=int(rcfg.flash_attn), type_k=rcfg.type_k,
                        type_v=rcfg.type_v)


def _one_test(rt: Any, threads: int, cfg: BenchConfig, result: BenchResult,
              sleep: Callable[[float], None], on_progress: Hook | None, index: int,
              check: Callable[[], None], profile: dict[str, Any] | None = None,
              rcfg: RuntimeConfig | None = None) -> TestResult:
    waited = None
    if cfg.cooldown_c is not None:
        if on_progress:
            on_progress(f"cooling below {cfg.cooldown_c:g} °C", index * 2 * cfg.reps,
                        result.planned * 2 * cfg.reps)
        waited = cooldown_mod.wait_below(cfg.cooldown_c, cfg.cooldown_timeout_s, sleep=sleep)
    label = f"{rt.info.name or rt.path.name} t={threads}"
    n_ticks = [0]

    def tick() -> None:
        n_ticks[0] += 1
        if on_progress:
            on_progress(label, index * 2 * cfg.reps + n_ticks[0], result.planned * 2 * cfg.reps)

    before = probe_state()
    with _context(rt, cfg, threads, profile, rcfg) as bctx:
        bctx.interrupt_check = check
        figures = _measure(bctx, cfg, tick)
        config = {"threads": threads, "n_ctx": bctx.n_ctx, "n_batch": bctx.n_batch,
                  "n_ubatch": bctx.n_ubatch, "flash_attn": "auto" if rcfg is None else rcfg.flash_attn,
                  "tuned": rcfg is not None, "sparse_profile": None,
                  "correction": None, "rpc": cfg.rpc,
                  "tensor_split": cfg.tensor_split, "engine": cfg.engine}
        if cfg.engine == "native":
            bctx.record_fields(figures, config)
    after = probe_state()
    metrics = {
        "test": cfg.test_name, "n_prompt": cfg.n_prompt, "n_gen": cfg.n_gen, "reps": cfg.reps,
        "warmup": cfg.warmup, **figures, "load_ms": rt.load_ms,
        "peak_rss_bytes": peak_rss_bytes(), "rss_bytes": _current_rss(),
        "state_before": before.to_dict(), "state_after": after.to_dict(),
        "throttled": throttled_during(before, after),
        "cooldown_c": cfg.cooldown_c,
        "cooldown_wait_s": waited.waited_s if waited else None,
        "cooldown_reached": waited.reached if waited else None,
    }
    if cfg.rpc:
        from edge.rpc import last_split

        split = last_split()  # which layers and bytes went to which worker
        metrics["rpc_split"] = split.to_dict() if split else None
    check()  # interrupted during the last decode: this test is not finished, do not log it
    rec = telemetry.log("bench", metrics, model=rt.info, config=config, run_id=result.run_id)
    return TestResult(rec)
