"""Prometheus text exposition (format 0.0.4) of the server's counters, written by hand:
a few counters and one histogram do not need a client library."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

# Request latency buckets in seconds: a Pi answers in 0.1 s to minutes.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# Fairness-record metrics worth a gauge (numbers only; the rest stays in the log).
FAIRNESS_KEYS_SKIP = {"command", "suite", "n_items", "n_pairs"}


class ServeMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self.bucket_counts = [0] * len(BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.rejected = 0
        self.cancelled = 0
        self.prompt_tokens = 0
        self.gen_tokens = 0
        self.last_gen_tps = 0.0
        self.last_prompt_tps = 0.0

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.latency_sum += seconds
            self.latency_count += 1
            for i, b in enumerate(BUCKETS):
                if seconds <= b:
                    self.bucket_counts[i] += 1

    def observe_generation(self, stats: Any, *, cancelled: bool) -> None:
        with self._lock:
            self.cancelled += int(cancelled)
            self.prompt_tokens += stats.n_prompt_tokens
            self.gen_tokens += stats.n_gen_tokens
            if stats.gen_tps:
                self.last_gen_tps = stats.gen_tps
            if stats.prompt_tps:
                self.last_prompt_tps = stats.prompt_tps

    def render(self, *, in_flight: int, max_queue: int, model_id: str,
               fairness: dict[str, float] | None = None) -> str:
        m = _Lines()
        with self._lock:
            m.head("edge_requests_total", "counter", "HTTP requests answered, by endpoint and status.")
            for (ep, status), n in sorted(self.requests.items()):
                m.add("edge_requests_total", n, endpoint=ep, status=str(status))
            m.head("edge_request_duration_seconds", "histogram", "Time from request to last byte.")
            for b, n in zip(BUCKETS, self.bucket_counts, strict=True):
                m.add("edge_request_duration_seconds_bucket", n, le=f"{b:g}")
            m.add("edge_request_duration_seconds_bucket", self.latency_count, le="+Inf")
            m.add("edge_request_duration_seconds_sum", round(self.latency_sum, 6))
            m.add("edge_request_duration_seconds_count", self.latency_count)
            m.head("edge_rejected_total", "counter", "Requests refused with 429 (queue full).")
            m.add("edge_rejected_total", self.rejected)
            m.head("edge_cancelled_total", "counter", "Generations stopped because the client left.")
            m.add("edge_cancelled_total", self.cancelled)
            m.head("edge_prompt_tokens_total", "counter", "Prompt tokens processed.")
            m.add("edge_prompt_tokens_total", self.prompt_tokens)
            m.head("edge_generated_tokens_total", "counter", "Tokens generated.")
            m.add("edge_generated_tokens_total", self.gen_tokens)
            m.head("edge_gen_tokens_per_second", "gauge", "Decode speed of the last generation.")
            m.add("edge_gen_tokens_per_second", round(self.last_gen_tps, 3))
            m.head("edge_prompt_tokens_per_second", "gauge", "Prompt speed of the last generation.")
            m.add("edge_prompt_tokens_per_second", round(self.last_prompt_tps, 3))
        m.head("edge_in_flight_requests", "gauge", "Generations running or queued.")
        m.add("edge_in_flight_requests", in_flight)
        m.head("edge_queue_bound", "gauge", "Queued requests allowed beyond the running one.")
        m.add("edge_queue_bound", max_queue)
        m.head("edge_model_info", "gauge", "The loaded model.")
        m.add("edge_model_info", 1, model=model_id)
        if fairness:
            m.head("edge_fairness", "gauge", "The last fairness audit of the loaded model (edge logs).")
            for key, value in sorted(fairness.items()):
                m.add("edge_fairness", value, metric=key)
        return m.text()


class _Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def head(self, name: str, kind: str, help_text: str) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def add(self, name: str, value: float, **labels: str) -> None:
        if labels:
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            name = f"{name}{{{inner}}}"
        self.lines.append(f"{name} {value}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def last_fairness(fingerprint: str | None) -> dict[str, float]:
    """Numeric metrics of the newest fairness record for this model file (by fingerprint)."""
    from edge import telemetry

    recs = [r for r in telemetry.read_records("fairness").records
            if fingerprint and (r.get("model") or {}).get("sha256") == fingerprint]
    if not recs:
        return {}
    out: dict[str, float] = {}
    for k, v in (recs[-1].get("metrics") or {}).items():
        if k not in FAIRNESS_KEYS_SKIP and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out
