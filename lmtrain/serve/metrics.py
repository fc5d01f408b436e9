"""``/metrics`` of ``lmtrain serve``: Prometheus text format through ``prometheus_client``.

Each server owns its own ``CollectorRegistry`` (never the process-global one), so two servers in
one process (tests, notebooks) keep separate counts and nothing else registered globally leaks in.

Drift: every prompt's mean negative log-likelihood per token under the served model (its
log-perplexity, nats) goes into ``lmtrain_prompt_log_perplexity``; at start-up the same quantity
for windows of the run's validation split goes into ``lmtrain_reference_log_perplexity`` with
the same buckets. The two histograms side by side show whether what users send still looks like
what the model was validated on (a rising prompt median means a shift). When the run has no
validation split on disk, the reference histogram stays empty and
``lmtrain_reference_info{source="none"}`` says so.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds: from a loopback CPU toy model (milliseconds) to a large model under load (tens of s).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# Nats per token: 0 (memorised) to ~12 (uniform over a 160k vocabulary is ln(160k) = 12).
LOG_PPL_BUCKETS = (0.25, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 8, 10, 12)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    """The server's Prometheus metrics; ``render()`` is the ``/metrics`` body."""

    def __init__(self, model_name: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "lmtrain_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.errors = Counter(
            "lmtrain_errors",
            "Requests that ended in an error, by kind (bad_request, unauthorized, busy, "
            "generation, ...)",
            ["kind"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "lmtrain_prompt_tokens", "Prompt tokens of accepted requests", registry=r
        )
        self.generated_tokens = Counter(
            "lmtrain_generated_tokens", "Tokens generated for clients", registry=r
        )
        self.ttft = Histogram(
            "lmtrain_time_to_first_token_seconds",
            "From a request entering the queue to its first sampled token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "lmtrain_time_per_output_token_seconds",
            "Wall time of one decode step (one token for every row of the batch)",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "lmtrain_request_duration_seconds",
            "Whole request, from its first byte read to its last byte written",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "lmtrain_queue_depth", "Generation requests waiting for the engine", registry=r
        )
        self.connections = Gauge(
            "lmtrain_open_connections", "Connections held by the worker pool", registry=r
        )
        self.batch_size = Histogram(
            "lmtrain_batch_size",
            "Requests decoded together per engine batch",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.prompt_log_perplexity = Histogram(
            "lmtrain_prompt_log_perplexity",
            "Mean negative log-likelihood per token (nats) of each prompt under the served model",
            buckets=LOG_PPL_BUCKETS,
            registry=r,
        )
        self.reference_log_perplexity = Histogram(
            "lmtrain_reference_log_perplexity",
            "The same for windows of the run's validation split, measured at start-up: the "
            "baseline the prompt distribution is compared with",
            buckets=LOG_PPL_BUCKETS,
            registry=r,
        )
        self.reference_info = Gauge(
            "lmtrain_reference_info",
            "Where the drift reference came from (1 on the active label set)",
            ["source", "windows", "window_tokens"],
            registry=r,
        )

    def set_reference(self, values: list[float], source: str, window_tokens: int) -> None:
        for v in values:
            self.reference_log_perplexity.observe(v)
        self.reference_info.labels(source, str(len(values)), str(window_tokens)).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
