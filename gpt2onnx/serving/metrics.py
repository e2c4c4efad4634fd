"""Prometheus metrics of one server (one registry per app, so several apps can live in one process).

What the engine knows (running, waiting, tokens) is read from `engine.stats()` at scrape time; what only the
HTTP side sees (time to first token, inter-token latency, request duration, rejections by reason) is
observed as requests go; the batch size is observed by the engine's scheduler after every decode step.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "gpt2onnx"

# seconds; a decode step of GPT-2 124M on 2 cores is ~3-20 ms, a first token after a long prefill ~1 s
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
                    5.0, 10.0)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# why a request was refused (the `reason` label of gpt2onnx_rejected_total): its content; its headers (Host,
# Origin, Content-Type, key: serving/guards.py); its body (too large, too slow); the server's state
REASONS = ("invalid", "context_length", "not_found", "bad_host", "cross_origin", "content_type", "unauthorized",
           "too_large", "read_timeout", "busy", "queue_full", "loading", "load_failed", "draining", "engine_stopped")


class Metrics:
    """The server's metrics. `engine_stats` returns the engine's stats (or None while it loads)."""

    def __init__(self, engine_stats: Callable[[], object | None]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Completion requests answered, by outcome",
                                ["status"], registry=r)
        self.rejected = Counter(f"{PREFIX}_rejected", "Requests refused before any work, by reason", ["reason"],
                                registry=r)
        for reason in REASONS:
            self.rejected.labels(reason)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "From a request's arrival to its first generated token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.inter_token = Histogram(f"{PREFIX}_inter_token_latency_seconds",
                                     "Between two consecutive tokens of one sequence", buckets=_LATENCY_BUCKETS,
                                     registry=r)
        self.duration = Histogram(f"{PREFIX}_request_duration_seconds",
                                  "From a request's arrival to its last token (end to end)",
                                  buckets=_DURATION_BUCKETS, registry=r)
        self.batch_size = Histogram(f"{PREFIX}_batch_size_rows", "Rows (sequences) in each decode step",
                                    buckets=_BATCH_BUCKETS, registry=r)
        r.register(_EngineCollector(engine_stats))

    def on_step(self, rows: int) -> None:
        """Called by the engine's scheduler thread after each decode step."""
        self.batch_size.observe(rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """The engine's own counters and gauges, read when Prometheus scrapes."""

    def __init__(self, engine_stats):
        self.engine_stats = engine_stats

    def describe(self):
        return []  # collected lazily: the engine may not exist yet

    def collect(self):
        stats = self.engine_stats()
        gauges = (("requests_running", "running_requests", "Requests whose rows are in the running batch"),
                  ("rows_running", "running_rows", "Rows (sequences) in the running batch"),
                  ("requests_waiting", "waiting", "Requests queued to join the batch"),
                  ("requests_prefilling", "prefilling", "Requests whose prompt is being prefilled"))
        counters = (("generation_tokens", "tokens", "Tokens generated"),
                    ("prompt_tokens", "prompt_tokens", "Prompt tokens prefilled"),
                    ("engine_steps", "steps", "Scheduler decode steps"))
        for name, field, doc in gauges:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=_field(stats, field))
        for name, field, doc in counters:
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=_field(stats, field))
        yield GaugeMetricFamily(f"{PREFIX}_engine_alive", "1 while the engine's scheduler runs",
                                value=float(bool(stats is not None and _field(stats, "alive", 1))))


def _field(stats, name: str, default: float = 0.0) -> float:
    return float(getattr(stats, name, default) or 0) if stats is not None else 0.0
