"""One Generator (edge.generation) behind an async API: a single generation thread, a bounded wait queue.

llama.cpp contexts are not thread-safe, so every generation runs on one worker thread
(a one-thread executor); requests beyond `1 + max_queue` are refused (QueueFullError →
HTTP 429) instead of piling up. Each job carries a cancel flag that the generation loop
checks after every token: a client that goes away stops its generation at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from edge import telemetry
from edge.errors import ContextOverflowError, EdgeError
from edge.generation import GenerationStats, Generator
from edge.sampling import Sampling
from edge.serve.metrics import ServeMetrics


class QueueFullError(EdgeError):
    """Every generation slot and queue place is taken (HTTP 429)."""


@dataclass
class Job:
    """One request's generation: its prompt tokens, options, and how it ended."""

    tokens: list[int]
    max_tokens: int
    sampling: Sampling
    stop: Sequence[str]
    endpoint: str
    cancel: threading.Event = field(default_factory=threading.Event)
    stats: GenerationStats | None = None
    error: BaseException | None = None
    queued_s: float = 0.0
    client_gone: bool = False
    queue: asyncio.Queue[Any] = field(default=None, repr=False)  # type: ignore[assignment]


_DONE = object()


class ServeEngine:
    def __init__(self, gen: Generator, *, model_id: str, max_queue: int = 8,
                 seed: int | None = None) -> None:
        self.gen = gen
        self.seed = seed  # for requests that send no seed of their own
        self.model_id = model_id
        self.max_queue = max_queue
        self.metrics = ServeMetrics()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-gen")
        self._in_flight = 0  # touched only from the event loop thread
        self.created = int(time.time())

    # ---- prompts --------------------------------------------------------------------
    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        return self.gen.chat_tokens(messages)

    def text_tokens(self, prompt: str) -> list[int]:
        return self.gen.tokenize(prompt)

    def check_fit(self, tokens: list[int], max_tokens: int | None) -> None:
        n_ctx = self.gen.n_ctx
        if len(tokens) >= n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(tokens)} tokens but the context holds {n_ctx}; shorten it "
                "or restart the server with a larger --ctx")
        if max_tokens is not None and len(tokens) + max_tokens > n_ctx:
            raise ContextOverflowError(
                f"max_tokens {max_tokens} + {len(tokens)} prompt tokens exceed the {n_ctx}-token "
                f"context; ask for at most {n_ctx - len(tokens)}")

    # ---- generation -----------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return self._in_flight

    def admit(self) -> None:
        """Take a place (running or queued) or raise QueueFullError; call from the loop."""
        if self._in_flight >= 1 + self.max_queue:
            self.metrics.rejected += 1
            raise QueueFullError(
                f"the server is busy ({self._in_flight} requests running or queued, queue "
                f"bound {self.max_queue}); retry later")
        self._in_flight += 1

    def submit(self, job: Job) -> None:
        """Queue an admit()ted job on the generation thread; read it with pieces(job).

        The job runs whether or not anyone reads it, and gives its place back when the
        thread is done with it, so a request dropped at any point never leaks a place."""
        loop = asyncio.get_running_loop()
        job.queue = asyncio.Queue()
        t_submit = time.perf_counter()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(job.queue.put_nowait, item)

        def work() -> None:
            job.queued_s = time.perf_counter() - t_submit
            try:
                if not job.cancel.is_set():
                    self._run(job, put)
            except BaseException as e:  # handed to the request; the worker thread lives on
                job.error = e
            finally:
                put(_DONE)

        fut = loop.run_in_executor(self._executor, work)
        fut.add_done_callback(lambda _f: self._release())

    def _release(self) -> None:
        self._in_flight -= 1

    async def pieces(self, job: Job) -> AsyncIterator[str]:
        """The submitted job's text as it comes. Leaving early (the client went away and
        this task was cancelled) stops the generation at its next token."""
        try:
            while True:
                item = await job.queue.get()
                if item is _DONE:
                    break
                yield item
            if job.error is not None:
                raise job.error
        finally:
            job.cancel.set()  # no-op once finished

    def _run(self, job: Job, put: Any) -> None:
        gen = self.gen.stream(job.tokens, max_tokens=job.max_tokens, sampling=job.sampling, stop=job.stop)
        try:
            for piece in gen:
                if job.cancel.is_set():
                    break
                put(piece)
        finally:
            gen.close()  # marks the stats "interrupted" when stopped early
            job.stats = self.gen.last
            if job.cancel.is_set() and job.stats is not None:
                job.stats.stop_reason = "interrupted"
            self._record(job)

    def _record(self, job: Job) -> None:
        s = job.stats
        if s is None:
            return
        self.metrics.observe_generation(s, cancelled=s.stop_reason == "interrupted")
        metrics = telemetry.latency_metrics(s, "serve") | {
            "endpoint": job.endpoint, "queued_ms": round(job.queued_s * 1000, 3)}
        cfg = self.gen.config_record(temp=job.sampling.temp, seed=job.sampling.seed)
        telemetry.log("latency", metrics, model=self.gen.info, config=cfg)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.gen.close()
