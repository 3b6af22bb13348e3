"""Server metrics in the Prometheus text format (exposition format 0.0.4), kept without a client library.

Counters (requests by endpoint and status, prompt and generated tokens), gauges read at scrape time (requests
waiting / running, cache blocks used / total, tokens cached) and histograms (time to first token, inter-token
latency, request latency, in seconds). Updated from the engine thread and the HTTP event loop alike, so every
change takes one lock.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

#: Histogram bucket upper bounds in seconds (the last, +Inf, is implicit).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Cumulative bucket counts, sum and count of observed values."""

    def __init__(self, buckets: tuple[float, ...] = BUCKETS):
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, c in zip(self.bounds, self.counts, strict=False):
            total += c
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        return out + [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    """Everything ``/metrics`` reports. ``gauges`` maps a metric name to (help, a function read at scrape time)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram()
        self.itl = Histogram()
        self.latency = Histogram()
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def count_tokens(self, prompt: int = 0, generated: int = 0) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.generation_tokens += generated

    def observe(self, which: str, seconds: float) -> None:
        """``which``: ``ttft``, ``itl`` or ``latency``."""
        with self._lock:
            getattr(self, which).observe(seconds)

    def render(self) -> str:
        """The whole exposition, one metric family after another."""
        with self._lock:
            out = ["# HELP moelab_requests_total HTTP requests answered, by endpoint and status code.",
                   "# TYPE moelab_requests_total counter"]
            for (endpoint, status), n in sorted(self.requests.items()):
                out.append(f'moelab_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            for name, help_, value in (
                    ("moelab_prompt_tokens_total", "Prompt tokens prefilled.", self.prompt_tokens),
                    ("moelab_generation_tokens_total", "Tokens generated.", self.generation_tokens)):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {value}"]
            for name, (help_, read) in sorted(self.gauges.items()):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {float(read()):g}"]
            for name, help_, hist in (
                    ("moelab_time_to_first_token_seconds", "From arrival to the first token.", self.ttft),
                    ("moelab_inter_token_latency_seconds", "Between consecutive tokens of one choice.", self.itl),
                    ("moelab_request_latency_seconds", "From arrival to the last token.", self.latency)):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram", *hist.lines(name)]
        return "\n".join(out) + "\n"


__all__ = ["BUCKETS", "Histogram", "Metrics"]
